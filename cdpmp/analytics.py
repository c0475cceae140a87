"""The module-level API: ``from cdpmp import analytics`` replaces
``from customerio import analytics``.

This module holds the library's only mutable global state: the settings users assign
(``analytics.write_key = ...``) and the default client built from them. Assigning any
setting marks the client stale; the next call builds a new one (the old one is told to
send what it holds right away and is drained at exit), so a setting changed after the
first call takes effect instead of being silently ignored.

The default client is an ordinary :class:`~cdpmp.Client`, so it carries the same fork
guard: a client created in a pre-fork master works in every worker.
"""

from __future__ import annotations

import sys
import threading
import types
from typing import Any, Dict, List, Optional

from ._options import MODULE_SETTINGS
from ._outcome import Stats
from .client import Client, Result
from .errors import ConfigurationError

# The settings users assign (``analytics.write_key = ...``), derived from the one
# options table: ``None`` means "from the environment, else the default".
globals().update(MODULE_SETTINGS)
SETTINGS = tuple(MODULE_SETTINGS)

default_client: Optional[Client] = None
_stale = True
_built_from: Dict[str, Any] = {}
_retired: List[Client] = []
_build_lock = threading.Lock()


class _SettingsModule(types.ModuleType):
    """Marks the default client stale whenever a setting is assigned."""

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in SETTINGS:
            super().__setattr__("_stale", True)


sys.modules[__name__].__class__ = _SettingsModule


def _client() -> Client:
    client = default_client
    if client is not None and not _stale:
        return client
    return _rebuild()


def _rebuild() -> Client:
    global default_client, _stale
    with _build_lock:
        if default_client is not None and not _stale:
            return default_client
        values = {name: globals()[name] for name in SETTINGS}
        if default_client is not None and values == _built_from:
            _stale = False  # assigned again, unchanged: keep the client we have
            return default_client
        new = Client(**values)
        old = default_client
        default_client, _stale = new, False
        _built_from.clear()
        _built_from.update(values)
    if old is not None:
        # Kept until it has sent what it held (so exit still drains it), then let go:
        # re-assigning settings per request or per tenant must not pile up clients.
        _retired[:] = [c for c in _retired if not c._retired()]
        _retired.append(old)
        old._retire()  # start sending now; never wait on the request path
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


def _each(method: str, timeout: Optional[float]) -> bool:
    try:  # as the official module does, build the default client from the settings
        _client()
    except ConfigurationError:
        pass  # no write key anywhere: nothing can have been queued
    clients = list(_retired) + ([default_client] if default_client is not None else [])
    done = all([getattr(c, method)(timeout) for c in clients])
    _retired[:] = [c for c in _retired if not c._retired()]
    return done


def flush(timeout: Optional[float] = None) -> bool:
    """Send everything queued within ``timeout`` seconds; True if drained."""
    return _each("flush", timeout)


def join(timeout: Optional[float] = None) -> bool:
    """The official client's ``join``; here the same as :func:`shutdown`."""
    return shutdown(timeout)


def shutdown(timeout: Optional[float] = None) -> bool:
    """Drain and stop the consumer within ``timeout`` seconds; True if drained."""
    return _each("shutdown", timeout)


def stats() -> Stats:
    """The default client's counters (see :meth:`cdpmp.Client.stats`)."""
    return _client().stats()
