"""What Customer.io's real API answers, and what cdpmp makes of it.

The API is permissive unless a request carries ``X-Strict-Mode: 1``: it answers 200 to
a wrong key or a refused message and drops it. cdpmp asks for strict mode by default, so
every refusal reaches ``on_error``, ``stats()``, the log and ``flush()``'s answer, in
direct and shared mode, also 100 ms away and during an outage. The collector plays both
modes (``cdpmp._api``); these tests count by messageId what went through and what did not.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any, Dict, List, Optional, Tuple

import orjson
import pytest
import urllib3

import cdpmp
from cdpmp._lane import RequestRate
from cdpmp._transport import meta_errors
from cdpmp.testing import Collector, Conditions, Outage
from tests.conftest import wait_until

Errors = List[Tuple[Exception, List[Dict[str, Any]]]]
MODES = ["direct", "shared"]
# Production conditions: near, 100 ms away, and 100 ms away after a 1.5 s outage of 503s.
CONDITIONS = {
    "near": Conditions(),
    "100ms": Conditions(latency=0.1),
    "outage": Conditions(latency=0.1, outages=(Outage(0.0, 1.5, 503),)),
}


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    if request.param == "shared":
        request.getfixturevalue("runtime_dir")
    return str(request.param)


def _client(collector: Collector, mode: str, errors: Errors, **options: Any) -> cdpmp.Client:
    options.setdefault("write_key", collector.write_key)
    key = options.pop("write_key")
    return cdpmp.Client(
        key,
        endpoint=collector.url,
        mode=mode,
        upload_interval=0.05,
        on_error=lambda e, b: errors.append((e, b)),
        **options,
    )


def _post(collector: Collector, body: Dict[str, Any], strict: bool, key: Optional[str] = None) -> Any:
    from cdpmp._schema import expected_authorization

    headers = {
        "Content-Type": "application/json",
        "Authorization": expected_authorization(collector.write_key if key is None else key),
    }
    if strict:
        headers["X-Strict-Mode"] = "1"
    return urllib3.request(
        "POST",
        collector.url + "/v1/batch",
        body=orjson.dumps(body),
        headers=headers,
        retries=False,
        timeout=10,
    )


def _message(mid: str, **extra: Any) -> Dict[str, Any]:
    return {
        "type": "track",
        "userId": "u",
        "event": "E",
        "messageId": mid,
        "timestamp": "2026-01-01T00:00:00.000+00:00",
        "context": {"library": {"name": "t", "version": "1"}},
        "integrations": {},
        **extra,
    }


# -- the collector answers as the API does ---------------------------------------------


def test_collector_is_permissive_without_the_header_and_records_what_it_drops() -> None:
    refuse = lambda m: "blocked event" if m.get("event") == "Blocked" else None  # noqa: E731
    with Collector(refuse=refuse) as collector:
        good, bad = _message("a"), _message("b", event="Blocked")
        answer = _post(collector, {"batch": [good, bad], "sentAt": good["timestamp"]}, strict=False)
        assert answer.status == 200 and answer.data == b"{}"
        wrong = _post(collector, {"batch": [_message("c")], "sentAt": good["timestamp"]}, False, key="wrong")
        assert wrong.status == 200  # a wrong key: 200, and nothing goes through
        assert collector.message_ids() == ["a"]
        assert collector.dropped_ids() == ["b", "c"]
        summary = collector.summary()
        assert (summary["delivered"], summary["dropped"], summary["refused"]) == (1, 2, 0)
        assert summary["dropped_reasons"] == {"blocked event": 1, "invalid or missing write key": 1}


def test_collector_is_strict_with_the_header_and_answers_meta_errors() -> None:
    refuse = lambda m: "blocked event" if m.get("event") == "Blocked" else None  # noqa: E731
    with Collector(refuse=refuse) as collector:
        good, bad = _message("a"), _message("b", event="Blocked")
        answer = _post(collector, {"batch": [good, bad], "sentAt": good["timestamp"]}, strict=True)
        assert answer.status == 400  # one refused message refuses the whole request
        assert meta_errors(orjson.loads(answer.data)) == ["batch[1]: blocked event"]
        wrong = _post(collector, {"batch": [good], "sentAt": good["timestamp"]}, True, key="wrong")
        assert wrong.status == 401 and meta_errors(orjson.loads(wrong.data))
        big = _message("d", properties={"x": "y" * 40_000})
        assert _post(collector, {"batch": [big], "sentAt": good["timestamp"]}, strict=True).status == 400
        assert collector.message_ids() == [] and collector.dropped == []
        assert collector.summary()["refused"] == 4


def test_collector_rate_limit_answers_429_without_retry_after() -> None:
    with Collector(rate_limit=(2, 60.0)) as collector:
        body = {"batch": [_message("a")], "sentAt": "2026-01-01T00:00:00Z"}
        answers = [_post(collector, body, strict=False) for _ in range(3)]
        assert [a.status for a in answers] == [200, 200, 429]
        assert "Retry-After" not in answers[2].headers


def test_meta_errors_of_every_shape_become_text() -> None:
    payload = {"meta": {"errors": ["plain", {"message": "m", "field": "userId"}, {"detail": "d"}]}}
    assert meta_errors(payload) == ["plain", "userId: m", "d"]
    assert meta_errors({"meta": {}}) == [] and meta_errors({}) == []


# -- what cdpmp sends and reports ------------------------------------------------------


def test_strict_mode_header_is_sent_by_default_and_not_when_turned_off(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    errors: Errors = []
    with Collector() as collector:
        client = _client(collector, mode, errors)
        client.track("u", "On")
        assert client.flush(10)
        monkeypatch.setenv("CDP_STRICT_MODE", "0")
        off = _client(collector, mode, errors)
        off.track("u", "Off")
        assert off.flush(10)
        assert [r.strict_header for r in collector.requests] == [True, False]
        assert _client(collector, mode, errors, strict_mode=True).settings.strict_mode  # argument beats env
        client.shutdown(2)
        off.shutdown(2)


@pytest.mark.parametrize("where", sorted(CONDITIONS))
def test_a_wrong_key_reaches_on_error_stats_the_log_and_flush(
    mode: str, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    errors: Errors = []
    caplog.set_level(logging.WARNING, logger="cdpmp")
    with Collector(write_key="right-key", conditions=CONDITIONS[where]) as collector:
        client = _client(collector, mode, errors, write_key="the-wrong-key")
        ids = [client.track("u", "E", {"i": i})[1]["messageId"] for i in range(20)]
        assert client.flush(30) is False
        assert wait_until(lambda: client.stats()["dropped"]["rejected"] == 20, 10)
        assert sorted(m["messageId"] for _, batch in errors for m in batch) == sorted(ids)
        assert all(isinstance(e, cdpmp.APIError) and e.status == 401 for e, _ in errors)
        assert "invalid or missing write key" in str(errors[0][0])  # the API's meta.errors
        assert collector.message_ids() == [] and collector.dropped == []
        client.shutdown(2)
    refused = [r.getMessage() for r in caplog.records if "write key was refused" in r.getMessage()]
    assert len(refused) == 1, refused  # once, in the app's own log
    assert collector.url in refused[0] and "the-wrong-key" not in caplog.text


@pytest.mark.parametrize("where", sorted(CONDITIONS))
def test_one_refused_message_in_200_reaches_on_error_and_the_rest_arrive_once(mode: str, where: str) -> None:
    errors: Errors = []
    refuse = lambda m: "refused by the API" if m["properties"].get("i") == 137 else None  # noqa: E731
    with Collector(refuse=refuse, conditions=CONDITIONS[where]) as collector:
        client = _client(collector, mode, errors)
        ids = [client.track("u", "E", {"i": i})[1]["messageId"] for i in range(200)]
        assert client.flush(60) is False  # one of what it waited for was given up
        assert wait_until(lambda: len(collector.unique_ids()) == 199, 10)
        assert collector.unique_ids() == set(ids) - {ids[137]} and collector.duplicates() == {}
        assert [m["messageId"] for _, batch in errors for m in batch] == [ids[137]]
        assert "refused by the API" in str(errors[0][0])
        assert client.stats()["dropped"]["rejected"] == 1 and collector.dropped == []
        client.track("u", "After")
        assert client.flush(30) is True  # a new window: everything since was delivered
        client.shutdown(2)


def test_without_strict_mode_the_refusal_is_invisible_to_the_client(mode: str) -> None:
    """What ``strict_mode=False`` costs: the API's 200 hides the drop from cdpmp."""
    errors: Errors = []
    refuse = lambda m: "refused" if m["properties"].get("i") == 3 else None  # noqa: E731
    with Collector(refuse=refuse) as collector:
        client = _client(collector, mode, errors, strict_mode=False)
        ids = [client.track("u", "E", {"i": i})[1]["messageId"] for i in range(10)]
        assert client.flush(30) is True
        assert collector.dropped_ids() == [ids[3]] and len(collector.unique_ids()) == 9
        assert errors == [] and client.stats()["dropped"]["rejected"] == 0
        client.shutdown(2)


