"""Shared pieces of the benchmarks: the event, progress lines, shared-mode setup."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterator

EVENT_PROPS: Dict[str, Any] = {
    "plan": "pro",
    "price": 19.99,
    "currency": "USD",
    "items": 3,
    "coupon": None,
    "path": "/checkout/complete",
    "referrer": "https://example.com/cart",
    "sku": "SKU-1234-XL",
    "category": "apparel",
}
_started = time.monotonic()


def progress(message: str) -> None:
    """One progress line on stderr, with elapsed time."""
    print(f"[{time.monotonic() - _started:6.1f}s] {message}", file=sys.stderr, flush=True)


@contextmanager
def shared_runtime() -> Iterator[str]:
    """A private runtime dir on /dev/shm (as in production); its uploader is stopped after."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    path = tempfile.mkdtemp(prefix="cdpmp-bench-", dir=base)
    os.rmdir(path)
    try:
        yield path
    finally:
        stop_uploaders(path)
        shutil.rmtree(path, ignore_errors=True)


def stop_uploaders(directory: str) -> None:
    import psutil

    procs = [p for p in psutil.process_iter(["cmdline"]) if directory in (p.info["cmdline"] or [])]
    for proc in procs:
        proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=30)
    for proc in alive:
        proc.kill()


def uploader_pid(directory: str) -> int:
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if directory in cmd and "cdpmp.shared.uploader" in cmd:
            return int(proc.pid)
    return 0
