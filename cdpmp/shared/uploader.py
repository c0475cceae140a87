"""The shared-mode uploader: one process per host and user, ring → batches → HTTP.

Run as ``cdpmp uploader`` / ``python -m cdpmp.shared.uploader`` (foreground, for
systemd or a sidecar: it runs until stopped), or started automatically by the first
producer that finds none (:mod:`.lifecycle`; ``--auto``: it also exits when idle).

Election: holding ``uploader.lock`` (filelock, an flock the kernel releases when the
holder dies) for its whole life *is* being the uploader; a second one exits at once.

Loop, every ``POLL`` seconds (a timer: producers never wake it, since a wake-up costs
every put 11–14 µs): heartbeat; read a window of records from ``head``; group them by
source into batches of at most ``upload_size`` and 500 KB; send when a batch is full,
the oldest waiting record is ``upload_interval`` old, or we are draining. A batch that
is acknowledged or definitively rejected (non-retryable 4xx → dead-letter file, 0600)
is done; ``head`` advances over the done prefix only, so records leave the ring only
when done. Which answers are final is decided by :mod:`cdpmp._outcome`, as in every
mode. Retryable failures past the retry budget keep their records and back off:
nothing is dropped while the endpoint is down; the host limit makes producers answer
``(False, msg)`` instead.

Stop: SIGTERM/SIGINT → drain within ``CDP_UPLOADER_DRAIN_TIMEOUT`` seconds (default 20,
below gunicorn's and Kubernetes' 30 s grace), then exit; what is left stays in the
ring for the next uploader. Idle exit (auto-started uploaders only): the ring is empty
and no registered producer process is alive for ``CDP_UPLOADER_IDLE_EXIT`` seconds
(default 60).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Set

import filelock
import psutil

from .._options import Settings, from_source_entry, host_settings
from .._outcome import internal_error
from .._retry import RetryPolicy
from .._transport import ENVELOPE_BYTES, MAX_BATCH_BYTES, Transport, send_splitting
from ..errors import CdpmpError, DeliveryError
from .files import UPLOADER_LOCK, append_dead_letter, path, read_sources, runtime_dir
from .ring import Record, Ring

logger = logging.getLogger("cdpmp.uploader")

POLL = 0.05  # seconds between ring polls
WINDOW_RECORDS = 5000
WINDOW_BYTES = 4 << 20
_ROOM = MAX_BATCH_BYTES - ENVELOPE_BYTES


class Uploader:
    """One uploader's state: its sources and transports, and the records of the current
    window already done but not yet released (after a partial failure)."""

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
        self._acked: Set[int] = set()  # starts of records done but not yet released
        self._first_seen: Optional[float] = None
        self._backoff_until = 0.0
        self._failures = 0
        self._idle_since = time.monotonic()

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
                self.stop.wait(POLL)
        self._drain()
        self.ring.set_uploader(0, 0.0)
        return 0

    def _drain(self) -> None:
        deadline = time.monotonic() + self.drain_timeout
        self.stop.clear()  # retries may sleep again, bounded by the deadline
        self._backoff_until = 0.0
        while time.monotonic() < deadline:
            self.ring.heartbeat()
            head, tail, _ = self.ring.bounds()
            if head == tail:
                return
            if not self._safe_cycle(draining=True, deadline=deadline):
                time.sleep(POLL)
        logger.warning(
            "cdpmp uploader: drain deadline passed; %d record(s) stay in the ring", self.ring.bounds()[2]
        )

    def _should_idle_exit(self) -> bool:
        if self.idle_exit is None:
            return False
        head, tail, _ = self.ring.bounds()
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
        """Send what is due; True if something was sent or released."""
        now = time.monotonic()
        if now < self._backoff_until and not draining:
            return False
        head, tail, count = self.ring.bounds()
        if head == tail:
            self._first_seen = None
            return False
        if self._first_seen is None:
            self._first_seen = now
        if not draining and not self._due(count, tail - head, now):
            return False  # decided from the header alone: no parsing while we wait
        window = self.ring.read(head, WINDOW_RECORDS, WINDOW_BYTES)
        if any(r.payload and r.source not in self._sources for r in window):
            self._load_sources()
        pending = []
        for rec in window:
            if rec.start in self._acked:
                continue
            if not rec.payload or rec.source not in self._sources:
                if rec.payload:
                    self.ring.bump("unknown_source")
                self._acked.add(rec.start)  # nothing to send: free it with the rest
            else:
                pending.append(rec)
        done: List[Record] = []
        failed = False
        for sid, batch in self._batches(pending):
            if not self._send(sid, batch, deadline, done):
                failed = True
                break
        if not failed:
            # The common case: every record of the window is done (sent now, or acked in
            # an earlier pass over this same window start); free it without bookkeeping.
            self._acked.clear()
            self.ring.release(window[-1].end, sum(1 for r in window if r.payload))
        else:
            self._acked.update(r.start for r in done)
            self._release(head, window)
        self._first_seen = time.monotonic() if self.ring.bounds()[2] else None
        return True

    def _due(self, count: int, used: int, now: float) -> bool:
        if not self._sources:
            self._load_sources()
        sources = self._sources.values()
        if not sources:
            return True  # records of unknown sources: let _cycle count and free them
        if count >= min(s.upload_size for s in sources) or used >= _ROOM:
            return True
        assert self._first_seen is not None
        return now - self._first_seen >= min(s.upload_interval for s in sources)

    def _batches(self, records: List[Record]) -> List[tuple[int, List[Record]]]:
        """Cut records (all of known sources) into per-source batches, in ring order."""
        state: Dict[int, List[Any]] = {}  # source -> [open batch, its bytes, upload_size]
        out: List[tuple[int, List[Record]]] = []
        for rec in records:
            st = state.get(rec.source)
            if st is None:
                st = state[rec.source] = [[], 0, self._sources[rec.source].upload_size]
            size = len(rec.payload) + 1
            batch = st[0]
            if batch and (len(batch) >= st[2] or st[1] + size > _ROOM):
                out.append((rec.source, batch))
                batch = st[0] = []
                st[1] = 0
            batch.append(rec)
            st[1] += size
        out.extend((sid, st[0]) for sid, st in state.items() if st[0])
        out.sort(key=lambda item: item[1][0].start)
        return out

    def _send(self, sid: int, batch: List[Record], deadline: Optional[float], done: List[Record]) -> bool:
        """Send one batch, split when the endpoint refuses its content; records that
        are done (sent or dead-lettered) are appended to ``done``. False when a
        retryable failure stopped it: the rest stays in the ring."""
        transport = self._transports[sid]
        parts = send_splitting(
            lambda recs: transport.send([r.payload for r in recs], self.stop, deadline), batch
        )
        for part, attempt in parts:
            self.ring.bump("requests", attempt.requests)
            if attempt.retries:
                self.ring.bump("retries", attempt.retries)
            error = attempt.error
            if error is None:
                self.ring.bump("sent", len(part))
                self.ring.bump("batches")
                self._failures = 0
            elif error.final:
                self._dead_letter(sid, part, error)
            else:
                self.ring.set_error(str(error))
                self._failures += 1
                pause = RetryPolicy(backoff_base=0.5, backoff_cap=5.0).delay(self._failures)
                self._backoff_until = time.monotonic() + pause
                logger.warning(
                    "cdpmp uploader: %s; keeping %d record(s), retrying in %.1fs", error, len(part), pause
                )
                return False
            done.extend(part)
        return True

    def _release(self, head: int, window: List[Record]) -> None:
        """Advance head over the done prefix of ``window`` (records in ring order)."""
        new_head, released = head, 0
        for rec in window:
            if rec.start not in self._acked:
                break
            self._acked.discard(rec.start)
            new_head = rec.end
            released += 1 if rec.payload else 0
        if new_head != head:
            self.ring.release(new_head, released)

    def _dead_letter(self, sid: int, batch: List[Record], error: DeliveryError) -> None:
        self.ring.bump("failed", len(batch))
        self.ring.bump("dead_lettered", len(batch))
        self.ring.set_error(str(error))
        logger.warning(
            "cdpmp uploader: batch of %d rejected (%s); written to dead-letter.jsonl", len(batch), error
        )
        append_dead_letter(self.directory, sid, str(error), [r.payload for r in batch])


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
