"""Network conditions the collector plays: latency with jitter, outages, fault rate.

A real region endpoint is 30–200 ms away, has outages and sometimes answers 5xx for
minutes; these values let :class:`cdpmp.testing.Collector` (and ``cdpmp collector``)
behave so, for cdpmp's tests and benchmarks and for users' own.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple


@dataclasses.dataclass(frozen=True)
class Outage:
    """From ``start`` to ``end`` seconds after the conditions were set, every request
    is answered ``status`` without being processed, or its connection is dropped
    (``status`` None)."""

    start: float
    end: float
    status: Optional[int] = 503

    @classmethod
    def parse(cls, text: str) -> Outage:
        """``START:END:STATUS`` or ``START:END:drop`` (the ``--outage`` syntax)."""
        parts = text.split(":")
        if len(parts) != 3:
            raise ValueError(f"outage {text!r} is not START:END:STATUS or START:END:drop")
        start, end = float(parts[0]), float(parts[1])
        if not 0 <= start < end:
            raise ValueError(f"outage {text!r}: need 0 <= START < END")
        status = None if parts[2] == "drop" else int(parts[2])
        if status is not None and not 100 <= status <= 599:
            raise ValueError(f"outage {text!r}: status must be 100..599 or 'drop'")
        return cls(start, end, status)


@dataclasses.dataclass(frozen=True)
class Conditions:
    """The network between a client and the endpoint, as the collector plays it.

    Every answer waits ``latency`` plus a uniform ``0..jitter`` seconds (a round trip
    to a real region is 30–200 ms); the connection threads of the collector wait in
    parallel, as a real endpoint's would. ``outages`` are windows of time; outside
    them each request fails with ``fault_status`` with probability ``fault_rate``
    (unprocessed, so a correct client resends it). Scripted faults go first.
    """

    latency: float = 0.0
    jitter: float = 0.0
    outages: Tuple[Outage, ...] = ()
    fault_rate: float = 0.0
    fault_status: int = 503
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        if self.latency < 0 or self.jitter < 0 or not 0 <= self.fault_rate <= 1:
            raise ValueError("latency and jitter must be >= 0, fault_rate in [0, 1]")
