"""A hypothesis fuzz of the public API, run by ``test_hostile`` in its own interpreter
(a crash or a hang then fails that test, not the suite).

Values: cyclic, deep, wide, huge, with odd tzinfos, non-finite numbers and odd keys.
Each call must return ``(bool, msg)`` within hypothesis' deadline or raise one of
cdpmp's documented exceptions; what it accepts must encode to strict JSON.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import math
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cdpmp
from cdpmp._message import serialize


class _RaisingTz(dt.tzinfo):
    def utcoffset(self, d: Any) -> dt.timedelta:
        raise RuntimeError("broken tz")

    def dst(self, d: Any) -> dt.timedelta:
        raise RuntimeError("broken tz")

    def tzname(self, d: Any) -> str:
        raise RuntimeError("broken tz")


class _NoneTz(dt.tzinfo):
    def utcoffset(self, d: Any) -> None:
        return None

    def dst(self, d: Any) -> None:
        return None


tzinfos = st.sampled_from(
    [None, dt.timezone.utc, dt.timezone(dt.timedelta(hours=-7)), _RaisingTz(), _NoneTz()]
)
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    # Built lazily: hypothesis repr()s its strategies, and str() refuses 10**5000.
    st.sampled_from([5000, 20, 19]).map(lambda digits: -(10**digits) if digits == 20 else 10**digits),
    st.floats(allow_nan=True, allow_infinity=True),
    st.decimals(allow_nan=True, allow_infinity=True),
    st.sampled_from([decimal.Decimal("1e400"), decimal.Decimal("-1e-999"), decimal.Decimal("sNaN")]),
    st.text(max_size=30),
    st.binary(max_size=10),
    st.builds(lambda d, tz: d.replace(tzinfo=tz), st.datetimes(), tzinfos),
    st.builds(lambda t, tz: t.replace(tzinfo=tz), st.times(), tzinfos),
    st.dates(),
)
keys = st.one_of(
    st.text(max_size=10), st.integers(), st.binary(max_size=5), st.sampled_from(["a\nb", "1", 1])
)
values = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.tuples(children, children),
        st.dictionaries(keys, children, max_size=5),
    ),
    max_leaves=30,
)


def _knot(value: Any, how: int) -> Any:
    """Make ``value`` refer to itself (once or twice), or nest it deeply."""
    if how == 1 and isinstance(value, dict):
        value["self"] = value
        value["again"] = value
    elif how == 2 and isinstance(value, list):
        value.append(value)
    elif how == 3:
        for _ in range(300):
            value = [value]
    return value


def _strict_json(data: bytes) -> None:
    def refuse(name: str) -> Any:
        raise AssertionError(f"non-standard JSON constant {name}")

    decoded = json.loads(data, parse_constant=refuse)

    def finite(node: Any) -> None:
        if isinstance(node, float):
            assert math.isfinite(node)
        elif isinstance(node, list):
            for item in node:
                finite(item)
        elif isinstance(node, dict):
            for item in node.values():
                finite(item)

    finite(decoded)


@settings(max_examples=300, deadline=2000, suppress_health_check=list(HealthCheck), derandomize=True)
@given(
    value=values, how=st.integers(min_value=0, max_value=3), where=st.sampled_from(["properties", "context"])
)
def _fuzz(value: Any, how: int, where: str) -> None:
    client = cdpmp.Client("k", send=False)
    payload = {"v": _knot(value, how)}
    ok, msg = client.track("u", "E", **{where: payload})
    assert isinstance(ok, bool) and isinstance(msg, dict)
    if ok:
        _strict_json(serialize(msg))
    else:
        dropped = client.stats()["dropped"]
        assert dropped["oversize"] + dropped["unserializable"] == 1


def main() -> None:
    _fuzz()
    print("fuzzed")
