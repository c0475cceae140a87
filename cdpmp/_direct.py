"""Direct mode, the default (a :class:`cdpmp._sink.Sink`): a bounded in-process queue fed
to this process's delivery engine (:mod:`cdpmp._engine`), whose sender threads are
shared by every client of the process and start on the first ``put`` in a process
(never at import or construction: a master that never tracks stays thread-free).
State is stamped with its pid; ``put``/``flush`` compare it (≈0.1 µs) and rebuild in a
child, also after a C ``fork()`` that ran no Python hook (uWSGI). The child DROPS what
it inherited: the parent owns and sends those messages.

The sink is a *feeder*: a sender thread asks it for a job (:meth:`DirectSink.next_job`)
and is told when the next one is due: ``upload_interval`` after the first waiting
message, a full batch (count or 500 KB), a flush, or the end of a backoff. Producers
wake the engine on those transitions only. The lane (:class:`cdpmp._engine.Lane`)
says how many requests may be in flight. A batch answered with a retryable error is
HELD (counted against ``max_queue_size`` and ``max_queue_bytes``) and probed with
backoff; it is given up only at a final answer, the exit deadline, or a user-set
``max_retries`` / ``retry_budget`` (the retry policy's rule, :func:`cdpmp._engine.settle`).
"""

from __future__ import annotations

import collections
import functools
import math
import os
import threading
import time
from typing import Callable, Deque, List, Optional, Set, Tuple

from ._engine import BATCH_ROOM, Held, Lane, backlogged, deliver, due, settle, take_batch
from ._handoff import drain_inline, hand_off
from ._options import Settings
from ._outcome import HostStats, Ledger
from ._process import PROCESS
from ._senders import NOW, engine
from ._transport import Transport
from .errors import DeliveryError, MessageRejected, ShutdownAbandoned


def _size(items: List[bytes]) -> int:
    return sum(map(len, items))


