"""This process's sender threads: one pool for every direct-mode client of the process
and for the shared-mode uploader's requests (the delivery rules they run are in
:mod:`cdpmp._engine`; how many requests a lane may have in flight is :mod:`cdpmp._lane`).

At most :data:`MAX_THREADS` threads for all clients together. Threads *pull* work: each
asks the active feeders, in turn, for a job that may start now. The rules below exist
because every wake of a sender thread takes the GIL from the application's own threads
(measured on the paced benchmark, 5,000 calls/s to an endpoint in another process:
145 sender wakes per batch of 100 events over 5 threads, the caller's p50 at 0.57x the
official client's):

* **A thread sleeps until there is something to do**: a batch full, a batch's interval
  over, a request back, a backoff over. Feeders say *when* they will next have a job
  (:meth:`Engine.activate`'s ``at``), so an event that only joins a batch wakes no one.
* **One waiting thread times the earliest due job** (``_timer_at``); the others wait
  only for their idle exit, so N idle threads cost one wake per due time, not N.
* **A new thread starts only for a job that may start now while every thread is busy**
  (a lane wider than one request), or when none is alive. A first event queued while
  the only thread sends starts none: that thread asks again when its request ends.
* **The thread that waited last is woken first** (:class:`_LastInFirstOut`): the warm
  thread is reused, and threads beyond what the lanes use reach :data:`IDLE_EXIT` even
  under steady traffic (woken in turn, 17 uploader threads stayed alive after an outage
  with one request in flight enough for the load). The last one to exit closes the
  idle sockets of every client it served.

Why threads and not one thread over several sockets: see :mod:`cdpmp._engine`.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from typing import Callable, Deque, List, Optional, Protocol, Tuple

from ._outcome import internal_error
from ._process import PROCESS

#: Sender threads per process, every client (or uploader source) together.
MAX_THREADS = 16
#: Seconds a sender thread waits for work before it exits.
IDLE_EXIT = 5.0

#: ``at`` for :meth:`Engine.activate`: the feeder has a job that may start now.
NOW = 0.0


class Feeder(Protocol):
    """What the engine needs from a direct-mode sink."""

    def next_job(self, now: float) -> Tuple[Optional[Callable[[], None]], Optional[float]]:
        """A job that may start now (already counted as started), and the seconds
        until another may (0: now; ``math.inf``: when a request finishes); ``None``
        for the wait when the feeder holds nothing at all."""

    def rest(self) -> None:
        """Close idle sockets (no sender thread is left to reuse them)."""


class _LastInFirstOut(threading.Condition):
    """A condition whose ``notify`` wakes the thread that began waiting last (CPython's
    wakes the first): see the module docstring. Relies on ``Condition._waiters``, the
    list of waiters' locks, the same in CPython 3.9–3.13 and under gevent."""

    def notify(self, n: int = 1) -> None:
        waiters = self._waiters  # type: ignore[attr-defined]
        while waiters and n > 0:
            waiter = waiters.pop()  # a waiter that timed out meanwhile drops it, as in CPython
            try:
                waiter.release()
            except RuntimeError:
                continue
            n -= 1


