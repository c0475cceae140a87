"""The collector's HTTP side: the request handler, the server, and what a request is
recorded as (:class:`RequestRecord`) or scripted to meet (:class:`Fault`).

:mod:`cdpmp.testing` owns the collector's state and what it answers
(:mod:`cdpmp._api` decides); this module reads a request, asks both, and writes
the answer. Both public classes are re-exported by :mod:`cdpmp.testing`.
"""

from __future__ import annotations

import dataclasses
import socket
import ssl
import sys
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Dict, Optional

import orjson

from ._api import STRICT_HEADER

if TYPE_CHECKING:
    from .testing import Collector


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
    strict_header: bool = False  # the request asked for strict mode (X-Strict-Mode: 1)


class QuietServer(ThreadingHTTPServer):
    """Clients that time out and hang up are part of the tests, not errors."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError, ssl.SSLError)):
            super().handle_error(request, client_address)


def make_handler(collector: Collector) -> type:
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
                "strict_header": (self.headers.get(STRICT_HEADER) or "").strip() == "1",
            }
            verdict = collector.rules.judge(self.headers, raw)
            if verdict.status != 200:  # refused (strict mode) or rate-limited: the client is told
                error = "; ".join(verdict.errors)
                collector._record(
                    RequestRecord(status=verdict.status, messages=verdict.messages, error=error, **record),
                    None,
                    verdict,
                )
                if fault.delay:
                    time.sleep(fault.delay)
                self._answer(verdict.status, verdict.body())
                return
            batch = verdict.delivered
            status = 200 if fault.status is None else fault.status
            accepted = fault.status is None or fault.accept or 200 <= status < 300
            if fault.drop_connection:
                if fault.delay:
                    time.sleep(fault.delay)
                collector._record(
                    RequestRecord(status=0, messages=verdict.messages, **record),
                    batch if fault.accept else None,
                    verdict,
                )
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            # Recorded before any scripted delay: "processed, but the answer came late".
            collector._record(
                RequestRecord(status=status, messages=verdict.messages, **record),
                batch if accepted else None,
                verdict,
            )
            if fault.delay:
                time.sleep(fault.delay)
            body = fault.body
            if body is None:
                body = b"{}" if accepted else orjson.dumps({"code": "fault", "message": "scripted fault"})
            self._answer(status, body, fault.retry_after)

    return Handler
