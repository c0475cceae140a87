"""Delivery: batching, retry classes, on_error, deadlines, modes, queue limits.

Every test talks real HTTP to the strict collector; nothing of ours is mocked.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from typing import Any, Callable, List, Set, Tuple

import pytest

import cdpmp
from cdpmp._retry import RetryPolicy, parse_retry_after
from cdpmp.testing import Collector, Fault

Errors = List[Tuple[Exception, List[Any]]]


def _consumer_threads() -> Set[threading.Thread]:
    """Live sender threads of this process (other tests' clients included)."""
    return {t for t in threading.enumerate() if t.name == "cdpmp-sender"}


def test_batch_closes_at_upload_size(collector: Collector, make_client: Callable[..., cdpmp.Client]) -> None:
    client = make_client(upload_size=10, upload_interval=60)
    for i in range(30):
        assert client.track("u", "E", {"i": i})[0]
    # With a 60 s interval only a full batch can trigger a send.
    assert collector.wait_for(30, timeout=10)
    assert [r.messages for r in collector.requests] == [10, 10, 10]


def test_batch_closes_at_request_byte_limit(
    collector: Collector, make_client: Callable[..., cdpmp.Client]
) -> None:
    client = make_client(upload_size=100)
    blob = "x" * 20_000
    for i in range(60):
        assert client.track("u", "E", {"i": i, "blob": blob})[0]
    assert client.flush(timeout=10)
    assert len(collector.unique_ids()) == 60
    assert all(r.status == 200 and r.body_bytes <= 500_000 for r in collector.requests)
    assert len(collector.requests) >= 3


def test_batch_closes_at_upload_interval(
    collector: Collector, make_client: Callable[..., cdpmp.Client]
) -> None:
    client = make_client(upload_size=100, upload_interval=0.2)
    for i in range(3):
        client.track("u", "E", {"i": i})
    assert collector.wait_for(3, timeout=10)  # no flush(): the interval closed the batch
    assert [r.messages for r in collector.requests] == [3]


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503])
def test_retryable_status_is_retried_then_delivered_once(
    status: int, collector: Collector, make_client: Callable[..., cdpmp.Client]
) -> None:
    collector.fail_next(2, status=status)
    client = make_client()
    _, msg = client.track("u", "E")
    assert client.flush(timeout=10)
    assert [r.status for r in collector.requests] == [status, status, 200]
    assert collector.message_ids() == [msg["messageId"]]
    assert client.stats()["retries"] == 2


@pytest.mark.parametrize("status", [400, 403, 404, 413, 422])
def test_other_4xx_is_final_and_reported(
    status: int, collector: Collector, make_client: Callable[..., cdpmp.Client]
) -> None:
    errors: Errors = []
    collector.fail_next(1, status=status)
    client = make_client(on_error=lambda e, b: errors.append((e, b)))
    _, msg = client.track("u", "E")
    client.flush(timeout=10)
    assert [r.status for r in collector.requests] == [status]
    assert len(errors) == 1
    error, batch = errors[0]
    assert isinstance(error, cdpmp.APIError) and error.status == status
    assert [m["messageId"] for m in batch] == [msg["messageId"]]
    assert client.stats()["failed"] == 1


def test_any_2xx_is_success(collector: Collector, make_client: Callable[..., cdpmp.Client]) -> None:
    collector.script([Fault(status=202), Fault(status=204, body=b"")])
    client = make_client(upload_size=1)
    client.track("u", "A")
    client.track("u", "B")
    assert client.flush(timeout=10)
    assert [r.status for r in collector.requests] == [202, 204]
    assert collector.duplicates() == {}
    assert client.stats()["sent"] == 2


@pytest.mark.parametrize("body", [b'{"message": "no code"}', b"<html>bad gateway</html>", b"[1, 2]", b""])
def test_error_bodies_are_parsed_tolerantly(
    body: bytes, collector: Collector, make_client: Callable[..., cdpmp.Client]
) -> None:
    errors: Errors = []
    collector.script([Fault(status=400, body=body)])
    client = make_client(on_error=lambda e, b: errors.append((e, b)))
    client.track("u", "E")
    client.flush(timeout=10)
    assert isinstance(errors[0][0], cdpmp.APIError)
    assert errors[0][0].code == "Bad Request" and errors[0][0].status == 400  # the status's name


