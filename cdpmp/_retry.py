"""The retry policy: how long to wait before a retry. No I/O here.

Immutable (urllib3's ``Retry`` is the model): ``delay(attempt, retry_after)`` computes
the wait before retry number ``attempt`` (1-based) as capped exponential backoff with
full jitter, or the server's ``Retry-After`` capped at ``max_retry_after``. The caller
owns the clock and the per-batch time budget (``budget``): a retry whose wait would
overrun it is not made. Durations are seconds.

Which outcomes are retried is decided in one place, :mod:`cdpmp._outcome`.
"""

from __future__ import annotations

import dataclasses
import email.utils
import random
import time
from typing import Callable, Optional


def parse_retry_after(raw: Optional[str]) -> Optional[float]:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP date)."""
    if not raw:
        return None
    raw = raw.strip()
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


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

    def delay(self, attempt: int, retry_after: Optional[float] = None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_retry_after)
        ceiling = min(self.backoff_cap, self.backoff_base * (2 ** (attempt - 1)))
        # Full jitter keeps N workers that failed together from retrying together.
        return float(ceiling * (0.5 + 0.5 * self.rand()))

    def allows(self, attempt: int) -> bool:
        return self.max_retries is None or attempt <= self.max_retries
