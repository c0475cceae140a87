"""The local collector: a real ``/v1/batch`` endpoint on 127.0.0.1 that answers as
Customer.io's Pipelines API does, for tests.

It answers as the API's reference says (:mod:`cdpmp._api`): *permissive* by default
(``200`` to everything it reads; what would not go through is recorded in
:attr:`Collector.dropped` with why, never as delivered), *strict* when a request carries
``X-Strict-Mode: 1`` (400/401 with ``{"meta": {"errors": [...]}}``); the 32 KB message
and 500 KB request limits, the message schema, auth scheme and key, gzip, and the
workspace rate limit (3,000 requests per 3 s by default; 429 over it). ``refuse`` lets
a test say which messages the API refuses. It records every request and every
delivered message, counts duplicates by ``messageId``, and can be scripted with faults
(status sequences, ``Retry-After``, delays, dropped connections). It also plays the
network a real region is behind (:class:`Conditions`): a response latency with jitter,
outages scripted over time (a window answering a status, or dropping connections) and
a per-request fault rate. cdpmp's own tests and benchmarks use it; users get it
through the ``cdp_collector`` pytest fixture and as ``cdpmp collector`` on the command
line (``--latency``, ``--jitter``, ``--outage``, ``--fault-rate``, ``--strict``).

Example::

    with Collector(write_key="test") as collector:
        client = Client("test", endpoint=collector.url)
        client.track(user_id="u1", event="Signed Up")
        client.flush()
        assert collector.wait_for(1) and not collector.dropped
"""

from __future__ import annotations

import collections
import dataclasses
import random
import ssl
import threading
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

from ._api import RATE_LIMIT, Dropped, Refuse, Rules, Verdict
from ._conditions import Conditions, Outage
from ._handler import Fault, QuietServer, RequestRecord, make_handler
from ._schema import (
    MAX_MESSAGE_BYTES,
    MAX_REQUEST_BYTES,
    SchemaError,
    expected_authorization,
    validate_message,
)

__all__ = [
    "MAX_MESSAGE_BYTES",
    "MAX_REQUEST_BYTES",
    "Collector",
    "Conditions",
    "Dropped",
    "Fault",
    "Outage",
    "RequestRecord",
    "SchemaError",
    "expected_authorization",
    "validate_message",
]


