"""The README's "without it" column, row by row: each setup run WITHOUT its line, and
the outcome the row states asserted, so that the table says what happens (a row whose
claim stops being true fails here). Rows whose "without it" case other modules already
run are named in the README's table note: Celery (tests/test_celery.py, the line
forgotten), the ASGI wrapper (tests/test_asgi.py, ``APP_NO_WRAPPER``), scripts and
``docker stop`` (tests/test_exits.py)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cdpmp.testing import Collector, Conditions, Outage
from tests.servers import (
    ROOT,
    assert_exactly_once,
    free_port,
    gunicorn_command,
    load,
    runserver_command,
    start_server,
    ticks_while,
)
from tests.test_beyond_servers import INVOCATIONS, PER_INVOCATION, run_lambda_environment
from tests.test_uwsgi import uwsgi

pytestmark = [pytest.mark.servers, pytest.mark.timeout(180)]


def test_gunicorn_without_the_line_still_drains_a_normal_stop(tmp_path: Path, collector: Collector) -> None:
    # --preload, the master tracks at import: atexit drains every worker (and the master).
    port = free_port()
    cmd = gunicorn_command(port, "--preload", conf=False)
    server = start_server(cmd, collector, tmp_path / "gunicorn.log", port, APP_TRACK_AT_IMPORT="1")
    ok = load(server.port, 200, k=3)
    server.stop(signal.SIGTERM)
    assert len(ok) == 200, server.output(5000)
    assert_exactly_once(collector, ok, 3, import_events=1)


@pytest.mark.parametrize("line", [False, True], ids=["without-it", "with-it"])
def test_gunicorn_behind_a_down_endpoint_the_line_makes_the_loss_counted(
    line: bool, tmp_path: Path, collector: Collector
) -> None:
    # Without the line the atexit drain waits exit_timeout (10 s), past gunicorn's
    # graceful_timeout (2 s here): gunicorn SIGKILLs the worker and the loss is silent.
    # With it the drain ends within 0.8 x graceful_timeout and says what it lost.
    collector.set_conditions(Conditions(outages=(Outage(0, 3600, 503),)))
    port = free_port()
    cmd = gunicorn_command(port, graceful=2, conf=line)
    server = start_server(cmd, collector, tmp_path / "gunicorn.log", port, CDP_EXIT_TIMEOUT="10")
    ok = load(server.port, 20, k=1)
    assert len(ok) == 20, server.output(5000)
    server.stop(signal.SIGTERM)
    output = server.output()
    told = [ln for ln in output.splitlines() if "cdpmp" in ln and ("lost" in ln or "dropped" in ln)]
    assert collector.message_ids() == []
    assert bool(told) is line, output[-5000:]


def test_uwsgi_without_setup_or_threads_delivers_late_but_everything(
    tmp_path: Path, collector: Collector
) -> None:
    # No setup(), no enable-threads, the master tracks at import: the sender thread only
    # runs while a request runs Python, the rest goes at each worker's exit (atexit).
    server = uwsgi(tmp_path, collector, APP_TRACK_AT_IMPORT="1", APP_NO_SETUP="1")
    ok = load(server.port, 200, k=2)
    server.stop(signal.SIGTERM)
    output = server.output()
    assert len(ok) == 200, output[-5000:]
    assert "enable-threads" not in output  # nobody said anything: setup() is what warns
    assert_exactly_once(collector, ok, 2, import_events=1)


def test_django_runserver_in_direct_mode_loses_what_its_child_queued(
    tmp_path: Path, collector: Collector
) -> None:
    # The reloader SIGKILLs the serving child: 50 events queued (under one batch, within
    # a 30 s interval) die with it. The shared-mode case: tests/test_exits.py.
    pytest.importorskip("django", reason="the core suite runs without it")
    port = free_port()
    cmd = runserver_command(port)
    server = start_server(cmd, collector, tmp_path / "server.log", port, CDP_UPLOAD_INTERVAL="30")
    ok = load(server.port, 50, k=1)
    server.stop(signal.SIGTERM)
    assert len(ok) == 50, server.output(5000)
    time.sleep(1)
    assert collector.message_ids() == [], collector.summary()


def test_lambda_without_the_decorator_loses_what_was_queued_at_the_freeze(collector: Collector) -> None:
    # A batch waits up to upload_interval (5 s here, longer than the freeze): what the
    # last invocation tracked is still queued when the environment is frozen, then
    # reaped. (With the default 0.5 s it is a race: 27-33 of 36 measured, sometimes all.)
    collector.set_conditions(Conditions(latency=0.05))
    tracked = run_lambda_environment(collector, "bare", CDP_UPLOAD_INTERVAL="5")
    time.sleep(0.5)
    ids = collector.message_ids()
    last = {f"i{INVOCATIONS - 1}-{j}" for j in range(PER_INVOCATION)}
    assert len(ids) == len(set(ids)) and set(ids) <= set(tracked) - last, sorted(set(ids) & last)


def test_flush_in_a_coroutine_stops_the_event_loop_while_it_waits(collector: Collector) -> None:
    # The asyncio row: the blocking flush() lets no other task run for its whole wait
    # (aflush() does: tests/test_beyond_servers.py).
    collector.set_conditions(Conditions(latency=0.3))
    from cdpmp import Client

    client = Client(collector.write_key, endpoint=collector.url, upload_interval=60.0)
    for i in range(300):
        assert client.track(user_id="u", event="E", message_id=f"f-{i}")[0]
    try:
        during, drained, _ = asyncio.run(ticks_while(lambda: client.flush(30)))
        assert drained is True and during == 0
    finally:
        client.shutdown(5)
    assert sorted(collector.message_ids()) == sorted(f"f-{i}" for i in range(300))


def test_a_backfill_without_block_on_full_is_refused_past_the_queue_and_counted() -> None:
    # 30,000 events flat out against a 20 ms endpoint with the default queue (10,000):
    # the rest is refused at once, each refusal answered (False, msg) and counted.
    total = 30_000
    with Collector(strict=False, conditions=Conditions(latency=0.02)) as collector:
        script = textwrap.dedent(f"""
            import json
            from cdpmp import analytics
            analytics.write_key, analytics.endpoint = {collector.write_key!r}, {collector.url!r}
            refused = [i for i in range({total})
                       if not analytics.track(user_id="u", event="Order", message_id=f"b-{{i}}")[0]]
            drained = analytics.flush(timeout=60)
            print(json.dumps({{"refused": refused, "counted": analytics.stats()["dropped"]}}))
        """)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CDP_")}
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=150
        )
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads(done.stdout.strip().splitlines()[-1])
        refused = {f"b-{i}" for i in report["refused"]}
        assert refused and report["counted"]["queue_full"] == len(refused), report["counted"]
        assert collector.wait_for(total - len(refused), timeout=60)
        ids = collector.message_ids()
        assert len(ids) == len(set(ids)) and set(ids) == {f"b-{i}" for i in range(total)} - refused
