"""A small ASGI app for the Uvicorn tests: ``GET /?id=R&k=K`` tracks K events with
messageIds ``R-0 .. R-(K-1)`` and answers "ok" when every ``track()`` succeeded. It
does not implement lifespan itself (as many small apps do not); the README's one line
wraps it, unless ``APP_NO_WRAPPER=1`` (an app that forgot the line). ``APP_CLIENT=official`` uses customerio-cdp-analytics instead (benchmarks). Settings come from the environment (``CDP_WRITE_KEY``, ``CDP_ENDPOINT``...).
"""

from __future__ import annotations

import os
from typing import Any, Awaitable, Callable, MutableMapping
from urllib.parse import parse_qs

import cdpmp.integrations.asgi

if os.environ.get("APP_CLIENT") == "official":  # for the comparison in benchmarks/servers.py
    from customerio import analytics

    analytics.write_key = os.environ["CDP_WRITE_KEY"]
    analytics.host = os.environ["CDP_ENDPOINT"]
else:
    from cdpmp import analytics  # type: ignore[no-redef]


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


# The official client has no such helper: it runs the bare app; so does an app that
# forgot the line (APP_NO_WRAPPER=1).
bare = os.environ.get("APP_CLIENT") == "official" or os.environ.get("APP_NO_WRAPPER") == "1"
app = _app if bare else cdpmp.integrations.asgi.lifespan(_app)
