"""The ``cdpmp`` command, run as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
    for command in ("demo", "collector", "track", "stats", "uploader"):
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
    assert "all events arrived exactly once" in out.stdout
