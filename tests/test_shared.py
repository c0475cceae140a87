"""Shared mode with real processes: the ring, the uploader, kills, limits, files.

Every test gets its own runtime directory (``runtime_dir``) and counts delivered
events by messageId at the strict collector.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest

import cdpmp
from cdpmp.shared.ring import Ring
from cdpmp.testing import Collector, Fault
from tests.conftest import uploader_processes, wait_until

pytestmark = pytest.mark.timeout(120)


def _shared(collector: Collector, **options: Any) -> cdpmp.Client:
    options.setdefault("upload_interval", 0.05)
    return cdpmp.Client(collector.write_key, endpoint=collector.url, mode="shared", **options)


def _run(script: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )


def test_forked_workers_flooding_past_the_host_limit_while_the_endpoint_is_down(
    runtime_dir: str, collector: Collector
) -> None:
    limit, workers, per_worker = 300, 4, 200
    collector.fail_next(10**6, status=503)  # the endpoint is down: nothing may leave the ring
    client = _shared(collector, max_queue_size=limit)
    client.track("master", "warm-up", message_id="warm-up")
    # The uploader is running and failing before the flood starts, so the flood meets
    # an uploader that is holding and backing off, not one that has not started yet.
    assert wait_until(lambda: len(collector.requests) >= 2, timeout=30), "the uploader never tried to send"
    results = Path(runtime_dir).parent / f"{Path(runtime_dir).name}-results"
    results.mkdir()
    pids = []
    for w in range(workers):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                accepted = [
                    f"w{w}-{i}"
                    for i in range(per_worker)
                    if client.track("u", "E", message_id=f"w{w}-{i}")[0]
                ]
                (results / f"{w}.json").write_text(json.dumps(accepted))
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    for pid in pids:
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    accepted = ["warm-up"] + [
        mid for w in range(workers) for mid in json.loads((results / f"{w}.json").read_text())
    ]
    assert len(accepted) == limit  # the host filled up exactly to its limit
    # Keep the endpoint down while the uploader retries several more times: it must
    # hold every record (no dead letter, no failure) and keep probing.
    probes = len(collector.requests)
    assert wait_until(lambda: len(collector.requests) >= probes + 3, timeout=30), (
        "the uploader stopped probing"
    )
    host = client.stats()["host"]
    assert host is not None
    assert host["depth"] == limit and host["accepted"] == limit
    assert host["failed"] == 0 and host["dead_lettered"] == 0 and host["retries"] > 0
    assert host["queue_full"] == workers * per_worker + 1 - limit  # every rejection counted
    assert collector.messages == []
    collector.reset()  # the endpoint is back
    assert client.flush(timeout=30)
    counts = collections.Counter(collector.message_ids())
    assert set(counts) == set(accepted)
    assert {m: n for m, n in counts.items() if n > 1} == {}


def test_worker_sigkilled_right_after_track_loses_nothing(runtime_dir: str, collector: Collector) -> None:
    # A batch size and interval the worker can never reach before it dies: if these
    # events arrive, they came from the ring (sent by its source's settings once the
    # interval ends), not from anything the worker sent.
    script = f"""
        import os, signal, sys, cdpmp
        c = cdpmp.Client({collector.write_key!r}, endpoint={collector.url!r}, mode="shared",
                         upload_size=1000, upload_interval=5)
        assert c.stats()["mode"] == "shared"
        ok = [c.track("u", "E", message_id=f"k{{i}}")[0] for i in range(300)]
        assert all(ok)
        assert c.stats()["host"]["depth"] == 300, c.stats()["host"]
        print("tracked", flush=True)
        sys.stdin.read()
    """
    with subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as proc:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"tracked"
        assert collector.messages == []  # nothing was sent before the kill
        proc.kill()
        assert proc.wait(10) == -signal.SIGKILL
    assert collector.wait_for(300, timeout=30)
    assert sorted(collector.message_ids()) == sorted(f"k{i}" for i in range(300))


def test_uploader_sigkilled_mid_batch_is_replaced_and_nothing_is_lost(
    runtime_dir: str, collector: Collector
) -> None:
    client = _shared(collector, upload_size=100)
    ids = [client.track("u", "warm-up")[1]["messageId"]]
    assert client.flush(timeout=10)  # the uploader runs
    (first,) = uploader_processes(runtime_dir)
    collector.script([Fault(delay=3.0)])  # accepted, then answered late: the uploader is mid-batch
    ids += [client.track("u", "E", {"i": i})[1]["messageId"] for i in range(250)]
    assert wait_until(lambda: len(collector.requests) >= 2, 10)
    first.kill()
    first.wait(10)
    assert client.flush(timeout=30)  # a producer notices and starts a new uploader
    (second,) = uploader_processes(runtime_dir)
    assert second.pid != first.pid
    counts = collections.Counter(collector.message_ids())
    assert set(counts) == set(ids)
    duplicates = {m: n for m, n in counts.items() if n > 1}
    # Only the batch in flight when the uploader died may be resent, with its messageIds.
    assert len(duplicates) <= 100 and all(n == 2 for n in duplicates.values())
    print(f"resent after uploader SIGKILL: {len(duplicates)} duplicate(s) of one batch")


def test_event_accepted_while_the_uploader_dies_is_delivered_without_another_call(
    runtime_dir: str, collector: Collector
) -> None:
    """A frozen uploader looks alive (its pid lives, it holds the election lock, its
    heartbeat is fresh), so the lone event's own liveness check finds nothing to do;
    then the uploader is SIGKILLed and nothing on the host calls cdpmp again. The
    producer's watch thread notices the stale heartbeat and starts a new uploader."""
    client = _shared(collector)
    warm = client.track("u", "warm-up")[1]["messageId"]
    assert client.flush(timeout=10)
    (first,) = uploader_processes(runtime_dir)
    first.send_signal(signal.SIGSTOP)
    client._sink._next_check = 0.0  # type: ignore[attr-defined]  # this put runs its check
    ok, msg = client.track("u", "lone")
    assert ok
    first.kill()
    first.wait(10)
    assert collector.wait_for(2, timeout=30)  # no track(), no flush() in between
    assert sorted(collector.message_ids()) == sorted([warm, msg["messageId"]])
    (second,) = uploader_processes(runtime_dir)
    assert second.pid != first.pid


