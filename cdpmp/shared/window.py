"""What one pass of the uploader has read of the ring, and which of it is done.

State, per pass (a :class:`Window` is made anew whenever the uploader starts over from
``head``: at its start, after the ring was reset under it): every record between
``head`` and :attr:`Window.cursor` has been parsed once, into :attr:`Window.records`
(ring order, for releasing the done prefix) and, until it is started, into its
source's :attr:`Window.pending` queue; the ring is never re-parsed while records wait.
A record is then in flight (the dispatch's ``_flying``), done (:attr:`Window.acked`:
sent, dead-lettered or quarantined) or back in ``pending`` after a retryable failure
(:meth:`Window.retry`). ``head`` advances only over the done prefix
(:meth:`Window.release`), so a crash resends at most what was in flight. Records of a
source missing from ``sources.json`` wait in :attr:`Window.orphans`.

Records of a failing source that hold the ring's head are moved to its tail
(:meth:`Window.recycle`, the rules in :mod:`.holding`); one still in flight leaves a
shadow whose request's outcome decides the copy.

The requests themselves (lanes, transports, what is in flight) are :mod:`.dispatch`'s.
"""

from __future__ import annotations

import collections
import logging
from typing import Collection, Deque, Dict, List, Set, Tuple

from .._engine import Held
from . import holding
from .layout import CORRUPT, Record
from .ring import Ring

logger = logging.getLogger("cdpmp.uploader")


class Window:
    """One pass's records (see the module docstring)."""

    def __init__(self, head: int = -1) -> None:
        self.cursor = head
        self.records: Deque[Record] = collections.deque()
        self.pending: Dict[int, Deque[Record]] = {}
        self.orphans: Deque[Tuple[float, Record]] = collections.deque()  # (read at, record)
        self.seen: Dict[int, float] = {}  # source -> when its oldest pending record was read
        self.acked: Set[int] = set()  # starts of records done but not yet released
        self.shadows = holding.Shadows()  # copies of records moved while in flight
        self.tries: Dict[int, Tuple[int, float]] = {}  # start -> (retries, first failure)
        self.settled: Dict[int, int] = {}  # source -> records done, not yet uncounted
        self.recount = False  # a quarantined record may have been a counted one

    def queue(self, rec: Record, now: float) -> None:
        """``rec`` waits for a batch of its source."""
        pending = self.pending.setdefault(rec.source, collections.deque())
        if not pending:
            self.seen[rec.source] = now
        pending.append(rec)

    def done_with(self, records: List[Record]) -> None:
        """Sent, or given up: released once every record before them is too."""
        for rec in records:
            copy = self.shadows.resolve(rec.start)  # moved while in flight: the copy is done
            self.acked.add(rec.start if copy is None else copy[0])
            self.tries.pop(rec.start, None)
            self.settled[rec.source] = self.settled.get(rec.source, 0) + 1

    def retry(self, held: List[Held], pending: Deque[Record]) -> None:
        """Batches of a retryable failure go back first in ``pending`` (their source's),
        with their tries; a record moved while in flight is retried as its copy."""
        for job in reversed(held):
            again: List[Record] = []
            for rec in job.items:
                copy = self.shadows.resolve(rec.start)
                if copy is None:
                    self.tries[rec.start] = (job.retries, job.first_failed)
                    again.append(rec)
                    continue
                self.tries.pop(rec.start, None)
                self.tries[copy[0]] = (job.retries, job.first_failed)
                if copy[1] is not None:  # else it is queued when it is read
                    again.append(copy[1])
            pending.extendleft(reversed(again))  # first in line for the probe

    def release(self, ring: Ring, head: int) -> bool:
        """Advance head over the done prefix of the records read (in ring order)."""
        records, acked = self.records, self.acked
        new_head, released = head, 0
        while records and records[0].start in acked:
            rec = records.popleft()
            acked.discard(rec.start)
            new_head = rec.end
            if rec.payload and rec.source != CORRUPT:
                released += 1
        if new_head == head:
            return False
        ring.release(new_head, released)  # sources were uncounted at delivery
        if self.recount:
            self.recount = False
            holding.recount(ring, self.acked)
        return True

    def recycle(self, ring: Ring, failing: Collection[int], flying: Collection[int]) -> bool:
        """Move the records of the ``failing`` sources that hold the ring's head to its
        tail, so that head passes what was delivered behind them (see :mod:`.holding`);
        True if any moved."""
        head, tail, _ = ring.peek()
        if not self.records or not holding.crowded(ring, head, tail):
            return False
        moved: List[Record] = []
        blocked_others = False
        for rec in self.records:
            if rec.start in self.acked:
                continue
            if rec.source in failing and rec.payload:  # in flight or not (holding.Shadows)
                moved.append(rec)
                continue
            blocked_others = True  # a record of another source waits behind them
            break
        if not moved or not blocked_others:
            return False
        starts = holding.requeue(ring, [(r.source, r.payload) for r in moved])
        moved = moved[: len(starts)]
        for rec, start in zip(moved, starts):
            if rec.start in flying or rec.start in self.shadows:
                self.shadows.moved(rec.start, start)  # the probe's outcome decides
            else:
                tries = self.tries.pop(rec.start, None)
                if tries is not None:
                    self.tries[start] = tries
            self.acked.add(rec.start)  # the copy is the same event: still counted held
        gone = {r.start for r in moved}
        for sid in {r.source for r in moved}:
            self.pending[sid] = collections.deque(r for r in self.pending[sid] if r.start not in gone)
        if moved:
            logger.info(
                "cdpmp uploader: %d held record(s) moved to the tail, out of the others' way", len(moved)
            )
        return bool(moved) and self.release(ring, ring.peek()[0])
