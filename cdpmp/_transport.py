"""HTTP delivery of one batch: body encoding, gzip, auth, and the retry loop.

A ``Transport`` owns one ``requests.Session`` *per process*: the session is created
lazily and re-created when ``os.getpid()`` changes, so a forked child never writes to
the keep-alive socket it inherited (the official client's module-global session did,
corrupting requests across workers). The inherited session is dropped, not closed
gracefully: closing only releases the child's copy of the descriptor.

The body is assembled from already-serialised messages, so each message is encoded
exactly once in its life. Durations are seconds.
"""

from __future__ import annotations

import base64
import gzip as _gzip
import logging
import os
import threading
import time
from typing import Any, Callable, List, Optional

import orjson
import requests

from ._message import now_iso
from ._retry import RetryPolicy, is_retryable, is_success, parse_retry_after
from ._settings import Settings
from ._version import LIBRARY_NAME, __version__
from .errors import APIError, DeliveryError, ShutdownAbandoned, TransportError

logger = logging.getLogger("cdpmp")

MAX_BATCH_BYTES = 500_000
# {"batch":[...],"sentAt":"2026-01-01T00:00:00.000+00:00"} minus the messages.
ENVELOPE_BYTES = 64
USER_AGENT = f"{LIBRARY_NAME}/{__version__} (python)"


def encode_body(messages: List[bytes]) -> bytes:
    return b'{"batch":[' + b",".join(messages) + b'],"sentAt":"' + now_iso().encode() + b'"}'


class _KeyAuth(requests.auth.AuthBase):
    """Sets a precomputed Authorization header. Passing it as ``auth`` also stops
    requests from replacing it with a matching ``.netrc`` entry."""

    def __init__(self, header: str) -> None:
        self._header = header

    def __call__(self, request: Any) -> Any:
        request.headers["Authorization"] = self._header
        return request

    def __repr__(self) -> str:
        return "<_KeyAuth [redacted]>"


class Transport:
    """Sends batches for one client; safe to share between threads of one process."""

    def __init__(self, settings: Settings, on_request: Optional[Callable[[], None]] = None) -> None:
        self.settings = settings
        self.policy = RetryPolicy(max_retries=settings.max_retries, budget=settings.retry_budget)
        if settings.bearer:
            header = "Bearer " + settings.write_key
        else:
            header = "Basic " + base64.b64encode((settings.write_key + ":").encode()).decode()
        self._auth = _KeyAuth(header)
        self._headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        if settings.gzip:
            self._headers["Content-Encoding"] = "gzip"
        self._pid = -1
        self._local_session: Optional[requests.Session] = None
        self._lock = threading.Lock()
        self.requests = 0
        self.retries = 0

    def _session(self) -> requests.Session:
        pid = os.getpid()
        if self._pid != pid or self._local_session is None:
            self._lock = threading.Lock()  # never acquire a lock inherited from the parent
            self._local_session = requests.Session()
            if self.settings.proxies is not None:
                self._local_session.proxies.update(self.settings.proxies)
            self._pid = pid
        return self._local_session

    def _post_once(self, body: bytes, timeout: float) -> requests.Response:
        session = self._session()
        with self._lock:
            self.requests += 1
        return session.post(
            self.settings.batch_url,
            data=body,
            headers=self._headers,
            auth=self._auth,
            timeout=timeout,
        )

    def send(
        self,
        messages: List[bytes],
        abort: Optional[threading.Event] = None,
        deadline: Optional[float] = None,
    ) -> Optional[DeliveryError]:
        """Deliver one batch with retries; ``None`` on success, else the final error.

        ``deadline`` (a ``time.monotonic()`` value) and ``abort`` cut retries short:
        shutdown spends one time budget, not one per batch.
        """
        body = encode_body(messages)
        if self.settings.gzip:
            body = _gzip.compress(body, compresslevel=6)
        start = time.monotonic()
        budget_end = start + self.policy.budget
        end = budget_end if deadline is None else min(budget_end, deadline)
        attempt = 0
        while True:
            retry_after: Optional[float] = None
            remaining = end - time.monotonic()
            timeout = max(0.05, min(self.settings.timeout, remaining)) if deadline else self.settings.timeout
            try:
                response = self._post_once(body, timeout)
            except (requests.ConnectionError, requests.Timeout) as exc:
                error: DeliveryError = TransportError(f"{type(exc).__name__} posting batch")
                error.__cause__ = None
            except requests.RequestException as exc:  # invalid URL, proxy errors...
                return TransportError(f"{type(exc).__name__} posting batch")
            else:
                if is_success(response.status_code):
                    return None
                error = _api_error(response)
                if not is_retryable(response.status_code):
                    return error
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
            attempt += 1
            if not self.policy.allows(attempt):
                return error
            delay = self.policy.delay(attempt, retry_after)
            if not self.policy.fits(delay, end - time.monotonic()):
                return error
            with self._lock:
                self.retries += 1
            logger.debug("cdpmp: retry %d in %.2fs after %s", attempt, delay, error)
            if abort is not None:
                if abort.wait(delay):
                    return ShutdownAbandoned("shutdown deadline passed during retry")
            else:
                time.sleep(delay)


def _api_error(response: requests.Response) -> APIError:
    """Build an APIError from any body: JSON with or without ``code``, or text."""
    code, message = "unknown", ""
    try:
        payload = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        message = response.text[:500]
    else:
        if isinstance(payload, dict):
            code = str(payload.get("code", code))
            message = str(payload.get("message", payload.get("error", "")))[:500]
        else:
            message = str(payload)[:500]
    return APIError(response.status_code, code, message)
