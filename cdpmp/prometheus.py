"""The host-wide shared-mode counters for Prometheus: the text exposition that
``cdpmp stats --prometheus`` prints, and :class:`HostCollector` for applications that
already serve metrics with ``prometheus_client``::

    from prometheus_client import REGISTRY
    from cdpmp.prometheus import HostCollector
    REGISTRY.register(HostCollector())

Both read the ring's header (one mmap read, no lock, no HTTP) and never create a ring
to report on: a host without one exposes ``cdpmp_shared_ring_present 0`` only.
``prometheus_client`` is optional; it is imported when a collector is built.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Iterator, List, Optional, Tuple

GAUGES = {"depth", "bytes_used", "capacity", "max_count", "uploader_pid", "heartbeat_age"}
PREFIX = "cdpmp_shared_"


def read_counters(directory: Optional[str] = None) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
    """(runtime directory, host counters) of the first directory holding a ring, or
    (None, None) when there is none. Raises OSError when a ring exists but cannot be read."""
    from .shared.files import candidates
    from .shared.ring import Ring

    directories = [directory] if directory else candidates()
    found = [d for d in directories if os.path.isfile(os.path.join(d, "ring"))]
    if not found:
        return None, None
    ring = Ring(found[0])
    try:
        return found[0], dict(ring.header.counters())
    finally:
        ring.close()


def samples(counters: Optional[Dict[str, Any]]) -> Iterator[Tuple[str, str, Dict[str, str], float]]:
    """(metric, kind, labels, value) for every numeric counter: the one list both
    exposition paths render, so they cannot disagree."""
    yield PREFIX + "ring_present", "gauge", {}, 0.0 if counters is None else 1.0
    if counters is None:
        return
    for name, value in counters.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        yield PREFIX + name, "gauge" if name in GAUGES else "counter", {}, float(value)
    for source in counters.get("sources", []):
        labels = {"source": str(source["source"])}
        yield PREFIX + "source_depth", "gauge", labels, float(source["depth"])
        yield PREFIX + "source_limit", "gauge", labels, float(source["limit"])


def prometheus_text(counters: Optional[Dict[str, Any]]) -> str:
    """The counters in the Prometheus text exposition format (counters get ``_total``)."""
    lines: List[str] = []
    typed = set()
    for metric, kind, labels, value in samples(counters):
        name = metric + ("_total" if kind == "counter" else "")
        if name not in typed:
            typed.add(name)
            lines.append(f"# TYPE {name} {kind}")
        label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
        lines.append(f"{name}{{{label_text}}} {value:g}" if label_text else f"{name} {value:g}")
    return "\n".join(lines) + "\n"


class HostCollector:
    """A ``prometheus_client`` custom collector over the host's ring (read at each
    scrape). ``directory`` defaults to where shared mode would put the ring."""

    def __init__(self, directory: Optional[str] = None) -> None:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        self._directory = directory
        self._families = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily}

    def collect(self) -> Iterator[Any]:
        try:
            _, counters = read_counters(self._directory)
        except OSError:
            counters = None
        families: Dict[str, Any] = {}
        for metric, kind, labels, value in samples(counters):
            family = families.get(metric)
            if family is None:
                family = families[metric] = self._families[kind](
                    metric, f"cdpmp shared mode: {metric[len(PREFIX) :]}", labels=sorted(labels)
                )
            family.add_metric([labels[k] for k in sorted(labels)], value)
        yield from families.values()
