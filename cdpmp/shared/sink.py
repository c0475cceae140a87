"""Shared mode, producer side: ``SharedSink``, what ``track()`` runs in shared mode.

A ``track()`` serialises the message once (in the client) and appends it to the
host's ring (:mod:`.ring`): no thread, no socket, no wake-up; the uploader polls the
ring on a timer. The host-wide limit is checked under the ring lock, so a full host
answers ``(False, msg)`` synchronously.

Sources: each client is a *source* (write key + endpoint + delivery settings),
identified in records by a 64-bit id. Its settings reach the uploader through the
sources file (:mod:`.files`), never argv, a process title or a log line.

At most once a second a producer checks the uploader's liveness and, if it is gone,
starts one (:func:`.lifecycle.ensure`). ``track()`` alone cannot cover an uploader that
dies just after accepting a host's last event (its heartbeat is still fresh at that
check, and on a quiet host no further call comes): so the first ``put`` in a process
also activates the *watch*, a timed job of the process's sender threads
(:mod:`cdpmp._senders`: the one pool, idle rule and retire path of every thread cdpmp
runs), which once a second and only while the ring holds records runs the same
check. After :data:`WATCH_IDLE_EXIT` seconds of an empty ring it holds nothing and the
engine drops it (its thread then exits as any idle sender does; the next ``put``
activates it again); :meth:`SharedSink.stop_threads` (before a server forks) ends it.
It never runs where threads may not (a uWSGI master, workers without
``enable-threads``); there the next call or the exit flush covers it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import weakref
from typing import Callable, Optional, Tuple

import psutil

from .._options import Settings, host_settings, source_entry
from .._outcome import HostStats, Ledger
from .._process import PROCESS
from .._senders import IDLE_EXIT, engine
from ..errors import ConfigurationError, DeliveryError, MessageRejected
from . import lifecycle, notices
from .files import UPLOADER_LOG, RuntimeDirError, ensure_dir, read_sources, runtime_dir, write_source
from .layout import RingBusy, RingFormatError
from .ring import Ring

logger = logging.getLogger("cdpmp")

CHECK_EVERY = 1.0  # seconds between a producer's liveness checks
#: Seconds of an empty ring after which the watch is done: the engine's sender
#: threads' own idle exit, one rule for every thread cdpmp starts.
WATCH_IDLE_EXIT = IDLE_EXIT


def source_id(settings: Settings) -> int:
    """The id of a source: every setting the uploader sends it with (its entry), so
    that two clients of one key that send differently (``strict_mode``, ``gzip``...)
    are two sources, each sent as configured, never the first one's way."""
    entry = json.dumps(source_entry(settings), sort_keys=True).encode()
    return int.from_bytes(hashlib.blake2b(entry, digest_size=8).digest(), "little") or 1


def open_ring(settings: Settings, directory: Optional[str] = None) -> Tuple[Ring, str]:
    """The host's ring: in ``directory``, else where the environment says now."""
    directory = runtime_dir() if directory is None else ensure_dir(directory)
    capacity = host_settings().ring_bytes
    return Ring(directory, capacity=capacity, max_count=settings.max_queue_size), directory


