"""Shared mode on a small tmpfs, as in a container (Docker's /dev/shm is 64 MiB, shared
with everything else): a real tmpfs is mounted for each test, which needs root (the
tests skip, saying so, otherwise)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Iterator

import psutil
import pytest

from cdpmp.testing import Collector, Conditions, Fault, Outage
from tests.conftest import uploader_processes

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def small_tmpfs(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A freshly mounted tmpfs of ``request.param`` (default 2m); CDP_RUNTIME_DIR in it."""
    size = getattr(request, "param", "2m")
    mount = tempfile.mkdtemp(prefix="cdpmp-tmpfs-")
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mount], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    runtime = os.path.join(mount, "cdpmp")
    monkeypatch.setenv("CDP_RUNTIME_DIR", runtime)
    monkeypatch.setenv("CDP_UPLOADER_IDLE_EXIT", "5")
    try:
        yield runtime
    finally:
        procs = uploader_processes(runtime)
        for proc in procs:
            proc.kill()
        psutil.wait_procs(procs, timeout=10)
        subprocess.run(["umount", "-l", mount], check=False)
        os.rmdir(mount)


def _producer(collector: Collector, events: int, **options: object) -> subprocess.CompletedProcess[str]:
    script = f"""
        import json, cdpmp
        c = cdpmp.Client({collector.write_key!r}, endpoint={collector.url!r}, mode="shared",
                         upload_interval=0.05, **{options!r})
        accepted = [m["messageId"] for ok, m in
                    (c.track("u", "E", {{"pad": "x" * 300}}) for _ in range({events})) if ok]
        print(json.dumps({{"mode": c.stats()["mode"], "accepted": accepted, "host": c.stats()["host"]}}))
        c.flush(timeout=60)
    """
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=150
    )


def test_a_full_small_tmpfs_refuses_events_and_never_kills_a_producer(small_tmpfs: str) -> None:
    # Down for the first 4 s: 20,000 events of ~600 bytes would need ~12 MiB of ring.
    with Collector(conditions=Conditions(outages=(Outage(0, 4, 503),))) as collector:
        out = _producer(collector, 20000, max_queue_size=100000)
        assert out.returncode == 0, out.stderr[-3000:]  # no SIGBUS (-7)
        report = __import__("json").loads(out.stdout.splitlines()[0])
        assert report["mode"] == "shared"
        host = report["host"]
        assert host["capacity"] < 1 << 20  # sized to the tmpfs, not the 32 MiB default
        accepted = report["accepted"]
        assert 0 < len(accepted) < 20000 and host["queue_full"] == 20000 - len(accepted)
        assert collector.wait_for(len(accepted), timeout=60)
        assert collector.unique_ids() == set(accepted) and collector.duplicates() == {}
    assert "little room" in out.stderr  # the one warning that says why the ring is small


@pytest.mark.parametrize("small_tmpfs", ["96k"], indirect=True)
def test_a_tmpfs_too_small_for_a_ring_means_direct_mode_with_a_warning(small_tmpfs: str) -> None:
    with Collector() as collector:
        out = _producer(collector, 50)
        assert out.returncode == 0, out.stderr[-3000:]
        report = __import__("json").loads(out.stdout.splitlines()[0])
        assert report["mode"] == "direct" and len(report["accepted"]) == 50
        assert collector.wait_for(50, timeout=30)
        assert "could be reserved" in out.stderr


def test_dead_letters_are_bounded_by_the_tmpfs_and_the_overflow_counted(small_tmpfs: str) -> None:
    with Collector() as collector:
        collector.script([Fault(status=401)] * 100000)  # the endpoint refuses everything, for good
        out = _producer(collector, 3000, max_queue_size=100000)
        assert out.returncode == 0, out.stderr[-3000:]
        deadline = time.monotonic() + 60
        script = "import json, cdpmp.shared.ring as r; print(json.dumps(r.Ring(__import__('sys').argv[1]).header.counters()))"
        while True:
            host = __import__("json").loads(
                subprocess.run(
                    [sys.executable, "-c", script, small_tmpfs], capture_output=True, text=True
                ).stdout
            )
            if host["depth"] == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert host["depth"] == 0 and host["spawns"] == 1  # no crash loop
        accepted = host["accepted"]
        assert host["dead_lettered"] == accepted  # every one counted as given up
        assert 0 < host["dead_letter_overflow"] < accepted  # some written, the rest counted
        letters = Path(small_tmpfs, "dead-letter.jsonl").stat().st_size
        assert letters <= 2 << 20
        # A floor of free space stays for everything else on the file system.
        from cdpmp.shared.files import FREE_FLOOR

        vfs = os.statvfs(small_tmpfs)
        assert vfs.f_bavail * vfs.f_frsize >= FREE_FLOOR
