"""The README and the manual (``docs/``, MkDocs): the site builds with ``--strict`` (no
broken link, no page left out of the navigation), the README stays a front door (at
most 200 lines), and every Python block in either runs against the local collector
(``YOUR_WRITE_KEY`` replaced by the collector's key): a snippet that stops working fails
here. A block is exempt only when the line before it says why (``<!-- not run: ... -->``)
or names the example file it shows (``<!-- example: examples/x.py -->``: it must be that
file, which tests/test_beyond_servers.py runs) or is one file of a page's app
(``<!-- file: app.py -->``: tests/test_docs_apps.py starts that app as its page says)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List, NamedTuple

import pytest

from cdpmp._outcome import INTERNAL_MARK
from cdpmp.testing import Collector
from tests.servers import ROOT, server_env

DOCS = ROOT / "docs"


class Block(NamedTuple):
    where: str  # "path:line"
    marker: str  # the HTML comment on the line before, if any
    code: str


def python_blocks() -> Iterator[Block]:
    for path in [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]:
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            if lines[i].strip() == "```python":
                end = lines.index("```", i + 1)
                before = lines[i - 1].strip() if i else ""
                marker = before if before.startswith("<!--") else ""
                yield Block(f"{path.relative_to(ROOT)}:{i + 1}", marker, "\n".join(lines[i + 1 : end]) + "\n")
                i = end
            i += 1


BLOCKS: List[Block] = list(python_blocks())


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    mkdocs = Path(sys.executable).parent / "mkdocs"
    if not mkdocs.exists():
        pytest.fail("mkdocs is not installed: install the project with '.[test,lint]'")
    done = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={"NO_MKDOCS_2_WARNING": "1", "PATH": ""},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_the_readme_is_a_front_door() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_the_api_reference_covers_the_public_surface() -> None:
    # docs/reference.md and docs/errors.md are generated from docstrings: a public name
    # they do not pull in would be documented nowhere.
    import inspect

    import cdpmp
    import cdpmp.errors
    from cdpmp import analytics

    reference = (DOCS / "reference.md").read_text()
    assert "::: cdpmp.errors" in (DOCS / "errors.md").read_text()
    errors = {
        n for n, v in vars(cdpmp.errors).items() if inspect.isclass(v) and v.__module__ == "cdpmp.errors"
    }
    public = {n for n in cdpmp.__all__ if not n.startswith("__")}
    assert {n for n in public if n not in errors and f"::: cdpmp.{n}" not in reference} == set()
    calls = {
        n for n, v in vars(analytics).items() if inspect.isfunction(v) and v.__module__ == analytics.__name__
    }
    listed = re.search(r"::: cdpmp\.analytics\n.*?members: \[(.*?)\]", reference, re.S)
    assert listed is not None
    assert {n for n in calls if not n.startswith("_")} == {m.strip() for m in listed[1].split(",")}


def test_every_page_is_in_the_navigation() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert {p for p in pages if p not in nav} == set()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("block", BLOCKS, ids=[b.where for b in BLOCKS])
def test_every_python_example_runs(block: Block, collector: Collector, tmp_path: Path) -> None:
    if block.marker.startswith("<!-- example:"):
        example = block.marker.split(":", 1)[1].strip(" ->")
        assert block.code == (ROOT / example).read_text(), f"{block.where} differs from {example}"
        return
    if block.marker.startswith("<!-- file:"):
        return  # one file of a page's app: tests/test_docs_apps.py starts it as the page says
    if block.marker.startswith("<!-- not run:"):
        assert len(block.marker) > len("<!-- not run: -->") + 10, f"{block.where}: say why it is not run"
        return
    code = block.code.replace("YOUR_WRITE_KEY", collector.write_key)
    is_test = re.search(r"^def test_", code, re.M) is not None
    script = tmp_path / ("test_snippet.py" if is_test else "snippet.py")
    script.write_text(code)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", script.name] if is_test else [
        sys.executable, script.name]  # fmt: skip
    done = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=90,
        env=server_env(collector.url, collector.write_key),
    )  # fmt: skip
    assert done.returncode == 0, f"{block.where}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    # cdpmp's own warnings may be the point of an example (a refused event); a bug is not.
    assert "Traceback" not in done.stderr and INTERNAL_MARK not in done.stderr, (
        f"{block.where}:\n{done.stderr[-3000:]}"
    )
    if re.search(r"^analytics\.(track|identify)\(", code, re.M):  # it sends at module level
        assert collector.wait_for(1, timeout=10), f"{block.where}: nothing arrived"
