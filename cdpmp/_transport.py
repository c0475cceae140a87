"""HTTP delivery of one batch: body encoding, gzip, auth, and the retry loop.

A ``Transport`` owns one connection pool *per process*: the pool is created
lazily and re-created when ``os.getpid()`` changes, so a forked child never writes to
the keep-alive socket it inherited (the official client's module-global session did,
corrupting requests across workers). The inherited session is dropped, not closed
gracefully: closing only releases the child's copy of the descriptor.

The body is assembled from already-serialised messages, so each message is encoded
exactly once in its life. Durations are seconds.

Deadlines are total: :mod:`cdpmp._deadline` bounds every socket call of a request by
the time left before its overall deadline (connect, send and the whole response). Response bodies are read up to :data:`MAX_RESPONSE_BYTES`; a longer one is
cut and its connection dropped, never kept in memory.
"""

from __future__ import annotations

import base64
import dataclasses

# Loaded here, at import, in the main thread: urllib3 encodes every host name with the
# "idna" codec, and a codec first looked up from a consumer thread (here: in a gunicorn
# worker right after fork, racing the main thread's imports) can fail with
# "LookupError: unknown encoding: idna", which CI caught. requests imports it the same way.
import encodings.idna  # noqa: F401
import gzip as _gzip
import http
import logging
import os
import time
import urllib.parse
import urllib.request
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple, TypeVar

import orjson
import urllib3

try:  # imported here, never lazily: a child forked mid-import would deadlock on it
    import certifi
except ImportError:  # pragma: no cover - certifi is optional
    certifi = None  # type: ignore[assignment]

from ._deadline import RequestDeadline, cancel, deadline_pools, expired, keep_idle, request_deadline
from ._message import now_iso
from ._options import Settings
from ._outcome import classify_exception, classify_status, internal_error
from ._retry import RetryPolicy, parse_retry_after
from ._version import LIBRARY_NAME, __version__
from .errors import APIError, DeliveryError, TransportError

logger = logging.getLogger("cdpmp")
# Customer.io's troubleshooting page says ``logging.getLogger('customerio')
# .setLevel('DEBUG')``: the per-batch DEBUG line goes there too when that logger wants
# it and ``cdpmp``'s does not (never both: one line per batch).
official_logger = logging.getLogger("customerio")

MAX_BATCH_BYTES = 500_000
# {"batch":[...],"sentAt":"2026-01-01T00:00:00.000+00:00"} minus the messages.
ENVELOPE_BYTES = 64
USER_AGENT = f"{LIBRARY_NAME}/{__version__} (python)"
#: Connections kept per endpoint at most (the process's sender threads, :mod:`cdpmp._engine`).
MAX_CONNECTIONS = 16
#: Bytes of a response body read at most (the API answers a few dozen).
MAX_RESPONSE_BYTES = 64 * 1024
#: Asks the API for its errors (400/401 with ``meta.errors``) instead of a 200 that drops.
STRICT_HEADER = "X-Strict-Mode"


def encode_body(messages: List[bytes]) -> bytes:
    return b'{"batch":[' + b",".join(messages) + b'],"sentAt":"' + now_iso().encode() + b'"}'


class Attempt(NamedTuple):
    """What sending one batch came to: ``error`` None means acknowledged;
    ``retry_after`` is the endpoint's ``Retry-After`` (seconds) with a retryable error."""

    error: Optional[DeliveryError]
    requests: int
    retries: int
    retry_after: Optional[float] = None


class _Response:
    """The parts of an HTTP answer the retry loop needs."""

    def __init__(self, status: int, headers: Mapping[str, str], content: bytes) -> None:
        self.status_code = status
        self.headers = headers
        self.content = content


