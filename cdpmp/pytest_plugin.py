"""pytest plugin (entry point ``cdpmp``): the ``cdp_collector`` fixture.

Usage in a user's test::

    def test_signup_tracks(cdp_collector):
        client = cdpmp.Client(cdp_collector.write_key, endpoint=cdp_collector.url)
        ...
        assert cdp_collector.wait_for(1)
"""

from __future__ import annotations

from typing import Iterator

import pytest

from .testing import Collector


@pytest.fixture
def cdp_collector() -> Iterator[Collector]:
    """A started strict collector on 127.0.0.1, stopped after the test."""
    with Collector() as collector:
        yield collector
