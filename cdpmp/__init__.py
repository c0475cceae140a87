"""cdpmp: a Customer.io Data Pipelines client that stays correct in pre-fork servers.

``from cdpmp import analytics`` is the drop-in module-level API; :class:`Client` serves
several sources in one process. Importing cdpmp starts no thread and imports no server
framework.

Where each policy lives (the room for a change; each module's docstring says why):

* a call: checks and the one message build (:mod:`.client`, :mod:`._message`), what a
  value is sent as (:mod:`._coerce`), the official client's surface (:mod:`._compat`,
  :mod:`.analytics`);
* options: declared once (:mod:`._option_table`), resolved from arguments and the
  environment (:mod:`._options`, :mod:`._validate`);
* where an event waits: the sink seam and the sync sink (:mod:`._sink`), direct mode's
  queue (:mod:`._direct`), a process with no thread (:mod:`._handoff`), shared mode's
  ring and uploader (:mod:`.shared`, its own map);
* delivery: when a batch is sent, how many requests fly and when a batch is given up
  (:mod:`._engine`, :mod:`._lane`, :mod:`._retry`), the threads that send
  (:mod:`._senders`: every thread cdpmp runs in a process), one request
  (:mod:`._transport`, :mod:`._deadline`);
* what happened to each event: counted and reported once (:mod:`._outcome`);
* the process: fork, exit and thread policy (:mod:`._process`), SIGTERM (:mod:`._exits`),
  waits kept off an event loop (:mod:`._offloop`), servers (:mod:`.integrations`);
* the local collector that plays the API (:mod:`.testing`, :mod:`._api`,
  :mod:`._schema`, :mod:`._handler`, :mod:`._conditions`); backfills (:mod:`.backfill`);
  the command line (:mod:`.cli`, :mod:`._demo`).
"""

from __future__ import annotations

import importlib
from typing import Any

from . import analytics
from ._outcome import HostStats, Stats
from ._version import __version__
from .client import Client
from .errors import (
    APIError,
    CdpmpError,
    ConfigurationError,
    DeliveryError,
    InvalidArgument,
    InvalidArgumentType,
    MessageRejected,
    MissingIdentity,
    MissingWriteKey,
    ShutdownAbandoned,
    TransportError,
    UnknownOption,
)

_LAZY = frozenset({"prometheus", "testing", "version"})


def __getattr__(name: str) -> Any:
    # ``cdpmp.prometheus.HostCollector()`` after a plain ``import cdpmp``, as the manual
    # writes it, without importing those modules (or what they import) until used.
    if name in _LAZY:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "APIError",
    "CdpmpError",
    "Client",
    "ConfigurationError",
    "DeliveryError",
    "HostStats",
    "InvalidArgument",
    "InvalidArgumentType",
    "MessageRejected",
    "MissingIdentity",
    "MissingWriteKey",
    "ShutdownAbandoned",
    "Stats",
    "TransportError",
    "UnknownOption",
    "__version__",
    "analytics",
]
