"""The shared-mode uploader: one process per host and user, ring → batches → HTTP.

Run as ``cdpmp uploader`` / ``python -m cdpmp.shared.uploader`` (foreground, for
systemd or a sidecar: it runs until stopped), or started automatically by the first
producer that finds none (:mod:`.lifecycle`; ``--auto``: it also exits when idle).

Election: holding ``uploader.lock`` (filelock, an flock the kernel releases when the
holder dies) for its whole life *is* being the uploader; a second one exits at once.

Loop, every ``POLL`` seconds while there is work, slowing to ``IDLE_POLL`` when idle
(a timer: producers never wake it, since a wake-up costs every put 11–14 µs), or when
a request finishes: heartbeat; read a window of records
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
below gunicorn's and Kubernetes' 30 s grace), or until a request fails (the endpoint
is down: waiting would hold the stop for nothing), then exit; what is left stays in
the ring for the next uploader. Idle exit (auto-started uploaders only): the ring is empty
and no registered producer process is alive for ``CDP_UPLOADER_IDLE_EXIT`` seconds
(default 60).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import stat
import sys
import time
from typing import Optional, Sequence

import filelock
import psutil

from .._options import host_settings
from .dispatch import POLL, Dispatch
from .files import LOG_LIMIT, UPLOADER_LOCK, ensure_dir, open_private, path, runtime_dir
from .ring import Ring

logger = logging.getLogger("cdpmp.uploader")

IDLE_POLL = 0.25  # the slowest poll, reached after ~1 s without work


class Uploader:
    """The uploader process: election, serving, draining, idle exit, replaced files;
    the delivery loop itself is its :class:`Dispatch`."""

    def __init__(self, directory: str, auto: bool = False) -> None:
        self.directory = directory
        self.dispatch = Dispatch(directory)
        host = host_settings()
        self.drain_timeout = host.uploader_drain_timeout
        # Only an auto-started uploader leaves when idle; one run by systemd or as a
        # sidecar runs until it is stopped.
        self.idle_exit: Optional[float] = host.uploader_idle_exit if auto else None
        self._idle_since = time.monotonic()
        self._next_idle_check = 0.0

    # -- setup ---------------------------------------------------------------------------

    def run(self) -> int:
        lock_path = path(self.directory, UPLOADER_LOCK)
        # filelock opens with O_TRUNC and follows links: check the file is a regular
        # one of ours first (a symlink put there would have its target truncated).
        os.close(open_private(lock_path))
        lock = filelock.FileLock(lock_path, mode=0o600)
        while True:
            try:
                lock.acquire(timeout=0)
            except filelock.Timeout:
                return 0  # another uploader holds the election
            try:
                replaced = self._serve()
            finally:
                lock.release()
            if not replaced:
                return 0
            os.close(open_private(lock_path))  # serve the new files, if elected again

    def _serve(self) -> bool:
        """Serve until stopped or idle (False), or until the ring file is removed or
        replaced (True: what it held was carried into the new one)."""
        dispatch = self.dispatch
        dispatch.open()
        me = psutil.Process()
        dispatch.ring.header.set_uploader(me.pid, me.create_time())
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: dispatch.stop.set())
        logger.info("cdpmp uploader %d serving %s", me.pid, self.directory)
        poll, next_files_check = POLL, 0.0
        while not dispatch.stop.is_set():
            dispatch.ring.header.heartbeat()
            if dispatch.cycle(draining=False) or dispatch.busy():
                poll = POLL
            else:
                if self._should_idle_exit() and self._leave():
                    return False
                # Idle: poll less and less often, up to IDLE_POLL (the heartbeat too).
                poll = min(IDLE_POLL, poll * 1.5)
            if time.monotonic() >= next_files_check:
                next_files_check = time.monotonic() + 1.0
                if dispatch.ring.replaced() and self._carry_over():
                    return True
            dispatch.pause(poll)
        self._drain()
        dispatch.ring.header.set_uploader(0, 0.0)
        return False

    def _carry_over(self) -> bool:
        """The ring file was removed or replaced: let the requests in flight finish,
        then move every record not yet done into the ring now at the path (producers
        that notice first do the same; ``take_all`` makes each record move once).
        False, taking nothing, if no new ring can be opened yet."""
        try:
            ring = Ring(ensure_dir(self.directory))
        except OSError as exc:
            logger.warning("cdpmp uploader: the ring was removed and cannot be made again: %s", exc)
            return False
        dispatch = self.dispatch
        dispatch.land(time.monotonic() + self.drain_timeout)
        records = dispatch.take_undone()
        old, dispatch.ring = dispatch.ring, ring
        lost = sum(1 for r in records if not ring.put(r.source, r.payload, 1 << 62))
        logger.warning(
            "cdpmp uploader: the ring was removed or replaced; %d record(s) carried into the new one, %d lost",
            len(records) - lost,
            lost,
        )
        ring.header.bump("queue_full", lost)
        old.close()
        ring.close()  # served again after the election: a fresh handle, fresh state
        return True

    def _leave(self) -> bool:
        """Idle exit: unpublish first, then look once more, so that an event put
        while we were deciding is either seen here or by a producer that finds no
        uploader and starts one. False (stay) if the ring is not empty."""
        ring = self.dispatch.ring
        ring.header.set_uploader(0, 0.0)
        head, tail, _ = ring.bounds()
        if head == tail:
            logger.info(
                "cdpmp uploader: idle for %.0f s with no live producer; exiting", self.idle_exit or 0.0
            )
            return True
        me = psutil.Process()
        ring.header.set_uploader(me.pid, me.create_time())
        return False

    def _drain(self) -> None:
        dispatch, ring = self.dispatch, self.dispatch.ring
        deadline = time.monotonic() + self.drain_timeout
        dispatch.begin_drain()
        while time.monotonic() < deadline:
            ring.header.heartbeat()
            head, tail, _ = ring.bounds()
            if head == tail and not dispatch.in_flight():
                return
            if dispatch.failed_since_drain and not dispatch.in_flight():
                # The endpoint fails now: waiting out the deadline would hold the stop
                # (a gunicorn master, a deploy) for nothing. The records stay in the
                # ring, durable, for the next uploader.
                logger.warning(
                    "cdpmp uploader: the endpoint is failing at the stop; %d record(s) stay in the ring",
                    ring.bounds()[2],
                )
                return
            if not dispatch.cycle(draining=True, deadline=deadline):
                dispatch.pause(min(POLL, max(0.0, deadline - time.monotonic())))
        dispatch.cancel()
        logger.warning(
            "cdpmp uploader: drain deadline passed; %d record(s) stay in the ring", ring.bounds()[2]
        )

    def _should_idle_exit(self) -> bool:
        if self.idle_exit is None:
            return False
        now = time.monotonic()
        if now < self._next_idle_check:  # producer liveness costs psutil calls: once a second
            return False
        self._next_idle_check = now + 1.0
        ring = self.dispatch.ring
        head, tail, _ = ring.peek()
        if head != tail or any(_producer_alive(pid, ctime) for pid, ctime in ring.header.producers()):
            self._idle_since = time.monotonic()
            return False
        return time.monotonic() - self._idle_since >= self.idle_exit


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
    handler = _CappedStderr()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    try:
        return Uploader(directory, auto=args.auto).run()
    except OSError as exc:  # a runtime file we must not use (a symlink, a FIFO, not ours)
        logger.error("cdpmp uploader: cannot serve %s: %s", directory, exc)
        return 1


class _CappedStderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Logs to stderr; when stderr is a file (``uploader.log`` of an auto-started
    uploader, on the same small tmpfs as the ring), stops writing at
    :data:`~cdpmp.shared.files.LOG_LIMIT`."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.suppressed = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            info = os.fstat(sys.stderr.fileno())
        except (OSError, ValueError):
            info = None
        if info is not None and stat.S_ISREG(info.st_mode) and info.st_size >= LOG_LIMIT:
            if not self.suppressed:
                sys.stderr.write(f"cdpmp uploader: {LOG_LIMIT} bytes of log reached; further lines dropped\n")
            self.suppressed += 1
            return
        super().emit(record)


if __name__ == "__main__":
    sys.exit(main())
