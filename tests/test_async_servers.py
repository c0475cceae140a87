"""The servers people deploy beyond sync workers: gunicorn's gevent workers, Uvicorn
(alone and under gunicorn's ``UvicornWorker``) and uWSGI in shared mode, each with the
collector behind TLS as the real endpoint is (a CA made at test time, trusted through
``SSL_CERT_FILE``). Every event of every answered request arrives exactly once after
a graceful stop, counted by messageId.
"""

from __future__ import annotations

import signal
import ssl
import sys
from pathlib import Path
from typing import Iterator, List

import pytest
import trustme

from cdpmp.testing import Collector
from tests.servers import Server, assert_exactly_once, free_port, load, server_env

pytestmark = [pytest.mark.servers, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_collector(ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Collector]:
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))  # inherited by the servers
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    with Collector(tls=context) as collector:
        yield collector


def _mode_env(mode: str, request: pytest.FixtureRequest) -> dict[str, str]:
    if mode == "shared":
        return {"CDP_MODE": "shared", "CDP_RUNTIME_DIR": request.getfixturevalue("runtime_dir")}
    return {}


def _gunicorn(tmp_path: Path, collector: Collector, args: List[str], app: str, **env: str) -> Server:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "gunicorn",
        "-c",
        "tests/apps/gunicorn_conf.py",
        "--bind",
        f"127.0.0.1:{port}",
    ]
    cmd += ["--workers", "4", "--graceful-timeout", "20", *args, app]
    server = Server(cmd, server_env(collector.url, collector.write_key, **env), tmp_path / "server.log", port)
    server.wait_ready()
    return server


@pytest.mark.parametrize("mode", ["direct", "shared"])
@pytest.mark.parametrize("preload", [False, True], ids=["no-preload", "preload-track-at-import"])
def test_gevent_workers_over_https(
    mode: str, preload: bool, tmp_path: Path, tls_collector: Collector, request: pytest.FixtureRequest
) -> None:
    args = ["-k", "gevent", "--worker-connections", "50"] + (["--preload"] if preload else [])
    env = _mode_env(mode, request)
    if preload:
        env["APP_TRACK_AT_IMPORT"] = "1"
    server = _gunicorn(tmp_path, tls_collector, args, "tests.apps.wsgi_app:app", **env)
    ok = load(server.port, 300, k=3)
    server.stop(signal.SIGTERM)
    output = server.output()
    assert len(ok) == 300, output[-5000:]
    assert [line for line in output.splitlines() if "cdpmp:" in line] == [], output[-5000:]
    assert_exactly_once(tls_collector, ok, 3, import_events=1 if preload else 0)
