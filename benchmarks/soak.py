"""Threads and descriptors through outages: ``python -m benchmarks.soak [--seconds N] [--mode shared]``.

Four worker processes track 125 events/s each against a 100 ms endpoint that is down
(503) for a fifth of every cycle; once a second the parent reads each worker's thread
and descriptor count (psutil), and in shared mode the uploader's too (it sends for the
four). What it shows: the counts rise while a backlog is sent after each outage and
come back to their idle values while the traffic goes on, never creeping up. Ends with
the delivery count by messageId. Prints JSON (the series) on its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any, Dict, List, Optional

import psutil

from benchmarks.common import progress
from cdpmp.testing import Collector, Conditions, Outage

WORKER = textwrap.dedent(
    """
    import json, sys, time, cdpmp
    w, url, key, seconds, mode, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4]), *sys.argv[5:]
    client = cdpmp.Client(key, endpoint=url, mode=mode)
    start, n, ids = time.monotonic(), 0, []
    while time.monotonic() - start < seconds:
        time.sleep(max(0.0, start + n / 125 - time.monotonic()))
        ok, msg = client.track("u%d" % w, "E", message_id="w%d-%d" % (w, n))
        if ok:
            ids.append(msg["messageId"])
        n += 1
    time.sleep(12)  # idle: the sender threads exit, the sockets close
    assert client.flush(timeout=60)
    with open(out, "w") as f:  # not stdout: 75,000 ids fill a pipe nobody reads yet
        json.dump(ids, f)
    """
)


def _uploader(directory: str) -> Optional[psutil.Process]:
    """The uploader serving ``directory`` (its command line names it), if one runs."""
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmd = proc.info["cmdline"] or []
        if "uploader" in " ".join(cmd) and directory in cmd and proc.info["status"] != psutil.STATUS_ZOMBIE:
            return proc
    return None


def _sample(procs: List[psutil.Process]) -> Dict[str, List[int]]:
    row: Dict[str, List[int]] = {"threads": [], "fds": []}
    for proc in procs:
        try:
            row["threads"].append(proc.num_threads())
            row["fds"].append(proc.num_fds())
        except psutil.Error:
            pass
    return row


def run(seconds: float, cycle: float = 30.0, mode: str = "direct") -> Dict[str, Any]:
    outages = tuple(Outage(c + cycle * 0.4, c + cycle * 0.6, 503) for c in range(0, int(seconds), int(cycle)))
    series: List[Dict[str, Any]] = []
    env = dict(os.environ)
    scratch = tempfile.mkdtemp(prefix="cdpmp-soak-")
    outs = [os.path.join(scratch, f"ids-{w}.json") for w in range(4)]
    directory = os.path.join(scratch, "runtime")  # cdpmp makes it, 0700
    if mode == "shared":
        env.update(CDP_RUNTIME_DIR=directory, CDP_UPLOADER_IDLE_EXIT="5")
    with Collector(conditions=Conditions(latency=0.1, outages=outages), strict=False) as collector:
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    WORKER,
                    str(w),
                    collector.url,
                    collector.write_key,
                    str(seconds),
                    mode,
                    out,
                ],
                env=env,
            )
            for w, out in enumerate(outs)
        ]
        start = time.monotonic()
        uploader: Optional[psutil.Process] = None
        try:
            while any(p.poll() is None for p in procs):
                row: Dict[str, Any] = {"t": round(time.monotonic() - start, 1)}
                row.update(_sample([psutil.Process(p.pid) for p in procs if p.poll() is None]))
                if mode == "shared":
                    if uploader is None or not uploader.is_running():
                        uploader = _uploader(directory)
                    up = _sample([uploader] if uploader is not None else [])
                    row["uploader"] = {"threads": sum(up["threads"]), "fds": sum(up["fds"])}
                series.append(row)
                time.sleep(1.0)
            for p in procs:
                p.wait(timeout=120)
            accepted = [mid for out in outs for mid in json.loads(open(out).read())]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        collector.wait_for(len(accepted), timeout=60)
        delivered = collector.unique_ids()
        result = {
            "seconds": seconds,
            "mode": mode,
            "accepted": len(accepted),
            "lost": len(set(accepted) - delivered),
            "duplicates": sum(collector.duplicates().values()),
            "series": series,
        }
    if mode == "shared":
        found = _uploader(directory)
        if found is not None:
            found.terminate()
            psutil.wait_procs([found], timeout=30)
    shutil.rmtree(scratch, ignore_errors=True)
    progress(f"soak: {result['accepted']} accepted, {result['lost']} lost, {result['duplicates']} duplicated")
    return result


def summary(result: Dict[str, Any]) -> Dict[str, Any]:
    """Per worker (and for the uploader): the idle values (first sample), the peak, and
    the last sample."""
    series = [r for r in result["series"] if len(r["threads"]) == 4]
    first, last = series[0], series[-1]
    out: Dict[str, Any] = {
        key: {
            "idle": first[key],
            "peak": [max(r[key][w] for r in series) for w in range(4)],
            "end": last[key],
        }
        for key in ("threads", "fds")
    }
    uploader = [r["uploader"] for r in series if r.get("uploader", {}).get("threads")]
    if uploader:
        for key in ("threads", "fds"):
            out["uploader " + key] = {
                "idle": uploader[0][key],
                "peak": max(u[key] for u in uploader),
                "end": uploader[-1][key],
            }
    return out


def markdown(result: Dict[str, Any]) -> str:
    s = summary(result)
    lines = [
        f"{result['seconds']:.0f} s, 4 {result.get('mode', 'direct')}-mode workers × 125 events/s, "
        "a 100 ms endpoint down (503) for "
        f"a fifth of every 30 s; {result['accepted']} accepted, {result['lost']} lost, "
        f"{result['duplicates']} duplicated.",
        "",
        "| per worker | at start | peak | after the last recovery, idle |",
        "|---|---|---|---|",
    ]
    for key in s:
        lines.append(f"| {key} | {s[key]['idle']} | {s[key]['peak']} | {s[key]['end']} |")
    shared = "uploader threads" in s
    lines += [
        "",
        "| t s | threads per worker | fds per worker |" + (" uploader threads / fds |" if shared else ""),
    ]
    lines.append("|---|---|---|" + ("---|" if shared else ""))
    step = max(1, len(result["series"]) // 20)
    for row in result["series"][::step]:
        up = row.get("uploader")
        extra = f" {up['threads']} / {up['fds']} |" if shared and up else (" |" if shared else "")
        lines.append(f"| {row['t']:.0f} | {row['threads']} | {row['fds']} |{extra}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--mode", choices=("direct", "shared"), default="direct")
    args = parser.parse_args()
    result = run(args.seconds, mode=args.mode)
    print(markdown(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