def test_dropped_connection_is_retried(
    collector: Collector, make_client: Callable[..., cdpmp.Client]
) -> None:
    collector.script([Fault(drop_connection=True)])
    client = make_client()
    client.track("u", "E")
    assert client.flush(timeout=10)
    assert [r.status for r in collector.requests] == [0, 200]
    assert len(collector.messages) == 1


def test_timeout_after_processing_resends_with_same_message_id(
    collector: Collector, make_client: Callable[..., cdpmp.Client]
) -> None:
    # The collector processes the batch but answers after the client's timeout:
    # the retry must carry the same messageId so the duplicate is identifiable.
    collector.script([Fault(delay=1.0)])
    client = make_client(timeout=0.3)
    _, msg = client.track("u", "E")
    assert client.flush(timeout=10)
    assert collector.duplicates() == {msg["messageId"]: 2}
    assert client.stats()["retries"] == 1


def test_retry_after_beyond_budget_gives_up(
    collector: Collector, make_client: Callable[..., cdpmp.Client]
) -> None:
    errors: Errors = []
    collector.script([Fault(status=429, retry_after="10")])
    client = make_client(retry_budget=1.0, on_error=lambda e, b: errors.append((e, b)))
    client.track("u", "E")
    client.flush(timeout=10)
    assert [r.status for r in collector.requests] == [429]
    assert isinstance(errors[0][0], cdpmp.APIError) and errors[0][0].status == 429


@pytest.mark.parametrize("retry_after", ["0", "Wed, 21 Oct 2015 07:28:00 GMT"])
def test_retry_after_zero_or_in_the_past_keeps_the_backoff(
    retry_after: str, collector: Collector, make_client: Callable[..., cdpmp.Client]
) -> None:
    # Gateways answer "Retry-After: 0" and skewed clocks send dates in the past; taken
    # literally, one process sent 22 requests/s to a failing endpoint. With the backoff
    # kept (at least 0.125 s, 0.25 s, 0.5 s...) at most 4 requests fit in the first
    # second; taken literally, all 7 are made at once.
    collector.script([Fault(status=503, retry_after=retry_after)] * 6)
    client = make_client()
    client.track("u", "E")
    time.sleep(1.0)
    assert 1 <= len(collector.requests) <= 4, len(collector.requests)
    assert client.flush(timeout=30)
    assert len(collector.requests) == 7 and len(collector.unique_ids()) == 1


def test_retry_budget_bounds_a_failing_batch(
    collector: Collector, make_client: Callable[..., cdpmp.Client]
) -> None:
    errors: Errors = []
    collector.fail_next(1000, status=503)
    client = make_client(retry_budget=1.0, on_error=lambda e, b: errors.append((e, b)))
    client.track("u", "E")
    assert client.flush(timeout=10) is False  # the batch ended (given up) within its budget
    assert len(errors) == 1 and client.stats()["failed"] == 1
    assert 1 < len(collector.requests) < 20


def test_max_retries_bounds_attempts(collector: Collector, make_client: Callable[..., cdpmp.Client]) -> None:
    collector.fail_next(1000, status=500)
    client = make_client(max_retries=2)
    client.track("u", "E")
    assert client.flush(timeout=10) is False  # given up after 2 retries
    assert len(collector.requests) == 3


def test_retry_policy_is_capped_and_jittered() -> None:
    policy = RetryPolicy(backoff_base=1.0, backoff_cap=4.0, max_retry_after=30.0, rand=lambda: 1.0)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 10)] == [1.0, 2.0, 4.0, 4.0, 4.0]
    low = RetryPolicy(backoff_base=1.0, backoff_cap=4.0, rand=lambda: 0.0)
    assert low.delay(3) == 2.0
    assert policy.delay(1, retry_after=5.0) == 5.0
    assert low.delay(1, retry_after=0.0) == 0.5 == low.delay(1)  # never below the backoff
    assert policy.delay(1, retry_after=120.0) == 30.0
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None  # in the past: absent
    assert parse_retry_after("-3") is None and parse_retry_after("0") == 0.0
    assert parse_retry_after("soon") is None


