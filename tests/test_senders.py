"""The process's sender threads wake only when there is something to do, and no more
of them live than the lanes use (:mod:`cdpmp._senders`). Real threads throughout;
what is counted is wakes, threads and requests, never durations. Each test fails
with its rule undone (seen: FIFO wakes, every idle thread timing, a thread started
for a first event while the only one sends)."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, List, Optional, Tuple

import pytest

import cdpmp
from cdpmp import _senders
from cdpmp._senders import Engine
from cdpmp.testing import Collector, Conditions

pytestmark = pytest.mark.timeout(60)


def _busy(engine: Engine, n: int) -> threading.Event:
    """Make ``n`` threads alive at once (each holding a job until the event)."""
    release, started = threading.Event(), threading.Semaphore(0)

    def job() -> None:
        started.release()
        assert release.wait(10)

    for _ in range(n):
        assert engine.submit(job)
    for _ in range(n):
        assert started.acquire(timeout=10)
    assert engine.threads == n
    return release


def _until(check: Callable[[], bool], what: str, seconds: float = 20.0) -> None:
    end = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < end, what
        time.sleep(0.01)


def test_threads_beyond_what_the_work_needs_exit_while_traffic_continues(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Four threads, then one short job every 20 ms for 3 s: one thread carries it. Woken
    # in turn (CPython's own order), each of the four gets a job every 80 ms and none
    # reaches its 0.5 s idle exit; woken last-in-first-out, three exit.
    monkeypatch.setattr(_senders, "IDLE_EXIT", 0.5)
    engine = Engine()
    _busy(engine, 4).set()
    ran: List[int] = []
    end = time.monotonic() + 3.0
    while time.monotonic() < end:
        assert engine.submit(lambda: ran.append(threading.get_ident()))
        time.sleep(0.02)
    assert engine.threads == 1, engine.threads
    assert len(set(ran[-20:])) == 1  # the same warm thread
    _until(lambda: engine.threads == 0, "the last thread exits when idle")


class _Timed:
    """A feeder with one job due every 0.2 s from ``first`` (monotonic), ``jobs`` in
    all; it counts the asks."""

    def __init__(self, first: float, jobs: int) -> None:
        self.due = [first + 0.2 * i for i in range(jobs)]
        self.asked: List[float] = []
        self.done = threading.Event()

    def next_job(self, now: float) -> Tuple[Optional[Callable[[], None]], Optional[float]]:
        self.asked.append(now)
        if not self.due:
            return None, None
        if now < self.due[0]:
            return None, self.due[0] - now
        self.due.pop(0)
        return (self.done.set if not self.due else lambda: None), (self.due[0] - now if self.due else None)

    def rest(self) -> None:
        pass


def test_one_idle_thread_times_the_next_job_not_all_of_them() -> None:
    # Four threads are alive when a feeder with a job due every 0.2 s is queued: one
    # of them times each job (it asks for it, then for the next one's time). Every
    # thread timing meant four wakes per due time, and three asks for nothing.
    engine = Engine()
    release = _busy(engine, 4)
    first = time.monotonic() + 0.3
    feeder = _Timed(first, jobs=5)
    engine.activate(feeder, first)
    release.set()  # the four come back and find the feeder waiting for its time
    assert feeder.done.wait(10)
    late = [t for t in feeder.asked if t >= first]
    assert len(late) <= 2 * 5 + 1, len(late)


def test_a_first_event_while_the_only_thread_sends_starts_no_second_one() -> None:
    # One request at a time (max_in_flight=1) to an endpoint 0.3 s away. A batch goes;
    # while it is in flight the next events arrive, the first of them starting its
    # batch's interval and the 100th filling it. The sending thread asks again when its
    # request ends: a second thread would have nothing to send (the lane is full).
    engine = _senders.engine()  # the process's: earlier tests' threads end first
    assert engine.retire(time.monotonic() + 10)
    engine.peak_threads = 0
    with Collector(conditions=Conditions(latency=0.3), strict=False) as collector:
        client = cdpmp.Client(
            collector.write_key,
            endpoint=collector.url,
            max_in_flight=1,
            upload_interval=0.05,
            max_queue_size=1000,
        )
        ids = []
        for i in range(400):
            ok, msg = client.track("u", "E", message_id=f"m{i}")
            assert ok
            ids.append(msg["messageId"])
            if i % 100 == 0:
                time.sleep(0.1)  # a batch in flight meanwhile
        assert client.flush(timeout=20)
        assert collector.unique_ids() == set(ids) and collector.duplicates() == {}
        assert engine.peak_threads == 1
        assert collector.peak_concurrency == 1
        client.shutdown(timeout=5)


def test_after_a_burst_threads_and_sockets_follow_the_lane_while_traffic_continues(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A burst to an endpoint 0.1 s away widens the lane (several requests in flight,
    # each with its thread and connection); then a trickle sends one request at a
    # time. Within the idle exit the threads beyond it end and the lane's narrowing
    # closes the idle connections, while the trickle goes on: not only once it stops.
    import psutil

    monkeypatch.setattr(_senders, "IDLE_EXIT", 0.5)
    with Collector(conditions=Conditions(latency=0.1), strict=False) as collector:
        client = cdpmp.Client(
            collector.write_key, endpoint=collector.url, upload_interval=0.05, max_queue_size=20000
        )
        port = int(collector.url.rsplit(":", 1)[1])
        me = psutil.Process()

        def sockets() -> int:
            return sum(1 for c in me.net_connections("tcp") if c.raddr and c.raddr.port == port)

        ids = [client.track("u", "E", message_id=f"b{i}")[1]["messageId"] for i in range(6000)]
        _until(lambda: collector.peak_concurrency >= 3, "the burst widened the lane")
        wide = sockets()
        _until(lambda: len(collector.unique_ids()) == 6000, "the burst delivered", 60)
        engine = _senders.engine()
        for i in range(20):  # 5 s of a trickle: each batch alone in flight
            ids.append(client.track("u", "E", message_id=f"t{i}")[1]["messageId"])
            time.sleep(0.25)
        lane = client._sink._lane  # type: ignore[attr-defined]
        # One thread; idle sockets no more than the lane's limit (it keeps one unused
        # slot: it shrinks only when more than one stands unused).
        assert engine.threads == 1 and sockets() <= lane.limit <= 2, (engine.threads, sockets(), lane.limit)
        assert wide >= 3  # the connections were there to close
        assert client.flush(timeout=20)
        assert collector.unique_ids() == set(ids) and collector.duplicates() == {}
        client.shutdown(timeout=5)


def test_a_burst_wakes_a_sender_once_per_batch_not_once_per_event() -> None:
    # 20,000 events flat out: the engine is told of a batch's first event and of the
    # event that fills it, never of the events queued behind a full batch (each one
    # did, before: 19,902 wakes for 20,000 events).
    told: List[float] = []
    engine = _senders.engine()
    activate = engine.activate

    def counted(feeder: Any, at: float = _senders.NOW) -> bool:
        told.append(at)
        return activate(feeder, at)

    with Collector(strict=False) as collector:
        client = cdpmp.Client(collector.write_key, endpoint=collector.url, max_queue_size=30000)
        engine.activate = counted  # type: ignore[method-assign]
        try:
            ids = [client.track("u", "E", message_id=f"m{i}")[1]["messageId"] for i in range(20000)]
            assert client.flush(timeout=60)
        finally:
            engine.activate = activate  # type: ignore[method-assign]
        assert collector.unique_ids() == set(ids) and collector.duplicates() == {}
        assert len(told) <= 2 * 20000 // 100 + 2, len(told)
        client.shutdown(timeout=5)


def test_a_job_for_later_wakes_no_waiting_thread_while_another_is_busy() -> None:
    # One thread sends (its request in flight), one waits. A batch's first event (a job
    # due in 0.3 s) wakes neither: the busy one asks when its request ends. Woken, the
    # waiting one took over the timing and then the work, in turns with the other:
    # measured 10.5 sender wakes per batch instead of 3 after a burst left two threads.
    engine = Engine()
    sending, idle = threading.Event(), threading.Event()
    started = threading.Semaphore(0)

    def hold(until: threading.Event) -> Callable[[], None]:
        def job() -> None:
            started.release()
            assert until.wait(10)

        return job

    assert engine.submit(hold(sending)) and engine.submit(hold(idle))
    assert started.acquire(timeout=10) and started.acquire(timeout=10)
    idle.set()
    _until(lambda: engine._waiting == 1, "one thread waits")
    feeder = _Timed(time.monotonic() + 0.3, jobs=1)
    engine.activate(feeder, feeder.due[0])
    time.sleep(0.1)
    assert feeder.asked == []  # nobody was woken for it
    sending.set()  # the request ends: that thread asks, and times the job
    assert feeder.done.wait(10)
