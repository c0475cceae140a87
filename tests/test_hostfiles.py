"""The runtime directory's files are not ours alone: removed under live processes,
replaced by FIFOs or symlinks, left with another mode. Real processes, exact counts."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import List

import pytest

import cdpmp
from cdpmp.shared.ring import Ring
from cdpmp.testing import Collector, Conditions, Outage
from tests.conftest import uploader_processes, wait_until

pytestmark = pytest.mark.timeout(120)


def _shared(collector: Collector) -> cdpmp.Client:
    return cdpmp.Client(collector.write_key, endpoint=collector.url, mode="shared", upload_interval=0.05)


def _track(client: cdpmp.Client, prefix: str, n: int) -> List[str]:
    ids = [f"{prefix}{i}" for i in range(n)]
    for mid in ids:
        assert client.track("u", "E", message_id=mid)[0]
    return ids


def test_runtime_dir_removed_under_live_processes_loses_nothing(
    runtime_dir: str, collector: Collector
) -> None:
    collector.fail_next(10**6, status=503)  # down: everything waits in the ring
    client = _shared(collector)
    try:
        before = _track(client, "a", 100)
        assert wait_until(lambda: len(collector.requests) >= 1, 30)  # the uploader holds them
        shutil.rmtree(runtime_dir)  # systemd-logind RemoveIPC, tmpfiles ageing, an admin
        time.sleep(1.1)  # the producer looks at its files once a second, on a call
        after = _track(client, "b", 10)
        assert Path(runtime_dir, "ring").exists()  # a new ring, with what the old one held
        collector.reset()  # the endpoint is back
        assert client.flush(timeout=60)
        assert collector.wait_for(110, timeout=30)
        assert collector.unique_ids() == set(before + after)
        assert collector.duplicates() == {}
        assert wait_until(lambda: len(uploader_processes(runtime_dir)) == 1, 30)  # the old one left
    finally:
        client.shutdown(timeout=5)


def test_ring_removed_on_a_quiet_host_is_carried_over_by_the_uploader(
    runtime_dir: str, collector: Collector
) -> None:
    collector.fail_next(10**6, status=503)
    script = f"""
        import os, cdpmp
        c = cdpmp.Client({collector.write_key!r}, endpoint={collector.url!r}, mode="shared",
                         upload_interval=0.05)
        for i in range(50):
            assert c.track("u", "E", message_id=f"q{{i}}")[0]
        c.flush(timeout=1.0)  # the uploader is up and failing
        os._exit(0)  # no producer will call again
    """
    subprocess.run([sys.executable, "-c", textwrap.dedent(script)], check=True, timeout=60)
    assert wait_until(lambda: len(collector.requests) >= 1, 30)
    os.unlink(os.path.join(runtime_dir, "ring"))
    assert wait_until(lambda: Path(runtime_dir, "ring").exists(), 30)  # made again by the uploader
    collector.reset()
    assert collector.wait_for(50, timeout=60)
    assert collector.unique_ids() == {f"q{i}" for i in range(50)}
    assert collector.duplicates() == {}


def test_sources_file_removed_then_uploader_restarted_loses_nothing(
    runtime_dir: str, collector: Collector
) -> None:
    collector.fail_next(10**6, status=503)
    client = _shared(collector)
    try:
        before = _track(client, "s", 20)
        assert wait_until(lambda: len(uploader_processes(runtime_dir)) == 1, 30)
        (uploader,) = uploader_processes(runtime_dir)
        uploader.send_signal(signal.SIGKILL)
        uploader.wait(10)
        os.unlink(os.path.join(runtime_dir, "sources.json"))
        collector.reset()
        time.sleep(1.1)
        after = _track(client, "t", 1)  # restores its entry, then starts an uploader
        assert client.flush(timeout=60)
        assert collector.wait_for(21, timeout=30)
        assert collector.unique_ids() == set(before + after) and collector.duplicates() == {}
        host = client.stats()["host"]
        assert host is not None and host["unknown_source"] == 0
    finally:
        client.shutdown(timeout=5)


@pytest.mark.parametrize("name", ["sources.json", "ring", "ring.lock"])
def test_a_fifo_in_place_of_a_runtime_file_is_refused_without_hanging(
    runtime_dir: str, collector: Collector, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    os.mkdir(runtime_dir, 0o700)
    os.mkfifo(os.path.join(runtime_dir, name), 0o600)
    with caplog.at_level(logging.WARNING, logger="cdpmp"):
        client = _shared(collector)  # would block forever opening a FIFO
    try:
        assert client.stats()["mode"] == "direct"
        assert any("not a regular file" in r.getMessage() for r in caplog.records)
        assert client.track("u", "E")[0] and client.flush(timeout=10)
    finally:
        client.shutdown(timeout=5)


@pytest.mark.parametrize("planted", ["fifo-log", "symlink-lock"])
def test_a_file_planted_where_the_uploader_goes_falls_back_to_direct_mode(
    planted: str, runtime_dir: str, collector: Collector, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # No uploader could ever start there: events put in the ring would wait for one
    # that never comes. The client says why, once, and sends them itself. A symlink's
    # target is never touched.
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    os.mkdir(runtime_dir, 0o700)
    if planted == "fifo-log":
        os.mkfifo(os.path.join(runtime_dir, "uploader.log"), 0o600)
    else:
        os.symlink(victim, os.path.join(runtime_dir, "uploader.lock"))
    with caplog.at_level(logging.WARNING, logger="cdpmp"):
        client = _shared(collector)  # would block forever opening a FIFO
    try:
        assert client.stats()["mode"] == "direct"
        name = "uploader.log is a FIFO" if planted == "fifo-log" else "uploader.lock is a symlink"
        assert [r.getMessage() for r in caplog.records if name in r.getMessage()] != []
        assert client.track("u", "E", message_id="m-1")[0] and client.flush(timeout=10)
        assert collector.message_ids() == ["m-1"] and victim.read_text() == "keep me"
    finally:
        client.shutdown(timeout=5)


def test_a_directory_we_did_not_create_keeps_its_mode(
    runtime_dir: str, collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    os.mkdir(runtime_dir)
    os.chmod(runtime_dir, 0o755)
    with caplog.at_level(logging.WARNING, logger="cdpmp"):
        client = _shared(collector)
    try:
        assert stat.S_IMODE(os.stat(runtime_dir).st_mode) == 0o755  # never chmod-ed
        assert client.stats()["mode"] == "direct"
        assert any("mode 755" in r.getMessage() for r in caplog.records)
    finally:
        client.shutdown(timeout=5)


def test_stats_never_creates_a_ring_and_speaks_json_and_prometheus(
    runtime_dir: str, collector: Collector
) -> None:
    def stats(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cdpmp", "stats", *args], capture_output=True, text=True, timeout=30
        )

    missing = stats()
    assert missing.returncode == 1 and "no shared-mode ring in" in missing.stderr
    assert not os.path.exists(runtime_dir)  # nothing was created to report on
    client = _shared(collector)
    try:
        _track(client, "p", 5)
        assert client.flush(timeout=30)
    finally:
        client.shutdown(timeout=5)
    one_line = stats("--json")
    assert one_line.returncode == 0 and len(one_line.stdout.strip().splitlines()) == 1
    data = __import__("json").loads(one_line.stdout)
    assert data["accepted"] == 5 and data["sent"] == 5 and data["runtime_dir"] == runtime_dir
    text = stats("--prometheus", "--dir", runtime_dir).stdout
    assert "# TYPE cdpmp_shared_accepted_total counter" in text and "cdpmp_shared_accepted_total 5" in text
    assert "cdpmp_shared_depth 0" in text and 'cdpmp_shared_source_limit{source="' in text
    assert "cdpmp_shared_ring_present 1" in text


def test_prometheus_client_collector_reads_the_host_counters(runtime_dir: str, collector: Collector) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from cdpmp.prometheus import HostCollector

    registry = CollectorRegistry()
    registry.register(HostCollector(runtime_dir))
    assert registry.get_sample_value("cdpmp_shared_ring_present") == 0  # and nothing was created
    assert not os.path.exists(runtime_dir)
    collector.set_conditions(Conditions(outages=(Outage(0, 600, 503),)))  # events wait in the ring
    client = cdpmp.Client(collector.write_key, endpoint=collector.url, mode="shared", max_queue_size=7)
    try:
        results = [client.track("p", "E")[0] for _ in range(9)]
        assert results == [True] * 7 + [False] * 2
        source = f"{client._sink._source:016x}"  # type: ignore[attr-defined]
        assert registry.get_sample_value("cdpmp_shared_accepted_total") == 7
        assert registry.get_sample_value("cdpmp_shared_queue_full_total") == 2
        assert registry.get_sample_value("cdpmp_shared_source_depth", {"source": source}) == 7
        assert registry.get_sample_value("cdpmp_shared_source_limit", {"source": source}) == 7
        assert b"# TYPE cdpmp_shared_depth gauge" in generate_latest(registry)
        collector.set_conditions(Conditions())
        assert client.flush(timeout=30)
        assert registry.get_sample_value("cdpmp_shared_sent_total") == 7
        assert registry.get_sample_value("cdpmp_shared_depth") == 0
    finally:
        client.shutdown(timeout=5)


def test_a_parent_killed_holding_the_ring_lock_does_not_wedge_the_host(
    runtime_dir: str, collector: Collector
) -> None:
    # The parent forks a child that stays alive, then dies inside a locked section.
    # flock locks belong to the open file description: had the child kept the lock
    # descriptor it inherited, the lock would stay held while the child lives, and
    # every new shared-mode client on the host would block.
    script = f"""
        import fcntl, os, signal, sys, time, cdpmp
        c = cdpmp.Client({collector.write_key!r}, endpoint={collector.url!r}, mode="shared",
                         upload_interval=0.05)
        assert c.track("u", "E", message_id="parent")[0]
        child = os.fork()
        if child == 0:
            assert c.track("u", "E", message_id="child")[0]  # re-opens, closes what it inherited
            time.sleep(120)
            os._exit(0)
        print(child, flush=True)
        time.sleep(0.5)
        fcntl.flock(c._sink._ring._lock_fd, fcntl.LOCK_EX)  # inside the ring's locked section...
        os.kill(os.getpid(), signal.SIGKILL)  # ...and killed there
    """
    with subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)], stdout=subprocess.PIPE, text=True
    ) as parent:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        try:
            assert parent.wait(30) == -signal.SIGKILL
            newcomer = f"""
                import cdpmp
                c = cdpmp.Client({collector.write_key!r}, endpoint={collector.url!r}, mode="shared")
                assert c.track("u", "E", message_id="newcomer")[0]
                assert c.flush(timeout=30)
            """
            # Wedged, the newcomer would wait for the child (120 s): 30 s is the hang guard.
            done = subprocess.run([sys.executable, "-c", textwrap.dedent(newcomer)], timeout=30)
            assert done.returncode == 0
            assert collector.wait_for(3, timeout=30)
            assert collector.unique_ids() == {"parent", "child", "newcomer"}
        finally:
            os.kill(child, signal.SIGKILL)


def test_an_uploader_whose_pid_means_nothing_here_is_still_seen_alive(
    runtime_dir: str, collector: Collector
) -> None:
    # A sidecar uploader in another PID namespace publishes a pid that does not exist
    # (or is another process) in ours: liveness must come from the heartbeat and the
    # election lock, or producers would start a new uploader every 2 s, forever.
    import struct

    client = _shared(collector)
    try:
        _track(client, "x", 1)
        assert client.flush(timeout=30)
        ring = client._sink._ring  # type: ignore[attr-defined]
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        struct.pack_into("<Q", ring.mm, 160, gone.pid)  # a pid that names no process here
        spawns = client.stats()["host"]["spawns"]  # type: ignore[index]
        ids = []
        for i in range(8):  # 4 s of calls, each second a liveness check
            ids += _track(client, f"y{i}-", 5)
            time.sleep(0.5)
        assert client.flush(timeout=30)
        assert client.stats()["host"]["spawns"] == spawns  # type: ignore[index]
        assert len(uploader_processes(runtime_dir)) == 1
        assert collector.wait_for(41, timeout=30)
        assert collector.unique_ids() == {"x0", *ids} and collector.duplicates() == {}
    finally:
        client.shutdown(timeout=5)


def test_foreground_uploader_runs_until_stopped_and_only_the_auto_one_exits_idle(runtime_dir: str) -> None:
    env = {**os.environ, "CDP_RUNTIME_DIR": runtime_dir, "CDP_UPLOADER_IDLE_EXIT": "0"}
    os.makedirs(runtime_dir, mode=0o700)
    auto = subprocess.Popen(
        [sys.executable, "-m", "cdpmp.shared.uploader", "--auto", "--dir", runtime_dir],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    _, err = auto.communicate(timeout=30)  # idle, no producer: leaves, and says why
    assert auto.returncode == 0 and "idle for 0 s with no live producer; exiting" in err
    service = subprocess.Popen(
        [sys.executable, "-m", "cdpmp", "uploader", "--dir", runtime_dir],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            service.wait(3.0)  # systemd or a sidecar: idle exit never applies
    finally:
        service.terminate()
        _, err = service.communicate(timeout=30)
    assert service.returncode == 0 and "exiting" not in err


def _can_unshare_pid() -> bool:
    try:
        return (
            subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True, timeout=10).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(
    not _can_unshare_pid(), reason="needs unshare(1) and CAP_SYS_ADMIN for a new PID namespace"
)
def test_a_sidecar_uploader_in_its_own_pid_namespace(runtime_dir: str, collector: Collector) -> None:
    """A real sidecar: ``cdpmp uploader`` in a new PID namespace (it publishes pid 1,
    which here is init), sharing only the runtime directory. While it serves, no
    producer starts another; once it is SIGKILLed its heartbeat goes stale and a
    producer starts a local one, which delivers the rest. Nothing is lost or doubled."""
    import psutil

    os.makedirs(runtime_dir, mode=0o700)
    env = {k: v for k, v in os.environ.items() if k != "CDP_WRITE_KEY"}
    sidecar = subprocess.Popen(
        [
            "unshare",
            "--pid",
            "--fork",
            "--mount-proc",
            sys.executable,
            "-m",
            "cdpmp",
            "uploader",
            "--dir",
            runtime_dir,
        ],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_until(lambda: os.path.isfile(os.path.join(runtime_dir, "ring")), 20)
        ring = Ring(runtime_dir)
        try:
            assert wait_until(lambda: ring.header.uploader()[0] == 1, 20)  # its pid, in its namespace
        finally:
            ring.close()
        client = _shared(collector)
        before = _track(client, "a", 20)
        for _ in range(4):  # 4 s of calls: a liveness check each second
            time.sleep(1.0)
            before += _track(client, f"b{_}-", 5)
        assert client.flush(timeout=30)
        host = client.stats()["host"]
        ours = {sidecar.pid} | {p.pid for p in psutil.Process(sidecar.pid).children(recursive=True)}
        assert host is not None and host["spawns"] == 0
        assert {p.pid for p in uploader_processes(runtime_dir)} <= ours  # only the sidecar serves
        (served,) = [
            p for p in psutil.Process(sidecar.pid).children(recursive=True) if "uploader" in p.cmdline()
        ]
        served.kill()  # the sidecar dies; its pid 1 still names a live process here
        served.wait(10)
        after = _track(client, "c", 10)
        assert client.flush(timeout=30)  # a stale heartbeat: a local uploader takes over
        assert len([p for p in uploader_processes(runtime_dir) if p.pid not in ours]) == 1
        assert collector.wait_for(len(before) + len(after), timeout=30)
        assert collector.unique_ids() == set(before + after) and collector.duplicates() == {}
        client.shutdown(timeout=5)
    finally:
        sidecar.kill()
        sidecar.wait(10)


def test_a_removed_ring_is_carried_into_its_own_directory_not_the_one_the_environment_names_now(
    runtime_dir: str, collector: Collector, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The endpoint is down, so the events stay in the ring; the ring file is removed,
    # and meanwhile CDP_RUNTIME_DIR names another host directory (a test harness, an
    # app reconfigured). The carried events belong to the sink's own directory.
    collector.set_conditions(Conditions(outages=(Outage(0, 600, 503),)))
    client = _shared(collector)
    try:
        ids = _track(client, "c", 5)
        elsewhere = str(tmp_path / "elsewhere")
        monkeypatch.setenv("CDP_RUNTIME_DIR", elsewhere)
        os.unlink(os.path.join(runtime_dir, "ring"))
        client.flush(timeout=0.5)  # notices the replaced ring and carries over
        assert not os.path.exists(elsewhere)
        assert os.path.exists(os.path.join(runtime_dir, "ring"))
        collector.set_conditions(Conditions())
        assert client.flush(timeout=20)
        assert sorted(collector.message_ids()) == sorted(ids)
    finally:
        client.shutdown(timeout=5)
