"""Building one wire message and serialising it exactly once.

What each value inside ``properties``/``traits``/``context`` is sent as, and what is
refused, is stated (and done) in :mod:`cdpmp._coerce`. Refused as ``oversize``: a value
that expands to more nodes than a 32 KiB message can hold (shared references are
expanded, so this bounds the walk in time and memory); as ``unserializable``: a value
that refers to itself (a cycle), two keys that collide, and what :mod:`cdpmp._coerce`
refuses.

The fast path is one ``orjson.dumps`` call with a ``default`` hook for the types orjson
lacks; datetimes always go through the hook (``OPT_PASSTHROUGH_DATETIME``) so no C
code ever calls a user's ``tzinfo``. Only when it meets something it cannot coerce
without the key path (an unknown object, a huge int, a non-str key, nesting past
orjson's limit, a cycle) do we walk the value in Python, once, in time linear in its
expanded size, to build a JSON-safe copy. The caller's containers are never mutated.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import gc
import itertools
import logging
import math
import numbers
import os
import time
import uuid
from decimal import Decimal
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

import orjson
from dateutil.parser import isoparse

from ._coerce import NeedsWalk, Unencodable, coerced, decimal, default, iso
from .errors import InvalidArgument, InvalidArgumentType

logger = logging.getLogger("cdpmp")

MAX_MESSAGE_BYTES = 32 * 1024
_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME
MAX_DEPTH = 200  # orjson refuses > 254 levels; leave room for the envelope
_MAX_DEPTH = MAX_DEPTH
# Every node is at least one byte of JSON plus a separator: more nodes than this
# cannot fit in a 32 KiB message, so the walk stops there.
_MAX_NODES = MAX_MESSAGE_BYTES
_WARNED_LIMIT = 1024
_PATH_SHOWN = 120  # characters of a key path kept for a warning
_warned: Set[Tuple[str, str]] = set()
_UTC = _dt.timezone.utc


def log_safe(text: str, limit: int = _PATH_SHOWN) -> str:
    """User text made fit for one log line: bounded, control characters escaped."""
    short = text[:limit] + ("..." if len(text) > limit else "")
    return short.encode("unicode_escape", "backslashreplace").decode("ascii", "replace")


def _warn_once(path: str, value: object) -> None:
    key = (log_safe(path), type(value).__name__)
    if key in _warned or len(_warned) >= _WARNED_LIMIT:
        return
    _warned.add(key)
    logger.warning("cdpmp: value of type %s at %s was sent as str()", key[1], key[0])


class _Walk:
    """One slow-path walk: cycle detection over the current path, a node budget."""

    def __init__(self) -> None:
        self.active: Set[int] = set()
        self.nodes = 0

    def value(self, value: Any, path: str, depth: int) -> Any:
        self.nodes += 1
        if self.nodes > _MAX_NODES:
            raise Unencodable(f"a value with more than {_MAX_NODES} parts", reason="oversize")
        if isinstance(value, str):
            return _text(value)
        if value is None or isinstance(value, (bool, float)):
            return value
        if isinstance(value, int):
            if -(2**63) <= value < 2**64:
                return value
            return _int_str(value)
        if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
            return iso(value)
        if depth > _MAX_DEPTH:
            _warn_once(path, value)
            return _safe_str(value)
        if isinstance(value, (dict, list, tuple, set, frozenset)):
            ident = id(value)
            if ident in self.active:
                raise Unencodable(f"a value that contains itself at {log_safe(path)}")
            self.active.add(ident)
            try:
                return self._container(value, path, depth)
            finally:
                self.active.discard(ident)
        if isinstance(value, uuid.UUID):
            return str(value)
        if isinstance(value, enum.Enum):
            return self.value(value.value, path, depth + 1)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
            return self.value(fields, path, depth + 1)
        if isinstance(value, Decimal):
            return decimal(value)
        try:
            return self.value(default(value), path, depth + 1)
        except NeedsWalk:
            pass
        _warn_once(path, value)
        return _safe_str(value)

    def _container(self, value: Any, path: str, depth: int) -> Any:
        if isinstance(value, dict):
            out: Dict[str, Any] = {}
            for key, item in value.items():
                name = _text(key) if type(key) is str else _key_str(key)
                if name in out:
                    raise Unencodable(f"two keys of {log_safe(path)} both become {log_safe(name, 40)!r}")
                out[name] = self.value(item, f"{path}.{name[:40]}", depth + 1)
            return out
        items: List[Any] = [self.value(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value)]
        return items


def _int_str(value: int) -> str:
    try:
        return str(value)
    except ValueError:  # longer than sys.get_int_max_str_digits()
        raise Unencodable("an int too long to write in decimal") from None


def _text(value: str) -> str:
    """``value`` as a plain ``str`` JSON can carry: a subclass by its string value
    (Django's ``SafeString``); lone surrogates (left by a bad decode, which orjson and
    UTF-8 refuse) replaced by U+FFFD, while a pair of them becomes its character."""
    if type(value) is not str:
        value = str.__str__(value)
    if value.isascii():
        return value
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _key_str(key: object) -> str:
    if isinstance(key, enum.Enum):
        key = key.value  # class Color(str, Enum) / StrEnum / TextChoices: by value
    if isinstance(key, str):
        return _text(key)
    if isinstance(key, (bytes, bytearray)):
        return bytes(key).decode("utf-8", "replace")
    if isinstance(key, int) and not isinstance(key, bool):
        return _int_str(key)
    return _safe_str(key)


def _safe_str(value: object) -> str:
    # str() of a user object may itself raise; let that propagate to the caller of
    # serialize(), which turns it into a counted 'unserializable' rejection.
    return str(value)


_NESTED = (dict, list, tuple)
_LEAVES = frozenset({str, int, float, bool, type(None)})


def _fits(value: Any, budget: int, depth: int) -> int:
    """The node budget left once ``value`` is expanded, or -1: the fast path must not
    see it (a cycle, nesting past ``_MAX_DEPTH``, or more parts than a message can
    hold: a wide DAG of shared lists would make orjson write 2**depth items). Only
    containers recurse — subclasses too (orjson writes an OrderedDict or a list
    subclass as it does a dict: a DAG of them once took 6-12 s and 2.7 GB); the
    exact leaf types are tested first, by identity, for speed. A cycle runs out of
    depth or budget within 200 levels."""
    items = value.values() if isinstance(value, dict) else value
    budget -= len(items)
    if budget < 0 or depth > _MAX_DEPTH:
        return -1
    for item in items:
        kind = type(item)
        if kind in _LEAVES:
            continue
        if kind in _NESTED or isinstance(item, _NESTED):
            budget = _fits(item, budget, depth + 1)
            if budget < 0:
                return -1
    return budget


def serialize(message: Dict[str, Any]) -> bytes:
    """Serialise ``message`` to compact JSON bytes. Raises :class:`Unencodable` (or
    whatever a user object's ``str()`` raises) for a message that cannot be sent."""
    return serialize_sent(message)[0]


def serialize_sent(message: Dict[str, Any]) -> Tuple[bytes, Dict[str, Any]]:
    """:func:`serialize`, and the message as it will be sent: ``message`` itself when
    every value went as given, else the coerced copy (Decimal as a number, a set as a
    list, bytes as text...), as the official client returns its cleaned message.

    The guard before the fast path is :func:`_fits`'s walk done breadth first in C:
    each level is the previous one's referents (``gc.get_referents``: a container's
    items, a dict's keys and values, an object's attributes and class; nothing for a
    str or a number), a call per level instead of a Python call per container
    (measured: 21,400 instructions for ``_fits`` over the benchmark's message, 2
    levels deep; ~6,000 here). It sees everything ``_fits`` sees and more (keys,
    objects' insides), so passing it is never wrong; failing it (a message near the
    limit, or an object whose class machinery it counted) costs one ``_fits`` walk.
    Inline, as is the rest: this runs on every call of every request."""
    before = coerced[0]
    level = gc.get_referents(*message.values())
    budget, depth = _MAX_NODES - len(message), 1
    while level:
        budget -= len(level)
        if budget < 0 or depth > _MAX_DEPTH:
            break
        level = gc.get_referents(*level)
        depth += 1
    if not level or _fits(message, _MAX_NODES, 0) >= 0:
        try:
            data = orjson.dumps(message, default=default, option=_OPTIONS)
            return data, (message if coerced[0] == before else orjson.loads(data))
        except (NeedsWalk, TypeError) as exc:
            if isinstance(exc.__cause__, Unencodable):
                raise exc.__cause__ from None
            # orjson wraps errors from default() in JSONEncodeError (a TypeError)
    # The walk makes a JSON-safe copy: what is sent differs.
    data = orjson.dumps(_Walk().value(message, "message", 0), default=default, option=_OPTIONS)
    coerced[0] += 1
    return data, orjson.loads(data)


# Message ids: a series per process, a random 74-bit prefix in UUID version 4 form
# and a 48-bit counter from a random start, made 256 at a time (one format for the
# block, a concatenation for each): an id costs a ``list.pop`` (measured: 4,700
# instructions an id formatted one by one, ~0.4 µs a syscall each drawn from
# ``os.urandom``, several µs under gVisor). An id only has to be unique: two
# processes' series share a prefix with probability ~n²/2**75. The series is this
# pid's only: a forked child must never send its parent's ids, so a pid that differs
# starts a new series (a C ``fork()`` runs no hook, so the pid is compared, never
# popping from the inherited list). ``list.pop`` and ``next()`` on ``itertools.count``
# are atomic: threads never get the same id, and two threads refilling at once
# take two blocks.
_HEX2 = [f"{n:02x}" for n in range(255, -1, -1)]  # popped from the end: ascending ids
_ids: Tuple[int, List[str], str, Iterator[int]] = (-1, [], "", itertools.count())


def new_message_id(pid: int) -> str:
    """A UUID-shaped (version 4, RFC 4122 variant) unique string; ``pid`` is
    ``os.getpid()``, read once by the caller for every check of its call."""
    made_in, left, _, _ = _ids
    if made_in == pid:
        try:
            return left.pop()
        except IndexError:
            pass
    return _more_ids(pid)


def _more_ids(pid: int) -> str:
    global _ids
    made_in, _, prefix, blocks = _ids
    if made_in != pid:  # a new process: a new series
        h = os.urandom(16).hex()
        variant = "89ab"[int(h[16], 16) & 3]
        prefix = f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{variant}{h[17:20]}-"
        blocks = itertools.count(int(h[20:30], 16) >> 1)  # 39 bits: never past 10 digits
    base = f"{prefix}{next(blocks):010x}"
    made = [base + low for low in _HEX2]
    _ids = (pid, made, prefix, blocks)  # one tuple store: no thread sees a pid with another's list
    return made.pop()


# The last call's millisecond and its text, and the last second's prefix: formatting a
# datetime costs ≈1 µs, the prefix's f-string ≈0.4 µs, a call within the same
# millisecond (most of a burst, several per ms at 5,000 calls/s) one tuple compare.
# Pure caches, each replaced by one tuple store, so threads cannot tear them.
_ms_cache: Tuple[int, str] = (-1, "")
_MS_SUFFIX = [f".{ms:03d}+00:00" for ms in range(1000)]
_second_cache: Tuple[int, str] = (-1, "")


def now_iso() -> str:
    """The current UTC time, ISO-8601 with milliseconds and ``+00:00``."""
    global _ms_cache, _second_cache
    ms = time.time_ns() // 1_000_000
    cached, stamp = _ms_cache
    if cached == ms:
        return stamp
    second = ms // 1000
    cached, prefix = _second_cache
    if cached != second:
        prefix = _dt.datetime.fromtimestamp(second, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        _second_cache = (second, prefix)
    stamp = prefix + _MS_SUFFIX[ms % 1000]
    _ms_cache = (ms, stamp)
    return stamp


def format_timestamp(value: object) -> str:
    """ISO-8601 with offset. Naive datetimes and strings without an offset are UTC;
    a ``date`` means midnight UTC; pandas' ``NaT`` (a missing time in a DataFrame
    column) means none was given: now, as ``timestamp=None``."""
    if isinstance(value, _dt.datetime):
        if value != value:
            return now_iso()
        when = value
    elif isinstance(value, _dt.date):
        when = _dt.datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        try:
            when = isoparse(value)
        except (ValueError, OverflowError):
            raise InvalidArgument("timestamp", "not an ISO-8601 date/time string") from None
    else:
        raise InvalidArgumentType("timestamp", "a datetime, date or ISO-8601 str", value)
    try:
        if when.tzinfo is None or when.utcoffset() is None:
            when = when.replace(tzinfo=_UTC)
        return when.isoformat(timespec="milliseconds")
    except Exception as exc:  # noqa: BLE001 - a user's tzinfo may raise anything
        raise InvalidArgument("timestamp", f"its tzinfo raised {type(exc).__name__}") from None


def identifier(name: str, value: object) -> Optional[str]:
    """``user_id``-like values: a str, a UUID or any number the official client takes
    (``numbers.Number``: int, float, ``Decimal``, numpy integers...), sent as ``str()``
    as it sends them. Refused where it would send nonsense: a bool, NaN or infinity."""
    if value is None:
        return None
    if isinstance(value, str):
        if not value:
            raise InvalidArgument(name, "must not be empty")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, uuid.UUID, numbers.Number)):
        raise InvalidArgumentType(name, "a str, a number or a UUID", value)
    if not isinstance(value, (int, uuid.UUID)) and not _finite(value):
        raise InvalidArgument(name, "must be finite")
    try:
        return str(value)
    except ValueError:
        raise InvalidArgument(name, "an int too long to write in decimal") from None


def _finite(number: Any) -> bool:
    try:
        return math.isfinite(number)
    except ValueError:  # a signalling Decimal NaN
        return False
    except TypeError:  # a complex number: str() as the official client sends it
        return True


def mapping(name: str, value: object) -> Dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgumentType(name, "a dict", value)
    return value


def text(name: str, value: object, *, required: bool) -> Optional[str]:
    if value is None:
        if required:
            raise InvalidArgument(name, "is required")
        return None
    if not isinstance(value, str):
        raise InvalidArgumentType(name, "a str", value)
    if required and not value:
        raise InvalidArgument(name, "must not be empty")
    return value
