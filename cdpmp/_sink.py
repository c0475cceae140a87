"""The ``Sink`` seam and the sync sink.

A sink receives messages that the client has already validated and serialised, and
owns delivering them. Every mode implements the same protocol and passes the same
behavioural test suite: ``DirectSink`` (:mod:`cdpmp._direct`, the default),
``SharedSink`` (:mod:`cdpmp.shared.sink`) and ``SyncSink`` (here: ``sync_mode``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Protocol

from ._options import Settings
from ._outcome import HostStats, Ledger
from .errors import DeliveryError

if TYPE_CHECKING:
    from ._transport import Transport


class Sink(Protocol):
    """What a client needs from a delivery mode."""

    mode: str  # "direct", "shared" or "sync", as reported by stats()

    def put(self, data: bytes, pid: int) -> Optional[DeliveryError]:
        """Accept one serialised message (None), or say why not: the client then
        accounts for it through its ledger, the one place that does."""

    def flush(self, timeout: float) -> bool:
        """Deliver everything accepted so far; False if the deadline passed first."""

    def shutdown(self, timeout: float) -> bool:
        """Flush within ``timeout`` and stop background work; False if not drained."""

    def reset_after_fork(self) -> None:
        """Forget every resource inherited from the parent process."""

    def retire(self) -> None:
        """Deliver what is held, then release threads and sockets; never waits."""

    def retired(self) -> bool:
        """True once a retired sink holds nothing and runs nothing."""

    def stop_threads(self, deadline: float) -> bool:
        """End the threads this mode runs in this process by ``deadline`` (monotonic),
        after sending what only they would send; what could not be sent in time stays
        queued. They start again on demand. True when none is left."""

    def depth(self) -> int:
        """Messages accepted but not yet delivered or failed."""

    def host(self) -> Optional[HostStats]:
        """Host-wide counters (shared mode), else None."""


class SyncSink:
    """``sync_mode``: each message is sent inline, with the same retry policy."""

    mode = "sync"

    def __init__(self, settings: Settings, ledger: Ledger) -> None:
        from ._transport import Transport  # urllib3 (and ssl) only once something sends

        self.transport: Transport = Transport(settings)
        self._ledger = ledger

    def put(self, data: bytes, pid: int) -> Optional[DeliveryError]:
        with self._ledger.lock:
            self._ledger.queued += 1
        attempt = self.transport.send([data])
        self._ledger.attempts(attempt.requests, attempt.retries)
        if attempt.error is None:
            self._ledger.delivered(1)
        return attempt.error

    def flush(self, timeout: float) -> bool:
        return True

    def shutdown(self, timeout: float) -> bool:
        return True

    def reset_after_fork(self) -> None:
        pass  # the transport re-creates its session per pid by itself

    def retire(self) -> None:
        self.transport.close()

    def retired(self) -> bool:
        return True

    def stop_threads(self, deadline: float) -> bool:
        return True  # sends on the caller's thread

    def depth(self) -> int:
        return 0

    def host(self) -> Optional[HostStats]:
        return None