class Collector:
    """A ``POST /v1/batch`` server on 127.0.0.1 (ephemeral port by default) that
    answers as the API does (see the module docstring)."""

    def __init__(
        self,
        write_key: str = "test-write-key",
        port: int = 0,
        on_message: Optional[Callable[[Dict[str, Any]], None]] = None,
        strict: bool = True,
        conditions: Optional[Conditions] = None,
        tls: Optional[ssl.SSLContext] = None,
        *,
        strict_mode: Optional[bool] = None,
        refuse: Optional[Refuse] = None,
        rate_limit: Optional[Tuple[int, float]] = RATE_LIMIT,
    ) -> None:
        """``strict=False`` skips the per-message schema and size checks (auth, gzip, the
        request limit and JSON are still checked): for benchmarks, where the collector
        shares the CPU with the clients it measures while a real endpoint would not.
        ``tls``: a server-side context; the collector then speaks HTTPS (as the real
        endpoint does), the handshake made in each connection's own thread.
        ``strict_mode``: None answers as the API (strict only when a request asks);
        True/False answer so whatever it asks. ``refuse(message)``: the reason the API
        refuses a message, or None. ``rate_limit``: (requests, seconds) per workspace,
        None for none."""
        self.write_key = write_key
        self.strict = strict
        self.rules = Rules(write_key, strict_mode, strict, refuse, rate_limit)
        self._on_message = on_message
        self._cond = threading.Condition()
        self._faults: Deque[Fault] = collections.deque()
        self.messages: List[Dict[str, Any]] = []
        self.requests: List[RequestRecord] = []
        #: Messages answered 200 that did not go through (permissive mode), with why.
        self.dropped: List[Dropped] = []
        #: Messages of requests refused with a 4xx (strict mode): their client was told.
        self.refused = 0
        self._counts: Dict[str, int] = collections.Counter()
        self._active = 0
        #: Most requests ever being answered at the same time (a client's concurrency).
        self.peak_concurrency = 0
        self._server = QuietServer(("127.0.0.1", port), make_handler(self))
        self._server.daemon_threads = True
        self.scheme = "http"
        if tls is not None:
            self.scheme = "https"
            self._server.socket = tls.wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False
            )
        self._thread: Optional[threading.Thread] = None
        self.set_conditions(conditions or Conditions())

    def __repr__(self) -> str:  # shown in a failed assertion: what arrived, what did not
        with self._cond:
            return f"<Collector {self.url} delivered={len(self.messages)} dropped={len(self.dropped)}>"

    # -- lifecycle -------------------------------------------------------------------

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def start(self) -> Collector:
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="cdpmp-collector",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5.0)

    def __enter__(self) -> Collector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- scripting and inspection -----------------------------------------------------

    def script(self, faults: Sequence[Fault]) -> None:
        """Answer the next ``len(faults)`` requests with these faults, in order."""
        with self._cond:
            self._faults.extend(faults)

    def set_conditions(self, conditions: Conditions) -> None:
        """Play ``conditions`` from now on; outage windows count from this call."""
        with self._cond:
            self.conditions = conditions
            self._since = time.monotonic()
            self._random = random.Random(conditions.seed)  # noqa: S311 - simulation, not security

    def _network_fault(self) -> Fault:
        """The scripted fault, else what the conditions make of this request."""
        with self._cond:
            if self._faults:
                fault = self._faults.popleft()
                return dataclasses.replace(fault, delay=fault.delay + self._latency_locked())
            cond = self.conditions
            delay = self._latency_locked()
            elapsed = time.monotonic() - self._since
            for outage in cond.outages:
                if outage.start <= elapsed < outage.end:
                    if outage.status is None:
                        return Fault(drop_connection=True, delay=delay)
                    return Fault(status=outage.status, delay=delay)
            if cond.fault_rate and self._random.random() < cond.fault_rate:
                return Fault(status=cond.fault_status, delay=delay)
            return Fault(delay=delay)

    def _latency_locked(self) -> float:
        cond = self.conditions
        return cond.latency + (self._random.uniform(0, cond.jitter) if cond.jitter else 0.0)

    def fail_next(self, count: int, status: int = 503, retry_after: Optional[str] = None) -> None:
        self.script([Fault(status=status, retry_after=retry_after)] * count)

    def wait_for(self, count: int, timeout: float = 10.0) -> bool:
        """Wait until ``count`` messages have been accepted; False at the deadline."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.messages) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def message_ids(self) -> List[str]:
        with self._cond:
            return [m["messageId"] for m in self.messages]

    def unique_ids(self) -> set[str]:
        with self._cond:
            return set(self._counts)

    def duplicates(self) -> Dict[str, int]:
        """messageId → times received, for ids received more than once."""
        with self._cond:
            return {mid: n for mid, n in self._counts.items() if n > 1}

    def dropped_ids(self) -> List[Optional[str]]:
        """The messageIds answered 200 that did not go through (permissive mode)."""
        with self._cond:
            return [d.message_id for d in self.dropped]

    def summary(self) -> Dict[str, Any]:
        """Counts: ``delivered`` went through (``unique`` by messageId); ``dropped``
        were answered 200 and did not (``dropped_reasons``: why); ``refused`` were in
        requests answered 4xx (the client was told)."""
        with self._cond:
            statuses = collections.Counter(r.status for r in self.requests)
            return {
                "messages": len(self.messages),
                "delivered": len(self.messages),
                "dropped": len(self.dropped),
                "dropped_reasons": dict(collections.Counter(d.reason for d in self.dropped)),
                "refused": self.refused,
                "unique": len(self._counts),
                "duplicates": sum(n - 1 for n in self._counts.values()),
                "requests": len(self.requests),
                "statuses": dict(statuses),
                "peak_concurrency": self.peak_concurrency,
                "types": dict(collections.Counter(m["type"] for m in self.messages)),
            }

    def reset(self) -> None:
        with self._cond:
            self.messages.clear()
            self.requests.clear()
            self.dropped.clear()
            self.refused = 0
            self._counts.clear()
            self._faults.clear()
            self.peak_concurrency = 0

    # -- request handling --------------------------------------------------------------

    def _record(
        self, record: RequestRecord, batch: Optional[List[Dict[str, Any]]], verdict: Optional[Verdict] = None
    ) -> None:
        """One request; ``batch``: what it delivered; ``verdict``: what the API made of
        it (its dropped and refused messages count only when ``batch`` is not None or
        the request was refused)."""
        with self._cond:
            self.requests.append(record)
            if verdict is not None:
                self.refused += verdict.refused
                if batch is not None:
                    self.dropped.extend(verdict.dropped)
            if batch:
                self.messages.extend(batch)
                for msg in batch:
                    self._counts[msg["messageId"]] += 1
                self._cond.notify_all()
        if batch and self._on_message is not None:
            for msg in batch:
                self._on_message(msg)
