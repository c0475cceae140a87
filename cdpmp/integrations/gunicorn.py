"""gunicorn server hooks. One line in ``gunicorn.conf.py``::

    from cdpmp.integrations.gunicorn import install; install(globals())

``install`` adds cdpmp's hooks and keeps any hook the file already defined (both run,
the user's first). Hooks, and where gunicorn calls them:

* ``pre_fork`` (master, before each worker is forked): if the master tracked (an app
  that tracks at import under ``--preload``), send what it queued and end its threads,
  within :data:`PRE_FORK_BUDGET` seconds, so no worker is forked beside a live thread
  (Python 3.12+ warns "This process is multi-threaded, use of fork() may lead to
  deadlocks in the child", and a child inherits any lock a thread held). They start
  again on demand; what could not be sent in time stays queued in the master.
* ``post_fork`` (worker): forget the parent's queue, locks and socket. Already done by
  the ``os.register_at_fork`` hook and the pid check; calling it here makes the reset
  independent of how the worker was forked.
* ``post_worker_init`` (worker, after the app is loaded): arm cdpmp's SIGTERM drain
  (:mod:`cdpmp._exits`) where the worker left SIGTERM at the default. Uvicorn's
  ``UvicornWorker`` does: it resets SIGTERM, and after its graceful stop re-raises it
  with that handler back, so the worker dies by the signal and ``worker_exit`` never
  runs; the drain then runs from the re-raised signal, within the budget below. So
  this file's line is enough for ``UvicornWorker`` too, without the ASGI wrapper.
* ``worker_exit`` (worker, every Python-level exit: SIGTERM, ``max_requests``
  recycling, SIGQUIT): drain the queue within ``min(exit_timeout, 0.8 *
  graceful_timeout)`` seconds, so gunicorn's SIGKILL never interrupts it.
* ``worker_abort`` (worker, SIGABRT on timeout; SIGKILL follows): best effort, 1 s.
* ``when_ready`` (master; shared mode only, ``CDP_MODE=shared``): start the host's
  uploader before the first worker tracks, and wait up to 5 s for its heartbeat.
* ``on_exit`` (master; shared mode only): stop the uploader, which drains the ring
  within ``CDP_UPLOADER_DRAIN_TIMEOUT`` (20 s) first.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, MutableMapping

from .._options import env_mode
from .._process import PROCESS

logger = logging.getLogger("cdpmp")

ABORT_BUDGET = 1.0  # seconds: gunicorn SIGKILLs an aborted worker soon after
PRE_FORK_BUDGET = 2.0  # seconds the master may spend sending and ending threads before a fork
GRACE_SHARE = 0.8  # share of graceful_timeout the exit drain may use
STOP_BUDGET = 25.0  # seconds on_exit waits for the uploader to drain and exit


def _grace(server: Any) -> float:
    """The share of gunicorn's ``graceful_timeout`` an exit drain may use (``server``:
    the arbiter or a worker, both carry ``cfg``)."""
    return float(getattr(getattr(server, "cfg", None), "graceful_timeout", 30)) * GRACE_SHARE


def _budget(server: Any) -> float:
    own = max((c.settings.exit_timeout for c in PROCESS.members()), default=10.0)
    return max(0.0, min(own, _grace(server)))


def pre_fork(server: Any, worker: Any) -> None:
    if not PROCESS.quiesce(PRE_FORK_BUDGET):
        logger.warning("cdpmp: the master's threads did not end within %.0f s before a fork", PRE_FORK_BUDGET)


def post_fork(server: Any, worker: Any) -> None:
    PROCESS.reset_in_child()


def post_worker_init(worker: Any) -> None:
    PROCESS.arm(cap=_grace(worker))


def worker_exit(server: Any, worker: Any) -> None:
    if not PROCESS.drain_all(timeout=_budget(server)):
        logger.warning("cdpmp: worker exit deadline passed; see stats()['dropped']['shutdown']")


def worker_abort(worker: Any) -> None:
    PROCESS.drain_all(timeout=ABORT_BUDGET)


def _shared_mode() -> bool:
    return env_mode() == "shared"


def when_ready(server: Any) -> None:
    if _shared_mode():
        from ..shared import lifecycle

        ring, directory = lifecycle.host_ring()
        try:
            if not lifecycle.ensure(ring, directory, wait=5.0):
                logger.warning("cdpmp: the shared-mode uploader did not start within 5 s")
        finally:
            ring.close()  # every worker would inherit an open handle


def on_exit(server: Any) -> None:
    if _shared_mode():
        from ..shared import lifecycle

        ring, _ = lifecycle.host_ring()
        try:
            if not lifecycle.stop(ring, timeout=STOP_BUDGET):
                logger.warning("cdpmp: the uploader did not stop within %.0f s", STOP_BUDGET)
        finally:
            ring.close()


HOOKS: Dict[str, Callable[..., None]] = {
    "pre_fork": pre_fork,
    "post_fork": post_fork,
    "post_worker_init": post_worker_init,
    "worker_exit": worker_exit,
    "worker_abort": worker_abort,
    "when_ready": when_ready,
    "on_exit": on_exit,
}


def _chain(first: Callable[..., Any], second: Callable[..., None]) -> Callable[..., None]:
    def hook(*args: Any) -> None:
        try:
            first(*args)
        finally:
            second(*args)

    hook.__name__ = second.__name__
    return hook


def install(config_globals: MutableMapping[str, Any]) -> None:
    """Add cdpmp's hooks to a ``gunicorn.conf.py`` namespace, chaining existing ones."""
    for name, ours in HOOKS.items():
        existing = config_globals.get(name)
        if existing is None or existing is ours:
            config_globals[name] = ours
        elif not getattr(existing, "_cdpmp", False):
            chained = _chain(existing, ours)
            chained._cdpmp = True  # type: ignore[attr-defined]  # install() twice is harmless
            config_globals[name] = chained
