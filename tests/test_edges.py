"""Edges where a value or a process state is at its limit: durations past any sense
refused at the door, and the awaitable calls never holding the event loop's own
executor (which also resolves every outgoing connection's host name)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import threading
import time
from pathlib import Path
from typing import Any, List

import pytest

import cdpmp
from cdpmp.errors import ConfigurationError, InvalidArgument, InvalidArgumentType
from cdpmp.integrations.serverless import handler
from cdpmp.testing import Collector, Conditions, Outage


@pytest.mark.parametrize("value", [math.inf, 1e10, -1.0, math.nan])
def test_absurd_durations_are_refused_where_they_are_given(value: float, collector: Collector) -> None:
    with pytest.raises(ConfigurationError, match="exit_timeout"):
        cdpmp.Client(collector.write_key, endpoint=collector.url, exit_timeout=value)
    client = cdpmp.Client(collector.write_key, endpoint=collector.url)
    try:
        with pytest.raises(InvalidArgument, match="timeout: must be 0 to 86400 seconds"):
            client.flush(value)
        with pytest.raises(InvalidArgument, match="timeout"):
            client.shutdown(value)
        with pytest.raises(InvalidArgument, match="timeout"):
            asyncio.run(client.aflush(value))
    finally:
        client.shutdown(5)
    with pytest.raises(ValueError, match="timeout"):
        handler(timeout=value)


def test_durations_of_the_wrong_type_name_the_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    client = cdpmp.Client("k", endpoint="http://127.0.0.1:9", send=False)
    with pytest.raises(InvalidArgumentType, match="timeout"):
        client.flush("5")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="margin"):
        handler(margin="1")  # type: ignore[arg-type]
    monkeypatch.setenv("CDP_TIMEOUT", "1e10")
    with pytest.raises(ConfigurationError, match="timeout"):
        cdpmp.Client("k", endpoint="http://127.0.0.1:9")


def _waits() -> List[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "cdpmp-wait"]


@pytest.mark.parametrize("caller", ["client", "module"])
def test_aflush_during_an_outage_leaves_the_loops_executor_free_and_stops_when_cancelled(
    caller: str, collector: Collector
) -> None:
    # The loop's default executor has ONE thread, as a busy app's effectively has:
    # twelve aflush() calls waiting out an outage there would hold it, and the app's
    # own getaddrinfo() (every asyncio connection) would wait behind them.
    collector.set_conditions(Conditions(outages=(Outage(0, 3600, 503),)))
    from cdpmp import analytics

    client: Any = cdpmp.Client(collector.write_key, endpoint=collector.url, upload_interval=0.05)
    if caller == "module":
        client.shutdown(1)
        analytics.write_key, analytics.endpoint, analytics.upload_interval = (
            collector.write_key, collector.url, 0.05
        )  # fmt: skip
        client = analytics

    async def main() -> None:
        asyncio.get_running_loop().set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=1))
        assert client.track(user_id="u", event="E")[0]
        flushes = [asyncio.ensure_future(client.aflush(60)) for _ in range(12)]
        await asyncio.sleep(0.3)
        resolved = await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo("localhost", 80), 30)
        assert resolved and not any(f.done() for f in flushes)  # answered while they wait
        assert 0 < len(_waits()) <= 4  # bounded: the others wait their turn on the loop
        for f in flushes:
            f.cancel()
        await asyncio.gather(*flushes, return_exceptions=True)

    asyncio.run(main())
    deadline = time.monotonic() + 10
    while _waits() and time.monotonic() < deadline:  # each stops within one slice
        time.sleep(0.05)
    try:
        assert _waits() == []
    finally:
        collector.set_conditions(Conditions())
        client.shutdown(5)


@pytest.mark.parametrize("decorated", [False, True], ids=["no-decorator", "decorator"])
def test_a_lambda_without_the_decorator_is_told_once(decorated: bool, collector: Collector) -> None:
    import os
    import subprocess
    import sys

    script = "\n".join([
        "from cdpmp import analytics",
        "from cdpmp.integrations.serverless import handler",
        "def fn(event, context):",
        "    for n in range(3):",
        "        analytics.track(user_id='u', event='E')",
        "fn = handler(fn)" if decorated else "",
        "fn({}, None)",
        "fn({}, None)",
        "analytics.flush(10)",
    ])  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDP_")}
    env.update(
        CDP_WRITE_KEY=collector.write_key, CDP_ENDPOINT=collector.url, AWS_LAMBDA_FUNCTION_NAME="orders"
    )
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    told = [line for line in done.stderr.splitlines() if "AWS_LAMBDA_FUNCTION_NAME is set" in line]
    assert len(told) == (0 if decorated else 1), done.stderr
    assert not told or "@handler" in told[0]
    assert collector.wait_for(6)


def test_the_uploader_log_stays_small_whatever_was_left_before(tmp_path: Path) -> None:
    # A redeploy leaves a long uploader.log on a small tmpfs: the next uploader keeps its
    # tail, and its own lines stop at the limit (with one notice).
    import logging
    import os
    import sys

    from cdpmp.shared import files, uploader

    folder = tmp_path / "rt"
    folder.mkdir(mode=0o700)
    (folder / "uploader.log").write_bytes(b"old line\n" * 400_000)  # 3.6 MB
    fd = files.open_log(str(folder))
    assert os.fstat(fd).st_size <= files.LOG_KEPT + 64
    handler = uploader._CappedStderr()
    saved = sys.stderr
    sys.stderr = handler.stream = os.fdopen(fd, "w")
    try:
        for n in range(20_000):
            handler.emit(
                logging.LogRecord("cdpmp", logging.WARNING, "", 0, "line %d " + "x" * 60, (n,), None)
            )
        handler.flush()
    finally:
        sys.stderr.close()
        sys.stderr = saved
    size = (folder / "uploader.log").stat().st_size
    assert files.LOG_LIMIT <= size < files.LOG_LIMIT + 200 and handler.suppressed > 0


def _fds() -> int:
    import os

    return len(os.listdir("/proc/self/fd"))


def test_switching_write_keys_in_an_outage_keeps_clients_and_sockets_bounded(collector: Collector) -> None:
    # A multi-tenant app sets analytics.write_key per request: 1,000 switches among
    # 1,000 keys while the endpoint answers 503. Before: 999 clients, 1,003 fds.
    from cdpmp import analytics

    collector.set_conditions(Conditions(outages=(Outage(0, 3600, 503),)))
    analytics.endpoint, analytics.upload_interval = collector.url, 0.01
    before = _fds()
    peak = 0
    for n in range(1000):
        analytics.write_key = f"tenant-{n}"
        assert analytics.track("u", "E", message_id=f"k-{n}")[0]
        if n % 50 == 0:
            peak = max(peak, _fds() - before)
    live, retired = len(analytics._live), len(analytics._retired)
    assert live <= analytics.MAX_LIVE and retired <= analytics.MAX_RETIRED
    assert peak <= 40, peak  # the sender threads' sockets at most, not one per client
    # Switching back to a recent key reuses its client: nothing new is built.
    client = analytics.default_client
    analytics.write_key = "tenant-998"
    analytics.track("u", "E")
    analytics.write_key = "tenant-999"
    assert analytics._client() is client
    collector.set_conditions(Conditions())
    stats = [c.stats()["dropped"]["shutdown"] for c in analytics._retired]
    assert sum(stats) == 0  # the retired ones still hold theirs


def test_recent_tenants_are_delivered_once_the_endpoint_is_back(collector: Collector) -> None:
    from cdpmp import analytics

    analytics.endpoint, analytics.upload_interval = collector.url, 0.01
    with Collector(write_key="t-b") as other:
        for n in range(200):  # two tenants, alternating: both clients stay live
            analytics.write_key, analytics.endpoint = (
                (collector.write_key, collector.url) if n % 2 else ("t-b", other.url)
            )
            assert analytics.track("u", "E", message_id=f"a-{n}")[0]
        assert len(analytics._live) == 2 and analytics._retired == []
        assert analytics.flush(timeout=10)
        assert sorted(collector.message_ids() + other.message_ids()) == sorted(f"a-{n}" for n in range(200))
