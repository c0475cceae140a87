"""The code people write against the official module: apps that stub its default
client in their own tests, and Customer.io's documented debug lines."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from unittest import mock

import pytest

from cdpmp import analytics
from cdpmp.testing import Collector


@pytest.mark.parametrize("setup", ["no-key", "key-set", "setting-changed"])
def test_a_stubbed_default_client_gets_every_module_call(setup: str, collector: Collector) -> None:
    if setup != "no-key":
        analytics.write_key, analytics.endpoint = collector.write_key, collector.url
        analytics.track("u", "Real", message_id="real")  # the module's own client exists
    if setup == "setting-changed":
        analytics.upload_size = 7  # would make the module build a new client
    fake = mock.Mock()
    with mock.patch.object(analytics, "default_client", fake):
        analytics.track("u", "Stubbed", {"k": 1})
        analytics.identify("u", {"email": "a@b.c"})
        analytics.flush()
        analytics.join()
        analytics.shutdown()
        analytics.flush(5)
    fake.track.assert_called_once_with("u", "Stubbed", {"k": 1})
    fake.identify.assert_called_once_with("u", {"email": "a@b.c"})
    assert fake.flush.call_args_list == [mock.call(), mock.call(), mock.call(5)]  # as given
    assert fake.join.call_args_list == [mock.call(), mock.call()]  # shutdown = flush + join
    assert analytics.flush(timeout=10)
    assert "Stubbed" not in {m["event"] for m in collector.messages if m["type"] == "track"}
    if setup != "no-key":  # the module's own client is back once the stub is gone
        analytics.track("u", "After", message_id="after")
        assert analytics.flush(timeout=10) and collector.wait_for(2)
        assert set(collector.message_ids()) == {"real", "after"}


DEBUG = """
import logging, sys
{setup}
from cdpmp import analytics
analytics.write_key, analytics.endpoint = sys.argv[1], sys.argv[2]
{debug}
analytics.track("u", "E", {{"secret": "payload-text"}})
assert analytics.flush(10)
"""


@pytest.mark.parametrize(
    ("setup", "debug", "logger"),
    [
        ("logging.basicConfig()", "analytics.debug = True", "cdpmp"),
        ("logging.basicConfig(); logging.getLogger('customerio').setLevel('DEBUG')", "", "customerio"),
    ],
    ids=["analytics.debug", "customerio-logger"],
)
def test_customerios_documented_debug_lines_show_each_batch(
    setup: str, debug: str, logger: str, collector: Collector
) -> None:
    script = textwrap.dedent(DEBUG.format(setup=setup, debug=debug))
    done = subprocess.run(
        [sys.executable, "-c", script, collector.write_key, collector.url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "batch of" in line]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(
        f"DEBUG:{logger}:cdpmp: batch of 1 event(s) to {collector.url}/v1/batch: 200 ok in "
    )
    assert "payload-text" not in done.stderr and collector.write_key not in done.stderr


def test_the_manuals_prometheus_line_runs_after_a_plain_import() -> None:
    """docs/shared-mode.md writes ``REGISTRY.register(cdpmp.prometheus.HostCollector())``
    after ``import cdpmp``; submodules load on first use, never at ``import cdpmp``."""
    pytest.importorskip("prometheus_client")
    script = """
        import sys
        from prometheus_client import REGISTRY, generate_latest
        import cdpmp
        assert "cdpmp.prometheus" not in sys.modules and "cdpmp.testing" not in sys.modules
        REGISTRY.register(cdpmp.prometheus.HostCollector())
        assert b"cdpmp_shared_ring_present" in generate_latest(REGISTRY)
    """
    subprocess.run([sys.executable, "-c", textwrap.dedent(script)], check=True, timeout=60)
