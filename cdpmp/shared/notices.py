"""Final rejections reach the processes of their source (shared mode).

The uploader gives a batch up only at a final answer (a 401 for a refused write key, a
400); it writes the batch to ``dead-letter.jsonl``, one JSON line per batch with its
source, the error and its status. Without more, the application never learned of it:
its ``on_error`` never ran, its ``stats()`` said nothing and its log was empty.

Each source has an entry in the ring header (``NOTICES_AT``: source id and the
dead-letter byte offset read up to, one 16-byte entry per source slot). A producer's
periodic check (its watch every second, ``put()``, ``flush()``) compares the
file's size with its entry without a lock; when lines were added it *claims* them
under the ring lock (reads from the offset to the last complete line and advances the
offset), so that each line reaches exactly one process of its source: there it is
counted (``stats()["dropped"]["rejected"]``), logged at WARNING and given to
``on_error`` with its messages (:meth:`cdpmp._outcome.Ledger.lost`). A new source
starts at the file's current end: a previous run's letters are not reported again.

Limits: a batch whose line did not fit the file (``dead_letter_overflow``) is still
reported, by count, from its short line when that fits; when not even that fits, only
the host counters know. A slot reused by another source while lines wait for the
first is reported to nobody.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, List, NamedTuple, Optional

from ..errors import APIError, DeliveryError
from .files import DEAD_LETTERS, RuntimeDirError, open_private
from .layout import NOTICES_AT, SOURCES_AT, SRC, store
from .ring import Ring

ENTRY = struct.Struct("<QQ")  # source, dead-letter offset read up to
MAX_READ = 1 << 20  # bytes claimed per check at most (the rest at the next one)


class Notice(NamedTuple):
    """One batch of this source the endpoint refused for good."""

    error: DeliveryError
    messages: List[bytes]
    events: int  # how many it held (its messages may not all have fit the file)


def _entry_at(ring: Ring, source: int) -> int:
    """Offset of ``source``'s entry (claiming its source slot); under the lock."""
    slot = ring._source_slot(source)
    return NOTICES_AT + (slot - SOURCES_AT) // SRC.size * ENTRY.size if slot else 0


def _size(directory: str) -> int:
    try:
        return os.stat(os.path.join(directory, DEAD_LETTERS)).st_size
    except OSError:
        return 0


def register(ring: Ring, directory: str, source: int) -> None:
    """Start ``source``'s entry at the file's current end unless it is already
    ``source``'s (called under the ring lock when a process opens the ring)."""
    at = _entry_at(ring, source)
    if at and ENTRY.unpack_from(ring.mm, at)[0] != source:
        store(ring.mm, at, ENTRY, source, _size(directory))


def pending(ring: Ring, directory: str, source: int) -> bool:
    """Lines may wait for this source (no lock; a stale answer costs one claim)."""
    slot = ring._slots.get(source)
    if not slot:
        return False
    at = NOTICES_AT + (slot - SOURCES_AT) // SRC.size * ENTRY.size
    owner, offset = ENTRY.unpack_from(ring.mm, at)
    return bool(owner == source and _size(directory) != offset)


def claim(ring: Ring, directory: str, source: int) -> List[Notice]:
    """Take the lines added since the entry's offset; return this source's batches."""
    with ring.locked():
        at = _entry_at(ring, source)
        if not at:
            return []
        owner, offset = ENTRY.unpack_from(ring.mm, at)
        if owner != source:
            store(ring.mm, at, ENTRY, source, _size(directory))
            return []
        try:
            fd = open_private(os.path.join(directory, DEAD_LETTERS), os.O_RDONLY)
        except (FileNotFoundError, RuntimeDirError):
            return []
        try:
            size = os.fstat(fd).st_size
            if size < offset:  # the file was removed or replaced: start it over
                offset = 0
            data = os.pread(fd, min(size - offset, MAX_READ), offset)
        finally:
            os.close(fd)
        end = data.rfind(b"\n") + 1
        store(ring.mm, at, ENTRY, source, offset + end)
    notices = []
    for raw in data[:end].splitlines():
        notice = _parse(raw, source)
        if notice is not None:
            notices.append(notice)
    return notices


def _parse(raw: bytes, source: int) -> Optional[Notice]:
    try:
        line: Any = json.loads(raw)
        if not isinstance(line, dict) or line.get("source") != source:
            return None
        batch = [
            json.dumps(m).encode() for m in line.get("batch") or [] if isinstance(m, dict) and "raw" not in m
        ]
        count = int(line.get("count", len(batch)))
        status = line.get("status")
    except (ValueError, TypeError):
        return None
    text = str(line.get("error", "refused"))
    error: DeliveryError
    if isinstance(status, int):
        error = APIError(status, str(line.get("code", "")), str(line.get("message", text)))
    else:
        error = DeliveryError(text)
    return Notice(error, batch, count)
