"""Client settings: one frozen, validated object per client.

Resolution order for every setting is argument → environment → default, done once at
construction (OpenTelemetry's convention). Each environment variable is a constant
below. Durations are seconds (float).

This module also owns the region and authentication rules of the wire contract:
keys matching ``^(pk|sk)_(us|eu)_`` are sent as ``Bearer`` tokens and ``*_eu_`` keys
default to the EU host; every other key is sent as HTTP Basic user name.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Dict, List, Mapping, Optional

from .errors import ConfigurationError, InvalidArgumentType

ENV_WRITE_KEY = "CDP_WRITE_KEY"
ENV_ENDPOINT = "CDP_ENDPOINT"
ENV_MODE = "CDP_MODE"
ENV_DEBUG = "CDP_DEBUG"
ENV_GZIP = "CDP_GZIP"
ENV_MAX_QUEUE_SIZE = "CDP_MAX_QUEUE_SIZE"
ENV_UPLOAD_SIZE = "CDP_UPLOAD_SIZE"
ENV_UPLOAD_INTERVAL = "CDP_UPLOAD_INTERVAL"
ENV_TIMEOUT = "CDP_TIMEOUT"
ENV_RETRY_BUDGET = "CDP_RETRY_BUDGET"
ENV_EXIT_TIMEOUT = "CDP_EXIT_TIMEOUT"

US_ENDPOINT = "https://cdp.customer.io"
EU_ENDPOINT = "https://cdp-eu.customer.io"
MODES = ("direct", "shared")

_REGION_KEY = re.compile(r"^(pk|sk)_(us|eu)_")

OnError = Callable[[Exception, List[Dict[str, Any]]], None]


def _env(name: str, env: Mapping[str, str]) -> Optional[str]:
    value = env.get(name)
    return value if value not in (None, "") else None


def _as_bool(name: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigurationError(name, f"expected a boolean, got {raw!r}")


def _number(name: str, value: object, *, integer: bool, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentType(name, "a number", value)
    if integer and not isinstance(value, int):
        raise InvalidArgumentType(name, "an int", value)
    if value != value or value < minimum:  # NaN compares unequal to itself
        raise ConfigurationError(name, f"must be >= {minimum}, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a client needs, validated. ``write_key`` is kept out of ``repr``."""

    write_key: str = dataclasses.field(repr=False)
    endpoint: str
    bearer: bool
    debug: bool = False
    send: bool = True
    on_error: Optional[OnError] = None
    sync_mode: bool = False
    gzip: bool = False
    max_queue_size: int = 10000
    upload_size: int = 100
    upload_interval: float = 0.5
    timeout: float = 15.0
    max_retries: int = 10
    proxies: Optional[Dict[str, str]] = None
    retry_budget: float = 20.0
    exit_timeout: float = 10.0
    mode: str = "direct"

    @property
    def batch_url(self) -> str:
        return self.endpoint + "/v1/batch"


def resolve(
    write_key: Optional[str],
    *,
    endpoint: Optional[str] = None,
    host: Optional[str] = None,
    debug: Optional[bool] = None,
    send: bool = True,
    on_error: Optional[OnError] = None,
    sync_mode: bool = False,
    gzip: Optional[bool] = None,
    max_queue_size: Optional[int] = None,
    upload_size: Optional[int] = None,
    upload_interval: Optional[float] = None,
    timeout: Optional[float] = None,
    max_retries: int = 10,
    proxies: Optional[Dict[str, str]] = None,
    retry_budget: Optional[float] = None,
    exit_timeout: Optional[float] = None,
    mode: Optional[str] = None,
    env: Optional[Mapping[str, str]] = None,
) -> Settings:
    """Validate arguments, fill the gaps from ``env`` (default ``os.environ``)."""
    env = os.environ if env is None else env
    key = write_key if write_key is not None else _env(ENV_WRITE_KEY, env)
    if not isinstance(key, str):
        raise InvalidArgumentType("write_key", "a str", key)
    # Keys read from secret files often end in a newline; http.client would reject
    # the header with an error that quotes the whole key.
    key = key.strip()
    if not key:
        raise ConfigurationError("write_key", "must not be empty")
    if endpoint is not None and host is not None and endpoint != host:
        raise ConfigurationError("endpoint", "endpoint and host (its alias) disagree")
    url = endpoint if endpoint is not None else host
    url = url if url is not None else _env(ENV_ENDPOINT, env)
    region = _REGION_KEY.match(key)
    if url is None:
        url = EU_ENDPOINT if region and region.group(2) == "eu" else US_ENDPOINT
    if not isinstance(url, str):
        raise InvalidArgumentType("endpoint", "a str", url)
    if not url.startswith(("http://", "https://")):
        raise ConfigurationError("endpoint", "must start with http:// or https://")
    for name, switch in (("send", send), ("sync_mode", sync_mode)):
        if not isinstance(switch, bool):
            raise InvalidArgumentType(name, "a bool", switch)
    if on_error is not None and not callable(on_error):
        raise InvalidArgumentType("on_error", "a callable", on_error)
    if proxies is not None and not isinstance(proxies, dict):
        raise InvalidArgumentType("proxies", "a dict", proxies)

    def pick(name: str, value: Any, env_name: str, default: Any, integer: bool, minimum: float) -> Any:
        if value is None:
            raw = _env(env_name, env)
            if raw is None:
                return default
            try:
                value = int(raw) if integer else float(raw)
            except ValueError:
                raise ConfigurationError(name, f"{env_name}={raw!r} is not a number") from None
        return _number(name, value, integer=integer, minimum=minimum)

    def flag(name: str, value: Optional[bool], env_name: str) -> bool:
        if value is None:
            raw = _env(env_name, env)
            return False if raw is None else _as_bool(env_name, raw)
        if not isinstance(value, bool):
            raise InvalidArgumentType(name, "a bool", value)
        return value

    chosen_mode = mode if mode is not None else (_env(ENV_MODE, env) or "direct")
    if chosen_mode not in MODES:
        raise ConfigurationError("mode", f"must be one of {MODES}, got {chosen_mode!r}")
    return Settings(
        write_key=key,
        endpoint=url.rstrip("/"),
        bearer=region is not None,
        debug=flag("debug", debug, ENV_DEBUG),
        send=send,
        on_error=on_error,
        sync_mode=sync_mode,
        gzip=flag("gzip", gzip, ENV_GZIP),
        max_queue_size=pick("max_queue_size", max_queue_size, ENV_MAX_QUEUE_SIZE, 10000, True, 1),
        upload_size=pick("upload_size", upload_size, ENV_UPLOAD_SIZE, 100, True, 1),
        upload_interval=pick("upload_interval", upload_interval, ENV_UPLOAD_INTERVAL, 0.5, False, 0.0),
        timeout=pick("timeout", timeout, ENV_TIMEOUT, 15.0, False, 0.001),
        max_retries=int(_number("max_retries", max_retries, integer=True, minimum=0)),
        proxies=dict(proxies) if proxies is not None else None,
        retry_budget=pick("retry_budget", retry_budget, ENV_RETRY_BUDGET, 20.0, False, 0.0),
        exit_timeout=pick("exit_timeout", exit_timeout, ENV_EXIT_TIMEOUT, 10.0, False, 0.0),
        mode=chosen_mode,
    )
