"""Part 4: delivery behind a real network — round trips of 0–150 ms and a long outage.

The strict collector plays the network (:class:`cdpmp.testing.Conditions`): each answer
waits a fixed round trip; the outage scenario answers 503 for a window of time. For
each client (official, cdpmp direct, cdpmp shared), forked-style worker processes
(``python -m benchmarks.network --child ...``, each building its client itself, as a
worker does after fork) track at a fixed rate for a fixed time, then flush. We count:

* delivered ÷ tracked, by messageId (duplicates counted apart);
* sustained events/s: unique events delivered ÷ (last acknowledgement − first track);
* time from ``track()`` to acknowledgement, p50 and p99: each event carries its
  ``track()`` wall time; the collector stamps it when it processes the batch, and the
  acknowledgement leaves ``rtt`` later (the collector's fixed answer delay);
* HTTP requests; CPU seconds of the workers (and, in shared mode, the uploader).

The collector runs in this process, so its CPU is not charged to any client.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional

from benchmarks.common import EVENT_PROPS, progress, shared_runtime, uploader_pid
from cdpmp.testing import Collector, Conditions, Outage

CLIENTS = ("official", "cdpmp-direct", "cdpmp-shared")


def _client(target: str, url: str, key: str) -> Any:
    if target == "official":
        from customerio.analytics import Client as Official

        return Official(key, host=url)
    import cdpmp

    return cdpmp.Client(key, endpoint=url, mode="shared" if target == "cdpmp-shared" else "direct")


def child(target: str, url: str, key: str, worker: int, rate: float, duration: float, wait: float) -> None:
    """One worker: track ``rate``/s for ``duration`` s, flush (at most ``wait`` s), report."""
    client = _client(target, url, key)
    events = int(rate * duration)
    accepted = 0
    started_at = time.time()
    start = time.monotonic()
    for i in range(events):
        ahead = start + i / rate - time.monotonic()
        if ahead > 0.005:  # pace in 5 ms steps: a sleep per event would cost more than track()
            time.sleep(ahead)
        props = {**EVENT_PROPS, "t": time.time()}
        ok, _ = client.track(
            user_id=f"u{worker}", event="Order Completed", properties=props, message_id=f"w{worker}-{i}"
        )
        accepted += bool(ok)
    if target == "official":  # its flush() has no deadline: give it one from outside
        flusher = threading.Thread(target=client.flush, daemon=True)
        flusher.start()
        flusher.join(wait)
    else:
        client.flush(timeout=wait)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime
    print(
        json.dumps({"tracked": events, "accepted": accepted, "cpu_s": cpu, "start": started_at}),
        flush=True,
    )
    os._exit(0)  # what was not delivered by the flush deadline counts as not delivered


def scenario(
    target: str,
    rtt: float,
    workers: int,
    rate: float,
    duration: float,
    outages: tuple = (),  # type: ignore[type-arg]
    wait: float = 60.0,
) -> Dict[str, Any]:
    """Run one cell; the row of the report."""
    acks: List[float] = []  # seconds from track() to acknowledgement, per event
    last = [0.0]  # wall time of the last acknowledgement
    lock = threading.Lock()

    def on_message(msg: Dict[str, Any]) -> None:
        acked = time.time() + rtt
        with lock:
            acks.append(acked - msg["properties"]["t"])
            last[0] = max(last[0], acked)

    conditions = Conditions(latency=rtt, outages=outages)
    with (
        Collector(strict=False, conditions=conditions, on_message=on_message) as collector,
        shared_runtime() as runtime,
    ):
        env = {**os.environ, "CDP_RUNTIME_DIR": runtime}
        args = [target, collector.url, collector.write_key]
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.network",
                    "--child",
                    *args,
                    str(w),
                    str(rate),
                    str(duration),
                    str(wait),
                ],
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            for w in range(workers)
        ]
        reports = []
        for proc in procs:
            out, _ = proc.communicate(timeout=duration + wait + 120)
            reports.append(json.loads(out.strip().splitlines()[-1]))
        uploader_cpu = 0.0
        if target == "cdpmp-shared":
            uploader_cpu = _settle_uploader(runtime, collector, sum(r["accepted"] for r in reports), wait)
        summary = collector.summary()
    tracked = sum(r["tracked"] for r in reports)
    unique = summary["unique"]
    with lock:
        latencies = sorted(acks)
    span = last[0] - min(r["start"] for r in reports)  # first track() to last acknowledgement
    cpu = sum(r["cpu_s"] for r in reports) + uploader_cpu
    return {
        "client": target,
        "rtt_ms": round(rtt * 1000),
        "workers": workers,
        "offered_eps": workers * rate,
        "tracked": tracked,
        "accepted": sum(r["accepted"] for r in reports),
        "delivered_ratio": unique / tracked if tracked else 0.0,
        "duplicates": summary["duplicates"],
        "sustained_eps": unique / span if span > 0 else 0.0,
        "ack_p50_ms": _pct(latencies, 0.50),
        "ack_p99_ms": _pct(latencies, 0.99),
        "http_requests": summary["requests"],
        "peak_concurrency": summary["peak_concurrency"],
        "cpu_s": cpu,
        "cpu_ms_per_1000": cpu / unique * 1e6 if unique else None,
    }


def _settle_uploader(runtime: str, collector: Collector, accepted: int, wait: float) -> float:
    """Wait until the uploader delivered what the workers handed it; its CPU seconds."""
    import psutil

    deadline = time.monotonic() + wait
    while collector.summary()["unique"] < accepted and time.monotonic() < deadline:
        time.sleep(0.1)
    pid = uploader_pid(runtime)
    if not pid:
        return 0.0
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def _pct(values: List[float], q: float) -> Optional[float]:
    if not values:
        return None
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


def run(quick: bool) -> Dict[str, Any]:
    """All scenarios; ``quick`` shrinks them to a smoke test."""
    sweep = [0.05] if quick else [0.0, 0.05, 0.1, 0.15]
    workers, rate, duration = (2, 100.0, 0.5) if quick else (8, 250.0, 8.0)
    rows: List[Dict[str, Any]] = []
    for rtt in sweep:
        for target in CLIENTS:
            progress(f"  {target}: {rtt * 1000:.0f} ms round trip, {workers} workers × {rate:.0f} events/s")
            rows.append(scenario(target, rtt, workers, rate, duration))
    throughput: List[Dict[str, Any]] = []
    if not quick:
        for target in CLIENTS:
            progress(f"  {target}: throughput at 100 ms, 8 workers × 1500 events/s")
            throughput.append(scenario(target, 0.1, 8, 1500.0, 6.0))
    window = (0.3, 1.2) if quick else (5.0, 65.0)
    # 4 × 40 events/s over a 60 s outage is 9,600 held events: within the default
    # max_queue_size of every client (per process for the official client and direct
    # mode, per source host-wide in shared mode), so any loss would be a defect.
    o_workers, o_rate, o_duration = (2, 40.0, 2.0) if quick else (4, 40.0, 75.0)
    outage: List[Dict[str, Any]] = []
    # --quick (a smoke test, under a minute in all) leaves out the official client
    # here: its backoff alone would outlast the whole budget.
    for target in CLIENTS[1:] if quick else CLIENTS:
        progress(
            f"  {target}: outage (503) from {window[0]:.0f} s to {window[1]:.0f} s at 50 ms, {o_workers} × {o_rate:.0f}/s"
        )
        row = scenario(target, 0.05, o_workers, o_rate, o_duration, (Outage(*window, 503),), wait=120.0)
        outage.append({**row, "outage_s": window[1] - window[0]})
    progress("  cdpmp-shared: an idle host (a live producer, nothing to send)")
    idle_row = idle(1.0 if quick else 30.0)
    return {"sweep": rows, "throughput": throughput, "outage": outage, "idle": idle_row, "quick": quick}


def idle(seconds: float) -> Dict[str, Any]:
    """What an idle host costs in shared mode: uploader CPU and requests per minute,
    with one live producer that tracked one event and then does nothing."""
    import psutil

    import cdpmp

    with Collector(strict=False) as collector, shared_runtime() as runtime:
        os.environ["CDP_RUNTIME_DIR"] = runtime
        try:
            client = cdpmp.Client(collector.write_key, endpoint=collector.url, mode="shared")
            client.track(user_id="u", event="warm-up")
            client.flush(timeout=30)
            proc = psutil.Process(uploader_pid(runtime))
            requests0, cpu0 = collector.summary()["requests"], proc.cpu_times()
            time.sleep(seconds)
            cpu1 = proc.cpu_times()
            requests = collector.summary()["requests"] - requests0
            client.shutdown(timeout=5)
        finally:
            del os.environ["CDP_RUNTIME_DIR"]
    busy = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    return {
        "seconds": seconds,
        "uploader_cpu_pct": busy / seconds * 100,
        "requests_per_min": requests / seconds * 60,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=7, metavar=("TARGET", "URL", "KEY", "W", "RATE", "DURATION", "WAIT"))
    args = parser.parse_args()
    target, url, key, w, rate, duration, wait = args.child
    child(target, url, key, int(w), float(rate), float(duration), float(wait))


if __name__ == "__main__":
    main()
