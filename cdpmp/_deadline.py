"""Total request deadlines: every socket call of a request is bounded by what is left.

urllib3's timeouts bound each ``connect``/``recv``/``send`` call, so an endpoint (or a
middlebox) that sends its answer one byte per second holds a request, and the thread
making it, for as long as it likes: measured, an inline ``flush(4)`` was still running
after 60 s. Here the connection's socket is wrapped (:class:`_DeadlineSocket`) so that
before each call its timeout is set to the time left before the current request's
deadline, and a call made after the deadline fails at once with ``TimeoutError``
(retryable, reported as :class:`RequestDeadline`). A request therefore ends by its
deadline plus at most the one call in progress, which itself cannot outlast it.

Why a wrapper and not a watchdog thread: it costs no thread, so it also holds where
no thread may run (a uWSGI master, workers without ``enable-threads``) and before
gevent or eventlet patch the process; and it costs ~0.3 µs per socket call.

Setting a connection up is bounded too. The TCP connect is one call (urllib3's connect
timeout is what is left of the request). Through an HTTP proxy, the CONNECT answer is
read line by line by ``http.client``: the tunnel is read through the same wrapper (a
proxy that trickles its answer measured a ``sync_mode`` ``track()`` still running after
30 s with ``timeout=3``). The TLS handshake that follows is bounded as a whole by
CPython, by the socket's timeout when it starts: that timeout is set to what is left.

The current request is a thread-local set by :func:`request_deadline`, so a pooled
connection serves whichever thread uses it. ``cancel(owner)`` ends an owner's requests
at their next socket call (shutdown and drain deadlines).

The pools built here also let their idle connections be cut to what the lane uses
(:func:`keep_idle`): sockets follow the lane as threads do.
"""

from __future__ import annotations

import io
import queue
import socket
import threading
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional

import urllib3

_LOCAL = threading.local()
_cancelled: Dict[int, int] = {}  # id(owner) -> generation; a request remembers its own


class RequestDeadline(urllib3.exceptions.TimeoutError):
    """The request ran out of its total deadline."""


@contextmanager
def request_deadline(deadline: float, owner: object) -> Iterator[None]:
    """Bound every socket call made by this thread inside the block by ``deadline``."""
    _LOCAL.request = (deadline, id(owner), _cancelled.get(id(owner), 0))
    try:
        yield
    finally:
        _LOCAL.request = None


def cancel(owner: object) -> None:
    """End ``owner``'s requests in progress at their next socket call."""
    _cancelled[id(owner)] = _cancelled.get(id(owner), 0) + 1


def expired() -> bool:
    """True if this thread's request is past its deadline or cancelled."""
    request = getattr(_LOCAL, "request", None)
    return request is not None and _remaining(request) is None


def _remaining(request: Any) -> Optional[float]:
    deadline, owner, generation = request
    left: float = deadline - time.monotonic()
    if left <= 0 or _cancelled.get(owner, 0) != generation:
        return None
    return left


def _bound(sock: Any) -> None:
    """Set ``sock``'s timeout to what is left of this thread's request (if any)."""
    request = getattr(_LOCAL, "request", None)
    if request is None:
        return
    left = _remaining(request)
    if left is None:
        raise TimeoutError("request deadline passed")
    sock.settimeout(left)


class _DeadlineSocket:
    """A socket (plain or TLS) whose every call is bounded by the request's deadline;
    everything else is passed through to the wrapped socket."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def _budget(self) -> None:
        _bound(self._sock)

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        self._budget()
        if nbytes or flags:
            return self._sock.recv_into(buffer, nbytes, flags)
        # Never pass an explicit 0: gevent's TLS socket reads 0 bytes for it (an EOF
        # to http.client: "Remote end closed connection"), the stdlib reads len(buffer).
        return self._sock.recv_into(buffer)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self._budget()
        return self._sock.recv(bufsize, flags)

    def send(self, data: Any, flags: int = 0) -> int:
        self._budget()
        return self._sock.send(data, flags)

    def sendall(self, data: Any, flags: int = 0) -> None:
        self._budget()  # since Python 3.5 the timeout bounds the whole sendall
        self._sock.sendall(data, flags)

    def makefile(self, mode: str = "rb", buffering: Optional[int] = None, **_: Any) -> Any:
        """A buffered reader whose reads come through :meth:`recv_into` (http.client
        reads the status line, headers and body through it)."""
        if "r" not in mode or "w" in mode:
            return self._sock.makefile(mode, buffering)  # type: ignore[call-overload]
        raw = socket.SocketIO(self, "rb")  # type: ignore[arg-type]
        self._sock._io_refs += 1  # type: ignore[attr-defined]  # as socket.makefile does
        return io.BufferedReader(raw, buffering or io.DEFAULT_BUFFER_SIZE)


class _DeadlineConnection(urllib3.connection.HTTPConnection):
    def connect(self) -> None:
        super().connect()
        self.sock = _DeadlineSocket(self.sock)


class _DeadlineHTTPSConnection(urllib3.connection.HTTPSConnection):
    def connect(self) -> None:
        super().connect()
        self.sock = _DeadlineSocket(self.sock)

    def _tunnel(self) -> None:
        """The proxy's CONNECT, read through the wrapper; then the socket's timeout is
        what is left, which bounds the whole TLS handshake that follows."""
        raw = self.sock
        self.sock = _DeadlineSocket(raw)
        try:
            super()._tunnel()
        finally:
            if self.sock is not None:  # None: http.client closed it (a refused CONNECT)
                self.sock = raw
        _bound(raw)


def keep_idle(pool: urllib3.HTTPConnectionPool, keep: int) -> int:
    """Close ``pool``'s idle connections beyond ``keep``; how many were closed. A pool
    holds one per request the lane ever had in flight, and after an outage or a burst
    nothing else closes them while a sender thread lives (measured: ~5 sockets more
    per worker). Connections in use are not in the queue and stay; a request racing
    this opens a new one."""
    idle = pool.pool
    if idle is None:
        return 0
    taken: List[Any] = []
    while True:
        try:
            taken.append(idle.get(block=False))
        except queue.Empty:
            break
    live = [conn for conn in taken if conn is not None]
    for conn in live[keep:]:
        conn.close()
    kept = live[:keep]
    for conn in [None] * (len(taken) - len(kept)) + kept:  # LIFO: kept ones are reused first
        try:
            idle.put(conn, block=False)
        except queue.Full:  # a request put its connection back meanwhile
            if conn is not None:
                conn.close()
    return len(live) - len(kept)


class _DeadlinePool(urllib3.HTTPConnectionPool):
    ConnectionCls = _DeadlineConnection


class _DeadlineHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _DeadlineHTTPSConnection


def deadline_pools() -> Dict[str, Any]:
    """``PoolManager.pool_classes_by_scheme`` for pools whose requests are bounded."""
    return {"http": _DeadlinePool, "https": _DeadlineHTTPSPool}
