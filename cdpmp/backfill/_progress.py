"""What a person watching a backfill sees: a tqdm bar on a terminal (rows done of the
total when it is known, rows/s, ETA, rejected so far), one line every few seconds
elsewhere (a log file, CI), whichever the stream is.

tqdm is an optional extra (``pip install 'cdpmp[progress]'``): without it a terminal
gets the periodic line too, so the command never needs it to run.
"""

from __future__ import annotations

import time
from typing import IO, Any, Optional

#: Seconds between progress lines off a terminal.
LINE_EVERY = 5.0


def count_rows(path: str) -> Optional[int]:
    """Lines of a plain file (one pass, no parsing); None where the size is unknown
    (stdin, gzip: counting would mean decompressing it twice)."""
    if path == "-" or path.endswith(".gz"):
        return None
    lines = 0
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            lines += chunk.count(b"\n")
    return lines


class Progress:
    def __init__(
        self, stream: Optional[IO[str]], total: Optional[int], label: str, bar: Optional[bool] = None
    ) -> None:
        self._stream = stream
        self._total = total
        self._label = label
        self._started = time.monotonic()
        self._printed = self._started
        self._bar: Any = None
        if stream is not None and (bar if bar is not None else _isatty(stream)):
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self._bar = tqdm(
                    total=total, unit=" rows", desc=label, file=stream, dynamic_ncols=True, smoothing=0.1
                )

    def update(self, done: int, rejected: int) -> None:
        if self._bar is not None:
            self._bar.update(done - self._bar.n)
            if rejected:
                self._bar.set_postfix(rejected=rejected, refresh=False)
            return
        now = time.monotonic()
        if self._stream is not None and now - self._printed >= LINE_EVERY:
            self._printed = now
            self._stream.write(self.line(done, rejected) + "\n")
            self._stream.flush()

    def line(self, done: int, rejected: int) -> str:
        elapsed = max(1e-9, time.monotonic() - self._started)
        rate = done / elapsed
        of = f" / {self._total:,}" if self._total else ""
        eta = ""
        if self._total and rate > 0:
            eta = f", ETA {max(0.0, (self._total - done) / rate):.0f} s"
        return (
            f"cdpmp import: {self._label}: {done:,}{of} rows, {rate:,.0f} rows/s{eta}, {rejected:,} rejected"
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
