"""A real ``celery worker`` with the prefork pool and ``--max-tasks-per-child=1``.

Every pool child ends with ``os._exit`` after one task, so atexit never runs: only
the ``worker_process_shutdown`` signal can drain its queue.
"""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cdpmp.testing import Collector
from tests.servers import ROOT, Server, server_env

pytestmark = [pytest.mark.servers, pytest.mark.timeout(180)]


@pytest.mark.parametrize(
    ("mode", "line", "per_child"),
    [("direct", True, 1), ("shared", True, 1), ("direct", False, 10)],
    ids=["direct", "shared", "direct-line-forgotten-10-per-child"],
)
def test_prefork_children_deliver_everything(
    mode: str,
    line: bool,
    per_child: int,
    tmp_path: Path,
    collector: Collector,
    request: pytest.FixtureRequest,
) -> None:
    # Without the integration's import, cdpmp finds the worker by itself (Celery is
    # loaded when a child first queues) and drains each child at its os._exit.
    folder = tmp_path / "broker"
    env = server_env(collector.url, collector.write_key, CELERY_FS_DIR=str(folder), CDP_MODE=mode)
    if not line:
        env["APP_NO_INTEGRATION"] = "1"
    if mode == "shared":
        env["CDP_RUNTIME_DIR"] = request.getfixturevalue("runtime_dir")
    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "tests.apps.celery_app",
        "worker",
        "--pool",
        "prefork",
        "--concurrency",
        "2",
        "--max-tasks-per-child",
        str(per_child),
        "--loglevel",
        "INFO",
        "--without-heartbeat",
        "--without-mingle",
        "--without-gossip",
    ]
    worker = Server(cmd, env, tmp_path / "celery.log", port=0)
    try:
        tasks, k = 30, 5
        # Published from a fresh process: the app module reads its broker folder at
        # import, so importing it here would pin every test to the first folder.
        publish = (
            f"from tests.apps.celery_app import emit\nfor n in range({tasks}): emit.delay(f't{{n}}', {k})"
        )
        subprocess.run([sys.executable, "-c", publish], env=env, cwd=ROOT, check=True, timeout=60)
        expected = {f"t{n}-{j}" for n in range(tasks) for j in range(k)}
        arrived = collector.wait_for(len(expected), timeout=90)
    finally:
        worker.stop(signal.SIGTERM, timeout=60)
    uploader_log = ""
    if mode == "shared":
        log = Path(env["CDP_RUNTIME_DIR"], "uploader.log")
        uploader_log = log.read_text() if log.exists() else "(no uploader.log)"
    assert arrived, worker.output(5000) + uploader_log + str(collector.summary())
    counts = collections.Counter(collector.message_ids())
    assert {mid: n for mid, n in counts.items() if n > 1} == {}
    assert set(counts) == expected
    assert worker.output().count("succeeded in") == tasks
