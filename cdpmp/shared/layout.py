"""The ring file's byte layout, its header checks, how the file is reserved, and how
its records are parsed back (:func:`parse`, damaged bytes included).

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
    56   Q   flush_to: a producer's ``flush()`` asked that records before this offset
         be sent now, whatever their interval (0: none; zero "reserved" before)
    64   12Q counters (COUNTERS, in that order; the last was zero "reserved" before)
    160  Q   uploader pid        168 d uploader create time (psutil)
    176  d   uploader heartbeat (time.time())
    184  d   last spawn attempt (time.time()), rate-limits auto-start host-wide
    192  256s last delivery error (UTF-8, NUL-padded; never payload or key)
    448  64 x (Q pid, d create time): producer slots (processes that used the ring)
    1536 64 x (Q source, Q count, Q limit): per-source slots (records held, and the
         limit its producers last asked for: their max_queue_size)
    3072 64 x (Q source, Q offset): how far each source's producers have read
         ``dead-letter.jsonl`` (:mod:`.notices`; zero in rings made before it)

Data area, from ``HEADER_SIZE``: records, each 8-byte aligned::

    I  payload length     I  marker (RECORD or PAD)     Q  source id
    payload bytes (one serialised message), zero padding to a multiple of 8

A record that would cross the end of the data area is preceded by a PAD record filling
the rest (or, when fewer than 16 bytes remain, by nothing: readers skip such a
remainder). The reader validates marker, length and bounds of every record; damaged
bytes are skipped up to the next valid record and handed on as one ``CORRUPT`` record
(quarantined by the uploader), so they never stop what follows.

Reads without the lock, and why each is safe. Every write to the map goes through
:func:`.layout.store`: one copy of already-packed bytes, never ``pack_into`` (which
zeroes its target first, so a lock-free reader saw values no writer stored). Each
field below is an aligned 8-byte word, so a reader sees its old or its new value:

* ``head``, ``tail`` (:meth:`Ring.peek`: ``flush()``'s drained test, a signal
  handler's wait): they only grow; a waiter compares them with a value read earlier.
* ``count`` and the per-source counts (:meth:`Ring.peek`, ``stats()["host"]``): each
  a value once stored; read together with head/tail they may be from neighbouring
  moments (a snapshot, not a transaction), never a torn or zeroed word. ``count`` is
  stored before the ``tail`` (a put) or ``head`` (a release) it goes with; on x86-64
  stores become visible in order, so a reader that has seen a new head or tail reads
  a count at least as new (``flush()`` then ``stats()`` agree); on weaker memory
  models (ARM) the two may be seen in either order for an instant.
* the host counters (``stats()["host"]``, ``cdpmp stats``, Prometheus): they only
  grow, so a reader never sees one fall.
* the uploader's pid and heartbeat (liveness checks): a stale value only delays a
  restart by one check.

The file is reserved in full when it is created (``posix_fallocate``; a sparse file
left by an older version is reserved when opened): a write into a page the tmpfs
cannot supply would kill the producer with SIGBUS. The capacity is capped at half of
what the file system has free. Every header field is checked when the ring is opened.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import struct
import sys
import time
from typing import Callable, List, NamedTuple, Tuple

from .files import RuntimeDirError

logger = logging.getLogger("cdpmp")

MAGIC = b"CDPMPRNG"
FORMAT_VERSION = 1
HEADER_SIZE = 4096
RECORD = 0xCD9A0001
PAD = 0xCD9AFFFF
REC = struct.Struct("<IIQ")
HEAD_TAIL_COUNT = struct.Struct("<QQQ")
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
    "dead_letter_overflow",
)
COUNTERS_AT = 64
ACCEPTED_AT = COUNTERS_AT  # "accepted" is the first counter
U64 = struct.Struct("<Q")
UPLOADER = struct.Struct("<Qdd")  # pid, create time, heartbeat at 160
SPAWN_AT = 184
FLUSH_TO_AT = 56
ERROR_AT, ERROR_LEN = 192, 256
SLOTS, SLOTS_AT = 64, 448
SLOT = struct.Struct("<Qd")
SOURCES, SOURCES_AT = 64, 1536
SRC = struct.Struct("<QQQ")
NOTICES_AT = 3072  # 64 x (Q source, Q dead-letter offset read up to): see .notices
F64 = struct.Struct("<d")


def store(mm: mmap.mmap, at: int, layout: struct.Struct, *values: object) -> None:
    """Write ``values`` at ``at`` with ONE copy of the packed bytes: the only way the
    ring is written (``Ring.put``, the hot path, makes the same copies inline:
    ``mm[a:b] = layout.pack(...)``). ``layout.pack_into(mm, ...)`` first zeroes its target and then
    writes each field, so a process reading without the lock could see a ``count``
    of 0, or a counter fall, that no writer ever stored (measured: 345 "empty" and
    959 falling reads of 229,045 while another process wrote). ``mm[a:b] = bytes``
    is one ``memcpy``, which moves each aligned 8-byte word in one store."""
    mm[at : at + layout.size] = layout.pack(*values)


MAX_PAYLOAD = 32 * 1024 + 1024
#: The source of a :class:`Record` holding damaged bytes instead of a message.
CORRUPT = (1 << 64) - 1


class RingFormatError(RuntimeDirError):
    """The ring file exists but has another format version or is damaged."""


class RingBusy(OSError):
    """The ring lock could not be taken within the caller's deadline."""


