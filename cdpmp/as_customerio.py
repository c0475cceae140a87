"""One opt-in line that keeps an app's imports and patch strings unchanged::

    import cdpmp.as_customerio  # noqa: F401  (first, before anything imports customerio)

From then on, in this process, ``customerio.analytics`` *is* :mod:`cdpmp.analytics`:
``from customerio import analytics``, ``import customerio.analytics``,
``from customerio.analytics import Client`` (cdpmp's), ``customerio.analytics.VERSION``
and the patch strings in an app's tests (``mock.patch("customerio.analytics.track")``)
all reach cdpmp. ``customerio.analytics.client`` and ``customerio.analytics.version``
name :mod:`cdpmp.client` and :mod:`cdpmp.version`; the official package's other
modules (``consumer``, ``request``, ``utils``) are not provided.

It works whether or not the official package is installed: the ``customerio``
package is kept when it exists (only its ``analytics`` entry is replaced) and made
empty when it does not. Names bound to the official module *before* this line keep
pointing at it: a WARNING says so when the official module was already imported.
"""

from __future__ import annotations

import importlib
import logging
import sys
import types

from . import analytics, client, version

logger = logging.getLogger("cdpmp")

ALIASES = {
    "customerio.analytics": analytics,
    "customerio.analytics.client": client,
    "customerio.analytics.version": version,
}


def install() -> None:
    """Make ``customerio.analytics`` name cdpmp's module in this process (idempotent)."""
    earlier = sys.modules.get("customerio.analytics")
    if earlier is not None and earlier is not analytics:
        logger.warning(
            "cdpmp: customerio.analytics was imported before `import cdpmp.as_customerio`; "
            "names bound to it earlier still send with the official client"
        )
    package = sys.modules.get("customerio")
    if package is None:
        try:
            package = importlib.import_module("customerio")
        except ImportError:
            package = types.ModuleType("customerio", "cdpmp's stand-in for the customerio package")
            package.__path__ = []
            sys.modules["customerio"] = package
    sys.modules.update(ALIASES)
    package.analytics = analytics  # type: ignore[attr-defined]


install()
