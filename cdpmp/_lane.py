"""One endpoint's delivery state: the adaptive in-flight limit and the backoff
(:class:`Lane`). The rule it follows, and why, is stated in :mod:`cdpmp._engine`'s
docstring (one lane per direct-mode client, one per uploader source).

Durations are seconds; the clock is ``time.monotonic`` unless a test injects one.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable, Deque, Dict, Optional

from ._retry import RetryPolicy

#: A request is network-bound when its thread's CPU time is at most this share of its
#: wall time (the rest was spent waiting for the endpoint).
NETWORK_BOUND = 0.1
#: Seconds a request must wait on the network (smoothed) before concurrency may grow.
MIN_WAIT = 0.005
#: A step up is kept only if the request it added carries at least this share of what
#: each request of the level below carried.
STEP_GAIN = 0.5
#: Seconds a level that did not pay off is not tried again.
HOLD = 10.0
_SMOOTHING = 0.3  # weight of the newest sample in the CPU-share average
#: Requests in a row that must each be network-bound before concurrency may grow.
RECENT = 4


class Lane:
    """Adaptive in-flight limit and backoff for one endpoint (the module docstring
    states the rule). ``clock`` is injectable for tests.

    Not locked: each caller mutates it under its own lock (direct mode) or from one
    thread (the uploader's loop).
    """

    def __init__(
        self,
        max_in_flight: int,
        policy: Optional[RetryPolicy] = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_in_flight = max_in_flight
        self.policy = policy or RetryPolicy()
        self.clock = clock
        self.limit = 1
        self.in_flight = 0
        self.failures = 0
        self.resume_at = 0.0
        self.cpu_share = -1.0  # not measured yet
        self.network_wait = 0.0  # seconds a request waits beyond its thread's CPU (smoothed)
        self._rates: Dict[int, float] = {}  # limit -> events/s measured at that level
        self._level_events = 0
        self._level_wall = 0.0
        self._level_done = 0
        self._recent: Deque[float] = deque(maxlen=RECENT)  # the last requests' CPU shares
        self._held_level = 0  # a level that did not pay off...
        self._held_until = 0.0  # ...is not tried again until then

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

    def succeeded(self, backlog: bool, events: int = 0, wall: float = 0.0, cpu: float = 0.0) -> None:
        """A request delivered ``events`` in ``wall`` seconds, its thread spending
        ``cpu`` of them; ``backlog``: a full batch still waits."""
        self.in_flight -= 1
        self.failures = 0
        self.resume_at = 0.0
        if wall > 0:
            share = min(1.0, cpu / wall)
            self._recent.append(share)
            if self.cpu_share < 0:
                self.cpu_share, self.network_wait = share, wall - cpu
            self.cpu_share += _SMOOTHING * (share - self.cpu_share)
            self.network_wait += _SMOOTHING * (wall - cpu - self.network_wait)
        now = self.clock()
        self._level_events += events
        self._level_wall += wall
        self._level_done += 1
        measured = self._level_done > self.limit and self._level_wall > 0
        if measured:  # Little's law: concurrency × events per request / time per request
            self._rates[self.limit] = self.limit * self._level_events / self._level_wall
        below = self._rates.get(self.limit - 1)
        if self.limit > 1 and self.cpu_share > NETWORK_BOUND:
            self._step(-1, now)  # CPU-bound: more threads only take the GIL
        elif not backlog:
            if self.limit - self.in_flight > 1:
                self._step(-1, now)  # a slot stands unused: the last step adds nothing
        elif measured and below and self._rates[self.limit] < below * (1 + STEP_GAIN / (self.limit - 1)):
            self._held_level, self._held_until = self.limit, now + HOLD
            self._step(-1, now)  # the step did not pay off
        elif (
            measured
            and 0 <= self.cpu_share <= NETWORK_BOUND
            # Each of the last RECENT requests, not only the average: a few requests
            # stalled behind the GIL or the scheduler (an endpoint in the caller's
            # process, a loaded machine) look network-bound; real round trips all do.
            and max(self._recent) <= NETWORK_BOUND
            and self.network_wait >= MIN_WAIT
            and self.limit < self.max_in_flight
            and not (self.limit + 1 >= self._held_level and now < self._held_until)
        ):
            self._step(+1, now)

    def _step(self, by: int, now: float) -> None:
        self.limit = max(1, min(self.max_in_flight, self.limit + by))
        self._level_events, self._level_wall, self._level_done = 0, 0.0, 0

    def failed(self, retries: int, retry_after: Optional[float]) -> float:
        """Retry number ``retries`` of a batch failed retryably: back off; returns
        the pause before the next probe (the policy's backoff, or a longer
        ``Retry-After``)."""
        self.in_flight -= 1
        self.failures += 1
        self._rates.clear()  # the endpoint changed: measure again when it is back
        self._step(0, self.clock())
        self.limit = max(1, self.limit // 2)
        pause = self.policy.delay(max(retries, self.failures), retry_after)
        self.resume_at = max(self.resume_at, self.clock() + pause)
        return pause

    def finished(self) -> None:
        """A final answer: the endpoint is up; the batch's fate is the caller's."""
        self.in_flight -= 1


class RequestRate:
    """A token bucket: at most ``rate`` requests per second on average, in bursts of
    at most ``burst`` (default: a tenth of a second's worth, at least one). The
    shared-mode uploader holds one for all the sources of a host, so that a host stays
    under its share of the workspace's rate limit (3,000 requests per 3 s, answered
    with 429 past it) however many sources and workers it serves."""

    def __init__(
        self, rate: float, burst: Optional[float] = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = max(1.0, rate / 10 if burst is None else burst)
        self._clock = clock
        self._tokens = self.burst
        self._at = clock()

    def _refill(self) -> float:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        return self._tokens

    def take(self) -> bool:
        """Spend one request if the bucket allows it now."""
        if self._refill() < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def wait(self) -> float:
        """Seconds until the next request is allowed (0: now)."""
        return max(0.0, (1.0 - self._refill()) / self.rate)
