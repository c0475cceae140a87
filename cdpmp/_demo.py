"""``cdpmp demo``: real events from a "master" and forked workers into the embedded
collector, and a verdict by messageId (what was accepted arrived exactly once).

The command line (:mod:`cdpmp.cli`) checks the arguments; this module runs the demo.
"""

from __future__ import annotations

import collections
import datetime as _dt
import decimal
import os
import sys
import tempfile
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import __version__
from ._options import ENV


def _demo_events(analytics: Any, worker: int, count: int) -> List[str]:
    """``count`` calls of a realistic mix; the messageIds of those accepted."""
    accepted: List[str] = []
    user = f"user-{worker}"
    calls: List[Callable[[], Tuple[bool, Dict[str, Any]]]] = [
        lambda: analytics.identify(
            user,
            {"email": f"{user}@example.com", "plan": "pro", "created_at": _dt.datetime(2024, 5, 1, 12, 0)},
        ),
        lambda: analytics.group(user, "acme", {"name": "Acme", "object_type_id": "1"}),
        lambda: analytics.page(user, "Docs", "Quick start", {"path": "/docs"}),
        lambda: analytics.screen(user, "App", "Settings"),
        lambda: analytics.alias(f"anon-{worker}", user),
    ]
    for call in calls[:count]:
        success, msg = call()
        if success:
            accepted.append(msg["messageId"])
    for i in range(max(0, count - len(calls))):
        success, msg = analytics.track(
            user_id=user,
            event="Order Completed",
            properties={
                "order": i,
                "total": decimal.Decimal("19.99"),
                "sku": uuid.uuid4(),
                "tags": {"demo"},
                "at": _dt.date.today(),
            },
        )
        if success:
            accepted.append(msg["messageId"])
    return accepted


def run_demo(workers: int, events: int, mode: Optional[str]) -> int:
    """``cdpmp demo``: the embedded collector, one event from this "master", then
    ``workers`` forked processes x ``events`` events; exit status 0 only when what
    was accepted arrived exactly once."""
    from . import analytics
    from .testing import Collector

    with Collector(write_key="demo-key") as collector, tempfile.TemporaryDirectory() as scratch:
        # Module settings are derived from the options table, so set them by name.
        for name, value in (("write_key", collector.write_key), ("endpoint", collector.url)):
            setattr(analytics, name, value)
        if mode:
            os.environ[ENV["mode"]] = mode
        if mode == "shared":
            # A ring of its own, removed at the end: the demo must neither leave a 33 MB
            # ring in /dev/shm nor feed the host's real uploader. cdpmp creates it 0700.
            os.environ[ENV["runtime_dir"]] = os.path.join(scratch, "runtime")
        print(
            f"cdpmp {__version__} demo: collector on {collector.url}, mode={mode or 'direct'}: "
            f"1 event from the master, then {workers or 1} process(es) x {events} events"
        )
        # The master tracks before forking, as a --preload app would.
        ok, msg = analytics.track(user_id="master", event="Server Started")
        accepted = [msg["messageId"]] if ok else []
        oversize = analytics.track(user_id="master", event="Too Big", properties={"blob": "x" * 40000})
        print(
            f"  oversize message: accepted={oversize[0]} (rejected on purpose, counted, never raised; "
            "the cdpmp WARNING lines about 1 oversize event are about it, and expected)"
        )
        failed = 0
        if workers:
            ids, failed = _fork_workers(analytics, workers, events, scratch)
            accepted += ids
        else:
            accepted += _demo_events(analytics, 0, events)
        drained = analytics.flush(timeout=30)
        collector.wait_for(len(accepted), timeout=30)
        summary = collector.summary()
        received = collections.Counter(collector.message_ids())
        stats = analytics.stats()
        if stats["host"] is not None:  # its uploader ends before its folder goes
            analytics.shutdown(timeout=5)  # and no exit drain reopens the ring
            _stop_demo_uploader()
    print(f"  accepted by track()/identify()/...: {len(accepted)}")
    print(
        f"  collector received: {summary['messages']} messages ({summary['unique']} unique, "
        f"{summary['duplicates']} duplicates) in {summary['requests']} requests {summary['statuses']}; "
        f"dropped by the API unseen: {summary['dropped']}"
    )
    print(f"  by type: {summary['types']}")
    host = stats["host"]
    if host is not None:
        print(
            f"  host (shared ring): accepted={host['accepted']} sent={host['sent']} "
            f"batches={host['batches']} requests={host['requests']} queue_full={host['queue_full']} "
            f"uploader pid={host['uploader_pid']}"
        )
    else:
        print(f"  this process: sent={stats['sent']} batches={stats['batches']} dropped={stats['dropped']}")
    return _verdict(accepted, received, failed, drained)


def _verdict(accepted: List[str], received: Dict[str, int], failed: int, drained: bool) -> int:
    """Compare what track() accepted with what arrived, by messageId."""
    missing = set(accepted) - set(received)
    extra = set(received) - set(accepted)
    duplicated = [m for m, n in received.items() if n > 1]
    problems = [
        f"{n} {what}"
        for n, what in (
            (failed, "worker process(es) failed"),
            (len(missing), "accepted event(s) never arrived"),
            (len(duplicated), "event(s) arrived more than once"),
            (len(extra), "unexpected event(s) arrived"),
            (0 if drained else 1, "flush did not finish"),
        )
        if n
    ]
    if problems:
        print("  result: FAILED: " + "; ".join(problems), file=sys.stderr)
        return 1
    print(f"  result: all {len(accepted)} accepted events arrived exactly once")
    return 0


def _stop_demo_uploader() -> None:
    from .shared import lifecycle

    ring, _ = lifecycle.host_ring()
    try:
        lifecycle.stop(ring, timeout=25)
    finally:
        ring.close()


def _fork_workers(analytics: Any, workers: int, events: int, scratch: str) -> Tuple[List[str], int]:
    """Fork ``workers`` processes that each track ``events``: (the messageIds they
    accepted, how many workers failed). Each child writes its ids to a file."""
    pids: List[int] = []
    for worker in range(1, workers + 1):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                ids = _demo_events(analytics, worker, events)
                with open(os.path.join(scratch, f"{worker}.ids"), "w", encoding="utf-8") as out:
                    out.write("\n".join(ids))
                code = 0 if analytics.shutdown(timeout=20) else 1
            finally:
                os._exit(code)
        pids.append(pid)
    deadline = time.monotonic() + 60
    failures = 0
    for pid in pids:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                failures += os.waitstatus_to_exitcode(status) != 0
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                failures += 1
                break
            time.sleep(0.05)
    accepted: List[str] = []
    for worker in range(1, workers + 1):
        path = os.path.join(scratch, f"{worker}.ids")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as fh:
                accepted += [line for line in fh.read().split("\n") if line]
    print(f"  {workers} forked workers finished ({failures} failed)")
    return accepted, failures
