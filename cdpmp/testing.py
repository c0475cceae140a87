"""The strict local collector: a real ``/v1/batch`` endpoint on 127.0.0.1 for tests.

It checks what the real service checks (auth scheme and key, gzip, the 32 KiB message
and 500 KB request limits, the message schema), records every request and every
accepted message, counts duplicates by ``messageId``, and can be scripted with faults
(status sequences, ``Retry-After``, delays, dropped connections). It also plays the
network a real region is behind (:class:`Conditions`): a response latency with jitter,
outages scripted over time (a window answering a status, or dropping connections) and
a per-request fault rate. cdpmp's own tests and benchmarks use it; users get it
through the ``cdp_collector`` pytest fixture and as ``cdpmp collector`` on the command
line (``--latency``, ``--jitter``, ``--outage``, ``--fault-rate``).

Example::

    with Collector(write_key="test") as collector:
        client = Client("test", endpoint=collector.url)
        client.track(user_id="u1", event="Signed Up")
        client.flush()
        assert collector.wait_for(1)
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import random
import socket
import ssl
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence

import orjson

from ._conditions import Conditions, Outage
from ._schema import (
    MAX_MESSAGE_BYTES,
    MAX_REQUEST_BYTES,
    SchemaError,
    check_time,
    expected_authorization,
    require,
    validate_message,
)

__all__ = [
    "MAX_MESSAGE_BYTES",
    "MAX_REQUEST_BYTES",
    "Collector",
    "Conditions",
    "Fault",
    "Outage",
    "RequestRecord",
    "SchemaError",
    "expected_authorization",
    "validate_message",
]


@dataclasses.dataclass(frozen=True)
class Fault:
    """One scripted answer. ``status`` None means "process normally".

    ``accept`` records the batch as delivered even though an error (or nothing, with
    ``drop_connection``/``delay``) is answered: the "processed, response lost" case that
    makes a correct client resend, so the test can count the duplicates.
    """

    status: Optional[int] = None
    retry_after: Optional[str] = None
    delay: float = 0.0
    drop_connection: bool = False
    accept: bool = False
    body: Optional[bytes] = None


@dataclasses.dataclass(frozen=True)
class RequestRecord:
    status: int  # 0 when the connection was dropped
    auth_scheme: str
    user_agent: str
    content_encoding: str
    body_bytes: int
    messages: int
    error: str = ""
    via_proxy: bool = False
    peer: str = ""  # the client's "host:port": one value per connection it used


class Collector:
    """A strict ``POST /v1/batch`` server on 127.0.0.1 (ephemeral port by default)."""

    def __init__(
        self,
        write_key: str = "test-write-key",
        port: int = 0,
        on_message: Optional[Callable[[Dict[str, Any]], None]] = None,
        strict: bool = True,
        conditions: Optional[Conditions] = None,
        tls: Optional[ssl.SSLContext] = None,
    ) -> None:
        """``strict=False`` skips the per-message schema and size checks (auth, gzip, the
        request limit and JSON are still checked): for benchmarks, where the collector
        shares the CPU with the clients it measures while a real endpoint would not.
        ``tls``: a server-side context; the collector then speaks HTTPS (as the real
        endpoint does), the handshake made in each connection's own thread."""
        self.write_key = write_key
        self.strict = strict
        self._authorization = expected_authorization(write_key)
        self._on_message = on_message
        self._cond = threading.Condition()
        self._faults: Deque[Fault] = collections.deque()
        self.messages: List[Dict[str, Any]] = []
        self.requests: List[RequestRecord] = []
        self._counts: Dict[str, int] = collections.Counter()
        self._active = 0
        #: Most requests ever being answered at the same time (a client's concurrency).
        self.peak_concurrency = 0
        self._server = _QuietServer(("127.0.0.1", port), _make_handler(self))
        self._server.daemon_threads = True
        self.scheme = "http"
        if tls is not None:
            self.scheme = "https"
            self._server.socket = tls.wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False
            )
        self._thread: Optional[threading.Thread] = None
        self.set_conditions(conditions or Conditions())

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

    def summary(self) -> Dict[str, Any]:
        with self._cond:
            statuses = collections.Counter(r.status for r in self.requests)
            return {
                "messages": len(self.messages),
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
            self._counts.clear()
            self._faults.clear()
            self.peak_concurrency = 0

    # -- request handling --------------------------------------------------------------

    def _record(self, record: RequestRecord, batch: Optional[List[Dict[str, Any]]]) -> None:
        with self._cond:
            self.requests.append(record)
            if batch:
                self.messages.extend(batch)
                for msg in batch:
                    self._counts[msg["messageId"]] += 1
                self._cond.notify_all()
        if batch and self._on_message is not None:
            for msg in batch:
                self._on_message(msg)

    def _check(self, headers: Any, raw: bytes) -> List[Dict[str, Any]]:
        """Return the batch or raise ``_Reject`` with the status to answer."""
        if headers.get("Authorization") != self._authorization:
            raise _Reject(401, "unauthorized", "bad or missing credentials")
        if headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
            raise _Reject(415, "unsupported", "Content-Type must be application/json")
        body = raw
        if headers.get("Content-Encoding") == "gzip":
            try:
                body = gzip.decompress(raw)
            except (OSError, EOFError):
                raise _Reject(400, "invalid_gzip", "body is not valid gzip") from None
        if len(body) > MAX_REQUEST_BYTES:
            raise _Reject(413, "too_large", f"request body {len(body)} > {MAX_REQUEST_BYTES}")
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise _Reject(400, "invalid_json", "body is not JSON") from None
        try:
            require(isinstance(payload, dict), "body is not an object")
            batch = payload.get("batch")
            require(isinstance(batch, list) and bool(batch), "batch must be a non-empty array")
            if not self.strict:
                return batch  # type: ignore[no-any-return]
            check_time(payload.get("sentAt"), "sentAt")
            for msg in batch:
                validate_message(msg)
                size = len(orjson.dumps(msg))
                if size > MAX_MESSAGE_BYTES:
                    raise _Reject(413, "message_too_large", f"message of {size} bytes")
        except SchemaError as exc:
            raise _Reject(400, "invalid", str(exc)) from None
        return batch  # type: ignore[no-any-return]


class _QuietServer(ThreadingHTTPServer):
    """Clients that time out and hang up are part of the tests, not errors."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError, ssl.SSLError)):
            super().handle_error(request, client_address)


class _Reject(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _make_handler(collector: Collector) -> type:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in separate writes; without TCP_NODELAY, Nagle plus
        # the client's delayed ACK adds ~40 ms to every keep-alive request.
        disable_nagle_algorithm = True
        server_version = "cdpmp-collector"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # quiet: the collector's records are the log

        def _answer(self, status: int, body: bytes, retry_after: Optional[str] = None) -> None:
            self._ended()  # before the answer: a client may send its next request once it has it
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if retry_after is not None:
                self.send_header("Retry-After", retry_after)
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            with collector._cond:
                collector._active += 1
                collector.peak_concurrency = max(collector.peak_concurrency, collector._active)
            self._active = True
            try:
                self._post()
            finally:
                self._ended()

        def _ended(self) -> None:  # this request no longer counts in ``peak_concurrency``
            if getattr(self, "_active", False):
                self._active = False
                with collector._cond:
                    collector._active -= 1

        def _post(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            # Absolute-form targets ("POST http://host/v1/batch") arrive when a client
            # uses the collector as its HTTP proxy; the tests use that to prove proxies work.
            if urllib.parse.urlsplit(self.path).path != "/v1/batch":
                self._answer(404, b'{"code":"not_found","message":"no such path"}')
                return
            fault = collector._network_fault()
            auth = (self.headers.get("Authorization") or "").split(" ")[0]
            record: Dict[str, Any] = {
                "via_proxy": self.path.startswith("http"),
                "auth_scheme": auth,
                "user_agent": self.headers.get("User-Agent", ""),
                "content_encoding": self.headers.get("Content-Encoding", ""),
                "body_bytes": len(raw),
                "peer": f"{self.client_address[0]}:{self.client_address[1]}",
            }
            try:
                batch = collector._check(self.headers, raw)
            except _Reject as rej:
                collector._record(
                    RequestRecord(status=rej.status, messages=0, error=rej.message, **record), None
                )
                if fault.delay:
                    time.sleep(fault.delay)
                self._answer(rej.status, orjson.dumps({"code": rej.code, "message": rej.message}))
                return
            status = 200 if fault.status is None else fault.status
            accepted = fault.status is None or fault.accept or 200 <= status < 300
            if fault.drop_connection:
                if fault.delay:
                    time.sleep(fault.delay)
                collector._record(
                    RequestRecord(status=0, messages=len(batch), **record), batch if fault.accept else None
                )
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            # Recorded before any scripted delay: "processed, but the answer came late".
            collector._record(
                RequestRecord(status=status, messages=len(batch), **record), batch if accepted else None
            )
            if fault.delay:
                time.sleep(fault.delay)
            body = fault.body
            if body is None:
                body = b"{}" if accepted else orjson.dumps({"code": "fault", "message": "scripted fault"})
            self._answer(status, body, fault.retry_after)

    return Handler
