"""ASGI servers: Uvicorn (alone, ``--workers N``, or gunicorn's ``UvicornWorker``),
Hypercorn, and any server that speaks the ASGI lifespan protocol. One line, around the
application object::

    app = cdpmp.integrations.asgi.lifespan(app)

Why it is needed: Uvicorn ends a graceful stop by re-raising the signal it caught
(``signal.raise_signal(SIGTERM)`` with the default handler back in place), so the
process dies *by the signal*: neither ``atexit`` nor gunicorn's ``worker_exit`` runs,
and whatever direct mode still queued — about the last half second of traffic, measured
750–855 of 903 events delivered — is lost without a log line. The lifespan
``shutdown`` is the last Python code such a server runs for the app; the wrapper drains
every client of the process there, within each one's ``exit_timeout``, on a worker
thread so the event loop is never blocked.

The wrapper passes every scope through untouched. It drains after the application's
own shutdown handler (when the app sends ``lifespan.shutdown.complete`` or ``failed``),
so events tracked in that handler are sent too. An application that does not speak
lifespan (it raises on the scope before answering) is answered for: startup completes,
shutdown drains then completes. Run the server with lifespan on (Uvicorn's default
``--lifespan auto`` is fine); with ``--lifespan off`` nothing calls the wrapper.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Dict, MutableMapping, Optional

from .._process import PROCESS

logger = logging.getLogger("cdpmp")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_DONE = ("lifespan.shutdown.complete", "lifespan.shutdown.failed")


async def drain() -> bool:
    """Flush and stop every client of this process (blocking work, on a thread)."""
    drained = await asyncio.get_running_loop().run_in_executor(None, PROCESS.drain_all)
    if not drained:
        logger.warning("cdpmp: the lifespan shutdown drain reached its deadline; see stats()['dropped']")
    return bool(drained)


def lifespan(app: ASGIApp) -> ASGIApp:
    """``app``, wrapped so that a server's graceful stop delivers what was tracked."""
    if getattr(app, "_cdpmp_lifespan", False):
        return app  # wrapped twice: harmless

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "lifespan":
            await app(scope, receive, send)
            return
        await _run(app, scope, receive, send)

    wrapped._cdpmp_lifespan = True  # type: ignore[attr-defined]
    return wrapped


async def _run(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    state: Dict[str, Any] = {"answered": False, "pending": None}

    async def receive_(*_: Any) -> Message:
        message = await receive()
        state["pending"] = message  # received, not answered yet
        return message

    async def send_(message: Message) -> None:
        state["answered"] = True
        state["pending"] = None
        if message.get("type") in _DONE:
            await drain()
        await send(message)

    try:
        await app(scope, receive_, send_)
    except Exception:
        if state["answered"]:
            raise  # the app speaks lifespan and failed: the server reports it
        await _answer_for(receive, send, state["pending"])


async def _answer_for(receive: Receive, send: Send, pending: Optional[Message]) -> None:
    """Lifespan on behalf of an application that does not implement it."""
    while True:
        message = pending if pending is not None else await receive()
        pending = None
        kind = message.get("type")
        if kind == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif kind == "lifespan.shutdown":
            await drain()
            await send({"type": "lifespan.shutdown.complete"})
            return
