"""Real gunicorn, 4 workers, events counted by messageId at the collector.

Each test starts gunicorn as a subprocess on 127.0.0.1, loads it, stops the master
with SIGTERM, and then requires every event of every successful request to have
arrived exactly once.
"""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

import pytest

from cdpmp.testing import Collector
from tests import pythons
from tests.servers import (
    Server,
    assert_exactly_once,
    expected_ids,
    free_port,
    gunicorn_command,
    load,
    server_env,
    start_server,
)

pytestmark = [pytest.mark.servers, pytest.mark.timeout(180)]
# --preload, and every worker recycled after 20-30 requests.
RECYCLING = ("--preload", "--max-requests", "20", "--max-requests-jitter", "10")


def gunicorn(
    tmp_path: Path,
    collector: Collector,
    *args: str,
    python_flags: List[str] = (),  # type: ignore[assignment]
    python: str = sys.executable,
    **env: str,
) -> Server:
    port = free_port()
    cmd = gunicorn_command(port, *args, python_flags=python_flags, python=python)
    return start_server(cmd, collector, tmp_path / "gunicorn.log", port, **env)


@pytest.mark.parametrize("preload", [True, False], ids=["preload", "no-preload"])
def test_sync_workers_deliver_everything(preload: bool, tmp_path: Path, collector: Collector) -> None:
    args = ["--preload"] if preload else []
    server = gunicorn(tmp_path, collector, *args, APP_TRACK_AT_IMPORT="1")
    ok = load(server.port, 400, k=3)
    assert server.stop(signal.SIGTERM) == 0, server.output(5000)
    assert len(ok) == 400
    # --preload: the app module (and its import-time event) lives in the master only.
    assert_exactly_once(collector, ok, 3, import_events=1 if preload else 4)


def test_gthread_workers_deliver_everything(tmp_path: Path, collector: Collector) -> None:
    server = gunicorn(
        tmp_path,
        collector,
        "--preload",
        "--worker-class",
        "gthread",
        "--threads",
        "4",
        APP_TRACK_AT_IMPORT="1",
    )
    ok = load(server.port, 400, k=3, concurrency=12)
    assert server.stop(signal.SIGTERM) == 0, server.output(5000)
    assert len(ok) == 400
    assert_exactly_once(collector, ok, 3, import_events=1)


def test_max_requests_recycling_under_load_delivers_everything(tmp_path: Path, collector: Collector) -> None:
    server = gunicorn(tmp_path, collector, *RECYCLING, APP_TRACK_AT_IMPORT="1")
    ok = load(server.port, 600, k=2)
    assert server.stop(signal.SIGTERM) == 0, server.output(5000)
    assert server.output().count("Autorestarting worker") >= 4  # workers really recycled
    assert_exactly_once(collector, ok, 2, import_events=1)


def test_master_sigterm_under_load_delivers_everything_answered(tmp_path: Path, collector: Collector) -> None:
    server = gunicorn(tmp_path, collector, "--preload")
    ok: List[str] = []
    loader = threading.Thread(target=lambda: ok.extend(load(server.port, 100_000, k=2, duration=8.0)))
    loader.start()
    time.sleep(2.0)
    assert server.stop(signal.SIGTERM) == 0, server.output(5000)
    loader.join(30)
    assert len(ok) > 50
    expected = set(expected_ids(ok, 2))
    assert collector.wait_for(len(expected), timeout=30)
    counts = collections.Counter(collector.message_ids())
    assert {mid: n for mid, n in counts.items() if n > 1} == {}
    # Every answered request's events arrived. A request whose worker tracked but
    # whose answer was cut by the shutdown may add its events too: those are extra,
    # never duplicates.
    missing = expected - set(counts)
    assert missing == set()


def test_preload_master_that_does_not_track_raises_no_deprecation_warning(
    tmp_path: Path, collector: Collector
) -> None:
    # Python 3.12+ warns (DeprecationWarning) when a multi-threaded process forks.
    # cdpmp starts no thread at import, so a master that never tracks stays silent.
    server = gunicorn(tmp_path, collector, "--preload", python_flags=["-W", "error::DeprecationWarning"])
    ok = load(server.port, 100, k=1)
    assert server.stop(signal.SIGTERM) == 0, server.output(5000)
    assert "DeprecationWarning" not in server.output()
    assert_exactly_once(collector, ok, 1, import_events=0)


