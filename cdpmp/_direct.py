"""Direct mode, the default (a :class:`cdpmp._sink.Sink`): a bounded in-process queue and
ONE daemon consumer thread, started on the first ``put`` in a process (never at import
or construction: a master that never tracks stays thread-free). State is stamped with
its pid; ``put``/``flush`` compare it (≈0.1 µs) and rebuild in a child, also after a C
``fork()`` that ran no Python hook (uWSGI). The child DROPS what it inherited: the
parent owns and sends those messages.

The consumer sleeps until ``upload_interval`` after the first waiting message, a full
batch (count or 500 KB), or a flush; producers wake it on those transitions only.

Delivery goes through the engine (:mod:`cdpmp._engine`): one request at a time, sent by
the consumer, until a backlog grows the lane onto sender threads (up to
``max_in_flight``). A batch answered with a retryable error is HELD (counted against
``max_queue_size``) and probed with backoff; it is given up only at a final answer,
the exit deadline, or a user-set ``max_retries`` / ``retry_budget``.
"""

from __future__ import annotations

import collections
import functools
import os
import threading
import time
from typing import Callable, Deque, List, Optional, Set

from ._engine import Held, Lane, Outcome, Workers, deliver, partition, take_batch
from ._handoff import send_later
from ._options import Settings
from ._outcome import HostStats, Ledger, internal_error
from ._process import PROCESS
from ._transport import ENVELOPE_BYTES, MAX_BATCH_BYTES, Attempt, Transport
from .errors import DeliveryError, MessageRejected, ShutdownAbandoned

_IDLE_WAIT = 5.0  # seconds an idle consumer sleeps before re-checking (safety net only)
_BATCH_ROOM = MAX_BATCH_BYTES - ENVELOPE_BYTES


