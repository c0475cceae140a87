"""The host-wide shared-memory ring of shared mode: file format and lock discipline.

File ``ring`` in the runtime directory (0600), mapped ``MAP_SHARED`` by every process.
All integers little-endian. Offsets are *monotonic* byte counts (never wrapped);
a position in the data area is ``offset % capacity``.

Header (``HEADER_SIZE`` = 4096 bytes)::

    0    8s  magic  b"CDPMPRNG"
    8    I   format version (FORMAT_VERSION); a different version is refused
    12   I   header size
    16   Q   capacity: size of the data area in bytes (multiple of 8)
    24   Q   max_count: host-wide message limit (the creator's max_queue_size)
    32   Q   head: offset of the oldest record not yet acknowledged
    40   Q   tail: offset where the next record goes
    48   Q   count: records between head and tail
    56   Q   reserved
    64   12Q counters (COUNTERS, in that order)
    160  Q   uploader pid        168 d uploader create time (psutil)
    176  d   uploader heartbeat (time.time())
    184  d   last spawn attempt (time.time()), rate-limits auto-start host-wide
    192  256s last delivery error (UTF-8, NUL-padded; never payload or key)
    448  64 x (Q pid, d create time): producer slots (processes that used the ring)

Data area, from ``HEADER_SIZE``: records, each 8-byte aligned::

    I  payload length     I  marker (RECORD or PAD)     Q  source id
    payload bytes (one serialised message), zero padding to a multiple of 8

A record that would cross the end of the data area is preceded by a PAD record filling
the rest (or, when fewer than 16 bytes remain, by nothing: readers skip such a
remainder). The reader validates marker, length and bounds of every record.

Lock discipline: every mutation of head/tail/count/counters happens under BOTH a
``threading.Lock`` (threads of one process share the lock fd, and ``flock`` does not
exclude them) and ``fcntl.flock`` on ``ring.lock``, a file each process opens itself
after fork: an inherited flock fd is the *same* lock and gives no exclusion. The kernel
drops a flock when its holder dies, so a SIGKILLed producer can never wedge the ring
(semaphores and pthread mutexes can). A writer copies the record bytes first and
publishes them with one store of ``tail`` (count and tail are written by one
``pack_into``), so a writer killed mid-copy leaves no visible partial record. Records
are removed only by advancing ``head``, after the uploader's batch was acknowledged
or definitively rejected: an uploader crash loses nothing.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import threading
import time
import weakref
from contextlib import contextmanager
from typing import Iterator, List, NamedTuple, Optional, Tuple

from .._outcome import HostStats
from .files import RuntimeDirError, open_private

MAGIC = b"CDPMPRNG"
FORMAT_VERSION = 1
HEADER_SIZE = 4096
RECORD = 0xCD9A0001
PAD = 0xCD9AFFFF
REC = struct.Struct("<IIQ")
HEAD_TAIL_COUNT = struct.Struct("<QQQ")
TAIL_COUNT = struct.Struct("<QQ")  # tail at 40, count at 48: one store publishes both
COUNTERS = (
    "accepted",
    "queue_full",
    "sent",
    "failed",
    "batches",
    "requests",
    "retries",
    "dead_lettered",
    "spawns",
    "corrupt",
    "unknown_source",
    "reserved",
)
_COUNTERS_AT = 64
_ACCEPTED_AT = _COUNTERS_AT  # "accepted" is the first counter
_U64 = struct.Struct("<Q")
_UPLOADER = struct.Struct("<Qdd")  # pid, create time, heartbeat at 160
_SPAWN_AT = 184
_ERROR_AT, _ERROR_LEN = 192, 256
SLOTS, _SLOTS_AT = 64, 448
_SLOT = struct.Struct("<Qd")
MAX_PAYLOAD = 32 * 1024 + 1024


class RingFormatError(RuntimeDirError):
    """The ring file exists but has another format version or is damaged."""


class RingBusy(OSError):
    """The ring lock could not be taken within the caller's deadline."""


