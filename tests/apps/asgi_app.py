"""A small ASGI app for the Uvicorn tests: ``GET /?id=R&k=K`` tracks K events with
messageIds ``R-0 .. R-(K-1)`` and answers "ok" when every ``track()`` succeeded. It
does not implement lifespan itself (as many small apps do not); the README's one line
wraps it. Settings come from the environment (``CDP_WRITE_KEY``, ``CDP_ENDPOINT``...).
"""

from __future__ import annotations

import os
from typing import Any, Awaitable, Callable, MutableMapping
from urllib.parse import parse_qs

import cdpmp.integrations.asgi
from cdpmp import analytics


async def _app(
    scope: MutableMapping[str, Any],
    receive: Callable[[], Awaitable[Any]],
    send: Callable[[Any], Awaitable[None]],
) -> None:
    if scope["type"] != "http":
        raise RuntimeError(f"unsupported scope {scope['type']}")
    query = parse_qs(scope.get("query_string", b"").decode())
    rid = query.get("id", ["anon"])[0]
    ok = True
    for j in range(int(query.get("k", ["1"])[0])):
        result = analytics.track(
            user_id=rid, event="Request", message_id=f"{rid}-{j}", properties={"pid": os.getpid()}
        )
        ok = ok and result[0] is not False
    body = b"ok" if ok else b"fail"
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


app = cdpmp.integrations.asgi.lifespan(_app)
