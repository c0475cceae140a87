"""The delivery engine shared by direct mode and the shared uploader.

A real endpoint is 30–200 ms away, so one request at a time caps a sender at
``upload_size / round trip`` events per second (≈1,000/s at 100 ms with the default
batch of 100). The engine keeps several requests in flight when there is a backlog,
and holds what the endpoint cannot take yet. Its parts:

* :class:`Lane`: one endpoint's delivery state. Its in-flight limit adapts: +1 after
  a success that left a backlog, −1 after one that did not (at least 1, at most
  ``max_in_flight``), halved by a retryable failure. While the endpoint fails the lane
  sends ONE probe at a time, after a capped, jittered backoff (``Retry-After``
  honoured), and returns to concurrency when a probe succeeds. Final answers say
  nothing about the endpoint's health and leave the lane alone.
* :class:`Workers`: daemon sender threads, started only when a lane grows past one
  request in flight (a process that never has a backlog never starts one).
* :class:`Held`: a batch the endpoint answered with a retryable error. It is kept,
  not dropped, until it is delivered, a final answer refuses it, the exit deadline
  passes, or a user-set limit (``max_retries``, ``retry_budget``) gives it up.
* :func:`deliver`: one request per batch (split when the endpoint refuses its
  content), through :meth:`cdpmp._transport.Transport.post`, with a total deadline.

The engine does no accounting: callers (``DirectSink``, the uploader) decide what an
outcome means for their queue or ring and report losses through their ledger.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Any, Callable, Deque, List, Optional, Tuple

from ._options import Settings
from ._outcome import internal_error
from ._process import PROCESS
from ._retry import RetryPolicy
from ._transport import Attempt, Transport, send_splitting
from .errors import DeliveryError

#: Backoff between probes of a failing endpoint: from 0.25 s, doubling, capped at 8 s
#: with full jitter (so N processes that failed together do not probe together).
PROBE_POLICY = RetryPolicy(backoff_base=0.25, backoff_cap=8.0, max_retry_after=30.0)


class Lane:
    """Adaptive in-flight limit and backoff for one endpoint (see the module docstring).

    Not locked: each caller mutates it under its own lock (direct mode) or from one
    thread (the uploader's loop).
    """

    def __init__(self, max_in_flight: int, policy: RetryPolicy = PROBE_POLICY) -> None:
        self.max_in_flight = max_in_flight
        self.policy = policy
        self.limit = 1
        self.in_flight = 0
        self.failures = 0
        self.resume_at = 0.0

    def slots(self, now: float) -> int:
        """Requests that may start now."""
        if now < self.resume_at:
            return 0
        cap = 1 if self.failures else self.limit
        return max(0, cap - self.in_flight)

    def wait(self, now: float) -> float:
        """Seconds until the next probe may start (0 when it may start now)."""
        return max(0.0, self.resume_at - now)

    def started(self) -> None:
        self.in_flight += 1

    def succeeded(self, backlog: bool) -> None:
        self.in_flight -= 1
        self.failures = 0
        self.resume_at = 0.0
        if backlog:
            self.limit = min(self.max_in_flight, self.limit + 1)
        elif self.in_flight == 0:
            self.limit = max(1, self.limit - 1)

    def failed(self, retry_after: Optional[float]) -> float:
        """A retryable failure: back off; returns the pause before the next probe."""
        self.in_flight -= 1
        self.failures += 1
        self.limit = max(1, self.limit // 2)
        pause = self.policy.delay(self.failures, retry_after)
        self.resume_at = max(self.resume_at, time.monotonic() + pause)
        return pause

    def finished(self) -> None:
        """A final answer: the endpoint is up; the batch's fate is the caller's."""
        self.in_flight -= 1


@dataclasses.dataclass(eq=False)  # identity: a batch in flight is tracked in a set
class Held:
    """A batch kept after retryable failures: ``retries`` so far, since ``first_failed``."""

    items: List[Any]  # payloads (direct mode) or ring records (the uploader)
    retries: int
    first_failed: float

    def exhausted(self, settings: Settings, pause: float) -> bool:
        """True when a user-set limit gives this batch up (the next retry, ``pause``
        seconds from now, would exceed ``max_retries`` or ``retry_budget``)."""
        if settings.max_retries is not None and self.retries > settings.max_retries:
            return True
        budget = settings.retry_budget
        return budget is not None and time.monotonic() + pause - self.first_failed > budget


class Workers:
    """Daemon threads that run delivery jobs; one more is started whenever every
    thread is busy, up to ``size``."""

    def __init__(self, size: int, name: str) -> None:
        self.size = size
        self.name = name
        self._jobs: queue.SimpleQueue[Optional[Callable[[], None]]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._busy = 0  # jobs submitted and not finished

    def submit(self, job: Callable[[], None]) -> bool:
        """Queue ``job``; False if no thread can run it (the caller runs it inline)."""
        with self._lock:
            if self._busy >= self._threads and self._threads < self.size and PROCESS.may_start_thread():
                try:
                    threading.Thread(target=self._run, name=self.name, daemon=True).start()
                    self._threads += 1
                except RuntimeError:  # interpreter shutting down: run on what we have
                    pass
            if self._threads == 0:
                return False
            self._busy += 1
        self._jobs.put(job)
        return True

    def close(self) -> None:
        """Let every thread exit once the queued jobs are done."""
        with self._lock:
            threads, self._threads = self._threads, 0
        for _ in range(threads):
            self._jobs.put(None)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job()
            except Exception as exc:  # noqa: BLE001 - a job's bug must not kill the thread
                internal_error(self.name, exc)
            finally:
                with self._lock:
                    self._busy -= 1


Outcome = List[Tuple[List[Any], Attempt]]


def deliver(
    transport: Transport,
    payloads: Callable[[List[Any]], List[bytes]],
    items: List[Any],
    deadline: Optional[float],
) -> Outcome:
    """One request for ``items`` (split when the endpoint refuses their content);
    each part with its outcome, in order."""
    return send_splitting(lambda part: transport.post(payloads(part), deadline), items)


def take_batch(queue: Deque[bytes], count: int, room: int) -> Tuple[List[bytes], int]:
    """Pop the next batch off ``queue``: at most ``count`` messages and ``room``
    bytes (each message costs its length plus a comma). Returns it and its bytes."""
    batch: List[bytes] = []
    size = 0
    while queue and len(batch) < count:
        item_size = len(queue[0]) + 1
        if batch and size + item_size > room:
            break
        batch.append(queue.popleft())
        size += item_size
    return batch, size


def partition(
    outcome: Outcome,
) -> Tuple[int, int, List[Tuple[DeliveryError, List[bytes]]], List[List[bytes]], Optional[Attempt]]:
    """Split a batch's outcome: (delivered count, requests, final losses, parts to
    hold for a retry, the retryable attempt that made them held or None)."""
    delivered = requests = 0
    losses: List[Tuple[DeliveryError, List[bytes]]] = []
    kept: List[List[bytes]] = []
    retry: Optional[Attempt] = None
    for part, attempt in outcome:
        requests += attempt.requests
        if attempt.error is None:
            delivered += len(part)
        elif attempt.error.final:
            losses.append((attempt.error, part))
        else:
            retry = attempt
            kept.append(part)
    return delivered, requests, losses, kept, retry
