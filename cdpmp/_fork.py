"""The fork guard: the registry of live clients and the process-level hooks.

Two mechanisms, because neither is enough alone:

* every sink stamps its state with ``os.getpid()`` and compares on each ``put`` and
  ``flush``; this catches forks that run no Python hook (uWSGI forks from C and, by
  default, calls none; so does a ctypes ``fork()``);
* one ``os.register_at_fork(after_in_child=...)``, registered at import, resets every
  live client right after ``os.fork()`` so the child never touches an inherited lock
  or socket even before its first call.

Fork hooks cannot be unregistered, so the hook is a module-level function over a
``WeakSet``: it never keeps a client alive (sentry-python's monitor uses a weak
reference for the same reason).

The exit hook is registered once, the first time any consumer starts. ``atexit``
registrations are inherited by children, so the hook itself is pid-aware: each sink
only drains what its own process queued.
"""

from __future__ import annotations

import atexit
import os
import threading
import weakref
from typing import TYPE_CHECKING, List

if TYPE_CHECKING:
    from .client import Client

_live: weakref.WeakSet[Client] = weakref.WeakSet()
_exit_hook_registered = False
# False when the host runs no background threads (uWSGI without enable-threads):
# sinks then send due batches on the calling thread instead of a consumer.
threads_available = True
# A process that must never start a thread and sends each event inline: a uWSGI
# master that loads the app before forking workers from C. A thread alive there at
# fork time leaves the children's interpreter state invalid; they deadlock at exit.
_threadless_pid = -1
_registry_lock = threading.Lock()


def register(client: Client) -> None:
    with _registry_lock:
        _live.add(client)


def live_clients() -> List[Client]:
    """The clients alive in this process (a snapshot, safe to iterate)."""
    return list(_live)


def _after_fork_in_child() -> None:
    global _registry_lock
    _registry_lock = threading.Lock()
    reset_in_child()


def reset_in_child() -> None:
    """Reset every live client created before a fork; a no-op for clients whose
    state already belongs to this pid, so server hooks may call it again."""
    for client in list(_live):
        client._reset_after_fork()


def disable_threads() -> None:
    """Make sinks deliver on the calling thread from now on (process-wide)."""
    global threads_available
    threads_available = False


def keep_process_threadless() -> None:
    """This process (not its children) sends inline and starts no thread."""
    global _threadless_pid
    _threadless_pid = os.getpid()


def threadless_here() -> bool:
    return _threadless_pid == os.getpid()


def may_start_thread() -> bool:
    return threads_available and _threadless_pid != os.getpid()


def ensure_exit_hook() -> None:
    global _exit_hook_registered
    if not _exit_hook_registered:
        _exit_hook_registered = True
        atexit.register(drain_all)


def drain_all(timeout: float | None = None) -> bool:
    """Shut down every live client of this process, sharing one deadline.

    ``timeout`` None means each client's own ``exit_timeout``. Returns True when all
    queues drained. Used by atexit and by the server integrations.
    """
    import time

    drained = True
    start = time.monotonic()
    for client in list(_live):
        budget = client.settings.exit_timeout if timeout is None else timeout
        remaining = max(0.0, budget - (time.monotonic() - start))
        drained = client.shutdown(timeout=remaining) and drained
    return drained


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