def _proxy_for(settings: Settings) -> Optional[str]:
    """The proxy URL for our endpoint: ``proxies=`` first, else the environment
    (``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY``), read once per transport."""
    scheme = settings.endpoint.split(":", 1)[0]
    if settings.proxies is not None:
        return settings.proxies.get(scheme) or settings.proxies.get("all")
    host = urllib.parse.urlsplit(settings.endpoint).hostname or ""
    if urllib.request.proxy_bypass(host):
        return None
    return urllib.request.getproxies().get(scheme)


class Transport:
    """Sends batches for one client; safe to share between threads of one process.

    It talks to urllib3 directly (requests is built on it): a POST through requests
    measured 506 µs of CPU here, 158 µs through urllib3, mostly requests re-reading the
    environment for proxies on every call. Proxies are resolved once, at construction.
    """

    def __init__(
        self, settings: Settings, announce: bool = False, pid: Callable[[], int] = os.getpid
    ) -> None:
        """``announce``: log each batch at INFO whatever the loggers' levels (the
        shared-mode uploader, for a source with ``debug`` on: its log is the user's view).
        ``pid``: this process's identity as the pool reads it (tests play a fork with
        it, as prometheus_client's ``values.py`` takes a ``pidFunc``)."""
        self.settings = settings
        self._getpid = pid
        self._announce = announce
        self.policy = RetryPolicy.of(settings)
        if settings.bearer:
            auth = "Bearer " + settings.write_key
        else:
            auth = "Basic " + base64.b64encode((settings.write_key + ":").encode()).decode()
        self._headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, "Authorization": auth}
        if settings.gzip:
            self._headers["Content-Encoding"] = "gzip"
        if settings.strict_mode:
            # Without it the API answers 200 to what it refuses (a wrong key, a bad
            # message) and drops it: nothing could be counted or reported.
            self._headers[STRICT_HEADER] = "1"
        self._proxy = _proxy_for(settings)
        self._pid = -1
        self._local_pool: Optional[urllib3.PoolManager] = None

    def __repr__(self) -> str:
        return f"<Transport {self.settings.shown_url}>"  # never the headers: they hold the key

    def _pool(self) -> urllib3.PoolManager:
        pid = self._getpid()
        if self._pid != pid or self._local_pool is None:
            # One connection per request the lane may have in flight: a smaller pool
            # discards (and re-opens) connections ("Connection pool is full").
            maxsize = max(1, min(self.settings.max_in_flight, MAX_CONNECTIONS))
            kwargs: Dict[str, Any] = {"num_pools": 2, "maxsize": maxsize, "retries": False}
            if self.settings.endpoint.startswith("https:"):
                kwargs.update(cert_reqs="CERT_REQUIRED", ssl_context=_ssl_context())
            if self._proxy:
                pool: urllib3.PoolManager = urllib3.ProxyManager(self._proxy, **kwargs)
            else:
                pool = urllib3.PoolManager(**kwargs)
            pool.pool_classes_by_scheme = deadline_pools()
            self._local_pool = pool
            self._pid = pid
        return self._local_pool

    def close(self) -> None:
        """Close this process's sockets (the pool is rebuilt if used again)."""
        pool = self._local_pool
        if pool is not None and self._pid == self._getpid():
            self._local_pool = None
            pool.clear()

    def keep_idle(self, keep: int) -> None:
        """Close this process's idle connections beyond ``keep`` (the lane narrowed)."""
        manager = self._local_pool
        if manager is not None and self._pid == self._getpid():
            for key in list(manager.pools.keys()):
                pool = manager.pools.get(key)
                if pool is not None:
                    keep_idle(pool, keep)

    def cancel(self) -> None:
        """End this transport's requests in progress (a deadline that has passed)."""
        cancel(self)

    def _post_once(self, body: bytes, deadline: float) -> _Response:
        """One POST that ends by ``deadline`` whatever the endpoint does."""
        pool = self._pool()
        timeout = max(0.001, deadline - time.monotonic())
        with request_deadline(deadline, self):
            try:
                response = pool.request(
                    "POST",
                    self.settings.batch_url,
                    body=body,
                    headers=self._headers,
                    timeout=urllib3.Timeout(connect=timeout, read=timeout),
                    redirect=False,
                    preload_content=False,
                )
                content = b""
                try:
                    content = response.read(MAX_RESPONSE_BYTES + 1, decode_content=False)
                finally:
                    if len(content) > MAX_RESPONSE_BYTES:
                        response.close()  # the rest is never read: drop the connection
                    response.release_conn()
            except Exception as exc:
                if expired():
                    raise RequestDeadline(f"no complete answer within {timeout:.3g}s") from exc
                raise
        return _Response(response.status, response.headers, content[:MAX_RESPONSE_BYTES])

    def post(self, messages: List[bytes], deadline: Optional[float] = None) -> Attempt:
        """ONE request for one batch, ending by ``deadline`` (default: ``timeout``
        from now); the engines in :mod:`cdpmp._engine` decide about retries."""
        end = time.monotonic() + self.settings.timeout
        if deadline is not None:
            end = min(end, deadline)
        return self._attempt(self._encode(messages), end, len(messages))

    def _encode(self, messages: List[bytes]) -> bytes:
        body = encode_body(messages)
        return _gzip.compress(body, compresslevel=6) if self.settings.gzip else body

    def _attempt(self, body: bytes, end: float, events: int) -> Attempt:
        """One request; with DEBUG on (``debug=True``, the ``cdpmp`` or the ``customerio``
        logger), one line for it: events, endpoint, answer, time (no payload, no key)."""
        started = time.monotonic()
        attempt, status = self._answer(body, end)
        log = logger if logger.isEnabledFor(logging.DEBUG) or self._announce else official_logger
        level = logging.INFO if self._announce else logging.DEBUG
        if log.isEnabledFor(level):
            outcome = f"{status} ok" if attempt.error is None else str(attempt.error)
            log.log(
                level,
                "cdpmp: batch of %d event(s) to %s: %s in %.0f ms",
                events, self.settings.shown_url, outcome, (time.monotonic() - started) * 1000,
            )  # fmt: skip
        return attempt

    def _answer(self, body: bytes, end: float) -> Tuple[Attempt, int]:
        """The attempt, and the HTTP status (0: no answer)."""
        try:
            response = self._post_once(body, end)
        except Exception as exc:  # noqa: BLE001 - classified: retried, final or internal
            verdict = classify_exception(exc)
            if verdict == "final" and not isinstance(exc, urllib3.exceptions.HTTPError):
                return Attempt(internal_error("sending a batch", exc), 1, 0), 0
            detail = f": {exc}" if isinstance(exc, RequestDeadline) else ""
            error = TransportError(f"{type(exc).__name__} posting batch{detail}", final=verdict == "final")
            return Attempt(error, 1, 0), 0
        status = response.status_code
        verdict = classify_status(status)
        if verdict == "success":
            return Attempt(None, 1, 0), status
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        return Attempt(_api_error(response, final=verdict == "final"), 1, 0, retry_after), status

    def send(self, messages: List[bytes]) -> Attempt:
        """Deliver one batch with retries, inline (``sync_mode``); the result says how
        (``error`` None on success) and how many requests and retries it took. The
        retry policy decides *wait / give up* as in the queued modes; without
        ``retry_budget`` its budget is one ``timeout``: this path blocks its caller,
        where the queued modes hold a failing batch instead."""
        body = self._encode(messages)
        policy = self.policy
        if policy.budget is None:
            policy = dataclasses.replace(policy, budget=self.settings.timeout)
        requests = retries = 0
        first_failed = 0.0
        while True:
            requests += 1
            now = time.monotonic()
            end = now + self.settings.timeout
            if first_failed and policy.budget is not None:
                end = min(end, max(first_failed + policy.budget, now + 0.05))
            attempt = self._attempt(body, end, len(messages))
            error = attempt.error
            if error is None or error.final:
                return Attempt(error, requests, retries, attempt.retry_after)
            now = time.monotonic()
            first_failed = first_failed or now
            delay = policy.delay(retries + 1, attempt.retry_after)
            if policy.gives_up(retries + 1, first_failed, now + delay):
                return Attempt(error, requests, retries, attempt.retry_after)
            retries += 1
            logger.debug("cdpmp: retry %d in %.2fs after %s", retries, delay, error)
            time.sleep(delay)


