"""Shared mode, producer side: ``SharedSink`` and the uploader's lifecycle helpers.

A ``track()`` in shared mode serialises the message once (in the client) and appends it
to the host's ring (:mod:`cdpmp._ring`): no thread, no socket, no wake-up; the uploader
polls the ring on a timer. The host-wide limit is checked under the ring lock, so a
full host answers ``(False, msg)`` synchronously.

Sources: each client is a *source* (write key + endpoint + delivery settings),
identified in records by a 64-bit id. Their settings reach the uploader through
``sources.json`` (0600) in the runtime directory — never argv, a process title or a
log line.

Auto-start: at most once a second, a producer checks the uploader's liveness (pid
alive and heartbeat fresher than ``STALE_AFTER``); if it is gone, the one process that
wins ``Ring.claim_spawn`` starts ``python -m cdpmp.uploader --detach``, which starts the
real uploader in a new session and exits at once. The uploader is therefore never a
fork of a worker or master (it would inherit listeners, locks and flock fds) and is
reparented to init, so no server master reaps it. The launcher is reaped lazily at the
next check: the request path never waits for it.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

from ._report import Counters, Reporter
from ._ring import Ring, RingFormatError, pid_alive
from ._runtime import RuntimeDirError, open_private, runtime_dir, write_private
from ._settings import Settings
from .errors import ConfigurationError, MessageRejected

logger = logging.getLogger("cdpmp")

ENV_RING_BYTES = "CDP_RING_BYTES"
STALE_AFTER = 5.0  # seconds without a heartbeat before an uploader counts as dead
CHECK_EVERY = 1.0  # seconds between a producer's liveness checks
SPAWN_EVERY = 2.0  # seconds between spawn attempts, host-wide
SOURCE_FIELDS = (
    "write_key",
    "endpoint",
    "bearer",
    "gzip",
    "timeout",
    "max_retries",
    "retry_budget",
    "upload_size",
    "upload_interval",
)
_launchers: List[subprocess.Popen[bytes]] = []
_launchers_reaped_at_exit: List[bool] = []


def source_id(settings: Settings) -> int:
    digest = hashlib.blake2b(f"{settings.write_key}\0{settings.endpoint}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") or 1


def sources_path(directory: str) -> str:
    return os.path.join(directory, "sources.json")


def read_sources(directory: str) -> Dict[str, Dict[str, Any]]:
    try:
        fd = open_private(sources_path(directory), os.O_RDONLY)
    except FileNotFoundError:
        return {}
    with os.fdopen(fd, "rb") as fh:
        raw = fh.read()
    try:
        data = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def register_source(ring: Ring, directory: str, settings: Settings) -> int:
    sid = source_id(settings)
    entry = {name: getattr(settings, name) for name in SOURCE_FIELDS}
    with ring.locked():
        sources = read_sources(directory)
        if sources.get(str(sid)) != entry:
            sources[str(sid)] = entry
            write_private(sources_path(directory), json.dumps(sources).encode())
    return sid


def uploader_alive(ring: Ring) -> bool:
    pid, _, beat = ring.uploader()
    return bool(pid) and time.time() - beat < STALE_AFTER and pid_alive(pid)


# The launcher imports nothing but subprocess (≈15 ms), starts the uploader in a new
# session and exits: the uploader is then reparented to init and never reaped by a
# server master that spawned it (gunicorn's master calls waitpid(-1)).
_LAUNCHER = (
    "import subprocess, sys; "
    "subprocess.Popen([sys.executable, '-m', 'cdpmp.uploader', '--dir', sys.argv[1]], "
    "stdin=subprocess.DEVNULL, start_new_session=True, close_fds=True)"
)


def _reap_launchers(wait: float = 0.0) -> None:
    for proc in list(_launchers):
        try:
            proc.wait(wait) if wait else proc.poll()
        except subprocess.TimeoutExpired:
            continue
        if proc.returncode is not None:
            _launchers.remove(proc)


def spawn_uploader(directory: str) -> None:
    """Start a detached uploader (via a launcher that exits at once)."""
    _reap_launchers()
    log_fd = open_private(os.path.join(directory, "uploader.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _LAUNCHER, directory],
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            start_new_session=True,
            close_fds=True,
        )
    finally:
        os.close(log_fd)
    if not _launchers_reaped_at_exit:
        _launchers_reaped_at_exit.append(True)
        atexit.register(_reap_launchers, 1.0)
    _launchers.append(proc)


def ensure_uploader(ring: Ring, directory: str, wait: float = 0.0) -> bool:
    """Spawn an uploader if none is alive; with ``wait``, wait that long for it."""
    if uploader_alive(ring):
        return True
    if ring.claim_spawn(SPAWN_EVERY):
        spawn_uploader(directory)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if uploader_alive(ring):
            return True
        time.sleep(0.02)
    return uploader_alive(ring)


def stop_uploader(ring: Ring, timeout: float) -> bool:
    """SIGTERM the live uploader (it drains first) and wait up to ``timeout`` seconds
    for it to exit. The pid is checked against its create time before signalling."""
    import psutil

    pid, ctime, _ = ring.uploader()
    if not pid:
        return True
    try:
        proc = psutil.Process(pid)
        if ctime and abs(proc.create_time() - ctime) > 1:
            return True  # the pid was reused: not our uploader
        proc.terminate()
        proc.wait(timeout)
    except psutil.NoSuchProcess:
        return True
    except psutil.TimeoutExpired:
        return False
    return True


def host_ring() -> tuple[Ring, str]:
    """The ring of this host and user, for hooks and ``cdpmp stats`` (no client needed)."""
    directory = runtime_dir()
    return Ring(directory), directory


def open_ring(settings: Settings) -> tuple[Ring, str]:
    directory = runtime_dir()
    raw = os.environ.get(ENV_RING_BYTES)
    try:
        capacity = int(raw) if raw else 32 << 20
    except ValueError:
        raise ConfigurationError(ENV_RING_BYTES, f"{raw!r} is not an integer") from None
    return Ring(directory, capacity=capacity, max_count=settings.max_queue_size), directory


class SharedSink:
    """Producer side of shared mode; all state is re-opened per pid."""

    mode = "shared"

    def __init__(self, settings: Settings, counters: Counters, reporter: Reporter) -> None:
        self._settings = settings
        self._counters = counters
        self._reporter = reporter
        self._open()

    def _open(self) -> None:
        self._pid = os.getpid()
        # Never reuse the parent's lock fd: an inherited flock is the same lock.
        self._ring, self._dir = open_ring(self._settings)
        self._source = register_source(self._ring, self._dir, self._settings)
        self._next_check = 0.0
        self._registered = False

    def reset_after_fork(self) -> None:
        if self._pid != os.getpid():
            self._counters.reset()
            self._pid = -1  # re-open lazily on first use in this process

    def _here(self) -> Ring:
        if self._pid != os.getpid():
            self._open()
        return self._ring

    def put(self, data: bytes) -> bool:
        ring = self._ring if self._pid == os.getpid() else self._here()
        accepted = ring.put(self._source, data)
        if accepted:
            self._counters.queued += 1
        else:
            self._counters.drop("queue_full")
            detail = f"the host holds {ring.max_count} messages"
            self._reporter.report_encoded(MessageRejected("queue_full", detail), [data])
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + CHECK_EVERY
            self._check_uploader(ring)
        return accepted

    def _check_uploader(self, ring: Ring) -> None:
        if not self._registered:
            self._registered = True
            ring.register_producer(os.getpid(), _create_time(os.getpid()))
        try:
            ensure_uploader(ring, self._dir)
        except OSError as exc:
            self._reporter.log.warning("spawn", "cdpmp: cannot start the uploader: %s", exc)

    def flush(self, timeout: float) -> bool:
        """Wait until everything in the ring when called has been acknowledged."""
        ring = self._here()
        deadline = time.monotonic() + timeout
        _, target, _ = ring.bounds()
        if ring.bounds()[0] >= target:
            return True
        next_check = 0.0
        while time.monotonic() < deadline:
            if ring.bounds()[0] >= target:
                return True
            if time.monotonic() >= next_check:  # the uploader may die while we wait
                next_check = time.monotonic() + CHECK_EVERY / 4
                ensure_uploader(ring, self._dir)
            time.sleep(0.01)
        return ring.bounds()[0] >= target

    def shutdown(self, timeout: float) -> bool:
        return self.flush(timeout)  # queued events live in the ring, not in this process

    def depth(self) -> int:
        return int(self._here().bounds()[2])

    def stats(self) -> Dict[str, Any]:
        host = self._here().counters()
        return {"host": host, "retries": host["retries"], "requests": host["requests"]}


def _create_time(pid: int) -> float:
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return 0.0


def make_shared_sink(settings: Settings, counters: Counters, reporter: Reporter) -> Optional[SharedSink]:
    """A SharedSink, or None (after one warning) when shared mode cannot work here."""
    try:
        return SharedSink(settings, counters, reporter)
    except (RuntimeDirError, RingFormatError, OSError) as exc:
        logger.warning("cdpmp: shared mode unavailable (%s); using direct mode", exc)
        return None
