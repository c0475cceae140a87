"""The uploader's lifecycle as seen from outside it: liveness, start, stop.

Liveness: the pid published in the ring header is alive and its heartbeat is fresher
than ``STALE_AFTER`` seconds.

Start (:func:`spawn`, the one launcher): at most once per ``SPAWN_EVERY`` seconds
host-wide (``Ring.claim_spawn``), a producer runs a tiny launcher interpreter that
starts ``python -m cdpmp.shared.uploader`` in a new session and exits at once. The
uploader is therefore never a fork of a worker or master (it would inherit
listeners, locks and flock fds), and it is reparented to init, so no server master
reaps it (gunicorn's master calls ``waitpid(-1)``; the launcher exits 0, which it
ignores). The launcher is reaped lazily at the next start and at exit: the request
path never waits for it. Its environment carries no write key: sources reach the
uploader through ``sources.json`` only.

Stop (:func:`stop`): SIGTERM the published pid after checking its create time (a pid
may be reused), then wait for it to exit; the uploader drains first.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import stat
import subprocess
import sys
import time
from typing import Dict, List, Tuple

import psutil

from .._options import ENV
from .files import UPLOADER_LOCK, UPLOADER_LOG, RuntimeDirError, open_log, open_private, runtime_dir
from .header import pid_alive
from .ring import Ring

STALE_AFTER = 5.0  # seconds without a heartbeat before an uploader counts as dead
SPAWN_EVERY = 2.0  # seconds between spawn attempts, host-wide

_LAUNCHER = (
    "import subprocess, sys; "
    "subprocess.Popen([sys.executable, '-m', 'cdpmp.shared.uploader', '--auto', '--dir', sys.argv[1]], "
    "stdin=subprocess.DEVNULL, start_new_session=True, close_fds=True)"
)
_launchers: List[subprocess.Popen[bytes]] = []
_reap_at_exit: List[bool] = []
_spawned: List[float] = []  # when this process last started an uploader not yet seen alive


def alive(ring: Ring) -> bool:
    """An uploader serves this ring: it has published itself, its heartbeat is fresh,
    and either its pid is alive here or — when the pid means nothing to us (a sidecar
    in another PID namespace sharing only the runtime directory) — someone holds the
    election lock, which the kernel frees when its holder dies."""
    pid, _, beat = ring.header.uploader()
    if not pid or time.time() - beat >= STALE_AFTER:
        return False
    return pid_alive(pid) or election_held(os.path.dirname(ring.path))


def election_held(directory: str) -> bool:
    """True if a process holds ``uploader.lock`` (the lock is probed, never kept)."""
    try:
        fd = open_private(os.path.join(directory, UPLOADER_LOCK))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _reap(wait: float = 0.0) -> None:
    for proc in list(_launchers):
        try:
            proc.wait(wait) if wait else proc.poll()
        except subprocess.TimeoutExpired:
            continue
        if proc.returncode is not None:
            _launchers.remove(proc)


def _uploader_env() -> Dict[str, str]:
    """The uploader's environment: ours without the write key."""
    return {k: v for k, v in os.environ.items() if k != ENV["write_key"]}


def interpreter() -> str:
    """The Python interpreter to run the uploader with. Usually ``sys.executable``;
    but embedded interpreters set it to their host program — under uWSGI it is the
    ``uwsgi`` binary, which cannot run ``-c`` (measured: shared mode delivered 0 of
    901 events, the error only in ``uploader.log``) — so then the ``python`` of this
    environment (``sys.prefix``: the virtualenv), then of the base installation."""
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    candidates = [sys.executable]
    for prefix in dict.fromkeys((sys.prefix, sys.exec_prefix, sys.base_prefix)):
        candidates += [os.path.join(prefix, "bin", name) for name in ("python", "python3", version)]
    for path in candidates:
        if path and os.path.basename(path).startswith("python") and os.access(path, os.X_OK):
            return path
    raise OSError(
        f"no Python interpreter found to run the uploader (sys.executable is {sys.executable!r});"
        " run `cdpmp uploader` as a service instead"
    )


def spawn(directory: str) -> None:
    """Start a detached uploader (via a launcher that exits at once)."""
    _reap()
    python = interpreter()
    log_fd = open_log(directory)
    try:
        proc = subprocess.Popen(
            [python, "-I", "-c", _LAUNCHER, directory],
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            env=_uploader_env(),
            start_new_session=True,
            close_fds=True,
        )
    finally:
        os.close(log_fd)
    if not _reap_at_exit:
        _reap_at_exit.append(True)
        atexit.register(_reap, 1.0)
    _launchers.append(proc)


def preflight(directory: str) -> None:
    """Raise :class:`RuntimeDirError` saying why no uploader can start here: a file
    planted where the uploader's lock or log goes (a symlink, a FIFO, another owner's
    file) makes every uploader exit at once, its reason only in a log it cannot open."""
    for name in (UPLOADER_LOCK, UPLOADER_LOG):
        path = os.path.join(directory, name)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            kind = (
                "symlink" if stat.S_ISLNK(info.st_mode) else "FIFO" if stat.S_ISFIFO(info.st_mode) else "file"
            )
            raise RuntimeDirError(
                f"{path} is a {kind} that is not a regular file of ours: no uploader can start "
                "until it is removed"
            )


def _gone_since_spawn(directory: str) -> None:
    """Raise when an uploader this process started did not come up: the reason is the
    last line of ``uploader.log`` (what the uploader said before it exited)."""
    if not _spawned or time.monotonic() - _spawned[-1] < 2 * STALE_AFTER:
        return
    _spawned.clear()
    try:
        with open(os.path.join(directory, UPLOADER_LOG), "rb") as log:
            log.seek(max(0, os.fstat(log.fileno()).st_size - 2000))
            tail = log.read().decode("utf-8", "replace").strip().splitlines()
    except OSError:
        tail = []
    said = tail[-1][-300:] if tail else "nothing in uploader.log"
    raise OSError(f"the uploader started {2 * STALE_AFTER:.0f}+ s ago is not running ({said})")


def ensure(ring: Ring, directory: str, wait: float = 0.0) -> bool:
    """Spawn an uploader if none is alive; with ``wait``, wait that long for it.
    Raises ``OSError`` saying why when no uploader can start (the caller warns, and
    the reason is kept as the host's ``last_error`` for ``cdpmp stats``)."""
    if alive(ring):
        _spawned.clear()
        return True
    try:
        preflight(directory)
        _gone_since_spawn(directory)
    except OSError as exc:
        ring.header.set_error(f"no uploader: {exc}", timeout=0.5)
        raise
    if ring.header.claim_spawn(SPAWN_EVERY):
        spawn(directory)
        _spawned.append(time.monotonic())
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if alive(ring):
            return True
        time.sleep(0.02)
    return alive(ring)


def stop(ring: Ring, timeout: float) -> bool:
    """SIGTERM the live uploader (it drains first) and wait up to ``timeout`` seconds
    for it to exit. The pid is checked against its create time before signalling."""
    pid, ctime, _ = ring.header.uploader()
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


def host_ring() -> Tuple[Ring, str]:
    """The ring of this host and user, for hooks and ``cdpmp stats``. The caller
    closes it (``ring.close()``): an open handle is inherited by every fork."""
    directory = runtime_dir()
    return Ring(directory), directory
