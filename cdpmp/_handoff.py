"""Hand-off of a threadless master's events to the host's uploader.

A uWSGI master that loads the app (no ``lazy-apps``) must never start a thread (workers
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
from typing import List

from ._options import Settings
from ._outcome import Ledger

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
            refusal = sink.put(data)
            if refusal is not None:
                ledger.lost(refusal, [data])
    finally:
        ledger.queued = queued
        sink.retire()
    logger.info(
        "cdpmp: %d event(s) the master could not send at boot handed to the host's uploader", len(items)
    )
    return True