def test_on_error_that_raises_does_not_kill_the_consumer(
    collector: Collector, make_client: Callable[..., cdpmp.Client]
) -> None:
    def explode(error: Exception, batch: List[Any]) -> None:
        raise RuntimeError("user bug")

    collector.fail_next(1, status=400)
    client = make_client(on_error=explode, upload_size=1)
    client.track("u", "first")
    client.flush(timeout=10)
    _, second = client.track("u", "second")
    assert client.flush(timeout=10)
    assert collector.message_ids() == [second["messageId"]]


def test_flush_returns_false_at_its_deadline(
    collector: Collector, make_client: Callable[..., cdpmp.Client]
) -> None:
    collector.script([Fault(delay=1.5)])
    client = make_client()
    client.track("u", "E")
    assert client.flush(timeout=0.2) is False
    assert client.flush(timeout=10) is True
    assert len(collector.unique_ids()) == 1


def test_shutdown_deadline_drops_and_reports_what_is_left(
    collector: Collector, make_client: Callable[..., cdpmp.Client]
) -> None:
    errors: Errors = []
    collector.fail_next(1000, status=503)
    client = make_client(upload_size=5, on_error=lambda e, b: errors.append((e, b)))
    for i in range(20):
        client.track("u", "E", {"i": i})
    assert client.shutdown(timeout=0.5) is False
    stats = client.stats()
    reported = sum(len(b) for _, b in errors)
    assert reported == 20 == stats["failed"] + stats["dropped"]["shutdown"]
    assert any(isinstance(e, cdpmp.ShutdownAbandoned) for e, _ in errors)
    assert not client._sink.alive()  # type: ignore[attr-defined]  # no thread serves it now