class DirectSink:
    """Bounded queue (count and bytes) fed to the process's engine, per process."""

    mode = "direct"
    host: Callable[[], Optional[HostStats]] = staticmethod(lambda: None)  # no host-wide view

    def __init__(self, settings: Settings, ledger: Ledger) -> None:
        self._settings = settings
        self._ledger = ledger
        self.transport = Transport(settings)
        self.policy = self.transport.policy  # one policy per client, its transport's
        self._init_process_state()

    def _init_process_state(self) -> None:  # fresh locks: never one inherited mid-acquire
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._clear()
        # The pid LAST: a thread that sees it skips _here() and appends to the queue;
        # set first, _clear() above could still replace that queue (an event lost in a
        # gthread worker whose threads raced here).
        self._pid = os.getpid()

    def _clear(self) -> None:
        self._queue: Deque[bytes] = collections.deque()
        self._queued_bytes = 0
        self._bytes = 0  # payload bytes queued, held and in flight (max_queue_bytes)
        self._held: Deque[Held] = collections.deque()  # retryable failures, oldest first
        self._held_count = 0
        self._flying: Set[Held] = set()  # batches whose request is in progress
        self._in_flight = 0
        self._lane = Lane(self._settings.max_in_flight, self.policy)
        self._first_at = 0.0  # when the oldest queued message arrived (about)
        self._widest = 1  # the lane's limit when a request last ended
        self._urgent = False
        self._stopping = False
        self._retiring = False  # replaced: send what is held, then let go

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

    def alive(self) -> bool:
        """A sender thread of this process serves this sink now."""
        return self._pid == os.getpid() and engine().threads > 0 and not self._empty_locked()

    def _empty_locked(self) -> bool:
        return not self._queue and not self._held and self._in_flight == 0

    def put(self, data: bytes, pid: int) -> Optional[DeliveryError]:
        refusal = self._put(data, pid)
        wait = self._settings.block_on_full
        if refusal is None or not wait or not PROCESS.may_start_thread(pid):
            return refusal
        # block_on_full (a backfill): wait for the senders to make room, bounded.
        deadline = time.monotonic() + wait
        while refusal is not None and time.monotonic() < deadline:
            self._wait_for_room(len(data), deadline)
            refusal = self._put(data, pid)
        return refusal

    def _wait_for_room(self, size: int, deadline: float) -> None:
        """Until the queue could take one more message of ``size`` bytes, or the
        deadline. Senders notify ``_idle`` as each batch settles."""
        self._activate()
        settings = self._settings
        with self._idle:
            while (
                len(self._queue) + self._held_count >= settings.max_queue_size
                or self._bytes + size > settings.max_queue_bytes
            ):
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._idle.wait(min(left, 0.05))

    def _put(self, data: bytes, pid: int) -> Optional[DeliveryError]:
        if self._pid != pid:
            self._here()  # first call in this process
        settings = self._settings
        size = len(data)
        at = NOW
        with self._lock:
            n = len(self._queue)
            held = self._held_count
            if n + held >= settings.max_queue_size:
                refusal = f"the queue holds {n + held} messages ({held} kept for retrying)"
            elif self._bytes + size > settings.max_queue_bytes:
                refusal = f"the queue holds {self._bytes} bytes (max_queue_bytes {settings.max_queue_bytes})"
            else:
                refusal = ""
                # A compact copy: orjson's result keeps a ≈4 KiB buffer, measured 4.1 KB
                # of RSS per queued event instead of 0.3 KB.
                self._queue.append(memoryview(data).tobytes())
                self._queued_bytes += size + 1
                self._bytes += size
                self._ledger.queued += 1
                if n == 0:
                    self._first_at = time.monotonic()
                    if self._stopping and not self._retiring:
                        self._stopping = False  # a call after shutdown() starts over
                # The due rule's "full" half (cdpmp._engine.due), inline: the call's hot path.
                full = n + 1 >= settings.upload_size or self._queued_bytes >= BATCH_ROOM
                # A sender is told only of a change: a first event (its batch's interval
                # starts) or the one that fills a batch (it may start now if the lane
                # has room; else the request that ends asks again). Events beyond a full
                # batch wake no one: the thread that takes it, or whose request ends,
                # asks again (measured: 19,902 wakes for a burst of 20,000).
                was_full = n >= settings.upload_size or self._queued_bytes - size - 1 >= BATCH_ROOM
                wake = n == 0 or (full and not was_full)
                if wake:
                    at = self._startable() if full else self._first_at + settings.upload_interval
                threaded = PROCESS.may_start_thread(pid)
                inline = not threaded and (
                    full
                    or PROCESS.threadless_here()
                    or time.monotonic() - self._first_at >= settings.upload_interval
                )
        if refusal:
            return MessageRejected("queue_full", refusal)
        if wake and threaded:
            PROCESS.ensure_exit_hook()
            if engine().activate(self, at):
                return None
            inline = full  # no thread can start (the interpreter is shutting down)
        if inline and not drain_inline(self, PROCESS.inline_deadline(settings.timeout), True):
            PROCESS.ensure_exit_hook()  # exit then drains inline
            hand_off(self)  # no consumer can run here, and the due batch failed
        return None

    # -- the engine's side (a feeder) ----------------------------------------------------

    def _startable(self) -> float:
        """When a job of ours that is due could start: now, or when a request of ours
        ends (the lane is full or backing off: the thread that ends it asks again)."""
        return NOW if self._lane.slots(time.monotonic()) else math.inf

    def _activate(self) -> bool:
        """Something of ours is due (a flush, a wait for room, a retirement)."""
        return engine().activate(self, self._startable())

    def next_job(self, now: float) -> Tuple[Optional[Callable[[], None]], Optional[float]]:
        """A job for a sender thread (see :class:`cdpmp._senders.Feeder`). Never blocks:
        the engine asks while holding its own lock, and a lock held here (a signal
        handler's flush() that interrupted put(), a test holding it) must not stall
        every other client of the process; a busy lock is asked again in 1 ms."""
        if not self._lock.acquire(blocking=False):
            return None, 0.001
        try:
            if self._pid != os.getpid():
                return None, None
            job = self._next_job_locked(now, force=False) if self._lane.slots(now) > 0 else None
            if job is None and self._empty_locked():
                return None, None
            wait = self._wait_locked(now)
        finally:
            self._lock.release()
        return (None if job is None else functools.partial(self._run_job, job, None)), wait

    def rest(self) -> None:
        self.transport.close()

    def _next_job_locked(self, now: float, force: bool) -> Optional[Held]:
        """The next batch to send (held ones first), counted as in flight; None when
        nothing is due (``force``: anything queued is due)."""
        if self._held:
            job = self._held.popleft()
            self._held_count -= len(job.items)
        elif self._queue and (force or self._urgent or self._stopping or self._due_locked(now)):
            job = Held(self._take_locked())
        else:
            return None
        self._in_flight += len(job.items)
        self._flying.add(job)
        self._lane.started()
        return job

    def _due_locked(self, now: float) -> bool:
        return due(len(self._queue), self._queued_bytes >= BATCH_ROOM, now - self._first_at, self._settings)

    def _wait_locked(self, now: float) -> float:
        """Seconds until the next job may start (``math.inf``: when a request ends)."""
        if not self._queue and not self._held:
            return math.inf
        backoff = self._lane.wait(now)
        if backoff:
            return backoff
        if self._lane.slots(now) == 0:
            return math.inf  # a finishing request asks again
        if self._held or self._urgent or self._stopping or self._due_locked(now):
            return 0.0
        return max(0.0, self._first_at + self._settings.upload_interval - now)

    def _take_locked(self) -> List[bytes]:
        batch, size = take_batch(self._queue, self._settings.upload_size, BATCH_ROOM)
        self._queued_bytes -= size
        if self._queue:
            self._first_at = time.monotonic()
        return batch

    def _run_job(self, job: Held, deadline: Optional[float]) -> None:
        """Send one batch and account for every message in it, whatever happens."""
        outcome, wall, cpu = deliver(self.transport, list, job, deadline)
        with self._lock:
            if job not in self._flying:
                return  # abandoned at a shutdown deadline, and already counted
            self._flying.discard(job)
            done = settle(
                self._lane, job, outcome, backlogged(self._queue, self._settings.upload_size), wall, cpu
            )
            for held in reversed(done.retry):
                self._held.appendleft(held)
                self._held_count += len(held.items)
        self._ledger.attempts(done.requests, 1 if job.retries else 0)
        delivered = sum(len(part) for part in done.delivered)
        if delivered:
            self._ledger.delivered(delivered)
        for error, part in done.losses:
            self._ledger.lost(error, list(part))
        with self._lock:  # only now: flush() returns after on_error has run
            self._in_flight -= len(job.items)
            self._bytes -= _size(job.items) - sum(_size(h.items) for h in done.retry)
            if self._empty_locked():
                self._urgent = False
            close = self._retiring and not self._flying  # replaced: keep no idle socket
            narrowed, self._widest = self._lane.limit < self._widest, self._lane.limit
            self._idle.notify_all()
        if close:
            self.transport.close()
        elif narrowed:  # sockets follow the lane, as threads do
            self.transport.keep_idle(self._lane.limit)

    def flush(self, timeout: float) -> bool:
        """Every wait is bounded by the deadline, lock acquisition included: flush() may
        run in a signal handler that interrupted ``put()`` in this same thread, holding
        the (non-reentrant) lock; it then answers False at its deadline."""
        self._here()
        deadline = time.monotonic() + timeout
        if not self._lock.acquire(timeout=max(0.0, timeout)):
            return False
        try:
            if self._empty_locked():
                return True
            self._urgent = True
        finally:
            self._lock.release()
        if not PROCESS.may_start_thread() or not self._activate():
            return drain_inline(self, deadline, hold_back=False)
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

    def _take_everything_locked(self) -> List[bytes]:
        """Empty the held batches and the queue; their messages, oldest first."""
        items = [m for held in self._held for m in held.items] + list(self._queue)
        self._queue.clear()
        self._held.clear()
        self._queued_bytes = self._held_count = 0
        self._bytes -= _size(items)
        return items

    def retire(self) -> None:
        """Send what is queued soon, then let go of the sockets: a client replaced by
        new module settings. Never waits."""
        if self._pid != os.getpid():
            return
        with self._lock:
            self._urgent = self._stopping = self._retiring = True
            empty = self._empty_locked()
        if empty:
            self.transport.close()
        elif PROCESS.may_start_thread():
            self._activate()

    def stop_threads(self, deadline: float) -> bool:
        """Send what is queued, then end the process's (shared) sender threads."""
        if self._pid == os.getpid() and self.depth():
            self.flush(max(0.0, deadline - time.monotonic()))
        return engine().retire(deadline)

    def retired(self) -> bool:  # a retired sink that holds nothing
        if self._retiring and self._empty_locked():
            self.transport.close()
            return True
        return False

    def shutdown(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        drained = self.flush(timeout)
        if not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return False
        try:
            self._stopping = True
        finally:
            self._lock.release()
        if not drained and self._flying:
            self.transport.cancel()  # requests in progress end at their next socket call
            self._await(lambda: not self._flying, time.monotonic() + 0.5)
        with self._lock:
            leftover = self._take_everything_locked()
            for job in self._flying:  # still in flight: whatever it answers, we are done
                leftover.extend(job.items)
                self._in_flight -= len(job.items)
                self._bytes -= _size(job.items)
            self._flying.clear()
            self._lane = Lane(self._settings.max_in_flight, self.policy)  # none of them counts now
            self._idle.notify_all()
        if self._pid == os.getpid():
            engine().forget(self)
            self.transport.close()
        if leftover:
            error = ShutdownAbandoned(f"{len(leftover)} message(s) unsent at the deadline")
            self._ledger.lost(error, list(leftover))
        return drained
