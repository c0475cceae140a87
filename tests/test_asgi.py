"""ASGI apps as people write them: the README's lines pasted into a FastAPI app that
keeps growing after them; apps that ignore lifespan, return from it, or raise in their
startup or shutdown; Uvicorn and gunicorn's UvicornWorker with the wrapper forgotten.
Every event counted by messageId; the server must learn of every app failure."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest

from cdpmp.testing import Collector
from tests.servers import ROOT, assert_exactly_once, free_port, gunicorn_command, load, start_server

LifespanApp = Any


def _cycle(app: LifespanApp, collector: Collector) -> Tuple[List[Dict[str, Any]], Optional[BaseException]]:
    """One lifespan cycle (startup, then shutdown) of the wrapped ``app``: what the
    server was told, and what the wrapper raised to it."""
    from cdpmp import analytics
    from cdpmp.integrations.asgi import lifespan

    analytics.write_key, analytics.endpoint, analytics.upload_interval = (
        collector.write_key,
        collector.url,
        30.0,
    )
    told: List[Dict[str, Any]] = []
    raised: List[BaseException] = []

    async def run() -> None:
        inbox: asyncio.Queue[Dict[str, str]] = asyncio.Queue()
        for kind in ("lifespan.startup", "lifespan.shutdown"):
            inbox.put_nowait({"type": kind})

        async def send(message: Any) -> None:
            told.append(dict(message))

        try:
            await lifespan(app)({"type": "lifespan"}, inbox.get, send)
        except Exception as exc:
            raised.append(exc)

    asyncio.run(run())
    return told, raised[0] if raised else None


def _track(message_id: str) -> None:
    from cdpmp import analytics

    assert analytics.track(user_id="u", event="E", message_id=message_id)[0]


@pytest.mark.parametrize("speaks_lifespan", [True, False], ids=["app-speaks-lifespan", "app-does-not"])
def test_lifespan_wrapper_drains_after_the_apps_own_shutdown(
    speaks_lifespan: bool, collector: Collector
) -> None:
    from cdpmp import analytics

    async def app(scope: Any, receive: Any, send: Any) -> None:
        analytics.track(user_id="u", event="Started", message_id="started")
        if not speaks_lifespan:
            raise RuntimeError("lifespan unsupported")
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                analytics.track(user_id="u", event="Stopping", message_id="stopping")
                await send({"type": "lifespan.shutdown.complete"})
                return

    told, raised = _cycle(app, collector)
    assert [m["type"] for m in told] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert raised is None
    # A 30 s upload interval: only the drain at shutdown can have sent these.
    expected = ["started", "stopping"] if speaks_lifespan else ["started"]
    assert sorted(collector.message_ids()) == expected


def test_an_app_that_returns_on_the_lifespan_scope_is_answered_for_and_drained(collector: Collector) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        _track("at-import-like")
        if scope["type"] != "http":
            return  # many small apps do this

    told, raised = _cycle(app, collector)
    assert [m["type"] for m in told] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert raised is None
    # A 30 s interval: only the drain at shutdown can have sent it.
    assert collector.message_ids() == ["at-import-like"]


def test_an_app_that_raises_in_its_startup_tells_the_server_and_is_drained(collector: Collector) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        _track("before-the-failure")
        raise RuntimeError("database unreachable")

    told, raised = _cycle(app, collector)
    assert [m["type"] for m in told] == ["lifespan.startup.failed"]
    assert "database unreachable" in told[0]["message"]  # Uvicorn logs this message
    assert isinstance(raised, RuntimeError)  # and the server sees the exception
    assert collector.message_ids() == ["before-the-failure"]


def test_an_app_that_raises_in_its_shutdown_is_drained_and_the_server_told(collector: Collector) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        _track("in-shutdown")
        raise RuntimeError("cannot close the pool")

    told, raised = _cycle(app, collector)
    assert [m["type"] for m in told] == ["lifespan.startup.complete", "lifespan.shutdown.failed"]
    assert "cannot close the pool" in told[1]["message"]
    assert isinstance(raised, RuntimeError)
    assert collector.message_ids() == ["in-shutdown"]


def test_starlette_startup_failure_reaches_the_server_after_the_drain(collector: Collector) -> None:
    from contextlib import asynccontextmanager

    starlette = pytest.importorskip("starlette.applications", reason="the core suite runs without it")

    @asynccontextmanager
    async def failing(app: Any) -> Any:
        _track("starlette-startup")
        raise RuntimeError("no config")
        yield  # pragma: no cover

    told, raised = _cycle(starlette.Starlette(lifespan=failing), collector)
    assert [m["type"] for m in told] == ["lifespan.startup.failed"]  # Starlette's own answer
    assert "no config" in told[0]["message"]
    assert isinstance(raised, RuntimeError)
    assert collector.message_ids() == ["starlette-startup"]


def test_the_wrapped_fastapi_app_is_still_the_app() -> None:
    pytest.importorskip("fastapi", reason="the core suite runs without it")
    from fastapi import APIRouter, FastAPI
    from fastapi.middleware.gzip import GZipMiddleware

    from cdpmp.integrations.asgi import lifespan

    inner = FastAPI()
    app = lifespan(inner)
    router = APIRouter()

    @router.get("/r")
    def r() -> Dict[str, str]:
        return {"from": "router"}

    @app.get("/a")  # type: ignore[attr-defined]
    def a() -> Dict[str, Any]:
        return {"ready": app.state.ready}  # type: ignore[attr-defined]

    app.include_router(router)  # type: ignore[attr-defined]
    app.add_middleware(GZipMiddleware)  # type: ignore[attr-defined]
    app.state.ready = True  # type: ignore[attr-defined]
    app.title = "renamed"  # type: ignore[attr-defined]
    assert isinstance(app, FastAPI) and inner.title == "renamed"
    assert lifespan(app) is app  # wrapping twice is harmless
    assert _get(app, "/a") == (200, b'{"ready":true}')
    assert _get(app, "/r") == (200, b'{"from":"router"}')


def _get(app: LifespanApp, path: str) -> Tuple[int, bytes]:
    """One HTTP GET through the ASGI interface (no client library needed)."""
    answer: Dict[str, Any] = {"body": b""}

    async def run() -> None:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
                 "root_path": "", "headers": [(b"host", b"test")], "client": ("127.0.0.1", 1),
                 "server": ("test", 80)}  # fmt: skip
        requests = [{"type": "http.request", "body": b"", "more_body": False}]

        async def receive() -> Dict[str, Any]:
            return requests.pop() if requests else {"type": "http.disconnect"}

        async def send(message: Dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
            else:
                answer["body"] += message.get("body", b"")

        await app(scope, receive, send)

    asyncio.run(run())
    return answer["status"], answer["body"]


def test_the_readme_asgi_lines_are_the_ones_the_fastapi_app_pastes() -> None:
    app_source = (Path(__file__).parent / "apps" / "fastapi_app.py").read_text()
    pasted = app_source.split("# -- the README's lines, verbatim")[1].split("# -- end of the README's lines")[
        0
    ]
    lines = [line.split("  #")[0] for line in pasted.splitlines()[1:] if line.strip()]
    readme = (ROOT / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| Uvicorn, FastAPI"))
    assert lines == ["from cdpmp.integrations.asgi import lifespan", "app = lifespan(app)"]
    assert all(f"`{line}`" in row for line in lines), row


@pytest.mark.servers
@pytest.mark.timeout(180)
@pytest.mark.parametrize("path", ["/", "/sync"], ids=["async-route", "threadpool-route"])
def test_fastapi_with_the_readme_lines_under_uvicorn_workers(
    path: str, tmp_path: Path, collector: Collector
) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port), "--no-access-log"]
    cmd += ["--workers", "2", "tests.apps.fastapi_app:app"]
    server = start_server(cmd, collector, tmp_path / "server.log", port, CDP_UPLOAD_INTERVAL="5")
    ok = load(server.port, 200, k=3) if path == "/" else _load_path(server.port, path)
    assert server.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    assert len(ok) == 200, server.output(5000)
    assert_exactly_once(collector, ok, 3, import_events=0)


def _load_path(port: int, path: str) -> List[str]:
    from tests.servers import get

    return [rid for rid in (f"s{n}" for n in range(200)) if get(port, f"{path}?id={rid}&k=3") == b"ok"]


@pytest.mark.servers
@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", ["uvicorn-workers", "gunicorn-uvicornworker"])
def test_asgi_servers_without_the_wrapper_lose_nothing(
    how: str, tmp_path: Path, collector: Collector
) -> None:
    # The app forgot the ASGI line. Uvicorn re-raises SIGTERM after its graceful stop;
    # cdpmp drains at the end of its shutdown (adopted server) or from the re-raised
    # signal (gunicorn's UvicornWorker, armed by the gunicorn.conf.py line).
    port = free_port()
    app = "tests.apps.asgi_app:app"
    if how == "gunicorn-uvicornworker":
        cmd = gunicorn_command(port, "-k", "uvicorn.workers.UvicornWorker", app=app)
    else:
        cmd = [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port), "--no-access-log"]
        cmd += ["--workers", "4", app]
    env = {"CDP_UPLOAD_INTERVAL": "5", "APP_NO_WRAPPER": "1"}
    server = start_server(cmd, collector, tmp_path / "server.log", port, **env)
    ok = load(server.port, 300, k=3)
    server.stop(signal.SIGTERM)
    assert len(ok) == 300, server.output(5000)
    assert_exactly_once(collector, ok, 3, import_events=0)
