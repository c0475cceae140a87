"""Backfilling a file: ``cdpmp import`` beside the loops users write today.

``python -m benchmarks.backfill [--rows 100000] [--rss-rows 1000000]``. A JSON Lines
file of ``--rows`` track events (historical timestamps, a realistic property set) is
sent three ways, each in a fresh interpreter, to a collector in another process (the
API's rate limit on, as production; its per-message checks off, since it shares these
2 cores with the client it measures):

- ``cdpmp import FILE`` (the command);
- the loop a user writes with cdpmp: read each line, ``json.loads``, ``track()``, with
  ``block_on_full`` so that nothing is refused, then ``flush()``;
- the same loop with the official client (customerio-cdp-analytics 1.1.0), as its docs
  show it (its queue full refuses: what arrived is counted).

Each reports rows per second (start to everything flushed, wall time: delivered rows
÷ seconds), its peak RSS and the requests; ratios are against the official loop of the
same run. ``--rss-rows`` then runs ``cdpmp import`` alone over a file that many rows
long, to show its memory does not grow with the file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict

from benchmarks.common import EVENT_PROPS, progress

SERVER = """
import sys
from cdpmp.testing import Collector
with Collector(strict=False) as c:
    print(c.url, flush=True)
    sys.stdin.readline()
    print(len(c.unique_ids()), len(c.messages), len(c.requests), c.summary()["statuses"].get(429, 0), flush=True)
"""

LOOP = """
import datetime, json, sys, time, resource
path, url, which = sys.argv[1:4]
if which == "official":
    from customerio import analytics
    analytics.write_key, analytics.host = "test-write-key", url
else:
    from cdpmp import analytics
    analytics.write_key, analytics.endpoint, analytics.block_on_full = "test-write-key", url, 30
started = time.perf_counter()
refused = 0
with open(path) as fh:
    for line in fh:
        row = json.loads(line)
        at = datetime.datetime.fromisoformat(row["timestamp"].replace("Z", "+00:00"))  # the official takes datetimes
        ok, _ = analytics.track(user_id=row["userId"], event=row["event"], properties=row["properties"],
                                timestamp=at, message_id=row["messageId"])
        refused += not ok
analytics.flush()
print(json.dumps({"seconds": time.perf_counter() - started, "refused": refused,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

IMPORT = """
import json, sys, time, resource
from cdpmp.cli import main
started = time.perf_counter()
code = main(["import", sys.argv[1], "--endpoint", sys.argv[2], "--no-progress", "--restart"])
print(json.dumps({"seconds": time.perf_counter() - started, "exit": code,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_file(path: str, rows: int) -> None:
    day = 1704067200  # 2024-01-01
    with open(path, "w") as out:
        for n in range(rows):
            at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(day + n * 60))
            row = {"type": "track", "userId": f"user-{n % 5000}", "event": "Order Completed",
                   "messageId": f"bf-{n}", "timestamp": at, "properties": {**EVENT_PROPS, "order": n}}  # fmt: skip
            out.write(json.dumps(row) + "\n")


def measure(code: str, *args: str) -> Dict[str, Any]:
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert server.stdin is not None and server.stdout is not None
    url = server.stdout.readline().strip()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CDP_")},
        "CDP_WRITE_KEY": "test-write-key",
    }
    done = subprocess.run([sys.executable, "-c", code, *args[:1], url, *args[1:]], env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    if done.returncode != 0:
        server.kill()
        server.communicate(timeout=10)
        raise SystemExit(done.stderr[-3000:])
    time.sleep(0.5)  # what was acknowledged has been counted
    out, _ = server.communicate("\n", timeout=30)
    unique, received, requests, throttled = (int(x) for x in out.split())
    row: Dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    row.update(delivered=unique, duplicates=received - unique, requests=requests, answered_429=throttled)
    row["rows_per_s"] = round(unique / row["seconds"])
    row["peak_rss_mb"] = round(row["peak_rss_mb"], 1)
    return row


def run(rows: int, rss_rows: int) -> Dict[str, Any]:
    results: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "events.jsonl")
        write_file(path, rows)
        for name, code, extra in (
            ("official loop", LOOP, ["official"]),
            ("cdpmp track() loop", LOOP, ["cdpmp"]),
            ("cdpmp import", IMPORT, []),
        ):
            progress(f"{name}: {rows:,} rows")
            results[name] = measure(code, path, *extra)
        base = results["official loop"]["rows_per_s"]
        for row in results.values():
            row["x_official"] = round(row["rows_per_s"] / base, 2)
        if rss_rows:
            big = os.path.join(scratch, "big.jsonl")
            write_file(big, rss_rows)
            progress(f"cdpmp import: {rss_rows:,} rows, for its memory")
            results[f"cdpmp import, {rss_rows:,} rows"] = measure(IMPORT, big)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rss-rows", type=int, default=1_000_000)
    args = parser.parse_args()
    for name, row in run(args.rows, args.rss_rows).items():
        print(json.dumps({"run": name, **row}))


if __name__ == "__main__":
    main()
