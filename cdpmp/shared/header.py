"""The ring header's bookkeeping: producers, the uploader, counters, sources, errors.

:class:`RingHeader` reads and writes the header's fixed fields of a mapped ring (see
:mod:`.layout` for where each lives); a :class:`cdpmp.shared.ring.Ring` holds one as
``ring.header`` and lends it its locks. The records themselves are :mod:`.ring`'s.
Every write happens under the ring's locks.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from contextlib import AbstractContextManager
from typing import Callable, List, Optional, Tuple

from .._outcome import HostStats
from .layout import (
    COUNTERS,
    COUNTERS_AT,
    ERROR_AT,
    ERROR_LEN,
    F64,
    FLUSH_TO_AT,
    HEAD_TAIL_COUNT,
    SLOT,
    SLOTS,
    SLOTS_AT,
    SOURCES,
    SOURCES_AT,
    SPAWN_AT,
    SRC,
    U64,
    UPLOADER,
    store,
)

Locked = Callable[[Optional[float]], AbstractContextManager[None]]


class RingHeader:
    """Header fields of a mapped ring (``mm``), under the ring's locks (``locked``:
    both of them, waiting at most the seconds given, ``None``: unbounded)."""

    def __init__(self, mm: mmap.mmap, locked: Locked, capacity: int, max_count: int) -> None:
        self.mm = mm
        self._locked = locked
        self.capacity = capacity
        self.max_count = max_count

    def sources(self) -> List[Tuple[int, int, int]]:
        """(source, records held, limit) of every source slot in use."""
        out = []
        for i in range(SOURCES):
            sid, held, limit = SRC.unpack_from(self.mm, SOURCES_AT + i * SRC.size)
            if sid and (held or limit):
                out.append((sid, held, limit))
        return out

    def register_producer(self, pid: int, create_time: float) -> None:
        """Record this process in a free (or dead) producer slot; best effort."""
        with self._locked(0.5):
            for i in range(SLOTS):
                at = SLOTS_AT + i * SLOT.size
                slot_pid, _ = SLOT.unpack_from(self.mm, at)
                if slot_pid in (0, pid) or not pid_alive(slot_pid):
                    store(self.mm, at, SLOT, pid, create_time)
                    return

    def producers(self) -> List[Tuple[int, float]]:
        out = []
        for i in range(SLOTS):
            pid, ctime = SLOT.unpack_from(self.mm, SLOTS_AT + i * SLOT.size)
            if pid:
                out.append((pid, ctime))
        return out

    def set_uploader(self, pid: int, create_time: float) -> None:
        with self._locked(None):
            store(self.mm, 160, UPLOADER, pid, create_time, time.time())

    def heartbeat(self) -> None:
        store(self.mm, 176, F64, time.time())

    def uploader(self) -> Tuple[int, float, float]:
        """(pid, create time, heartbeat) as last published."""
        return UPLOADER.unpack_from(self.mm, 160)

    def claim_spawn(self, min_interval: float) -> bool:
        """True for the one caller per ``min_interval`` seconds allowed to spawn."""
        now = time.time()
        with self._locked(0.5):
            (last,) = struct.unpack_from("<d", self.mm, SPAWN_AT)
            if now - last < min_interval:
                return False
            store(self.mm, SPAWN_AT, F64, now)
            self.bump_locked("spawns")
            return True

    def ask_flush(self, upto: int) -> None:
        """A producer's ``flush()``: records before offset ``upto`` are due now (the
        uploader sends them whatever their interval). Only ever raised."""
        with self._locked(0.5):
            if U64.unpack_from(self.mm, FLUSH_TO_AT)[0] < upto:
                store(self.mm, FLUSH_TO_AT, U64, upto)

    def flush_to(self) -> int:
        """The offset before which records are due now (an aligned word: no lock)."""
        return int(U64.unpack_from(self.mm, FLUSH_TO_AT)[0])

    def bump_locked(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the counter ``name``; the caller holds the ring's locks."""
        at = COUNTERS_AT + 8 * COUNTERS.index(name)
        (value,) = struct.unpack_from("<Q", self.mm, at)
        store(self.mm, at, U64, value + n)

    def bump(self, name: str, n: int = 1) -> None:
        with self._locked(None):
            self.bump_locked(name, n)

    def set_error(self, text: str, timeout: Optional[float] = None) -> None:
        raw = text.encode("utf-8", "replace")[: ERROR_LEN - 1]
        with self._locked(timeout):
            self.mm[ERROR_AT : ERROR_AT + ERROR_LEN] = raw.ljust(ERROR_LEN, b"\0")

    def counters(self) -> HostStats:
        values = struct.unpack_from(f"<{len(COUNTERS)}Q", self.mm, COUNTERS_AT)
        head, tail, count = HEAD_TAIL_COUNT.unpack_from(self.mm, 32)
        pid, _, beat = self.uploader()
        error = bytes(self.mm[ERROR_AT : ERROR_AT + ERROR_LEN]).rstrip(b"\0").decode("utf-8", "replace")
        named = dict(zip(COUNTERS, values))
        sources = self.sources()
        if sources:
            # What is really waiting: the sources' counts are settled at delivery, while
            # ``count`` drops only when head passes, so records delivered behind a held
            # one stayed in it (1,001 shown, 501 true). A source beyond the 64 slots has
            # no count of its own: then ``count`` is all there is.
            count = min(count, sum(held for _, held, _ in sources))
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
            dead_letter_overflow=named["dead_letter_overflow"],
            depth=count,
            bytes_used=tail - head,
            capacity=self.capacity,
            max_count=self.max_count,
            sources=[{"source": f"{sid:016x}", "depth": n, "limit": limit} for sid, n, limit in sources],
            uploader_pid=pid or None,
            heartbeat_age=(time.time() - beat) if beat else None,
            last_error=error or None,
        )


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
