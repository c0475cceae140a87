"""What shared mode *reports* is true: lock-free reads of the ring are never torn, an
inherited lock never wedges the host, and no producer waits on the ring lock without
a bound. Real processes throughout; each test fails when its fix is removed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Dict

import pytest

from cdpmp.shared.files import ensure_dir
from cdpmp.shared.ring import Ring
from cdpmp.testing import Collector

pytestmark = pytest.mark.timeout(120)

# A writer that keeps the ring never empty (one record always stays) and bumps every
# counter, in a loop, for ``seconds``.
WRITER = textwrap.dedent(
    """
    import sys, time
    from cdpmp.shared import holding
    from cdpmp.shared.ring import Ring
    ring = Ring(sys.argv[1], capacity=1 << 20, max_count=100000)
    end = time.monotonic() + float(sys.argv[2])
    ring.put(1, b"keep")
    while time.monotonic() < end:
        for _ in range(50):
            ring.put(1, b"x" * 40)
        head, _, _ = ring.bounds()
        records = ring.read(head, 1 << 20, 1 << 30)
        ring.release(records[-2].end, len(records) - 1)  # all but the last
        holding.settle_counts(ring, {1: len(records) - 1})
        ring.header.bump("sent", 50)
    print("done", flush=True)
    """
)


def test_lock_free_reads_never_see_a_value_that_was_never_stored(tmp_path: Path) -> None:
    # struct.pack_into zeroes its target before it writes the real bytes: a reader
    # without the lock then saw a ring that was never empty as empty (flush() said
    # "drained"), and host counters fall (a counter reset for Prometheus).
    directory = ensure_dir(str(tmp_path / "rt"))
    reader = Ring(directory, capacity=1 << 20, max_count=100000)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, directory, "3"], stdout=subprocess.DEVNULL)
    try:
        empty = fell = reads = 0
        last_accepted = last_sent = last_tail = 0
        while writer.poll() is None and reads < 2_000_000:
            head, tail, count = reader.peek()
            host = reader.header.counters()
            reads += 1
            if tail > 0 and (count == 0 or tail == head):
                empty += 1
            if host["accepted"] < last_accepted or host["sent"] < last_sent or tail < last_tail:
                fell += 1
            last_accepted, last_sent, last_tail = host["accepted"], host["sent"], tail
        assert writer.wait(timeout=30) == 0
    finally:
        if writer.poll() is None:
            writer.kill()
    reader.close()
    assert reads > 1000
    assert (empty, fell) == (0, 0), f"{empty} empty and {fell} falling reads of {reads}"


# Holds the ring lock on a thread (as a producer inside put() would), forks a child
# that never calls cdpmp (a multiprocessing helper), and waits to be SIGKILLed.
WEDGER = textwrap.dedent(
    """
    import ctypes, os, sys, threading, time, cdpmp
    client = cdpmp.Client(sys.argv[2], endpoint=sys.argv[3], mode="shared")
    assert client.track("p", "E", message_id="wedger")[0]
    ring = client._sink._ring
    held = threading.Event()

    def hold():
        with ring.locked():
            held.set()
            time.sleep(120)

    threading.Thread(target=hold, daemon=True).start()
    held.wait(10)
    pid = os.fork() if sys.argv[1] == "python" else ctypes.PyDLL(None).fork()
    if pid == 0:
        time.sleep(120)
        os._exit(0)
    print(pid, flush=True)
    time.sleep(120)
    """
)

# A producer already running: tracks ``n`` events each time it reads a line.
PRODUCER = textwrap.dedent(
    """
    import json, logging, sys, cdpmp
    logging.basicConfig(level=logging.WARNING)
    client = cdpmp.Client(sys.argv[1], endpoint=sys.argv[2], mode="shared")
    assert client.track("q", "E", message_id="q-ready")[0] and client.flush(timeout=20)
    print("ready", flush=True)
    for line in sys.stdin:
        tag = line.strip()
        ok = [client.track("q", "E", message_id="%s-%d" % (tag, i))[0] for i in range(20)]
        print(json.dumps({"ok": ok, "flushed": client.flush(timeout=20) if all(ok) else None,
                          "queue_full": client.stats()["dropped"]["queue_full"]}), flush=True)
    """
)


def _wedge(kind: str, collector: Collector) -> int:
    """Start the wedger, SIGKILL it while its child lives; the child's pid."""
    wedger = subprocess.Popen(
        [sys.executable, "-c", WEDGER, kind, collector.write_key, collector.url],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert wedger.stdout is not None
    child = int(wedger.stdout.readline())
    wedger.kill()
    wedger.wait(timeout=10)
    wedger.stdout.close()
    return child


def _producer(collector: Collector, stderr: Any = None) -> subprocess.Popen[str]:
    """A running shared-mode producer (PRODUCER), once it has said it is ready."""
    producer = subprocess.Popen(
        [sys.executable, "-c", PRODUCER, collector.write_key, collector.url],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
    )  # fmt: skip
    assert producer.stdout is not None and producer.stdout.readline().strip() == "ready"
    return producer


def _ask(producer: subprocess.Popen[str], tag: str) -> Dict[str, Any]:
    assert producer.stdin is not None and producer.stdout is not None
    producer.stdin.write(tag + "\n")
    producer.stdin.flush()
    return dict(json.loads(producer.stdout.readline()))


@pytest.mark.usefixtures("runtime_dir")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_producer_killed_holding_the_lock_with_a_forked_child_does_not_wedge_the_host(
    collector: Collector,
) -> None:
    # The child closes its inherited lock descriptor in the after-fork hook itself, not
    # at its next cdpmp call (it never makes one): the lock dies with its holder.
    producer = _producer(collector)
    child = 0
    try:
        child = _wedge("python", collector)
        seen = _ask(producer, "after")
        assert seen == {"ok": [True] * 20, "flushed": True, "queue_full": 0}
        expected = {"wedger", "q-ready"} | {f"after-{i}" for i in range(20)}
        assert collector.wait_for(len(expected), timeout=20)
        assert collector.unique_ids() == expected and collector.duplicates() == {}
    finally:
        if child:
            os.kill(child, signal.SIGKILL)
        producer.kill()
        producer.communicate(timeout=10)


@pytest.mark.usefixtures("runtime_dir")
def test_a_lock_wedged_by_a_hookless_child_refuses_calls_in_bounded_time_then_recovers(
    collector: Collector,
) -> None:
    # A C fork() runs no Python hook: the child keeps the dead holder's lock. Every
    # call then answers (False, msg) after a bounded wait, counted and logged (not a
    # producer blocked in flock for ever); once that child is gone, calls succeed.
    producer = _producer(collector, stderr=subprocess.PIPE)
    child = 0
    try:
        child = _wedge("c", collector)
        assert _ask(producer, "wedged") == {"ok": [False] * 20, "flushed": None, "queue_full": 20}
        os.kill(child, signal.SIGKILL)
        child = 0
        time.sleep(0.2)
        seen = _ask(producer, "after")
        assert seen["ok"] == [True] * 20 and seen["flushed"] is True
        assert collector.wait_for(22, timeout=20)
        assert {f"after-{i}" for i in range(20)} <= collector.unique_ids()
    finally:
        if child:
            os.kill(child, signal.SIGKILL)
        producer.kill()
        _, err = producer.communicate(timeout=10)
    assert "the host's ring cannot take it" in err and err.count("WARNING") < 10, err


REFUSED = textwrap.dedent(
    """
    import json, logging, sys, cdpmp
    logging.basicConfig(level=logging.WARNING)
    seen = []
    client = cdpmp.Client("refused-key", endpoint=sys.argv[1], mode="shared",
                          on_error=lambda e, batch: seen.append((str(e), [m["messageId"] for m in batch])))
    tag = sys.argv[2]
    ok = all(client.track("u", "E", message_id="%s-%d" % (tag, i))[0] for i in range(int(sys.argv[3])))
    flushed = client.flush(timeout=30)
    print(json.dumps({"ok": ok, "flushed": flushed, "seen": seen,
                      "rejected": client.stats()["dropped"]["rejected"]}))
    """
)


@pytest.mark.usefixtures("runtime_dir")
def test_a_key_the_endpoint_refuses_reaches_the_apps_on_error_stats_and_log(collector: Collector) -> None:
    # Two processes of one source: every refused event reaches exactly one of them
    # (on_error with its message, counted, a WARNING in that process's own log).
    runs = [
        subprocess.run(
            [sys.executable, "-c", REFUSED, collector.url, tag, str(n)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        for tag, n in (("a", 20), ("b", 5))
    ]
    results = [json.loads(run.stdout.strip().splitlines()[-1]) for run in runs]
    # each flush() answers False: what it waited for was refused (and reported there)
    assert all(r["ok"] and r["flushed"] is False for r in results), runs
    reported = [mid for r in results for text, ids in r["seen"] for mid in ids]
    assert sorted(reported) == sorted([f"a-{i}" for i in range(20)] + [f"b-{i}" for i in range(5)])
    assert sum(r["rejected"] for r in results) == 25
    assert all("(401)" in text for r in results for text, _ in r["seen"])
    logged = [line for run in runs for line in run.stderr.splitlines() if "given up (rejected)" in line]
    assert logged and all("WARNING" in line and "(401)" in line for line in logged), [r.stderr for r in runs]
    assert collector.message_ids() == []


NO_UPLOADER = textwrap.dedent(
    """
    import json, logging, sys, cdpmp
    logging.basicConfig(level=logging.WARNING)
    client = cdpmp.Client(sys.argv[1], endpoint=sys.argv[2], mode="shared")
    ok = all(client.track("u", "E", message_id="%s-%d" % (sys.argv[3], i))[0] for i in range(5))
    print(json.dumps({"ok": ok, "flushed": client.flush(timeout=float(sys.argv[4]))}))
    """
)


@pytest.mark.parametrize("planted", ["lock-symlink", "log-fifo"])
def test_when_no_uploader_can_start_the_producers_say_why_and_send_themselves(
    planted: str, runtime_dir: str, collector: Collector, tmp_path: Path
) -> None:
    # A file planted where the uploader's lock or log goes: no uploader could ever
    # start, so a producer says why and uses direct mode rather than queuing in a
    # ring nobody reads. Once the operator removes it, shared mode works again.
    ensure_dir(runtime_dir)
    target = Path(runtime_dir, "uploader.lock" if planted == "lock-symlink" else "uploader.log")
    if planted == "lock-symlink":
        target.symlink_to(tmp_path / "elsewhere")
    else:
        os.mkfifo(target, 0o600)

    def producer(tag: str, wait: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", NO_UPLOADER, collector.write_key, collector.url, tag, str(wait)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    alone = producer("alone", 10)
    assert json.loads(alone.stdout.strip().splitlines()[-1]) == {"ok": True, "flushed": True}, alone.stderr
    assert "shared mode unavailable" in alone.stderr and target.name in alone.stderr, alone.stderr
    assert "using direct mode" in alone.stderr and not (tmp_path / "elsewhere").exists()
    target.unlink()  # the operator removes it: the next producer's uploader sends all
    done = producer("after", 30)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"ok": True, "flushed": True}, done.stderr
    assert "shared mode unavailable" not in done.stderr
    assert collector.wait_for(10, timeout=20)
    assert collector.unique_ids() == {f"{t}-{i}" for t in ("alone", "after") for i in range(5)}


@pytest.mark.timeout(180)
def test_a_healthy_source_is_never_refused_because_another_is_down(
    runtime_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # B's endpoint is down for 15 s and B's first events are the ring's oldest; A is
    # healthy and tracks 12x its max_queue_size, 4x the ring's bytes. Nothing of A
    # is refused, and when B's endpoint is back all of B arrives too: exactly once.
    import cdpmp
    from cdpmp.testing import Conditions, Outage

    monkeypatch.setenv("CDP_RING_BYTES", str(1 << 20))
    down = Collector(write_key="b-key", conditions=Conditions(outages=(Outage(0, 15, 503),)))
    with down, Collector(write_key="a-key") as up:
        b = cdpmp.Client("b-key", endpoint=down.url, mode="shared", upload_interval=0.05, max_queue_size=500)
        a = cdpmp.Client("a-key", endpoint=up.url, mode="shared", upload_interval=0.05, max_queue_size=500)
        try:
            b_ids = [
                b.track("u", "E", {"pad": "b" * 900}, message_id=f"b{i}")[1]["messageId"] for i in range(200)
            ]
            assert b.stats()["dropped"]["queue_full"] == 0
            refused = 0
            for i in range(6000):  # ≈1 KB each: 6 MB through a 1 MiB ring
                refused += not a.track("u", "E", {"pad": "a" * 900}, message_id=f"a{i}")[0]
                if i % 100 == 99 and not up.wait_for(i - 200 - refused, timeout=20):
                    break  # as fast as the uploader delivers (stuck: the asserts say why)
            assert refused == 0 and a.stats()["dropped"]["queue_full"] == 0
            assert up.wait_for(6000, timeout=60)
            assert up.unique_ids() == {f"a{i}" for i in range(6000)} and up.duplicates() == {}
            assert b.flush(timeout=90)  # B's endpoint is back: its held events go
            assert down.unique_ids() == set(b_ids) and down.duplicates() == {}
        finally:
            a.shutdown(timeout=5)
            b.shutdown(timeout=5)


@pytest.mark.parametrize("probe", ["fails", "delivers"])
def test_a_probe_in_flight_is_moved_out_of_the_way_and_its_outcome_decides_the_copy(
    runtime_dir: str, monkeypatch: pytest.MonkeyPatch, probe: str
) -> None:
    # Deterministic: the test is the uploader (it holds the election lock and turns
    # the dispatch loop itself), and B's probe, the request of B's records that hold
    # the ring's head, stays in flight until A has passed 3x the ring's bytes. A is
    # never refused; when the probe ends its copies are retried (it failed) or done
    # (it delivered): B arrives exactly once either way, and the ring ends empty.
    import fcntl
    import threading

    import cdpmp
    from cdpmp.shared.dispatch import Dispatch
    from cdpmp.shared.files import UPLOADER_LOCK, open_private, path

    class Gated:  # B's real transport, each request waiting for the test to let it go
        def __init__(self, real: Any) -> None:
            self.real, self.policy = real, real.policy
            self.gate, self.entered = threading.Event(), threading.Event()

        def post(self, payloads: Any, deadline: Any) -> Any:
            self.entered.set()
            assert self.gate.wait(30)
            return self.real.post(payloads, deadline)

    def turn(until: Any, what: str) -> None:
        end = time.monotonic() + 20
        while not until():
            assert time.monotonic() < end, what
            dispatch.cycle(draining=False)
            time.sleep(0.005)

    monkeypatch.setenv("CDP_RING_BYTES", str(128 << 10))
    directory = ensure_dir(runtime_dir)
    lock = open_private(path(directory, UPLOADER_LOCK))
    fcntl.flock(lock, fcntl.LOCK_EX)  # no uploader is started: this test is the one
    with Collector(write_key="b-key") as down, Collector(write_key="a-key") as up:
        b = cdpmp.Client("b-key", endpoint=down.url, mode="shared", upload_interval=0.01, max_queue_size=500)
        a = cdpmp.Client("a-key", endpoint=up.url, mode="shared", upload_interval=0.01, max_queue_size=500)
        try:
            b_ids = {
                b.track("u", "E", {"pad": "b" * 900}, message_id=f"b{i}")[1]["messageId"] for i in range(20)
            }
            assert a.track("u", "E", {"pad": "a" * 900}, message_id="a0")[0]
            dispatch = Dispatch(directory)
            dispatch.ring = Ring(directory)
            dispatch._forget(dispatch.ring.bounds()[0])
            dispatch._load_sources()
            b_source = b._sink._source  # type: ignore[attr-defined]
            gated = dispatch._sources[b_source].transport = Gated(dispatch._sources[b_source].transport)  # type: ignore[assignment]
            gated.gate.set()
            down.fail_next(1, 503)
            turn(lambda: dispatch._sources[b_source].lane.failures == 1, "B's first request failed")
            gated.gate.clear()
            turn(gated.entered.is_set, "B's probe started")
            refused = 0
            for i in range(1, 400):  # ≈ 400 KB through a 128 KiB ring, B's probe in flight
                refused += not a.track("u", "E", {"pad": "a" * 900}, message_id=f"a{i}")[0]
                if i % 20 == 0:
                    sent = i + 1 - refused
                    turn(lambda sent=sent: len(up.unique_ids()) >= sent, "A's events delivered")  # type: ignore[misc]
            assert refused == 0 and not gated.gate.is_set() and dispatch._flying
            turn(lambda: dispatch.window.cursor == dispatch.ring.bounds()[1], "the copies read, waiting")
            if probe == "fails":
                down.fail_next(1, 503)
            gated.gate.set()
            turn(lambda: down.unique_ids() == b_ids and len(up.unique_ids()) == 400, "all delivered")
            turn(lambda: dispatch.ring.bounds()[0] == dispatch.ring.bounds()[1], "the ring emptied")
            for _ in range(20):  # nothing left to send twice
                dispatch.cycle(draining=False)
            assert down.duplicates() == {} and up.duplicates() == {}
            assert [held for _, held, _ in dispatch.ring.header.sources()] == [
                0,
                0,
            ] and not dispatch.window.shadows._copy
        finally:
            os.close(lock)
            a.shutdown(timeout=1)
            b.shutdown(timeout=1)
