"""Counters and error reporting shared by the client and its sinks.

``Counters`` are cheap integers bumped under one lock (the hot path bumps ``queued``
inside the sink's own lock instead). ``Reporter`` is the only place that calls the
user's ``on_error``: it decodes the batch, catches whatever the callback raises (the
official client's consumer died when it raised) and rate-limits the log lines, so a
failing network cannot flood logs. Log lines never contain payloads or the key.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Dict, List, Optional

import orjson

from ._settings import OnError

logger = logging.getLogger("cdpmp")

DROP_REASONS = ("queue_full", "oversize", "unserializable", "shutdown")


class Counters:
    """Per-process delivery counters; ``snapshot()`` is what ``stats()`` returns."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.lock = threading.Lock()
        self.queued = 0
        self.sent = 0
        self.failed = 0
        self.batches = 0
        self.dropped: Dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        self.inherited_discarded = 0

    def drop(self, reason: str, count: int = 1) -> None:
        with self.lock:
            self.dropped[reason] = self.dropped.get(reason, 0) + count

    def delivered(self, count: int) -> None:
        with self.lock:
            self.sent += count
            self.batches += 1

    def fail(self, count: int) -> None:
        with self.lock:
            self.failed += count

    def snapshot(self) -> Dict[str, Any]:
        with self.lock:
            return {
                "queued": self.queued,
                "sent": self.sent,
                "failed": self.failed,
                "batches": self.batches,
                "dropped": dict(self.dropped),
                "inherited_discarded": self.inherited_discarded,
            }


class RateLimitedLog:
    """At most one line per ``key`` every ``interval`` seconds; counts the rest."""

    def __init__(self, interval: float = 30.0) -> None:
        self.interval = interval
        self._last: Dict[str, float] = {}
        self._suppressed: Dict[str, int] = {}

    def warning(self, key: str, message: str, *args: object, exc_info: bool = False) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last[key] = now
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            message += " (%d similar suppressed)"
            args = (*args, suppressed)
        logger.warning(message, *args, exc_info=exc_info)


class Reporter:
    """Routes delivery failures and rejections to the log and to ``on_error``."""

    def __init__(self, on_error: Optional[OnError]) -> None:
        self.on_error = on_error
        self.log = RateLimitedLog()
        self.last_error: Optional[str] = None

    def report(self, error: Exception, batch: List[Dict[str, Any]]) -> None:
        self.last_error = str(error)
        self.log.warning(type(error).__name__, "cdpmp: %d message(s) not delivered: %s", len(batch), error)
        if self.on_error is None:
            return
        try:
            self.on_error(error, batch)
        except Exception:
            self.log.warning("on_error", "cdpmp: on_error callback raised", exc_info=True)

    def report_encoded(self, error: Exception, batch: List[bytes]) -> None:
        self.report(error, [orjson.loads(item) for item in batch])
