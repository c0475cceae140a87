"""One behavioural suite, run against every mode: direct, shared and sync.

The public API and the ``(success, msg)`` semantics must not depend on the mode.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Dict, List

import pytest

import cdpmp
from cdpmp.testing import Collector

MODES = ["direct", "shared", "sync"]


@pytest.fixture(params=MODES)
def mode_client(
    request: pytest.FixtureRequest, collector: Collector, make_client: Callable[..., cdpmp.Client]
) -> Callable[..., cdpmp.Client]:
    if request.param == "shared":
        request.getfixturevalue("runtime_dir")

    def factory(**options: Any) -> cdpmp.Client:
        if request.param == "sync":
            options["sync_mode"] = True
        else:
            options["mode"] = request.param
        client = make_client(**options)
        expected = request.param
        assert client.stats()["mode"] == expected
        return client

    return factory


def test_all_six_calls_arrive_exactly_once(
    collector: Collector, mode_client: Callable[..., cdpmp.Client]
) -> None:
    client = mode_client()
    results = [
        client.identify("u1", {"plan": "pro"}),
        client.track("u1", "Signed Up", {"n": 1}),
        client.page("u1", "Docs", "Home"),
        client.screen("u1", "App", "Settings"),
        client.group("u1", "acme", {"object_type_id": "1"}),
        client.alias("anon", "u1"),
    ]
    assert all(ok for ok, _ in results)
    assert client.flush(timeout=15)
    assert collector.wait_for(6, timeout=10)
    counts = collections.Counter(collector.message_ids())
    assert counts == collections.Counter(msg["messageId"] for _, msg in results)
    assert sorted(m["type"] for m in collector.messages) == sorted(
        ["identify", "track", "page", "screen", "group", "alias"]
    )


def test_many_events_arrive_in_full_batches(
    collector: Collector, mode_client: Callable[..., cdpmp.Client]
) -> None:
    client = mode_client(upload_size=50)
    ids = [client.track("u", "E", {"i": i})[1]["messageId"] for i in range(200)]
    assert client.flush(timeout=20)
    assert collector.wait_for(200, timeout=10)
    assert sorted(collector.message_ids()) == sorted(ids)


def test_rejections_are_the_same_in_every_mode(
    collector: Collector, mode_client: Callable[..., cdpmp.Client]
) -> None:
    errors: List[Exception] = []
    client = mode_client(on_error=lambda e, b: errors.append(e))
    ok, _ = client.track("u", "E", {"blob": "x" * 40_000})
    assert not ok
    assert client.stats()["dropped"]["oversize"] == 1
    assert isinstance(errors[0], cdpmp.MessageRejected)
    with pytest.raises(cdpmp.InvalidArgumentType):
        client.track("u", event=7)  # type: ignore[arg-type]
    with pytest.raises(cdpmp.MissingIdentity):
        client.track(event="E")


def test_stats_have_the_same_keys_in_every_mode(mode_client: Callable[..., cdpmp.Client]) -> None:
    stats: Dict[str, Any] = mode_client().stats()
    for key in (
        "queued",
        "sent",
        "failed",
        "batches",
        "retries",
        "requests",
        "dropped",
        "depth",
        "mode",
        "pid",
    ):
        assert key in stats
