"""The ``cdpmp`` command, run as a real subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from cdpmp.testing import Collector

pytestmark = pytest.mark.timeout(120)


def _cdpmp(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cdpmp", *args],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, **(env or {})},
    )


def test_help_explains_every_command() -> None:
    out = _cdpmp("--help")
    assert out.returncode == 0
    for command in ("demo", "collector", "track", "import", "stats", "uploader"):
        assert command in out.stdout


def test_track_sends_one_event_with_the_key_from_the_environment(collector: Collector) -> None:
    out = _cdpmp(
        "track",
        "--endpoint",
        collector.url,
        "--user-id",
        "u1",
        "--event",
        "Signed Up",
        "--properties",
        json.dumps({"plan": "pro"}),
        env={"CDP_WRITE_KEY": collector.write_key},
    )
    assert out.returncode == 0, out.stderr
    assert collector.wait_for(1)
    (msg,) = collector.messages
    assert (msg["event"], msg["userId"], msg["properties"]) == ("Signed Up", "u1", {"plan": "pro"})
    assert msg["messageId"] in out.stdout
    assert collector.write_key not in out.stdout + out.stderr


def test_track_without_a_key_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CDP_WRITE_KEY", raising=False)
    out = _cdpmp("track", "--event", "E", "--user-id", "u")
    assert out.returncode == 2 and "no write key" in out.stderr


@pytest.mark.parametrize("workers", ["0", "3"])
def test_demo_reports_every_event_arriving_exactly_once(workers: str) -> None:
    out = _cdpmp("demo", "--workers", workers, "--events", "20")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "accepted events arrived exactly once" in out.stdout


def test_demo_in_shared_mode_leaves_no_ring_and_no_uploader(tmp_path: Path) -> None:
    # Its ring lives in a folder of its own, gone with its uploader when it ends: not in
    # the runtime directory the environment names (the host's real one, for an app).
    runtime = tmp_path / "runtime"
    out = _cdpmp(
        "demo", "--mode", "shared", "--workers", "2", "--events", "20", env={"CDP_RUNTIME_DIR": str(runtime)}
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "accepted events arrived exactly once" in out.stdout
    pid = int(re.search(r"uploader pid=(\d+)", out.stdout)[1])  # type: ignore[index]
    assert not runtime.exists() and not psutil.pid_exists(pid)
    assert "ring was removed" not in out.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--event", "E"], "cdpmp track: give --user-id or --anonymous-id"),
        (
            ["--event", "E", "--user-id", "u", "--properties", "{bad"],
            "cdpmp track: --properties is not valid JSON",
        ),
        (
            ["--event", "E", "--user-id", "u", "--properties", "[1]"],
            "--properties must be a JSON object, got list",
        ),
        (
            ["--event", "E", "--user-id", "u", "--endpoint", "ftp://x"],
            "endpoint: must start with http:// or https://",
        ),
        (["--event", "E", "--user-id", "u", "--endpoint", ""], "cdpmp track: --endpoint '' names no host"),
        (["--event", "E", "--user-id", "u", "--endpoint", "http://"], "--endpoint 'http://' names no host"),
        (["--event", "E", "--user-id", "u", "--timeout", "0"], "cdpmp track: --timeout must be more than 0"),
        (
            ["--event", "E", "--user-id", "u", "--endpoint", "http://127.0.0.1:99999"],
            "--endpoint 'http://127.0.0.1:99999': Port out of range 0-65535",
        ),
        (
            ["--event", "E", "--user-id", "u", "--write-key-file", "/nonexistent/key"],
            "cannot read --write-key-file /nonexistent/key: No such file or directory",
        ),
        (["--event", "", "--user-id", "u"], "cdpmp track: --event must not be empty"),
        (
            ["--event", "E", "--user-id", "u", "--properties", '{"a":' * 5000 + "1" + "}" * 5000],
            "cdpmp track: --properties is nested too deeply",
        ),
        (
            ["--event", "E", "--user-id", "u", "--timeout", "1e10"],
            "timeout: must be a finite number >= 0.001",
        ),
    ],
    ids=[
        "no-user-id",
        "bad-json",
        "not-an-object",
        "bad-endpoint",
        "empty-endpoint",
        "no-host",
        "bad-timeout",
        "port-out-of-range",
        "missing-key-file",
        "empty-event",
        "deep-json",
        "absurd-timeout",
    ],
)
def test_track_answers_each_mistake_with_one_line_and_status_2(args: list[str], message: str) -> None:
    out = _cdpmp("track", *args, env={"CDP_WRITE_KEY": "k"})
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        next(line for line in out.stderr.splitlines() if message in line)
    ]
    assert "Traceback" not in out.stderr and out.stdout == ""


def _track_to(endpoint: str, timeout: str, key: str) -> subprocess.CompletedProcess[str]:
    return _cdpmp(
        "track",
        "--event",
        "E",
        "--user-id",
        "u",
        "--endpoint",
        endpoint,
        "--timeout",
        timeout,
        env={"CDP_WRITE_KEY": key},
    )


def test_track_names_the_endpoint_it_waits_on_and_why_it_failed() -> None:
    from tests.servers import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    out = _track_to(url, "1", "k")
    assert out.returncode == 1
    lines = out.stderr.splitlines()
    assert lines[0] == f"sending to {url}/v1/batch (up to 1 s)"
    assert (
        lines[-1].startswith("cdpmp track: FAILED, messageId=")
        and f"not delivered to {url}/v1/batch" in lines[-1]
    )
    assert len(lines) == 2 and "Traceback" not in out.stderr
    assert "stats()" not in out.stderr  # an app's words, not a command line's


def test_track_hints_at_http_when_a_scheme_less_endpoint_meets_plain_http(collector: Collector) -> None:
    host = collector.url.split("://", 1)[1]  # 127.0.0.1:PORT, as people type it
    out = _track_to(host, "2", collector.write_key)
    assert out.returncode == 1
    assert f"for a local collector give http://{host}" in out.stderr.splitlines()[-1], out.stderr


def test_collector_says_which_write_key_it_accepts_without_printing_a_real_one() -> None:
    def first_lines(env: dict[str, str]) -> list[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cdpmp", "collector"],
            stdout=subprocess.PIPE,
            text=True,
            env={k: v for k, v in {**os.environ, **env}.items() if v},
        )
        try:
            assert proc.stdout is not None
            return [proc.stdout.readline().strip() for _ in range(2)]
        finally:
            proc.terminate()
            proc.communicate(timeout=10)

    default = first_lines({"CDP_WRITE_KEY": ""})
    assert default[1] == "accepts write key 'test-write-key' (the default; set CDP_WRITE_KEY to choose one)"
    secret = "sk_us_" + "s3cr3t" * 6
    chosen = first_lines({"CDP_WRITE_KEY": secret})
    assert chosen[1] == f"accepts the write key from CDP_WRITE_KEY (ending ...{secret[-4:]})"
    assert secret not in " ".join(chosen)


def test_demo_counts_its_events_and_its_verdict_comes_from_what_arrived(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = _cdpmp("demo", "--workers", "2", "--events", "3")  # fewer events than the mix's five calls
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 event from the master, then 2 process(es) x 3 events" in out.stdout
    assert "2 forked workers finished (0 failed)" in out.stdout
    assert "result: all 7 accepted events arrived exactly once" in out.stdout
    from cdpmp._demo import _verdict

    assert _verdict(["a", "b", "c"], {"a": 2, "x": 1}, failed=1, drained=False) == 1
    assert capsys.readouterr().err.strip() == (
        "result: FAILED: 1 worker process(es) failed; 2 accepted event(s) never arrived; "
        "1 event(s) arrived more than once; 1 unexpected event(s) arrived; 1 flush did not finish"
    )


def test_demo_refuses_negative_counts() -> None:
    out = _cdpmp("demo", "--events", "-1")
    assert (
        out.returncode == 2 and out.stderr.strip() == "cdpmp demo: --workers and --events must be 0 or more"
    )


@pytest.mark.parametrize("port", ["busy", "70000"])
def test_collector_on_a_port_it_cannot_use_says_so_in_one_line(port: str) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        number = str(taken.getsockname()[1]) if port == "busy" else port
        out = _cdpmp("collector", "--port", number)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        next(line for line in out.stderr.splitlines() if f"cannot listen on 127.0.0.1:{number}" in line)
    ]


def test_collector_prints_one_whole_line_per_message_under_concurrent_requests() -> None:
    import signal
    import threading

    import cdpmp

    proc = subprocess.Popen([sys.executable, "-m", "cdpmp", "collector"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().split()[3]
        proc.stdout.readline()  # the key it accepts
        assert proc.stdout.readline().startswith("answers as the API")
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout or ()))  # never a full pipe
        reader.start()
        clients = [cdpmp.Client("test-write-key", endpoint=url, upload_size=5) for _ in range(12)]

        def send(n: int) -> None:
            for i in range(150):
                clients[n].track("u", "E", {"pad": "x" * 200}, message_id=f"c{n}-{i}")
            clients[n].flush(timeout=30)

        threads = [threading.Thread(target=send, args=(n,)) for n in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)
        reader.join(timeout=20)
        proc.stdout.close()
        for client in clients:
            client.shutdown(timeout=1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    messages = [json.loads(line) for line in lines[:-1]]  # each line ONE object; the last: the summary
    assert sorted(m["messageId"] for m in messages) == sorted(
        f"c{n}-{i}" for n in range(12) for i in range(150)
    )


def test_track_never_echoes_a_password_in_the_endpoint() -> None:
    out = _cdpmp("track", "--event", "E", "--user-id", "u", "--timeout", "0.3",
                 "--endpoint", "http://bob:hunter2@127.0.0.1:1", env={"CDP_WRITE_KEY": "k"})  # fmt: skip
    assert out.returncode == 1 and "http://bob:***@127.0.0.1:1/v1/batch" in out.stderr, out.stderr
    assert "hunter2" not in out.stdout + out.stderr
