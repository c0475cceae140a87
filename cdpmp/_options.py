"""Options resolved: from :mod:`cdpmp._option_table`'s one table, everything that
takes or shows an option, and the resolution of given values into frozen settings.

From the table come:

* ``Client(...)``'s arguments, in the official client's positional order
  (:data:`CLIENT_SIGNATURE`, :func:`collect`);
* the module-level settings of :mod:`cdpmp.analytics` (:data:`MODULE_SETTINGS`);
* every ``CDP_*`` environment variable: nothing else in cdpmp reads one
  (:func:`resolve`, :func:`host_settings`, :func:`env_mode`);
* the entries shared-mode producers write for the uploader (:func:`source_entry`);
* the settings table of the manual, docs/configuration.md (:func:`markdown_table`; a test
  compares them).

Resolution order for every option is argument → environment → default, done once at
construction (OpenTelemetry's convention). ``None`` means "not given". Durations are
seconds (float).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import typing
from typing import Any, Dict, Mapping, Optional, Tuple

from ._option_table import EU_ENDPOINT, MODES, REGION_KEY, US_ENDPOINT, HostSettings, OnError, Settings
from ._validate import check_value, from_env
from .errors import ConfigurationError, InvalidArgumentType, MissingWriteKey, UnknownOption

FIELDS: Tuple[dataclasses.Field[Any], ...] = dataclasses.fields(Settings)
HOST_FIELDS: Tuple[dataclasses.Field[Any], ...] = dataclasses.fields(HostSettings)
_BY_NAME = {f.name: f for f in FIELDS}
_ALIASES = {f.metadata["alias"]: f.name for f in FIELDS if f.metadata["alias"]}
_HINTS = typing.get_type_hints(Settings)
_HOST_HINTS = typing.get_type_hints(HostSettings)
POSITIONAL: Tuple[str, ...] = tuple(
    f.name
    for f in sorted(FIELDS, key=lambda f: f.metadata["positional"] or 0)
    if f.metadata["positional"] is not None
)
#: Settings of :mod:`cdpmp.analytics`, with the value that means "not set": ``None``
#: where the environment may supply it, else the default (as the official module).
MODULE_SETTINGS: Dict[str, Any] = {}
for _f in FIELDS:
    MODULE_SETTINGS[_f.name] = None if _f.metadata["env"] or _f.name == "write_key" else _f.default
    if _f.metadata["alias"]:
        MODULE_SETTINGS[_f.metadata["alias"]] = None
SOURCE_FIELDS: Tuple[str, ...] = tuple(f.name for f in FIELDS if f.metadata["source"])
#: Option name → its environment variable, for every option that has one.
ENV: Dict[str, str] = {f.name: f.metadata["env"] for f in FIELDS + HOST_FIELDS if f.metadata["env"]}


def _signature() -> inspect.Signature:
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    # The official client calls its second positional parameter ``host``.
    positional = [_BY_NAME[n].metadata["alias"] or n for n in POSITIONAL]
    for name in positional:
        params.append(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None))
    for name in [f.name for f in FIELDS] + list(_ALIASES):
        if name not in positional:
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None))
    return inspect.Signature(params)


#: ``Client.__init__``'s signature, built from the table (``help(Client)`` shows it).
CLIENT_SIGNATURE = _signature()


def collect(args: Tuple[Any, ...], kwargs: Mapping[str, Any], caller: str = "Client()") -> Dict[str, Any]:
    """Map positional and keyword arguments to option names; aliases folded in."""
    if len(args) > len(POSITIONAL):
        raise UnknownOption(caller, f"takes at most {len(POSITIONAL)} positional arguments")
    given: Dict[str, Any] = dict(zip(POSITIONAL, args))
    for key, value in kwargs.items():
        name = _ALIASES.get(key, key)
        if name not in _BY_NAME:
            raise UnknownOption(caller, f"unexpected argument {key!r}")
        if value is None:
            continue
        previous = given.get(name)
        if previous is not None and previous != value:
            raise ConfigurationError(name, f"given twice with different values ({key!r} is its alias)")
        given[name] = value
    return {k: v for k, v in given.items() if v is not None}


# -- validation ----------------------------------------------------------------------------


def _value(
    f: dataclasses.Field[Any], hints: Mapping[str, Any], given: Mapping[str, Any], env: Mapping[str, str]
) -> Any:
    kind = hints[f.name]
    args = typing.get_args(kind)
    if typing.get_origin(kind) is typing.Union and args[1:] == (type(None),) and args[0] in (int, float):
        kind = args[0]  # Optional[number]: None is "not given", i.e. the default
    value = given.get(f.name)
    if value is not None:
        return check_value(f, kind, value)
    raw = env.get(f.metadata["env"]) if f.metadata["env"] else None
    if raw in (None, ""):
        return f.default
    try:
        return check_value(f, kind, from_env(f, kind, raw))
    except (InvalidArgumentType, ConfigurationError) as exc:
        # Name the variable: the user never passed this value as an argument.
        raise ConfigurationError(f.name, f"from {f.metadata['env']}: {exc}") from None


def resolve(given: Mapping[str, Any], env: Optional[Mapping[str, str]] = None) -> Settings:
    """Validate ``given`` (option name → value, ``None`` = not given) and fill the
    gaps from ``env`` (default ``os.environ``), then the defaults."""
    env = os.environ if env is None else env
    values = {f.name: _value(f, _HINTS, given, env) for f in FIELDS}
    key = values["write_key"]
    if not key:
        raise MissingWriteKey()
    # Keys read from secret files often end in a newline; http.client would reject
    # the header with an error that quotes the whole key.
    key = values["write_key"] = key.strip()
    if not key or any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise ConfigurationError("write_key", "must be non-empty and contain no control characters")
    url = values["endpoint"]
    if not url:
        region = REGION_KEY.match(key)
        url = EU_ENDPOINT if region and region.group(2) == "eu" else US_ENDPOINT
    if "://" not in url:  # "cdp.customer.io": the official client takes it too
        url = "https://" + url
    elif not url.startswith(("http://", "https://")):
        raise ConfigurationError("endpoint", "must start with http:// or https://")
    values["endpoint"] = url.rstrip("/")
    if values["mode"] not in MODES:
        raise ConfigurationError("mode", f"must be one of {MODES}, got {values['mode']!r}")
    return Settings(**values)


def host_settings(env: Optional[Mapping[str, str]] = None) -> HostSettings:
    """The host-level options, from ``env`` (default ``os.environ``) or defaults."""
    env = os.environ if env is None else env
    return HostSettings(**{f.name: _value(f, _HOST_HINTS, {}, env) for f in HOST_FIELDS})


def env_mode(env: Optional[Mapping[str, str]] = None) -> str:
    """``CDP_MODE`` as the clients of this process will resolve it (hooks use it)."""
    field = _BY_NAME["mode"]
    raw = (os.environ if env is None else env).get(field.metadata["env"]) or field.default
    return str(raw)


def source_entry(settings: Settings) -> Dict[str, Any]:
    """What the uploader needs to send for this client (written to ``sources.json``)."""
    return {name: getattr(settings, name) for name in SOURCE_FIELDS}


def from_source_entry(entry: Mapping[str, Any]) -> Settings:
    """Rebuild a source's settings in the uploader; the environment is not consulted."""
    return resolve({k: v for k, v in entry.items() if k in SOURCE_FIELDS}, env={})


def markdown_table() -> str:
    """The manual's table of options (docs/configuration.md), generated from this module."""
    rows = ["| option | environment | default | meaning |", "|---|---|---|---|"]
    for f in FIELDS:
        name = f"`{f.name}`" + (f" (alias `{f.metadata['alias']}`)" if f.metadata["alias"] else "")
        rows.append(_row(name, f))
    for f in HOST_FIELDS:
        rows.append(_row(f.metadata["scope"] or "host-wide, shared mode", f))
    return "\n".join(rows)


def _row(name: str, f: dataclasses.Field[Any]) -> str:
    env = f"`{f.metadata['env']}`" if f.metadata["env"] else "—"
    default = f.metadata["shown"] or f"`{f.default}`"
    return f"| {name} | {env} | {default} | {f.metadata['doc']} |"


__all__ = [
    "CLIENT_SIGNATURE",
    "ENV",
    "EU_ENDPOINT",
    "MODULE_SETTINGS",
    "REGION_KEY",
    "US_ENDPOINT",
    "HostSettings",
]
__all__ += ["OnError", "Settings", "collect", "env_mode"]
__all__ += ["from_source_entry", "host_settings", "markdown_table", "resolve", "source_entry"]