class Engine:
    """This process's sender threads (see the module docstring). Get it with
    :func:`engine`; a forked child gets its own."""

    def __init__(self, max_threads: int = MAX_THREADS) -> None:
        self.max_threads = max_threads
        self.pid = os.getpid()
        self._cond = _LastInFirstOut(threading.Lock())
        self._feeders: List[Feeder] = []  # those holding work, in turn
        self._served: List[Feeder] = []  # those served since the last thread exit
        self._jobs: Deque[Callable[[], None]] = deque()  # submitted by the uploader
        self._turn = 0
        self.threads = 0
        self._waiting = 0
        self._timer_at = math.inf  # when the thread that times the next job wakes
        self.peak_threads = 0
        self._retiring = 0  # retire() calls in progress: threads leave instead of waiting
        self._started: List[threading.Thread] = []  # joined by retire()

    def activate(self, feeder: Feeder, at: float = NOW) -> bool:
        """``feeder`` has work, and a job that may start at ``at`` (monotonic; :data:`NOW`;
        ``math.inf``: only when one of its requests ends): make sure a thread asks it
        by then. False if no thread can run in this process (the caller then sends
        on its own thread)."""
        with self._cond:
            if feeder not in self._feeders:
                self._feeders.append(feeder)
                if feeder not in self._served:
                    self._served.append(feeder)
            thread = None
            # A job for later wakes a thread only when no thread is busy: a busy one asks
            # when its request ends (a waiting one, woken, took over the work in turns
            # with it: 10.5 wakes per batch, measured, instead of 3), and no thread is
            # needed when the timing thread asks first.
            busy = self._waiting < self.threads
            if self.threads == 0 or (at < self._timer_at and (at == NOW or not busy)):
                thread = self._wake_locked(start=at == NOW or self.threads == 0)
            ok = self.threads > 0
        return self._start(thread) if thread is not None else ok

    def submit(self, job: Callable[[], None]) -> bool:
        """Run ``job`` on a sender thread; False if none can run (run it inline)."""
        with self._cond:
            self._jobs.append(job)
            thread = self._wake_locked(start=True)
            if thread is None and self.threads == 0:
                self._jobs.pop()
                return False
        if thread is not None and not self._start(thread):
            with self._cond:
                if job in self._jobs and self.threads == 0:
                    self._jobs.remove(job)
                    return False
        return True

    def _wake_locked(self, start: bool) -> Optional[threading.Thread]:
        """Wake a waiting thread, else (``start``) claim a new one, started by the
        caller after every lock is released: under gevent ``start()`` switches to it."""
        if self._waiting:
            self._cond.notify()
            return None
        if not start or self.threads >= self.max_threads or not PROCESS.may_start_thread():
            return None
        self.threads += 1
        self.peak_threads = max(self.peak_threads, self.threads)
        return threading.Thread(target=self._run, name="cdpmp-sender", daemon=True)

    def _start(self, thread: threading.Thread) -> bool:
        PROCESS.tell_if_serverless_unwrapped()
        try:
            thread.start()
            with self._cond:
                self._started = [t for t in self._started if t.is_alive()] + [thread]
            return True
        except RuntimeError:  # interpreter shutting down: the callers send inline
            with self._cond:
                self.threads -= 1
                return self.threads > 0

    def _next_locked(self, now: float) -> Tuple[Optional[Callable[[], None]], float, bool]:
        """The next job that may start, the wait until another may (0: now), and
        whether any feeder still holds work. Feeders are asked in turn (fairness)."""
        if self._jobs:
            return self._jobs.popleft(), 0.0 if self._jobs else math.inf, True
        wait, holding = math.inf, False
        count = len(self._feeders)
        order = self._feeders[self._turn % count :] + self._feeders[: self._turn % count] if count else []
        for feeder in order:
            try:
                job, after = feeder.next_job(now)
            except Exception as exc:  # noqa: BLE001 - one feeder's bug must not stop the others
                internal_error("a sender thread", exc)
                job, after = None, None
            if job is None and after is None:
                self._feeders.remove(feeder)  # holds nothing: asked again when it has work
                continue
            holding = True
            if job is not None:
                self._turn += 1
                return job, math.inf if after is None else after, True
            wait = min(wait, math.inf if after is None else after)
        return None, wait, holding

    def _run(self) -> None:
        with self._cond:
            try:
                self._serve()
            except BaseException:  # pragma: no cover - only a bug gets here
                self.threads -= 1
                raise

    def _serve(self) -> None:
        """A sender thread's loop; called and returning with the lock held."""
        idle_since = time.monotonic()
        while True:
            if self._retiring:
                self._leave_locked()
                return
            now = time.monotonic()
            job, wait, holding = self._next_locked(now)
            if job is not None:
                extra = self._wake_locked(start=True) if wait == 0 else None  # the lane allows another
                self._cond.release()
                try:
                    if extra is not None:
                        self._start(extra)
                    job()
                except Exception as exc:  # noqa: BLE001 - a job's bug must not kill the thread
                    internal_error("a sender thread", exc)
                finally:
                    self._cond.acquire()
                idle_since = time.monotonic()
                continue
            idle = now - idle_since
            # The last thread stays while work is held: it times the next batch.
            last = self.threads == 1
            if idle >= IDLE_EXIT and not (holding and last):
                if holding and self._waiting:
                    self._cond.notify()  # it may have been timing: another takes over
                self._leave_locked()
                return
            limit = IDLE_EXIT if holding and last else IDLE_EXIT - idle
            due_at = now + wait
            timing = due_at < self._timer_at  # this thread times the next job
            if timing:
                self._timer_at = due_at
            self._waiting += 1
            self._cond.wait(max(0.0, min(wait, limit) if timing else limit))
            self._waiting -= 1
            if timing and self._timer_at == due_at:
                self._timer_at = math.inf

    def _leave_locked(self) -> None:
        self.threads -= 1
        if self.threads == 0:
            self._rest_locked()
            self._cond.notify_all()  # retire() waits for this

    def _rest_locked(self) -> None:
        served, self._served = self._served, list(self._feeders)
        for feeder in served:
            if feeder not in self._feeders:
                try:
                    feeder.rest()
                except Exception as exc:  # noqa: BLE001 - closing sockets must not kill the exit
                    internal_error("closing idle connections", exc)

    def retire(self, deadline: float) -> bool:
        """End every sender thread once its job in hand is done, by ``deadline``
        (monotonic); work still held stays with its feeder, and the next ``activate``
        starts a thread again. True when no thread is left (joined: gone, not exiting)."""
        with self._cond:
            self._retiring += 1
            try:
                self._cond.notify_all()
                while self.threads > 0 and self._cond.wait(max(0.0, deadline - time.monotonic())):
                    pass
            finally:
                self._retiring -= 1
            threads = list(self._started)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            self._started = [t for t in threads if t.is_alive()]
            return self.threads == 0 and not self._started

    def forget(self, feeder: Feeder) -> None:
        """Drop ``feeder`` (stopped): no thread asks it again."""
        with self._cond:
            if feeder in self._feeders:
                self._feeders.remove(feeder)
            if feeder in self._served:
                self._served.remove(feeder)


def engine() -> Engine:
    """This process's engine (a child after ``fork`` gets a new one)."""
    return PROCESS.local("engine", Engine)
