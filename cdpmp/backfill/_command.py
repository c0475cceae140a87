"""``cdpmp import``: the command line of :func:`cdpmp.backfill.import_files`.

Exit status: 0 every row delivered; 1 some rows rejected (the rejects file names
them) or the run stopped on the endpoint or the key (re-run to resume); 2 the command
was used wrongly; 130 interrupted (Ctrl-C or SIGTERM; re-run to resume).
"""

from __future__ import annotations

import argparse
import signal
import sys
from types import FrameType
from typing import Any, Callable, Optional

#: Exit status of an interrupted run (the shell's for SIGINT).
INTERRUPTED = 130


def add_parser(sub: Any, read_key: Callable[[argparse.Namespace], Optional[str]]) -> None:
    cmd = sub.add_parser(
        "import",
        help="send files of historical events (JSON Lines or CSV, .gz too), resumable after a crash",
        description="Send every row of FILE(s) to Customer.io under a stable messageId; a checkpoint "
        "beside each file lets the same command resume after a crash. Exit 0: all delivered; "
        "1: rows rejected (see the rejects file) or the run stopped (re-run to resume); 2: usage; "
        "130: interrupted (re-run to resume).",
    )
    cmd.add_argument(
        "files", nargs="+", metavar="FILE", help="JSON Lines or .csv, optionally .gz; '-' for stdin"
    )
    cmd.add_argument("--write-key", help="write key (visible in argv; prefer CDP_WRITE_KEY)")
    cmd.add_argument("--write-key-file", help="file holding the write key")
    cmd.add_argument(
        "--endpoint", help="override the endpoint (default: CDP_ENDPOINT, else the key's region)"
    )
    cmd.add_argument(
        "--checkpoint", help="checkpoint file (one input file only; default: FILE.cdpmp-checkpoint)"
    )
    cmd.add_argument("--rejects", help="rejects file (one input file only; default: FILE.rejects.jsonl)")
    cmd.add_argument("--restart", action="store_true", help="ignore the checkpoint: send from the first row")
    cmd.add_argument("--rate", type=float, default=900.0, help="requests per second at most (default 900)")
    cmd.add_argument("--in-flight", type=int, default=4, help="requests at once (default 4)")
    cmd.add_argument(
        "--retry-budget",
        type=float,
        default=300.0,
        help="seconds a batch is retried before the run stops (300)",
    )
    cmd.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    cmd.set_defaults(func=lambda args: run(args, read_key))


def _interrupt(signum: int, frame: Optional[FrameType]) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace, read_key: Callable[[argparse.Namespace], Optional[str]]) -> int:
    from .._usage import UserError
    from ..errors import CdpmpError
    from . import CheckpointMismatch, import_files

    key = read_key(args)
    if not key:
        raise UserError("no write key (use --write-key-file or CDP_WRITE_KEY)")
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # a deploy's stop: checkpoint, then exit
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        report = import_files(
            args.files, key, args.endpoint, checkpoint=args.checkpoint, rejects=args.rejects,
            restart=args.restart, rate=args.rate, in_flight=args.in_flight, retry_budget=args.retry_budget,
            progress=None if args.no_progress else sys.stderr,
        )  # fmt: skip
    except (ValueError, CdpmpError, CheckpointMismatch, OSError) as exc:
        raise UserError(str(exc)) from None
    for f in report.files:
        resumed = f" (resumed after line {f.resumed_after_line:,})" if f.resumed_after_line else ""
        rejected = f", rejected {f.rejected:,}: see {f.rejects_path}" if f.rejected else ", rejected 0"
        print(f"{f.path}{resumed}: read {f.read:,}, delivered {f.delivered:,}{rejected}", file=sys.stderr)
    rows = sum(f.read for f in report.files)
    print(
        f"cdpmp import: {rows:,} rows in {report.elapsed:.1f} s ({rows / max(report.elapsed, 1e-9):,.0f} rows/s), "
        f"{report.requests:,} requests",
        file=sys.stderr,
    )
    if report.interrupted:
        print("cdpmp import: interrupted; run the same command to resume", file=sys.stderr)
        return INTERRUPTED
    if report.failure:
        print(f"cdpmp import: stopped: {report.failure}; run the same command to resume", file=sys.stderr)
        return 1
    return 0 if report.ok else 1
