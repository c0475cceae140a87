"""The import loop: rows into byte-filled batches, batches to a few sender threads,
each request paced under the workspace's rate limit, outcomes to the journal.

Why these shapes:

- **Batches filled by bytes** up to the API's 500 KB, not by a count: a backfill's rows
  are small, and a request's cost is mostly per request (the rate limit counts
  requests, not events).
- **A bounded hand-off** (one batch waiting, one per sender in flight) between the reading thread
  and the senders: memory stays flat whatever the file's size, and the reader waits
  when the endpoint is slower than the file.
- **Pacing per request** with the token bucket the shared-mode uploader uses
  (:class:`cdpmp._lane.RequestRate`); the default, 900 requests/s in bursts of 90,
  keeps any 3-s window under the API's 3,000 whatever the endpoint's speed.
- **Refused rows, not refused runs**: an answer about a message's content (400/413/422,
  strict mode) is narrowed to the refused messages by bisection
  (:func:`cdpmp._transport.send_splitting`) and those rows go to the rejects file.
  Anything else that survives the retries (the key refused, the endpoint down past
  ``retry_budget``) stops the run with its batch unacknowledged: re-running the
  command resumes before it.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Iterator, List, NamedTuple, Optional

from .._lane import RequestRate
from .._options import Settings
from .._transport import ENVELOPE_BYTES, MAX_BATCH_BYTES, Attempt, Transport, send_splitting
from ..errors import APIError
from ._journal import Journal, Rejected
from ._rows import read

#: Statuses about a message's content: its rows are refused, the run goes on.
_REFUSED = frozenset({400, 413, 422})


class Batch(NamedTuple):
    seq: int
    last_line: int
    items: List[tuple[bytes, int, str]]  # (message, line, messageId)
    refused: List[Rejected]


def batches(path: str, skip: int, limit: int = MAX_BATCH_BYTES - ENVELOPE_BYTES) -> Iterator[Batch]:
    """The rows of ``path`` after line ``skip``, grouped into batches of at most
    ``limit`` bytes of messages; refused rows ride with the batch they fall in."""
    items: List[tuple[bytes, int, str]] = []
    refused: List[Rejected] = []
    size, seq, last = 0, 0, skip
    for row in read(path, skip):
        if row.data is None:
            refused.append(Rejected(row.line, row.message_id, row.reason or "refused", row.text))
        else:
            if items and size + len(row.data) + 1 > limit:
                yield Batch(seq, last, items, refused)
                items, refused, size, seq = [], [], 0, seq + 1
            items.append((row.data, row.line, row.message_id or ""))
            size += len(row.data) + 1
        last = row.line
    if items or refused:
        yield Batch(seq, last, items, refused)


class Sender:
    """``in_flight`` threads sending the batches handed to :meth:`put`; they end when
    :meth:`close` is called (or at the first failure that stops the run)."""

    def __init__(self, settings: Settings, journal: Journal, rate: float, in_flight: int) -> None:
        self.transport = Transport(settings)
        self.journal = journal
        self._rate = RequestRate(rate)
        self._rate_lock = threading.Lock()
        self._queue: queue.Queue[Optional[Batch]] = queue.Queue(maxsize=1)
        self.failure: Optional[str] = None
        self.stopping = False  # interrupted: queued batches are left unacknowledged
        self.requests = 0
        self._threads = [
            threading.Thread(target=self._work, name=f"cdpmp-import-{n}", daemon=True)
            for n in range(in_flight)
        ]
        for thread in self._threads:
            thread.start()

    def put(self, batch: Batch, idle: Callable[[], None]) -> bool:
        """Hand ``batch`` over, waiting for room (calling ``idle`` meanwhile); False
        once the run has stopped."""
        while self.failure is None:
            try:
                self._queue.put(batch, timeout=0.2)
                return True
            except queue.Full:
                idle()
        return False

    def _paced(self, items: List[tuple[bytes, int, str]]) -> Attempt:
        while True:
            with self._rate_lock:
                wait = self._rate.wait()
                if wait == 0.0 and self._rate.take():
                    self.requests += 1
                    break
            time.sleep(wait or 0.001)
        attempt = self.transport.send([data for data, _, _ in items])
        with self._rate_lock:
            self.requests += attempt.requests - 1
        return attempt

    def _work(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None or self.failure is not None or self.stopping:
                return
            delivered, refused = 0, list(batch.refused)
            for part, attempt in send_splitting(self._paced, batch.items) if batch.items else []:
                error = attempt.error
                if error is None:
                    delivered += len(part)
                elif isinstance(error, APIError) and error.final and error.status in _REFUSED:
                    refused += [
                        Rejected(line, mid, f"refused by the API: {error}", "") for _, line, mid in part
                    ]
                else:
                    self.failure = self.failure or f"{error} (line {part[0][1]} not acknowledged)"
                    return
            self.journal.done(batch.seq, batch.last_line, delivered, refused)

    def close(self, grace: float, finish: bool = True) -> None:
        """End the senders: with ``finish``, after every queued batch, within ``grace``
        seconds; without, after the requests in progress. Past ``grace`` their requests
        are ended; what was not acknowledged stays so (the journal resumes before it)."""
        self.stopping = not finish
        deadline = time.monotonic() + grace
        for _ in self._threads:
            while True:
                try:
                    self._queue.put(None, timeout=0.1)
                    break
                except queue.Full:
                    if time.monotonic() > deadline:
                        break
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self._threads):
            self.failure = self.failure or "stopped with requests in flight"
            self.transport.cancel()
            for thread in self._threads:
                thread.join(5.0)
        self.transport.close()
