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


@pytest.mark.timeout(1500)
@pytest.mark.parametrize("version", sorted({VERSIONS[0], VERSIONS[-1]}))
def test_the_core_suite_passes_on_the_oldest_and_newest_claimed_python(version: str) -> None:
    if f"{sys.version_info[0]}.{sys.version_info[1]}" == version:
        pytest.skip(f"Python {version} runs the whole suite already")
    try:
        python = pythons.venv(version, ["test-core"])
    except LookupError as exc:
        pytest.skip(str(exc))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CDP_", "PYTEST_"))}
    done = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not servers", *CORE],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, f"Python {version}:\n{done.stdout[-8000:]}\n{done.stderr[-2000:]}"
    assert re.search(r"\b\d+ passed\b", done.stdout), done.stdout[-2000:]
