"""What each source holds in the ring: undelivered events only, and never the ring's
bytes behind one failing source.

Records leave the ring only over its acknowledged prefix (``head``), so one source
whose endpoint is down used to keep every record behind its oldest one: the healthy
sources' *delivered* records stayed counted against their ``max_queue_size`` (1,418
refusals of a healthy source in 35 s, measured), and once those bytes filled the ring
every source was refused. Two rules fix it:

* **Counts are settled at delivery, not at release** (:func:`settle_counts`): a
  source's slot counts what it has that is not yet delivered or given up, whatever
  lies in front of it. :func:`recount` rebuilds the counts from the records between
  head and tail, leaving out those the uploader already knows are done.
* **A failing source's records are moved out of the way** (:func:`requeue`): when
  the ring is more than :data:`RECYCLE_AT` full and its head is held by records of
  sources whose lanes are backing off, the uploader copies those records to the tail
  and counts the originals done, so head passes over everything delivered behind
  them. The copies keep their source, payload and messageId (and the uploader their
  retry count); only their place changes. A crash between the copy and the release
  of the originals can send such a record twice (same messageId), never lose one.
* **A record in flight is moved too** (:class:`Shadows`): a failing source's probe
  takes its oldest records, the ones holding head, and a probe to a slow or
  far endpoint lasts long enough for a busy healthy source to fill the rest of the
  ring (the CI machine saw 84 refusals of a healthy source that way). Its copy
  waits at the tail as a *shadow*, never sent while the probe flies: when the probe
  ends the copy is done with it (delivered or given up) or takes its place in the
  queue (the probe failed).
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Set, Tuple

from .layout import CORRUPT, HEAD_TAIL_COUNT, SOURCES, SOURCES_AT, SRC, U64, Record, store
from .ring import Ring

#: Share of the ring's bytes in use above which held records are moved to the tail.
RECYCLE_AT = 0.5


def settle_counts(ring: Ring, by_source: Dict[int, int]) -> None:
    """``by_source[s]`` records of source ``s`` were delivered or given up."""
    if not by_source:
        return
    with ring._locked():
        for source, n in by_source.items():
            at = ring._source_slot(source)
            if at:
                held = U64.unpack_from(ring.mm, at + 8)[0]
                store(ring.mm, at + 8, U64, max(0, held - n))


def recount(ring: Ring, done: Iterable[int] = ()) -> int:
    """Recompute ``count`` and every source's count by walking head→tail (repairs
    drift after a crash between a producer's stores); records whose offset is in
    ``done`` (delivered, not yet released) count for no source."""
    finished: Set[int] = set(done)
    with ring._locked():
        head, tail, _ = HEAD_TAIL_COUNT.unpack_from(ring.mm, 32)
    records = [r for r in ring.read(head, 1 << 62, 1 << 62, tally=False) if r.payload and r.source != CORRUPT]
    held: Dict[int, int] = {}
    for r in records:
        if r.start not in finished:
            held[r.source] = held.get(r.source, 0) + 1
    with ring._locked():
        h, t, _ = HEAD_TAIL_COUNT.unpack_from(ring.mm, 32)
        if (h, t) == (head, tail):
            store(ring.mm, 48, U64, len(records))
            for i in range(SOURCES):
                at = SOURCES_AT + i * SRC.size
                sid = U64.unpack_from(ring.mm, at)[0]
                if sid:
                    store(ring.mm, at + 8, U64, held.get(sid, 0))
    return len(records)


def crowded(ring: Ring, head: int, tail: int) -> bool:
    """The ring is full enough that a held head should be moved out of the way."""
    return tail - head > ring.capacity * RECYCLE_AT


def requeue(ring: Ring, records: List[Tuple[int, bytes]]) -> List[int]:
    """Append copies of ``records`` ((source, payload), oldest first) at the tail,
    as far as they fit; their new offsets, in order. Neither ``accepted`` nor any
    source's count changes: the copies are the same undelivered events."""
    starts: List[int] = []
    with ring._locked():
        for source, payload in records:
            head, tail, count = HEAD_TAIL_COUNT.unpack_from(ring.mm, 32)
            at = ring._append_locked(source, payload, head, tail, count)
            if at < 0:
                break
            starts.append(at)
    return starts


class Shadows:
    """Copies of records moved while their request was in flight (see the module
    docstring): which original each copy stands for, and the copy's record once
    the uploader has read it. The original's outcome decides the copy's."""

    def __init__(self) -> None:
        self._copy: Dict[int, int] = {}  # original's start -> its copy's start
        self._original: Dict[int, Tuple[int, Optional[Record]]] = {}  # copy -> (original, read)

    def __contains__(self, start: int) -> bool:
        return start in self._original

    def moved(self, old: int, new: int) -> None:
        """The record at ``old`` (in flight, or a shadow) was copied to ``new``."""
        original = self._original.pop(old, (old, None))[0]
        self._copy[original] = new
        self._original[new] = (original, None)

    def read(self, rec: Record) -> bool:
        """``rec`` was read from the ring; True if it is a shadow (not to be queued)."""
        if rec.start not in self._original:
            return False
        self._original[rec.start] = (self._original[rec.start][0], rec)
        return True

    def resolve(self, original: int) -> Optional[Tuple[int, Optional[Record]]]:
        """The request of ``original`` ended: its copy's start and record (None if
        not read yet), no longer a shadow; None if it was never moved."""
        new = self._copy.pop(original, None)
        if new is None:
            return None
        return new, self._original.pop(new)[1]

    def clear(self) -> None:
        self._copy.clear()
        self._original.clear()
