"""The uploader's delivery loop: ring records → per-source batches → requests.

:class:`Dispatch` owns everything between the ring and the endpoint for one uploader
(the process side — election, signals, when to drain, idle exit, replaced files — is
:class:`cdpmp.shared.uploader.Uploader`, which holds one and drives it through the
public methods below: :meth:`open`, :meth:`cycle`, :meth:`pause`, :meth:`busy`,
:meth:`begin_drain`, :meth:`land`, :meth:`take_undone`, :meth:`cancel`). Only the uploader's main
thread calls these methods and touches the ring; requests run on the process's sender
threads (:meth:`cdpmp._senders.Engine.submit`) and come back through ``_done``, settled
by the same rule as direct mode's (:func:`cdpmp._engine.settle`).

What a pass has read of the ring and which of it is done is its :class:`.window.Window`
(made anew by ``_forget``); this module starts the batches each source's lane allows
(:class:`.sources.Source`), settles them, and gives up what must be: a final answer or a
source missing from ``sources.json`` for ``ORPHAN_GRACE`` (dead-letter file, counted).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from typing import Deque, Dict, List, Optional, Set, Tuple

from .._engine import BATCH_ROOM, Held, Outcome, backlogged, deliver, due, settle, take_batch
from .._lane import RequestRate
from .._options import host_settings
from .._outcome import internal_error
from .._retry import RetryPolicy
from .._senders import engine
from ..errors import DeliveryError
from . import holding, sources
from .files import append_dead_letter
from .layout import CORRUPT, Record
from .ring import Ring
from .sources import Source
from .window import Window

#: Backoff after an internal error in a pass of the loop (not an endpoint's answer).
_AFTER_A_BUG = RetryPolicy(backoff_cap=5.0)

logger = logging.getLogger("cdpmp.uploader")

POLL = 0.05  # seconds between ring polls while there is work
ORPHAN_GRACE = 30.0  # seconds a record of a source missing from sources.json is held
WINDOW_RECORDS = 5000
WINDOW_BYTES = 4 << 20
MAX_RECORDS_READ = 200_000  # records held in memory at most (the host limit is lower)


class Dispatch:
    """One uploader's delivery state (see the module docstring)."""

    ring: Ring

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.stop = threading.Event()
        self._sources: Dict[int, Source] = {}
        self.window = Window()
        self._next_adoption = 0.0
        self._flying: Set[int] = set()  # starts of records whose request is in progress
        self._done: queue.SimpleQueue[Tuple[int, Held, Outcome, float, float]] = queue.SimpleQueue()
        self._backoff_until = 0.0
        self._failures = 0
        self.failed_since_drain = False  # a request failed (retryable) since the drain began
        self._jobs: Set[Held] = set()  # requests in progress
        self._stale: Set[int] = set()  # ids of those started before the last _forget
        self._rate = RequestRate(host_settings().uploader_max_rate)
        self._turn = 0

    def _load_sources(self) -> None:
        sources.load(self.directory, self._sources)

    # -- what the uploader drives ----------------------------------------------------------

    def open(self) -> None:
        """Open the ring at the directory and start from its head, the records' host
        counts recounted (a previous uploader may have died between two updates)."""
        self.ring = Ring(self.directory)
        self._forget(self.ring.bounds()[0])
        holding.recount(self.ring)

    def busy(self) -> bool:
        """Records read and not yet released, or a request in flight."""
        return bool(self._flying or self.window.records)

    def in_flight(self) -> bool:
        return bool(self._flying)

    def begin_drain(self) -> None:
        """The stop's drain starts: no backoff left from before, failures counted anew."""
        self.stop.clear()
        self._backoff_until = 0.0
        self.failed_since_drain = False

    def land(self, deadline: float) -> None:
        """Let the requests in flight end (by ``deadline``), settling and releasing them."""
        while self._flying and time.monotonic() < deadline:
            self.pause(POLL)
            self.window.release(self.ring, self.ring.bounds()[0])

    def take_undone(self) -> List[Record]:
        """Every record of the ring not yet done, removed from it (``take_all``)."""
        done = set(self.window.acked)
        return [r for r in self.ring.take_all() if r.start not in done]

    def cancel(self) -> None:
        """Cancel the requests still running: their records stay in the ring."""
        for source in self._sources.values():
            source.transport.cancel()

    def pause(self, seconds: float) -> None:
        """Wait for a finished request (handled at once) or ``seconds``."""
        if not self._flying:
            self.stop.wait(seconds)
            return
        try:
            self._settle(*self._done.get(timeout=seconds))
        except queue.Empty:
            pass

    def cycle(self, draining: bool, deadline: Optional[float] = None) -> bool:
        """One pass; a bug in it is logged loudly and backed off, never a crash loop."""
        try:
            return self._cycle(draining, deadline)
        except Exception as exc:  # noqa: BLE001 - logged as an internal error, then backed off
            self.ring.header.set_error(str(internal_error("the uploader", exc)))
            self._failures += 1
            self._backoff_until = time.monotonic() + _AFTER_A_BUG.delay(self._failures)
            return False

    def _cycle(self, draining: bool, deadline: Optional[float] = None) -> bool:
        """Settle finished requests, read new records, start what is due and allowed,
        release the done prefix; True if anything happened."""
        progressed = False
        while True:
            try:
                self._settle(*self._done.get_nowait())
            except queue.Empty:
                break
            progressed = True
        now = time.monotonic()
        if now < self._backoff_until and not draining:
            return progressed
        window = self.window
        head, tail, _ = self.ring.peek()  # lock-free: the idle poll costs no syscall
        if tail == window.cursor and not window.records:  # everything read is released
            return progressed
        head, tail, _ = self.ring.bounds()
        if not head <= window.cursor <= tail:  # first pass, or the ring was reset under us
            window = self._forget(head)
        if tail > window.cursor and len(window.records) < MAX_RECORDS_READ:
            progressed = self._read(tail) or progressed
        if window.orphans and now >= self._next_adoption:
            self._next_adoption = now + 1.0
            self._adopt(now)
        started = self._dispatch(draining, deadline, now)
        if window.settled:  # what each source holds: its undelivered events (.holding)
            holding.settle_counts(self.ring, window.settled)
            window.settled = {}
        released = window.release(self.ring, head)
        failing = {sid for sid, source in self._sources.items() if source.failing(now)}
        return window.recycle(self.ring, failing, self._flying) or released or started or progressed

    def _adopt(self, now: float) -> None:
        """Records of a source missing from ``sources.json`` (removed under us; its
        producers write their entry again within a second of their next call) are
        held for ``ORPHAN_GRACE`` seconds, then dead-lettered, counted."""
        self._load_sources()
        window = self.window
        kept: Deque[Tuple[float, Record]] = collections.deque()
        adopted: Dict[int, List[Record]] = {}
        for seen, rec in window.orphans:
            if rec.source in self._sources:
                adopted.setdefault(rec.source, []).append(rec)
            elif now - seen >= ORPHAN_GRACE:
                self.ring.header.bump("unknown_source")
                if not append_dead_letter(self.directory, rec.source, "unknown source", [rec.payload]):
                    self.ring.header.bump("dead_letter_overflow")
                window.done_with([rec])
            else:
                kept.append((seen, rec))
        window.orphans = kept
        for sid, records in adopted.items():  # older than anything pending for them
            window.pending.setdefault(sid, collections.deque()).extendleft(reversed(records))
            window.seen[sid] = now

    def _forget(self, head: int) -> Window:
        """Start over from ``head``: nothing read, nothing in flight. Requests still
        running belong to the previous pass (``_stale``) and are ignored when they end."""
        self._stale.update(id(job) for job in self._jobs)
        self._flying.clear()
        self.window = Window(head)
        return self.window

    def _read(self, tail: int) -> bool:
        window = self.window
        records = self.ring.read(window.cursor, WINDOW_RECORDS, WINDOW_BYTES)
        if not records:
            return False
        if any(r.payload and r.source not in self._sources and r.source != CORRUPT for r in records):
            self._load_sources()
        now = time.monotonic()
        for rec in records:
            window.records.append(rec)
            if rec.source == CORRUPT:  # damaged bytes: quarantined, never sent
                self._quarantine(rec)
                continue
            if not rec.payload:
                window.acked.add(rec.start)  # nothing to send: free it with the rest
                continue
            if rec.start in window.acked or window.shadows.read(rec):
                continue  # a copy whose probe ended delivered, or still flies
            if rec.source not in self._sources:  # its entry may come back: hold it a while
                window.orphans.append((now, rec))
                continue
            window.queue(rec, now)
        window.cursor = records[-1].end
        return True

    def _dispatch(self, draining: bool, deadline: Optional[float], now: float) -> bool:
        """Start the batches each source's lane allows (a failing source backs off
        alone: the others' records are read and sent past its backlog)."""
        started = False
        seen = self.window.seen
        flush_to = self.ring.header.flush_to()  # a producer's flush(): due now
        order = list(self.window.pending.items())
        if len(order) > 1:  # each source goes first in turn: a paced host serves them all
            self._turn = (self._turn + 1) % len(order)
            order = order[self._turn :] + order[: self._turn]
        for sid, pending in order:
            settings, lane = self._sources[sid].settings, self._sources[sid].lane
            waited = now - seen.get(sid, now)
            urgent = draining or (bool(pending) and pending[0].start < flush_to)
            while pending and lane.slots(now) > 0:
                batch, _ = take_batch(pending, settings.upload_size, BATCH_ROOM, _payload_size)
                if not urgent and not due(len(batch), bool(pending), waited, settings):
                    pending.extendleft(reversed(batch))  # not full, not due: let it fill
                    break
                if not self._rate.take():  # the host's request rate (uploader_max_rate)
                    pending.extendleft(reversed(batch))  # meanwhile it fills up
                    return started
                self._start(sid, batch, deadline)
                started = True
                seen[sid] = now  # what is left arrived after what was sent
        return started

    def _start(self, sid: int, batch: List[Record], deadline: Optional[float]) -> None:
        lane, transport = self._sources[sid].lane, self._sources[sid].transport
        retries, first = self.window.tries.get(batch[0].start, (0, 0.0))
        job = Held(batch, retries, first)
        self._jobs.add(job)
        lane.started()
        self._flying.update(r.start for r in batch)

        def run() -> None:
            self._done.put((sid, job, *deliver(transport, _payloads, job, deadline)))

        if not engine().submit(run):
            run()

    def _settle(self, sid: int, job: Held, outcome: Outcome, wall: float, cpu: float) -> None:
        """Account for one finished request; its records become done, or stay in the
        ring for a later probe (retryable failure)."""
        source = self._sources[sid]
        lane = source.lane
        self._jobs.discard(job)
        if id(job) in self._stale:  # started before the ring was replaced: its records moved
            self._stale.discard(id(job))
            lane.finished()
            return
        self._flying.difference_update(r.start for r in job.items)
        window = self.window
        pending = window.pending.setdefault(sid, collections.deque())
        done = settle(lane, job, outcome, backlogged(pending, source.settings.upload_size), wall, cpu)
        self.ring.header.bump("requests", done.requests)
        for part in done.delivered:
            self.ring.header.bump("sent", len(part))
            self.ring.header.bump("batches")
            window.done_with(part)
        for error, part in done.losses:
            self._dead_letter(sid, part, error)
        window.retry(done.retry, pending)
        source.ended()
        if job.retries:
            self.ring.header.bump("retries")
        if done.error is not None:
            self.failed_since_drain = True
            self.ring.header.set_error(str(done.error))
            logger.warning(
                "cdpmp uploader: %s; keeping the batch, next probe in %.1fs", done.error, done.pause
            )

    def _quarantine(self, rec: Record) -> None:
        logger.warning(
            "cdpmp uploader: %d damaged byte(s) in the ring skipped, dead-lettered", rec.end - rec.start
        )
        if not append_dead_letter(self.directory, CORRUPT, "damaged ring bytes", [rec.payload]):
            self.ring.header.bump("dead_letter_overflow")
        self.window.acked.add(rec.start)
        self.window.recount = True  # the damage may have been a counted record

    def _dead_letter(self, sid: int, batch: List[Record], error: DeliveryError) -> None:
        self.ring.header.bump("failed", len(batch))
        self.ring.header.bump("dead_lettered", len(batch))
        self.ring.header.set_error(str(error))
        logger.warning(
            "cdpmp uploader: batch of %d given up (%s); written to dead-letter.jsonl", len(batch), error
        )
        if not append_dead_letter(self.directory, sid, error, [r.payload for r in batch]):
            self.ring.header.bump("dead_letter_overflow", len(batch))
        self.window.done_with(batch)


def _payloads(records: List[Record]) -> List[bytes]:
    return [r.payload for r in records]


def _payload_size(record: Record) -> int:
    return len(record.payload)
