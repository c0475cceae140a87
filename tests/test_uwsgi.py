"""Real uWSGI (the PyPI build), a master and 4 processes, events counted by messageId.

Without ``lazy-apps`` the app is loaded in the master and workers are forked from C:
no Python fork hook runs, so only cdpmp's pid check protects them.
"""

from __future__ import annotations

import shutil
import signal
import sys
from pathlib import Path

import pytest

from cdpmp.prometheus import read_counters
from cdpmp.testing import Collector, Conditions, Outage
from tests.servers import BIN, Server, assert_exactly_once, free_port, load, server_env

pytestmark = [pytest.mark.servers, pytest.mark.timeout(180)]
UWSGI = shutil.which("uwsgi", path=str(BIN))


def uwsgi(tmp_path: Path, collector: Collector, *args: str, **env: str) -> Server:
    if UWSGI is None:
        pytest.fail("uwsgi is not installed: install the project with '.[test]'")
    port = free_port()
    cmd = [
        UWSGI,
        "--http-socket",
        f"127.0.0.1:{port}",
        "--master",
        "--processes",
        "4",
        # uWSGI 2.0 treats SIGTERM as a brutal reload; this makes it a graceful stop.
        "--hook-master-start",
        "unix_signal:15 gracefully_kill_them_all",
        "--need-app",
        "--disable-logging",
        "--virtualenv",
        sys.prefix,
        "--module",
        "tests.apps.wsgi_app:app",
        *args,
    ]
    server = Server(cmd, server_env(collector.url, collector.write_key, **env), tmp_path / "uwsgi.log", port)
    server.wait_ready()
    return server


@pytest.mark.parametrize("lazy", [False, True], ids=["fork-from-master", "lazy-apps"])
def test_uwsgi_with_threads_delivers_everything(lazy: bool, tmp_path: Path, collector: Collector) -> None:
    args = ["--enable-threads"] + (["--lazy-apps"] if lazy else [])
    server = uwsgi(tmp_path, collector, *args, APP_TRACK_AT_IMPORT="1")
    if lazy:  # every worker imports the app itself; wait until all four did
        server.wait_log("WSGI app 0 (mountpoint='') ready", 4)
    ok = load(server.port, 400, k=3)
    server.stop(signal.SIGTERM)
    assert len(ok) == 400, server.output(5000)
    # Without lazy-apps the import-time event is tracked once, in the master.
    assert_exactly_once(collector, ok, 3, import_events=4 if lazy else 1)


def test_uwsgi_without_threads_warns_and_delivers_inline(tmp_path: Path, collector: Collector) -> None:
    server = uwsgi(tmp_path, collector, APP_TRACK_AT_IMPORT="1")
    ok = load(server.port, 300, k=3)
    server.stop(signal.SIGTERM)
    output = server.output()
    assert "uWSGI is running without enable-threads" in output
    assert len(ok) == 300, output[-5000:]
    assert_exactly_once(collector, ok, 3, import_events=1)


@pytest.mark.parametrize("threads", [False, True], ids=["no-threads", "enable-threads"])
def test_uwsgi_shared_mode_starts_its_uploader_over_https(
    threads: bool, tmp_path: Path, tls_collector: Collector, runtime_dir: str
) -> None:
    # Under uWSGI sys.executable is the uwsgi binary: the uploader must be started
    # with this environment's python, or nothing is delivered.
    args = ["--enable-threads"] if threads else []
    server = uwsgi(
        tmp_path,
        tls_collector,
        *args,
        APP_TRACK_AT_IMPORT="1",
        CDP_MODE="shared",
        CDP_RUNTIME_DIR=runtime_dir,
    )
    ok = load(server.port, 300, k=3)
    server.stop(signal.SIGTERM)
    output = server.output()
    assert len(ok) == 300, output[-5000:]
    assert [line for line in output.splitlines() if "cdpmp:" in line] == [], output[-5000:]
    assert_exactly_once(tls_collector, ok, 3, import_events=1)
    log = Path(runtime_dir, "uploader.log")
    assert "Traceback" not in (log.read_text() if log.is_file() else "")


def test_master_tracking_at_import_boots_while_the_endpoint_hangs(
    tmp_path: Path, collector: Collector, runtime_dir: str
) -> None:
    # The endpoint takes every connection and never answers. The master (threadless:
    # workers are forked from C) sends its import-time event inline: it must give up
    # within its boot budget, not block boot for CDP_TIMEOUT (60 s, beyond the 30 s
    # readiness deadline). After boot it runs no Python, not even at exit, so it hands
    # the event to the host's uploader, which delivers it once the endpoint is back.
    collector.set_conditions(Conditions(latency=120, outages=(Outage(0, 3600, None),)))
    server = uwsgi(
        tmp_path,
        collector,
        "--enable-threads",
        APP_TRACK_AT_IMPORT="1",
        CDP_TIMEOUT="60",
        CDP_RUNTIME_DIR=runtime_dir,
    )
    collector.set_conditions(Conditions())
    ok = load(server.port, 100, k=3)
    server.stop(signal.SIGTERM)
    assert len(ok) == 100, server.output(5000)
    assert_exactly_once(collector, ok, 3, import_events=1)
    _, host = read_counters(runtime_dir)  # the one event went through the host's ring
    assert host is not None and (host["accepted"], host["sent"]) == (1, 1)
