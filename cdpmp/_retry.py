"""The retry policy: how long to wait before a retry. No I/O here.

Immutable (urllib3's ``Retry`` is the model). It answers the two questions every mode
(direct, sync, the shared uploader) asks after a retryable failure, and nothing else
answers them:

* *wait*: ``delay(attempt, retry_after)``, the pause before retry number ``attempt``
  (1-based): capped exponential backoff with half jitter. The endpoint's ``Retry-After``
  may only lengthen it (capped at ``max_retry_after``), never shorten it: gateways answer
  ``Retry-After: 0`` and clocks are skewed, and honouring that literally made one
  process send 22 requests per second to a failing endpoint.
* *retry or give up*: ``gives_up(retries, first_failed, at)``, True when a retry made at
  ``at`` would exceed ``max_retries`` or the ``budget`` counted from the batch's FIRST
  failure (not from its latest one: a batch must not live forever by failing slowly).

The caller owns the clock. Durations are seconds. Which outcomes are retryable is decided
in one place, :mod:`cdpmp._outcome`.
"""

from __future__ import annotations

import dataclasses
import email.utils
import random
import time
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    from ._options import Settings


def parse_retry_after(raw: Optional[str]) -> Optional[float]:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP date)."""
    if not raw:
        return None
    raw = raw.strip()
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
        if seconds <= 0:
            return None  # a date in the past (a skewed clock) says nothing: as if absent
    return seconds if seconds >= 0 and seconds == seconds else None


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Backoff settings. ``max_retries`` counts retries after the first attempt;
    ``None`` (the default of both limits) means no limit."""

    max_retries: Optional[int] = None
    budget: Optional[float] = None
    backoff_base: float = 0.25
    backoff_cap: float = 8.0
    max_retry_after: float = 30.0
    rand: Callable[[], float] = dataclasses.field(default=random.random, compare=False)

    @classmethod
    def of(cls, settings: Settings) -> RetryPolicy:
        """The policy a client's settings ask for (``max_retries``, ``retry_budget``):
        built once, by its transport; the lanes that hold its batches share it."""
        return cls(max_retries=settings.max_retries, budget=settings.retry_budget)

    def delay(self, attempt: int, retry_after: Optional[float] = None) -> float:
        """Seconds before retry number ``attempt``: the backoff, or ``Retry-After`` when
        that is longer (capped at ``max_retry_after``)."""
        ceiling = min(self.backoff_cap, self.backoff_base * (2 ** (max(1, attempt) - 1)))
        # Jitter keeps N workers that failed together from retrying together.
        backoff = float(ceiling * (0.5 + 0.5 * self.rand()))
        if retry_after is None:
            return backoff
        return max(backoff, min(retry_after, self.max_retry_after))

    def gives_up(self, retries: int, first_failed: float, at: float) -> bool:
        """True when retry number ``retries`` of a batch that first failed at
        ``first_failed``, made at ``at`` (both monotonic seconds), exceeds a limit."""
        if self.max_retries is not None and retries > self.max_retries:
            return True
        return self.budget is not None and at - first_failed > self.budget