def _ssl_context() -> Any:
    """A verifying TLS context, built per pid from ``ssl.SSLContext`` as it is *now*.

    Never urllib3's own factory: it keeps the ``SSLContext`` class it imported, and a
    gevent or eventlet worker patches ``ssl`` after that (the gunicorn.conf.py line or
    ``--preload`` imports cdpmp, hence urllib3, in the master). A context of the
    original class then recurses in every property setter (``RecursionError`` on each
    send, measured: 0 of 904 events over HTTPS). ``ssl.create_default_context`` looks
    the class up at call time, so the patched one is used, and its sockets cooperate.
    """
    import ssl

    return ssl.create_default_context(cafile=_ca_bundle())


def _ca_bundle() -> Optional[str]:
    """``SSL_CERT_FILE`` when set (OpenSSL's own variable: a corporate or test CA),
    else certifi's bundle when installed (what requests used), else the system store."""
    chosen = os.environ.get("SSL_CERT_FILE")
    if chosen:
        return chosen
    return None if certifi is None else str(certifi.where())


def _api_error(response: _Response, final: bool) -> APIError:
    """Build an APIError from any body: the API's ``{"meta": {"errors": [...]}}`` (its
    strict mode), JSON with ``code``/``message``, or text. The code is the body's
    ``code`` or else the status's name ("Unauthorized")."""
    status = response.status_code
    try:
        code = http.HTTPStatus(status).phrase
    except ValueError:
        code = "unknown"
    try:
        payload = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return APIError(status, code, response.content[:500].decode("utf-8", "replace"), final=final)
    if not isinstance(payload, dict):
        return APIError(status, code, str(payload)[:500], final=final)
    errors = meta_errors(payload)
    if errors:
        message = "; ".join(errors)
    else:
        message = str(payload.get("message", payload.get("error", "")))
    return APIError(status, str(payload.get("code", code)), message[:500], final=final)


