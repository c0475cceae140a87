"""Real data and real code: what data code hands ``track()`` (numpy and pandas values,
enums, number subclasses, ``Decimal`` ids) arrives as the JSON a user expects, and the
official module's surface that real code touches keeps working (``DefaultConfig``,
``VERSION``, a subclass assigning ``queue``, imports and patch strings through
``cdpmp.as_customerio``). Counted at the collector by messageId, in both modes, and
compared with the official client in a differential run.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import subprocess
import sys
import textwrap
from typing import Any, Dict, List, Optional

import pytest

import cdpmp
from cdpmp import analytics
from cdpmp._message import serialize
from cdpmp.testing import Collector

np = pytest.importorskip("numpy")
pd = pytest.importorskip("pandas")


class Money(float):
    pass


class Count(int):
    pass


class Color(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


# value → the JSON value a user expects on the wire (issue 30's table, and more)
EXPECTED: Dict[str, Any] = {
    "float64": (np.float64(1.5), 1.5),
    "float64_nan": (np.float64("nan"), None),
    "float64_inf": (np.float64("-inf"), None),
    "float_subclass": (Money(2.5), 2.5),
    "int_subclass": (Count(7), 7),
    "int64": (np.int64(3), 3),
    "int32": (np.int32(-7), -7),
    "uint8": (np.uint8(200), 200),
    "float32": (np.float32(0.25), 0.25),
    "bool_": (np.bool_(True), True),
    "array": (np.array([1, 2, 3]), [1, 2, 3]),
    "array_2d": (np.array([[1.5, np.nan], [3.0, 4.0]]), [[1.5, None], [3.0, 4.0]]),
    "array_0d": (np.array(3), 3),
    "series": (pd.Series([1, 2]), [1, 2]),
    "NaT": (pd.NaT, None),
    "NA": (pd.NA, None),
    "Timestamp": (pd.Timestamp("2024-01-01 12:00:00.123456789"), "2024-01-01T12:00:00.123456789+00:00"),
    "Timestamp_tz": (pd.Timestamp("2024-01-01 12:00", tz="UTC"), "2024-01-01T12:00:00+00:00"),
    "datetime64": (np.datetime64("2024-01-01T12:00:00.5"), "2024-01-01T12:00:00.500000+00:00"),
    "datetime64_ns": (np.datetime64("2024-01-01T00:00:00.000000001", "ns"), "2024-01-01T00:00:00+00:00"),
    "datetime64_NaT": (np.datetime64("NaT"), None),
    "timedelta64": (np.timedelta64(1500, "ms"), 1.5),
    "Timedelta": (pd.Timedelta(seconds=90), 90.0),
    "timedelta": (dt.timedelta(minutes=2), 120.0),
    "enum": (Color.RED, "red"),
    "int_enum": (Level.HIGH, 3),
    "decimal": (decimal.Decimal("19.99"), 19.99),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_value_kind_is_sent_as_the_json_a_user_expects(name: str) -> None:
    value, expected = EXPECTED[name]
    sent = serialize({"v": value, "nested": [{"v": value}]})
    import orjson

    assert orjson.loads(sent) == {"v": expected, "nested": [{"v": expected}]}


def test_enum_keys_go_by_their_value() -> None:
    assert serialize({Color.RED: 1, Level.HIGH: 2, "k": {Color.RED: Level.HIGH}}) == (
        b'{"red":1,"3":2,"k":{"red":3}}'
    )


def test_an_array_no_message_could_hold_is_refused_as_oversize_without_building_it() -> None:
    client = cdpmp.Client("k", send=False)
    ok, _ = client.track("u", "E", {"samples": np.zeros(10**7)})
    assert ok is False and client.stats()["dropped"]["oversize"] == 1


@pytest.mark.parametrize("mode", ["direct", "shared"])
def test_a_pandas_row_arrives_as_numbers_in_every_mode(
    mode: str, collector: Collector, request: pytest.FixtureRequest
) -> None:
    if mode == "shared":
        request.getfixturevalue("runtime_dir")
    frame = pd.DataFrame(
        {
            "user": ["a", "b", "c"],
            "amount": [1.5, np.nan, 3.25],
            "count": [1, 2, 3],
            "flag": [True, False, True],
            "at": pd.to_datetime(["2024-01-01", None, "2024-01-03"]),
        }
    )
    client = cdpmp.Client(collector.write_key, endpoint=collector.url, mode=mode, upload_interval=0.05)
    ids = []
    for row in frame.to_dict("records"):
        ok, msg = client.track(user_id=row.pop("user"), event="Row", properties=row)
        assert ok, msg
        ids.append(msg["messageId"])
    assert client.flush(30) is True
    by_id = {m["messageId"]: m["properties"] for m in collector.messages}
    assert sorted(by_id) == sorted(ids) and collector.duplicates() == {}
    assert [by_id[i] for i in ids] == [
        {"amount": 1.5, "count": 1, "flag": True, "at": "2024-01-01T00:00:00+00:00"},
        {"amount": None, "count": 2, "flag": False, "at": None},
        {"amount": 3.25, "count": 3, "flag": True, "at": "2024-01-03T00:00:00+00:00"},
    ]
    client.shutdown(2)


@pytest.mark.parametrize(
    ("value", "sent"),
    [(decimal.Decimal("42"), "42"), (np.int64(77), "77"), (decimal.Decimal("4.50"), "4.50"), (3.5, "3.5")],
)
def test_every_id_the_official_client_takes_is_taken_and_sent_as_it_sends_it(value: Any, sent: str) -> None:
    client = cdpmp.Client("k", send=False)
    for call in (
        lambda: client.track(user_id=value, event="E"),
        lambda: client.identify(anonymous_id=value),
        lambda: client.alias(previous_id=value, user_id=value),
        lambda: client.group(user_id="u", group_id=value),
    ):
        ok, msg = call()
        assert ok
        ids = {k: v for k, v in msg.items() if k in ("userId", "anonymousId", "previousId", "groupId") and v}
        assert set(ids.values()) <= {sent, "u"} and sent in ids.values()


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (True, cdpmp.InvalidArgumentType),
        (np.bool_(True), cdpmp.InvalidArgumentType),
        (float("nan"), cdpmp.InvalidArgument),
        (decimal.Decimal("NaN"), cdpmp.InvalidArgument),
        (np.float64("inf"), cdpmp.InvalidArgument),
        ([1], cdpmp.InvalidArgumentType),
    ],
)
def test_ids_that_would_send_nonsense_are_refused_naming_the_argument(value: Any, error: type) -> None:
    with pytest.raises(error, match="user_id"):
        cdpmp.Client("k", send=False).track(user_id=value, event="E")


def test_a_plain_value_path_never_imports_numpy_or_pandas() -> None:
    script = """
        import sys, cdpmp
        c = cdpmp.Client("k", send=False)
        class Money(float): pass
        assert c.track("u", "E", {"a": 1.5, "m": Money(2.0), "n": None})[0]
        assert "numpy" not in sys.modules and "pandas" not in sys.modules, "imported"
    """
    subprocess.run([sys.executable, "-c", textwrap.dedent(script)], check=True, timeout=60)


# -- the official module's surface -------------------------------------------------------


def test_default_config_restores_the_defaults_as_test_teardowns_do(collector: Collector) -> None:
    config = cdpmp.Client.DefaultConfig
    assert config.write_key is None and config.host is None and config.upload_size == 100
    analytics.write_key, analytics.endpoint = collector.write_key, collector.url
    analytics.max_queue_size = 3
    analytics.max_queue_size = config.max_queue_size  # a teardown restoring the default
    analytics.max_retries = config.max_retries
    client = analytics._client()
    assert client.settings.max_queue_size == 10000 and client.settings.max_retries is None


def test_the_version_is_where_the_official_module_keeps_it() -> None:
    from cdpmp.version import VERSION

    assert analytics.VERSION == analytics.__version__ == VERSION == cdpmp.__version__


def test_a_subclass_may_assign_queue(collector: Collector) -> None:
    import queue

    class Mine(cdpmp.Client):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.queue = queue.Queue(maxsize=5)

    client = Mine(collector.write_key, endpoint=collector.url, upload_interval=0.05)
    assert client.queue.maxsize == 5
    ok, msg = client.track("u", "E")
    assert ok and client.flush(10) and collector.message_ids() == [msg["messageId"]]
    client.shutdown(2)


ALIAS_APP = """
    import cdpmp.as_customerio  # the one line
    from unittest import mock
    import cdpmp
    from customerio import analytics
    import customerio.analytics
    from customerio.analytics import Client
    from customerio.analytics.version import VERSION

    assert analytics is cdpmp.analytics and customerio.analytics is cdpmp.analytics
    assert Client is cdpmp.Client and VERSION == cdpmp.__version__

    def signup(user):  # the app's code, written for the official module
        return analytics.track(user, "Signed Up")

    with mock.patch("customerio.analytics.track") as track:  # the app's test, unchanged
        signup("u1")
    track.assert_called_once_with("u1", "Signed Up")
    analytics.write_key, analytics.endpoint = "test-write-key", {url!r}
    assert signup("u2")[0] and analytics.flush(10)
    print("ok")
