"""The library's version, in one place (read by the User-Agent and ``context.library``)."""

from __future__ import annotations

__version__ = "0.2.0"
LIBRARY_NAME = "cdpmp"
