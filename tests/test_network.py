"""The collector's network conditions (latency, jitter, outages, fault rate), checked
with plain urllib3 requests so that they do not depend on cdpmp's own transport."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from typing import List, Tuple

import orjson
import pytest
import urllib3

from cdpmp._message import now_iso
from cdpmp.testing import Collector, Conditions, Outage, expected_authorization

pytestmark = pytest.mark.timeout(60)


def _post(collector: Collector, n: int = 1) -> Tuple[int, float]:
    """POST one valid batch of ``n`` messages; (status or 0 when dropped, seconds)."""
    batch = [
        {
            "type": "track",
            "event": "E",
            "userId": "u",
            "messageId": str(uuid.uuid4()),
            "timestamp": now_iso(),
            "context": {"library": {"name": "raw", "version": "0"}},
        }
        for _ in range(n)
    ]
    body = orjson.dumps({"batch": batch, "sentAt": now_iso()})
    headers = {
        "Content-Type": "application/json",
        "Authorization": expected_authorization(collector.write_key),
    }
    start = time.monotonic()
    try:
        response = urllib3.request(
            "POST", collector.url + "/v1/batch", body=body, headers=headers, retries=False, timeout=10
        )
    except urllib3.exceptions.HTTPError:
        return 0, time.monotonic() - start
    return response.status, time.monotonic() - start


def test_latency_and_jitter_delay_every_answer() -> None:
    with Collector(conditions=Conditions(latency=0.1, jitter=0.05, seed=1)) as collector:
        timings = [_post(collector) for _ in range(5)]
    assert all(status == 200 for status, _ in timings)
    assert all(0.1 <= seconds for _, seconds in timings)
    assert collector.summary()["messages"] == 5


def test_outage_windows_answer_their_status_or_drop_then_recover() -> None:
    outages = (Outage(0.0, 0.6, 503), Outage(0.6, 1.2, None))
    with Collector(conditions=Conditions(outages=outages)) as collector:
        seen: List[int] = []
        while True:
            status, _ = _post(collector)
            seen.append(status)
            if status == 200:
                break
            time.sleep(0.05)
    assert seen[0] == 503 and 0 in seen and seen[-1] == 200
    assert seen.index(0) > seen.index(503)
    assert collector.summary()["messages"] == 1  # nothing was processed during the outage


def test_fault_rate_fails_that_share_of_requests_unprocessed() -> None:
    with Collector(conditions=Conditions(fault_rate=0.3, seed=7)) as collector:
        statuses = [_post(collector)[0] for _ in range(200)]
    failed = statuses.count(503)
    assert 30 <= failed <= 90 and statuses.count(200) == 200 - failed
    assert collector.summary()["messages"] == 200 - failed


def test_conditions_can_change_while_running() -> None:
    with Collector() as collector:
        assert _post(collector)[0] == 200
        collector.set_conditions(Conditions(outages=(Outage(0.0, 60.0, 502),)))
        assert _post(collector)[0] == 502
        collector.set_conditions(Conditions())
        assert _post(collector)[0] == 200


@pytest.mark.parametrize(
    "text,expected",
    [("5:45:503", Outage(5.0, 45.0, 503)), ("0:1.5:drop", Outage(0.0, 1.5, None))],
)
def test_outage_syntax(text: str, expected: Outage) -> None:
    assert Outage.parse(text) == expected


@pytest.mark.parametrize("text", ["5:45", "9:3:503", "0:1:999", "a:b:503"])
def test_bad_outage_syntax_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        Outage.parse(text)


def test_cli_collector_takes_network_conditions() -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "cdpmp", "collector", "--latency", "0.05", "--outage", "0:30:503"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()
            assert "listening on http://127.0.0.1:" in first
            assert proc.stdout.readline().startswith("accepts write key")
            assert "latency=0.05" in proc.stdout.readline()
            url = first.split("listening on ")[1].split()[0]
            strict = {"X-Strict-Mode": "1", "Content-Type": "application/json"}
            response = urllib3.request(
                "POST", url + "/v1/batch", body=b"{}", headers=strict, retries=False, timeout=10
            )
            assert response.status == 401  # credentials are checked before the conditions apply
            assert b'"errors"' in response.data  # the API's {"meta": {"errors": [...]}}
        finally:
            proc.terminate()
            proc.wait(10)


def test_cli_collector_refuses_a_bad_outage() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cdpmp", "collector", "--outage", "nonsense"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2 and "START:END" in out.stderr
