"""Shared fixtures: a strict collector per test and clients pointed at it."""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator, List

import pytest

import cdpmp
from cdpmp.testing import Collector


@pytest.fixture
def collector(cdp_collector: Collector) -> Collector:
    return cdp_collector


@pytest.fixture
def make_client(collector: Collector) -> Iterator[Callable[..., cdpmp.Client]]:
    """Build clients aimed at the collector; every one is shut down after the test."""
    made: List[cdpmp.Client] = []

    def factory(**options: Any) -> cdpmp.Client:
        options.setdefault("endpoint", collector.url)
        options.setdefault("upload_interval", 0.05)
        key = options.pop("write_key", collector.write_key)
        client = cdpmp.Client(key, **options)
        made.append(client)
        return client

    yield factory
    for client in made:
        client.shutdown(timeout=2)


@pytest.fixture(autouse=True)
def _reset_facade() -> Iterator[None]:
    """Restore the module-level settings the tests change."""
    from cdpmp import analytics

    saved = {name: getattr(analytics, name) for name in analytics.SETTINGS}
    yield
    analytics.shutdown(timeout=2)
    for name, value in saved.items():
        setattr(analytics, name, value)
    analytics.default_client = None
    analytics._retired.clear()


def uploader_processes(directory: str) -> List[Any]:
    """Live uploader processes (not launchers) serving ``directory``."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmd = proc.info["cmdline"] or []
        if ("cdpmp.uploader" in cmd or "uploader" in cmd) and directory in cmd and "--detach" not in cmd:
            if proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found


@pytest.fixture
def runtime_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A private runtime directory for shared mode; its uploaders die with the test."""
    import shutil
    import tempfile

    import psutil

    path = tempfile.mkdtemp(prefix="cdpmp-rt-")
    os.rmdir(path)  # cdpmp creates it, 0700
    monkeypatch.setenv("CDP_RUNTIME_DIR", path)
    monkeypatch.setenv("CDP_UPLOADER_IDLE_EXIT", "5")
    yield path
    procs = uploader_processes(path)
    for proc in procs:
        proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=10)
    for proc in alive:
        proc.kill()
    shutil.rmtree(path, ignore_errors=True)