def test_a_429_without_retry_after_is_retried_and_everything_arrives_once(mode: str) -> None:
    errors: Errors = []
    with Collector(rate_limit=(3, 1.0)) as collector:
        client = _client(collector, mode, errors, upload_size=1, max_in_flight=1)
        ids = [client.track("u", "E", {"i": i})[1]["messageId"] for i in range(8)]
        assert client.flush(60) is True
        assert sorted(collector.message_ids()) == sorted(ids) and errors == []
        assert 429 in {r.status for r in collector.requests}
        client.shutdown(2)


def test_a_redirect_is_final_and_reported(mode: str) -> None:
    """3xx: the API does not redirect; a POST is not replayed to another host."""
    from cdpmp.testing import Fault

    errors: Errors = []
    with Collector() as collector:
        collector.script([Fault(status=307, body=b"")] * 5)
        client = _client(collector, mode, errors)
        client.track("u", "E")
        assert client.flush(10) is False
        assert wait_until(lambda: len(errors) == 1, 10)
        assert isinstance(errors[0][0], cdpmp.APIError) and errors[0][0].status == 307
        assert len(collector.requests) == 1
        client.shutdown(2)


def test_flush_is_false_while_events_stay_queued_at_its_deadline() -> None:
    errors: Errors = []
    with Collector(conditions=Conditions(outages=(Outage(0.0, 30.0, 503),))) as collector:
        client = _client(collector, "direct", errors)
        client.track("u", "E")
        assert client.flush(0.5) is False
        assert client.stats()["depth"] == 1 and errors == []  # kept, not given up
        collector.set_conditions(Conditions())
        assert client.flush(30) is True
        client.shutdown(2)