def test_two_uploaders_racing_elect_exactly_one(runtime_dir: str, collector: Collector) -> None:
    _shared(collector)  # creates the ring
    procs = [
        subprocess.Popen([sys.executable, "-m", "cdpmp.shared.uploader", "--dir", runtime_dir])
        for _ in range(3)
    ]
    assert wait_until(lambda: sum(p.poll() is not None for p in procs) >= 2, timeout=30)
    time.sleep(0.5)  # the winner must still be serving, not merely slower to exit
    codes = [p.poll() for p in procs]
    assert codes.count(None) == 1 and codes.count(0) == 2  # the losers exit cleanly
    assert len(uploader_processes(runtime_dir)) == 1
    for p in procs:
        p.terminate()
        p.wait(20)


def test_racing_producers_spawn_one_uploader(runtime_dir: str, collector: Collector) -> None:
    script = f"""
        import cdpmp
        c = cdpmp.Client({collector.write_key!r}, endpoint={collector.url!r}, mode="shared",
                         upload_interval=0.05)
        c.track("u", "E")
        assert c.flush(timeout=20)
    """
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)]) for _ in range(6)]
    assert all(p.wait(60) == 0 for p in procs)
    assert len(uploader_processes(runtime_dir)) == 1
    assert len(collector.unique_ids()) == 6


def test_stale_files_after_kill_9_of_everything_recover(runtime_dir: str, collector: Collector) -> None:
    collector.fail_next(10**6, status=503)
    script = f"""
        import sys, cdpmp
        c = cdpmp.Client({collector.write_key!r}, endpoint={collector.url!r}, mode="shared")
        for i in range(100):
            assert c.track("u", "E", message_id=f"s{{i}}")[0]
        c.flush(timeout=1.0)  # let the uploader start and fail
        print("ready", flush=True)
        sys.stdin.read()
    """
    with subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as producer:
        assert producer.stdout is not None and producer.stdout.readline().strip() == b"ready"
        for proc in uploader_processes(runtime_dir):
            proc.kill()
        producer.kill()
    collector.reset()
    client = _shared(collector)  # the next deployment: its first event starts an uploader
    client.track("u", "E", message_id="next")
    assert client.flush(timeout=30)  # its own event; the dead producer's are another source's
    assert collector.wait_for(101, timeout=30)
    assert sorted(set(collector.message_ids())) == sorted([f"s{i}" for i in range(100)] + ["next"])


