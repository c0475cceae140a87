"""The lint and type gates run as part of the one test command."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["cdpmp", "tests", "benchmarks", "examples"]


@pytest.mark.parametrize(
    "command",
    [["ruff", "check", *SOURCES], ["ruff", "format", "--check", *SOURCES], ["mypy", "--strict", "cdpmp"]],
    ids=["ruff-check", "ruff-format", "mypy-strict"],
)
def test_code_is_clean(command: List[str]) -> None:
    tool = shutil.which(command[0], path=str(Path(sys.executable).parent))
    if tool is None:
        pytest.fail(f"{command[0]} is not installed: install the project with '.[test,lint]'")
    result = subprocess.run([tool, *command[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
