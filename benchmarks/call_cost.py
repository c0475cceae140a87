"""Part 1: the cost of one ``track()`` call, in fresh processes, against the local collector.

Each target runs in its own fresh interpreter (``python -m benchmarks.call_cost
--child TARGET``) so imports, threads and caches never leak between targets. The
child times ``track()`` in chunks (caller µs per call, median of chunks), then flushes
and reports process CPU (all its threads: caller + consumer) per delivered event. The
collector lives in the parent process, so its CPU is not counted against any client.
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

TARGETS = ("official", "cdpmp-direct", "cdpmp-sync")
EVENT_PROPS = {
    "plan": "pro",
    "price": 19.99,
    "currency": "USD",
    "items": 3,
    "coupon": None,
    "path": "/checkout/complete",
    "referrer": "https://example.com/cart",
}


def _client(target: str, url: str, key: str) -> Any:
    if target == "official":
        from customerio.analytics import Client as Official

        return Official(key, host=url)
    import cdpmp

    return cdpmp.Client(key, endpoint=url, sync_mode=target == "cdpmp-sync")


def child(target: str, url: str, key: str, events: int, chunk: int) -> Dict[str, Any]:
    client = _client(target, url, key)
    client.track(user_id="warmup", event="Warmup", properties=EVENT_PROPS)
    client.flush()
    cpu0 = time.process_time()
    per_call: List[float] = []
    for start in range(0, events, chunk):
        t0 = time.perf_counter()
        for _ in range(start, start + chunk):
            client.track(user_id="user-1", event="Order Completed", properties=EVENT_PROPS)
        per_call.append((time.perf_counter() - t0) / chunk * 1e6)
    client.flush()
    cpu = time.process_time() - cpu0
    return {
        "target": target,
        "events": events,
        "caller_us_median": statistics.median(per_call),
        "cpu_us_per_event": cpu / events * 1e6,
    }


def run(quick: bool = False, reps: int = 3) -> Dict[str, Any]:
    from cdpmp.testing import Collector

    events = 2000 if quick else 8000
    chunk = 200
    results: Dict[str, List[Dict[str, Any]]] = {t: [] for t in TARGETS}
    with Collector(write_key="bench") as collector:
        for rep in range(1 if quick else reps):
            for target in TARGETS:
                n = events // 10 if target == "cdpmp-sync" else events
                collector.reset()
                out = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "benchmarks.call_cost",
                        "--child",
                        target,
                        "--url",
                        collector.url,
                        "--events",
                        str(n),
                        "--chunk",
                        str(min(chunk, n)),
                    ],
                    capture_output=True,
                    text=True,
                    timeout=600,
                    check=True,
                    env={**os.environ, "CDP_WRITE_KEY": "bench"},
                )
                row = json.loads(out.stdout.strip().splitlines()[-1])
                row["delivered"] = len(collector.unique_ids()) - 1  # minus the warm-up event
                results[target].append(row)
                print(
                    f"  call cost rep {rep + 1} {target}: {row['caller_us_median']:.1f} µs/call, "
                    f"{row['cpu_us_per_event']:.1f} µs CPU/event, delivered {row['delivered']}/{n}",
                    file=sys.stderr,
                    flush=True,
                )
    summary: Dict[str, Any] = {}
    for target, rows in results.items():
        calls = [r["caller_us_median"] for r in rows]
        cpus = [r["cpu_us_per_event"] for r in rows]
        summary[target] = {
            "caller_us_median": statistics.median(calls),
            "caller_us_spread": [min(calls), max(calls)],
            "cpu_us_per_event": statistics.median(cpus),
            "delivered_ratio": min(r["delivered"] / r["events"] for r in rows),
        }
    base = summary["official"]
    for target in TARGETS:
        summary[target]["caller_ratio"] = summary[target]["caller_us_median"] / base["caller_us_median"]
        summary[target]["cpu_ratio"] = summary[target]["cpu_us_per_event"] / base["cpu_us_per_event"]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child")
    parser.add_argument("--url")
    parser.add_argument("--events", type=int, default=8000)
    parser.add_argument("--chunk", type=int, default=200)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.url, os.environ["CDP_WRITE_KEY"], args.events, args.chunk)))
    else:
        print(json.dumps(run(quick=args.quick), indent=2))


if __name__ == "__main__":
    main()