def test_idle_work_from_eight_workers_is_sent_in_fewer_requests(
    runtime_dir: str, collector: Collector
) -> None:
    """8 workers × 5 events/s for 2 s: shared mode sends at most as many HTTP requests as
    one process at that rate would (the same script, run once in direct mode)."""
    # Every process starts tracking at the same instant (argv[2]), so the 8 workers'
    # activity spans the same 2 s as the single process's, whatever their startup time.
    worker = f"""
        import sys, time, cdpmp
        c = cdpmp.Client({collector.write_key!r}, endpoint={collector.url!r}, mode=sys.argv[1],
                         upload_interval=0.5)
        c.flush(timeout=1)
        time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
        for i in range(10):
            c.track("u", "E")
            time.sleep(0.2)
        assert c.flush(timeout=20)
    """

    def start(mode: str, count: int) -> None:
        at = str(time.time() + 3.0)
        procs = [
            subprocess.Popen([sys.executable, "-c", textwrap.dedent(worker), mode, at]) for _ in range(count)
        ]
        assert all(p.wait(60) == 0 for p in procs)

    start("direct", 1)
    one_process = len(collector.requests)
    collector.reset()
    start("shared", 8)
    assert len(collector.unique_ids()) == 80
    print(f"requests: one process {one_process}, 8 shared-mode workers {len(collector.requests)}")
    assert len(collector.requests) <= one_process


def test_runtime_files_are_private(runtime_dir: str, collector: Collector) -> None:
    client = _shared(collector)
    client.track("u", "E")
    assert client.flush(timeout=10)
    assert stat.S_IMODE(os.stat(runtime_dir).st_mode) == 0o700
    for name in os.listdir(runtime_dir):
        assert stat.S_IMODE(os.stat(os.path.join(runtime_dir, name)).st_mode) == 0o600, name
    for proc in uploader_processes(runtime_dir):
        assert collector.write_key not in " ".join(proc.cmdline())
    assert collector.write_key not in Path(runtime_dir, "uploader.log").read_text()