def _flock_within(fd: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise RingBusy("the ring lock is held by another process") from None
            time.sleep(0.001)


class Record(NamedTuple):
    start: int  # offset of this record (its identity while it is in the ring)
    end: int  # offset just past this record
    source: int
    payload: bytes


def _aligned(n: int) -> int:
    return (n + 7) & ~7


class Ring:
    """One process's handle on the ring. Re-open (``Ring(path...)``) after fork."""

    def __init__(self, directory: str, capacity: int = 32 << 20, max_count: int = 10000) -> None:
        self.path = os.path.join(directory, "ring")
        self._lock_fd = open_private(os.path.join(directory, "ring.lock"))
        # A handle dropped without close() must not leak its lock descriptor.
        self._release_fd = weakref.finalize(self, _close_fd, self._lock_fd)
        self._tlock = threading.Lock()
        with self._locked():
            fd = open_private(self.path)
            try:
                size = os.fstat(fd).st_size
                if size == 0:
                    capacity = _aligned(capacity)
                    os.ftruncate(fd, HEADER_SIZE + capacity)
                    self.mm = mmap.mmap(fd, HEADER_SIZE + capacity)
                    struct.pack_into(
                        "<8sIIQQ", self.mm, 0, MAGIC, FORMAT_VERSION, HEADER_SIZE, capacity, max_count
                    )
                else:
                    self.mm = mmap.mmap(fd, size)
            finally:
                os.close(fd)
            magic, version, header, cap, limit = struct.unpack_from("<8sIIQQ", self.mm, 0)
            if magic != MAGIC or version != FORMAT_VERSION or header != HEADER_SIZE:
                self.mm.close()
                raise RingFormatError(f"{self.path}: format {magic!r} v{version}, expected v{FORMAT_VERSION}")
            if len(self.mm) != HEADER_SIZE + cap:
                self.mm.close()
                raise RingFormatError(f"{self.path}: size does not match its header")
        self.capacity: int = cap
        self.max_count: int = limit

    def close(self) -> None:
        """Unmap and close the lock descriptor (idempotent)."""
        if not self.mm.closed:
            self.mm.close()
        self._release_fd()

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Host-wide mutual exclusion (also used to update the sources file)."""
        with self._locked():
            yield

    @contextmanager
    def _locked(self, timeout: Optional[float] = None) -> Iterator[None]:
        """Both locks; with ``timeout`` (seconds) raise :class:`RingBusy` instead of
        waiting longer (a signal handler may interrupt this thread while it holds
        them: the non-reentrant thread lock then never frees)."""
        if timeout is None:
            self._tlock.acquire()
        elif not self._tlock.acquire(timeout=timeout):
            raise RingBusy("the ring lock is held by this process")
        try:
            if timeout is None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            else:
                _flock_within(self._lock_fd, timeout)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        finally:
            self._tlock.release()

    # -- producers -----------------------------------------------------------------------

    def put(self, source: int, payload: bytes) -> bool:
        """Append one record; False (and ``queue_full`` counted) when the host is full."""
        size = len(payload)
        need = REC.size + ((size + 7) & ~7)
        mm, cap = self.mm, self.capacity
        # Explicit acquire/release instead of the _locked() context manager: this is
        # the producer's hot path and a generator-based context costs ≈1 µs.
        with self._tlock:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                head, tail, count = HEAD_TAIL_COUNT.unpack_from(mm, 32)
                pos = tail % cap
                gap = cap - pos if cap - pos < need else 0
                if count >= self.max_count or (tail - head) + gap + need > cap:
                    self._bump_locked("queue_full")
                    return False
                if gap:
                    if gap >= REC.size:
                        REC.pack_into(mm, HEADER_SIZE + pos, gap - REC.size, PAD, 0)
                    tail += gap
                    pos = 0
                at = HEADER_SIZE + pos
                REC.pack_into(mm, at, size, RECORD, source)
                mm[at + REC.size : at + REC.size + size] = payload
                TAIL_COUNT.pack_into(mm, 40, tail + need, count + 1)
                (accepted,) = _U64.unpack_from(mm, _ACCEPTED_AT)
                _U64.pack_into(mm, _ACCEPTED_AT, accepted + 1)
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        return True

    def register_producer(self, pid: int, create_time: float) -> None:
        """Record this process in a free (or dead) producer slot; best effort."""
        with self._locked():
            for i in range(SLOTS):
                at = _SLOTS_AT + i * _SLOT.size
                slot_pid, _ = _SLOT.unpack_from(self.mm, at)
                if slot_pid in (0, pid) or not pid_alive(slot_pid):
                    _SLOT.pack_into(self.mm, at, pid, create_time)
                    return

    def producers(self) -> List[Tuple[int, float]]:
        out = []
        for i in range(SLOTS):
            pid, ctime = _SLOT.unpack_from(self.mm, _SLOTS_AT + i * _SLOT.size)
            if pid:
                out.append((pid, ctime))
        return out

    # -- the uploader --------------------------------------------------------------------

    def bounds(self) -> Tuple[int, int, int]:
        """(head, tail, count), read under the lock."""
        with self._locked():
            return HEAD_TAIL_COUNT.unpack_from(self.mm, 32)

    def peek(self) -> Tuple[int, int, int]:
        """(head, tail, count) without any lock: each is one aligned 8-byte word and
        head and tail only grow, so a waiter comparing them needs no lock (and a
        signal handler may call it while this thread holds the lock)."""
        return HEAD_TAIL_COUNT.unpack_from(self.mm, 32)

    def read(self, start: int, limit_records: int, limit_bytes: int) -> List[Record]:
        """Parse records from ``start`` up to the current tail (they are immutable until
        ``head`` passes them). Damaged bytes end the scan at the tail, counted."""
        _, tail, _ = self.bounds()
        mm, cap = self.mm, self.capacity
        unpack, rec_size = REC.unpack_from, REC.size  # locals: this loop runs per record
        out: List[Record] = []
        append = out.append
        size = 0
        offset = start
        while offset < tail and len(out) < limit_records and size < limit_bytes:
            pos = offset % cap
            if cap - pos < rec_size:
                offset += cap - pos
                continue
            length, marker, source = unpack(mm, HEADER_SIZE + pos)
            if marker == PAD and pos + rec_size + length == cap:
                offset += cap - pos
                continue
            end = offset + rec_size + ((length + 7) & ~7)
            if marker != RECORD or length > MAX_PAYLOAD or pos + rec_size + length > cap or end > tail:
                self.bump("corrupt")
                append(Record(offset, tail, 0, b""))  # skip everything up to the tail
                break
            at = HEADER_SIZE + pos + rec_size
            append(Record(offset, end, source, mm[at : at + length]))  # slicing an mmap copies
            size += length
            offset = end
        return out

    def release(self, new_head: int, records: int) -> None:
        """Free everything before ``new_head`` (``records`` records)."""
        with self._locked():
            head, tail, count = HEAD_TAIL_COUNT.unpack_from(self.mm, 32)
            new_head = min(max(new_head, head), tail)
            struct.pack_into("<QQQ", self.mm, 32, new_head, tail, max(0, count - records))

    def recount(self) -> int:
        """Recompute ``count`` by walking head→tail (repairs drift after a crash)."""
        with self._locked():
            head, tail, _ = HEAD_TAIL_COUNT.unpack_from(self.mm, 32)
        n = sum(1 for r in self.read(head, 1 << 62, 1 << 62) if r.payload)
        with self._locked():
            h, t, _ = HEAD_TAIL_COUNT.unpack_from(self.mm, 32)
            if (h, t) == (head, tail):
                struct.pack_into("<Q", self.mm, 48, n)
        return n

    def set_uploader(self, pid: int, create_time: float) -> None:
        with self._locked():
            _UPLOADER.pack_into(self.mm, 160, pid, create_time, time.time())

    def heartbeat(self) -> None:
        struct.pack_into("<d", self.mm, 176, time.time())

    def uploader(self) -> Tuple[int, float, float]:
        """(pid, create time, heartbeat) as last published."""
        return _UPLOADER.unpack_from(self.mm, 160)

    def claim_spawn(self, min_interval: float) -> bool:
        """True for the one caller per ``min_interval`` seconds allowed to spawn."""
        now = time.time()
        with self._locked(timeout=0.5):
            (last,) = struct.unpack_from("<d", self.mm, _SPAWN_AT)
            if now - last < min_interval:
                return False
            struct.pack_into("<d", self.mm, _SPAWN_AT, now)
            self._bump_locked("spawns")
            return True

    # -- counters ------------------------------------------------------------------------

    def _bump_locked(self, name: str, n: int = 1) -> None:
        at = _COUNTERS_AT + 8 * COUNTERS.index(name)
        (value,) = struct.unpack_from("<Q", self.mm, at)
        struct.pack_into("<Q", self.mm, at, value + n)

    def bump(self, name: str, n: int = 1) -> None:
        with self._locked():
            self._bump_locked(name, n)

    def set_error(self, text: str) -> None:
        raw = text.encode("utf-8", "replace")[: _ERROR_LEN - 1]
        with self._locked():
            self.mm[_ERROR_AT : _ERROR_AT + _ERROR_LEN] = raw.ljust(_ERROR_LEN, b"\0")

    def counters(self) -> HostStats:
        values = struct.unpack_from("<12Q", self.mm, _COUNTERS_AT)
        head, tail, count = HEAD_TAIL_COUNT.unpack_from(self.mm, 32)
        pid, _, beat = self.uploader()
        error = bytes(self.mm[_ERROR_AT : _ERROR_AT + _ERROR_LEN]).rstrip(b"\0").decode("utf-8", "replace")
        named = dict(zip(COUNTERS[:-1], values[:-1]))
        return HostStats(
            accepted=named["accepted"],
            queue_full=named["queue_full"],
            sent=named["sent"],
            failed=named["failed"],
            batches=named["batches"],
            requests=named["requests"],
            retries=named["retries"],
            dead_lettered=named["dead_lettered"],
            spawns=named["spawns"],
            corrupt=named["corrupt"],
            unknown_source=named["unknown_source"],
            depth=count,
            bytes_used=tail - head,
            capacity=self.capacity,
            max_count=self.max_count,
            uploader_pid=pid or None,
            heartbeat_age=(time.time() - beat) if beat else None,
            last_error=error or None,
        )


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
