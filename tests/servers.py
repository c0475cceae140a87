"""Helpers to start real servers as subprocesses, load them, and stop them by pid.

Every wait has a deadline; a server that does not stop is SIGKILLed (whole process
group) and the test fails rather than hangs. Loopback only.
"""

from __future__ import annotations

import asyncio
import collections
import http.client
import inspect
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

from cdpmp._outcome import INTERNAL_MARK

if TYPE_CHECKING:
    from cdpmp.testing import Collector

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_env(collector_url: str, write_key: str, **extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CDP_", "APP_"))}
    env.update(
        CDP_WRITE_KEY=write_key,
        CDP_ENDPOINT=collector_url,
        CDP_UPLOAD_INTERVAL="0.2",
        PYTHONPATH=str(ROOT),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def gunicorn_command(
    port: int,
    *args: str,
    app: str = "tests.apps.wsgi_app:app",
    graceful: int = 20,
    conf: bool = True,
    python_flags: Sequence[str] = (),
    python: str = sys.executable,
) -> List[str]:
    """gunicorn, 4 workers on 127.0.0.1:``port``, with the README's ``gunicorn.conf.py``
    line unless ``conf`` is False (the official client has no hooks)."""
    config = ["-c", "tests/apps/gunicorn_conf.py"] if conf else []
    return [python, *python_flags, "-m", "gunicorn", *config, "--bind", f"127.0.0.1:{port}",
            "--workers", "4", "--graceful-timeout", str(graceful), *args, app]  # fmt: skip


def start_server(cmd: Sequence[str], collector: Collector, log: Path, port: int, **env: str) -> Server:
    """``cmd`` with the collector's settings in its environment, once it answers."""
    server = Server(cmd, server_env(collector.url, collector.write_key, **env), log, port)
    server.wait_ready()
    return server


class Server:
    """A server subprocess in its own session, logging to a file. Every server still
    running when its test ends is killed, whole process group, by the ``_no_server_left``
    fixture (conftest): a test that fails half-way leaves nothing behind."""

    started: List[Server] = []

    def __init__(
        self, cmd: Sequence[str], env: Dict[str, str], log: Path, port: int, cwd: Path = ROOT
    ) -> None:
        self.log_path = log
        self.port = port
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(
            list(cmd), env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        Server.started.append(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited early:\n{self.output(5000)}")
            try:
                if get(self.port, "/?id=probe&k=0", timeout=2.0) == b"ok":
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.kill()
        raise AssertionError(f"server not ready in {timeout}s:\n{self.output(5000)}")

    def wait_log(self, text: str, count: int, timeout: float = 30.0) -> None:
        """Wait until ``text`` appears ``count`` times in the server's output."""
        deadline = time.monotonic() + timeout
        while self.output().count(text) < count:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"{text!r} x{count} not seen:\n{self.output(5000)}")
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"server did not stop within {timeout}s:\n{self.output(5000)}") from None
        finally:
            self._log.close()
        text = self.output()
        assert INTERNAL_MARK not in text, f"cdpmp logged an internal error:\n{text[-5000:]}"
        return code

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def output(self, tail: int = 0) -> str:
        if not self._log.closed:
            self._log.flush()
        text = self.log_path.read_text(errors="replace")
        return text[-tail:] if tail else text


def get(port: int, path: str, timeout: float = 10.0) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        return body if response.status == 200 else b"status %d" % response.status
    finally:
        conn.close()


def load(
    port: int,
    requests: int,
    k: int = 1,
    concurrency: int = 8,
    prefix: str = "r",
    duration: Optional[float] = None,
    deadline: float = 60.0,
    timeout: float = 10.0,
) -> List[str]:
    """Send requests; return the ids whose response was 200 "ok" (all k tracks accepted).
    ``timeout``: seconds per request.

    With ``duration`` it sends until that many seconds passed (bounded by ``requests``).
    """
    done: List[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))
    end = time.monotonic() + (duration if duration is not None else deadline)

    def worker() -> None:
        while time.monotonic() < end:
            with lock:
                n = next(counter, None)
            if n is None:
                return
            rid = f"{prefix}{n}"
            try:
                if get(port, f"/?id={rid}&k={k}", timeout) == b"ok":
                    with lock:
                        done.append(rid)
            except OSError:
                pass  # a refused/reset request tracked nothing we count

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(deadline)
    return done


def expected_ids(rids: List[str], k: int) -> List[str]:
    return [f"{rid}-{j}" for rid in rids for j in range(k)]


def assert_exactly_once(collector: Collector, ok_ids: List[str], k: int, import_events: int) -> None:
    """Every event of every answered request arrived once; ``import_events`` more
    (tracked at app import) too; nothing else, no duplicates."""
    expected = set(expected_ids(ok_ids, k))
    arrived = collector.wait_for(len(expected) + import_events, timeout=30)
    missing = expected - set(collector.message_ids())
    assert arrived, (len(missing), sorted(missing)[:20])
    counts = collections.Counter(collector.message_ids())
    duplicates = {mid: n for mid, n in counts.items() if n > 1}
    assert duplicates == {}, (len(duplicates), sorted(duplicates.items())[:10])
    requests = {mid for mid in counts if not mid.startswith(("import-", "probe"))}
    assert requests == expected, (len(requests - expected), len(expected - requests))
    imports = [mid for mid in counts if mid.startswith("import-")]
    assert len(imports) == import_events


def runserver_command(port: int) -> List[str]:
    """Django's ``runserver`` (with its autoreloader) serving ``tests.apps.django_app``."""
    return [
        sys.executable,
        "-m",
        "django",
        "runserver",
        "--settings",
        "tests.apps.django_app",
        f"127.0.0.1:{port}",
    ]


async def ticks_while(wait: Callable[[], Any]) -> Tuple[int, Any, List[float]]:
    """A 10 ms ticker task runs while ``wait()`` (awaited if it returns an awaitable)
    does: how many ticks ran during it, its result, and every tick's time."""
    ticks: List[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            ticks.append(time.monotonic())
            await asyncio.sleep(0.01)

    task = asyncio.ensure_future(ticker())
    await asyncio.sleep(0.05)
    before = len(ticks)
    result = wait()
    if inspect.isawaitable(result):
        result = await result
    during = len(ticks) - before
    stop.set()
    await task
    return during, result, ticks
