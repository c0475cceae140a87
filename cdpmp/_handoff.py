"""Delivery in a process that runs no sender thread: inline sends, and the hand-off of
a threadless master's events to the host's uploader.

Without threads (uWSGI without ``enable-threads``, a master that forks workers from C)
a direct-mode sink sends on the calling thread, one request at a time
(:func:`drain_inline`). A uWSGI master that loads the app (no ``lazy-apps``) must never start a thread (workers
are forked from C: a live thread leaves them unable to exit), so it sends what it tracks
inline, within a short boot budget (:meth:`cdpmp._process.ProcessState.inline_deadline`).
When the endpoint is down or slow at that moment, the events cannot wait in the master:
after boot it runs no Python again, not even at exit (measured: an event held there
never arrived, and no line was logged). So they are put into the host's shared-mode
ring, whose uploader — a separate process, started if none runs — delivers them with
the usual holding and retries. The settings travel the shared-mode way (the 0600
sources file), never argv. If shared mode cannot work here (no usable runtime
directory), the events stay with the master, which keeps trying at each later call.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, List

from ._options import Settings
from ._outcome import Ledger
from ._process import PROCESS

if TYPE_CHECKING:
    from ._direct import DirectSink

logger = logging.getLogger("cdpmp")


def send_later(settings: Settings, ledger: Ledger, items: List[bytes]) -> bool:
    """Put ``items`` into the host's ring for its uploader; False if shared mode is
    unavailable (nothing was taken). Refusals (a full host) are counted as losses."""
    from .shared.sink import make_shared_sink

    sink = make_shared_sink(settings, ledger)
    if sink is None:
        return False
    queued = ledger.queued  # already counted when they were tracked
    try:
        for data in items:
            refusal = sink.put(data, os.getpid())
            if refusal is not None:
                ledger.lost(refusal, [data])
    finally:
        ledger.queued = queued
        sink.retire()
    logger.info(
        "cdpmp: %d event(s) the master could not send at boot handed to the host's uploader", len(items)
    )
    return True


def drain_inline(sink: DirectSink, deadline: float, hold_back: bool) -> bool:
    """Send ``sink``'s batches on the calling thread, one request at a time, until it
    is empty (True) or the deadline. ``hold_back``: return at once while backed off (a
    request must not sleep)."""
    while True:
        now = time.monotonic()
        with sink._lock:
            if not sink._queue and not sink._held:
                return sink._in_flight == 0
            pause = sink._lane.wait(now)
            job = None if pause or now >= deadline else sink._next_job_locked(now, force=True)
        if job is not None:
            sink._run_job(job, deadline)
            continue
        if hold_back or now + pause >= deadline:
            return False
        time.sleep(pause)


def hand_off(sink: DirectSink) -> None:
    """A master running no Python after boot gives what it holds to the host's
    uploader (elsewhere the batch stays held: no lock is taken on this failing path)."""
    if not PROCESS.threadless_here():
        return
    with sink._lock:
        items = sink._take_everything_locked()
    if items and not send_later(sink._settings, sink._ledger, items):
        with sink._lock:  # shared mode unavailable: keep them, try at the next call
            sink._queue.extend(items)
            sink._queued_bytes += sum(len(m) + 1 for m in items)
            sink._bytes += sum(len(m) for m in items)
