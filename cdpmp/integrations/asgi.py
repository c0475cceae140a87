"""ASGI servers: Uvicorn (alone, ``--workers N``, or gunicorn's ``UvicornWorker``),
Hypercorn, and any server that speaks the ASGI lifespan protocol. Two lines, after the
application object is made (FastAPI, Starlette, Quart, Django's ASGI handler...)::

    from cdpmp.integrations.asgi import lifespan
    app = lifespan(app)

Why: Uvicorn ends a graceful stop by re-raising the signal it caught, so the process
dies *by the signal*: neither ``atexit`` nor gunicorn's ``worker_exit`` runs (measured
without any drain: 750–855 of 903 events delivered). cdpmp also covers that case by
itself (:mod:`cdpmp._exits`); the lifespan ``shutdown`` is still the best place to
drain: the last Python code the server runs for the app, after its requests and the
app's own shutdown handler, inside the server's grace period. The drain runs every
client of the process, each within its ``exit_timeout``, on a worker thread, so the
event loop is never blocked.

The wrapped object is a transparent proxy: every attribute is the app's, read and
written (``app.get(...)``, ``app.include_router(...)``, ``app.add_middleware(...)``,
``app.state``, ``app.dependency_overrides`` keep working after the line), and
``isinstance(app, FastAPI)`` still holds. Non-lifespan scopes pass through untouched.

The lifespan protocol, whatever the app does with it:

* speaks it: the drain runs when the app answers ``lifespan.shutdown.complete`` or
  ``failed`` (so events tracked in its shutdown handler are sent), or
  ``lifespan.startup.failed`` (the server stops without a shutdown phase);
* ignores it (raises before receiving anything, or returns): the wrapper answers for
  it: startup completes; shutdown drains, then completes;
* raises in its startup or its shutdown without answering: the wrapper drains, tells
  the server (``lifespan.startup.failed`` / ``lifespan.shutdown.failed`` with the
  traceback, which Uvicorn and Hypercorn log), and re-raises, so the server learns of
  the failure exactly as without the wrapper.

Run the server with lifespan on (Uvicorn's default ``--lifespan auto`` is fine); with
``--lifespan off`` nothing calls the wrapper, and cdpmp's SIGTERM drain is all there is.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any, Awaitable, Callable, MutableMapping, Optional, Set

from .._offloop import off_loop
from .._process import PROCESS

logger = logging.getLogger("cdpmp")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

STARTUP, SHUTDOWN = "lifespan.startup", "lifespan.shutdown"
_FINAL = (STARTUP + ".failed", SHUTDOWN + ".complete", SHUTDOWN + ".failed")  # drain, then answer


async def drain() -> bool:
    """Flush and stop every client of this process (blocking work, on a thread)."""
    drained = await off_loop(PROCESS.drain_all)
    if not drained:
        logger.warning("cdpmp: the lifespan shutdown drain reached its deadline; see stats()['dropped']")
    return bool(drained)


class Lifespan:
    """An ASGI app with cdpmp's lifespan drain; every attribute is the app's (see the
    module docstring)."""

    __slots__ = ("__wrapped__",)
    _cdpmp_lifespan = True

    def __init__(self, app: ASGIApp) -> None:
        object.__setattr__(self, "__wrapped__", app)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = self.__wrapped__
        if scope.get("type") != "lifespan":
            await app(scope, receive, send)
        else:
            await _Cycle(receive, send).run(app, scope)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__wrapped__, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.__wrapped__, name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self.__wrapped__, name)

    @property  # type: ignore[misc]  # isinstance(app, FastAPI) holds, as for a mock
    def __class__(self) -> type:
        return type(self.__wrapped__)

    def __repr__(self) -> str:
        return f"cdpmp.integrations.asgi.lifespan({self.__wrapped__!r})"


def lifespan(app: ASGIApp) -> ASGIApp:
    """``app``, wrapped so that a server's graceful stop delivers what was tracked."""
    if getattr(app, "_cdpmp_lifespan", False):
        return app  # wrapped twice: harmless
    return Lifespan(app)


class _Cycle:
    """One lifespan conversation between the server and the app, seen from between."""

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive, self._send = receive, send
        self.received: Optional[str] = None  # the last message type the app read
        self.pending: Optional[Message] = None  # read by the app and not answered yet
        self.answered: Set[str] = set()
        self.drained = False

    async def run(self, app: ASGIApp, scope: Scope) -> None:
        try:
            await app(scope, self.receive, self.send)
        except Exception:
            if self.finished():
                raise  # answered (and drained) already; the server reports the error
            if self.received is None and not self.answered:
                logger.debug("cdpmp: the app does not speak lifespan; answering for it")
                await self.answer_for_app()
                return
            phase = SHUTDOWN if STARTUP + ".complete" in self.answered else STARTUP
            await self.drain_once()
            await self._send({"type": phase + ".failed", "message": traceback.format_exc()})
            raise
        if not self.finished():
            await self.answer_for_app()  # the app returned without finishing the protocol

    def finished(self) -> bool:
        return any(kind in self.answered for kind in _FINAL)

    async def receive(self) -> Message:
        message = await self._receive()
        self.received = message.get("type")
        self.pending = message
        return message

    async def send(self, message: Message) -> None:
        kind = message.get("type", "")
        if kind in _FINAL:
            await self.drain_once()
        self.answered.add(kind)
        self.pending = None
        await self._send(message)

    async def drain_once(self) -> None:
        if not self.drained:
            self.drained = True
            await drain()

    async def answer_for_app(self) -> None:
        """Lifespan on behalf of an application that does not (or no longer) speak it."""
        while True:
            message = self.pending if self.pending is not None else await self._receive()
            self.pending = None
            kind = message.get("type")
            if kind == STARTUP:
                await self._send({"type": STARTUP + ".complete"})
            elif kind == SHUTDOWN:
                await self.drain_once()
                await self._send({"type": SHUTDOWN + ".complete"})
                return
