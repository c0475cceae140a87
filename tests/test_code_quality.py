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


_LOADED = "import sys\n{code}\nprint(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in {{'urllib3', 'cdpmp'}})))"


def _modules_after(code: str) -> List[str]:
    done = subprocess.run(
        [sys.executable, "-c", _LOADED.format(code=code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_importing_cdpmp_loads_no_transport_and_direct_mode_no_shared_package() -> None:
    # urllib3 imports ssl's names directly: loaded in a gunicorn master (the conf line),
    # it makes every gevent worker warn that ssl was patched too late.
    loaded = _modules_after("import cdpmp, cdpmp.integrations.gunicorn, cdpmp.integrations.uwsgi")
    assert [m for m in loaded if m.startswith(("urllib3", "cdpmp.shared"))] == []
    direct = (
        "import cdpmp\nc = cdpmp.Client('k', endpoint='http://127.0.0.1:9', send=False)\nc.track('u', 'E')"
    )
    assert [m for m in _modules_after(direct) if m.startswith("cdpmp.shared")] == []
