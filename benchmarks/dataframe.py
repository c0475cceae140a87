"""A backfill from a pandas DataFrame: rows/s and peak RSS, direct and shared mode.

``python -m benchmarks.dataframe [--rows 100000]``. Each mode runs in a fresh
interpreter that builds a mixed-type DataFrame (floats with NaN, ints, bools, strings,
datetimes with NaT, a category), tracks every row as docs/beyond-servers.md shows
(``to_dict("records")`` a chunk at a time → ``track()`` with ``block_on_full``), flushes, and reports rows
per second (build + track + flush, wall time) and its peak RSS: once the DataFrame is
built, and at the end. The endpoint is a collector in another process (as in
production); it counts what arrived by messageId. Needs numpy and pandas (test extras).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any, Dict, Iterator

from benchmarks.common import shared_runtime

SERVER = """
import sys, time
from cdpmp.testing import Collector
with Collector(strict=False, rate_limit=None) as c:
    print(c.url, flush=True)
    sys.stdin.readline()
    c.wait_for(int(sys.argv[1]), timeout=120)
    print(len(c.unique_ids()), len(c.messages), flush=True)
"""


def frame(rows: int) -> Any:
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(7)
    amount = rng.normal(50, 20, rows)
    amount[::17] = np.nan
    at = pd.date_range("2024-01-01", periods=rows, freq="min").to_series(index=range(rows))
    at[::23] = pd.NaT
    return pd.DataFrame(
        {
            "user_id": [f"user-{i % 5000}" for i in range(rows)],
            "amount": amount,
            "quantity": rng.integers(1, 10, rows),
            "first_order": rng.random(rows) < 0.1,
            "plan": pd.Categorical(rng.choice(["free", "pro", "team"], rows)),
            "ordered_at": at,
        }
    )


def records(data: Any, chunk: int = 10_000) -> Iterator[Dict[str, Any]]:
    """The rows as dicts, a chunk at a time (``to_dict("records")`` of the whole frame
    would hold every row's dict at once: +38 MB for 100,000 rows, measured)."""
    for start in range(0, len(data), chunk):
        yield from data.iloc[start : start + chunk].to_dict("records")


def child(mode: str, rows: int, url: str) -> Dict[str, Any]:
    import cdpmp

    started = time.perf_counter()
    data = frame(rows)
    rss_frame = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    client = cdpmp.Client("test-write-key", endpoint=url, mode=mode, block_on_full=30)
    refused = 0
    for row in records(data):
        user = row.pop("user_id")
        ok, _ = client.track(
            user_id=user, event="Order Completed", properties=row, timestamp=row["ordered_at"]
        )
        refused += not ok
    flushed = client.flush(120)
    seconds = time.perf_counter() - started
    client.shutdown(10)
    return {
        "mode": mode,
        "rows": rows,
        "refused": refused,
        "flushed": flushed,
        "rows_per_s": round(rows / seconds),
        "peak_rss_mb_after_frame": round(rss_frame / 1024, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def run(rows: int) -> Dict[str, Any]:
    results = {}
    for mode in ("direct", "shared"):
        server = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(rows)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert server.stdin is not None and server.stdout is not None
        url = server.stdout.readline().strip()
        with shared_runtime() as runtime:
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.dataframe",
                    "--child",
                    mode,
                    "--rows",
                    str(rows),
                    "--url",
                    url,
                ],
                capture_output=True,
                text=True,
                timeout=600,
                check=True,
                env={**os.environ, "CDP_RUNTIME_DIR": runtime},
            )
        server.stdin.write("\n")
        server.stdin.flush()
        unique, received = (int(x) for x in server.stdout.readline().split())
        server.wait(30)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row.update(unique=unique, duplicates=received - unique)
        results[mode] = row
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--child")
    parser.add_argument("--url")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.rows, args.url)))
        return
    for row in run(args.rows).values():
        print(json.dumps(row))


if __name__ == "__main__":
    main()
