"""Every option of cdpmp, in one table, and its resolution into frozen settings.

The table is the body of :class:`Settings` (per client) and :class:`HostSettings`
(per host: environment only). Each field is declared once with :func:`option` (its
environment variable, lower bound and documentation). From that one table come:

* ``Client(...)``'s arguments, in the official client's positional order
  (:data:`CLIENT_SIGNATURE`);
* the module-level settings of :mod:`cdpmp.analytics` (:data:`MODULE_SETTINGS`);
* every ``CDP_*`` environment variable: nothing else in cdpmp reads one
  (:func:`resolve`, :func:`host_settings`);
* the entries shared-mode producers write for the uploader (:func:`source_entry`);
* the settings table of the manual, docs/configuration.md (:func:`markdown_table`; a test
  compares them).

Resolution order for every option is argument → environment → default, done once at
construction (OpenTelemetry's convention). ``None`` means "not given". Durations are
seconds (float).

This module also owns the region and authentication rules of the wire contract:
keys matching ``^(pk|sk)_(us|eu)_`` are sent as ``Bearer`` tokens and ``*_eu_`` keys
default to the EU host; every other key is sent as HTTP Basic user name.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import typing
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from ._validate import check_value, from_env
from .errors import ConfigurationError, InvalidArgumentType, MissingWriteKey, UnknownOption

US_ENDPOINT = "https://cdp.customer.io"
EU_ENDPOINT = "https://cdp-eu.customer.io"
MODES = ("direct", "shared")
REGION_KEY = re.compile(r"^(pk|sk)_(us|eu)_")
_USERINFO_PASSWORD = re.compile(r"^([a-z]+://[^/@:]*:)[^/@]*@")

OnError = Callable[[Exception, List[Dict[str, Any]]], None]


def option(
    default: Any,
    *,
    env: Optional[str] = None,
    doc: str,
    minimum: Optional[float] = None,
    positional: Optional[int] = None,
    source: bool = False,
    alias: Optional[str] = None,
    shown: str = "",
    scope: str = "",
    repr: bool = True,  # noqa: A002 - dataclasses.field's own name for it
) -> Any:
    """Declare one option (a dataclass field carrying its metadata).

    ``positional``: index in the official ``Client`` signature; ``source``: travels
    to the shared-mode uploader; ``alias``: a second accepted name; ``shown``: the
    default as the manual states it, when the value itself says too little; ``scope``:
    where a host-level option applies (the manual's table says).
    """
    meta = {"env": env, "doc": doc, "minimum": minimum, "positional": positional, "source": source,
            "alias": alias, "shown": shown, "scope": scope}  # fmt: skip
    return dataclasses.field(default=default, repr=repr, metadata=meta)


_HELD = (
    "%s after which a failing batch is given up; none: held while the endpoint fails"
    " (408/429/5xx, unreachable) until it answers or the exit deadline"
)


@dataclasses.dataclass(frozen=True)
class Settings:
    """One client's options, validated. ``write_key`` is kept out of ``repr``."""

    write_key: str = option(
        "",
        env="CDP_WRITE_KEY",
        doc="the source's write key; never logged",
        positional=0,
        source=True,
        shown="required",
        repr=False,
    )
    endpoint: str = option(
        "",
        env="CDP_ENDPOINT",
        doc="API base URL",
        positional=1,
        source=True,
        alias="host",
        shown="US `https://cdp.customer.io`; `pk_eu_`/`sk_eu_` keys: `https://cdp-eu.customer.io`",
    )
    debug: bool = option(
        False,
        env="CDP_DEBUG",
        doc="set the `cdpmp` logger to DEBUG: a line per batch (shared mode: in the uploader's log)",
        positional=2,
        source=True,
    )
    max_queue_size: int = option(
        10000,
        env="CDP_MAX_QUEUE_SIZE",
        doc="events held per process (direct), or per source on the host (shared)",
        minimum=1,
        positional=3,
    )
    send: bool = option(True, doc="False: validate and build, never send", positional=4)
    on_error: Optional[OnError] = option(None, doc="`f(error, batch)` for every event given up", positional=5)
    gzip: bool = option(False, env="CDP_GZIP", doc="gzip request bodies", positional=6, source=True)
    max_retries: Optional[int] = option(
        None, env="CDP_MAX_RETRIES", doc=_HELD % "retries", minimum=0, positional=7, source=True, shown="none"
    )
    sync_mode: bool = option(False, doc="send each event inline, on the caller's thread", positional=8)
    timeout: float = option(
        15.0, env="CDP_TIMEOUT", doc="seconds per request, in total (connect, send and the whole answer)",
        minimum=0.001, positional=9, source=True,
    )  # fmt: skip
    proxies: Optional[Dict[str, str]] = option(
        None, doc="`{scheme: url}`; default: `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY`", positional=10
    )
    thread: int = option(
        1, doc="accepted for compatibility: one consumer per process", minimum=1, positional=11
    )
    upload_size: int = option(
        100, env="CDP_UPLOAD_SIZE", doc="events per batch", minimum=1, positional=12, source=True
    )
    upload_interval: float = option(
        0.5, env="CDP_UPLOAD_INTERVAL", doc="seconds the oldest waiting event waits for a batch to fill",
        minimum=0.0, positional=13, source=True,
    )  # fmt: skip
    retry_budget: Optional[float] = option(
        None,
        env="CDP_RETRY_BUDGET",
        doc=_HELD % "seconds of retrying",
        minimum=0.0,
        source=True,
        shown="none",
    )
    max_queue_bytes: int = option(
        16 << 20, env="CDP_MAX_QUEUE_BYTES", minimum=1, shown="`16777216` (16 MiB)",
        doc="bytes of serialised events held per process (direct mode), queued and kept for retrying",
    )  # fmt: skip
    max_in_flight: int = option(
        16, env="CDP_MAX_IN_FLIGHT", doc="concurrent requests at most (they grow only on the network's wait)",
        minimum=1, source=True,
    )  # fmt: skip
    block_on_full: Optional[float] = option(
        None, env="CDP_BLOCK_ON_FULL", minimum=0.0, shown="none", doc="seconds a call may wait for room when the "
        "queue (shared: the source's share) is full; none: refuse at once. For backfills, never on a request path",
    )  # fmt: skip
    exit_timeout: float = option(
        10.0, env="CDP_EXIT_TIMEOUT", doc="seconds the exit drain may take", minimum=0.0
    )
    mode: str = option("direct", env="CDP_MODE", doc="`direct` or `shared`")
    strict_mode: bool = option(
        True,
        env="CDP_STRICT_MODE",
        doc="send `X-Strict-Mode: 1`: the API answers 400/401 for what it refuses instead of "
        "200 and dropping it unseen (docs/values.md)",
        source=True,
    )

    @property
    def bearer(self) -> bool:
        """Region keys are sent as ``Authorization: Bearer``; others as Basic."""
        return REGION_KEY.match(self.write_key) is not None

    @property
    def batch_url(self) -> str:
        return self.endpoint + "/v1/batch"

    @property
    def shown_url(self) -> str:
        """``batch_url`` as logs and messages show it: a password in the endpoint
        (``https://user:secret@proxy``) replaced by ``***``."""
        return _USERINFO_PASSWORD.sub(r"\1***@", self.batch_url)


@dataclasses.dataclass(frozen=True)
class HostSettings:
    """Options of a host's shared mode, and of a whole process; from the environment only."""

    sigterm_drain: bool = option(
        True, env="CDP_SIGTERM_DRAIN", scope="process-wide", doc="drain every client at a SIGTERM that "
        "would otherwise kill the process untouched, then die of it as before (`0`: leave SIGTERM alone)",
    )  # fmt: skip
    runtime_dir: str = option(
        "",
        env="CDP_RUNTIME_DIR",
        doc="where the ring lives",
        shown="`/dev/shm/cdpmp-<uid>`, else `$XDG_RUNTIME_DIR/cdpmp`, else `<tmp>/cdpmp-<uid>`",
    )
    ring_bytes: int = option(
        32 << 20, env="CDP_RING_BYTES", doc="ring data size in bytes (only for a new ring)", minimum=4096
    )
    uploader_drain_timeout: float = option(
        20.0, env="CDP_UPLOADER_DRAIN_TIMEOUT", doc="seconds the uploader drains after SIGTERM", minimum=0.0
    )
    uploader_max_rate: float = option(
        250.0,
        env="CDP_UPLOADER_MAX_RATE",
        doc="requests per second the uploader sends at most, all sources together (the API allows a "
        "workspace 1,000 on average: a fleet of N hosts sets at most 800/N)",
        minimum=0.1,
    )
    uploader_idle_exit: float = option(
        60.0,
        env="CDP_UPLOADER_IDLE_EXIT",
        doc="seconds of idleness (empty ring, no producers) before an auto-started uploader exits",
        minimum=0.0,
    )


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


__all__ = ["CLIENT_SIGNATURE", "ENV", "MODULE_SETTINGS", "HostSettings", "OnError", "Settings", "collect"]
__all__ += ["from_source_entry", "host_settings", "markdown_table", "resolve", "source_entry"]
