"""The module-level API: ``from cdpmp import analytics`` replaces
``from customerio import analytics``.

This module holds the library's only mutable global state: the settings users assign
(``analytics.write_key = ...``) and the default client built from them. Assigning any
setting marks the client stale; the next call uses the client of the new settings, so a
setting changed after the first call takes effect instead of being silently ignored.

Apps that switch ``write_key`` per request (one source per tenant) must not pile up
clients, each with its queue and sockets (measured before: 999 clients and 1,003 fds
after 1,000 switches in an outage). So the clients of the last :data:`MAX_LIVE`
settings are kept and reused when their settings come back; the least recently used
beyond them is retired (it sends what it holds, keeping no idle socket, and is let go
once empty); at most :data:`MAX_RETIRED` retired clients wait to empty, and past that
the oldest is shut down at once: what it still held is counted as lost at shutdown
and logged, as any shutdown's loss is.

The default client is an ordinary :class:`~cdpmp.Client`, so it carries the same fork
guard: a client created in a pre-fork master works in every worker.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
import types
from typing import Any, Dict, List, Optional, Tuple

from ._offloop import off_loop, run_off_loop
from ._options import MODULE_SETTINGS
from ._outcome import Stats
from ._validate import duration
from ._version import __version__
from .client import DEFAULT_FLUSH_TIMEOUT, Client, Result
from .errors import ConfigurationError

# The settings users assign (``analytics.write_key = ...``), derived from the one
# options table: ``None`` means "from the environment, else the default".
globals().update(MODULE_SETTINGS)
SETTINGS = tuple(MODULE_SETTINGS)

#: Where the official module keeps its version (``analytics.VERSION``, ``__version__``).
VERSION = __version__
default_client: Optional[Client] = None
_stale = True
_retired: List[Client] = []
#: Clients kept for the settings used last (see the module docstring), least recent first.
_live: collections.OrderedDict[Tuple[Any, ...], Client] = collections.OrderedDict()
MAX_LIVE = 8
MAX_RETIRED = 32
_built: List[Optional[Client]] = [None]  # the default client this module built last
_build_lock = threading.Lock()


class _SettingsModule(types.ModuleType):
    """Marks the default client stale whenever a setting is assigned."""

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in SETTINGS:
            super().__setattr__("_stale", True)


sys.modules[__name__].__class__ = _SettingsModule


def _foreign() -> Any:
    """``default_client`` when someone else put it there (an app's test stubbing it,
    ``mock.patch.object(analytics, "default_client", fake)``, or its own client):
    every module function then goes to it as is, whatever the settings say, as
    with the official module. None when it is ours (or unset)."""
    client = default_client
    return client if client is not None and client is not _built[0] else None


def _client() -> Client:
    client = default_client
    if client is not None and (not _stale or client is not _built[0]):
        return client
    return _rebuild()


def _key(values: Dict[str, Any]) -> Tuple[Any, ...]:
    """The settings as a dict key: unhashable values (a proxies dict, a callback) by identity."""
    out = []
    for name, value in sorted(values.items()):
        try:
            hash(value)
        except TypeError:
            value = ("id", id(value))
        out.append((name, value))
    return tuple(out)


def _rebuild() -> Client:
    global default_client, _stale
    evicted: Optional[Client] = None
    with _build_lock:
        if default_client is not None and (not _stale or default_client is not _built[0]):
            return default_client
        values = {name: globals()[name] for name in SETTINGS}
        key = _key(values)
        new = _live.get(key)
        if new is None:
            new = Client(**values)
            _live[key] = new
            if len(_live) > MAX_LIVE:
                _, evicted = _live.popitem(last=False)
        _live.move_to_end(key)
        _built[0] = new
        default_client, _stale = new, False
    if evicted is not None:
        # Kept until it has sent what it held (so exit still drains it), then let go.
        _retired[:] = [c for c in _retired if not c._retired()]
        _retired.append(evicted)
        evicted._retire()  # start sending now; never wait on the request path
        while len(_retired) > MAX_RETIRED:
            _retired.pop(0).shutdown(0.0)  # counted and logged as lost at shutdown
    return new


def identify(*args: Any, **kwargs: Any) -> Result:
    """Send an identify call (see :meth:`cdpmp.Client.identify`)."""
    return _client().identify(*args, **kwargs)


def track(*args: Any, **kwargs: Any) -> Result:
    """Send a track call (see :meth:`cdpmp.Client.track`)."""
    return _client().track(*args, **kwargs)


def page(*args: Any, **kwargs: Any) -> Result:
    """Send a page call (see :meth:`cdpmp.Client.page`)."""
    return _client().page(*args, **kwargs)


def screen(*args: Any, **kwargs: Any) -> Result:
    """Send a screen call (see :meth:`cdpmp.Client.screen`)."""
    return _client().screen(*args, **kwargs)


def group(*args: Any, **kwargs: Any) -> Result:
    """Send a group call (see :meth:`cdpmp.Client.group`)."""
    return _client().group(*args, **kwargs)


def alias(*args: Any, **kwargs: Any) -> Result:
    """Send an alias call (see :meth:`cdpmp.Client.alias`)."""
    return _client().alias(*args, **kwargs)


def _each(method: str, timeout: Optional[float], stop: Optional[threading.Event] = None) -> bool:
    try:  # as the official module does, build the default client from the settings
        _client()
    except ConfigurationError:
        pass  # no write key anywhere: nothing can have been queued
    with _build_lock:
        clients = list(_retired) + list(_live.values())
        if default_client is not None and default_client not in clients:
            clients.append(default_client)
    # One deadline for them all: each client's call gets what is left of it.
    deadline = time.monotonic() + (DEFAULT_FLUSH_TIMEOUT if timeout is None else duration("timeout", timeout))
    if stop is None:
        done = all([getattr(c, method)(max(0.0, deadline - time.monotonic())) for c in clients])
    else:  # awaited: each wait in slices, ending once the caller is cancelled
        until = "_flush_until" if method == "flush" else "_shutdown_until"
        done = all([getattr(c, until)(max(0.0, deadline - time.monotonic()), stop) for c in clients])
    _retired[:] = [c for c in _retired if not c._retired()]
    return done


def _timeout(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[float]:
    if len(args) > 1 or set(kwargs) - {"timeout"} or (args and kwargs):
        raise TypeError("takes at most one argument: timeout (seconds)")
    value = args[0] if args else kwargs.get("timeout")
    return None if value is None else float(value)


def flush(*args: Any, **kwargs: Any) -> bool:
    """Send everything queued within ``timeout`` seconds; True if drained. A stubbed
    ``default_client`` gets ``flush`` with exactly the arguments given."""
    foreign = _foreign()
    if foreign is not None:
        return bool(foreign.flush(*args, **kwargs))
    return _each("flush", _timeout(args, kwargs))


def join(*args: Any, **kwargs: Any) -> bool:
    """The official client's ``join``; here the same as :func:`shutdown`."""
    foreign = _foreign()
    if foreign is not None:
        return bool(foreign.join(*args, **kwargs))
    return _each("shutdown", _timeout(args, kwargs))


