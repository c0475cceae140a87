"""How Customer.io's Pipelines API answers one ``POST /v1/batch``, as the collector plays it.

What its API reference says, and what we chose where it is silent (marked *ours*):

* **Strict mode** (the request carries ``X-Strict-Mode: 1``): a request it refuses is
  answered 401 (credentials) or 400 (anything in the body), with
  ``{"meta": {"errors": [...]}}``, and nothing in it goes through.
* **Permissive mode** (no header, the API's default): every request it reads is answered
  ``200 {}``; what it refuses "will not go through". A problem of the whole request (the
  credentials, a body over 500 KB, a body that is not gzip, JSON or a batch) drops all of
  it; a problem of one message (the schema, over 32 KB, or the test's own ``refuse``
  rule) drops that message and the rest go through (*ours*: the reference does not say).
  The collector records every such message as *dropped*, with why, never as delivered.
* **Rate limit**: 3,000 requests per 3 seconds per workspace, "not strictly enforced";
  over it the answer is 429 in either mode, without ``Retry-After`` (none is documented).

:class:`Rules` decides; :mod:`cdpmp.testing` serves, records and plays the network.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import threading
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Protocol, Tuple

import orjson

from ._schema import (
    MAX_MESSAGE_BYTES,
    MAX_REQUEST_BYTES,
    SchemaError,
    check_time,
    expected_authorization,
    require,
    validate_message,
)

#: A test's rule for messages the API refuses: the reason, or None to accept it.
Refuse = Callable[[Dict[str, Any]], Optional[str]]
STRICT_HEADER = "X-Strict-Mode"
#: The workspace limit the API reference states: requests per period (seconds).
RATE_LIMIT: Tuple[int, float] = (3000, 3.0)
_ERRORS_SHOWN = 20  # meta.errors lists at most this many refused messages


@dataclasses.dataclass(frozen=True)
class Dropped:
    """A message answered 200 that did not go through (permissive mode)."""

    message_id: Optional[str]  # None when the request could not be read that far
    reason: str


@dataclasses.dataclass
class Verdict:
    """The answer to one request, and where each of its messages went."""

    status: int
    errors: List[str] = dataclasses.field(default_factory=list)
    delivered: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    dropped: List[Dropped] = dataclasses.field(default_factory=list)
    refused: int = 0  # messages of a request answered 4xx (the client was told)
    messages: int = 0  # messages in the request, as far as it could be read

    def body(self) -> bytes:
        return orjson.dumps({"meta": {"errors": self.errors}}) if self.errors else b"{}"


class Headers(Protocol):
    """A request's headers (``http.client.HTTPMessage``, a dict)."""

    def get(self, name: str, default: None = None, /) -> Optional[str]: ...


class _Refusal(Exception):
    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status, self.error = status, error


class RateLimit:
    """At most ``requests`` per sliding ``period`` seconds; thread-safe."""

    def __init__(self, requests: int, period: float) -> None:
        self.requests, self.period = requests, period
        self._times: Deque[float] = collections.deque()
        self._lock = threading.Lock()

    def admit(self) -> bool:
        now = time.monotonic()
        with self._lock:
            times = self._times
            while times and now - times[0] >= self.period:
                times.popleft()
            if len(times) >= self.requests:
                return False
            times.append(now)
            return True


class Rules:
    """The API's decision for a request (see the module docstring).

    ``strict_mode``: None answers as the API does (strict only with the header); True
    or False answer that way whatever the request says. ``validate``: check each
    message's schema and size (False: only the request's, for benchmarks where the
    collector shares the CPU with the clients it measures). ``refuse``: the test's
    own rule for messages the API refuses. ``rate_limit``: (requests, seconds), None
    for none."""

    def __init__(
        self,
        write_key: str,
        strict_mode: Optional[bool] = None,
        validate: bool = True,
        refuse: Optional[Refuse] = None,
        rate_limit: Optional[Tuple[int, float]] = RATE_LIMIT,
    ) -> None:
        self.authorization = expected_authorization(write_key)
        self.strict_mode = strict_mode
        self.validate = validate
        self.refuse = refuse
        self.rate = None if rate_limit is None else RateLimit(*rate_limit)

    def strict_for(self, headers: Headers) -> bool:
        if self.strict_mode is not None:
            return self.strict_mode
        return (headers.get(STRICT_HEADER) or "").strip() == "1"

    def judge(self, headers: Headers, raw: bytes) -> Verdict:
        """The verdict on one request's headers and (raw, perhaps gzipped) body."""
        if self.rate is not None and not self.rate.admit():
            return Verdict(429, ["rate limit exceeded: too many requests for this workspace"])
        strict = self.strict_for(headers)
        batch: List[Any] = []
        refusal: Optional[_Refusal] = None
        try:
            batch = self._batch(headers, raw)
        except _Refusal as exc:
            refusal = exc
        if headers.get("Authorization") != self.authorization:  # the credentials come first;
            refusal = _Refusal(401, "invalid or missing write key")  # the batch was read for its ids
        if refusal is None:
            return self._per_message(batch, strict)
        if strict:
            return Verdict(refusal.status, [refusal.error], refused=len(batch), messages=len(batch))
        dropped = [Dropped(_message_id(m), refusal.error) for m in batch] or [Dropped(None, refusal.error)]
        return Verdict(200, dropped=dropped, messages=len(batch))

    def _batch(self, headers: Headers, raw: bytes) -> List[Any]:
        if (headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
            raise _Refusal(415, "Content-Type must be application/json")
        body = raw
        if headers.get("Content-Encoding") == "gzip":
            try:
                body = gzip.decompress(raw)
            except (OSError, EOFError):
                raise _Refusal(400, "body is not valid gzip") from None
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise _Refusal(400, "body is not JSON") from None
        batch = payload.get("batch") if isinstance(payload, dict) else None
        if not isinstance(batch, list) or not batch:
            raise _Refusal(400, "batch must be a non-empty array")
        if len(body) > MAX_REQUEST_BYTES:  # after parsing: the dropped ids are known
            raise _Refusal(400, f"request body of {len(body)} bytes is over {MAX_REQUEST_BYTES}")
        if self.validate:
            try:
                check_time(payload.get("sentAt"), "sentAt")
            except SchemaError as exc:
                raise _Refusal(400, str(exc)) from None
        return batch

    def _per_message(self, batch: List[Any], strict: bool) -> Verdict:
        verdict = Verdict(200, messages=len(batch))
        for i, msg in enumerate(batch):
            problem = self._problem(msg)
            if problem is None:
                verdict.delivered.append(msg)
            elif strict:
                if len(verdict.errors) < _ERRORS_SHOWN:
                    verdict.errors.append(f"batch[{i}]: {problem}")
            else:
                verdict.dropped.append(Dropped(_message_id(msg), problem))
        if strict and verdict.errors:  # one refused message refuses the whole request
            return Verdict(400, verdict.errors, refused=len(batch), messages=len(batch))
        return verdict

    def _problem(self, msg: Any) -> Optional[str]:
        if self.validate:
            try:
                validate_message(msg)
                size = len(orjson.dumps(msg))
                require(size <= MAX_MESSAGE_BYTES, f"message of {size} bytes is over {MAX_MESSAGE_BYTES}")
            except SchemaError as exc:
                return str(exc)
        elif not isinstance(msg, dict) or not isinstance(msg.get("messageId"), str):
            return "message without a messageId"
        return None if self.refuse is None else self.refuse(msg)


def _message_id(msg: Any) -> Optional[str]:
    mid = msg.get("messageId") if isinstance(msg, dict) else None
    return mid if isinstance(mid, str) else None
