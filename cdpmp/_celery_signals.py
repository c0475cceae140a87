"""Celery's worker signals wired to a process's state: reset in a pool child, the exit
drain where a process ends (the why of each: :mod:`cdpmp.integrations.celery`).

Apart from that public module so that the process state (:mod:`cdpmp._process`),
which connects them by itself once Celery is loaded, depends on nothing above it: the
state is passed in, never imported here.
"""

from __future__ import annotations

from typing import Any, Protocol


class Process(Protocol):
    def reset_in_child(self) -> None: ...

    def exit_drain(self, timeout: Any = None) -> bool: ...


_UID = "cdpmp-integration"


def connect(process: Process) -> None:
    """Connect the three signals to ``process`` (idempotent: one receiver each)."""
    from celery import signals

    def on_process_init(**_: Any) -> None:
        process.reset_in_child()

    def on_shutdown(**_: Any) -> None:
        process.exit_drain()  # the process ends next (a pool child by os._exit)

    signals.worker_process_init.connect(on_process_init, weak=False, dispatch_uid=_UID + "-init")
    signals.worker_process_shutdown.connect(on_shutdown, weak=False, dispatch_uid=_UID + "-pshutdown")
    signals.worker_shutdown.connect(on_shutdown, weak=False, dispatch_uid=_UID + "-shutdown")
