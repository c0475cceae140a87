"""Celery worker signals for the prefork (billiard) pool. One line in the app module::

    import cdpmp.integrations.celery  # noqa: F401  (connects on import)

or ``cdpmp.integrations.celery.connect()``. Signals:

* ``worker_process_init`` (child, right after fork; must finish in < 4 s): reset
  per-process state only — no network, no thread.
* ``worker_process_shutdown`` (child; it then ends with ``os._exit``, so atexit never
  runs): drain within ``exit_timeout`` seconds. Without this a child's queue is lost,
  e.g. with ``--max-tasks-per-child``.
* ``worker_shutdown`` (main process): drain what the main process queued.

Hard time limits SIGKILL the child: what it queued and had not sent is lost in direct
mode; shared mode keeps it.
"""

from __future__ import annotations

from .._celery_signals import connect as _connect
from .._process import PROCESS


def connect() -> None:
    """Connect the three signals (idempotent)."""
    _connect(PROCESS)


connect()
