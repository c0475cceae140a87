"""Threads and descriptors through outages: ``python -m benchmarks.soak [--seconds N]``.

Four direct-mode worker processes track 125 events/s each against a 100 ms endpoint
that is down (503) for a fifth of every cycle; once a second the parent reads each
worker's thread and descriptor count (psutil). What it shows: the counts rise while a
backlog is sent after each outage and come back to their idle values, never creeping
up. Ends with the delivery count by messageId. Prints JSON (the series) on its last line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time
from typing import Any, Dict, List

import psutil

from benchmarks.common import progress
from cdpmp.testing import Collector, Conditions, Outage

WORKER = textwrap.dedent(
    """
    import json, sys, time, cdpmp
    w, url, key, seconds = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
    client = cdpmp.Client(key, endpoint=url)
    start, n, ids = time.monotonic(), 0, []
    while time.monotonic() - start < seconds:
        time.sleep(max(0.0, start + n / 125 - time.monotonic()))
        ok, msg = client.track("u%d" % w, "E", message_id="w%d-%d" % (w, n))
        if ok:
            ids.append(msg["messageId"])
        n += 1
    time.sleep(12)  # idle: the sender threads exit, the sockets close
    assert client.flush(timeout=60)
    print(json.dumps(ids))
    """
)


def run(seconds: float, cycle: float = 30.0) -> Dict[str, Any]:
    outages = tuple(Outage(c + cycle * 0.4, c + cycle * 0.6, 503) for c in range(0, int(seconds), int(cycle)))
    series: List[Dict[str, Any]] = []
    with Collector(conditions=Conditions(latency=0.1, outages=outages), strict=False) as collector:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", WORKER, str(w), collector.url, collector.write_key, str(seconds)],
                stdout=subprocess.PIPE,
                text=True,
            )
            for w in range(4)
        ]
        start = time.monotonic()
        try:
            while any(p.poll() is None for p in procs):
                row: Dict[str, Any] = {"t": round(time.monotonic() - start, 1), "threads": [], "fds": []}
                for p in procs:
                    try:
                        ps = psutil.Process(p.pid)
                        row["threads"].append(ps.num_threads())
                        row["fds"].append(ps.num_fds())
                    except psutil.Error:
                        pass
                series.append(row)
                time.sleep(1.0)
            accepted = [mid for p in procs for mid in json.loads(p.communicate(timeout=120)[0])]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        collector.wait_for(len(accepted), timeout=60)
        delivered = collector.unique_ids()
        result = {
            "seconds": seconds,
            "accepted": len(accepted),
            "lost": len(set(accepted) - delivered),
            "duplicates": sum(collector.duplicates().values()),
            "series": series,
        }
    progress(f"soak: {result['accepted']} accepted, {result['lost']} lost, {result['duplicates']} duplicated")
    return result


def summary(result: Dict[str, Any]) -> Dict[str, Any]:
    """Per worker: the idle values (first sample), the peak, and the last sample."""
    series = [r for r in result["series"] if len(r["threads"]) == 4]
    first, last = series[0], series[-1]
    return {
        key: {
            "idle": first[key],
            "peak": [max(r[key][w] for r in series) for w in range(4)],
            "end": last[key],
        }
        for key in ("threads", "fds")
    }


def markdown(result: Dict[str, Any]) -> str:
    s = summary(result)
    lines = [
        f"{result['seconds']:.0f} s, 4 direct-mode workers × 125 events/s, a 100 ms endpoint down (503) for "
        f"a fifth of every 30 s; {result['accepted']} accepted, {result['lost']} lost, "
        f"{result['duplicates']} duplicated.",
        "",
        "| per worker | at start | peak | after the last recovery, idle |",
        "|---|---|---|---|",
    ]
    for key in ("threads", "fds"):
        lines.append(f"| {key} | {s[key]['idle']} | {s[key]['peak']} | {s[key]['end']} |")
    lines += ["", "| t s | threads per worker | fds per worker |", "|---|---|---|"]
    step = max(1, len(result["series"]) // 20)
    for row in result["series"][::step]:
        lines.append(f"| {row['t']:.0f} | {row['threads']} | {row['fds']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__)
    parser.add_argument("--seconds", type=float, default=120.0)
    args = parser.parse_args()
    result = run(args.seconds)
    print(markdown(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
