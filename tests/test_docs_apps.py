"""The manual's complete apps, started the way their page says and counted.

A page shows its app's files in blocks marked ``<!-- file: NAME -->`` and a shell block
marked ``<!-- try: N events -->`` holding the commands a reader pastes: the local
collector, the ``export`` of its address, the server (a line ending in ``&``), the
requests (``curl``, or a ``python -c`` that publishes) and ``kill %N`` (the SIGTERM of a
deploy). This test writes the files into an empty folder and runs the block line by
line as a shell would: only the ``cdpmp collector`` line is served by this process's
own collector (the same code, so that it can count), and the ports are swapped for free
ones so that tests can run side by side. The N events must arrive, each once: a page
whose app does not start as written, or loses or doubles an event, fails here.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional

import pytest

from cdpmp.testing import Collector
from tests.servers import BIN, ROOT, Server, free_port

pytestmark = [pytest.mark.servers, pytest.mark.timeout(240)]


class Page(NamedTuple):
    path: Path
    files: Dict[str, str]
    lines: List[str]
    events: int


def pages() -> Iterator[Page]:
    for path in sorted((ROOT / "docs").rglob("*.md")):
        lines = path.read_text().splitlines()
        files: Dict[str, str] = {}
        tries: List[tuple[List[str], int]] = []
        for i, line in enumerate(lines):
            marker = re.fullmatch(r"<!-- (file|try): (.+?) -->", line.strip())
            if not marker or not lines[i + 1].startswith("```"):
                continue
            body = lines[i + 2 : lines.index("```", i + 2)]
            if marker[1] == "file":
                files[marker[2]] = "\n".join(body) + "\n"
            else:
                tries.append((body, int(marker[2].split()[0])))
        if files or tries:
            assert len(tries) == 1, f"{path}: files without a try block, or more than one"
            yield Page(path, files, *tries[0])


PAGES = list(pages())


def test_the_server_pages_have_their_apps() -> None:
    names = {p.path.name for p in PAGES}
    assert {"gunicorn.md", "flask.md", "django.md", "asgi.md", "uwsgi.md", "celery.md"} <= names


def _wait_port(port: int, job: Server, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if job.proc.poll() is not None:
            raise AssertionError(f"exited before it listened on {port}:\n{job.output(5000)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"nothing listened on {port} in {timeout}s:\n{job.output(5000)}")


def _path_with_curl(tmp_path: Path) -> str:
    """The venv's commands first; a minimal ``curl`` (GET, or POST with ``-d``) where
    the machine has none, so that the pages' lines run on a bare image too."""
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    if shutil.which("curl") is None:
        shim = tmp_path / "bin" / "curl"
        shim.parent.mkdir()
        shim.write_text(
            f"#!{sys.executable}\nimport sys, urllib.request\n"
            "a = sys.argv[1:]\nurl = [x for x in a if x.startswith('http')][0]\n"
            "data = a[a.index('-d') + 1].encode() if '-d' in a else None\n"
            "sys.stdout.write(urllib.request.urlopen(url, data, timeout=10).read().decode())\n"
        )
        shim.chmod(0o755)
        path = f"{shim.parent}{os.pathsep}{path}"
    return path


@pytest.mark.parametrize("page", PAGES, ids=[p.path.name for p in PAGES])
def test_the_page_app_runs_as_written(page: Page, tmp_path: Path) -> None:
    text = "\n".join([*page.files.values(), *page.lines])
    ports = {n: free_port() for n in set(re.findall(r"(?:127\.0\.0\.1:|--port )(\d{4,5})\b", text))}

    def local(s: str) -> str:
        for old, new in ports.items():
            s = re.sub(rf"\b{old}\b", str(new), s)
        return s

    for name, body in page.files.items():
        (tmp_path / name).write_text(local(body))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CDP_", "APP_", "PYTHON"))}
    env.update(PATH=_path_with_curl(tmp_path), CDP_RUNTIME_DIR=str(tmp_path / "runtime"))
    collector = None
    jobs: List[Optional[Server]] = []  # %1, %2... as the shell numbers them
    try:
        for raw in page.lines:
            line = local(raw.split("  #")[0].strip())
            if line.startswith("cdpmp collector"):
                port = int(re.search(r"--port (\d+)", line)[1])  # type: ignore[index]
                collector = Collector(port=port).start()
                jobs.append(None)  # served by this process
            elif line.startswith("export "):
                env.update(item.partition("=")[::2] for item in shlex.split(line)[1:])
            elif line.startswith("kill %"):
                assert collector is not None
                collector.wait_for(page.events, timeout=60)  # a reader stops it once they saw them
                target = jobs[int(line[len("kill %") :]) - 1]
                assert target is not None, f"{page.path.name}: {line!r} would stop the collector"
                target.stop(signal.SIGTERM, timeout=60)
            elif line.endswith("&"):
                server = Server(
                    ["bash", "-c", line[:-1]], env, tmp_path / f"job{len(jobs) + 1}.log", 0, cwd=tmp_path
                )
                jobs.append(server)
                for port in map(int, re.findall(r"127\.0\.0\.1:(\d+)", line)):
                    _wait_port(port, server)
            else:
                done = subprocess.run(
                    ["bash", "-c", line], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
                )  # fmt: skip
                logs = "".join(j.output(3000) for j in jobs if j is not None)
                assert done.returncode == 0, f"{page.path.name}: {line!r}\n{done.stdout}{done.stderr}\n{logs}"
        assert collector is not None, f"{page.path.name}: the try block starts no collector"
        collector.wait_for(page.events, timeout=30)
        ids = [m["messageId"] for m in collector.messages]
        logs = "".join(j.output(5000) for j in jobs if j is not None)
        assert len(ids) == page.events and len(set(ids)) == page.events, f"{collector.summary()}\n{logs}"
        assert collector.dropped == [], collector.summary()
    finally:
        for job in jobs:
            if job is not None and job.proc.poll() is None:
                job.kill()
        if collector is not None:
            collector.stop()
