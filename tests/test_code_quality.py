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


def _runtime_imports() -> dict[str, set[str]]:
    """cdpmp's modules and the cdpmp modules each imports at run time (function-level
    imports included; ``if TYPE_CHECKING:`` blocks left out)."""
    import ast

    root = ROOT / "cdpmp"
    mods = {}
    for path in root.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        tree = ast.parse(path.read_text())
        skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                for n in ast.walk(node)}  # fmt: skip
        deps: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in mods)
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    target = f"{module}.{alias.name}"
                    deps.add(target if target in mods else module)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def test_no_import_circle_and_no_arrow_from_the_core_up_to_the_integrations() -> None:
    graph = _runtime_imports()
    core = [m for m in graph if m.count(".") == 1 and m.split(".")[1].startswith("_")] + ["cdpmp.client"]
    assert {m: sorted(d for d in graph[m] if ".integrations" in d) for m in core} == {m: [] for m in core}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for dep in graph[start] - seen:
            seen.add(dep)
            if dep == goal or reaches(dep, goal, seen):
                return True
        return False

    # A package's __init__ importing its own modules is no circle: leave packages out.
    circles = [
        m
        for m in graph
        if not (ROOT / (m.replace(".", "/") + "/__init__.py")).exists() and reaches(m, m, set())
    ]
    assert circles == []
