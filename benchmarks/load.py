"""Part 2: real gunicorn under load, analytics off / official client / cdpmp direct /
cdpmp shared, with the strict collector as the endpoint.

For each server shape (sync workers 1, 2, 4, 8; gthread) and K (events per request):
start gunicorn with ``tests/apps/wsgi_app.py``, run ``benchmarks.loadgen`` in its own
process for a fixed duration and concurrency, then measure CPU (user + system) and RSS
of master + workers + uploader (psutil) before stopping the master with SIGTERM, and
count delivered events by messageId at the collector.
"""

from __future__ import annotations

import collections
import json
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import psutil

from benchmarks.common import progress, shared_runtime, uploader_pid
from cdpmp.testing import Collector
from tests.servers import Server, expected_ids, free_port, server_env

CLIENTS = ("off", "official", "cdpmp-direct", "cdpmp-shared")


def _tree(pid: int, extra: int) -> List[psutil.Process]:
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    if extra:
        procs.append(psutil.Process(extra))
    return procs


def _cpu_rss(procs: List[psutil.Process]) -> Tuple[float, int, int]:
    """CPU seconds, RSS and PSS (shared pages, like the ring, split between sharers)."""
    cpu, rss, pss = 0.0, 0, 0
    for proc in procs:
        try:
            times = proc.cpu_times()
            cpu += times.user + times.system
            mem = proc.memory_full_info()
            rss += mem.rss
            pss += getattr(mem, "pss", mem.rss)
        except psutil.Error:
            pass
    return cpu, rss, pss


def run_one(
    shape: Tuple[str, int],
    k: int,
    client: str,
    duration: float,
    concurrency: int,
    collector: Collector,
    runtime: str,
    rate: float = 0.0,
) -> Dict[str, Any]:
    kind, workers = shape
    collector.reset()
    port = free_port()
    args = ["--bind", f"127.0.0.1:{port}", "--workers", str(workers), "--graceful-timeout", "20"]
    if kind == "gthread":
        args += ["--worker-class", "gthread", "--threads", "4"]
    conf = ["-c", "tests/apps/gunicorn_conf.py"] if client.startswith("cdpmp") else []
    env = server_env(
        collector.url,
        collector.write_key,
        APP_CLIENT="cdpmp" if client.startswith("cdpmp") else client,
        CDP_UPLOAD_INTERVAL="0.5",
    )
    if client == "cdpmp-shared":
        env.update(CDP_MODE="shared", CDP_RUNTIME_DIR=runtime)
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(
            [sys.executable, "-m", "gunicorn", *conf, *args, "tests.apps.wsgi_app:app"],
            env,
            Path(tmp) / "log",
            port,
        )
        try:
            server.wait_ready()
            uploader = uploader_pid(runtime) if client == "cdpmp-shared" else 0
            procs = _tree(server.pid, uploader)
            cpu0, _, _ = _cpu_rss(procs)
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.loadgen",
                    "--port",
                    str(port),
                    "--k",
                    str(k),
                    "--concurrency",
                    str(concurrency),
                    "--duration",
                    str(duration),
                    "--rate",
                    str(rate),
                ],
                capture_output=True,
                text=True,
                timeout=duration + 120,
                check=True,
            )
            gen = json.loads(out.stdout)
            if client == "cdpmp-shared" and not uploader:
                uploader = uploader_pid(runtime)
            procs = _tree(server.pid, uploader)
            cpu1, rss, pss = _cpu_rss(procs)
        finally:
            server.stop(signal.SIGTERM, timeout=60)
    tracked = set(expected_ids(gen["ok"], k)) if client != "off" else set()
    delivered_ratio: Optional[float] = None
    requests_per_1000: Optional[float] = None
    cpu_per_1000: Optional[float] = None
    if tracked:
        collector.wait_for(len(tracked), timeout=30)
        counts = collections.Counter(m for m in collector.message_ids() if not m.startswith("probe"))
        delivered_ratio = len(tracked & set(counts)) / len(tracked)
        requests_per_1000 = len(collector.requests) / len(tracked) * 1000
        cpu_per_1000 = (cpu1 - cpu0) / len(tracked) * 1000
    return {
        "shape": f"{kind}x{workers}",
        "k": k,
        "client": client,
        "rps": gen["rps"],
        "p50_ms": gen["p50_ms"],
        "p99_ms": gen["p99_ms"],
        "errors": gen["errors"],
        "tracked": len(tracked),
        "delivered_ratio": delivered_ratio,
        "http_requests_per_1000_events": requests_per_1000,
        "cpu_s_per_1000_events": cpu_per_1000,
        "cpu_s_total": cpu1 - cpu0,
        "rss_mb": rss / 2**20,
        "pss_mb": pss / 2**20,
    }


def _median_row(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One row from repetitions: medians, except delivery (the worst) and spread of req/s."""
    out = dict(rows[0])
    for key in (
        "rps",
        "p50_ms",
        "p99_ms",
        "http_requests_per_1000_events",
        "cpu_s_per_1000_events",
        "rss_mb",
        "pss_mb",
        "cpu_s_total",
    ):
        values = [r[key] for r in rows if r[key] is not None]
        out[key] = statistics.median(values) if values else None
    ratios = [r["delivered_ratio"] for r in rows if r["delivered_ratio"] is not None]
    out["delivered_ratio"] = min(ratios) if ratios else None
    out["rps_spread"] = [min(r["rps"] for r in rows), max(r["rps"] for r in rows)]
    out["tracked"] = sum(r["tracked"] for r in rows)
    out["errors"] = sum(r["errors"] for r in rows)
    return out


def run(quick: bool = False) -> Dict[str, Any]:
    shapes = [("sync", 2)] if quick else [("sync", 1), ("sync", 2), ("sync", 4), ("sync", 8), ("gthread", 2)]
    ks = [1] if quick else [1, 10]
    duration = 1.5 if quick else 3.0
    reps = 1 if quick else 3
    rows = []
    # strict=False: the endpoint is on this 2-core machine; its per-message checks would
    # take CPU from the server under test (every client but "off" would pay for them).
    with Collector(write_key="bench", strict=False) as collector, shared_runtime() as runtime:
        for shape in shapes:
            for k in ks:
                cells: Dict[str, List[Dict[str, Any]]] = {client: [] for client in CLIENTS}
                for _ in range(reps):  # interleaved, so drift hits every client alike
                    for client in CLIENTS:
                        cells[client].append(run_one(shape, k, client, duration, 8, collector, runtime))
                for client in CLIENTS:
                    row = _median_row(cells[client])
                    rows.append(row)
                    progress(
                        f"load {row['shape']} K={k} {client}: {row['rps']:.0f} req/s "
                        f"({row['rps_spread'][0]:.0f}–{row['rps_spread'][1]:.0f}), p99 {row['p99_ms']:.1f} ms, "
                        f"delivered {row['delivered_ratio']}, pss {row['pss_mb']:.0f} MB"
                    )
        # Low rate: 8 workers, 40 requests/s in all (5 events/s per worker), 5 s.
        low = []
        for client in ("cdpmp-direct", "cdpmp-shared"):
            row = run_one(("sync", 8), 1, client, 1.5 if quick else 5.0, 4, collector, runtime, rate=40.0)
            low.append(row)
            progress(
                f"low rate sync x8 {client}: {row['tracked']} events, "
                f"{row['http_requests_per_1000_events']:.0f} HTTP requests per 1000 events"
            )
    return {"rows": rows, "low_rate": low, "duration_s": duration, "concurrency": 8, "repetitions": reps}


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
