"""The ``Sink`` seam and the in-process sinks (direct and sync).

A sink receives messages that the client has already validated and serialised, and
owns delivering them. Every mode implements the same protocol and passes the same
behavioural test suite.

``DirectSink`` is the engine behind the default mode: a bounded in-process queue and
ONE daemon consumer thread, started on the first ``put`` in a process (never at import
or construction, so a pre-fork master that never tracks stays thread-free). All its
state is stamped with the pid that built it; ``put``/``flush`` compare the stamp
(≈0.1 µs) and rebuild everything in a child, including after a C-level ``fork()``
that ran no Python hook (uWSGI). The child DROPS what it inherited: the parent still
owns and sends those messages, so sending them again would duplicate them.

The consumer sleeps until ``upload_interval`` seconds after the first waiting message,
or until a batch fills (by count or by the 500 KB request limit), or a flush or
shutdown asks. Producers only wake it on those transitions, never per message.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from typing import Deque, List, Optional, Protocol

from ._options import Settings
from ._outcome import HostStats, Ledger, internal_error
from ._process import PROCESS
from ._transport import ENVELOPE_BYTES, MAX_BATCH_BYTES, Transport, send_splitting
from .errors import DeliveryError, MessageRejected, ShutdownAbandoned

_IDLE_WAIT = 5.0  # seconds an idle consumer sleeps before re-checking (safety net only)
_BATCH_ROOM = MAX_BATCH_BYTES - ENVELOPE_BYTES


class Sink(Protocol):
    """What a client needs from a delivery mode."""

    mode: str  # "direct", "shared" or "sync", as reported by stats()

    def put(self, data: bytes) -> Optional[DeliveryError]:
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

    def depth(self) -> int:
        """Messages accepted but not yet delivered or failed."""

    def host(self) -> Optional[HostStats]:
        """Host-wide counters (shared mode), else None."""


class SyncSink:
    """``sync_mode``: each message is sent inline, with the same retry policy."""

    mode = "sync"

    def __init__(self, settings: Settings, ledger: Ledger) -> None:
        self.transport = Transport(settings)
        self._ledger = ledger

    def put(self, data: bytes) -> Optional[DeliveryError]:
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

    def depth(self) -> int:
        return 0

    def host(self) -> Optional[HostStats]:
        return None


class DirectSink:
    """Bounded queue + lazily started consumer thread, per process."""

    mode = "direct"

    def __init__(self, settings: Settings, ledger: Ledger) -> None:
        self._settings = settings
        self._ledger = ledger
        self.transport = Transport(settings)
        self._init_process_state()

    def _init_process_state(self) -> None:
        # Fresh objects only: a lock inherited mid-acquire would deadlock the child.
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._abort = threading.Event()
        self._queue: Deque[bytes] = collections.deque()
        self._queued_bytes = 0
        self._in_flight = 0
        self._first_at = 0.0
        self._urgent = False
        self._stopping = False
        self._retiring = False  # replaced: a consumer started now exits once idle
        self._thread: Optional[threading.Thread] = None

    def reset_after_fork(self) -> None:
        if self._pid == os.getpid():
            return
        inherited = len(self._queue)
        self._init_process_state()
        self._ledger.reset()  # the child's stats describe the child
        self._ledger.inherited_discarded = inherited

    def depth(self) -> int:
        return len(self._queue) + self._in_flight

    def host(self) -> Optional[HostStats]:
        return None

    # -- producer side -------------------------------------------------------------

    def put(self, data: bytes) -> Optional[DeliveryError]:
        if self._pid != os.getpid():
            self.reset_after_fork()
        settings = self._settings
        with self._lock:
            n = len(self._queue)
            if n >= settings.max_queue_size:
                full = True
            else:
                full = False
                # A compact copy: orjson's result keeps a ≈4 KiB buffer, measured 4.1 KB
                # of RSS per queued event instead of 0.3 KB.
                self._queue.append(bytes(memoryview(data)))
                self._queued_bytes += len(data) + 1
                self._ledger.queued += 1
                if n == 0:
                    self._first_at = time.monotonic()
                due = n + 1 >= settings.upload_size or self._queued_bytes >= _BATCH_ROOM
                wake = n == 0 or due
                if self._thread is None:
                    self._start_locked()
                inline = self._thread is None and (
                    due
                    or PROCESS.threadless_here()
                    or time.monotonic() - self._first_at >= settings.upload_interval
                )
        if full:
            return MessageRejected("queue_full", f"the queue holds {n} messages")
        if inline:  # no consumer thread can run here: send the due batch ourselves
            self._drain_inline(time.monotonic() + settings.timeout)
        elif wake:
            self._wake.set()
        return None

    def _start_locked(self) -> None:
        PROCESS.ensure_exit_hook()  # also without a thread: exit then drains inline
        if not PROCESS.may_start_thread():
            return
        self._stopping = self._retiring
        self._abort = threading.Event()
        thread = threading.Thread(target=self._run, name="cdpmp-consumer", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # interpreter shutting down: flush() drains inline instead
            self._thread = None
            return
        self._thread = thread

    # -- consumer side -------------------------------------------------------------

    def _run(self) -> None:
        while not self._abort.is_set():
            try:
                if not self._step():
                    break
            except Exception as exc:  # noqa: BLE001 - the consumer must outlive any bug
                internal_error("the direct-mode consumer", exc)
                self._abort.wait(0.1)
        self.transport.close()  # a retired or stopped consumer keeps no socket

    def _step(self) -> bool:
        """One turn of the consumer; False when it should stop."""
        self._wake.clear()
        with self._lock:
            n = len(self._queue)
            urgent = self._urgent or self._stopping
            first_at = self._first_at
            if n == 0 and self._stopping:
                self._thread = None
                return False
        if n == 0:
            self._wake.wait(_IDLE_WAIT)
            return True
        if not urgent and n < self._settings.upload_size and self._queued_bytes < _BATCH_ROOM:
            remaining = first_at + self._settings.upload_interval - time.monotonic()
            if remaining > 0:
                self._wake.wait(remaining)
                return True
        self._send(self._take(), None)
        return True

    def _take(self) -> List[bytes]:
        batch: List[bytes] = []
        size = 0
        with self._lock:
            queue = self._queue
            while queue and len(batch) < self._settings.upload_size:
                item_size = len(queue[0]) + 1
                if batch and size + item_size > _BATCH_ROOM:
                    break
                batch.append(queue.popleft())
                size += item_size
            self._queued_bytes -= size
            self._in_flight += len(batch)
            if queue:
                self._first_at = time.monotonic() - self._settings.upload_interval
        return batch

    def _send(self, batch: List[bytes], deadline: Optional[float]) -> None:
        """Deliver one batch (split when the endpoint refuses its content) and account
        for every message in it, whatever happens."""
        settled = 0
        try:
            parts = send_splitting(lambda part: self.transport.send(part, self._abort, deadline), batch)
            for part, attempt in parts:
                self._ledger.attempts(attempt.requests, attempt.retries)
                if attempt.error is None:
                    self._ledger.delivered(len(part))
                else:
                    self._ledger.lost(attempt.error, list(part))
                settled += len(part)
        except Exception as exc:  # noqa: BLE001 - a bug must not kill the consumer or wedge depth()
            self._ledger.lost(internal_error("the direct-mode consumer", exc), list(batch[settled:]))
        finally:
            with self._lock:
                self._in_flight -= len(batch)
                if not self._queue and self._in_flight == 0:
                    self._urgent = False
                    self._idle.notify_all()

    # -- flush / shutdown ----------------------------------------------------------
    # Every wait below is bounded by the caller's deadline, lock acquisition included:
    # flush() may run in a signal handler that interrupted this same thread inside
    # put(), holding the (non-reentrant) lock; it then answers False at its deadline.

    def flush(self, timeout: float) -> bool:
        if self._pid != os.getpid():
            self.reset_after_fork()
        deadline = time.monotonic() + timeout
        if not self._lock.acquire(timeout=max(0.0, timeout)):
            return False
        try:
            if not self._queue and self._in_flight == 0:
                return True
            self._urgent = True
            thread = self._thread
            if thread is None or not thread.is_alive():
                self._start_locked()
                thread = self._thread
        finally:
            self._lock.release()
        if thread is None:
            return self._drain_inline(deadline)
        self._wake.set()
        if not self._idle.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return False
        try:
            while self._queue or self._in_flight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        finally:
            self._idle.release()
        return True

    def _drain_inline(self, deadline: float) -> bool:
        """Send from the calling thread (no consumer could be started)."""
        while self._queue and time.monotonic() < deadline:
            self._send(self._take(), deadline)
        return not self._queue

    def retire(self) -> None:
        """Send what is queued soon, then let the consumer exit and close its socket
        (a client replaced by new module settings). Never waits."""
        if self._pid != os.getpid():
            return
        with self._lock:
            self._urgent = self._stopping = self._retiring = True
        self._wake.set()

    def retired(self) -> bool:
        """True once a retired sink holds nothing and runs no thread."""
        return self._retiring and self._thread is None and not self._queue and self._in_flight == 0

    def shutdown(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        drained = self.flush(timeout)
        if not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return False
        try:
            self._stopping = True
            thread = self._thread
            if not drained:
                self._abort.set()  # cut retries short: the deadline is spent
        finally:
            self._lock.release()
        self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()) + 0.1)
        with self._lock:
            leftover = list(self._queue)
            self._queue.clear()
            self._queued_bytes = 0
            self._thread = None
        if leftover:
            error = ShutdownAbandoned(f"{len(leftover)} message(s) unsent at the deadline")
            self._ledger.lost(error, list(leftover))
        return drained
