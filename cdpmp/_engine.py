"""The delivery engine: one per process, shared by every direct-mode client of the
process and by the shared-mode uploader. Sinks and the uploader are thin feeders of it.

A real endpoint is 30–200 ms away, so one request at a time caps a sender at
``upload_size / round trip`` events per second (≈1,000/s at 100 ms with the default
batch of 100). Against a fast endpoint, though, a second request in flight buys
nothing: sending is then CPU-bound, and every extra sender thread only takes the GIL
from the application's own request threads (measured: ``track()`` cost 15–27 µs with
16 senders against a local endpoint, 7–8 µs with one). Its parts:

* :class:`Lane`: one endpoint's delivery state (one per client, one per uploader
  source). **The concurrency rule:** a lane adds a request in flight (+1) after a
  success only when all three hold:

  1. a backlog: at least a full batch is still waiting;
  2. the requests are *network-bound*: the sending thread's CPU time is at most
     :data:`NETWORK_BOUND` of the request's wall time (a smoothed average, and each of the
     last ``RECENT`` requests: a few stalled behind the GIL look network-bound; measured:
     0.5 for a local endpoint in another process, 0.2–0.26 for one in the caller's
     process, whose threads take the GIL too; 0.01–0.04 at 50–100 ms), and that wait
     (wall − CPU, smoothed) is at least :data:`MIN_WAIT`: below it one request at a
     time already carries ``upload_size`` / 5 ms = 20,000 events/s, more than a
     process tracks while doing its own work, and a loaded machine's scheduling
     delays alone can make a local endpoint look "far";
  3. the last step paid off: once the current level L has been measured (more than L
     requests came back), the request it added carries at least :data:`STEP_GAIN` of
     what each of the L−1 before it carried: throughput at L ≥ throughput at L−1 ×
     (1 + STEP_GAIN / (L−1)). A level's throughput is estimated by Little's law, L ×
     events per request / mean wall time per request, so an endpoint (or a GIL) that
     serialises requests shows up as a wall time growing with L, and a step that
     adds nothing is seen within about one round trip, without the noise of counting
     events per second in round-trip-sized lumps.

  It steps down (−1) after a success that was CPU-bound, one that left no backlog
  while more than one slot stood unused (a step that adds nothing), or when a step
  did not pay off (that level is then not tried again for :data:`HOLD` seconds). A
  retryable failure halves the limit; while the endpoint fails the lane sends ONE
  probe at a time, after the retry policy's backoff. Final answers leave it alone.
* :class:`Engine`: this process's sender threads, at most :data:`MAX_THREADS` for all
  clients together. A thread starts on demand (the first work of the process, or a
  lane that may start another request while every thread is busy) and exits after
  :data:`IDLE_EXIT` seconds without a request to send; the last one also closes the
  idle sockets of every client it served. Threads *pull* work: each asks the active
  feeders, in turn, for a job that may start now, and otherwise sleeps until the
  earliest due time — so one thread both times and sends while one request at a time
  is enough, and a thread costs nothing to the request path until it is needed.
* :class:`Held`, :func:`take_batch`, :func:`settle`: the one batcher, and the one
  settle path with the one give-up rule (the client's :class:`~cdpmp._retry.RetryPolicy`
  decides *retry / wait / give up*) for every queued mode.

Why threads and not one thread over several sockets (selectors and a sans-IO HTTP/1.1
library, or HTTP/2): once concurrency only grows while requests wait on the network,
a sender thread spends its request blocked in ``recv`` with the GIL released, so N
threads cost the caller about what one does (measured, see BENCHMARKS.md: the call cost
at a 150 ms endpoint with the lane grown is within noise of the serial one). What
threads cost then is memory and a start-up (≈60 µs), both bounded here by the cap and
the idle exit; a selector loop would add a dependency (h11) and our own HTTP client
(TLS, proxies, deadlines) to save neither.

Durations are seconds; the clock is ``time.monotonic``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, List, Optional, Protocol, Sized, Tuple

from ._lane import HOLD, MIN_WAIT, NETWORK_BOUND, STEP_GAIN, Lane
from ._outcome import internal_error
from ._process import PROCESS
from ._transport import Attempt, Transport, send_splitting
from .errors import DeliveryError

__all__ = [
    "HOLD",
    "MIN_WAIT",
    "NETWORK_BOUND",
    "STEP_GAIN",
    "Engine",
    "Held",
    "Lane",
    "deliver",
    "engine",
    "settle",
    "take_batch",
]

#: Sender threads per process, every client (or uploader source) together.
MAX_THREADS = 16
#: Seconds a sender thread waits for work before it exits.
IDLE_EXIT = 5.0


@dataclasses.dataclass(eq=False)  # identity: a batch in flight is tracked in a set
class Held:
    """A batch: ``retries`` made so far, since ``first_failed`` (0.0: never failed)."""

    items: List[Any]  # payloads (direct mode) or ring records (the uploader)
    retries: int = 0
    first_failed: float = 0.0


def take_batch(
    queue: Deque[Any], count: int, room: int, size: Callable[[Any], int] = len
) -> Tuple[List[Any], int]:
    """THE batcher: pop the next batch off ``queue``, at most ``count`` items and
    ``room`` bytes (each item costs ``size(item)`` plus a comma). Returns it and its
    bytes. The first item is always taken (an oversize one was refused at ``put``)."""
    batch: List[Any] = []
    used = 0
    while queue and len(batch) < count:
        item_size = size(queue[0]) + 1
        if batch and used + item_size > room:
            break
        batch.append(queue.popleft())
        used += item_size
    return batch, used


Outcome = List[Tuple[List[Any], Attempt]]


def deliver(
    transport: Transport, payloads: Callable[[List[Any]], List[bytes]], job: Held, deadline: Optional[float]
) -> Tuple[Outcome, float, float]:
    """Send ``job`` (one request; split when the endpoint refuses its content).
    Returns each part with its outcome, in order, and the wall and thread-CPU seconds
    it took. A bug here is an internal error of the whole batch, never a lost batch."""
    wall, cpu = time.monotonic(), time.thread_time()
    try:
        outcome = send_splitting(lambda part: transport.post(payloads(part), deadline), job.items)
    except Exception as exc:  # noqa: BLE001 - settled as an internal error, never lost
        outcome = [(job.items, Attempt(internal_error("sending a batch", exc), 0, 0))]
    return outcome, time.monotonic() - wall, time.thread_time() - cpu


@dataclasses.dataclass
class Settled:
    """What one finished request comes to, for the feeder to account for."""

    delivered: List[List[Any]]  # parts acknowledged
    losses: List[Tuple[DeliveryError, List[Any]]]  # parts given up: final answer or a limit
    retry: List[Held]  # parts kept for the next probe, oldest first
    requests: int
    error: Optional[DeliveryError] = None  # the retryable error that made parts held
    pause: float = 0.0  # seconds until the next probe, when parts are held


def settle(lane: Lane, job: Held, outcome: Outcome, backlog: bool, wall: float, cpu: float) -> Settled:
    """THE settle path: split a request's outcome into what was delivered, given up
    and held, under the one give-up rule (``lane.policy``), and update the lane."""
    result = Settled([], [], [], 0)
    retry: Optional[Attempt] = None
    now = time.monotonic()
    for part, attempt in outcome:
        result.requests += attempt.requests
        if attempt.error is None:
            result.delivered.append(part)
        elif attempt.error.final:
            result.losses.append((attempt.error, part))
        else:
            retry = attempt
            result.retry.append(Held(part, job.retries + 1, job.first_failed or now))
    if retry is not None and retry.error is not None:
        result.error = retry.error
        result.pause = lane.failed(job.retries + 1, retry.retry_after)
        kept = []
        for held in result.retry:
            if lane.policy.gives_up(held.retries, held.first_failed, now + result.pause):
                result.losses.append((retry.error, held.items))
            else:
                kept.append(held)
        result.retry = kept
    elif result.delivered:
        events = sum(len(part) for part in result.delivered)
        lane.succeeded(backlog, events, wall, cpu)
    else:
        lane.finished()
    return result


# -- the process's sender threads ----------------------------------------------------------


class Feeder(Protocol):
    """What the engine needs from a direct-mode sink."""

    def next_job(self, now: float) -> Tuple[Optional[Callable[[], None]], Optional[float]]:
        """A job that may start now (already counted as started), and the seconds
        until another may (0: now; ``math.inf``: when a request finishes); ``None``
        for the wait when the feeder holds nothing at all."""

    def rest(self) -> None:
        """Close idle sockets (no sender thread is left to reuse them)."""


class Engine:
    """This process's sender threads (see the module docstring). Get it with
    :func:`engine`; a forked child gets its own."""

    def __init__(self, max_threads: int = MAX_THREADS) -> None:
        self.max_threads = max_threads
        self.pid = os.getpid()
        self._cond = threading.Condition(threading.Lock())
        self._feeders: List[Feeder] = []  # those holding work, in turn
        self._served: List[Feeder] = []  # those served since the last thread exit
        self._jobs: Deque[Callable[[], None]] = deque()  # submitted by the uploader
        self._turn = 0
        self.threads = 0
        self._waiting = 0
        self.peak_threads = 0
        self._retiring = 0  # retire() calls in progress: threads leave instead of waiting
        self._started: List[threading.Thread] = []  # joined by retire()

    def activate(self, feeder: Feeder) -> bool:
        """``feeder`` has work: make sure a thread will ask it. False if no thread can
        run in this process (the caller then sends on its own thread)."""
        with self._cond:
            if feeder not in self._feeders:
                self._feeders.append(feeder)
                if feeder not in self._served:
                    self._served.append(feeder)
            thread = self._wake_locked()
            ok = self.threads > 0
        return self._start(thread) if thread is not None else ok

    def submit(self, job: Callable[[], None]) -> bool:
        """Run ``job`` on a sender thread; False if none can run (run it inline)."""
        with self._cond:
            self._jobs.append(job)
            thread = self._wake_locked()
            if thread is None and self.threads == 0:
                self._jobs.pop()
                return False
        if thread is not None and not self._start(thread):
            with self._cond:
                if job in self._jobs and self.threads == 0:
                    self._jobs.remove(job)
                    return False
        return True

    def _wake_locked(self) -> Optional[threading.Thread]:
        """Wake a waiting thread, else claim a new one (started by the caller, after
        every lock is released: under gevent ``start()`` switches to the new thread)."""
        if self._waiting:
            self._cond.notify()
            return None
        if self.threads >= self.max_threads or not PROCESS.may_start_thread():
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
                return job, 0.0 if (after == 0 or len(self._feeders) > 1) else math.inf, True
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
                extra = self._wake_locked() if wait == 0 else None
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
                self._leave_locked()
                return
            timeout = min(wait, IDLE_EXIT) if holding and last else min(wait, IDLE_EXIT - idle)
            self._waiting += 1
            self._cond.wait(max(0.0, timeout))
            self._waiting -= 1

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


def backlogged(queue: Sized, upload_size: int) -> bool:
    """A full batch is still waiting."""
    return len(queue) >= upload_size
