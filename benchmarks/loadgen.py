"""The load generator for part 2, run as its own process so its CPU never competes with
the measured server inside one interpreter.

    python -m benchmarks.loadgen --port P --k K --concurrency C --duration S [--rate R]

Fixed concurrency (threads, one request per connection as gunicorn sync workers
close them), fixed duration. Prints JSON: ok request ids, latencies p50/p99 (ms),
requests per second.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import threading
import time
from typing import Dict, List


def run(
    port: int, k: int, concurrency: int, duration: float, prefix: str, rate: float = 0.0
) -> Dict[str, object]:
    ok: List[str] = []
    latencies: List[float] = []
    errors = [0]
    lock = threading.Lock()
    counter = iter(range(10**9))
    end = time.monotonic() + duration

    pause = concurrency / rate if rate else 0.0  # seconds between one thread's requests

    def worker() -> None:
        while time.monotonic() < end:
            if pause:
                time.sleep(pause)
            with lock:
                n = next(counter)
            rid = f"{prefix}{n}"
            t0 = time.perf_counter()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                conn.request("GET", f"/?id={rid}&k={k}")
                response = conn.getresponse()
                body = response.read()
                conn.close()
            except OSError:
                with lock:
                    errors[0] += 1
                continue
            elapsed = (time.perf_counter() - t0) * 1000
            with lock:
                latencies.append(elapsed)
                if response.status == 200 and body == b"ok":
                    ok.append(rid)

    start = time.monotonic()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + 60)
    wall = time.monotonic() - start
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else 0.0
    return {
        "ok": ok,
        "requests": len(latencies),
        "errors": errors[0],
        "rps": len(latencies) / wall,
        "p50_ms": statistics.median(latencies) if latencies else 0.0,
        "p99_ms": p99,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--prefix", default="r")
    parser.add_argument(
        "--rate", type=float, default=0.0, help="total requests/s (default: as fast as possible)"
    )
    args = parser.parse_args()
    print(json.dumps(run(args.port, args.k, args.concurrency, args.duration, args.prefix, args.rate)))


if __name__ == "__main__":
    main()
