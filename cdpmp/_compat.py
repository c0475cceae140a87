"""The official client's attribute surface beyond its calls, for code written against
it (:class:`OfficialSurface`, which :class:`cdpmp.Client` takes on): the options read as
attributes, ``client.queue`` (a ``queue.Queue`` there), ``client.consumers`` (its
threads), ``client.log``, ``Client.DefaultConfig``; and the lines about a key sent to
the wrong region. Views over cdpmp's own state: nothing here takes part in delivery.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, List, Optional

from ._options import EU_ENDPOINT, FIELDS, REGION_KEY, US_ENDPOINT, Settings
from ._sink import Sink

_OPTION_NAMES = frozenset(f.name for f in FIELDS)


class QueueView:
    """``client.queue``: ``qsize()``, ``empty()``, ``full()``, ``maxsize``. In shared
    mode the queue is the host's: ``qsize()`` counts every source's waiting events."""

    def __init__(self, settings: Settings, sink: Sink) -> None:
        self._sink = sink
        self.maxsize = settings.max_queue_size

    def qsize(self) -> int:
        return self._sink.depth()

    def empty(self) -> bool:
        return self.qsize() == 0

    def full(self) -> bool:
        return self.qsize() >= self.maxsize


class ConsumerView:
    """One of ``client.consumers``: the delivery settings the official consumer
    carries (``retries`` is ``max_retries``: None means no limit here), and
    ``is_alive()`` for this process's consumer thread."""

    def __init__(self, settings: Settings, sink: Sink) -> None:
        self._sink = sink
        self.retries = settings.max_retries
        self.timeout = settings.timeout
        self.upload_size = settings.upload_size
        self.upload_interval = settings.upload_interval

    def is_alive(self) -> bool:
        alive: Optional[Callable[[], bool]] = getattr(self._sink, "alive", None)
        return alive is not None and alive()


def other_region(settings: Settings) -> Optional[str]:
    """The warning to give when a region key (``sk_eu_…``) is sent to the other
    region's host, as the official client gives it; None otherwise."""
    region = REGION_KEY.match(settings.write_key)
    hosts = {"us": US_ENDPOINT, "eu": EU_ENDPOINT}
    for other, host in hosts.items():
        if region and other != region.group(2) and settings.endpoint == host:
            return f"{region.group(2).upper()} API key is being sent to the {other.upper()} host {host}"
    return None


def key_refused_line(settings: Settings) -> str:
    """The WARNING said once when the endpoint answers 401 (``%s``: the error): where
    the key went, and the region guess when one helps. Never the key."""
    where = settings.endpoint
    hint = other_region(settings) or ""
    if not hint and not REGION_KEY.match(settings.write_key):
        other = {US_ENDPOINT: ("EU", EU_ENDPOINT), EU_ENDPOINT: ("US", US_ENDPOINT)}.get(where)
        if other:
            hint = f"a source of a {other[0]} workspace needs endpoint={other[1]}"
    line = f"cdpmp: the write key was refused by {where} (%s): this source's events are given up until it is fixed"
    line = line.replace("%", "%%").replace("(%%s)", "(%s)")
    return line + (f"; {hint}" if hint else "; check the source's write key in Data Pipelines")


class OfficialSurface:
    """What code written for the official ``Client`` touches beyond its calls; the
    class using it sets ``settings``, ``_sink`` and ``_host`` (the endpoint as given)."""

    settings: Settings
    _sink: Sink
    log = logging.getLogger("cdpmp")  # the official client's ``client.log``
    #: The official ``Client.DefaultConfig``: every option's default (cdpmp's: e.g.
    #: ``max_retries`` None, hold while the endpoint fails), ``write_key`` and ``host``
    #: None; test teardowns assign these back to the module to restore the defaults.
    DefaultConfig = type(
        "DefaultConfig", (), {**{f.name: f.default for f in FIELDS}, "write_key": None, "host": None}
    )

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: the options, read-only.
        settings = self.__dict__.get("settings")
        if settings is not None:
            if name == "host":
                return self.__dict__.get("_host") or settings.endpoint
            if name in _OPTION_NAMES:
                return getattr(settings, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def queue(self) -> Any:
        """The queue as code written for the official client reads it (there a
        ``queue.Queue``): ``qsize()``, ``empty()``, ``full()``, ``maxsize``. A subclass
        may assign it (as the official client's subclasses do); what it assigns is
        kept and read back, but delivery never goes through it."""
        assigned = self.__dict__.get("_assigned_queue")
        return QueueView(self.settings, self._sink) if assigned is None else assigned

    @queue.setter
    def queue(self, value: Any) -> None:
        self.__dict__["_assigned_queue"] = value

    @property
    def consumers(self) -> List[ConsumerView]:
        """The official client's consumer threads, as read-only views: none in
        ``sync_mode``, else one (direct mode's consumer; in shared mode delivery
        runs in the uploader, so it is never alive here)."""
        return [] if self.settings.sync_mode else [ConsumerView(self.settings, self._sink)]
