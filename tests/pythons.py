"""Other Python interpreters for the suite: the oldest and newest version the package's
classifiers claim, and any version a test needs for itself (3.12's fork warning).

An interpreter is found under pyenv (``$PYENV_ROOT``, default ``~/.pyenv``) or on
``PATH`` (``python3.X``); where none is, the test skips and says so. Each gets a virtual
environment with the project installed (editable) and the extras asked for, built
once and kept under ``~/.cache/cdpmp-tests`` (``CDPMP_TEST_CACHE``), keyed by the
interpreter, the checkout's path and ``pyproject.toml``: a changed dependency list (or
another clone) builds a new one. Building takes about a minute; every wait has a deadline.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import List, Optional, Sequence

from tests.servers import ROOT

BUILD_TIMEOUT = 600.0  # seconds to create a venv and install into it


def claimed_versions() -> List[str]:
    """The ``3.X`` versions the classifiers claim, oldest first."""
    text = (ROOT / "pyproject.toml").read_text()
    found = re.findall(r'"Programming Language :: Python :: (3\.\d+)"', text)
    return sorted(set(found), key=lambda v: int(v.split(".")[1]))


def find_interpreter(version: str) -> Optional[str]:
    """A working ``python3.X`` for ``version`` (pyenv's own, then ``PATH``: a pyenv
    shim on ``PATH`` may name a version that is not selected), or None."""
    root = os.environ.get("PYENV_ROOT") or str(Path.home() / ".pyenv")
    candidates = sorted(glob.glob(f"{root}/versions/{version}.*/bin/python{version}"), reverse=True)
    on_path = shutil.which(f"python{version}")
    for candidate in [*candidates, *([on_path] if on_path else [])]:
        try:
            done = subprocess.run(
                [candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0 and done.stdout.strip() == version:
            return candidate
    return None


def venv(version: str, extras: Sequence[str], packages: Sequence[str] = ()) -> Path:
    """The ``python`` of a venv for ``version`` with the project and ``extras`` (and
    ``packages``) installed; raises LookupError when no interpreter is found."""
    interpreter = find_interpreter(version)
    if interpreter is None:
        raise LookupError(f"no Python {version} on PATH or under pyenv")
    key = hashlib.sha256(
        # The checkout too: the project is installed editable, from this tree.
        "\n".join(
            [interpreter, str(ROOT), (ROOT / "pyproject.toml").read_text(), *extras, *packages]
        ).encode()
    ).hexdigest()[:12]
    cache = Path(os.environ.get("CDPMP_TEST_CACHE") or Path.home() / ".cache" / "cdpmp-tests")
    home = cache / f"py{version}-{key}"
    python = home / "bin" / "python"
    if (home / "ready").is_file():
        return python
    shutil.rmtree(home, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([interpreter, "-m", "venv", str(home)], check=True, timeout=BUILD_TIMEOUT)
    target = f"{ROOT}[{','.join(extras)}]" if extras else str(ROOT)
    install = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-e", target]
    done = subprocess.run([*install, *packages], capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    if done.returncode:
        raise RuntimeError(f"pip install for Python {version} failed:\n{done.stderr[-3000:]}")
    (home / "ready").write_text(interpreter + "\n")
    return python
