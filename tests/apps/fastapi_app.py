"""FastAPI as people write it: the app, the README's two ASGI lines pasted as written,
then routes, a router, middleware and state added *after* them (the wrapped object must
stay the app). ``GET /?id=R&k=K`` (async, on the event loop) and ``GET /sync?id=R&k=K``
(a plain ``def``, on FastAPI's thread pool) track K events with messageIds ``R-0 ..
R-(K-1)`` and answer "ok" when every ``track()`` succeeded. Settings come from the
environment (``CDP_WRITE_KEY``, ``CDP_ENDPOINT``...)."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.responses import PlainTextResponse

from cdpmp import analytics

app = FastAPI()

# -- the README's lines, verbatim (tests/test_asgi.py checks they are the README's) --
from cdpmp.integrations.asgi import lifespan  # noqa: E402

app = lifespan(app)
# -- end of the README's lines --

router = APIRouter()


def _track(rid: str, k: int) -> PlainTextResponse:
    ok = True
    for j in range(k):
        ok = analytics.track(user_id=rid, event="Request", message_id=f"{rid}-{j}")[0] is not False and ok
    return PlainTextResponse("ok" if ok and app.state.ready else "fail")


@router.get("/sync")
def sync_route(id: str = "anon", k: int = 1) -> PlainTextResponse:  # noqa: A002 - the query name
    return _track(id, k)


@app.get("/")
async def root(id: str = "anon", k: int = 1) -> PlainTextResponse:  # noqa: A002
    return _track(id, k)


app.include_router(router)
app.add_middleware(GZipMiddleware)
app.state.ready = True
