"""What a backfill has finished, written so that a crash at any instant can resume.

Batches finish out of order (several are in flight); the journal keeps them until the
ones before have finished too, then writes, in line order: the rows refused (to the
rejects file, one JSON object per line: ``line``, ``messageId``, ``reason``, ``row``)
and the checkpoint, the last line up to which every row is acknowledged or refused.

Order of writes, and why a resume is exact: the rejects file is flushed and fsynced
first, then the checkpoint is replaced atomically (a temporary file renamed over it)
recording the rejects file's length at that moment. A resume truncates the rejects file
to that length, so the rows it reads again (those after the checkpoint: at most the
batches in flight at the crash) are neither lost from it nor written to it twice.
A checkpoint names its file by a fingerprint (the first 64 KiB), so a checkpoint
left beside a file that was since replaced is refused rather than skipping rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from ._rows import open_binary

#: Seconds between checkpoint writes at most (and at the end, always).
CHECKPOINT_EVERY = 0.5


class CheckpointMismatch(ValueError):
    """The checkpoint belongs to another file (or another version of this one)."""


class Rejected(NamedTuple):
    line: int
    message_id: Optional[str]
    reason: str
    text: str


def fingerprint(path: str) -> Optional[str]:
    """sha256 of the first 64 KiB (decompressed); None for stdin."""
    if path == "-":
        return None
    with open_binary(path) as stream:
        return hashlib.sha256(stream.read(64 * 1024)).hexdigest()


def _write_private(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class Journal:
    """The ordered record of one file's import (thread-safe: senders call ``done``)."""

    def __init__(self, source: str, checkpoint: Optional[str], rejects: str, restart: bool) -> None:
        self.source = source
        self.checkpoint_path = checkpoint
        self.rejects_path = rejects
        self._print = fingerprint(source)
        self._lock = threading.Lock()
        self._finished: Dict[
            int, Tuple[int, int, List[Rejected]]
        ] = {}  # seq -> (last line, delivered, refused)
        self._next = 0
        self.line = 0  # every row up to this line is acknowledged or refused
        self.delivered = 0
        self.rejected = 0
        self._written_at = 0.0
        saved = None if restart else self._load()
        if saved is not None:
            self.line, self.delivered, self.rejected = saved["line"], saved["delivered"], saved["rejected"]
        self._rejects = os.fdopen(os.open(rejects, os.O_RDWR | os.O_CREAT, 0o600), "r+b")
        # Resumed: what the checkpoint covers; else a fresh file (an old one is replaced).
        self._rejects.truncate(saved["rejects_bytes"] if saved is not None else 0)
        self._rejects.seek(0, os.SEEK_END)
        self._closed = False

    def _load(self) -> Optional[Dict[str, Any]]:
        if self.checkpoint_path is None or not os.path.exists(self.checkpoint_path):
            return None
        with open(self.checkpoint_path, encoding="utf-8") as fh:
            saved: Dict[str, Any] = json.load(fh)
        if saved.get("fingerprint") != self._print:
            raise CheckpointMismatch(
                f"the checkpoint {self.checkpoint_path} is for another file or another version of "
                f"{self.source}: give --restart to start from the first row"
            )
        return saved

    def done(self, seq: int, last_line: int, delivered: int, refused: List[Rejected]) -> None:
        """Batch ``seq`` (numbered from 0 in file order, covering the lines up to
        ``last_line``) has finished: ``delivered`` rows acknowledged, ``refused`` not."""
        with self._lock:
            if self._closed:  # a sender outlived the run's end: its batch stays unacknowledged
                return
            self._finished[seq] = (last_line, delivered, refused)
            advanced = False
            while self._next in self._finished:
                line, count, rows = self._finished.pop(self._next)
                self._next += 1
                self.line, self.delivered = line, self.delivered + count
                for row in sorted(rows):
                    entry = {
                        "line": row.line,
                        "messageId": row.message_id,
                        "reason": row.reason,
                        "row": row.text,
                    }
                    self._rejects.write(json.dumps(entry).encode() + b"\n")
                self.rejected += len(rows)
                advanced = True
            if advanced and time.monotonic() - self._written_at >= CHECKPOINT_EVERY:
                self._save()

    def _save(self) -> None:
        self._rejects.flush()
        os.fsync(self._rejects.fileno())
        self._written_at = time.monotonic()
        if self.checkpoint_path is None:
            return
        state = {
            "file": os.path.abspath(self.source) if self.source != "-" else "-",
            "fingerprint": self._print,
            "line": self.line,
            "delivered": self.delivered,
            "rejected": self.rejected,
            "rejects_bytes": self._rejects.tell(),
        }
        _write_private(self.checkpoint_path, json.dumps(state).encode())

    def close(self) -> None:
        """Write what is final and release the rejects file (empty: removed)."""
        with self._lock:
            self._closed = True
            self._save()
            empty = self._rejects.tell() == 0
            self._rejects.close()
        if empty:
            os.unlink(self.rejects_path)