def test_a_healthy_source_flush_is_not_held_by_another_source_down(runtime_dir: str) -> None:
    errors: Errors = []
    with Collector() as up, Collector(conditions=Conditions(outages=(Outage(0.0, 60.0, 503),))) as down:
        failing = _client(down, "shared", errors)
        healthy = _client(up, "shared", errors)
        for i in range(50):
            failing.track("u", "Stuck", {"i": i})
        assert failing.flush(1.0) is False  # its endpoint is down: held, not given up
        ids = [healthy.track("u", "E", {"i": i})[1]["messageId"] for i in range(20)]
        assert healthy.flush(20) is True
        assert sorted(up.message_ids()) == sorted(ids)
        down.set_conditions(Conditions())
        healthy.shutdown(2)
    assert errors == []


# -- the host's request rate ---------------------------------------------------------


def test_request_rate_allows_its_rate_and_bursts_no_more() -> None:
    now = [0.0]
    rate = RequestRate(10.0, burst=2, clock=lambda: now[0])
    assert [rate.take() for _ in range(3)] == [True, True, False]
    assert rate.wait() == pytest.approx(0.1)
    now[0] += 0.1
    assert rate.take() and not rate.take()
    now[0] += 10.0  # idle time does not bank more than the burst
    assert [rate.take() for _ in range(3)] == [True, True, False]


def test_the_uploader_stays_under_its_request_rate(runtime_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Paced at 5 requests/s, the uploader never meets a collector limit of 10/s: each
    batch of one event goes in its own request and none is answered 429."""
    monkeypatch.setenv("CDP_UPLOADER_MAX_RATE", "5")
    errors: Errors = []
    with Collector(rate_limit=(10, 1.0)) as collector:
        client = _client(collector, "shared", errors, upload_size=1)
        ids = [client.track("u", "E", {"i": i, "id": str(uuid.uuid4())})[1]["messageId"] for i in range(25)]
        assert client.flush(60) is True
        assert sorted(collector.message_ids()) == sorted(ids)
        assert [r.status for r in collector.requests].count(429) == 0
        assert len(collector.requests) == 25
        client.shutdown(2)


def test_the_refused_key_line_guesses_the_region_and_never_holds_the_key() -> None:
    from cdpmp._compat import key_refused_line
    from cdpmp._options import resolve

    us = key_refused_line(resolve({"write_key": "plain-secret"}, env={}))
    assert "https://cdp.customer.io" in us and "endpoint=https://cdp-eu.customer.io" in us
    eu_key_to_us = key_refused_line(
        resolve({"write_key": "sk_eu_secret", "endpoint": "https://cdp.customer.io"}, env={})
    )
    assert "EU API key is being sent to the US host" in eu_key_to_us
    local = key_refused_line(
        resolve({"write_key": "plain-secret", "endpoint": "http://127.0.0.1:9/%x"}, env={})
    )
    assert "check the source's write key" in local and (local % "401").count("%x") == 1
    assert all("secret" not in line for line in (us, eu_key_to_us, local))


def test_the_pytest_fixture_reports_delivered_and_dropped(tmp_path: Any) -> None:
    import subprocess
    import sys

    test = tmp_path / "test_users_app.py"
    test.write_text(
        "import cdpmp\n"
        "def test_signup(cdp_collector):\n"
        "    client = cdpmp.Client('not-the-key', endpoint=cdp_collector.url, strict_mode=False)\n"
        "    client.track(user_id='u1', event='Signed Up')\n"
        "    assert client.flush(10)\n"
        "    client.shutdown(2)\n"
        "    assert cdp_collector.messages, cdp_collector\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 1, done.stdout
    assert "delivered=0 dropped=1" in done.stdout
    assert "cdp_collector" in done.stdout and "dropped because invalid or missing write key: 1" in done.stdout
