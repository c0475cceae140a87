"""The official client's attribute surface beyond its options, for code written
against it: ``client.queue`` (a ``queue.Queue`` there), ``client.consumers`` (its
threads) and the wrong-region warning. Read-only views over cdpmp's own state:
nothing here takes part in delivery.
"""

from __future__ import annotations

from typing import Callable, Optional

from ._options import EU_ENDPOINT, REGION_KEY, US_ENDPOINT, Settings
from ._sink import Sink


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
