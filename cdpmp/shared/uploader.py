"""The shared-mode uploader: one process per host and user, ring → batches → HTTP.

Run as ``cdpmp uploader`` / ``python -m cdpmp.shared.uploader`` (foreground, for
systemd or a sidecar: it runs until stopped), or started automatically by the first
producer that finds none (:mod:`.lifecycle`; ``--auto``: it also exits when idle).

Election: holding ``uploader.lock`` (filelock, an flock the kernel releases when the
holder dies) for its whole life *is* being the uploader; a second one exits at once.

Loop, every ``POLL`` seconds (a timer: producers never wake it, since a wake-up costs
every put 11–14 µs) or when a request finishes: heartbeat; read a window of records
from ``head``; group them by source into batches of at most ``upload_size`` and
500 KB; start a batch when it is full, its oldest record has waited
``upload_interval``, or we are draining — as many at once as the source's lane
allows (:mod:`cdpmp._engine`: up to ``max_in_flight`` while a backlog lasts, one
probe at a time while the endpoint fails). Requests run on sender threads; only this
loop touches the ring. A batch that is acknowledged or definitively rejected (a final
answer → dead-letter file, 0600) is done; ``head`` advances over the done prefix only,
so records leave the ring only when done and a crash resends at most what was in
flight. Retryable failures keep their records (nothing is dropped while an endpoint
is down, unless the source set ``max_retries``/``retry_budget``; the host limit makes
producers answer ``(False, msg)`` instead). A source whose endpoint fails does not
delay the others: its lane backs off alone, and the scan reads past its backlog.

Stop: SIGTERM/SIGINT → drain within ``CDP_UPLOADER_DRAIN_TIMEOUT`` seconds (default 20,
below gunicorn's and Kubernetes' 30 s grace), then exit; what is left stays in the
ring for the next uploader. Idle exit (auto-started uploaders only): the ring is empty
and no registered producer process is alive for ``CDP_UPLOADER_IDLE_EXIT`` seconds
(default 60).
"""

from __future__ import annotations

import argparse
import collections
import logging
import queue
import signal
import sys
import threading
import time
from typing import Deque, Dict, List, Optional, Sequence, Set, Tuple

import filelock
import psutil

from .._engine import PROBE_POLICY, Held, Lane, Outcome, Workers, deliver
from .._options import Settings, from_source_entry, host_settings
from .._outcome import internal_error
from .._retry import RetryPolicy
from .._transport import ENVELOPE_BYTES, MAX_BATCH_BYTES, Attempt, Transport
from ..errors import CdpmpError, DeliveryError
from .files import UPLOADER_LOCK, append_dead_letter, path, read_sources, runtime_dir
from .ring import Record, Ring

logger = logging.getLogger("cdpmp.uploader")

POLL = 0.05  # seconds between ring polls
WINDOW_RECORDS = 5000
WINDOW_BYTES = 4 << 20
MAX_RECORDS_READ = 200_000  # records held in memory at most (the host limit is lower)
MAX_SENDERS = 64  # sender threads, all sources together (each lane has its own cap)
_ROOM = MAX_BATCH_BYTES - ENVELOPE_BYTES