class DirectSink:
    """Bounded queue + lazily started consumer thread, per process."""

    mode = "direct"
    host: Callable[[], Optional[HostStats]] = staticmethod(lambda: None)  # no host-wide view

    def __init__(self, settings: Settings, ledger: Ledger) -> None:
        self._settings = settings
        self._ledger = ledger
        self.transport = Transport(settings)
        self._init_process_state()

    def _init_process_state(self) -> None:  # fresh locks: never one inherited mid-acquire
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._clear()

    def _clear(self) -> None:
        self._queue: Deque[bytes] = collections.deque()
        self._queued_bytes = 0
        self._held: Deque[Held] = collections.deque()  # retryable failures, oldest first
        self._held_count = 0
        self._flying: Set[Held] = set()  # batches whose request is in progress
        self._in_flight = 0
        self._lane = Lane(self._settings.max_in_flight)
        self._workers: Optional[Workers] = None
        self._first_at = 0.0  # when the oldest queued message arrived (about)
        self._leftover = False  # the queue holds the rest of a batch just taken
        self._urgent = False
        self._stopping = False
        self._retiring = False  # replaced: a consumer started now exits once idle
        self._thread: Optional[threading.Thread] = None

    def reset_after_fork(self) -> None:
        """Forget what the parent owns; build nothing: locks are made at first use
        (:meth:`_here`), after a gevent worker patched ``threading`` (a real lock held
        across a greenlet switch blocks the worker: ``--preload`` boot-looped)."""
        if self._pid in (0, os.getpid()):
            return
        inherited = len(self._queue) + self._held_count
        self._pid = 0  # neither the parent's state nor ours yet
        self._clear()
        self._ledger.reset()  # the child's stats describe the child
        self._ledger.inherited_discarded = inherited

    def _here(self) -> None:
        """Build this process's state once (the threads of a new worker race here)."""
        with PROCESS.build_lock():
            if self._pid != os.getpid():
                self.reset_after_fork()
                self._init_process_state()

    def depth(self) -> int:
        return len(self._queue) + self._held_count + self._in_flight

    def _empty_locked(self) -> bool:
        return not self._queue and not self._held and self._in_flight == 0

    def put(self, data: bytes) -> Optional[DeliveryError]:
        if self._pid != os.getpid():
            self._here()  # first call in this process
        settings = self._settings
        start: Optional[threading.Thread] = None
        with self._lock:
            n = len(self._queue)
            if n + self._held_count >= settings.max_queue_size:
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
                    self._leftover = False
                due = n + 1 >= settings.upload_size or self._queued_bytes >= _BATCH_ROOM
                wake = n == 0 or due
                if self._thread is None:
                    start = self._claim_thread_locked()
                inline = self._thread is None and (
                    due
                    or PROCESS.threadless_here()
                    or time.monotonic() - self._first_at >= settings.upload_interval
                )
        if start is not None:
            self._launch(start)
        if full:
            held = self._held_count
            return MessageRejected(
                "queue_full", f"the queue holds {n + held} messages ({held} kept for retrying)"
            )
        if inline and not self._drain_inline(PROCESS.inline_deadline(settings.timeout), True):
            self._hand_off()  # no consumer can run here, and the due batch failed
        elif wake:
            self._wake.set()
        return None

    def _claim_thread_locked(self) -> Optional[threading.Thread]:
        """The consumer, claimed here and started after the lock is released (under
        gevent ``start()`` switches to it, and it would wait for our lock)."""
        PROCESS.ensure_exit_hook()  # also without a thread: exit then drains inline
        if not PROCESS.may_start_thread():
            return None
        self._stopping = self._retiring
        self._thread = threading.Thread(target=self._run, name="cdpmp-consumer", daemon=True)
        return self._thread

    def _stop_threads_locked(self) -> None:
        self._thread, workers, self._workers = None, self._workers, None
        if workers is not None:
            workers.close()

    def _launch(self, thread: threading.Thread) -> None:
        try:
            thread.start()
        except RuntimeError:  # interpreter shutting down: flush() drains inline instead
            with self._lock:
                if self._thread is thread:
                    self._thread = None

    def _run(self) -> None:
        while True:
            try:
                if not self._step():
                    break
            except Exception as exc:  # noqa: BLE001 - the consumer must outlive any bug
                internal_error("the direct-mode consumer", exc)
                self._wake.wait(0.1)
        self.transport.close()  # a retired or stopped consumer keeps no socket

    def _step(self) -> bool:
        """One turn of the consumer: start what the lane allows; False to stop."""
        self._wake.clear()
        now = time.monotonic()
        with self._lock:
            if self._stopping and self._empty_locked():
                self._stop_threads_locked()
                return False
            jobs = []
            while self._lane.slots(now) > 0:
                job = self._next_job_locked(now, force=False)
                if job is None:
                    break
                jobs.append(job)
            serial = self._lane.limit == 1 and self._lane.in_flight == 1 and len(jobs) == 1
            if jobs and not serial and self._workers is None:
                self._workers = Workers(self._settings.max_in_flight, "cdpmp-sender")
            workers = self._workers
            wait = self._next_wake_locked(now)
        for job in jobs:
            if serial or workers is None or not workers.submit(functools.partial(self._run_job, job, None)):
                self._run_job(job, None)
        if not jobs:
            self._wake.wait(wait)
        return True

    def _next_job_locked(self, now: float, force: bool) -> Optional[Held]:
        """The next batch to send (held ones first), counted as in flight; None when
        nothing is due (``force``: anything queued is due)."""
        if self._held:
            job = self._held.popleft()
            self._held_count -= len(job.items)
        elif self._queue and (force or self._urgent or self._stopping or self._due_locked(now)):
            job = Held(self._take_locked(), 0, 0.0)
        else:
            return None
        self._in_flight += len(job.items)
        self._flying.add(job)
        self._lane.started()
        return job

    def _due_locked(self, now: float) -> bool:
        settings = self._settings
        return (
            len(self._queue) >= settings.upload_size
            or self._queued_bytes >= _BATCH_ROOM
            or now - self._first_at >= settings.upload_interval
            # The rest of a batch just taken goes at once when nothing is in flight; while
            # requests are, it waits to fill or for its interval (no extra small requests).
            or (self._leftover and self._lane.in_flight == 0)
        )

    def _next_wake_locked(self, now: float) -> float:
        if not self._queue and not self._held:
            return _IDLE_WAIT
        backoff = self._lane.wait(now)
        if backoff:
            return backoff
        if self._lane.slots(now) == 0 or self._held:
            return _IDLE_WAIT  # a finishing request wakes us
        if self._urgent or self._stopping:
            return 0.0
        return max(0.0, self._first_at + self._settings.upload_interval - now)

    def _take_locked(self) -> List[bytes]:
        batch, size = take_batch(self._queue, self._settings.upload_size, _BATCH_ROOM)
        self._queued_bytes -= size
        self._leftover = bool(self._queue)
        if self._queue:
            self._first_at = time.monotonic()
        return batch

    def _run_job(self, job: Held, deadline: Optional[float]) -> None:
        """Send one batch and account for every message in it, whatever happens."""
        try:
            outcome = deliver(self.transport, list, job.items, deadline)
        except Exception as exc:  # noqa: BLE001 - a bug must not wedge depth() or kill a thread
            outcome = [(job.items, Attempt(internal_error("the direct-mode consumer", exc), 0, 0))]
        self._settle(job, outcome)

    def _settle(self, job: Held, outcome: Outcome) -> None:
        now = time.monotonic()
        with self._lock:
            if job not in self._flying:
                return  # abandoned at a shutdown deadline, and already counted
            self._flying.discard(job)
            delivered, requests, losses, kept, retry = partition(outcome)
            if retry is not None and retry.error is not None:
                pause = self._lane.failed(retry.retry_after)
                for part in reversed(kept):
                    held = Held(part, job.retries + 1, job.first_failed or now)
                    if held.exhausted(self._settings, pause):
                        losses.append((retry.error, part))
                    else:
                        self._held.appendleft(held)
                        self._held_count += len(part)
            elif delivered:
                self._lane.succeeded(backlog=len(self._queue) >= self._settings.upload_size)
            else:
                self._lane.finished()
        self._ledger.attempts(requests, 1 if job.retries else 0)
        if delivered:
            self._ledger.delivered(delivered)
        for error, part in losses:
            self._ledger.lost(error, list(part))
        with self._lock:  # only now: flush() returns after on_error has run
            self._in_flight -= len(job.items)
            if self._empty_locked():
                self._urgent = False
            self._idle.notify_all()
        self._wake.set()

    def flush(self, timeout: float) -> bool:
        """Every wait is bounded by the deadline, lock acquisition included: flush() may
        run in a signal handler that interrupted ``put()`` in this same thread, holding
        the (non-reentrant) lock; it then answers False at its deadline."""
        self._here()
        start: Optional[threading.Thread] = None
        deadline = time.monotonic() + timeout
        if not self._lock.acquire(timeout=max(0.0, timeout)):
            return False
        try:
            if self._empty_locked():
                return True
            self._urgent = True
            thread = self._thread
            if thread is None or (thread.ident is not None and not thread.is_alive()):
                thread = start = self._claim_thread_locked()
        finally:
            self._lock.release()
        if start is not None:
            self._launch(start)
            thread = self._thread
        if thread is None:
            return self._drain_inline(deadline, hold_back=False)
        self._wake.set()
        return self._await(self._empty_locked, deadline)

    def _await(self, done: Callable[[], bool], deadline: float) -> bool:
        """Wait until ``done()`` (checked under the lock) or the deadline."""
        if not self._idle.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return False
        try:
            while not done():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        finally:
            self._idle.release()
        return True

    def _drain_inline(self, deadline: float, hold_back: bool) -> bool:
        """Send on the calling thread (no consumer runs here), one request at a time.
        ``hold_back``: return at once while backed off (a request must not sleep)."""
        while True:
            now = time.monotonic()
            with self._lock:
                if not self._queue and not self._held:
                    return True
                pause = self._lane.wait(now)
                job = None if pause or now >= deadline else self._next_job_locked(now, force=True)
            if job is not None:
                self._run_job(job, deadline)
                continue
            if hold_back or now + pause >= deadline:
                return False
            time.sleep(pause)

    def _hand_off(self) -> None:
        if not PROCESS.threadless_here():  # a master running no Python after boot hands off
            return  # (elsewhere the batch stays held: no lock taken on this failing path)
        with self._lock:
            items = self._take_everything_locked()
        if items and not send_later(self._settings, self._ledger, items):
            with self._lock:  # shared mode unavailable: keep them, try at the next call
                self._queue.extend(items)
                self._queued_bytes += sum(len(m) + 1 for m in items)

    def _take_everything_locked(self) -> List[bytes]:
        """Empty the held batches and the queue; their messages, oldest first."""
        items = [m for held in self._held for m in held.items] + list(self._queue)
        self._queue.clear()
        self._held.clear()
        self._queued_bytes = self._held_count = 0
        return items

    def retire(self) -> None:
        """Send what is queued soon, then let the consumer exit (and close its socket):
        a client replaced by new module settings. Never waits."""
        if self._pid != os.getpid():
            return
        with self._lock:
            self._urgent = self._stopping = self._retiring = True
        self._wake.set()

    def retired(self) -> bool:  # a retired sink that holds nothing and runs no thread
        return self._retiring and self._thread is None and self._empty_locked()

    def shutdown(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        drained = self.flush(timeout)
        if not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return False
        try:
            self._stopping = True
            thread = self._thread
        finally:
            self._lock.release()
        self._wake.set()
        if not drained and self._flying:
            self.transport.cancel()  # requests in progress end at their next socket call
            self._await(lambda: not self._flying, time.monotonic() + 0.5)
        with self._lock:
            leftover = self._take_everything_locked()
            for job in self._flying:  # still in flight: whatever it answers, we are done
                leftover.extend(job.items)
                self._in_flight -= len(job.items)
            self._flying.clear()
            self._stop_threads_locked()
            self._idle.notify_all()
        self._wake.set()  # the consumer finds nothing left and exits
        if thread is not None and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()) + 0.2)
        if leftover:
            error = ShutdownAbandoned(f"{len(leftover)} message(s) unsent at the deadline")
            self._ledger.lost(error, list(leftover))
        return drained
