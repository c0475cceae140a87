"""CPU instructions per call and per delivered event: ``python -m benchmarks.instructions``.

Timings on shared 2-core machines swing 2–3x between runs; instruction counts do not
(two runs agree within 0.5 %). Each figure is valgrind's callgrind over a fresh
interpreter making N calls, minus the same interpreter making 0 calls, divided by N
(DESIGN.md §9), for cdpmp and the official client in the same run:

* ``call``: ``track()`` with ``send=False`` — the request path alone: checking,
  coercing, encoding and queueing one event;
* ``delivered``: ``track()`` then ``flush()``, the endpoint (cdpmp's collector) in
  another process: everything this process spends per event that arrives, sender
  threads included. Shared mode counts the producer only (its uploader is another
  process, not followed): the ring path's cost to the caller's process.

Kernel time and lock contention are not instructions: the timing benchmarks
(``benchmarks.engine``) stay the measure of feel, this one of the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from typing import Any, Dict, List, Optional

from benchmarks.common import EVENT_PROPS, progress, shared_runtime

CHILD = textwrap.dedent(
    """
    import json, os, sys
    target, n, url, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    props = json.loads(os.environ["BENCH_PROPS"])
    send = not target.endswith("call")
    if target.startswith("official"):
        from customerio.analytics.client import Client
        client = Client(key, host=url, send=send, max_queue_size=100000)
    else:
        import cdpmp
        mode = "shared" if target.startswith("shared") else "direct"
        client = cdpmp.Client(key, endpoint=url, send=send, max_queue_size=100000, mode=mode)
    for i in range(50):  # the same warm-up in both runs: imports, first request, caches
        client.track("warm-%d" % i, "Warmed", props)
    client.flush()
    for i in range(n):
        client.track("user-%d" % (i % 97), "Added To Cart", props, context={"ip": "10.0.0.1"})
    client.flush()
    client.shutdown() if hasattr(client, "shutdown") else client.join()
    """
)

TARGETS = ("official-call", "cdpmp-call", "official-delivered", "cdpmp-delivered", "shared-delivered")
_COLLECTED = re.compile(r"Collected : (\d+)")


def instructions(target: str, n: int, url: str, key: str, env: Dict[str, str]) -> int:
    """Instructions callgrind counts for one interpreter running ``n`` calls."""
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-c", CHILD]
    done = subprocess.run(
        [*command, target, str(n), url, key], env=env, capture_output=True, text=True, timeout=900
    )
    found = _COLLECTED.findall(done.stderr)
    if done.returncode != 0 or not found:
        raise RuntimeError(f"{target} with {n} calls failed: {done.stderr[-2000:]}")
    return int(found[-1])


def per_call(target: str, n: int, url: str, key: str, env: Dict[str, str]) -> float:
    return (instructions(target, n, url, key, env) - instructions(target, 0, url, key, env)) / n


def measure(n: int, targets: List[str]) -> Dict[str, float]:
    from cdpmp.testing import Collector

    result: Dict[str, float] = {}
    # The collector in this process; the clients are the valgrind children.
    with shared_runtime() as runtime, Collector(write_key="bench-key") as collector:
        env = dict(os.environ, BENCH_PROPS=json.dumps(EVENT_PROPS), CDP_RUNTIME_DIR=runtime)
        env.pop("CDP_MODE", None)
        for target in targets:
            progress(f"instructions: {target} ({n} calls, and 0)")
            result[target] = per_call(target, n, collector.url, "bench-key", env)
    return result


def table(result: Dict[str, float]) -> str:
    rows = ["| measure | official | cdpmp | ratio |", "|---|---:|---:|---:|"]
    for what in ("call", "delivered"):
        official: Optional[float] = result.get(f"official-{what}")
        for name in (f"cdpmp-{what}", f"shared-{what}"):
            if name in result and official:
                rows.append(
                    f"| {name} | {official:,.0f} | {result[name]:,.0f} | {result[name] / official:.2f}x |"
                )
    return "\n".join(rows)


def run(quick: bool = False) -> Dict[str, Any]:
    """The part of ``python -m benchmarks``: per-call and per-event counts, and the
    ratios against the official client (skipped, with the reason, without valgrind)."""
    if shutil.which("valgrind") is None:
        return {"skipped": "valgrind is not installed (apt-get install valgrind)"}
    if quick:  # valgrind runs a core flat out for ~10 s a process: not in the test suite
        return {"skipped": "not in --quick: run python -m benchmarks.instructions"}
    calls = 2000
    counts = measure(calls, list(TARGETS))
    ratios = {}
    for what in ("call", "delivered"):
        for name in (f"cdpmp-{what}", f"shared-{what}"):
            if name in counts and f"official-{what}" in counts:
                ratios[name] = counts[name] / counts[f"official-{what}"]
    return {"calls": calls, "instructions": counts, "ratios": ratios}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per counted run (default 2000)")
    parser.add_argument("--only", nargs="*", choices=TARGETS, default=list(TARGETS))
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    result = measure(args.calls, args.only)
    print(table(result))
    print(json.dumps({"instructions": result, "calls": args.calls}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