def test_exit_drains_the_whole_queue(collector: Collector, tmp_path: Any) -> None:
    script = textwrap.dedent(f"""
        import cdpmp
        client = cdpmp.Client({collector.write_key!r}, endpoint={collector.url!r}, upload_size=50)
        for i in range(1000):
            assert client.track(user_id="u", event="E", properties={{"i": i}})[0]
        # no flush, no shutdown: the interpreter exits with 1000 queued
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    assert len(collector.unique_ids()) == 1000
    assert collector.duplicates() == {}


def test_sync_mode_sends_inline_with_retries(
    collector: Collector, make_client: Callable[..., cdpmp.Client]
) -> None:
    collector.fail_next(1, status=503)
    before = _consumer_threads()
    client = make_client(sync_mode=True)
    ok, msg = client.track("u", "E")
    assert ok and collector.message_ids() == [msg["messageId"]]  # no flush needed
    assert client.join() and client.shutdown() and client.flush()
    assert _consumer_threads() == before  # sync mode starts no thread


def test_sync_mode_failure_returns_false_and_reports(
    collector: Collector, make_client: Callable[..., cdpmp.Client]
) -> None:
    errors: Errors = []
    collector.fail_next(1, status=400)
    client = make_client(sync_mode=True, on_error=lambda e, b: errors.append((e, b)))
    ok, msg = client.track("u", "E")
    assert not ok and errors[0][1][0]["messageId"] == msg["messageId"]


def test_send_false_validates_without_network_or_threads(
    collector: Collector, make_client: Callable[..., cdpmp.Client]
) -> None:
    before = _consumer_threads()
    client = make_client(send=False)
    ok, msg = client.track("u", "E", {"x": 1})
    assert ok and msg["event"] == "E"
    assert not client.track("u", "E", {"big": "x" * 40_000})[0]
    assert client.flush(timeout=1) and client.shutdown(timeout=1)
    assert collector.requests == [] and _consumer_threads() == before
    with pytest.raises(cdpmp.InvalidArgumentType):
        client.track("u", 5)  # type: ignore[arg-type]


def test_queue_full_returns_false_and_counts(
    collector: Collector, make_client: Callable[..., cdpmp.Client]
) -> None:
    errors: Errors = []
    client = make_client(
        max_queue_size=5, upload_size=100, upload_interval=60, on_error=lambda e, b: errors.append((e, b))
    )
    results = [client.track("u", "E", {"i": i}) for i in range(8)]
    assert [ok for ok, _ in results] == [True] * 5 + [False] * 3
    assert client.stats()["dropped"]["queue_full"] == 3
    assert [b[0]["messageId"] for _, b in errors] == [msg["messageId"] for _, msg in results[5:]]
    assert all(isinstance(e, cdpmp.MessageRejected) and e.reason == "queue_full" for e, _ in errors)
    assert client.flush(timeout=10)
    assert len(collector.unique_ids()) == 5


def test_sender_thread_starts_on_first_enqueue_not_in_init(collector: Collector) -> None:
    # A fresh interpreter: other tests' sender threads may still be alive in this one.
    script = textwrap.dedent(f"""
        import threading, cdpmp
        client = cdpmp.Client({collector.write_key!r}, endpoint={collector.url!r})
        assert threading.active_count() == 1, threading.enumerate()
        client.track("u", "E")
        names = [t.name for t in threading.enumerate()]
        assert names.count("cdpmp-sender") == 1, names
        assert client.flush(timeout=10)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    assert len(collector.unique_ids()) == 1


def test_settings_change_after_first_call_takes_effect(collector: Collector) -> None:
    from cdpmp import analytics

    with Collector(write_key="second") as other:
        analytics.write_key = collector.write_key
        analytics.endpoint = collector.url
        analytics.upload_interval = 0.05
        analytics.track("u", "to-first")
        first = analytics.default_client
        analytics.write_key = "second"
        analytics.endpoint = other.url
        analytics.gzip = True
        analytics.track("u", "to-second")
        assert analytics.default_client is not first
        assert analytics.flush(timeout=10)
        assert [m["event"] for m in collector.messages] == ["to-first"]
        assert [m["event"] for m in other.messages] == ["to-second"]
        assert other.requests[0].content_encoding == "gzip"


def test_a_process_with_two_clients_sums_up_its_losses_in_one_line(collector: Collector) -> None:
    from cdpmp.testing import Conditions

    collector.set_conditions(Conditions(fault_rate=1.0, fault_status=400, seed=1))
    script = f"""
        import cdpmp
        clients = [cdpmp.Client({collector.write_key!r}, endpoint={collector.url!r}, upload_size=10)
                   for _ in range(2)]
        for n, client in enumerate(clients):
            for i in range(30 + n * 10):
                client.track("u", "E", message_id=f"c{{n}}-{{i}}")
            assert client.flush(10) is False  # every one was refused
    """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    totals = [line for line in done.stderr.splitlines() if "in total" in line]
    assert len(totals) == 1 and "gave up 70 event(s) in total (70 rejected)" in totals[0], done.stderr


def test_every_loss_is_summed_up_at_exit_without_any_logging_setup(collector: Collector) -> None:
    """Losses are warned about as they happen (rate-limited per reason), and the exit
    names the full total with its reasons, through Python's default handler alone."""
    from cdpmp.testing import Conditions

    collector.set_conditions(Conditions(fault_rate=1.0, fault_status=400, seed=1))
    script = f"""
        import cdpmp
        client = cdpmp.Client({collector.write_key!r}, endpoint={collector.url!r}, upload_size=10,
                              upload_interval=30)
        for i in range(250):
            client.track("u", "E", message_id=f"m{{i}}")
        assert client.flush(10) is False  # every one was refused
    """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("cdpmp:")]
    # the first rejection as it happens (a 400 batch is split to find the bad
    # messages; the rest fall within the rate limit), flush()'s answer, then the exit total
    assert len(lines) == 3, lines
    assert "event(s) given up (rejected): [cdp] fault: scripted fault (400)" in lines[0]
    assert "flush() returns False: 250 event(s) accepted before it were given up" in lines[1]
    assert "gave up 250 event(s) in total (250 rejected)" in lines[2]
    assert collector.message_ids() == []
