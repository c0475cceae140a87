"""cdpmp: a Customer.io Data Pipelines client that stays correct in pre-fork servers.

``from cdpmp import analytics`` is the drop-in module-level API; :class:`Client` serves
several sources in one process. Importing cdpmp starts no thread and imports no server
framework.
"""

from __future__ import annotations

from . import analytics
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
    ShutdownAbandoned,
    TransportError,
)

__all__ = [
    "APIError",
    "CdpmpError",
    "Client",
    "ConfigurationError",
    "DeliveryError",
    "InvalidArgument",
    "InvalidArgumentType",
    "MessageRejected",
    "MissingIdentity",
    "ShutdownAbandoned",
    "TransportError",
    "__version__",
    "analytics",
]
