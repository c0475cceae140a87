"""``VERSION``, where the official package keeps it (``customerio.analytics.version``)."""

from __future__ import annotations

from ._version import __version__

VERSION = __version__

__all__ = ["VERSION"]
