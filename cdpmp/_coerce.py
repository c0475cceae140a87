"""What a value orjson does not write by itself is sent as: the coercion rules.

==============================  ==================================================
value                           sent as
==============================  ==================================================
datetime / date / time          ISO-8601 string; a naive datetime is taken as UTC
(pandas ``Timestamp`` too)      (all its digits: nanoseconds stay)
pandas ``NaT`` / ``NA``         ``null``
numpy ``datetime64``            as a datetime (microseconds); ``NaT``: ``null``
timedelta (pandas             the number of seconds (a float)
``Timedelta``, numpy
``timedelta64``)
Decimal                         a JSON number with all its digits; str when it is
                                not finite or beyond a double's range (±1e308)
float NaN / ±infinity           ``null`` (JSON has no such numbers)
``int``/``float`` subclass      the number (numpy ``float64`` is one)
numpy scalar (``int64``,        the number or boolean it holds
``float32``, ``bool_``...)
numpy array, pandas Series      a list (nested for n-d); a 0-d array: its value
UUID                            its canonical string
set / frozenset / tuple         a list
Enum                            its value
bytes / bytearray               UTF-8 text (undecodable bytes become U+FFFD)
dataclass instance              a dict of its fields
int beyond 64 bits              a string of its digits
non-str dict key                ``str(key)`` (bytes keys: UTF-8 text; an Enum
                                key: its value); two keys that become the same
                                string refuse the message
anything else                   ``str(value)``, with a one-time warning per key path
==============================  ==================================================

numpy and pandas values are recognised by what they are (``dtype`` and ``tolist``, the
class name of pandas' ``NA``), never by importing either: a process without them pays
nothing, and a plain ``dict``/``str``/``int``/``float`` value never reaches this module
(orjson writes those itself).

Refused (``(False, msg)``, counted as ``unserializable``): a datetime whose ``tzinfo``
raises, an int too long for ``str()``, an object whose ``str()`` raises.
"""

from __future__ import annotations

import datetime as _dt
from decimal import Decimal
from typing import Any, Optional

import orjson

_UTC = _dt.timezone.utc
_DOUBLE_EXP = 308
#: More values than this cannot fit in a 32 KiB message (each takes a byte and a comma).
MAX_PARTS = 32 * 1024


class Unencodable(ValueError):
    """The message cannot be encoded; ``reason`` is the counter it is charged to."""

    def __init__(self, detail: str, reason: str = "unserializable") -> None:
        self.reason = reason
        super().__init__(detail)


class NeedsWalk(Exception):
    """Raised from the orjson hook: this value needs the path-aware slow path."""


def iso(value: Any) -> Optional[str]:
    """ISO-8601 for datetime/date/time; a naive datetime is UTC; pandas' ``NaT`` (a
    datetime that is not equal to itself) is None. A ``tzinfo`` that raises refuses
    the message instead of reaching any C serialiser."""
    try:
        if isinstance(value, _dt.datetime):
            if value != value:  # pandas NaT, "not a time"
                return None
            if value.tzinfo is None or value.utcoffset() is None:
                value = value.replace(tzinfo=_UTC)
        return str(value.isoformat())
    except Exception as exc:  # noqa: BLE001 - a user's tzinfo may raise anything
        raise Unencodable(f"a {type(value).__name__} whose tzinfo raised {type(exc).__name__}") from None


def decimal(value: Decimal) -> Any:
    if value.is_finite() and abs(value.adjusted()) <= _DOUBLE_EXP:
        return orjson.Fragment(str(value).encode())
    return str(value)


# Calls of default() for values the returned message should show coerced: a change
# during serialize() means the sent message differs from the caller's. Datetimes are
# left out: the official client returns them as the caller's objects too (its own
# suite asserts it), and sending them as ISO strings is the wire's business.
coerced = [0]


def default(value: Any) -> Any:
    """orjson's ``default`` hook: ``value`` as something orjson writes, or
    :class:`NeedsWalk` when only the path-aware walk can decide."""
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return iso(value)
    coerced[0] += 1  # racy across threads on purpose: a false "coerced" costs one loads()
    if isinstance(value, Decimal):
        return decimal(value)
    if isinstance(value, float):  # a subclass (numpy float64): orjson takes only float
        return float(value)
    if isinstance(value, (set, frozenset)):
        return list(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, _dt.timedelta):
        return value.total_seconds()
    dtype = getattr(value, "dtype", None)
    if dtype is not None and hasattr(value, "tolist"):
        return _numpy(value, getattr(dtype, "kind", ""))
    if type(value).__name__ == "NAType":  # pandas.NA: "missing"
        return None
    raise NeedsWalk


def _numpy(value: Any, kind: str) -> Any:
    """A numpy scalar or array (or a pandas Series) as Python values: ``tolist()``,
    after datetime64/timedelta64 values are brought to microseconds (in nanoseconds
    ``tolist()`` gives bare integers)."""
    if getattr(value, "size", 1) > MAX_PARTS:  # never build a list no message could hold
        raise Unencodable(f"an array of {value.size} values", reason="oversize")
    if kind == "M":
        value = value.astype("datetime64[us]")
    elif kind == "m":
        value = value.astype("timedelta64[us]")
    return value.tolist()