def shutdown(*args: Any, **kwargs: Any) -> bool:
    """Drain and stop the consumer within ``timeout`` seconds; True if drained. A
    stubbed ``default_client`` gets what the official module calls: ``flush()`` then
    ``join()`` (or its ``shutdown`` with the arguments given, when there are any)."""
    foreign = _foreign()
    if foreign is not None:
        if args or kwargs:
            return bool(foreign.shutdown(*args, **kwargs))
        foreign.flush()
        return bool(foreign.join())
    return _each("shutdown", _timeout(args, kwargs))


async def aflush(timeout: Optional[float] = None) -> bool:
    """:func:`flush`, awaitable: the wait runs on a thread of cdpmp's own, never on the
    event loop, and stops once the caller is cancelled. A stubbed ``default_client``
    gets ``flush`` as :func:`flush` gives it."""
    if _foreign() is not None:
        return await off_loop(flush, *([] if timeout is None else [timeout]))
    return await run_off_loop(lambda stop: _each("flush", timeout, stop))


async def ashutdown(timeout: Optional[float] = None) -> bool:
    """:func:`shutdown`, awaitable (see :func:`aflush`)."""
    if _foreign() is not None:
        return await off_loop(shutdown, *([] if timeout is None else [timeout]))
    return await run_off_loop(lambda stop: _each("shutdown", timeout, stop))


def stats() -> Stats:
    """The default client's counters (see :meth:`cdpmp.Client.stats`)."""
    return _client().stats()
