"""One option's value checked: an argument's type and bounds, an environment string parsed.

Kept apart from the options table (:mod:`cdpmp._options`), which only says *which*
options exist; here is *how* a value of each kind is accepted. Wrong types raise
:class:`~cdpmp.errors.InvalidArgumentType` and bad values
:class:`~cdpmp.errors.ConfigurationError`, both naming the option.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .errors import ConfigurationError, InvalidArgument, InvalidArgumentType

#: The most any float option or wait may be: a day. Every float option is a duration
#: or a rate; past this a value is a mistake (1e10 s overflows threading's waits and
#: broke every call after it), and "forever" (inf) is no deadline.
MAX_SECONDS = 86_400.0


def duration(name: str, value: Any) -> float:
    """A wait's ``timeout`` argument: 0 to :data:`MAX_SECONDS` seconds, or an error
    naming it (a ``TypeError`` or ``ValueError`` subclass)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentType(name, "a number of seconds", value)
    if not 0 <= value <= MAX_SECONDS:  # NaN fails too
        raise InvalidArgument(name, f"must be 0 to {MAX_SECONDS:g} seconds, got {value!r}")
    return float(value)


def _as_bool(name: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigurationError(name, f"expected a boolean, got {raw!r}")


def from_env(f: dataclasses.Field[Any], kind: Any, raw: str) -> Any:
    """``raw`` (the option's environment variable) as a value of ``kind``."""
    env = f.metadata["env"]
    if kind is bool:
        return _as_bool(env, raw)
    if kind in (int, float):
        try:
            return kind(raw.strip())
        except ValueError:
            raise ConfigurationError(
                f.name, f"{env}={raw!r} is not {'an integer' if kind is int else 'a number'}"
            ) from None
    return raw


def check_value(f: dataclasses.Field[Any], kind: Any, value: Any) -> Any:
    """``value`` accepted as option ``f`` of ``kind``, or an exception naming it."""
    name = f.name
    if kind is bool:
        if not isinstance(value, bool):
            raise InvalidArgumentType(name, "a bool", value)
        return value
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidArgumentType(name, "a number", value)
        if kind is int and not isinstance(value, int):
            raise InvalidArgumentType(name, "an int", value)
        minimum = f.metadata["minimum"]
        too_big = kind is float and value > MAX_SECONDS
        if not math.isfinite(value) or (minimum is not None and value < minimum) or too_big:
            most = f" and <= {MAX_SECONDS:g}" if kind is float else ""
            raise ConfigurationError(name, f"must be a finite number >= {minimum}{most}, got {value!r}")
        return kind(value)
    if kind is str:
        if not isinstance(value, str):
            raise InvalidArgumentType(name, "a str", value)
        return value
    if name == "on_error":
        if not value:  # the official client treats any falsy value as "no callback"
            return None
        if not callable(value):
            raise InvalidArgumentType(name, "a callable", value)
        return value
    if name == "proxies":
        if not isinstance(value, dict):
            raise InvalidArgumentType(name, "a dict", value)
        return dict(value)
    raise AssertionError(f"no validation rule for option {name}")  # pragma: no cover