class Uploader:
    """One uploader's state: its sources (settings, transport and lane each), the
    records in flight, and those done but not yet released (behind one in flight)."""

    def __init__(self, directory: str, auto: bool = False) -> None:
        host = host_settings()
        self.directory = directory
        self.drain_timeout = host.uploader_drain_timeout
        # Only an auto-started uploader leaves when idle; one run by systemd or as a
        # sidecar runs until it is stopped.
        self.idle_exit: Optional[float] = host.uploader_idle_exit if auto else None
        self.stop = threading.Event()
        self._sources: Dict[int, Settings] = {}
        self._transports: Dict[int, Transport] = {}
        self._lanes: Dict[int, Lane] = {}
        # Every record between head and ``_cursor`` has been parsed once, into ``_window``
        # (ring order, for releasing the done prefix) and, until it is started, into its
        # source's ``_pending`` queue; the ring is never re-parsed while records wait.
        self._cursor = -1
        self._window: Deque[Record] = collections.deque()
        self._pending: Dict[int, Deque[Record]] = {}
        self._seen: Dict[int, float] = {}  # source -> when its oldest pending record was read
        self._acked: Set[int] = set()  # starts of records done but not yet released
        self._flying: Set[int] = set()  # starts of records whose request is in progress
        self._tries: Dict[int, Tuple[int, float]] = {}  # start -> (retries, first failure)
        self._done: queue.SimpleQueue[Tuple[int, Held, Outcome]] = queue.SimpleQueue()
        self._workers = Workers(MAX_SENDERS, "cdpmp-upload")
        self._backoff_until = 0.0
        self._failures = 0
        self._idle_since = time.monotonic()
        self._next_idle_check = 0.0

    # -- setup ---------------------------------------------------------------------------

    def _load_sources(self) -> None:
        for key, entry in read_sources(self.directory).items():
            sid = int(key)
            if sid in self._sources:
                continue
            try:
                settings = from_source_entry(entry)
            except (CdpmpError, TypeError, ValueError):
                logger.warning("cdpmp uploader: ignoring an invalid source entry %s", key)
                continue
            self._sources[sid] = settings
            self._transports[sid] = Transport(settings)
            self._lanes[sid] = Lane(settings.max_in_flight)

    def run(self) -> int:
        lock = filelock.FileLock(path(self.directory, UPLOADER_LOCK), mode=0o600)
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            return 0  # another uploader holds the election
        try:
            return self._serve()
        finally:
            lock.release()

    def _serve(self) -> int:
        self.ring = Ring(self.directory)
        self.ring.recount()
        me = psutil.Process()
        self.ring.set_uploader(me.pid, me.create_time())
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop.set())
        logger.info("cdpmp uploader %d serving %s", me.pid, self.directory)
        while not self.stop.is_set():
            self.ring.heartbeat()
            if not self._safe_cycle(draining=False):
                if self._should_idle_exit():
                    break
                self._pause(POLL)
        self._drain()
        self.ring.set_uploader(0, 0.0)
        return 0

    def _pause(self, seconds: float) -> None:
        """Wait for a finished request (handled at once) or ``seconds``."""
        if not self._flying:
            self.stop.wait(seconds)
            return
        try:
            self._settle(*self._done.get(timeout=seconds))
        except queue.Empty:
            pass

    def _drain(self) -> None:
        deadline = time.monotonic() + self.drain_timeout
        self.stop.clear()
        self._backoff_until = 0.0
        while time.monotonic() < deadline:
            self.ring.heartbeat()
            head, tail, _ = self.ring.bounds()
            if head == tail and not self._flying:
                return
            if not self._safe_cycle(draining=True, deadline=deadline):
                self._pause(min(POLL, max(0.0, deadline - time.monotonic())))
        for transport in self._transports.values():
            transport.cancel()  # requests still running: their records stay in the ring
        logger.warning(
            "cdpmp uploader: drain deadline passed; %d record(s) stay in the ring", self.ring.bounds()[2]
        )

    def _should_idle_exit(self) -> bool:
        if self.idle_exit is None:
            return False
        now = time.monotonic()
        if now < self._next_idle_check:  # producer liveness costs psutil calls: once a second
            return False
        self._next_idle_check = now + 1.0
        head, tail, _ = self.ring.peek()
        if head != tail or any(_producer_alive(pid, ctime) for pid, ctime in self.ring.producers()):
            self._idle_since = time.monotonic()
            return False
        return time.monotonic() - self._idle_since >= self.idle_exit

    # -- one pass ------------------------------------------------------------------------

    def _safe_cycle(self, draining: bool, deadline: Optional[float] = None) -> bool:
        """One pass; a bug in it is logged loudly and backed off, never a crash loop."""
        try:
            return self._cycle(draining, deadline)
        except Exception as exc:  # noqa: BLE001 - logged as an internal error, then backed off
            self.ring.set_error(str(internal_error("the uploader", exc)))
            self._failures += 1
            self._backoff_until = time.monotonic() + RetryPolicy(backoff_cap=5.0).delay(self._failures)
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
        head, tail, _ = self.ring.peek()  # lock-free: the idle poll costs no syscall
        if tail == self._cursor and not self._window:  # everything read is released
            return progressed
        head, tail, _ = self.ring.bounds()
        if not head <= self._cursor <= tail:  # first pass, or the ring was reset under us
            self._forget(head)
        if tail > self._cursor and len(self._window) < MAX_RECORDS_READ:
            progressed = self._read(tail) or progressed
        started = self._dispatch(draining, deadline, now)
        return self._release(head) or started or progressed

    def _forget(self, head: int) -> None:
        self._cursor = head
        self._window.clear()
        self._pending.clear()
        self._seen.clear()
        self._acked.clear()
        self._tries.clear()

    def _read(self, tail: int) -> bool:
        records = self.ring.read(self._cursor, WINDOW_RECORDS, WINDOW_BYTES)
        if not records:
            return False
        if any(r.payload and r.source not in self._sources for r in records):
            self._load_sources()
        now = time.monotonic()
        for rec in records:
            self._window.append(rec)
            if not rec.payload or rec.source not in self._sources:
                if rec.payload:
                    self.ring.bump("unknown_source")
                self._acked.add(rec.start)  # nothing to send: free it with the rest
                continue
            pending = self._pending.setdefault(rec.source, collections.deque())
            if not pending:
                self._seen[rec.source] = now
            pending.append(rec)
        self._cursor = records[-1].end
        return True

    def _dispatch(self, draining: bool, deadline: Optional[float], now: float) -> bool:
        """Start the batches each source's lane allows (a failing source backs off
        alone: the others' records are read and sent past its backlog)."""
        started = False
        for sid, pending in self._pending.items():
            settings, lane = self._sources[sid], self._lanes[sid]
            due = draining or now - self._seen.get(sid, now) >= settings.upload_interval
            while pending and lane.slots(now) > 0:
                batch = _take(pending, settings.upload_size)
                if len(batch) < settings.upload_size and not pending and not due:
                    pending.extendleft(reversed(batch))  # not full, not due: let it fill
                    break
                self._start(sid, batch, deadline)
                started = True
                self._seen[sid] = now  # what is left arrived after what was sent
        return started

    def _start(self, sid: int, batch: List[Record], deadline: Optional[float]) -> None:
        lane, transport = self._lanes[sid], self._transports[sid]
        retries, first = self._tries.get(batch[0].start, (0, 0.0))
        job = Held(batch, retries, first)
        lane.started()
        self._flying.update(r.start for r in batch)

        def run() -> None:
            try:
                outcome = deliver(transport, _payloads, batch, deadline)
            except Exception as exc:  # noqa: BLE001 - settled as an internal error, never lost
                outcome = [(batch, Attempt(internal_error("the uploader", exc), 0, 0))]
            self._done.put((sid, job, outcome))

        if not self._workers.submit(run):
            run()

    def _settle(self, sid: int, job: Held, outcome: Outcome) -> None:
        """Account for one finished request; its records become done, or stay in the
        ring for a later probe (retryable failure)."""
        lane, settings = self._lanes[sid], self._sources[sid]
        self._flying.difference_update(r.start for r in job.items)
        retry: Optional[Attempt] = None
        for part, attempt in outcome:
            self.ring.bump("requests", attempt.requests)
            error = attempt.error
            if error is None:
                self.ring.bump("sent", len(part))
                self.ring.bump("batches")
                self._done_with(part)
            elif error.final:
                self._dead_letter(sid, part, error)
            else:
                retry = attempt
                held = Held(part, job.retries + 1, job.first_failed or time.monotonic())
                if held.exhausted(settings, PROBE_POLICY.delay(held.retries, attempt.retry_after)):
                    self._dead_letter(sid, part, error)
                else:
                    for rec in part:
                        self._tries[rec.start] = (held.retries, held.first_failed)
                    self._pending[sid].extendleft(reversed(part))  # first in line for the probe
        if job.retries:
            self.ring.bump("retries")
        if retry is not None and retry.error is not None:
            pause = lane.failed(str(retry.error), retry.retry_after)
            self.ring.set_error(str(retry.error))
            logger.warning("cdpmp uploader: %s; keeping the batch, next probe in %.1fs", retry.error, pause)
        elif any(a.error is None for _, a in outcome):
            lane.succeeded(backlog=len(self._pending.get(sid, ())) >= settings.upload_size)
        else:
            lane.finished()

    def _done_with(self, records: List[Record]) -> None:
        for rec in records:
            self._acked.add(rec.start)
            self._tries.pop(rec.start, None)

    def _release(self, head: int) -> bool:
        """Advance head over the done prefix of the records read (in ring order)."""
        window, acked = self._window, self._acked
        new_head, released = head, 0
        while window and window[0].start in acked:
            rec = window.popleft()
            acked.discard(rec.start)
            new_head = rec.end
            released += 1 if rec.payload else 0
        if new_head == head:
            return False
        self.ring.release(new_head, released)
        return True

    def _dead_letter(self, sid: int, batch: List[Record], error: DeliveryError) -> None:
        self.ring.bump("failed", len(batch))
        self.ring.bump("dead_lettered", len(batch))
        self.ring.set_error(str(error))
        logger.warning(
            "cdpmp uploader: batch of %d given up (%s); written to dead-letter.jsonl", len(batch), error
        )
        append_dead_letter(self.directory, sid, str(error), [r.payload for r in batch])
        self._done_with(batch)


def _payloads(records: List[Record]) -> List[bytes]:
    return [r.payload for r in records]


def _take(pending: Deque[Record], upload_size: int) -> List[Record]:
    """The next batch: at most ``upload_size`` records and 500 KB, in ring order."""
    batch: List[Record] = []
    size = 0
    while pending and len(batch) < upload_size:
        item = len(pending[0].payload) + 1
        if batch and size + item > _ROOM:
            break
        batch.append(pending.popleft())
        size += item
    return batch


def _producer_alive(pid: int, create_time: float) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and (
            not create_time or abs(proc.create_time() - create_time) < 1
        )
    except psutil.Error:
        return False


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="cdpmp uploader", description="Run the shared-mode uploader.")
    parser.add_argument("--dir", help="runtime directory (default: as producers resolve it)")
    parser.add_argument(
        "--auto", action="store_true", help="started by a producer: also exit when idle (internal)"
    )
    args = parser.parse_args(argv)
    directory = args.dir or runtime_dir()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return Uploader(directory, auto=args.auto).run()


if __name__ == "__main__":
    sys.exit(main())
