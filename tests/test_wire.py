"""The wire contract, field by field, for all six calls; regions and auth."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any, Callable, Dict

import pytest

import cdpmp
from cdpmp._options import EU_ENDPOINT, US_ENDPOINT, resolve
from cdpmp.testing import Collector

UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
ISO_WITH_OFFSET = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d$")
LIBRARY = {"name": "cdpmp", "version": cdpmp.__version__}


def _sent(collector: Collector, client: cdpmp.Client) -> Dict[str, Any]:
    assert client.flush(timeout=5)
    assert collector.wait_for(1, timeout=5)
    assert len(collector.messages) == 1
    return collector.messages[0]


def _common(msg: Dict[str, Any], kind: str) -> None:
    assert msg["type"] == kind
    assert UUID4.match(msg["messageId"])
    assert ISO_WITH_OFFSET.match(msg["timestamp"])
    assert msg["context"]["library"] == LIBRARY
    assert msg["integrations"] == {}


def test_track_fields(collector: Collector, make_client: Callable[..., cdpmp.Client]) -> None:
    client = make_client()
    ok, returned = client.track(user_id=42, event="Signed Up", properties={"plan": "pro"})
    assert ok
    msg = _sent(collector, client)
    _common(msg, "track")
    assert msg["userId"] == "42" and msg["anonymousId"] is None  # both keys, as the official client
    assert msg["event"] == "Signed Up"
    assert msg["properties"] == {"plan": "pro"}
    assert returned["messageId"] == msg["messageId"]


def test_identify_fields(collector: Collector, make_client: Callable[..., cdpmp.Client]) -> None:
    client = make_client()
    client.identify(anonymous_id="anon-1", traits={"email": "a@example.com"})
    msg = _sent(collector, client)
    _common(msg, "identify")
    assert msg["anonymousId"] == "anon-1" and msg["userId"] is None
    assert msg["traits"] == {"email": "a@example.com"}


@pytest.mark.parametrize("kind", ["page", "screen"])
def test_page_and_screen_fields(
    kind: str, collector: Collector, make_client: Callable[..., cdpmp.Client]
) -> None:
    client = make_client()
    getattr(client, kind)("u1", "Docs", "Home", {"path": "/"})
    msg = _sent(collector, client)
    _common(msg, kind)
    assert (msg["userId"], msg["category"], msg["name"], msg["properties"]) == (
        "u1",
        "Docs",
        "Home",
        {"path": "/"},
    )


def test_group_fields_with_object_type(
    collector: Collector, make_client: Callable[..., cdpmp.Client]
) -> None:
    client = make_client()
    client.group("u1", "acme", {"name": "Acme"}, object_type_id=3)
    msg = _sent(collector, client)
    _common(msg, "group")
    assert (msg["groupId"], msg["traits"], msg["objectTypeId"]) == ("acme", {"name": "Acme"}, "3")


def test_group_object_type_from_traits(
    collector: Collector, make_client: Callable[..., cdpmp.Client]
) -> None:
    client = make_client()
    traits = {"name": "Acme", "object_type_id": "2"}
    client.group(user_id="u1", group_id="acme", traits=traits)
    msg = _sent(collector, client)
    assert msg["objectTypeId"] == "2"
    assert traits == {"name": "Acme", "object_type_id": "2"}


def test_alias_fields(collector: Collector, make_client: Callable[..., cdpmp.Client]) -> None:
    client = make_client()
    client.alias(previous_id="anon-1", user_id="u1")
    msg = _sent(collector, client)
    _common(msg, "alias")
    assert (msg["previousId"], msg["userId"]) == ("anon-1", "u1")


def test_caller_supplied_ids_context_integrations_timestamp(
    collector: Collector, make_client: Callable[..., cdpmp.Client]
) -> None:
    client = make_client()
    context = {"ip": "127.0.0.1", "library": {"name": "other"}}
    when = dt.datetime(2024, 1, 2, 3, 4, 5, 678000, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    client.track("u1", "E", context=context, integrations={"All": False}, timestamp=when, message_id="mid-1")
    msg = _sent(collector, client)
    assert msg["messageId"] == "mid-1"
    assert msg["timestamp"] == "2024-01-02T03:04:05.678+02:00"
    assert msg["integrations"] == {"All": False}
    assert msg["context"] == {"ip": "127.0.0.1", "library": LIBRARY}
    assert context == {"ip": "127.0.0.1", "library": {"name": "other"}}  # not mutated


def test_request_envelope_headers_and_basic_auth(
    collector: Collector, make_client: Callable[..., cdpmp.Client]
) -> None:
    client = make_client()
    client.track("u1", "E")
    _sent(collector, client)
    (request,) = collector.requests
    assert request.status == 200
    assert request.auth_scheme == "Basic"
    assert request.user_agent.startswith(f"cdpmp/{cdpmp.__version__}")
    assert request.content_encoding == ""


def test_gzip_body_is_accepted(collector: Collector, make_client: Callable[..., cdpmp.Client]) -> None:
    client = make_client(gzip=True)
    for i in range(20):
        client.track("u1", "E", {"i": i})
    assert client.flush(timeout=5)
    assert collector.wait_for(20)
    assert {r.content_encoding for r in collector.requests} == {"gzip"}


@pytest.mark.parametrize("key", ["pk_us_abc", "sk_eu_abc"])
def test_region_keys_use_bearer_auth(key: str, make_client: Callable[..., cdpmp.Client]) -> None:
    with Collector(write_key=key) as strict:
        client = make_client(write_key=key, endpoint=strict.url)
        client.track("u1", "E")
        assert client.flush(timeout=5)
        assert strict.wait_for(1)
        assert strict.requests[0].auth_scheme == "Bearer"


def test_wrong_key_is_rejected_by_the_collector_and_reported(
    make_client: Callable[..., cdpmp.Client],
) -> None:
    errors = []
    with Collector(write_key="right") as strict:
        client = make_client(
            write_key="wrong", endpoint=strict.url, on_error=lambda e, b: errors.append((e, b))
        )
        client.track("u1", "E")
        client.flush(timeout=5)
        assert [r.status for r in strict.requests] == [401]  # 401 is final: no retry
    assert isinstance(errors[0][0], cdpmp.APIError) and errors[0][0].status == 401
    assert "wrong" not in str(errors[0][0])


def test_region_endpoint_defaults() -> None:
    env: Dict[str, str] = {}
    assert resolve({"write_key": "pk_eu_x"}, env=env).endpoint == EU_ENDPOINT
    assert resolve({"write_key": "sk_eu_x"}, env=env).endpoint == EU_ENDPOINT
    assert resolve({"write_key": "pk_us_x"}, env=env).endpoint == US_ENDPOINT
    assert resolve({"write_key": "plainkey"}, env=env).endpoint == US_ENDPOINT
    assert resolve({"write_key": "plainkey"}, env=env).bearer is False
    assert (
        resolve({"write_key": "pk_eu_x", "endpoint": "http://127.0.0.1:1/"}, env=env).endpoint
        == "http://127.0.0.1:1"
    )
    assert (
        resolve({"write_key": "k"}, env={"CDP_ENDPOINT": "http://127.0.0.1:2"}).endpoint
        == "http://127.0.0.1:2"
    )


def test_proxies_setting_routes_through_the_proxy(make_client: Callable[..., cdpmp.Client]) -> None:
    with Collector() as proxy:
        # Nothing listens on the endpoint: only a client that uses the proxy delivers.
        client = make_client(
            write_key=proxy.write_key, endpoint="http://127.0.0.9:9", proxies={"http": proxy.url}
        )
        client.track("u1", "E")
        assert client.flush(timeout=5)
        assert proxy.wait_for(1) and proxy.requests[0].via_proxy


def test_environment_proxy_is_used_when_no_proxies_setting(
    make_client: Callable[..., cdpmp.Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    with Collector() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("NO_PROXY", "")
        client = make_client(write_key=proxy.write_key, endpoint="http://127.0.0.9:9")
        client.track("u1", "E")
        assert client.flush(timeout=5)
        assert proxy.requests[0].via_proxy