def meta_errors(payload: Mapping[str, Any]) -> List[str]:
    """The texts of ``meta.errors`` in an API answer (strings, or objects with a
    ``message`` and perhaps a ``field``); empty when there are none."""
    meta = payload.get("meta")
    errors = meta.get("errors") if isinstance(meta, dict) else None
    if not isinstance(errors, list):
        return []
    texts = []
    for item in errors[:20]:
        if isinstance(item, dict):
            text = str(
                item.get("message") or item.get("error") or item.get("detail") or orjson.dumps(item).decode()
            )
            field = item.get("field") or item.get("path")
            texts.append(f"{field}: {text}" if field else text)
        else:
            texts.append(str(item))
    return texts


T = TypeVar("T")
# Answers that mean "this request's content was refused", so one bad message in a
# batch would otherwise take every good one with it: the batch is split and resent.
_SPLIT_STATUSES = frozenset({400, 413, 422})


def send_splitting(send: Callable[[List[T]], Attempt], items: List[T]) -> List[Tuple[List[T], Attempt]]:
    """Send ``items``; when the endpoint refuses the batch for its content, bisect it
    and resend the halves, until the refused messages stand alone. Returns each part
    sent with its outcome, in order. A refused batch was not processed (the API's
    rule), so resending its other messages duplicates nothing."""
    attempt = send(items)
    error = attempt.error
    if (
        error is None
        or len(items) < 2
        or not isinstance(error, APIError)
        or not error.final
        or error.status not in _SPLIT_STATUSES
    ):
        return [(items, attempt)]
    mid = len(items) // 2
    return send_splitting(send, items[:mid]) + send_splitting(send, items[mid:])
