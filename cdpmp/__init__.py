"""cdpmp: a Customer.io Data Pipelines client that stays correct in pre-fork servers.

``from cdpmp import analytics`` is the drop-in module-level API; :class:`Client` serves
several sources in one process. Importing cdpmp starts no thread and imports no server
framework.
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
