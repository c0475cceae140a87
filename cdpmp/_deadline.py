"""Total request deadlines: the watchdog that cuts a request which overruns its own.

urllib3's timeouts bound each ``connect``/``recv`` call, so an endpoint (or a
middlebox) that sends its answer one byte per second holds a request, and the thread
making it, for as long as it likes: measured, an inline ``flush(4)`` was still running
after 60 s. :data:`WATCHDOG`, one daemon thread per process, shuts down the socket of
any request that overruns its overall deadline (connect, send and the whole
response); the blocked call then fails at once and the request counts as a timeout
(:class:`RequestDeadline`, retryable). Registering a request costs a lock and a dict
insert; the thread sleeps until the earliest deadline.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any, Dict, List

import urllib3


class RequestDeadline(urllib3.exceptions.TimeoutError):
    """The request overran its total deadline and the watchdog cut its socket."""


class _Watchdog:
    """Cuts requests that overrun their total deadline (see the module docstring).

    A request registers itself (``begin``) from the thread that makes it; the
    connection classes below then ``arm`` the socket they are about to use. The
    thread is started lazily, once per process (after a fork, the first ``arm``
    starts a new one), and never where threads cannot run: there, the per-call
    timeouts are the only bound.
    """

    def __init__(self) -> None:
        self._local = threading.local()
        self._pid = -1
        self._cond = threading.Condition()
        self._armed: Dict[int, List[Any]] = {}  # thread ident -> [deadline, conn, owner, fired]
        self._next = float("inf")

    def begin(self, deadline: float, owner: object) -> None:
        self._local.request = [deadline, None, owner, False]

    def arm(self, conn: Any) -> None:
        entry = getattr(self._local, "request", None)
        if entry is None:
            return
        entry[1] = conn
        if self._pid != os.getpid():
            self._restart()
        with self._cond:
            self._armed[threading.get_ident()] = entry
            if entry[0] < self._next:
                self._next = entry[0]
                self._cond.notify()

    def end(self) -> bool:
        """Unregister this thread's request; True if the watchdog cut it."""
        entry = getattr(self._local, "request", None)
        self._local.request = None
        if entry is None:
            return False
        if entry[1] is not None:
            with self._cond:
                self._armed.pop(threading.get_ident(), None)
        return bool(entry[3])

    def cancel(self, owner: object) -> int:
        """Cut every request of ``owner`` now (a shutdown whose deadline passed)."""
        with self._cond:
            victims = [e for e in self._armed.values() if e[2] is owner]
            for entry in victims:
                self._cut(entry)
        return len(victims)

    def _restart(self) -> None:
        from ._process import PROCESS  # a leaf import: _process imports nothing of ours

        self._pid = os.getpid()
        self._cond = threading.Condition()  # a lock inherited mid-acquire would deadlock
        self._armed = {}
        self._next = float("inf")
        if PROCESS.may_start_thread():
            threading.Thread(target=self._run, name="cdpmp-deadlines", daemon=True).start()

    @staticmethod
    def _cut(entry: List[Any]) -> None:
        entry[3] = True
        sock = getattr(entry[1], "sock", None)
        if sock is not None:
            try:
                # The plain socket's shutdown, also for TLS: ssl.SSLSocket.shutdown would
                # tear down its SSL object under the reading thread.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass  # already closed: the request is over anyway

    def _run(self) -> None:
        cond = self._cond
        with cond:
            while True:
                now = time.monotonic()
                soonest = float("inf")
                for ident, entry in list(self._armed.items()):
                    if entry[0] <= now:
                        self._cut(entry)
                        del self._armed[ident]
                    else:
                        soonest = min(soonest, entry[0])
                self._next = soonest
                cond.wait(None if soonest == float("inf") else soonest - now)


WATCHDOG = _Watchdog()


class _WatchedConnection(urllib3.connection.HTTPConnection):
    def connect(self) -> None:
        WATCHDOG.arm(self)
        super().connect()

    def request(self, *args: Any, **kwargs: Any) -> None:
        WATCHDOG.arm(self)
        super().request(*args, **kwargs)


class _WatchedHTTPSConnection(urllib3.connection.HTTPSConnection):
    def connect(self) -> None:
        WATCHDOG.arm(self)
        super().connect()

    def request(self, *args: Any, **kwargs: Any) -> None:
        WATCHDOG.arm(self)
        super().request(*args, **kwargs)


class _WatchedPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _WatchedConnection


class _WatchedHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


def watched_pools() -> Dict[str, Any]:
    """``PoolManager.pool_classes_by_scheme`` for pools whose requests are watched."""
    return {"http": _WatchedPool, "https": _WatchedHTTPSPool}
