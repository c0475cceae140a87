"""The servers people deploy beyond sync workers: gunicorn's gevent workers, eventlet,
Uvicorn (alone and under gunicorn's ``UvicornWorker``; uWSGI's are in test_uwsgi), each with the
collector behind TLS as the real endpoint is (a CA made at test time, trusted through
``SSL_CERT_FILE``). Every event of every answered request arrives exactly once after
a graceful stop, counted by messageId.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import List

import pytest

from cdpmp.testing import Collector, Conditions, Outage
from tests.servers import Server, assert_exactly_once, free_port, gunicorn_command, load, start_server

pytestmark = [pytest.mark.servers, pytest.mark.timeout(180)]


def _mode_env(mode: str, request: pytest.FixtureRequest) -> dict[str, str]:
    if mode == "shared":
        return {"CDP_MODE": "shared", "CDP_RUNTIME_DIR": request.getfixturevalue("runtime_dir")}
    return {}


def _gunicorn(tmp_path: Path, collector: Collector, args: List[str], app: str, **env: str) -> Server:
    port = free_port()
    # A short graceful timeout: gunicorn 27's gevent workers sometimes leave an idle
    # worker waiting it out on SIGTERM (seen with no client in the app at all).
    cmd = gunicorn_command(port, *args, app=app, graceful=5)
    return start_server(cmd, collector, tmp_path / "server.log", port, **env)


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
    # 30 s per request: on 2 cores shared with other tests, a gevent worker's first
    # request (its TLS context, in shared mode the uploader's start) once took over 10.
    ok = load(server.port, 300, k=3, timeout=30)
    server.stop(signal.SIGTERM)
    output = server.output()
    assert len(ok) == 300, output[-5000:]
    assert [line for line in output.splitlines() if "cdpmp:" in line] == [], output[-5000:]
    if not preload:  # the conf line imports cdpmp in the master, but not urllib3 (ssl)
        assert "MonkeyPatchWarning" not in output, output[-5000:]
    assert_exactly_once(tls_collector, ok, 3, import_events=1 if preload else 0)


def _uvicorn(tmp_path: Path, collector: Collector, how: str, **env: str) -> Server:
    port = free_port()
    app = "tests.apps.asgi_app:app"
    if how.startswith("hypercorn"):
        workers = ["--workers", "4"] if how == "hypercorn-workers" else []
        cmd = [sys.executable, "-m", "hypercorn", "--bind", f"127.0.0.1:{port}", *workers, app]
    elif how == "gunicorn-uvicornworker":
        cmd = gunicorn_command(port, "-k", "uvicorn.workers.UvicornWorker", app=app)
    else:
        cmd = [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port), "--no-access-log"]
        cmd += ["--workers", "4", app] if how == "uvicorn-workers" else [app]
    return start_server(cmd, collector, tmp_path / "server.log", port, **env)


@pytest.mark.parametrize("mode", ["direct", "shared"])
@pytest.mark.parametrize("how", ["uvicorn", "uvicorn-workers", "gunicorn-uvicornworker", "hypercorn"])
def test_asgi_graceful_stop_delivers_everything_over_https(
    how: str, mode: str, tmp_path: Path, tls_collector: Collector, request: pytest.FixtureRequest
) -> None:
    # A long interval: without the lifespan drain, every event still queued at the
    # stop would be lost (the server dies by its re-raised SIGTERM).
    server = _uvicorn(tmp_path, tls_collector, how, CDP_UPLOAD_INTERVAL="5", **_mode_env(mode, request))
    ok = load(server.port, 300, k=3)
    server.stop(signal.SIGTERM)
    output = server.output()
    assert len(ok) == 300, output[-5000:]
    assert [line for line in output.splitlines() if "cdpmp:" in line] == [], output[-5000:]
    assert_exactly_once(tls_collector, ok, 3, import_events=0)


def test_hypercorn_workers_in_shared_mode(tmp_path: Path, tls_collector: Collector, runtime_dir: str) -> None:
    # hypercorn --workers N terminates the workers still shutting down as soon as one
    # has exited, which can cut a direct-mode drain (README); shared mode keeps the
    # events in the host's ring, outside the workers.
    env = {"CDP_UPLOAD_INTERVAL": "5", "CDP_MODE": "shared", "CDP_RUNTIME_DIR": runtime_dir}
    server = _uvicorn(tmp_path, tls_collector, "hypercorn-workers", **env)
    ok = load(server.port, 300, k=3)
    server.stop(signal.SIGTERM)
    assert len(ok) == 300, server.output(5000)
    assert_exactly_once(tls_collector, ok, 3, import_events=0)


@pytest.mark.parametrize("mode", ["direct", "shared"])
def test_eventlet_patched_after_cdpmp_was_imported_over_https(
    mode: str, tls_collector: Collector, request: pytest.FixtureRequest
) -> None:
    # gunicorn 27 dropped its eventlet worker; eventlet apps patch at startup like this,
    # often after a settings module already imported cdpmp (hence urllib3 and ssl).
    script = f"""
        import cdpmp
        import eventlet
        eventlet.monkey_patch()
        client = cdpmp.Client({tls_collector.write_key!r}, endpoint={tls_collector.url!r}, upload_interval=0.05)
        def work(g):
            for j in range(50):
                assert client.track("u", "E", message_id=f"m{{g}}-{{j}}")[0]
                eventlet.sleep(0)
        pool = eventlet.GreenPool()
        for g in range(10):
            pool.spawn(work, g)
        pool.waitall()
        assert client.flush(30)
    """
    env = {**os.environ, **_mode_env(mode, request)}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=90, env=env
    )
    assert done.returncode == 0, done.stderr[-5000:]
    # cdpmp's own lines (warnings, errors) start with "cdpmp"; a line that only names a
    # path (a dependency's warning in a checkout named cdpmp) is not ours
    ours = [line for line in done.stderr.splitlines() if line.lstrip().startswith(("cdpmp", "Traceback"))]
    assert ours == [], done.stderr[-5000:]
    assert tls_collector.wait_for(500, timeout=30)
    assert sorted(tls_collector.message_ids()) == sorted(f"m{g}-{j}" for g in range(10) for j in range(50))


@pytest.mark.parametrize("mode", ["direct", "shared"])
@pytest.mark.parametrize("setup", ["gevent-preload", "uvicorn-workers"])
def test_new_server_setups_behind_a_slow_endpoint_with_an_outage(
    setup: str, mode: str, tmp_path: Path, tls_collector: Collector, request: pytest.FixtureRequest
) -> None:
    # Production conditions: 100-150 ms per answer over TLS, and a 3 s 503 outage that
    # the load runs into; the server is stopped 1 s after the endpoint is back. Every
    # event of every answered request still arrives exactly once.
    env = _mode_env(mode, request)
    if setup == "gevent-preload":
        env["APP_TRACK_AT_IMPORT"] = "1"
        args = ["-k", "gevent", "--worker-connections", "50", "--preload"]
        server = _gunicorn(tmp_path, tls_collector, args, "tests.apps.wsgi_app:app", **env)
    else:
        server = _uvicorn(tmp_path, tls_collector, setup, **env)
    outage = Outage(0.0, 3.0, 503)
    tls_collector.set_conditions(Conditions(latency=0.1, jitter=0.05, outages=(outage,), seed=7))
    began = time.monotonic()
    ok = load(server.port, 300, k=3)
    time.sleep(max(0.0, began + 4.0 - time.monotonic()))
    server.stop(signal.SIGTERM)
    output = server.output()
    assert len(ok) == 300, output[-5000:]
    assert [line for line in output.splitlines() if "cdpmp:" in line] == [], output[-5000:]
    assert_exactly_once(tls_collector, ok, 3, import_events=1 if setup == "gevent-preload" else 0)
    assert any(r.status == 503 for r in tls_collector.requests)  # the outage was met


def test_greenlets_that_build_shared_mode_while_the_host_lock_is_busy_never_deadlock(
    collector: Collector, runtime_dir: str
) -> None:
    # As in a gunicorn gevent worker: cdpmp imported before gevent patched threading (the
    # conf line runs in the master), so its module-level locks are OS locks. The first
    # greenlet builds the client under one while the uploader holds the host lock; a
    # wait that switched greenlets there let the next greenlet block the OS thread on
    # that lock, and the worker hung for good (CI: 298 of 300 requests answered).
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import fcntl, os, sys
            os.makedirs({runtime_dir!r}, mode=0o700, exist_ok=True)
            fd = os.open(os.path.join({runtime_dir!r}, "ring.lock"), os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            print("held", flush=True)
            sys.stdin.readline()  # released when this process ends
        """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    script = textwrap.dedent(f"""
        import sys
        from cdpmp import analytics
        from gevent import monkey
        monkey.patch_all()
        import gevent
        import cdpmp.shared.ring
        cdpmp.shared.ring.LOCK_WAIT = 30.0  # however late the release comes on a busy machine
        analytics.write_key, analytics.endpoint = {collector.write_key!r}, {collector.url!r}
        print("ready", flush=True)  # the host lock is released 0.3 s later
        jobs = [gevent.spawn(analytics.track, "u", "E", message_id=f"g-{{i}}") for i in range(4)]
        gevent.joinall(jobs, timeout=20)
        print(sorted(job.value[0] for job in jobs if job.ready()), flush=True)
        analytics.flush(20)
    """)
    env = {**os.environ, "CDP_MODE": "shared", "CDP_RUNTIME_DIR": runtime_dir}
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        time.sleep(0.3)
        holder.communicate("release\n", timeout=10)
        out, err = child.communicate(timeout=60)
    finally:
        for proc in (holder, child):
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert child.returncode == 0 and "[True, True, True, True]" in out, err[-3000:]
    assert "cdpmp" not in err, err[-3000:]  # shared mode as asked: no fallback, no warning
    assert collector.wait_for(4, timeout=20)
    assert sorted(collector.message_ids()) == [f"g-{i}" for i in range(4)]
