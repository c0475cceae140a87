"""The delivery engine's call-cost table: ``python -m benchmarks.engine [--quick]``.

For each client (official, cdpmp direct, shared, sync, and direct with ``send=False``,
the floor) and each endpoint placement (``out``: the collector in another process, as in
production; ``in``: in the caller's process, as in a user's test suite), a fresh
interpreter measures:

* burst: 20,000 ``track()`` calls flat out, µs per call (caller's thread, wall clock);
* paced: once the burst is delivered, 5,000 calls per second for 1 s (a sleep between
  calls, as requests arrive),
  each call timed: p50 / p99 / max µs, and the voluntary context switches of every
  other thread (sender wakes) per 100 events;
* CPU per delivered event: the process's CPU (caller and sender threads) plus, in shared
  mode, the uploader's, divided by the events the collector received;
* the peak of threads alive and of requests in flight (the collector's count).

Ratios are against the official client measured in the same run (these machines are
shared and noisy). Prints a Markdown table and writes JSON to stdout's last line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from typing import Any, Dict, List

from benchmarks.common import EVENT_PROPS, progress, shared_runtime

TARGETS = ("official", "direct", "shared", "sync", "floor")

CHILD = textwrap.dedent(
    """
    import json, os, sys, threading, time, psutil
    target, placement, url, key = sys.argv[1:5]
    burst, paced, rate = int(sys.argv[5]), int(sys.argv[6]), 5000
    props = json.loads(os.environ["BENCH_PROPS"])
    collector = None
    if placement == "in":
        from cdpmp.testing import Collector
        collector = Collector(write_key=key, strict=False).start()
        url = collector.url
    if target == "official":
        from customerio.analytics import Client
        client = Client(key, host=url, max_queue_size=burst + paced + 1000)
    else:
        import cdpmp
        client = cdpmp.Client(key, endpoint=url, max_queue_size=burst + paced + 1000,
                              mode="shared" if target == "shared" else "direct",
                              sync_mode=target == "sync", send=target != "floor")
    for i in range(200):
        client.track("warm", "Warmup", props)
    client.flush()
    uploader = 0
    if target == "shared":
        uploader = client.stats()["host"]["uploader_pid"] or 0
    def cpu(pid):
        t = psutil.Process(pid).cpu_times() if pid else None
        return (t.user + t.system) if t else 0.0
    cpu0, up0, peak = time.process_time(), cpu(uploader), threading.active_count()
    t0 = time.perf_counter()
    for i in range(burst):
        client.track("user-%d" % (i % 97), "Order Completed", props)
    burst_us = (time.perf_counter() - t0) / burst * 1e6
    peak = max(peak, threading.active_count())
    client.flush()  # the paced calls alone: not while the burst is still being sent
    def wakes():  # voluntary context switches of every thread but this one
        me, total = threading.get_native_id(), 0
        for tid in os.listdir("/proc/self/task"):
            if int(tid) != me:
                try:
                    with open(f"/proc/self/task/{tid}/status") as f:
                        total += int(next(l for l in f if l.startswith("voluntary_ctxt")).split()[1])
                except (OSError, StopIteration):
                    pass  # a thread that ended meanwhile
        return total
    calls, threads_paced = [], threading.active_count()
    wakes0 = wakes()
    start = time.perf_counter()
    for i in range(paced):
        due = start + i / rate
        wait = due - time.perf_counter()
        if wait > 0:  # a sleep between calls, as requests arrive
            time.sleep(wait)
        c0 = time.perf_counter()
        client.track("user-%d" % (i % 97), "Order Completed", props)
        calls.append((time.perf_counter() - c0) * 1e6)
        if i % 500 == 0:
            peak = max(peak, threading.active_count())
            threads_paced = max(threads_paced, threading.active_count())
    paced_wakes = wakes() - wakes0
    client.flush()
    spent = (time.process_time() - cpu0) + (cpu(uploader) - up0)
    calls.sort()
    out = {"burst_us": burst_us, "p50_us": calls[len(calls) // 2], "p99_us": calls[int(len(calls) * 0.99)],
           "max_us": calls[-1], "cpu_s": spent, "threads_peak": peak,
           "threads_paced": threads_paced, "wakes_per_batch": paced_wakes / max(1, paced / 100)}
    if collector is not None:
        out["received"] = max(0, len(collector.unique_ids()) - 200)
        out["peak_in_flight"] = collector.peak_concurrency
        collector.stop()
    print(json.dumps(out))
    """
)


def _one(
    target: str, placement: str, url: str, key: str, burst: int, paced: int, env: Dict[str, str]
) -> Dict[str, Any]:
    if target == "sync":
        burst, paced = burst // 20, paced // 20
    out = subprocess.run(
        [sys.executable, "-c", CHILD, target, placement, url, key, str(burst), str(paced)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{target}/{placement}: {out.stderr[-2000:]}")
    row: Dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    row["events"] = burst + paced
    return row


def run(quick: bool = False) -> Dict[str, Any]:
    from cdpmp.testing import Collector

    burst, paced, reps = (4000, 1000, 1) if quick else (20000, 5000, 3)
    results: Dict[str, Dict[str, List[Dict[str, Any]]]] = {}
    with Collector(write_key="bench", strict=False) as collector, shared_runtime() as runtime:
        env = {**os.environ, "CDP_RUNTIME_DIR": runtime, "BENCH_PROPS": json.dumps(EVENT_PROPS)}
        env.pop("CDP_MODE", None)
        for rep in range(reps):
            for placement in ("out", "in"):
                for target in TARGETS:
                    collector.reset()
                    row = _one(target, placement, collector.url, "bench", burst, paced, env)
                    if placement == "out":
                        row["received"] = max(0, len(collector.unique_ids()) - 200)
                        row["peak_in_flight"] = collector.peak_concurrency
                    results.setdefault(placement, {}).setdefault(target, []).append(row)
                    progress(f"engine {rep + 1}/{reps} {placement} {target}: {row['burst_us']:.2f} µs burst")
    return {"placements": {p: _summary(rows) for p, rows in results.items()}, "burst": burst, "paced": paced}


def _summary(rows: Dict[str, List[Dict[str, Any]]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for target, reps in rows.items():
        med = {k: statistics.median(r[k] for r in reps) for k in ("burst_us", "p50_us", "p99_us", "max_us")}
        delivered = min(r["received"] for r in reps)
        med["cpu_us_per_event"] = (
            statistics.median(r["cpu_s"] / max(1, r["received"]) * 1e6 for r in reps)
            if delivered > 0
            else 0.0
        )
        med["threads_peak"] = max(r["threads_peak"] for r in reps)
        med["threads_paced"] = max(r["threads_paced"] for r in reps)
        med["wakes_per_batch"] = statistics.median(r["wakes_per_batch"] for r in reps)
        med["peak_in_flight"] = max(r["peak_in_flight"] for r in reps)
        med["delivered_ratio"] = delivered / reps[0]["events"]
        out[target] = med
    base = out["official"]
    for row in out.values():
        row["burst_ratio"] = row["burst_us"] / base["burst_us"]
        row["p50_ratio"] = row["p50_us"] / base["p50_us"]
        row["p99_ratio"] = row["p99_us"] / base["p99_us"]
        row["cpu_ratio"] = (
            row["cpu_us_per_event"] / base["cpu_us_per_event"] if base["cpu_us_per_event"] else 0.0
        )
    return out


def wakes(placement: str, row: Dict[str, Any]) -> str:
    """Sender wakes per batch; not shown where the collector's threads share the process."""
    return f"{row['wakes_per_batch']:.1f}" if placement == "out" else "n/a"


def markdown(result: Dict[str, Any]) -> str:
    lines = []
    for placement, rows in result["placements"].items():
        where = "another process" if placement == "out" else "the caller's process"
        lines += [
            f"\nEndpoint in {where}; burst of {result['burst']} calls, then {result['paced']} at 5,000/s:\n",
            "| client | burst µs | × official | paced p50 / p99 / max µs | p50 × official | CPU µs/event "
            "| × official | threads (paced) | sender wakes / batch (paced) | in flight | delivered |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in rows.items():
            lines.append(
                f"| {name} | {r['burst_us']:.2f} | {r['burst_ratio']:.2f} | {r['p50_us']:.1f} / {r['p99_us']:.1f} / "
                f"{r['max_us']:.0f} | {r['p50_ratio']:.2f} | {r['cpu_us_per_event']:.1f} | {r['cpu_ratio']:.2f} | "
                f"{r['threads_peak']} ({r['threads_paced']}) | {wakes(placement, r)} | "
                f"{r['peak_in_flight']} | {r['delivered_ratio']:.3f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    started = time.monotonic()
    result = run(quick=args.quick)
    print(markdown(result))
    progress(f"done in {time.monotonic() - started:.0f} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
