"""Outcomes and losses: the one place that decides and accounts for what happened.

* :func:`classify_status` / :func:`classify_exception`: every answer or failure of a
  request is ``success``, ``retry`` or ``final``, for every mode (direct, sync and the
  shared uploader). Any 2xx is success; 408, 429 and 5xx (but 501 and 505, which a
  retry cannot change) are retried, as are timeouts and connection failures; 3xx (the
  API does not redirect), every other 4xx, invalid URLs and unexpected exceptions are
  final.
* :class:`Ledger`: a client's counters. Every event given up, whatever the mode and
  the reason, goes through :meth:`Ledger.lost`, which counts it by reason (one of
  :data:`DROP_REASONS`), logs (rate-limited: a failing network cannot flood logs)
  and calls the user's ``on_error`` (whatever it raises is caught and logged).
* :func:`internal_error`: an unexpected exception inside cdpmp is logged at WARNING
  with its traceback on the ``cdpmp.internal`` logger and counted; the test suite
  fails when one is logged.
* :class:`Stats`: the declared shape of ``Client.stats()``.

Log lines never contain payloads or the write key.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Dict, List, Literal, Optional, Tuple, TypedDict, Union

import orjson

from ._options import OnError
from .errors import APIError, DeliveryError, InternalError, MessageRejected, ShutdownAbandoned

logger = logging.getLogger("cdpmp")
internal_logger = logging.getLogger("cdpmp.internal")

Verdict = Literal["success", "retry", "final"]
DropReason = Literal["queue_full", "oversize", "unserializable", "shutdown", "rejected", "undeliverable"]
#: Why an event was given up: refused at the call (queue_full, oversize,
#: unserializable), still queued at a shutdown deadline (shutdown), refused by the
#: endpoint with a final answer (rejected), or out of retries/budget (undeliverable).
DROP_REASONS: Tuple[DropReason, ...] = (
    "queue_full",
    "oversize",
    "unserializable",
    "shutdown",
    "rejected",
    "undeliverable",
)
_FINAL_5XX = frozenset({501, 505})


def classify_status(status: int) -> Verdict:
    """The one response policy (see the module docstring)."""
    if 200 <= status < 300:
        return "success"
    if status in (408, 429) or (500 <= status < 600 and status not in _FINAL_5XX):
        return "retry"
    return "final"


def _retryable_exceptions() -> Tuple[type, ...]:
    # Imported on the first failure, not with cdpmp: see client.Client._make_sink.
    from urllib3 import exceptions

    return (
        exceptions.TimeoutError,
        exceptions.ProtocolError,
        exceptions.NewConnectionError,
        exceptions.ProxyError,
        exceptions.SSLError,
        exceptions.MaxRetryError,
        OSError,
    )


def classify_exception(exc: BaseException) -> Verdict:
    """Timeouts and connection failures are retried; an invalid URL or anything
    unexpected is final (retrying a programming error only hides it)."""
    if isinstance(exc, _retryable_exceptions()):
        return "retry"
    return "final"


def loss_reason(error: DeliveryError) -> DropReason:
    """The counter an undelivered batch is charged to."""
    if isinstance(error, MessageRejected) and error.reason in DROP_REASONS:
        return error.reason
    if isinstance(error, ShutdownAbandoned):
        return "shutdown"
    if isinstance(error, APIError) and error.final:
        return "rejected"
    return "undeliverable"


class HostStats(TypedDict):
    """Host-wide counters of shared mode (the ring header), as ``cdpmp stats``."""

    accepted: int
    queue_full: int
    sent: int
    failed: int
    batches: int
    requests: int
    retries: int
    dead_lettered: int
    spawns: int
    corrupt: int
    unknown_source: int
    dead_letter_overflow: int
    depth: int
    bytes_used: int
    capacity: int
    max_count: int
    sources: List[Dict[str, Any]]  # per source: id (hex), depth, limit (its max_queue_size)
    uploader_pid: Optional[int]
    heartbeat_age: Optional[float]
    last_error: Optional[str]


class Stats(TypedDict):
    """``Client.stats()``: this client in this process (docs/observability.md, field by field)."""

    mode: str
    pid: int
    queued: int
    sent: int
    failed: int
    batches: int
    requests: int
    retries: int
    dropped: Dict[str, int]
    depth: int
    inherited_discarded: int
    internal_errors: int
    last_error: Optional[str]
    host: Optional[HostStats]


class RateLimitedLog:
    """At most one line per ``key`` every ``interval`` seconds; counts the rest."""

    def __init__(self, interval: float = 30.0, log: logging.Logger = logger) -> None:
        self.interval = interval
        self._log = log
        self._last: Dict[str, float] = {}
        self._suppressed: Dict[str, int] = {}

    def warning(self, key: str, message: str, *args: object, exc_info: Any = False) -> None:
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
        self._log.warning(message, *args, exc_info=exc_info)


_internal = {"count": 0, "pid": os.getpid()}
_internal_log = RateLimitedLog(log=internal_logger)
INTERNAL_MARK = "cdpmp internal error"


def internal_error(where: str, exc: BaseException) -> InternalError:
    """Log an unexpected exception (WARNING, traceback, rate-limited per ``where``),
    count it, and return the error to report for the events it cost."""
    if _internal["pid"] != os.getpid():
        _internal.update(count=0, pid=os.getpid())
    _internal["count"] += 1
    _internal_log.warning(where, "%s in %s: %s", INTERNAL_MARK, where, type(exc).__name__, exc_info=exc)
    return InternalError(f"unexpected {type(exc).__name__} in {where}")


def internal_errors() -> int:
    """Internal errors logged in this process."""
    return _internal["count"] if _internal["pid"] == os.getpid() else 0


Batch = List[Union[bytes, Dict[str, Any]]]


class Ledger:
    """One client's counters, and the only path by which an event is given up."""

    def __init__(self, on_error: Optional[OnError], key_refused: str = "") -> None:
        self.on_error = on_error
        #: The line said once when the endpoint refuses the write key (a 401): what was
        #: sent where, and what to check (never the key itself).
        self.key_refused = key_refused or "cdpmp: the write key was refused (%s); check the key"
        self.log = RateLimitedLog()
        self.reset()

    def reset(self) -> None:
        """Forget everything (a forked child's stats describe the child)."""
        self.lock = threading.Lock()
        self.queued = 0  # the hot path bumps it under the sink's own lock
        self.sent = 0
        self.batches = 0
        self.requests = 0
        self.retries = 0
        self.dropped: Dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        #: Events given up after they were accepted (what ``flush()`` answers for).
        self.given_up = 0
        self.inherited_discarded = 0
        self.last_error: Optional[str] = None
        self._reported = 0  # losses already summed up by report_losses()
        self._key_refusal_said = False
        self._answered = 0  # given_up when flush() last answered (:meth:`given_up_since`)

    def report_losses(self) -> None:
        """One WARNING for this client if its losses grew since the last report (an
        explicit ``shutdown()``; the exit path reports the whole process instead)."""
        report_losses([self], "a client of process %d has given up %d event(s) (%s)")

    def grew(self) -> bool:
        """Whether losses grew since the last report; they now count as reported."""
        with self.lock:
            total = sum(self.dropped.values())
            if total <= self._reported:
                return False
            self._reported = total
            return True

    def given_up_since(self) -> int:
        """Events given up after being accepted since the previous call (what
        ``flush()`` answers for: each call starts a new window)."""
        with self.lock:
            n, self._answered = self.given_up - self._answered, self.given_up
        return n

    def answer(self, call: str, drained: bool) -> bool:
        """``flush()``'s and ``shutdown()``'s result: ``drained`` and nothing given up
        since the previous answer; one line (rate-limited) says why not."""
        lost = self.given_up_since()
        if lost:
            self.log.warning(
                "answer",
                "cdpmp: %s() returns False: %d event(s) accepted before it were given up",
                call,
                lost,
            )
        elif not drained:
            self.log.warning("answer", "cdpmp: %s() returns False: events still queued at its deadline", call)
        return drained and not lost

    def delivered(self, count: int) -> None:
        with self.lock:
            self.sent += count
            self.batches += 1

    def attempts(self, requests: int, retries: int) -> None:
        with self.lock:
            self.requests += requests
            self.retries += retries

    def lost(
        self,
        error: DeliveryError,
        batch: Batch,
        reason: Optional[DropReason] = None,
        events: Optional[int] = None,
        told: bool = False,
    ) -> None:
        """Count, log and report events given up. ``batch`` holds messages, as dicts
        or as their serialised bytes (decoded only if ``on_error`` wants them);
        ``events``: how many were given up when not all of them are in ``batch``;
        ``told``: the call was answered ``(False, msg)`` (not owed by ``flush()``)."""
        why = loss_reason(error) if reason is None else reason
        n = len(batch) if events is None else events
        with self.lock:
            self.dropped[why] += n
            if not told:  # the call itself answered (False, msg): flush() owes nothing for it
                self.given_up += n
            self.last_error = str(error)
            first_key_refusal = not self._key_refusal_said and _key_refused(error)
            self._key_refusal_said = self._key_refusal_said or first_key_refusal
        if first_key_refusal:  # once per client: the key will not fix itself
            logger.warning(self.key_refused, error)
        self.log.warning(why, "cdpmp: %d event(s) given up (%s): %s; see stats()['dropped']", n, why, error)
        if not self.on_error:
            return
        try:
            messages = [orjson.loads(m) if isinstance(m, bytes) else m for m in batch]
            self.on_error(error, messages)
        except Exception:
            self.log.warning("on_error", "cdpmp: the on_error callback raised", exc_info=True)

    def snapshot(self, mode: str, depth: int, host: Optional[HostStats]) -> Stats:
        with self.lock:
            dropped = dict(self.dropped)
            return Stats(
                mode=mode,
                pid=os.getpid(),
                queued=self.queued,
                sent=self.sent,
                failed=dropped["rejected"] + dropped["undeliverable"],
                batches=self.batches,
                requests=self.requests,
                retries=self.retries,
                dropped=dropped,
                depth=depth,
                inherited_discarded=self.inherited_discarded,
                internal_errors=internal_errors(),
                last_error=self.last_error,
                host=host,
            )


def _key_refused(error: DeliveryError) -> bool:
    return isinstance(error, APIError) and error.status == 401


def report_losses(ledgers: List[Ledger], line: str = "process %d gave up %d event(s) in total (%s)") -> None:
    """ONE WARNING for ``ledgers`` together (their totals by reason) when any of them
    lost events since it was last reported: at exit, every client of the process in
    one line (two clients once printed two lines, each claiming the process's total)."""
    if not [ledger for ledger in ledgers if ledger.grew()]:  # every one asked: all marked
        return
    totals: Dict[str, int] = {}
    for ledger in ledgers:
        with ledger.lock:
            for why, n in ledger.dropped.items():
                totals[why] = totals.get(why, 0) + n
    reasons = ", ".join(f"{n} {why}" for why, n in totals.items() if n)
    logger.warning("cdpmp: " + line + "; see stats()['dropped']", os.getpid(), sum(totals.values()), reasons)
