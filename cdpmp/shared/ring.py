"""The host-wide shared-memory ring of shared mode: its handle and lock discipline.

The byte layout, the header checks, the file's reservation and the parsing of records
are in :mod:`.layout`; the header's bookkeeping fields in :mod:`.header`.

Lock discipline: every mutation of head/tail/count/counters happens under BOTH a
``threading.Lock`` (threads of one process share the lock fd, and ``flock`` does not
exclude them) and ``fcntl.flock`` on ``ring.lock``, a file each process opens itself
after fork: an inherited flock fd is the *same* lock and gives no exclusion. The kernel
drops a flock when the last descriptor of its open file closes, so a SIGKILLed
producer does not wedge the ring (semaphores and pthread mutexes can) unless a child it
forked keeps that descriptor: every Python child closes it in the after-fork hook
(:meth:`Ring.disown`), and a producer never waits for the lock longer than
:data:`LOCK_WAIT` (a C ``fork()`` runs no hook). A writer copies the record bytes first and
publishes them with one store of ``tail`` (written after ``count``),
so a writer killed mid-copy leaves no visible partial record. Records are removed only
by advancing ``head``, after the uploader's batch was acknowledged or definitively
rejected: an uploader crash loses nothing.

Which fields are read without the lock, and why each is safe: :mod:`.layout`.
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
from typing import Dict, Iterator, List, Optional, Tuple

from .files import open_private
from .header import RingHeader
from .layout import (
    ACCEPTED_AT,
    CORRUPT,
    FORMAT_VERSION,
    HEAD_TAIL_COUNT,
    HEADER_SIZE,
    MAGIC,
    PAD,
    REC,
    RECORD,
    SOURCES,
    SOURCES_AT,
    SRC,
    U64,
    Record,
    RingBusy,
    RingFormatError,
    aligned,
    fit,
    flock_within,
    header_problem,
    parse,
    reserve,
    store,
)

#: Seconds a producer may wait for the ring lock. Past it the call is refused: a lock
#: held that long is wedged (its holder died while a process it forked, that never
#: called cdpmp, keeps the lock's file description open), and a request must not hang.
LOCK_WAIT = 0.5
#: Seconds after a wait that ran out during which a busy lock is refused at once.
WEDGED_FOR = 2.0
_OPEN: weakref.WeakSet[Ring] = weakref.WeakSet()  # this process's handles


class Ring:
    """One process's handle on the ring. Re-open (``Ring(path...)``) after fork."""

    def __init__(self, directory: str, capacity: int = 32 << 20, max_count: int = 10000) -> None:
        self.path = os.path.join(directory, "ring")
        self._lock_fd = open_private(os.path.join(directory, "ring.lock"))
        self._wedged_until = 0.0
        _OPEN.add(self)
        # A handle dropped without close() must not leak its lock descriptor.
        self._release_fd = weakref.finalize(self, _close_fd, self._lock_fd)
        self._tlock = threading.Lock()
        self._slots: Dict[int, int] = {}  # source -> offset of its slot (checked on use)
        try:
            with self._locked(LOCK_WAIT):
                self.mm = self._map(capacity, max_count)
        except BaseException:
            self._release_fd()
            raise
        _, _, _, cap, limit = struct.unpack_from("<8sIIQQ", self.mm, 0)
        self.capacity: int = cap
        self.max_count: int = limit
        self.header = RingHeader(self.mm, self._locked, cap, limit)

    def _map(self, capacity: int, max_count: int) -> mmap.mmap:
        """Map the ring, creating it if needed; every page is reserved up front
        (``posix_fallocate``), so no producer write can ever fault with SIGBUS on a
        full tmpfs. Called under the lock."""
        fd = open_private(self.path)
        try:
            info = os.fstat(fd)
            self.identity = (info.st_dev, info.st_ino)
            size = info.st_size
            if size == 0:
                size = HEADER_SIZE + fit(fd, aligned(capacity), self.path)
                reserve(fd, size, self.path)
                mm = mmap.mmap(fd, size)
                store(
                    mm,
                    0,
                    struct.Struct("<8sIIQQ"),
                    MAGIC,
                    FORMAT_VERSION,
                    HEADER_SIZE,
                    size - HEADER_SIZE,
                    max_count,
                )
                return mm
            if info.st_blocks * 512 < size:  # sparse: left by an older cdpmp, or truncated
                reserve(fd, size, self.path)
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        problem = header_problem(mm, size)
        if problem:
            mm.close()
            raise RingFormatError(f"{self.path}: {problem}")
        return mm

    def close(self) -> None:
        """Unmap and close the lock descriptor (idempotent)."""
        if not self.mm.closed:
            self.mm.close()
        self._release_fd()

    def disown(self) -> None:
        """Close the lock descriptor a forked child inherited, at once (the after-fork
        hook): while any process holds that descriptor, a lock its parent held when it
        died stays held for every producer of the host. The handle is unusable after
        this; the child's sink opens its own on its first call."""
        if self._release_fd.detach() is not None:
            _close_fd(self._lock_fd)
        self._lock_fd = -1

    @contextmanager
    def locked(self, timeout: Optional[float] = LOCK_WAIT) -> Iterator[None]:
        """Host-wide mutual exclusion (also used to update the sources file); raises
        :class:`RingBusy` past ``timeout`` seconds (a producer never waits unbounded)."""
        with self._locked(timeout):
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
                flock_within(self._lock_fd, timeout)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        finally:
            self._tlock.release()

    # -- producers -----------------------------------------------------------------------

    def put(self, source: int, payload: bytes, limit: int = 0) -> bool:
        """Append one record; False (and ``queue_full`` counted) when the source holds
        ``limit`` records (its producer's ``max_queue_size``; 0: the ring's
        ``max_count``) or the ring has no room for the bytes."""
        mm = self.mm
        limit = limit or self.max_count
        # The producer's hot path, written out: explicit acquire/release instead of the
        # _locked() context manager (a generator-based context costs ≈1 µs), the
        # uncontended locks tried first without a deadline (a timed acquire costs
        # 0.3 µs more), and the 8-byte stores as the one slice copy store() makes.
        tlock = self._tlock
        if not tlock.acquire(False) and not tlock.acquire(timeout=LOCK_WAIT):
            raise RingBusy(f"the ring lock was held by this process for {LOCK_WAIT} s")
        try:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._flock_bounded()
            try:
                head, tail, count = HEAD_TAIL_COUNT.unpack_from(mm, 32)
                at_src = self._source_slot(source)
                if at_src:
                    _, held, asked = SRC.unpack_from(mm, at_src)
                else:  # no slot of its own: held to the ring's count only
                    held, asked = count, limit
                if held >= limit or self._append_locked(source, payload, head, tail, count) < 0:
                    self.header.bump_locked("queue_full")
                    return False
                if asked != limit:
                    store(mm, at_src, SRC, source, held + 1, limit)
                elif at_src:
                    mm[at_src + 8 : at_src + 16] = U64.pack(held + 1)
                (accepted,) = U64.unpack_from(mm, ACCEPTED_AT)
                mm[ACCEPTED_AT : ACCEPTED_AT + 8] = U64.pack(accepted + 1)
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        finally:
            self._tlock.release()
        return True

    def _append_locked(self, source: int, payload: bytes, head: int, tail: int, count: int) -> int:
        """Write one record at ``tail`` and publish it (tail and count in one store);
        its offset, or -1 when the bytes do not fit. Under the lock."""
        mm, cap, size = self.mm, self.capacity, len(payload)
        need = REC.size + ((size + 7) & ~7)
        pos = tail % cap
        gap = cap - pos if cap - pos < need else 0
        if (tail - head) + gap + need > cap:
            return -1
        if gap:
            if gap >= REC.size:
                store(mm, HEADER_SIZE + pos, REC, gap - REC.size, PAD, 0)
            tail += gap
            pos = 0
        at = HEADER_SIZE + pos
        mm[at : at + 16] = REC.pack(size, RECORD, source)  # as store() writes: one copy
        mm[at + 16 : at + 16 + size] = payload
        mm[48:56] = U64.pack(count + 1)  # count before tail: whoever sees the new tail
        mm[40:48] = U64.pack(tail + need)  # sees its count too (stores stay in order)
        return tail

    def _flock_bounded(self) -> None:
        """Take the host lock within :data:`LOCK_WAIT`; once a wait has run out, for
        :data:`WEDGED_FOR` seconds a busy lock is refused at once (a wedged host must
        not cost every call half a second)."""
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        now = time.monotonic()
        if now < self._wedged_until:
            raise RingBusy("the ring lock is held by another process (wedged)")
        try:
            flock_within(self._lock_fd, LOCK_WAIT)
        except RingBusy:
            self._wedged_until = now + LOCK_WAIT + WEDGED_FOR
            raise

    def _source_slot(self, source: int) -> int:
        """Offset of ``source``'s slot, claiming a free one (an unused id, or one that
        holds no record) if it has none; 0 when all 64 are busy (the source is then
        held to the ring's ``max_count`` only). Called under the lock."""
        mm = self.mm
        cached = self._slots.get(source)
        if cached and U64.unpack_from(mm, cached)[0] == source:
            return cached
        free = 0
        for i in range(SOURCES):
            at = SOURCES_AT + i * SRC.size
            sid, held, _ = SRC.unpack_from(mm, at)
            if sid == source:
                self._slots[source] = at
                return at
            if not free and (sid == 0 or held == 0):
                free = at
        if free:
            store(mm, free, SRC, source, 0, 0)
            self._slots[source] = free
        return free

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

    def held_by(self, source: int) -> Optional[int]:
        """Records ``source`` holds (undelivered, not given up), without any lock (an
        aligned word, as :meth:`peek`); None when it has no slot (all 64 are busy)."""
        at = self._slots.get(source)
        if not at or U64.unpack_from(self.mm, at)[0] != source:
            return None
        return int(U64.unpack_from(self.mm, at + 8)[0])

    def read(self, start: int, limit_records: int, limit_bytes: int, tally: bool = True) -> List[Record]:
        """Parse records from ``start`` up to the current tail (they are immutable until
        ``head`` passes them). Damaged bytes are returned as one :data:`CORRUPT`
        record (raw bytes, at most ``MAX_PAYLOAD``) spanning up to the next position
        where a valid record starts, counted: they never stop what follows."""
        _, tail, _ = self.bounds()
        records, damaged = parse(self.mm, self.capacity, start, tail, limit_records, limit_bytes)
        if damaged and tally:  # counted once, by the reader that hands it on
            self.header.bump("corrupt", damaged)
        return records

    def take_all(self) -> List[Record]:
        """Every record still in the ring, which is then left empty: used to carry what
        a deleted or replaced ring held into its successor. Under the lock, so among
        all the processes that map this ring exactly one takes each record."""
        with self._locked(LOCK_WAIT):
            head, tail, _ = HEAD_TAIL_COUNT.unpack_from(self.mm, 32)
            records, _ = parse(self.mm, self.capacity, head, tail, 1 << 62, 1 << 62)
            store(self.mm, 32, HEAD_TAIL_COUNT, tail, tail, 0)
            for i in range(SOURCES):
                store(self.mm, SOURCES_AT + i * SRC.size + 8, U64, 0)
        return [r for r in records if r.payload and r.source != CORRUPT]

    def replaced(self) -> bool:
        """True when the file at our path is gone or is another file than the one we
        mapped (removed by ``RemoveIPC``, tmpfiles ageing or an admin)."""
        try:
            info = os.stat(self.path)
        except OSError:
            return True
        return (info.st_dev, info.st_ino) != self.identity

    def release(self, new_head: int, records: int) -> None:
        """Free everything before ``new_head`` (``records`` records). What each source
        holds is settled at delivery instead (:func:`.holding.settle_counts`)."""
        with self._locked():
            head, tail, count = HEAD_TAIL_COUNT.unpack_from(self.mm, 32)
            new_head = min(max(new_head, head), tail)
            store(self.mm, 48, U64, max(0, count - records))  # count first: whoever sees
            store(self.mm, 32, U64, new_head)  # the new head (flush()) sees its count


def _disown_inherited() -> None:
    """After ``fork``, in the child: close every ring lock descriptor inherited."""
    for ring in list(_OPEN):
        ring.disown()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_disown_inherited)


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
