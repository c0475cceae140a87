"""Delivered ÷ tracked at a graceful stop under the servers of issue 12 — gunicorn
gevent workers (with and without ``--preload``), Uvicorn ``--workers 4`` and uWSGI — with
the collector behind TLS (a CA made for the run, trusted through ``SSL_CERT_FILE`` and
``REQUESTS_CA_BUNDLE``), cdpmp in both modes vs the official client, each set up as its
documentation says (cdpmp: its one line per server; the official client: none exists).
Every request tracks K events; SIGTERM stops the server; events are counted by
messageId.

    python -m benchmarks.servers [--requests N] [--setups gevent,gevent-preload,uvicorn,uwsgi]
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import signal
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

import trustme

from cdpmp.testing import Collector
from tests.servers import BIN, Server, expected_ids, free_port, gunicorn_command, load, server_env

CLIENTS = ("official", "direct", "shared")


def _command(setup: str, client: str, port: int) -> List[str]:
    bind = f"127.0.0.1:{port}"
    if setup.startswith("gevent"):
        preload = ["--preload"] if setup == "gevent-preload" else []
        return gunicorn_command(port, "-k", "gevent", *preload, conf=client != "official")
    if setup == "uvicorn":
        return [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port), "--workers", "4",
                "--no-access-log", "tests.apps.asgi_app:app"]  # fmt: skip
    uwsgi = shutil.which("uwsgi", path=str(BIN)) or "uwsgi"
    return [uwsgi, "--http-socket", bind, "--master", "--processes", "4", "--enable-threads",
            "--hook-master-start", "unix_signal:15 gracefully_kill_them_all", "--disable-logging",
            "--virtualenv", sys.prefix, "--module", "tests.apps.wsgi_app:app"]  # fmt: skip


def run_one(setup: str, client: str, requests: int, k: int, ca: trustme.CA) -> Dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "ca.pem"
        ca.cert_pem.write_to_path(str(bundle))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(context)
        with Collector(write_key="bench", tls=context) as collector:
            port = free_port()
            extra = {
                "SSL_CERT_FILE": str(bundle),
                "REQUESTS_CA_BUNDLE": str(bundle),
                "CDP_UPLOAD_INTERVAL": "0.5",
            }
            extra["APP_CLIENT"] = "official" if client == "official" else "cdpmp"
            if setup == "gevent-preload":
                extra["APP_TRACK_AT_IMPORT"] = "1"
            if client == "shared":
                extra.update(CDP_MODE="shared", CDP_RUNTIME_DIR=str(Path(tmp) / "rt"))
            server = Server(
                _command(setup, client, port), server_env(collector.url, collector.write_key, **extra),
                Path(tmp) / "log", port,
            )  # fmt: skip
            try:
                server.wait_ready(60)
            except AssertionError as exc:  # the setup does not even serve
                return {"setup": setup, "client": client, "tracked": 0, "delivered": 0, "ratio": 0.0,
                        "duplicates": 0, "stop_s": None, "note": str(exc).splitlines()[0][:120]}  # fmt: skip
            ok = load(server.port, requests, k=k)
            start = time.monotonic()
            server.stop(signal.SIGTERM, timeout=90)
            stop_s = time.monotonic() - start
            wanted = set(expected_ids(ok, k))
            collector.wait_for(len(wanted), timeout=30)
            if client == "shared":
                _stop_uploader(Path(tmp) / "rt")
            counts = collections.Counter(collector.message_ids())
    delivered = len(wanted & set(counts))
    return {
        "setup": setup,
        "client": client,
        "answered": len(ok),
        "tracked": len(wanted),
        "delivered": delivered,
        "ratio": delivered / max(1, len(wanted)),
        "duplicates": sum(n - 1 for m, n in counts.items() if n > 1 and m in wanted),
        "stop_s": round(stop_s, 1),
    }


def _stop_uploader(directory: Path) -> None:
    from cdpmp.shared import lifecycle
    from cdpmp.shared.ring import Ring

    if (directory / "ring").is_file():
        ring = Ring(str(directory))
        try:
            lifecycle.stop(ring, timeout=25)
        finally:
            ring.close()


def run(
    setups: List[str], requests: int = 300, k: int = 3, clients: Sequence[str] = CLIENTS
) -> List[Dict[str, Any]]:
    ca = trustme.CA()
    return [run_one(setup, client, requests, k, ca) for setup in setups for client in clients]


def table(rows: List[Dict[str, Any]]) -> str:
    lines = ["| setup | client | answered requests | delivered ÷ tracked | duplicates | SIGTERM → exit |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        stop = "—" if r.get("stop_s") is None else f"{r['stop_s']} s"
        lines.append(
            f"| {r['setup']} | {r['client']} | {r.get('answered', 0)} | {r['delivered']} / {r['tracked']} "
            f"({r['ratio']:.1%}) | {r['duplicates']} | {stop} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--setups", default="gevent,gevent-preload,uvicorn,uwsgi")
    args = parser.parse_args()
    rows = run(args.setups.split(","), args.requests)
    print(json.dumps(rows, indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()
