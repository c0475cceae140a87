"""The suite's core on the oldest and newest Python the classifiers claim (3.9 and 3.13
today): CI's own interpreter runs everything; these two run every module whose code
paths depend on the Python version (values and their coercion, options, the official
suites, the wire format, the ring, fork and exit handling, the CLI, delivery), without
the real servers, the lint and the benchmarks. An interpreter that is not on the
machine is a skip with its reason (``-ra`` prints it), never a silent pass."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Dict, Iterator, Union

import pytest

from tests import pythons
from tests.servers import ROOT

CORE = [
    "tests/test_input.py",
    "tests/test_options.py",
    "tests/test_official_suite.py",
    "tests/test_real_code.py",
    "tests/test_wire.py",
    "tests/test_ring.py",
    "tests/test_fork.py",
    "tests/test_modes.py",
    "tests/test_cli.py",
    "tests/test_network.py",
    "tests/test_exits.py",
    "tests/test_asgi.py",
]
VERSIONS = pythons.claimed_versions()
TARGETS = sorted({VERSIONS[0], VERSIONS[-1]})
RUN_TIMEOUT = 900.0  # seconds for one interpreter's core run


def _start(version: str) -> Union[subprocess.Popen[str], str]:
    """The core run on ``version``, started; or why it cannot run (a skip reason)."""
    if f"{sys.version_info[0]}.{sys.version_info[1]}" == version:
        return f"Python {version} runs the whole suite already"
    try:
        python = pythons.venv(version, ["test-core"])
    except LookupError as exc:
        return str(exc)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CDP_", "PYTEST_"))}
    return subprocess.Popen(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not servers", *CORE],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def core_runs() -> Iterator[Dict[str, Union[subprocess.Popen[str], str]]]:
    """Both interpreters' runs at once: each mostly waits (on subprocesses, sockets and
    sleeps), so together they take about the time of one."""
    runs = {version: _start(version) for version in TARGETS}
    yield runs
    for run in runs.values():
        if not isinstance(run, str) and run.poll() is None:
            run.kill()
            run.communicate()


@pytest.mark.timeout(1500)
@pytest.mark.parametrize("version", TARGETS)
def test_the_core_suite_passes_on_the_oldest_and_newest_claimed_python(
    version: str, core_runs: Dict[str, Union[subprocess.Popen[str], str]]
) -> None:
    run = core_runs[version]
    if isinstance(run, str):
        pytest.skip(run)
    output, _ = run.communicate(timeout=RUN_TIMEOUT)
    assert run.returncode == 0, f"Python {version}:\n{output[-8000:]}"
    assert re.search(r"\b\d+ passed\b", output), output[-2000:]
