"""Delivery under real network conditions, counted by messageId in both modes.

The collector plays the network (:class:`cdpmp.testing.Conditions`): a 100 ms round
trip, outages of tens of seconds answered 503 or with dropped connections, final
answers such as 301. Producers are real processes; nothing of cdpmp is mocked.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Iterator, List, Tuple

import pytest

import cdpmp
from cdpmp.testing import Collector, Conditions, Fault, Outage

pytestmark = pytest.mark.timeout(240)

MODES = ["direct", "shared"]


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "shared":
        request.getfixturevalue("runtime_dir")  # a private runtime dir, uploaders reaped
    yield str(request.param)


def _producers(
    collector: Collector, mode: str, tmp_path: Path, workers: int, events: int, rate: float, **options: Any
) -> List[str]:
    """Run ``workers`` processes, each tracking ``events`` events at ``rate`` per second
    (0: as fast as it can), then flushing; the messageIds they had accepted."""
    script = f"""
        import json, sys, time, cdpmp
        w = int(sys.argv[1])
        client = cdpmp.Client({collector.write_key!r}, endpoint={collector.url!r}, mode={mode!r},
                              **{options!r})
        accepted, start = [], time.monotonic()
        for i in range({events}):
            if {rate}:
                time.sleep(max(0.0, start + i / {rate} - time.monotonic()))
            ok, msg = client.track("u%d" % w, "E", message_id="w%d-%d" % (w, i))
            if ok:
                accepted.append(msg["messageId"])
        with open(sys.argv[2], "w") as out:
            json.dump(accepted, out)
        assert client.flush(timeout=120), client.stats()
    """
    procs = [
        subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), str(w), str(tmp_path / f"{w}.json")])
        for w in range(workers)
    ]
    try:
        codes = [p.wait(200) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert codes == [0] * workers
    return [mid for w in range(workers) for mid in json.loads((tmp_path / f"{w}.json").read_text())]


def _exactly_once(collector: Collector, accepted: List[str]) -> None:
    assert collector.wait_for(len(accepted), timeout=60)
    assert collector.unique_ids() == set(accepted)
    assert collector.duplicates() == {}


def test_100ms_round_trip_many_workers_every_event_once(mode: str, tmp_path: Path) -> None:
    # 4 workers × 2,000 events as fast as they can: far more than 1,000 events/s in all,
    # which is what one request at a time carries at this round trip.
    with Collector(conditions=Conditions(latency=0.1, jitter=0.01, seed=3), strict=False) as collector:
        accepted = _producers(collector, mode, tmp_path, workers=4, events=2000, rate=0, max_queue_size=20000)
        assert len(accepted) == 8000
        _exactly_once(collector, accepted)
        # Concurrent delivery, seen from the endpoint's side.
        assert collector.peak_concurrency > 1


def test_outage_of_tens_of_seconds_every_event_delivered_once_after_it(mode: str, tmp_path: Path) -> None:
    # 25 s down (503 then dropped connections), beyond the 20 s a batch used to be
    # retried before it was given up; three workers keep tracking through it.
    outages = (Outage(1.0, 13.0, 503), Outage(13.0, 26.0, None))
    with Collector(conditions=Conditions(latency=0.05, outages=outages)) as collector:
        accepted = _producers(collector, mode, tmp_path, workers=3, events=600, rate=40)
        assert len(accepted) == 1800
        _exactly_once(collector, accepted)
        statuses = collector.summary()["statuses"]
        assert statuses.get(503, 0) >= 1 and statuses.get(0, 0) >= 1  # the outage was met


@pytest.mark.parametrize("status", [301, 302, 308, 400, 401, 404, 501])
@pytest.mark.parametrize("kind", ["direct", "sync", "shared"])
def test_final_answers_are_handled_the_same_in_every_mode(
    status: int, kind: str, collector: Collector, request: pytest.FixtureRequest
) -> None:
    if kind == "shared":
        request.getfixturevalue("runtime_dir")
    collector.script([Fault(status=status)])
    errors: List[Tuple[Exception, Any]] = []
    client = cdpmp.Client(
        collector.write_key,
        endpoint=collector.url,
        mode="shared" if kind == "shared" else "direct",
        sync_mode=kind == "sync",
        upload_interval=0.05,
        on_error=lambda e, b: errors.append((e, b)),
    )
    try:
        ok, _ = client.track("u", "E")
        assert ok is (kind != "sync")  # sync mode reports the refusal to the caller
        # flush() answers for what it accepted: given up (queued modes) is False; in sync
        # mode the call itself was answered (False, msg), and nothing was owed.
        assert client.flush(timeout=30) is (kind == "sync")
        deadline = time.monotonic() + 30
        while kind == "shared" and (client.stats()["host"] or {}).get("dead_lettered") != 1:
            assert time.monotonic() < deadline, client.stats()
            time.sleep(0.05)
        assert len(collector.requests) == 1  # a final answer is never retried
        if kind == "shared":
            host = client.stats()["host"]
            assert host is not None and host["dead_lettered"] == 1 and host["sent"] == 0
        else:
            stats = client.stats()
            assert stats["dropped"]["rejected"] == 1 and stats["sent"] == 0
            assert len(errors) == 1 and isinstance(errors[0][0], cdpmp.APIError)
            assert errors[0][0].status == status  # type: ignore[attr-defined]
    finally:
        client.shutdown(timeout=5)


def test_a_held_batch_is_given_up_only_by_a_user_set_limit(collector: Collector) -> None:
    collector.fail_next(10**6, status=503)
    errors: List[Tuple[Exception, Any]] = []
    held = cdpmp.Client(collector.write_key, endpoint=collector.url, upload_interval=0.05)
    limited = cdpmp.Client(
        collector.write_key,
        endpoint=collector.url,
        upload_interval=0.05,
        max_retries=2,
        on_error=lambda e, b: errors.append((e, b)),
    )
    try:
        held.track("u", "held")
        limited.track("u", "limited")
        assert limited.flush(timeout=30) is False  # its event was given up
        assert len(errors) == 1 and limited.stats()["dropped"]["undeliverable"] == 1
        assert held.flush(timeout=2) is False  # still held: not given up, not delivered
        assert held.stats()["depth"] == 1 and held.stats()["failed"] == 0
        collector.reset()  # the endpoint is back
        assert held.flush(timeout=30)
        assert [m["event"] for m in collector.messages] == ["held"]
    finally:
        held.shutdown(timeout=2)
        limited.shutdown(timeout=2)


def test_queue_limit_counts_held_events_and_refusals_are_counted(collector: Collector) -> None:
    collector.fail_next(10**6, status=503)
    client = cdpmp.Client(
        collector.write_key, endpoint=collector.url, upload_interval=0.01, max_queue_size=50
    )
    try:
        results = [client.track("u", "E", message_id=f"m{i}")[0] for i in range(80)]
        deadline = time.monotonic() + 20
        while client.stats()["retries"] < 2:  # held and re-probed, not dropped
            assert time.monotonic() < deadline
            time.sleep(0.05)
        refused = results.count(False)
        assert refused >= 30 and client.stats()["dropped"]["queue_full"] == refused
        collector.reset()
        assert client.flush(timeout=30)
        assert collector.unique_ids() == {f"m{i}" for i, ok in enumerate(results) if ok}
        assert collector.duplicates() == {}
    finally:
        client.shutdown(timeout=2)


def test_a_failing_source_does_not_delay_another(runtime_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDP_UPLOADER_DRAIN_TIMEOUT", "1")  # the test ends with one endpoint down
    down = Collector(write_key="down-key", conditions=Conditions(outages=(Outage(0, 600, 503),)))
    with down, Collector(write_key="up-key") as up:
        failing = cdpmp.Client("down-key", endpoint=down.url, mode="shared", upload_interval=0.05)
        healthy = cdpmp.Client("up-key", endpoint=up.url, mode="shared", upload_interval=0.05)
        try:
            for i in range(6000):  # more than one scan window of the failing source first
                assert failing.track("u", "E", message_id=f"down{i}")[0]
            ids = {f"up{i}" for i in range(300)}
            for mid in sorted(ids):
                assert healthy.track("u", "E", message_id=mid)[0]
            assert up.wait_for(300, timeout=60)
            assert up.unique_ids() == ids and up.duplicates() == {}
            assert down.messages == [] and len(down.requests) >= 1
        finally:
            healthy.shutdown(timeout=5)
            failing.shutdown(timeout=1)


# -- deadlines are total, bodies are bounded ------------------------------------------------


_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"


class _Trickler:
    """A raw TCP endpoint (or proxy) on 127.0.0.1: reads a request, then either sends
    ``prefix`` at once and ``answer`` one byte every ``interval`` seconds, or a 503 with
    a ``body_bytes``-long body."""

    def __init__(
        self, interval: float = 0.0, body_bytes: int = 0, answer: bytes = _ANSWER, prefix: bytes = b""
    ) -> None:
        self.interval, self.body_bytes, self.answer, self.prefix = interval, body_bytes, answer, prefix
        self.sent = 0
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(8)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(1 << 20)
                if self.interval:
                    conn.sendall(self.prefix)
                    for byte in self.answer:
                        conn.sendall(bytes([byte]))
                        self.sent += 1
                        time.sleep(self.interval)
                else:
                    head = f"HTTP/1.1 503 Busy\r\nContent-Length: {self.body_bytes}\r\n\r\n".encode()
                    conn.sendall(head)
                    chunk = b"x" * 65536
                    while self.sent < self.body_bytes:
                        conn.sendall(chunk)
                        self.sent += len(chunk)
            except OSError:
                pass  # the client hung up: what the tests want

    def close(self) -> None:
        self._sock.close()


@pytest.mark.parametrize("path", ["sync", "threaded"])
def test_an_endpoint_trickling_its_answer_cannot_outlast_the_deadline(path: str) -> None:
    trickler = _Trickler(interval=0.2)
    errors: List[Tuple[Exception, Any]] = []
    client = cdpmp.Client(
        "k", endpoint=trickler.url, timeout=1.0, max_retries=0, sync_mode=path == "sync",
        upload_interval=60, on_error=lambda e, b: errors.append((e, b)),
    )  # fmt: skip
    try:
        client.track("u", "E")
        if path != "sync":
            client.flush(timeout=30)
        # The request was cut (a per-recv timeout would have let it run ~8 s and end
        # with a complete 200): a timeout, reported and counted.
        assert len(errors) == 1 and "no complete answer" in str(errors[0][0])
        assert client.stats()["dropped"]["undeliverable"] == 1
        assert trickler.sent < 30
    finally:
        client.shutdown(timeout=2)
        trickler.close()


_TUNNEL_OK = b"HTTP/1.1 200 Connection established\r\n"


@pytest.mark.parametrize(
    ("prefix", "answer"),
    [
        (b"", _TUNNEL_OK + b"X-Pad: " + b"a" * 2000),
        (_TUNNEL_OK + b"\r\n", b"\x16\x03\x03\x40\x00" + b"\x02" * 2000),
    ],
    ids=["connect-answer", "tls-handshake"],
)
def test_a_proxy_trickling_the_tunnel_cannot_outlast_the_deadline(prefix: bytes, answer: bytes) -> None:
    # HTTPS through an HTTP proxy that answers CONNECT one byte at a time (or answers
    # it, then trickles the TLS handshake): the request still ends by its deadline.
    proxy = _Trickler(interval=0.2, prefix=prefix, answer=answer)
    errors: List[Tuple[Exception, Any]] = []
    client = cdpmp.Client(
        "k", endpoint="https://127.0.0.1:9", proxies={"https": proxy.url}, sync_mode=True, timeout=1.0,
        max_retries=0, on_error=lambda e, b: errors.append((e, b)),
    )  # fmt: skip
    results: List[Any] = []
    caller = threading.Thread(target=lambda: results.append(client.track("u", "E")), daemon=True)
    try:
        caller.start()
        caller.join(30)
        assert not caller.is_alive(), f"track() still running; the proxy sent {proxy.sent} bytes"
        assert results[0][0] is False
        assert len(errors) == 1 and "no complete answer" in str(errors[0][0]), errors
        assert proxy.sent < 30
    finally:
        proxy.close()


def test_an_uploader_draining_against_a_trickling_endpoint_exits_at_its_deadline(
    runtime_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.conftest import uploader_processes

    trickler = _Trickler(interval=0.5)
    monkeypatch.setenv("CDP_UPLOADER_DRAIN_TIMEOUT", "2")
    client = cdpmp.Client("k", endpoint=trickler.url, mode="shared", upload_interval=0.05)
    try:
        assert client.track("u", "E")[0]
        deadline = time.monotonic() + 30
        while trickler.sent == 0:  # the uploader's request is being answered, slowly
            assert time.monotonic() < deadline
            time.sleep(0.05)
        (uploader,) = uploader_processes(runtime_dir)
        uploader.terminate()
        uploader.wait(timeout=20)  # drain 2 s, then the request in flight is cut
        host = client.stats()["host"]
        assert host is not None and host["depth"] == 1  # kept in the ring, not lost
    finally:
        client.shutdown(timeout=1)
        trickler.close()


def test_a_huge_response_body_is_not_read_whole() -> None:
    body = 200 << 20
    trickler = _Trickler(body_bytes=body)
    errors: List[Tuple[Exception, Any]] = []
    client = cdpmp.Client(
        "k", endpoint=trickler.url, sync_mode=True, max_retries=0, on_error=lambda e, b: errors.append((e, b))
    )
    try:
        ok, _ = client.track("u", "E")
        assert ok is False and isinstance(errors[0][0], cdpmp.APIError)
        assert len(str(errors[0][0])) < 2000
        time.sleep(0.5)
        assert trickler.sent < body // 10  # the connection was dropped, not drained
    finally:
        client.shutdown(timeout=2)
        trickler.close()


def test_the_uploader_heartbeats_while_a_slow_request_is_in_flight(runtime_dir: str) -> None:
    from tests.conftest import uploader_processes

    # Each answer takes 6 s, longer than producers wait (5 s) before they judge an
    # uploader without a heartbeat dead and start another.
    with Collector(conditions=Conditions(latency=6.0)) as collector:
        client = cdpmp.Client(
            collector.write_key, endpoint=collector.url, mode="shared", upload_interval=0.05
        )
        try:
            assert client.track("u", "E", message_id="first")[0]
            deadline = time.monotonic() + 20
            while not collector.requests:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            ages = []
            for i in range(14):  # 7 s of tracking while that request is in flight
                assert client.track("u", "E", message_id=f"m{i}")[0]
                host = client.stats()["host"]
                assert host is not None
                ages.append(host["heartbeat_age"] or 0.0)
                time.sleep(0.5)
            assert max(ages) < 2.0, ages
            host = client.stats()["host"]
            assert host is not None and host["spawns"] == 1
            assert len(uploader_processes(runtime_dir)) == 1
            assert client.flush(timeout=60)
            assert collector.unique_ids() == {"first"} | {f"m{i}" for i in range(14)}
            assert collector.duplicates() == {}
        finally:
            client.shutdown(timeout=5)