"""


@pytest.mark.parametrize("official", ["installed", "absent"])
def test_one_line_keeps_imports_and_patch_strings_working(official: str, collector: Collector) -> None:
    script = textwrap.dedent(ALIAS_APP.format(url=collector.url))
    if official == "absent":  # as if the official package were not installed
        script = "import sys\nsys.modules['customerio'] = None\n" + script
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    assert collector.wait_for(1) and [m["userId"] for m in collector.messages] == ["u2"]


# -- a differential run against the official client ---------------------------------------

#: Where cdpmp sends another JSON type than the official client, on purpose (each is in
#: docs/migrating.md): pandas' NaT is "missing", not the string "NaT".
INTENDED = {"NaT": ("string", "null")}


def _json_kind(value: Any) -> str:
    kinds = {dict: "object", list: "array", str: "string", bool: "bool", int: "number", float: "number"}
    return kinds.get(type(value), "null")


def _arrived(collector: Collector, send: Any, name: str) -> Optional[List[Any]]:
    """What arrived of property ``name`` (None when the call raised or nothing came)."""
    collector.reset()
    try:
        send()
    except Exception:  # the official client raises TypeError for numpy integers
        return None
    values = [m["properties"][name] for m in collector.messages if name in m["properties"]]
    return values or None


def test_no_value_the_official_client_sends_is_refused_or_retyped(collector: Collector) -> None:
    official = pytest.importorskip("customerio.analytics")
    lax = Collector(write_key=collector.write_key, strict=False)
    differences = {}
    with lax:
        theirs = official.Client(lax.write_key, host=lax.url, sync_mode=True, max_retries=0)
        ours = cdpmp.Client(lax.write_key, endpoint=lax.url, sync_mode=True)
        for name, (value, _) in sorted(EXPECTED.items()):
            sent = _arrived(lax, lambda n=name, v=value: theirs.track("u", "E", {n: v}), name)
            if sent is None:
                continue  # the official client refused or dropped it: nothing to match
            got = _arrived(lax, lambda n=name, v=value: ours.track("u", "E", {n: v}), name)
            assert got is not None, f"{name}: the official client sends {sent}, cdpmp sent nothing"
            if _json_kind(sent[0]) != _json_kind(got[0]):
                differences[name] = (_json_kind(sent[0]), _json_kind(got[0]))
    assert differences == INTENDED
