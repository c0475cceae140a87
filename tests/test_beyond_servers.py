"""Where Python runs beyond servers: serverless handlers in an environment that is
frozen between invocations and reaped after the last, ``async`` code that must not
block its loop while events are delivered, and backfills that track faster than any
endpoint takes. Real processes and signals; every count by messageId."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any, Dict, List

import pytest

import cdpmp
from cdpmp.integrations import serverless
from cdpmp.testing import Collector, Conditions
from tests.servers import ROOT, server_env, ticks_while

INVOCATIONS, PER_INVOCATION, FROZEN = 12, 3, 1.5


def run_lambda_environment(
    collector: Collector, kind: str, invocations: int = INVOCATIONS, **env: str
) -> List[str]:
    """Run ``tests.apps.lambda_app`` as AWS runs a function: one invocation at a time,
    the environment frozen (SIGSTOP) for FROZEN seconds after each answer, and reaped
    (SIGKILL, still frozen) after the last. Returns the ids tracked."""
    env = server_env(collector.url, collector.write_key, APP_HANDLER=kind, **env)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.apps.lambda_app"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    tracked: List[str] = []
    try:
        for n in range(invocations):
            proc.stdin.write(json.dumps({"id": f"i{n}", "k": PER_INVOCATION}) + "\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == f"done i{n}", proc.stderr.read() if proc.poll() else ""
            tracked += [f"i{n}-{j}" for j in range(PER_INVOCATION)]
            os.kill(proc.pid, signal.SIGSTOP)  # the platform freezes the environment
            time.sleep(FROZEN)
            if n < invocations - 1:
                os.kill(proc.pid, signal.SIGCONT)
    finally:
        proc.kill()  # reaped without notice (frozen or not)
        proc.communicate(timeout=10)
    return tracked


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_frozen_then_reaped_lambda_environment_delivers_every_event_once(
    kind: str, collector: Collector
) -> None:
    collector.set_conditions(Conditions(latency=0.05))
    # The environment for the plain handler; the async one shares its path.
    tracked = run_lambda_environment(collector, kind, invocations=INVOCATIONS if kind == "sync" else 4)
    time.sleep(0.5)  # nothing may still be on its way: the environment is gone
    assert sorted(collector.message_ids()) == sorted(tracked)  # each exactly once


class _Context:
    def __init__(self, millis: int) -> None:
        self.millis = millis

    def get_remaining_time_in_millis(self) -> int:
        return self.millis


def test_the_flush_budget_is_the_invocations_remaining_time() -> None:
    assert serverless.budget(({}, _Context(4000)), None, 0.5) == 3.5
    assert serverless.budget(({}, _Context(4000)), 1.0, 0.5) == 1.0  # timeout= caps it
    assert serverless.budget(({}, _Context(200)), None, 0.5) == 0.0  # never negative
    assert serverless.budget(("request",), None, 0.5) == serverless.DEFAULT_TIMEOUT  # no deadline given
    assert serverless.budget(("request",), 2.0, 0.5) == 2.0
    with pytest.raises(TypeError, match="timeout"):
        serverless.handler(timeout="soon")  # type: ignore[call-overload]


def test_the_handlers_result_and_exception_pass_through_after_the_flush(collector: Collector) -> None:
    client = cdpmp.Client(collector.write_key, endpoint=collector.url, upload_interval=60)

    @serverless.handler
    def ok(event: Dict[str, Any], context: Any) -> str:
        client.track("u", "Ok", message_id="ok")
        return "result"

    @serverless.handler(timeout=5)
    def failing(event: Dict[str, Any], context: Any) -> None:
        client.track("u", "Failing", message_id="failing")
        raise KeyError("missing field")

    try:
        assert ok({}, _Context(10_000)) == "result"
        assert collector.message_ids() == ["ok"]  # sent before the platform got the answer
        with pytest.raises(KeyError, match="missing field"):
            failing({}, None)
        assert collector.message_ids() == ["ok", "failing"]
        requests = len(collector.requests)
        ok2 = serverless.handler(lambda event, context: "nothing tracked")
        assert ok2({}, _Context(10_000)) == "nothing tracked"
        assert len(collector.requests) == requests  # an invocation that tracked nothing costs no request
    finally:
        client.shutdown(timeout=5)


def test_aflush_keeps_the_event_loop_running_while_events_are_delivered(collector: Collector) -> None:
    # 500 events to a 300 ms endpoint: a flush that blocked the loop would stop the
    # 10 ms ticker for its whole wait (no tick at all while it runs).
    collector.set_conditions(Conditions(latency=0.3))
    from cdpmp import analytics

    analytics.write_key, analytics.endpoint, analytics.upload_interval = (
        collector.write_key,
        collector.url,
        60.0,
    )
    for i in range(500):
        assert analytics.track(user_id="u", event="E", message_id=f"a-{i}")[0]
    during, drained, ticks = asyncio.run(ticks_while(lambda: analytics.aflush(30)))
    assert during > 0, "the event loop did not run while aflush() waited"
    assert drained is True
    assert sorted(collector.message_ids()) == sorted(f"a-{i}" for i in range(500))
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    print(f"ticker: {len(ticks)} ticks, worst gap {max(gaps) * 1000:.1f} ms")


def test_aflush_and_ashutdown_on_a_client_return_what_flush_and_shutdown_return(collector: Collector) -> None:
    client = cdpmp.Client(collector.write_key, endpoint=collector.url, upload_interval=60)
    client.track("u", "E", message_id="c-1")
    assert asyncio.run(client.aflush(10)) is True
    client.track("u", "E", message_id="c-2")
    assert asyncio.run(client.ashutdown(10)) is True
    assert collector.message_ids() == ["c-1", "c-2"]


BACKFILL = 100_000


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["direct", "shared"])
def test_a_backfill_with_block_on_full_is_accepted_and_delivered_once(
    mode: str, request: pytest.FixtureRequest
) -> None:
    # 100,000 historical events tracked flat out with the default max_queue_size
    # (10,000) against a 20 ms endpoint: without block_on_full most would be refused.
    env = {"CDP_MODE": mode, "CDP_BLOCK_ON_FULL": "30"}
    if mode == "shared":
        env["CDP_RUNTIME_DIR"] = request.getfixturevalue("runtime_dir")
    with Collector(strict=False, conditions=Conditions(latency=0.02)) as collector:
        script = textwrap.dedent(f"""
            import datetime, json, resource, time
            from cdpmp import analytics
            analytics.write_key, analytics.endpoint = {collector.write_key!r}, {collector.url!r}
            start, refused, deepest = time.monotonic(), 0, 0
            day = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
            for i in range({BACKFILL}):
                ok, _ = analytics.track(user_id=f"u{{i % 977}}", event="Order Completed", message_id=f"b-{{i}}",
                                        properties={{"total": i}}, timestamp=day + datetime.timedelta(seconds=i))
                refused += not ok
                if i % 1000 == 0:
                    deepest = max(deepest, analytics.stats()["depth"])
            tracked = time.monotonic() - start
            drained = analytics.flush(timeout=120)
            print(json.dumps({{"refused": refused, "drained": drained, "deepest": deepest,
                               "tracked_s": tracked, "total_s": time.monotonic() - start,
                               "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}}))
        """)
        proc_env = {**{k: v for k, v in os.environ.items() if not k.startswith("CDP_")}, **env}
        done = subprocess.run(
            [sys.executable, "-c", script], env=proc_env, capture_output=True, text=True, timeout=280
        )
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads(done.stdout.strip().splitlines()[-1])
        print(mode, report)
        assert report["refused"] == 0 and report["drained"] is True, report
        assert collector.wait_for(BACKFILL, timeout=60), collector.summary()
        ids = collector.message_ids()
        assert len(ids) == BACKFILL and len(set(ids)) == BACKFILL  # each exactly once
        # Memory is bounded: held at most the queue's limit, plus the batches in flight.
        assert report["deepest"] <= 10_000 + 16 * 100, report


# -- the examples the README points to run, against the collector ----------------------


def _run_example(collector: Collector, name: str, **env: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, f"examples/{name}"], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env=server_env(collector.url, collector.write_key, **env),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


@pytest.mark.timeout(150)
def test_the_backfill_example_sends_every_order_once() -> None:
    with Collector(strict=False, conditions=Conditions(latency=0.02)) as collector:
        done = _run_example(collector, "backfill.py", ORDERS="20000", CDP_MAX_QUEUE_SIZE="2000")
        assert "20000 of 20000 accepted, all delivered" in done.stdout, done.stdout
        ids = collector.message_ids()
        assert sorted(ids) == sorted(f"order-{n}" for n in range(20000))
        first = next(m for m in collector.messages if m["messageId"] == "order-0")
        assert first["timestamp"].startswith("2024-01-01T00:00:00")  # the past, as given


def test_the_asyncio_example_delivers_every_job_once(collector: Collector) -> None:
    collector.set_conditions(Conditions(latency=0.1))
    done = _run_example(collector, "asyncio_app.py", JOBS="300")
    assert "not delivered" not in done.stdout
    assert sorted(collector.message_ids()) == sorted(f"job-{n}" for n in range(300))


@pytest.mark.timeout(120)
def test_the_lambda_example_in_a_frozen_then_reaped_environment(collector: Collector) -> None:
    collector.set_conditions(Conditions(latency=0.05))
    tracked = run_lambda_environment(collector, "example", invocations=4)
    time.sleep(0.5)
    assert sorted(collector.message_ids()) == sorted(tracked)


def test_a_stubbed_default_client_gets_the_awaitable_calls_as_flush_and_shutdown() -> None:
    from unittest import mock

    from cdpmp import analytics

    fake = mock.Mock()
    with mock.patch.object(analytics, "default_client", fake):
        asyncio.run(analytics.aflush())
        asyncio.run(analytics.aflush(3))
        asyncio.run(analytics.ashutdown())
    assert fake.flush.call_args_list == [mock.call(), mock.call(3), mock.call()]
    assert fake.join.call_args_list == [
        mock.call()
    ]  # shutdown(): flush() then join(), as the official module