def flock_within(fd: int, timeout: float) -> None:
    """Take the host lock within ``timeout`` seconds, polling every millisecond.

    The wait blocks the OS thread, never switches greenlets, where gevent or eventlet
    patched ``time.sleep``: its callers may hold a lock made before the patching (an
    OS lock: cdpmp is imported in a gunicorn master, the workers patch after fork),
    and a greenlet switched in then blocks the OS thread on that lock for good (a
    gevent worker that hung at its first requests, seen in CI). The wait is bounded
    and the uploader holds the lock for microseconds."""
    deadline = time.monotonic() + timeout
    sleep = _os_sleep()
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise RingBusy("the ring lock is held by another process") from None
            sleep(0.001)


def _os_sleep() -> Callable[[float], None]:
    """``time.sleep`` as it was before gevent or eventlet patched it (if either did)."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("time"):
        return monkey.get_original("time", "sleep")  # type: ignore[no-any-return]
    patcher = sys.modules.get("eventlet.patcher")
    if patcher is not None and patcher.is_monkey_patched("time"):
        return patcher.original("time").sleep  # type: ignore[no-any-return]
    return time.sleep


class Record(NamedTuple):
    start: int  # offset of this record (its identity while it is in the ring)
    end: int  # offset just past this record
    source: int
    payload: bytes


def aligned(n: int) -> int:
    return (n + 7) & ~7


MIN_CAPACITY = 64 << 10  # below this a ring holds too few records to be worth it


def fit(fd: int, capacity: int, path: str) -> int:
    """``capacity``, shrunk to half of what the file system has free (a small
    ``/dev/shm`` is shared with everything else in the container)."""
    vfs = os.fstatvfs(fd)
    room = (vfs.f_bavail * vfs.f_frsize // 2 - HEADER_SIZE) & ~7
    if room >= capacity:
        return capacity
    if room < MIN_CAPACITY:
        raise RuntimeDirError(f"{path}: only {room} bytes could be reserved for the ring")
    logger.warning(
        "cdpmp: the shared-mode ring gets %d bytes instead of %d: its file system has little room",
        room,
        capacity,
    )
    return room


def reserve(fd: int, size: int, path: str) -> None:
    """Allocate every page of the file now; refuse (and leave no half-made ring) if
    the file system cannot hold it."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        os.ftruncate(fd, 0)
        raise RuntimeDirError(f"{path}: cannot reserve {size} bytes ({exc.strerror})") from None


def header_problem(mm: mmap.mmap, size: int) -> str:
    """Why this header cannot be trusted, or "" when every field is consistent."""
    if size < HEADER_SIZE + MIN_CAPACITY // 16:
        return f"file of {size} bytes is too small"
    magic, version, header, cap, limit = struct.unpack_from("<8sIIQQ", mm, 0)
    if magic != MAGIC or version != FORMAT_VERSION or header != HEADER_SIZE:
        return f"format {magic!r} v{version}, expected v{FORMAT_VERSION}"
    if cap % 8 or size != HEADER_SIZE + cap:
        return f"size {size} does not match its header (capacity {cap})"
    head, tail, count = HEAD_TAIL_COUNT.unpack_from(mm, 32)
    if limit < 1 or head > tail or tail - head > cap or head % 8 or tail % 8 or count > (tail - head) // 16:
        return f"inconsistent header (head {head}, tail {tail}, count {count}, limit {limit})"
    return ""


def parse(
    mm: mmap.mmap, cap: int, start: int, tail: int, limit_records: int, limit_bytes: int
) -> Tuple[List[Record], int]:
    """The records from ``start`` up to ``tail`` (at most ``limit_records``, and past
    ``limit_bytes`` of payload no more), and how many damaged spans were among them.
    Damaged bytes come back as one :data:`CORRUPT` record (raw bytes, at most
    ``MAX_PAYLOAD``) spanning up to the next position where a valid record starts:
    they never stop what follows."""
    unpack, rec_size = REC.unpack_from, REC.size  # locals: this loop runs per record
    out: List[Record] = []
    append = out.append
    size = damaged = 0
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
            end = _resync(mm, cap, offset + 8, tail)
            damaged += 1
            raw = bytes(mm[HEADER_SIZE + pos : HEADER_SIZE + min(cap, pos + min(end - offset, MAX_PAYLOAD))])
            append(Record(offset, end, CORRUPT, raw))
            offset = end
            continue
        at = HEADER_SIZE + pos + rec_size
        append(Record(offset, end, source, mm[at : at + length]))  # slicing an mmap copies
        size += length
        offset = end
    return out, damaged


def _resync(mm: mmap.mmap, cap: int, offset: int, tail: int) -> int:
    """The first 8-aligned offset after damage where a plausible record (or the
    end-of-area padding) starts; ``tail`` if none does."""
    while offset < tail:
        pos = offset % cap
        if cap - pos < REC.size:
            return offset + (cap - pos)
        length, marker, _ = REC.unpack_from(mm, HEADER_SIZE + pos)
        end = offset + REC.size + ((length + 7) & ~7)
        if marker == RECORD and length <= MAX_PAYLOAD and pos + REC.size + length <= cap and end <= tail:
            return offset
        if marker == PAD and pos + REC.size + length == cap:
            return offset
        offset += 8
    return tail