def _warns_and_falls_back(collector: Collector, caplog: pytest.LogCaptureFixture) -> None:
    client = _shared(collector)
    assert client.stats()["mode"] == "direct"
    assert "shared mode unavailable" in caplog.text
    client.track("u", "E")
    assert client.flush(timeout=10) and len(collector.messages) == 1
    assert client.shutdown(timeout=5)  # direct mode started a consumer: stop it


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to create a directory owned by another uid")
def test_directory_owned_by_another_uid_is_refused(
    runtime_dir: str, collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    os.mkdir(runtime_dir, 0o700)
    os.chown(runtime_dir, 65534, 65534)
    _warns_and_falls_back(collector, caplog)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to create a file owned by another uid")
def test_ring_owned_by_another_uid_is_refused(
    runtime_dir: str, collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    os.mkdir(runtime_dir, 0o700)
    ring = os.path.join(runtime_dir, "ring")
    Path(ring).write_bytes(b"")
    os.chown(ring, 65534, 65534)
    _warns_and_falls_back(collector, caplog)


def test_incompatible_ring_version_falls_back_to_direct(
    runtime_dir: str, collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    os.mkdir(runtime_dir, 0o700)
    Ring(runtime_dir, capacity=4096).close()
    with open(os.path.join(runtime_dir, "ring"), "r+b") as fh:
        fh.seek(8)
        fh.write((99).to_bytes(4, "little"))
    _warns_and_falls_back(collector, caplog)


def test_stats_report_host_wide_counters(runtime_dir: str, collector: Collector) -> None:
    a, b = _shared(collector), _shared(collector)
    for i in range(10):
        a.track("u", "A", {"i": i})
        b.track("u", "B", {"i": i})
    assert a.flush(timeout=10) and b.flush(timeout=10)
    host: Dict[str, Any] = a.stats()["host"]
    assert host["accepted"] == 20 and host["sent"] == 20 and host["depth"] == 0
    assert host["uploader_pid"] == uploader_processes(runtime_dir)[0].pid
    assert host["heartbeat_age"] is not None and host["heartbeat_age"] < 5


def test_definitive_rejection_goes_to_the_dead_letter_file(runtime_dir: str, collector: Collector) -> None:
    collector.script([Fault(status=400)])
    client = _shared(collector)
    _, msg = client.track("u", "E")
    assert client.flush(timeout=10) is False  # its one event was given up
    lines: List[Dict[str, Any]] = [
        json.loads(x) for x in Path(runtime_dir, "dead-letter.jsonl").read_text().splitlines()
    ]
    assert [m["messageId"] for m in lines[0]["batch"]] == [msg["messageId"]]
    assert stat.S_IMODE(os.stat(os.path.join(runtime_dir, "dead-letter.jsonl")).st_mode) == 0o600
    assert client.stats()["host"]["dead_lettered"] == 1


def test_the_watch_thread_ends_when_the_ring_stays_empty_and_comes_back_on_demand(
    runtime_dir: str, collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:

    from cdpmp._senders import engine
    from cdpmp.shared import sink as shared_sink

    monkeypatch.setattr(shared_sink, "WATCH_IDLE_EXIT", 0.5)
    monkeypatch.setattr(shared_sink, "CHECK_EVERY", 0.1)

    client = _shared(collector)

    def watching() -> int:  # this client's watch, a timed job of the sender threads
        watch = client._sink._watch  # type: ignore[attr-defined]
        return int(watch is not None and not watch.done and watch in engine()._feeders)

    try:
        client.track("u", "E", message_id="w-1")
        assert watching() == 1
        assert client.flush(timeout=10)
        assert wait_until(lambda: watching() == 0, timeout=10)  # idle: dropped
        assert wait_until(lambda: engine().threads == 0, timeout=15)  # its thread too (IDLE_EXIT)
        time.sleep(0.2)  # past CHECK_EVERY: the next call checks the uploader again
        client.track("u", "E", message_id="w-2")
        assert watching() == 1  # back with the next event
        assert client.flush(timeout=10)
        assert sorted(collector.message_ids()) == ["w-1", "w-2"]
    finally:
        client.shutdown(timeout=5)


def test_debug_in_shared_mode_logs_each_batch_in_the_uploaders_log_and_says_where(
    runtime_dir: str, collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    caplog.set_level(logging.DEBUG, logger="cdpmp")
    client = _shared(collector, debug=True)
    try:
        ids = [client.track("u", "E", {"i": i})[1]["messageId"] for i in range(5)]
        assert client.flush(timeout=10) and sorted(collector.message_ids()) == sorted(ids)
        log = Path(runtime_dir, "uploader.log")
        assert wait_until(lambda: "batch of 5 event(s) to " in log.read_text(), timeout=10), log.read_text()
        assert f"{collector.url}/v1/batch: 200 ok" in log.read_text()
        said = [r.getMessage() for r in caplog.records if "line per batch is in" in r.getMessage()]
        assert said == [f"cdpmp: shared mode: the uploader sends; its line per batch is in {log}"]
    finally:
        client.shutdown(timeout=5)


def test_flush_sends_now_whatever_the_interval(runtime_dir: str, collector: Collector) -> None:
    # As direct mode's flush() does: the uploader is asked (the ring header's flush_to)
    # to send what was in the ring at the call, not at the source's 60 s interval.
    client = _shared(collector, upload_interval=60.0)
    try:
        for i in range(3):
            assert client.track("u", "E", message_id=f"f-{i}")[0]
        assert client.flush(timeout=20)
        assert sorted(collector.message_ids()) == ["f-0", "f-1", "f-2"]
    finally:
        client.shutdown(timeout=5)
