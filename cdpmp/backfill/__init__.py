"""Backfills: stream files of historical events into Customer.io, resumable after a crash.

``cdpmp import FILE ...`` (:mod:`cdpmp.backfill._command`) and :func:`import_files`
(the same, from Python). A file is JSON Lines (one Pipelines message per line) or CSV
(``.csv``; the column convention is in :mod:`cdpmp.backfill._rows`), gzip-compressed
when its name ends in ``.gz``, or ``-`` for stdin. Each row is sent once under a stable
``messageId``; a checkpoint beside the file records how far rows are acknowledged, so
the same command after a crash, a SIGKILL or a Ctrl-C resumes there (at most the
batches in flight at the crash are sent again, with the same ids, which the API
deduplicates). Rows that cannot be sent are written to a rejects file with their line
number and the reason; the run goes on.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import IO, List, Optional, Sequence

from .._options import resolve
from ._journal import CheckpointMismatch, Journal
from ._progress import Progress, count_rows
from ._rows import check
from ._run import Sender, batches

__all__ = ["CheckpointMismatch", "FileReport", "Report", "import_files"]

#: Requests per second by default: 2,700 per 3 s in bursts of 90, under the API's 3,000.
DEFAULT_RATE = 900.0


@dataclasses.dataclass
class FileReport:
    """One file's outcome. ``delivered``/``rejected`` count every attempt of the file
    (a resumed run adds to what its checkpoint held); ``read`` counts this run's rows."""

    path: str
    read: int = 0
    delivered: int = 0
    rejected: int = 0
    resumed_after_line: int = 0
    rejects_path: Optional[str] = None  # None when nothing was rejected
    checkpoint_path: Optional[str] = None


@dataclasses.dataclass
class Report:
    """What :func:`import_files` did; ``ok`` when every row was delivered."""

    files: List[FileReport]
    elapsed: float = 0.0
    requests: int = 0
    failure: Optional[str] = None  # why the run stopped early (the endpoint, the key)
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return self.failure is None and not self.interrupted and all(f.rejected == 0 for f in self.files)


def _paths_beside(path: str, suffix: str, given: Optional[str]) -> Optional[str]:
    if given is not None:
        return given
    if path == "-":
        return None if suffix == ".cdpmp-checkpoint" else os.path.abspath("stdin.rejects.jsonl")
    return path + suffix


def import_files(
    paths: Sequence[str],
    write_key: Optional[str] = None,
    endpoint: Optional[str] = None,
    *,
    checkpoint: Optional[str] = None,
    rejects: Optional[str] = None,
    restart: bool = False,
    rate: float = DEFAULT_RATE,
    in_flight: int = 4,
    retry_budget: float = 300.0,
    timeout: Optional[float] = None,
    progress: Optional[IO[str]] = None,
    bar: Optional[bool] = None,
) -> Report:
    """Send every row of ``paths`` (see the module docstring); never raises for a
    row or an answer: the report says what happened. ``write_key``/``endpoint``
    default to ``CDP_WRITE_KEY``/``CDP_ENDPOINT``. ``checkpoint``/``rejects``: paths
    for a single file (default: beside it, ``FILE.cdpmp-checkpoint`` and
    ``FILE.rejects.jsonl``). ``rate``: requests per second at most. ``in_flight``:
    requests at once. ``retry_budget``: seconds a batch is retried before the run
    stops (resumable). ``progress``: a stream for progress lines (a bar on a terminal).
    Raises ``ValueError`` for arguments it cannot use, ``CheckpointMismatch`` (one)
    for a checkpoint of another file, ``OSError`` for a file it cannot read."""
    if not paths:
        raise ValueError("paths: give at least one file (or '-' for stdin)")
    if len(paths) > 1 and (checkpoint or rejects):
        raise ValueError("checkpoint/rejects: only with a single file (default: beside each file)")
    if not rate > 0 or rate == float("inf"):
        raise ValueError(f"rate: must be a finite number of requests per second above 0, got {rate!r}")
    if not 1 <= in_flight <= 64:
        raise ValueError(f"in_flight: must be 1 to 64, got {in_flight!r}")
    for path in paths:
        if path != "-" and not os.path.isfile(path):
            raise FileNotFoundError(f"no such file: {path}")
        check(path)
    settings = resolve(
        {"write_key": write_key, "endpoint": endpoint, "retry_budget": retry_budget, "timeout": timeout}
    )
    started = time.monotonic()
    report = Report([])
    for path in paths:
        file_report = FileReport(path, checkpoint_path=_paths_beside(path, ".cdpmp-checkpoint", checkpoint))
        report.files.append(file_report)
        rejects_path = _paths_beside(path, ".rejects.jsonl", rejects)
        assert rejects_path is not None
        journal = Journal(path, file_report.checkpoint_path, rejects_path, restart)
        file_report.resumed_after_line = journal.line
        _one_file(path, journal, settings.timeout, Sender(settings, journal, rate, in_flight), file_report, report,
                  Progress(progress, count_rows(path) if progress else None, os.path.basename(path), bar))  # fmt: skip
        file_report.delivered, file_report.rejected = journal.delivered, journal.rejected
        file_report.rejects_path = rejects_path if journal.rejected else None
        if report.failure or report.interrupted:
            break
    report.elapsed = time.monotonic() - started
    return report


def _one_file(
    path: str, journal: Journal, timeout: float, sender: Sender, file_report: FileReport, report: Report,
    progress: Progress,
) -> None:  # fmt: skip
    def tick() -> None:
        progress.update(journal.delivered + journal.rejected, journal.rejected)

    try:
        for batch in batches(path, journal.line):
            file_report.read += len(batch.items) + len(batch.refused)
            if not sender.put(batch, tick):
                break
            tick()
        sender.close(grace=(sender.transport.policy.budget or 0.0) + 2 * timeout)
    except KeyboardInterrupt:
        report.interrupted = True
        sender.close(grace=timeout, finish=False)
    except BaseException:
        sender.close(grace=timeout, finish=False)
        raise
    finally:
        journal.close()
        tick()
        progress.close()
        report.requests += sender.requests
        if sender.failure and not report.interrupted:
            report.failure = sender.failure
