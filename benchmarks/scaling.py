"""Part 3: shared-mode scaling. 1 → 16 producer processes on one ring (per-put caller
cost and aggregate enqueue throughput, uploader draining meanwhile), and the growth of
``track()`` cost with event size (0.5 KB → 30 KB) for each client.

Each producer is a fresh process (``--producer``) started together; they wait on a
shared start time so they really contend for the ring lock.
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

from benchmarks.call_cost import _client
from benchmarks.common import EVENT_PROPS, progress, shared_runtime
from cdpmp.testing import Collector

PRODUCERS = (1, 2, 4, 8, 16)
SIZES_KB = (0.5, 2, 8, 16, 30)


def producer(url: str, events: int, start_at: float) -> Dict[str, Any]:
    import cdpmp

    client = cdpmp.Client("bench", endpoint=url, mode="shared", max_queue_size=1_000_000)
    client.track("warm", "Warmup")
    while time.time() < start_at:
        time.sleep(0.001)
    per_call: List[float] = []
    t_start = time.perf_counter()
    for _ in range(0, events, 100):
        t0 = time.perf_counter()
        for _ in range(100):
            client.track(user_id="user-1", event="Order Completed", properties=EVENT_PROPS)
        per_call.append((time.perf_counter() - t0) / 100 * 1e6)
    return {
        "us": statistics.median(per_call),
        "wall": time.perf_counter() - t_start,
        "rejected": client.stats()["dropped"]["queue_full"],
    }


def size_cost(target: str, url: str, size_kb: float, events: int) -> float:
    client = _client(target, url, "bench")
    props = {**EVENT_PROPS, "blob": "x" * int(size_kb * 1024 - 400)}
    client.track(user_id="warm", event="Warmup", properties=props)
    client.flush()
    t0 = time.perf_counter()
    for _ in range(events):
        client.track(user_id="user-1", event="Order Completed", properties=props)
    cost = (time.perf_counter() - t0) / events * 1e6
    client.flush()
    return cost


def _child(args: List[str], env: Dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.scaling", *args], stdout=subprocess.PIPE, text=True, env=env
    )


def run(quick: bool = False) -> Dict[str, Any]:
    events = 1000 if quick else 10000
    producers = (1, 4) if quick else PRODUCERS
    sizes = (0.5, 16) if quick else SIZES_KB
    out: Dict[str, Any] = {"producers": [], "sizes": []}
    with Collector(write_key="bench", strict=False) as collector, shared_runtime() as runtime:
        env = {
            **os.environ,
            "CDP_RUNTIME_DIR": runtime,
            "CDP_RING_BYTES": str(256 << 20),
            "CDP_WRITE_KEY": "bench",
        }
        for n in producers:
            start_at = time.time() + 1.5
            procs = [
                _child(
                    [
                        "--producer",
                        "--url",
                        collector.url,
                        "--events",
                        str(events),
                        "--start-at",
                        str(start_at),
                    ],
                    env,
                )
                for _ in range(n)
            ]
            results = [json.loads((p.communicate(timeout=600)[0]).strip().splitlines()[-1]) for p in procs]
            wall = max(r["wall"] for r in results)
            # Let the uploader deliver this step's events before the next step starts, or
            # its draining would compete for the CPU with the next measurement.
            collector.wait_for(n * (events + 1), timeout=300)
            collector.reset()
            row = {
                "producers": n,
                "put_us_median": statistics.median(r["us"] for r in results),
                "throughput_eps": n * events / wall,
                "rejected": sum(r["rejected"] for r in results),
            }
            out["producers"].append(row)
            progress(
                f"scaling {n} producers: {row['put_us_median']:.2f} µs/put, "
                f"{row['throughput_eps']:.0f} events/s enqueued"
            )
        for size in sizes:
            row = {"size_kb": size}
            for target in ("official", "cdpmp-direct", "cdpmp-shared"):
                p = _child(
                    [
                        "--size",
                        str(size),
                        "--target",
                        target,
                        "--url",
                        collector.url,
                        "--events",
                        str(max(200, events // 10)),
                    ],
                    env,
                )
                row[target] = json.loads(p.communicate(timeout=600)[0].strip().splitlines()[-1])
            out["sizes"].append(row)
            progress(f"size {size} KB: {row}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--producer", action="store_true")
    parser.add_argument("--size", type=float)
    parser.add_argument("--target")
    parser.add_argument("--url")
    parser.add_argument("--events", type=int, default=10000)
    parser.add_argument("--start-at", type=float, default=0.0)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.producer:
        print(json.dumps(producer(args.url, args.events, args.start_at)))
    elif args.size:
        print(json.dumps(size_cost(args.target, args.url, args.size, args.events)))
    else:
        print(json.dumps(run(args.quick), indent=2))


if __name__ == "__main__":
    main()