class SharedSink:
    """Producer side of shared mode; all state is re-opened per pid."""

    mode = "shared"

    def __init__(self, settings: Settings, ledger: Ledger) -> None:
        self._settings = settings
        self._ledger = ledger
        self._ring: Optional[Ring] = None
        self._open()

    def _open(self) -> None:
        # Never reuse the parent's lock fd: an inherited flock is the same lock. Close
        # the inherited handle: a descriptor kept open keeps its lock's owner alive.
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        self._pid = os.getpid()
        self._ring, self._dir = open_ring(self._settings)
        self._source = source_id(self._settings)
        if self._settings.debug and logger.isEnabledFor(logging.DEBUG):  # where debug=True's lines are
            where = os.path.join(self._dir, UPLOADER_LOG)
            logger.debug("cdpmp: shared mode: the uploader sends; its line per batch is in %s", where)
        try:
            with self._ring.locked():
                write_source(self._dir, self._source, source_entry(self._settings))
                notices.register(self._ring, self._dir, self._source)
        except RingBusy:
            pass  # a wedged lock: refused at put(); the entry is written at a later check
        self._next_check = 0.0
        self._registered = False
        self._checking = threading.Lock()  # one check at a time: put() or the watch
        self._watch: Optional[_Watch] = None

    def reset_after_fork(self) -> None:
        if self._pid != os.getpid():
            self._ledger.reset()
            self._pid = -1  # re-open lazily on first use in this process

    def _here(self) -> Ring:
        with PROCESS.build_lock():  # the threads of a new worker race here
            if self._pid != os.getpid() or self._ring is None:
                self._open()
        assert self._ring is not None
        return self._ring

    def put(self, data: bytes, pid: int) -> Optional[DeliveryError]:
        refusal: Optional[DeliveryError] = None
        limit = self._settings.max_queue_size
        try:
            ring = self._ring if self._pid == pid and self._ring is not None else self._here()
            accepted = ring.put(self._source, data, limit)
            if not accepted and self._settings.block_on_full:
                accepted = self._wait_and_put(ring, data, limit)
        except OSError as exc:  # RingBusy (a wedged lock, bounded), or the ring unusable here
            return MessageRejected("queue_full", f"the host's ring cannot take it: {exc}")
        if accepted:
            self._ledger.queued += 1
        else:
            refusal = MessageRejected(
                "queue_full", f"the host holds this source's limit of {limit} messages, or is full"
            )
        now = time.monotonic()
        if now >= self._next_check:
            self._check(now)
        return refusal

    def _wait_and_put(self, ring: Ring, data: bytes, limit: int) -> bool:
        """``block_on_full``: try again until the uploader made room (it releases
        records as batches are acknowledged), polling from 1 ms up to 20 ms."""
        deadline = time.monotonic() + (self._settings.block_on_full or 0.0)
        pause = 0.001
        while time.monotonic() < deadline:
            now = time.monotonic()
            if now >= self._next_check:
                self._check(now)  # the uploader may be gone: the one making room
            time.sleep(min(pause, max(0.0, deadline - now)))
            pause = min(pause * 2, 0.02)
            if ring.put(self._source, data, limit):
                return True
        return False

    def _check(self, now: float) -> None:
        """The liveness check, from ``put`` or the watch, never both at once."""
        if not self._checking.acquire(blocking=False):
            return
        try:
            self._next_check = now + CHECK_EVERY
            if self._ring is not None and self._pid == os.getpid():
                self._check_uploader(self._ring)
        except OSError as exc:  # RingBusy included: checked again in CHECK_EVERY
            self._ledger.log.warning("check", "cdpmp: shared mode check failed: %s", exc)
        finally:
            self._checking.release()
        watch = self._watch
        if (watch is None or watch.done or watch.pid != self._pid) and PROCESS.may_start_thread():
            self._watch = _Watch(self)
            engine().activate(self._watch, time.monotonic() + CHECK_EVERY)

    def stop_threads(self, deadline: float) -> bool:
        """End the watch, and the sender threads that ran it (the uploader delivers;
        nothing else runs here)."""
        watch = self._watch
        if watch is None or self._pid != os.getpid():
            return True
        watch.done = True
        engine().forget(watch)
        return engine().retire(deadline)

    def _check_uploader(self, ring: Ring) -> None:
        if ring.replaced():
            ring = self._carry_over(ring)
        elif str(self._source) not in read_sources(self._dir):  # sources.json was removed
            with ring.locked():
                write_source(self._dir, self._source, source_entry(self._settings))
        if not self._registered:
            self._registered = True
            ring.header.register_producer(os.getpid(), _create_time(os.getpid()))
        try:
            lifecycle.ensure(ring, self._dir)
        except OSError as exc:
            self._ledger.log.warning("spawn", "cdpmp: cannot start the uploader: %s", exc)
        self._notify(ring)

    def _notify(self, ring: Ring) -> None:
        """Report the batches of this source that the uploader gave up for good
        (:mod:`.notices`): counted, logged, and given to ``on_error`` here."""
        if notices.pending(ring, self._dir, self._source):
            for notice in notices.claim(ring, self._dir, self._source):
                self._ledger.lost(notice.error, list(notice.messages), "rejected", notice.events)

    def _carry_over(self, old: Ring) -> Ring:
        """The ring file was deleted or replaced under us: open (or create) the one now
        at the path and move into it everything the old mapping still holds, so that
        what ``track()`` accepted is not lost. Every record is moved once, by the
        first process that notices (``take_all`` empties the old ring under its lock).
        The new ring is opened before anything is taken: if it cannot be, the old one
        keeps its records (and this process keeps using it)."""
        try:
            # The directory this sink has used, not the environment's now: a process
            # whose CDP_RUNTIME_DIR changed since (a test harness, an app reconfigured)
            # must not carry one host's events into another's ring.
            ring, directory = open_ring(self._settings, self._dir)
        except (RuntimeDirError, RingFormatError, OSError) as exc:
            self._ledger.log.warning("replaced", "cdpmp: the shared-mode ring was removed: %s", exc)
            return old
        self._ring, self._dir = ring, directory  # this process's new puts go there first
        records = old.take_all()
        lost = [r.payload for r in records if not ring.put(r.source, r.payload, 1 << 62)]
        old.close()
        with ring.locked():
            write_source(directory, self._source, source_entry(self._settings))
        self._registered = False
        self._ledger.log.warning(
            "replaced",
            "cdpmp: the shared-mode ring was removed or replaced; %d event(s) carried into the new one",
            len(records) - len(lost),
        )
        if lost:
            self._ledger.lost(MessageRejected("queue_full", "the new ring had no room for them"), list(lost))
        return ring

    def flush(self, timeout: float) -> bool:
        """Wait until this source's events in the ring when called are delivered or
        given up: the ring's head has passed them, or the source holds none. Another
        source's backlog (its endpoint down, its records before ours) is not waited
        for. Takes no lock to wait (safe from a signal handler); the deadline covers
        all of it. Limit: while other processes of this source keep adding events and
        another source holds the head, it answers at its deadline."""
        ring = self._here()
        if ring.replaced():
            ring = self._carry_over(ring)
        deadline = time.monotonic() + timeout
        _, target, _ = ring.peek()
        try:  # sent now, as direct mode's flush() sends, not at their interval
            ring.header.ask_flush(target)
        except OSError:  # RingBusy: they go at their interval; the wait below holds
            pass
        next_check = 0.0
        while True:
            if ring.peek()[0] >= target or ring.held_by(self._source) == 0:
                try:  # what was given up for good is reported before flush() returns
                    self._notify(ring)
                except OSError as exc:
                    self._ledger.log.warning("check", "cdpmp: shared mode check failed: %s", exc)
                return True
            now = time.monotonic()
            if now >= deadline:
                return False
            if now >= next_check:  # the uploader may die while we wait
                next_check = now + CHECK_EVERY / 4
                try:
                    lifecycle.ensure(ring, self._dir)
                except OSError as exc:
                    self._ledger.log.warning("spawn", "cdpmp: cannot start the uploader: %s", exc)
            time.sleep(min(0.01, max(0.0, deadline - now)))

    def shutdown(self, timeout: float) -> bool:
        """Queued events live in the ring, not in this process: an app's own
        ``shutdown()`` waits for their delivery as ``flush()`` does, but a process's
        exit drain has nothing to wait for once the host has an uploader. (Before, a
        gunicorn stop with the endpoint down waited out the grace period in every
        worker, 32 s, and warned of a loss that never happened: 100 of 100 arrived.)"""
        if PROCESS.draining_all:
            ring = self._here()
            try:
                lifecycle.ensure(ring, self._dir)  # someone will send them
            except OSError as exc:
                self._ledger.log.warning("spawn", "cdpmp: cannot start the uploader: %s", exc)
                return self.flush(timeout)
            return True
        return self.flush(timeout)

    def retire(self) -> None:
        """Queued events live in the ring: only release this process's handle."""
        if self._ring is not None and self._pid == os.getpid():
            self._ring.close()
            self._ring = None
            self._pid = -1

    def retired(self) -> bool:
        return self._ring is None

    def depth(self) -> int:
        return int(self._here().peek()[2])

    def host(self) -> Optional[HostStats]:
        return self._here().header.counters()


