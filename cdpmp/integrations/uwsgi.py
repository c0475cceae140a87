"""uWSGI integration. One line in the WSGI module (it is a no-op outside uWSGI)::

    import cdpmp.integrations.uwsgi; cdpmp.integrations.uwsgi.setup()

What it does, and why:

* uWSGI forks workers from C and by default runs no Python fork hook, so cdpmp relies
  on its pid check (always on). ``setup()`` additionally registers a reset through
  ``uwsgidecorators.postfork``, which *appends* to uWSGI's postfork chain — never
  overwrite ``uwsgi.post_fork_hook``, other libraries use it. ``uwsgidecorators``
  cannot be imported without a master, so the registration is skipped then.
* Without ``enable-threads`` (or ``threads``), application threads do not run while a
  worker waits for requests. ``setup()`` warns once and switches cdpmp to inline
  delivery: no consumer thread; a call that completes a batch (``upload_size``, the
  500 KB limit, or ``upload_interval`` elapsed since the oldest waiting event) sends it
  on the request thread, and the worker's exit sends the rest. Nothing is lost; the
  cost moves onto the request that fills a batch. Enable threads, or use shared mode,
  to keep it off the request path.
* Loaded in the master (no ``lazy-apps``): uWSGI forks workers from C without
  ``PyOS_AfterFork_Child``; a Python thread alive in the master at that moment leaves
  the workers' interpreter state invalid (they deadlock at exit — uWSGI issues 1149,
  1369). So the master starts no consumer: what it tracks (typically at import) is
  sent inline, once. Call ``setup()`` before anything tracks.
* Shared mode (``CDP_MODE=shared``) works with the same line: the uploader is started
  with this environment's ``python`` (under uWSGI ``sys.executable`` is the ``uwsgi``
  binary), and no thread is needed, so the threads warning is not given.
* Exit: chains ``uwsgi.atexit`` to drain within ``exit_timeout`` (``skip-atexit``
  disables Python's atexit, not this hook).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from .._options import env_mode
from .._process import PROCESS

logger = logging.getLogger("cdpmp")

THREADS_WARNING = (
    "cdpmp: uWSGI is running without enable-threads, so background threads cannot run; "
    "cdpmp will send each full batch inline on the request that fills it, and the rest at "
    "worker exit. Add 'enable-threads = true' (or use CDP_MODE=shared) to keep sending off "
    "the request path."
)
_done = False


def _flag(value: Any) -> bool:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, (list, tuple)):
        value = value[-1] if value else None
    return str(value).strip().lower() not in ("", "0", "false", "no", "off", "none")


def _threads_enabled(opt: Any) -> bool:
    threads = opt.get("threads")
    try:
        many = threads is not None and int(threads.decode() if isinstance(threads, bytes) else threads) > 1
    except (TypeError, ValueError):
        many = False
    return many or _flag(opt.get("enable-threads", False))


def setup(uwsgi_module: Optional[Any] = None) -> bool:
    """Wire cdpmp into the running uWSGI (idempotent). Returns False outside uWSGI."""
    global _done
    if uwsgi_module is None:
        try:
            import uwsgi
        except ImportError:
            return False
        uwsgi_module = uwsgi
    if _done:
        return True
    _done = True
    opt = getattr(uwsgi_module, "opt", {})
    if not _threads_enabled(opt):
        if env_mode() != "shared":  # shared mode needs no thread to deliver
            logger.warning(THREADS_WARNING)
        PROCESS.disable_threads()
    worker_id = getattr(uwsgi_module, "worker_id", lambda: 1)
    if worker_id() == 0:
        # Loaded in the master (no lazy-apps): workers will be forked from C. Keep the
        # master thread-free; anything it tracks is sent inline.
        PROCESS.keep_threadless()
    if _flag(opt.get("master", False)):
        from uwsgidecorators import postfork

        postfork(PROCESS.reset_in_child)
    previous = getattr(uwsgi_module, "atexit", None)

    def _atexit() -> None:
        try:
            if callable(previous):
                previous()
        finally:
            PROCESS.drain_all()

    uwsgi_module.atexit = _atexit
    return True
