"""Process-wide state: the registry of live clients, fork and exit hooks, thread policy.

Everything cdpmp knows about *this process* lives in one object, :data:`PROCESS`.
It knows clients only through the small :class:`Member` protocol, so it imports no
client code (no import cycle).

Two fork mechanisms, because neither is enough alone:

* every sink stamps its state with ``os.getpid()`` and compares on each ``put`` and
  ``flush``; this catches forks that run no Python hook (uWSGI forks from C and, by
  default, calls none; so does a ctypes ``fork()``);
* one ``os.register_at_fork(after_in_child=...)``, registered at import, resets every
  live member right after ``os.fork()`` so the child never touches an inherited lock
  or socket even before its first call.

Fork hooks cannot be unregistered, so the hook is a module-level function over a
``WeakSet``: it never keeps a client alive (sentry-python's monitor uses a weak
reference for the same reason).

The exit hook is registered once, the first time any consumer starts. ``atexit``
registrations are inherited by children, so draining is pid-aware: each sink only
drains what its own process queued. Where ``atexit`` never runs, :meth:`ProcessState.arm`
covers the rest, per pid: a SIGTERM that would kill the process untouched drains first
(:mod:`cdpmp._exits`), and a Celery pool child (it ends with ``os._exit``) drains at
its ``worker_process_shutdown`` even when the app never imported the integration.
Before a server forks, :meth:`ProcessState.quiesce` ends this process's threads.
Durations are seconds.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
import weakref
from typing import Any, Callable, Dict, List, Optional, Protocol, TypeVar

from . import _exits
from ._options import Settings
from ._outcome import Ledger, report_losses

T = TypeVar("T")
BOOT_BUDGET = 1.0  # seconds a threadless master's inline send may take (see inline_deadline)
SETTLE_BUDGET = 0.2  # seconds quiesce() waits for joined threads to leave the kernel's count


class Member(Protocol):
    """What the process registry needs from a client."""

    settings: Settings
    _ledger: Ledger

    def _reset_after_fork(self) -> None: ...

    def shutdown(self, timeout: Optional[float] = None) -> bool: ...

    def flush(self, timeout: Optional[float] = None) -> bool: ...

    def _stop_threads(self, deadline: float) -> bool: ...

    def _depth(self) -> int: ...


#: Environment variables a serverless platform sets in its functions' processes:
#: AWS Lambda, Google Cloud Functions (and Cloud Run functions), Azure Functions.
SERVERLESS_ENV = ("AWS_LAMBDA_FUNCTION_NAME", "FUNCTION_TARGET", "FUNCTIONS_WORKER_RUNTIME")


class ProcessState:
    """The one holder of process-wide state (see the module docstring)."""

    def __init__(self) -> None:
        self._live: weakref.WeakSet[Member] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._exit_hook = False
        self._armed_pid = -1  # the pid whose SIGTERM drain and Celery hooks are in place
        self._celery_pid = -1
        self._origin_pid = os.getpid()  # the process that imported cdpmp
        self._hooked_pid = -1  # the last child in which the at-fork hook ran
        self._hookless: Dict[int, bool] = {}  # pid -> threads may start (see may_start_thread)
        self.draining_all = False  # drain_all() is shutting every client down
        self.exiting_pid = -1  # the pid whose exit drain began (see drain_all)
        # New events are refused (track() reads this one flag): a drain is running, or
        # this pid's exit drain has begun. A forked child starts open again.
        self.closing = False
        # False when the host runs no background threads (uWSGI without
        # enable-threads): sinks then send due batches on the calling thread.
        self.threads_available = True
        # A process that must never start a thread and sends each event inline: a
        # uWSGI master that loads the app before forking workers from C. A thread
        # alive there at fork time leaves the children's interpreter state invalid.
        self._threadless_pid = -1
        self._build_locks: Dict[int, threading.Lock] = {}
        self._locals: Dict[str, Any] = {}  # name -> this pid's object (see local())
        self._locals_pid = os.getpid()
        self.serverless_wrapped = False  # a function was decorated with @handler
        self._serverless_told = False

    def register(self, member: Member) -> None:
        with self._lock:
            self._live.add(member)
        self.arm()

    def unregister(self, member: Member) -> None:
        with self._lock:
            self._live.discard(member)

    def members(self) -> List[Member]:
        """The members alive in this process (a snapshot, safe to iterate)."""
        with self._lock:
            return list(self._live)

    def after_fork_in_child(self) -> None:
        self._lock = threading.Lock()  # never acquire a lock inherited mid-acquire
        self.closing = False
        self._hooked_pid = os.getpid()
        self.reset_in_child()

    def reset_in_child(self) -> None:
        """Reset every member created before a fork; a no-op for members whose state
        already belongs to this pid, so server hooks may call it again."""
        for member in self.members():
            member._reset_after_fork()

    def tell_if_serverless_unwrapped(self) -> None:
        """At this process's first sender thread: on a serverless platform (its
        environment says so) where no function was decorated with ``@handler``, say
        once what the platform's freeze and reap will cost, and the line to add (a
        Lambda without it delivered 27-33 of 36 events, silently)."""
        if self._serverless_told or self.serverless_wrapped:
            return
        self._serverless_told = True
        platform = next((name for name in SERVERLESS_ENV if os.environ.get(name)), None)
        if platform is not None:
            logging.getLogger("cdpmp").warning(
                "cdpmp: %s is set, so this looks like a serverless function, and none is decorated: "
                "events still queued when the platform freezes the process after an invocation are "
                "late, and lost if it is reaped. Add 'from cdpmp.integrations.serverless import "
                "handler' and '@handler' on the function",
                platform,
            )

    def disable_threads(self) -> None:
        """Make sinks deliver on the calling thread from now on."""
        self.threads_available = False

    def keep_threadless(self) -> None:
        """This process (not its children) sends inline and starts no thread."""
        self._threadless_pid = os.getpid()

    def threadless_here(self) -> bool:
        return self._threadless_pid == os.getpid()

    def build_lock(self) -> threading.Lock:
        """A lock of this pid's own, for building per-process state on first use.
        Made on demand per pid (``setdefault`` is atomic), never inherited held."""
        return self._build_locks.setdefault(os.getpid(), threading.Lock())

    def local(self, name: str, factory: Callable[[], T]) -> T:
        """This pid's ``name`` object (the sender threads' engine), made on first use.
        A child gets its own: what a parent's object holds (threads, sockets) does not
        survive ``fork``, and a C ``fork()`` runs no hook, so the pid is compared."""
        if self._locals_pid != os.getpid():
            with self.build_lock():
                if self._locals_pid != os.getpid():
                    self._locals, self._locals_pid = {}, os.getpid()
        found = self._locals.get(name)
        if found is None:
            with self.build_lock():
                found = self._locals.get(name)
                if found is None:
                    found = self._locals[name] = factory()
        return found

    def inline_deadline(self, timeout: float) -> float:
        """When a batch sent on the calling thread (no consumer can run) must end. A
        threadless master sends what it tracks while it boots (at import): never let
        an endpoint that is down or slow hold the boot for a whole ``timeout``; a
        failed batch is held and tried again at the next call or at exit."""
        if self.threadless_here():
            timeout = min(timeout, BOOT_BUDGET)
        return time.monotonic() + timeout

    def may_start_thread(self, pid: int = 0) -> bool:
        """False where no thread may start: threads disabled, a threadless master, or
        a child of a C ``fork()`` that ran no at-fork hook while its parent had other
        threads alive: ``threading``'s state (the parent's threads, its locks) was
        never repaired there, and a child that started a sender thread hung (found
        after a test that left a sender thread alive at the fork). Such a child sends
        inline. A uWSGI worker is forked, hook-less, from a master with no thread
        alive: it keeps its threads. ``pid``: ``os.getpid()`` if the caller has it."""
        pid = pid or os.getpid()
        if not self.threads_available or self._threadless_pid == pid:
            return False
        if pid in (self._origin_pid, self._hooked_pid):
            return True
        clean = self._hookless.get(pid)
        if clean is None:  # first asked in this child, before it started any thread
            clean = self._hookless.setdefault(pid, _threads_known() == 1)
        return clean

    def ensure_exit_hook(self) -> None:
        if not self._exit_hook:
            self._exit_hook = True
            atexit.register(self.exit_drain)
        if self._armed_pid != os.getpid():
            self.arm()

    def arm(self, cap: Optional[float] = None) -> None:
        """The exits ``atexit`` misses, for this pid (see the module docstring). Cheap
        and idempotent; tried again at the next call until the SIGTERM handler is in
        (only the main thread may install it)."""
        pid = os.getpid()
        if self._celery_pid != pid and "celery" in sys.modules:
            self._celery_pid = pid
            from . import _celery_signals  # celery is loaded already: no import cost

            _celery_signals.connect(self)
        if _exits.arm(self.exit_drain, self.exit_budget, cap, self.queued):
            self._armed_pid = pid

    def queued(self) -> int:
        """Events still queued by this process's members (their lock-free depth)."""
        return sum(member._depth() for member in self.members())

    def exit_budget(self) -> float:
        """Seconds the exit drain may take: the longest ``exit_timeout`` of a member."""
        return max((m.settings.exit_timeout for m in self.members()), default=0.0)

    def flush_all(self, timeout: float) -> bool:
        """Flush every member that holds something, sharing one deadline; True when all
        drained. Costs a depth check per member when nothing was tracked (serverless
        handlers call it at the end of every invocation)."""
        deadline = time.monotonic() + timeout
        drained = True
        for member in self.members():
            if member._depth():
                drained = member.flush(max(0.0, deadline - time.monotonic())) and drained
        return drained

    def quiesce(self, timeout: float) -> bool:
        """End every thread cdpmp runs in this process within ``timeout`` (before a
        server forks: Python 3.12+ warns at a fork beside live threads, and a child
        inherits any lock a thread held). Each mode first sends what only its threads
        would send (direct mode's queue; shared mode's events are in the ring already).
        Threads start again on demand. True when none is left. Costs nothing in a
        process that never tracked."""
        deadline = time.monotonic() + timeout
        # OS threads Python does not know (a C library's pool, a test runner's I/O
        # thread): they stay, and the wait below must not count them as ours.
        foreign = _os_threads() - threading.active_count()
        stopped = True
        for member in self.members():
            stopped = member._stop_threads(deadline) and stopped
        # A joined thread can still be an OS thread for an instant, and CPython counts
        # OS threads (/proc/self/task) for its fork warning: wait until they are gone.
        settle = min(deadline, time.monotonic() + SETTLE_BUDGET)
        while _os_threads() - threading.active_count() > foreign and time.monotonic() < settle:
            time.sleep(0.001)
        return stopped

    def exit_drain(self, timeout: Optional[float] = None) -> bool:
        """:meth:`drain_all` as this process ends (``atexit``, the SIGTERM drain): from
        here on, events tracked in this pid are refused and counted, never queued to
        be lost unseen. (A server's stop hook calls :meth:`drain_all`: an in-process
        ASGI lifespan, as a test client runs it, may start again.)"""
        self.exiting_pid = os.getpid()
        return self.drain_all(timeout)

    def drain_all(self, timeout: Optional[float] = None) -> bool:
        """Shut down every live member of this process, sharing one deadline.

        ``timeout`` None means each member's own ``exit_timeout``. Returns True when
        all queues drained. Used by atexit and by the server integrations.
        """
        drained = True
        start = time.monotonic()
        members = self.members()
        # The drain works on what is queued now: events other threads track meanwhile
        # are refused (counted as lost at shutdown), or they could extend it forever.
        self.draining_all = self.closing = True  # clients leave the loss report to the line below
        try:
            for member in members:
                budget = member.settings.exit_timeout if timeout is None else timeout
                remaining = max(0.0, budget - (time.monotonic() - start))
                drained = member.shutdown(timeout=remaining) and drained
        finally:
            self.draining_all = False
            self.closing = self.exiting_pid == os.getpid()
        report_losses([member._ledger for member in members])  # one line per process
        return drained


def _threads_known() -> int:
    """``threading.active_count()`` without its lock: in a child of a hook-less fork
    that lock may have been held by a parent thread (one starting or exiting, such as
    an idle sender thread leaving) and is never released there. The two dicts are
    consistent at the fork, which happened while the forking thread held the GIL."""
    active, limbo = getattr(threading, "_active", None), getattr(threading, "_limbo", None)
    if isinstance(active, dict) and isinstance(limbo, dict):
        return len(active) + len(limbo)
    return threading.active_count()  # pragma: no cover - another threading module


def _os_threads() -> int:
    """Threads the kernel counts for this process (0 where it cannot be read)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


PROCESS = ProcessState()


def _after_fork_in_child() -> None:
    PROCESS.after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
PROCESS.arm()  # at import: a script whose first call runs on another thread is covered
