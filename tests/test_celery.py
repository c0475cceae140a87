"""A real ``celery worker`` with the prefork pool and ``--max-tasks-per-child=1``.

Every pool child ends with ``os._exit`` after one task, so atexit never runs: only
the ``worker_process_shutdown`` signal can drain its queue.
"""

from __future__ import annotations

import collections
import os
import signal
import sys
from pathlib import Path

import pytest

from cdpmp.testing import Collector
from tests.servers import Server, server_env

pytestmark = [pytest.mark.servers, pytest.mark.timeout(180)]


def test_prefork_children_deliver_everything(
    tmp_path: Path, collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "broker"
    monkeypatch.setenv("CELERY_FS_DIR", str(folder))
    env = server_env(collector.url, collector.write_key, CELERY_FS_DIR=str(folder))
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
        "1",
        "--loglevel",
        "INFO",
        "--without-heartbeat",
        "--without-mingle",
        "--without-gossip",
    ]
    worker = Server(cmd, env, tmp_path / "celery.log", port=0)
    try:
        from tests.apps.celery_app import emit

        tasks, k = 30, 5
        for n in range(tasks):
            emit.delay(f"t{n}", k)
        expected = {f"t{n}-{j}" for n in range(tasks) for j in range(k)}
        arrived = collector.wait_for(len(expected), timeout=90)
    finally:
        worker.stop(signal.SIGTERM, timeout=60)
    assert arrived, worker.output(5000)
    counts = collections.Counter(collector.message_ids())
    assert {mid: n for mid, n in counts.items() if n > 1} == {}
    assert set(counts) == expected
    assert worker.output().count("succeeded in") == tasks
    assert os.environ["CELERY_FS_DIR"] == str(folder)
