"""Delivered ÷ tracked under gunicorn ``--preload`` (4 sync workers), cdpmp vs the
official client, run the same way: the app module tracks one event at import (in the
master), then every request tracks K events; the master is stopped with SIGTERM.

    python -m benchmarks.preload [--requests N]
"""

from __future__ import annotations

import argparse
import collections
import json
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict

from cdpmp.testing import Collector
from tests.servers import Server, expected_ids, free_port, load, server_env


def run_one(client: str, requests: int, k: int) -> Dict[str, Any]:
    with Collector(write_key="bench") as collector, tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        conf = ["-c", "tests/apps/gunicorn_conf.py"] if client == "cdpmp" else []
        cmd = [
            sys.executable,
            "-m",
            "gunicorn",
            *conf,
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "4",
            "--preload",
            "--graceful-timeout",
            "20",
            "tests.apps.wsgi_app:app",
        ]
        env = server_env(collector.url, collector.write_key, APP_CLIENT=client, APP_TRACK_AT_IMPORT="1")
        server = Server(cmd, env, Path(tmp) / "log", port)
        server.wait_ready()
        ok = load(server.port, requests, k=k)
        server.stop(signal.SIGTERM)
        collector.wait_for(len(ok) * k + 1, timeout=15)
        counts = collections.Counter(collector.message_ids())
        wanted = set(expected_ids(ok, k))
        delivered = len(wanted & set(counts))
        return {
            "client": client,
            "tracked": len(wanted),
            "delivered": delivered,
            "ratio": delivered / max(1, len(wanted)),
            "duplicates": sum(n - 1 for n in counts.values() if n > 1),
        }


def run(requests: int = 400, k: int = 3) -> Dict[str, Any]:
    return {client: run_one(client, requests, k) for client in ("official", "cdpmp")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=400)
    args = parser.parse_args()
    print(json.dumps(run(args.requests), indent=2))


if __name__ == "__main__":
    main()
