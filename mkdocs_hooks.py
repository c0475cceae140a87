"""MkDocs hook for the API reference: cdpmp's docstrings cross-reference in Sphinx's
roles (``:meth:`flush```), which mkdocstrings renders as the role's name followed by
the code; the role's name is dropped so that only the code shows."""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:meth|func|class|mod|attr|data|exc|obj):(<code>)")


def on_page_content(html: str, **_: Any) -> str:
    return _ROLE.sub(r"\1", html)
