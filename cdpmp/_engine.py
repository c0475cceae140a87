"""The delivery engine's rules: one per process, shared by every direct-mode client of
the process and by the shared-mode uploader. Sinks and the uploader are thin feeders of it.

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
* the process's sender threads that run these requests (:mod:`cdpmp._senders`): at
  most one more than the lanes use, woken only when a job may start.
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
import time
from typing import Any, Callable, Deque, List, Optional, Sized, Tuple

from ._lane import HOLD, MIN_WAIT, NETWORK_BOUND, STEP_GAIN, Lane
from ._option_table import Settings
from ._outcome import internal_error
from ._transport import ENVELOPE_BYTES, MAX_BATCH_BYTES, Attempt, Transport, send_splitting
from .errors import DeliveryError

__all__ = [
    "HOLD",
    "MIN_WAIT",
    "NETWORK_BOUND",
    "STEP_GAIN",
    "Held",
    "Lane",
    "deliver",
    "settle",
    "take_batch",
]


@dataclasses.dataclass(eq=False)  # identity: a batch in flight is tracked in a set
class Held:
    """A batch: ``retries`` made so far, since ``first_failed`` (0.0: never failed)."""

    items: List[Any]  # payloads (direct mode) or ring records (the uploader)
    retries: int = 0
    first_failed: float = 0.0


#: Bytes of events one request carries: the body's limit less its envelope.
BATCH_ROOM = MAX_BATCH_BYTES - ENVELOPE_BYTES


def due(events: int, cut: bool, waited: float, settings: Settings) -> bool:
    """THE rule for when a batch is due, beside the batcher: it is full (``upload_size``
    events, or ``cut``: the request's room leaves events behind) or its oldest event
    has waited ``upload_interval`` seconds. Direct mode asks before taking a batch (its
    queue's count, and bytes past :data:`BATCH_ROOM`), the uploader after taking one
    (whether the batcher left events behind). A flush, a stop or a drain sends anyway."""
    return events >= settings.upload_size or cut or waited >= settings.upload_interval


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


def backlogged(queue: Sized, upload_size: int) -> bool:
    """A full batch is still waiting."""
    return len(queue) >= upload_size
