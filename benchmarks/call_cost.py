"""Part 1: what one ``track()`` costs, in fresh processes, against the local collector.

Each target runs in its own fresh interpreter (``python -m benchmarks.call_cost --child
TARGET``) so imports, threads and caches never leak between targets. The child times
``track()`` in chunks (caller µs per call; median of chunks), flushes, and reports the
CPU of every process involved per delivered event: its own (caller + consumer thread)
and, in shared mode, the uploader's. The collector lives in the parent, so its CPU is
not counted against any client.

Memory: the child queues N events while the endpoint stalls (the collector holds the
first request), and reports its RSS growth per queued event; in shared mode the events
live in the ring, so we report ring bytes per event (the host-wide cost) and the
producer's RSS growth.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List

from benchmarks.common import EVENT_PROPS, progress, shared_runtime

TARGETS = ("official", "segment", "cdpmp-direct", "cdpmp-shared", "cdpmp-sync")


def _client(target: str, url: str, key: str) -> Any:
    if target == "official":
        from customerio.analytics import Client as Official

        return Official(key, host=url)
    if target == "segment":
        import segment.analytics as segment

        return segment.Client(key, host=url)
    import cdpmp

    mode = "shared" if target == "cdpmp-shared" else "direct"
    return cdpmp.Client(key, endpoint=url, sync_mode=target == "cdpmp-sync", mode=mode)


def _cpu(pid: int) -> float:
    import psutil

    if not pid:
        return 0.0
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def child(target: str, url: str, key: str, events: int, chunk: int) -> Dict[str, Any]:
    client = _client(target, url, key)
    client.track(user_id="warmup", event="Warmup", properties=EVENT_PROPS)
    client.flush()
    uploader = 0
    if target == "cdpmp-shared":
        uploader = client.stats()["host"]["uploader_pid"] or 0
    own0, up0 = time.process_time(), _cpu(uploader)
    per_call: List[float] = []
    for start in range(0, events, chunk):
        t0 = time.perf_counter()
        for _ in range(start, start + chunk):
            client.track(user_id="user-1", event="Order Completed", properties=EVENT_PROPS)
        per_call.append((time.perf_counter() - t0) / chunk * 1e6)
    client.flush()
    cpu = (time.process_time() - own0) + (_cpu(uploader) - up0)
    return {"caller_us_median": statistics.median(per_call), "cpu_us_per_event": cpu / events * 1e6}


def memory_child(target: str, url: str, key: str, events: int) -> None:
    import psutil

    client = _client(target, url, key)
    client.track(user_id="warmup", event="Warmup", properties=EVENT_PROPS)  # starts threads/uploader
    time.sleep(0.5)  # the warm-up batch is now stuck in the stalled first request
    me = psutil.Process()
    rss0 = me.memory_info().rss
    for i in range(events):
        client.track(user_id="user-1", event="Order Completed", properties={**EVENT_PROPS, "i": i})
    rss = me.memory_info().rss - rss0
    out: Dict[str, Any] = {"producer_rss_bytes_per_event": rss / events}
    if target == "cdpmp-shared":
        host = client.stats()["host"]
        out["ring_bytes_per_event"] = host["bytes_used"] / max(1, host["depth"])
    print(json.dumps(out), flush=True)
    os._exit(0)  # do not wait for the stalled endpoint


def _run_child(args: List[str], env: Dict[str, str]) -> Dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.call_cost", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    if out.returncode != 0 and not out.stdout.strip():
        raise RuntimeError(out.stderr[-2000:])
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def run(quick: bool = False) -> Dict[str, Any]:
    from cdpmp.testing import Collector, Fault

    reps = 1 if quick else 3
    events = 2000 if quick else 8000
    rows: Dict[str, List[Dict[str, Any]]] = {t: [] for t in TARGETS}
    memory: Dict[str, Dict[str, Any]] = {}
    # strict=False: on this 2-core machine the collector's per-message checks would compete
    # for CPU with the processes we measure (and with shared mode's extra process most).
    with Collector(write_key="bench", strict=False) as collector, shared_runtime() as runtime:
        env = {**os.environ, "CDP_WRITE_KEY": "bench", "CDP_RUNTIME_DIR": runtime}
        for rep in range(reps):
            for target in TARGETS:
                n = events // 20 if target == "cdpmp-sync" else events
                collector.reset()
                row = _run_child(["--child", target, "--url", collector.url, "--events", str(n)], env)
                row["delivered_ratio"] = (len(collector.unique_ids()) - 1) / n  # minus the warm-up
                rows[target].append(row)
                progress(
                    f"call cost {rep + 1}/{reps} {target}: {row['caller_us_median']:.2f} µs/call, "
                    f"{row['cpu_us_per_event']:.1f} µs CPU/event, delivered {row['delivered_ratio']:.3f}"
                )
        for target in ("official", "cdpmp-direct", "cdpmp-shared"):
            collector.reset()
            collector.script([Fault(delay=5.0)] * 3)  # the endpoint stalls: events pile up in the queue
            memory[target] = _run_child(
                ["--memory", target, "--url", collector.url, "--events", "2000" if quick else "5000"], env
            )
            progress(f"memory {target}: {memory[target]}")
    summary: Dict[str, Any] = {}
    for target, target_rows in rows.items():
        calls = [r["caller_us_median"] for r in target_rows]
        cpus = [r["cpu_us_per_event"] for r in target_rows]
        summary[target] = {
            "caller_us_median": statistics.median(calls),
            "caller_us_spread": [min(calls), max(calls)],
            "cpu_us_per_event": statistics.median(cpus),
            "cpu_us_spread": [min(cpus), max(cpus)],
            "delivered_ratio": min(r["delivered_ratio"] for r in target_rows),
        }
    base = summary["official"]
    for target in TARGETS:
        summary[target]["caller_ratio"] = summary[target]["caller_us_median"] / base["caller_us_median"]
        summary[target]["cpu_ratio"] = summary[target]["cpu_us_per_event"] / base["cpu_us_per_event"]
    return {"targets": summary, "memory": memory, "events_per_rep": events, "reps": reps}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child")
    parser.add_argument("--memory")
    parser.add_argument("--url")
    parser.add_argument("--events", type=int, default=8000)
    parser.add_argument("--chunk", type=int, default=200)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    key = os.environ.get("CDP_WRITE_KEY", "bench")
    if args.child:
        print(json.dumps(child(args.child, args.url, key, args.events, min(args.chunk, args.events))))
    elif args.memory:
        memory_child(args.memory, args.url, key, args.events)
    else:
        print(json.dumps(run(quick=args.quick), indent=2))


if __name__ == "__main__":
    main()