class _Watch:
    """The watch (see the module docstring): a feeder of the engine whose job, every
    :data:`CHECK_EVERY` seconds, is the liveness check while the ring holds records.
    Holds the sink only weakly; done when the sink is gone, retired or belongs to
    another pid, when told (``stop_threads``), or after :data:`WATCH_IDLE_EXIT` seconds
    of an empty ring."""

    def __init__(self, sink: SharedSink) -> None:
        self._sink = weakref.ref(sink)
        self.pid = sink._pid
        self.done = False
        self._idle_since = time.monotonic()
        self._next = self._idle_since + CHECK_EVERY

    def next_job(self, now: float) -> Tuple[Optional[Callable[[], None]], Optional[float]]:
        """See :class:`cdpmp._senders.Feeder`; asked under the engine's lock: no I/O here."""
        sink = self._sink()
        if self.done or sink is None or sink._pid != self.pid or sink._ring is None:
            self.done = True
            return None, None  # holds nothing: the engine drops it
        if now < self._next:
            return None, self._next - now
        self._next = now + CHECK_EVERY
        return self._tick, CHECK_EVERY

    def _tick(self) -> None:
        sink = self._sink()
        if sink is None or sink._ring is None:
            self.done = True
            return
        now = time.monotonic()
        try:
            ring = sink._ring
            busy = ring.peek()[2] > 0 or notices.pending(ring, sink._dir, sink._source)
            if busy and now >= sink._next_check:
                sink._check(now)
        except (ValueError, OSError):  # the ring was closed under us
            self.done = True
            return
        if busy:
            self._idle_since = now
        elif now - self._idle_since >= WATCH_IDLE_EXIT:
            self.done = True

    def rest(self) -> None:
        """No socket of its own."""


def _create_time(pid: int) -> float:
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return 0.0


def make_shared_sink(settings: Settings, ledger: Ledger) -> Optional[SharedSink]:
    """A SharedSink, or None (after one warning) when shared mode cannot work here."""
    try:
        sink = SharedSink(settings, ledger)
    except (RuntimeDirError, RingFormatError, OSError, ConfigurationError) as exc:
        logger.warning("cdpmp: shared mode unavailable (%s); using direct mode", exc)
        return None
    try:
        # A file planted where the uploader's lock or log goes means no uploader can
        # ever start: events put in the ring would wait for one that never comes.
        lifecycle.preflight(sink._dir)
    except RuntimeDirError as exc:
        if sink._ring is not None:
            sink._ring.close()
        logger.warning("cdpmp: shared mode unavailable (%s); using direct mode", exc)
        return None
    return sink
