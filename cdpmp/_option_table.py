"""Every option of cdpmp, declared once: the body of :class:`Settings` (per client) and
:class:`HostSettings` (per host: environment only).

Each field is declared with :func:`option`: its environment variable, lower bound,
documentation, and where it goes (the official ``Client``'s positional order, the
shared-mode source entry). Adding an option is a field here; :mod:`cdpmp._options`
derives everything else from this table (``Client(...)``'s signature, the module
settings of :mod:`cdpmp.analytics`, the ``CDP_*`` environment, the manual's table) and
resolves given values into frozen settings.

This module also owns the region and authentication rules of the wire contract:
keys matching ``^(pk|sk)_(us|eu)_`` are sent as ``Bearer`` tokens and ``*_eu_`` keys
default to the EU host; every other key is sent as HTTP Basic user name.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Dict, List, Optional

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
    meta = {
        "env": env,
        "doc": doc,
        "minimum": minimum,
        "positional": positional,
        "source": source,
        "alias": alias,
        "shown": shown,
        "scope": scope,
    }
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
        15.0,
        env="CDP_TIMEOUT",
        doc="seconds per request, in total (connect, send and the whole answer)",
        minimum=0.001,
        positional=9,
        source=True,
    )
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
        0.5,
        env="CDP_UPLOAD_INTERVAL",
        doc="seconds the oldest waiting event waits for a batch to fill",
        minimum=0.0,
        positional=13,
        source=True,
    )
    retry_budget: Optional[float] = option(
        None,
        env="CDP_RETRY_BUDGET",
        doc=_HELD % "seconds of retrying",
        minimum=0.0,
        source=True,
        shown="none",
    )
    max_queue_bytes: int = option(
        16 << 20,
        env="CDP_MAX_QUEUE_BYTES",
        minimum=1,
        shown="`16777216` (16 MiB)",
        doc="bytes of serialised events held per process (direct mode), queued and kept for retrying",
    )
    max_in_flight: int = option(
        16,
        env="CDP_MAX_IN_FLIGHT",
        doc="concurrent requests at most (they grow only on the network's wait)",
        minimum=1,
        source=True,
    )
    block_on_full: Optional[float] = option(
        None,
        env="CDP_BLOCK_ON_FULL",
        minimum=0.0,
        shown="none",
        doc="seconds a call may wait for room when the "
        "queue (shared: the source's share) is full; none: refuse at once. For backfills, never on a request path",
    )
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
        True,
        env="CDP_SIGTERM_DRAIN",
        scope="process-wide",
        doc="drain every client at a SIGTERM that "
        "would otherwise kill the process untouched, then die of it as before (`0`: leave SIGTERM alone)",
    )
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