@pytest.mark.timeout(900)  # the first run builds a venv (tests/pythons.py)
@pytest.mark.parametrize("mode", ["direct", "shared"])
def test_preload_master_that_tracked_forks_no_thread_on_python_3_12_plus(
    mode: str, tmp_path: Path, collector: Collector, request: pytest.FixtureRequest
) -> None:
    # The master tracks at import, so its sender (direct) or watch (shared) thread is
    # alive when gunicorn forks the workers: the pre_fork hook must send what it holds
    # and end those threads first, or Python 3.12 warns per worker ("This process is
    # multi-threaded, use of fork() may lead to deadlocks in the child"). Shown with
    # "always": under "-W error::DeprecationWarning" CPython (3.12.1, 3.13.0 here) turns
    # this warning into an exception it then discards, so nothing would be seen at all.
    python = next((p for p in (_venv_or_none(v) for v in ("3.12", "3.13")) if p), None)
    if python is None:
        pytest.skip("no Python 3.12 or 3.13 on PATH or under pyenv")
    env = {"APP_TRACK_AT_IMPORT": "1", "CDP_MODE": mode}
    if mode == "shared":
        env["CDP_RUNTIME_DIR"] = request.getfixturevalue("runtime_dir")
    flags = ["-W", "always::DeprecationWarning"]
    server = gunicorn(tmp_path, collector, "--preload", python_flags=flags, python=python, **env)
    ok = load(server.port, 200, k=2)
    assert server.stop(signal.SIGTERM) == 0, server.output(5000)
    assert "multi-threaded" not in server.output(), server.output(5000)
    assert_exactly_once(collector, ok, 2, import_events=1)


def _venv_or_none(version: str) -> Optional[str]:
    try:
        return str(pythons.venv(version, [], ["gunicorn>=21"]))
    except LookupError:
        return None


def test_shared_mode_preload_recycling_then_sigterm(
    tmp_path: Path, collector: Collector, runtime_dir: str
) -> None:
    from tests.conftest import uploader_processes

    server = gunicorn(
        tmp_path,
        collector,
        *RECYCLING,
        APP_TRACK_AT_IMPORT="1",
        CDP_MODE="shared",
        CDP_RUNTIME_DIR=runtime_dir,
    )
    seen: set[int] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.update(p.pid for p in uploader_processes(runtime_dir))
            stop.wait(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        ok = load(server.port, 600, k=2)
        assert server.stop(signal.SIGTERM) == 0, server.output(5000)
    finally:
        stop.set()
        watcher.join(10)
    assert server.output().count("Autorestarting worker") >= 4
    assert len(seen) == 1  # one uploader the whole time, across every worker recycle
    assert uploader_processes(runtime_dir) == []  # on_exit stopped it
    assert_exactly_once(collector, ok, 2, import_events=1)


def test_shared_mode_stop_with_the_endpoint_down_says_no_loss_and_loses_nothing(
    tmp_path: Path, collector: Collector, runtime_dir: str
) -> None:
    # The events are in the host's ring: a worker has nothing to drain, the uploader
    # stops at its first failure instead of waiting out its deadline, and no line
    # speaks of a loss. Once the endpoint is back, the next uploader sends them.
    from cdpmp.testing import Conditions, Outage
    from tests.conftest import uploader_processes

    server = gunicorn(tmp_path, collector, CDP_MODE="shared", CDP_RUNTIME_DIR=runtime_dir)
    collector.set_conditions(Conditions(outages=(Outage(0, 3600, 503),)))
    ok = load(server.port, 100, k=1)
    assert server.stop(signal.SIGTERM) == 0, server.output(5000)
    output = server.output()
    assert len(ok) == 100, output[-5000:]
    assert [ln for ln in output.splitlines() if "cdpmp" in ln] == [], output[-5000:]
    log = Path(runtime_dir, "uploader.log").read_text()
    assert "the endpoint is failing at the stop" in log and "drain deadline passed" not in log, log[-3000:]
    assert uploader_processes(runtime_dir) == [] and collector.message_ids() == []
    collector.set_conditions(Conditions())
    done = subprocess.run(  # the next producer of the host: it starts an uploader
        [sys.executable, "-c", "import cdpmp; c = cdpmp.Client(mode='shared'); print(c.flush(30))"],
        env=server_env(collector.url, collector.write_key, CDP_RUNTIME_DIR=runtime_dir),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert collector.wait_for(100, timeout=30), done.stdout + done.stderr
    assert_exactly_once(collector, ok, 1, import_events=0)
