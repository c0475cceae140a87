"""Input: argument validation, timestamps, value coercion, oversize, arbitrary values."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import logging
import uuid
from typing import Any, Callable, Dict, List, Tuple

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cdpmp
from cdpmp._message import format_timestamp, serialize
from cdpmp.testing import Collector


@pytest.fixture
def offline(make_client: Callable[..., cdpmp.Client]) -> cdpmp.Client:
    return make_client(send=False)


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda c: c.track("u", 123), "event"),
        (lambda c: c.track("u", None), "event"),
        (lambda c: c.track(user_id=["u"], event="E"), "user_id"),
        (lambda c: c.track(user_id=True, event="E"), "user_id"),
        (lambda c: c.track("u", "E", properties=[1]), "properties"),
        (lambda c: c.track("u", "E", context="ctx"), "context"),
        (lambda c: c.track("u", "E", integrations=1), "integrations"),
        (lambda c: c.track("u", "E", timestamp=12345), "timestamp"),
        (lambda c: c.track("u", "E", timestamp="not a date"), "timestamp"),
        (lambda c: c.track("u", "E", message_id=object()), "message_id"),
        (lambda c: c.identify("u", traits="x"), "traits"),
        (lambda c: c.page("u", name=5), "name"),
        (lambda c: c.screen("u", category=5), "category"),
        (lambda c: c.group("u", None), "group_id"),
        (lambda c: c.group("u", "g", traits=5), "traits"),
        (lambda c: c.alias(None, "u"), "previous_id"),
        (lambda c: c.alias("a", None), "user_id"),
        (lambda c: c.track(event="E"), "user_id or anonymous_id"),
        (lambda c: c.identify(traits={}), "user_id or anonymous_id"),
        (lambda c: c.page(name="Home"), "user_id or anonymous_id"),
    ],
)
def test_bad_arguments_raise_typed_errors_naming_the_argument(
    offline: cdpmp.Client, call: Callable[[cdpmp.Client], Any], argument: str
) -> None:
    with pytest.raises((cdpmp.InvalidArgumentType, cdpmp.InvalidArgument)) as info:
        call(offline)
    assert isinstance(info.value, (TypeError, ValueError))
    assert info.value.argument == argument  # type: ignore[union-attr]
    assert argument in str(info.value)


@pytest.mark.parametrize(
    ("option", "value", "error"),
    [
        ("max_queue_size", "10", TypeError),
        ("max_queue_size", 0, ValueError),
        ("upload_size", 1.5, TypeError),
        ("upload_interval", -1, ValueError),
        ("timeout", float("nan"), ValueError),
        ("on_error", "print", TypeError),
        ("send", "yes", TypeError),
        ("mode", "bogus", ValueError),
        ("endpoint", "ftp://127.0.0.1", ValueError),
    ],
)
def test_bad_settings_raise_naming_the_setting(option: str, value: Any, error: type) -> None:
    with pytest.raises(error) as info:
        cdpmp.Client("key", **{option: value})
    assert option in str(info.value)


def test_missing_write_key_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CDP_WRITE_KEY", raising=False)
    with pytest.raises(cdpmp.ConfigurationError, match=r"write_key.*CDP_WRITE_KEY") as info:
        cdpmp.Client()
    # Also what the official client raises, for code that catches it.
    assert isinstance(info.value, cdpmp.MissingWriteKey) and isinstance(info.value, AssertionError)


def test_a_host_without_a_scheme_means_https_and_is_reported_as_given(collector: Collector) -> None:
    client = cdpmp.Client("k", host="cdp.customer.io", send=False)
    assert client.host == "cdp.customer.io" and client.settings.endpoint == "https://cdp.customer.io"
    with pytest.raises(cdpmp.ConfigurationError, match="endpoint: must start with http"):
        cdpmp.Client("k", host="ftp://cdp.customer.io")


def test_a_region_key_sent_to_the_other_region_warns_once_per_client(
    caplog: pytest.LogCaptureFixture,
) -> None:
    key = "sk_eu_" + "a" * 32 + "_abcdef"
    with caplog.at_level("WARNING", logger="cdpmp"):
        client = cdpmp.Client(key, host="https://cdp.customer.io/", send=False)
        for _ in range(3):
            client.track("u", "E")
        cdpmp.Client(key, host="https://cdp-eu.customer.io", send=False)  # its own region: silent
    lines = [r.getMessage() for r in caplog.records if "API key" in r.getMessage()]
    assert lines == ["cdpmp: EU API key is being sent to the US host https://cdp.customer.io"]
    assert key not in caplog.text


def test_write_key_never_in_repr_logs_or_errors(
    collector: Collector, caplog: pytest.LogCaptureFixture, make_client: Callable[..., cdpmp.Client]
) -> None:
    secret = "sk_us_SECRET123"
    caplog.set_level(logging.DEBUG, logger="cdpmp")
    errors: List[Exception] = []
    client = make_client(write_key=secret, debug=True, on_error=lambda e, b: errors.append(e))
    client.track("u", "E")
    client.flush(timeout=5)  # the collector expects another key: 401, reported
    text = repr(client) + repr(client.settings) + caplog.text + "".join(map(str, errors))
    assert errors and secret not in text and "SECRET123" not in text


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (dt.datetime(2024, 1, 2, 3, 4, 5), "2024-01-02T03:04:05.000+00:00"),
        (
            dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=-5))),
            "2024-01-02T03:04:05.000-05:00",
        ),
        (dt.date(2024, 1, 2), "2024-01-02T00:00:00.000+00:00"),
        ("2024-01-02T03:04:05Z", "2024-01-02T03:04:05.000+00:00"),
        ("2024-01-02T03:04:05.123456+01:00", "2024-01-02T03:04:05.123+01:00"),
        ("2024-01-02", "2024-01-02T00:00:00.000+00:00"),
    ],
)
def test_timestamp_rules(value: Any, expected: str) -> None:
    assert format_timestamp(value) == expected


class Color(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Point:
    x: int
    y: int


class Opaque:
    def __str__(self) -> str:
        return "opaque!"


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no")


COERCIONS: List[Tuple[Any, Any]] = [
    (dt.datetime(2024, 1, 2, 3, 4, 5), "2024-01-02T03:04:05+00:00"),
    (dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc), "2024-01-02T03:04:05+00:00"),
    (dt.date(2024, 1, 2), "2024-01-02"),
    (decimal.Decimal("19.990000000000000001"), decimal.Decimal("19.990000000000000001")),
    (decimal.Decimal("NaN"), "NaN"),
    (uuid.UUID("12345678-1234-5678-1234-567812345678"), "12345678-1234-5678-1234-567812345678"),
    ({3}, [3]),
    (frozenset({4}), [4]),
    ((1, 2), [1, 2]),
    (Color.RED, "red"),
    (b"caf\xc3\xa9", "café"),
    (b"\xff", "\ufffd"),
    (Point(1, 2), {"x": 1, "y": 2}),
    (2**70, str(2**70)),
    ({1: "a", Color.RED: "b"}, {"1": "a", "red": "b"}),
    (Opaque(), "opaque!"),
    ([Opaque(), {"deep": {Opaque()}}], ["opaque!", {"deep": ["opaque!"]}]),
]


@pytest.mark.parametrize(("value", "expected"), COERCIONS)
def test_value_coercion_reaches_the_collector(
    value: Any, expected: Any, collector: Collector, make_client: Callable[..., cdpmp.Client]
) -> None:
    client = make_client()
    props = {"v": value}
    ok, _ = client.track("u", "E", props)
    assert ok
    assert client.flush(timeout=5) and collector.wait_for(1)
    received = collector.messages[0]["properties"]["v"]
    if isinstance(expected, decimal.Decimal):
        assert decimal.Decimal(str(received)) == expected or received == float(expected)
    else:
        assert received == expected
    assert props == {"v": value}  # never mutated


def test_decimal_keeps_every_digit() -> None:
    body = serialize({"v": decimal.Decimal("19.990000000000000001")})
    assert body == b'{"v":19.990000000000000001}'


def test_unknown_type_warns_once_with_key_path(
    caplog: pytest.LogCaptureFixture, offline: cdpmp.Client
) -> None:
    class Weird:
        pass

    caplog.set_level(logging.WARNING, logger="cdpmp")
    for _ in range(3):
        assert offline.track("u", "E", {"outer": {"inner": Weird()}})[0]
    lines = [r.getMessage() for r in caplog.records if "Weird" in r.getMessage()]
    assert len(lines) == 1 and "message.properties.outer.inner" in lines[0]


def test_value_whose_str_raises_is_rejected_not_raised(offline: cdpmp.Client) -> None:
    errors: List[Exception] = []
    offline._ledger.on_error = lambda e, b: errors.append(e)
    ok, msg = offline.track("u", "E", {"bad": Unprintable()})
    assert not ok and msg["event"] == "E"
    assert offline.stats()["dropped"]["unserializable"] == 1
    assert isinstance(errors[0], cdpmp.MessageRejected) and errors[0].reason == "unserializable"


def test_oversize_message_is_rejected_counted_reported_and_does_not_poison_the_batch(
    collector: Collector, make_client: Callable[..., cdpmp.Client]
) -> None:
    errors: List[Tuple[Exception, List[Dict[str, Any]]]] = []
    client = make_client(on_error=lambda e, b: errors.append((e, b)))
    _, before = client.track("u", "E", {"i": 1})
    ok, big = client.track("u", "E", {"blob": "x" * 33_000})
    _, after = client.track("u", "E", {"i": 2})
    assert not ok
    assert client.flush(timeout=5)
    assert set(collector.message_ids()) == {before["messageId"], after["messageId"]}
    assert client.stats()["dropped"]["oversize"] == 1
    assert errors[0][0].reason == "oversize"  # type: ignore[attr-defined]
    assert errors[0][1][0]["messageId"] == big["messageId"]


json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.binary(max_size=10),
    st.decimals(),
    st.uuids(),
    st.datetimes(),
    st.dates(),
    st.builds(Opaque),
    st.sampled_from(list(Color)),
)
nested = st.recursive(
    json_leaf,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.tuples(children, children),
        st.frozensets(st.integers(), max_size=3),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), children, max_size=4),
    ),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(props=st.dictionaries(st.text(max_size=10), nested, max_size=5))
def test_arbitrary_values_never_crash_and_arrive_as_valid_json(
    props: Dict[str, Any], collector: Collector
) -> None:
    client = cdpmp.Client(collector.write_key, endpoint=collector.url, sync_mode=True)
    before = len(collector.messages)
    ok, msg = client.track("u", "E", props)
    if ok:
        assert collector.messages[before]["messageId"] == msg["messageId"]
        orjson.dumps(collector.messages[before])
    else:
        dropped = client.stats()["dropped"]
        assert dropped["oversize"] + dropped["unserializable"] == 1


# -- code people really write ----------------------------------------------------------------


class Shade(str, enum.Enum):
    RED = "red"


class SafeText(str):  # as Django's SafeString
    pass


def _str_keys() -> List[Any]:
    keys: List[Any] = [Shade.RED, SafeText("red")]
    if hasattr(enum, "StrEnum"):  # 3.11+
        keys.append(enum.StrEnum("Tone", {"RED": "red"}).RED)  # type: ignore[attr-defined]
    return keys


@pytest.mark.parametrize("key", _str_keys(), ids=lambda k: type(k).__name__)
def test_str_subclass_keys_and_values_are_sent_by_their_string_value(
    key: Any, collector: Collector, make_client: Callable[..., cdpmp.Client]
) -> None:
    client = make_client()
    ok, msg = client.track("u", "E", {key: 1, "nested": {key: [key]}}, message_id="k")
    assert ok and msg["properties"] == {"red": 1, "nested": {"red": ["red"]}}
    assert client.flush(timeout=5) and collector.wait_for(1)
    assert collector.messages[0]["properties"] == {"red": 1, "nested": {"red": ["red"]}}


def test_lone_surrogates_are_replaced_and_the_event_is_sent(
    collector: Collector, make_client: Callable[..., cdpmp.Client]
) -> None:
    client = make_client()
    # "caf\udce9": what b"caf\xe9".decode("utf-8", "surrogateescape") leaves; a pair
    # of surrogates is the character it encodes.
    ok, msg = client.track("u", "E", {"v": "caf\udce9", "k\udc80": 1, "pair": "\ud83d\ude00"})
    assert ok
    expected = {"v": "caf\ufffd", "k\ufffd": 1, "pair": "\U0001f600"}
    assert msg["properties"] == expected
    assert client.flush(timeout=5) and collector.wait_for(1)
    assert collector.messages[0]["properties"] == expected


def test_the_returned_message_is_what_was_sent(offline: cdpmp.Client) -> None:
    ok, msg = offline.track("u", "E", {"x": decimal.Decimal("0.1"), "s": {4}, "b": b"caf\xc3\xa9", "n": 1})
    assert ok and msg["properties"] == {"x": 0.1, "s": [4], "b": "café", "n": 1}
    props = {"plain": 1}
    ok, msg = offline.track("u", "E", props)
    assert msg["properties"] is props  # nothing coerced: no copy made


DAG = """
import collections, resource, sys, cdpmp
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
node = collections.OrderedDict(leaf=1)
for depth in range(40):  # 2**40 leaves once expanded; every level shared twice
    node = collections.OrderedDict(a=node, b=[node, node]) if depth % 2 else type("L", (list,), {})([node, node])
client = cdpmp.Client("k", send=False)
ok, _ = client.track("u", "E", {"dag": node})
print(ok, client.stats()["dropped"]["oversize"])
"""


def test_a_dag_of_dict_and_list_subclasses_is_refused_not_expanded() -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", DAG], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "1"]
