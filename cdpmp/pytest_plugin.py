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
def cdp_collector(request: pytest.FixtureRequest) -> Iterator[Collector]:
    """A started local collector on 127.0.0.1 (answers as the API: strict when asked),
    stopped after the test. Its summary (delivered, dropped and why, refused) is added
    to the test's report: pytest shows it with a failure, or with ``-rA``."""
    with Collector() as collector:
        yield collector
        request.node.add_report_section("teardown", "cdp_collector", _report(collector))


def _report(collector: Collector) -> str:
    summary = collector.summary()
    lines = [
        f"{name}: {summary[name]}" for name in ("delivered", "unique", "duplicates", "refused", "dropped")
    ]
    lines += [f"  dropped because {why}: {n}" for why, n in summary["dropped_reasons"].items()]
    return "\n".join(lines)
