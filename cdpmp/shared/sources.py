"""The sources an uploader sends for: each one's settings, connection pool and lane.

A source is one client's delivery settings (write key, endpoint and the options that
say how to send: its entry in ``sources.json``, :mod:`.files`; its id is a hash of the
entry, :func:`cdpmp.shared.sink.source_id`). The uploader makes a :class:`Source` the
first time it reads a record of an id it does not know, from the entry its producers
wrote; records of an id with no entry wait as orphans (:mod:`.dispatch`). Each source
has its own transport (pool, retry policy) and lane (how many requests it may have in
flight, its backoff), so a failing endpoint backs off alone.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Dict

from .._lane import Lane
from .._options import Settings, from_source_entry
from .._transport import Transport
from ..errors import CdpmpError
from .files import read_sources

logger = logging.getLogger("cdpmp.uploader")


@dataclasses.dataclass
class Source:
    """One source's delivery state in the uploader."""

    settings: Settings
    transport: Transport
    lane: Lane
    widest: int = 1  # the lane's limit when a request last ended

    def failing(self, now: float) -> bool:
        """Its endpoint failed last, or it backs off."""
        return bool(self.lane.failures) or self.lane.wait(now) > 0

    def ended(self) -> None:
        """A request ended: idle connections beyond a narrowed lane's limit are closed
        (sockets follow the lane, as threads do)."""
        if self.lane.limit < self.widest:
            self.transport.keep_idle(self.lane.limit)
        self.widest = self.lane.limit


def load(directory: str, known: Dict[int, Source]) -> None:
    """Add to ``known`` the sources of ``sources.json`` it does not have yet; an
    invalid entry is skipped, with a line."""
    for key, entry in read_sources(directory).items():
        sid = int(key)
        if sid in known:
            continue
        try:
            settings = from_source_entry(entry)
        except (CdpmpError, TypeError, ValueError):
            logger.warning("cdpmp uploader: ignoring an invalid source entry %s", key)
            continue
        transport = Transport(settings, announce=settings.debug)
        known[sid] = Source(settings, transport, Lane(settings.max_in_flight, transport.policy))
