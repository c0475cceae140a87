"""Shared fixtures: a strict collector per test and clients pointed at it."""

from __future__ import annotations

import logging
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional

import pytest
import trustme

import cdpmp
from cdpmp._outcome import INTERNAL_MARK
from cdpmp.testing import Collector

ROOT = Path(__file__).resolve().parent.parent


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
    analytics._live.clear()


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll ``predicate`` every 50 ms until it holds or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def uploader_processes(directory: str) -> List[Any]:
    """Live uploader processes (not launchers) serving ``directory``."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmd = proc.info["cmdline"] or []
        if ("cdpmp.shared.uploader" in cmd or "uploader" in cmd) and directory in cmd:
            if proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found


def end_uploaders(directory: str) -> None:
    """Terminate the uploaders serving ``directory``; kill any left after 10 s."""
    import psutil

    procs = uploader_processes(directory)
    for proc in procs:
        proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=10)
    for proc in alive:
        proc.kill()


def _let_go_of(path: str) -> None:
    """End this process's shared-mode sinks in ``path``: a client the test did not shut
    down keeps a watch thread that would, once the directory is removed, carry the
    ring's records into a new one there (and start an uploader no fixture ends)."""
    import time as _time

    from cdpmp._process import PROCESS

    for member in PROCESS.members():
        sink: Any = getattr(member, "_sink", None)
        if getattr(sink, "_dir", None) == path and hasattr(sink, "stop_threads"):
            sink.stop_threads(_time.monotonic() + 2.0)
            sink.retire()


@pytest.fixture
def runtime_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A private runtime directory for shared mode; its uploaders die with the test."""
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="cdpmp-rt-")
    os.rmdir(path)  # cdpmp creates it, 0700
    monkeypatch.setenv("CDP_RUNTIME_DIR", path)
    monkeypatch.setenv("CDP_UPLOADER_IDLE_EXIT", "5")
    yield path
    _let_go_of(path)
    end_uploaders(path)
    log = Path(path, "uploader.log")
    text = log.read_text(errors="replace") if log.is_file() else ""  # never a FIFO a test left
    shutil.rmtree(path, ignore_errors=True)
    assert INTERNAL_MARK not in text, text[-3000:]


# -- suite-wide guards ------------------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="session", autouse=True)
def _own_runtime_dir() -> Iterator[str]:
    """No test, nor anything it starts, ever uses the user's default runtime directory
    (``/dev/shm/cdpmp-<uid>``): the whole session (one per xdist worker) gets its own,
    and every uploader started there is ended when the session ends. A test that needs
    a ring of its own takes the ``runtime_dir`` fixture instead."""
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="cdpmp-session-")
    os.rmdir(path)  # cdpmp creates it, 0700
    saved = os.environ.get("CDP_RUNTIME_DIR")
    os.environ["CDP_RUNTIME_DIR"] = path
    try:
        yield path
    finally:
        if saved is None:
            os.environ.pop("CDP_RUNTIME_DIR", None)
        else:
            os.environ["CDP_RUNTIME_DIR"] = saved
        end_uploaders(path)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def _no_server_left() -> Iterator[None]:
    """Kill (process group) every server a test started and left running."""
    from tests.servers import Server

    yield
    while Server.started:
        server = Server.started.pop()
        if server.proc.poll() is None:
            server.kill()
        if not server._log.closed:
            server._log.close()


@pytest.fixture(autouse=True)
def _internal_capture(request: pytest.FixtureRequest) -> Iterator[_Records]:
    """An unexpected exception inside cdpmp (logged on ``cdpmp.internal``) fails the
    test that caused it, as sentry-python's fixtures do."""
    handler = _Records()
    log = logging.getLogger("cdpmp.internal")
    log.addHandler(handler)
    try:
        yield handler
    finally:
        log.removeHandler(handler)
    if handler.records and "internal_errors" not in request.fixturenames:
        pytest.fail("cdpmp logged internal errors:\n" + "\n".join(handler.format(r) for r in handler.records))


@pytest.fixture
def internal_errors(_internal_capture: _Records) -> List[logging.LogRecord]:
    """For a test that provokes internal errors on purpose: they are collected here
    instead of failing the test."""
    return _internal_capture.records


def _git_status() -> Optional[str]:
    try:
        done = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=all"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


_status_at_start: List[Optional[str]] = []


def _is_xdist_worker(session: pytest.Session) -> bool:
    # Only the controlling process compares: a worker would see another worker's
    # test in the middle of its work.
    return hasattr(session.config, "workerinput")


def pytest_sessionstart(session: pytest.Session) -> None:
    if not _is_xdist_worker(session):
        _status_at_start.append(_git_status())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The suite leaves the working tree as it found it (clean in CI)."""
    if _is_xdist_worker(session):
        return
    before = _status_at_start[0] if _status_at_start else None
    after = _git_status()
    if before is None or after is None or before == after:
        return
    added = sorted(set(after.splitlines()) - set(before.splitlines()))
    sys.stderr.write("\nthe test suite changed the working tree:\n" + "\n".join(added) + "\n")
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_collector(ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Collector]:
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))  # inherited by the servers
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    with Collector(tls=context) as collector:
        yield collector
