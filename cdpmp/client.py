"""``Client``: validates a call, builds its message once, hands it to a sink.

A thin public class over the engines in ``_sink``: it resolves settings, picks the
sink for the mode, and turns the six calls of the Pipelines API into wire messages.
Data-dependent rejections (a message over 32 KiB, a value even ``str()`` refuses, a
full queue) never raise into the caller: they return ``(False, msg)``, are counted,
logged (rate-limited) and reported to ``on_error``. Wrong argument types raise
:class:`~cdpmp.errors.InvalidArgumentType` naming the argument.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Dict, Optional, Tuple

from ._coerce import Unencodable
from ._compat import OfficialSurface, key_refused_line, other_region
from ._message import (
    MAX_MESSAGE_BYTES,
    format_timestamp,
    identifier,
    mapping,
    new_message_id,
    now_iso,
    serialize_sent,
    text,
)
from ._offloop import run_off_loop, sliced
from ._options import (
    CLIENT_SIGNATURE,
    Settings,
    collect,
    resolve,
)
from ._outcome import DropReason, Ledger, Stats
from ._process import PROCESS
from ._sink import Sink
from ._validate import duration
from ._version import LIBRARY_NAME, __version__
from .errors import MessageRejected, MissingIdentity

logger = logging.getLogger("cdpmp")
_getpid = os.getpid  # one global lookup on the hot path, not two

DEFAULT_FLUSH_TIMEOUT = 30.0  # seconds flush()/join()/shutdown() wait when not told
Result = Tuple[bool, Dict[str, Any]]


class Client(OfficialSurface):
    """One Customer.io Data Pipelines source. Same options, positional order and
    defaults as the official ``customerio.analytics.Client``; the extra options are
    keyword-only. Every option is declared once, in :mod:`cdpmp._options`.

    Options left as ``None`` are read from the environment (``CDP_*``) and otherwise
    take the official defaults. Each option is also readable as an attribute
    (``client.host``, ``client.upload_size``...), as on the official client (that
    surface: :class:`cdpmp._compat.OfficialSurface`).
    """

    def __init__(self, *args: Any, **options: Any) -> None:
        given = collect(args, options)
        self.settings: Settings = resolve(given)
        self._host = given.get("endpoint")  # ``client.host``: as given, like the official client
        if self.settings.debug:
            logger.setLevel(logging.DEBUG)
        mismatch = other_region(self.settings)
        if mismatch:
            logger.warning("cdpmp: %s", mismatch)
        self._ledger = Ledger(self.settings.on_error, key_refused_line(self.settings))
        self._sink: Sink = self._make_sink()
        PROCESS.register(self)

    def _make_sink(self) -> Sink:
        # Each mode is imported when chosen: direct mode never loads cdpmp.shared (mmap,
        # fcntl, subprocess), and nothing loads urllib3 -- which imports ssl -- before a
        # client exists, so a gunicorn.conf.py importing cdpmp leaves gevent's workers
        # an ssl they can patch (no MonkeyPatchWarning naming urllib3.util.ssl_).
        if self.settings.sync_mode:
            from ._sink import SyncSink

            return SyncSink(self.settings, self._ledger)
        if self.settings.mode == "shared" and self.settings.send:
            from .shared.sink import make_shared_sink

            sink = make_shared_sink(self.settings, self._ledger)
            if sink is not None:
                return sink
        from ._direct import DirectSink

        return DirectSink(self.settings, self._ledger)

    def __repr__(self) -> str:
        return f"<cdpmp.Client endpoint={self.settings.endpoint!r} mode={self.settings.mode!r}>"

    # -- the six calls -------------------------------------------------------------

    def identify(
        self,
        user_id: Any = None,
        traits: Optional[Dict[str, Any]] = None,
        context: Optional[Dict[str, Any]] = None,
        timestamp: Any = None,
        anonymous_id: Any = None,
        integrations: Optional[Dict[str, Any]] = None,
        message_id: Any = None,
    ) -> Result:
        msg = self._base("identify", user_id, anonymous_id, context, timestamp, integrations, message_id)
        msg["traits"] = mapping("traits", traits)
        return self._enqueue(msg)

    def track(
        self,
        user_id: Any = None,
        event: Optional[str] = None,
        properties: Optional[Dict[str, Any]] = None,
        context: Optional[Dict[str, Any]] = None,
        timestamp: Any = None,
        anonymous_id: Any = None,
        integrations: Optional[Dict[str, Any]] = None,
        message_id: Any = None,
    ) -> Result:
        msg = self._base("track", user_id, anonymous_id, context, timestamp, integrations, message_id)
        # The common cases inline: this runs on every call of every request.
        msg["event"] = event if type(event) is str and event else text("event", event, required=True)
        msg["properties"] = properties if type(properties) is dict else mapping("properties", properties)
        return self._enqueue(msg)

    def alias(
        self,
        previous_id: Any = None,
        user_id: Any = None,
        context: Optional[Dict[str, Any]] = None,
        timestamp: Any = None,
        integrations: Optional[Dict[str, Any]] = None,
        message_id: Any = None,
    ) -> Result:
        previous = identifier("previous_id", previous_id)
        if previous is None:
            raise MissingIdentity.for_argument("previous_id")
        if user_id is None:
            raise MissingIdentity.for_argument("user_id")
        msg = self._base("alias", user_id, None, context, timestamp, integrations, message_id)
        msg["previousId"] = previous
        return self._enqueue(msg)

    def group(
        self,
        user_id: Any = None,
        group_id: Any = None,
        traits: Optional[Dict[str, Any]] = None,
        context: Optional[Dict[str, Any]] = None,
        timestamp: Any = None,
        anonymous_id: Any = None,
        integrations: Optional[Dict[str, Any]] = None,
        message_id: Any = None,
        object_type_id: Any = None,
    ) -> Result:
        group = identifier("group_id", group_id)
        if group is None:
            raise MissingIdentity.for_argument("group_id")
        msg = self._base(
            "group", user_id, anonymous_id, context, timestamp, integrations, message_id, identity=False
        )
        msg["groupId"] = group
        group_traits = mapping("traits", traits)
        msg["traits"] = group_traits
        if object_type_id is None:
            object_type_id = group_traits.get("object_type_id")
        object_type = identifier("object_type_id", object_type_id)
        if object_type is not None:
            msg["objectTypeId"] = object_type
        return self._enqueue(msg)

    def page(
        self,
        user_id: Any = None,
        category: Optional[str] = None,
        name: Optional[str] = None,
        properties: Optional[Dict[str, Any]] = None,
        context: Optional[Dict[str, Any]] = None,
        timestamp: Any = None,
        anonymous_id: Any = None,
        integrations: Optional[Dict[str, Any]] = None,
        message_id: Any = None,
    ) -> Result:
        return self._view(
            "page",
            user_id,
            category,
            name,
            properties,
            context,
            timestamp,
            anonymous_id,
            integrations,
            message_id,
        )

    def screen(
        self,
        user_id: Any = None,
        category: Optional[str] = None,
        name: Optional[str] = None,
        properties: Optional[Dict[str, Any]] = None,
        context: Optional[Dict[str, Any]] = None,
        timestamp: Any = None,
        anonymous_id: Any = None,
        integrations: Optional[Dict[str, Any]] = None,
        message_id: Any = None,
    ) -> Result:
        return self._view(
            "screen",
            user_id,
            category,
            name,
            properties,
            context,
            timestamp,
            anonymous_id,
            integrations,
            message_id,
        )

    def _view(
        self,
        kind: str,
        user_id: Any,
        category: Any,
        name: Any,
        properties: Any,
        context: Any,
        timestamp: Any,
        anonymous_id: Any,
        integrations: Any,
        message_id: Any,
    ) -> Result:
        msg = self._base(kind, user_id, anonymous_id, context, timestamp, integrations, message_id)
        msg["name"] = text("name", name, required=False)
        msg["category"] = text("category", category, required=False)
        msg["properties"] = mapping("properties", properties)
        return self._enqueue(msg)

    # -- building and queueing -----------------------------------------------------

    def _base(
        self,
        kind: str,
        user_id: Any,
        anonymous_id: Any,
        context: Any,
        timestamp: Any,
        integrations: Any,
        message_id: Any,
        identity: bool = True,
    ) -> Dict[str, Any]:
        # The common cases (str ids, no context) skip the validating helpers: this
        # runs on every call of every request.
        uid = (
            user_id
            if user_id is None or (type(user_id) is str and user_id)
            else identifier("user_id", user_id)
        )
        aid = anonymous_id if anonymous_id is None else identifier("anonymous_id", anonymous_id)
        if identity and uid is None and aid is None:
            raise MissingIdentity()
        mid = None if message_id is None else identifier("message_id", message_id)
        if message_id is not None and not mid:
            raise MissingIdentity.for_argument("message_id")
        msg: Dict[str, Any] = {
            "type": kind,
            "messageId": mid,
            "timestamp": now_iso() if timestamp is None else format_timestamp(timestamp),
            # New dicts every time: the caller's context is never mutated, and the
            # caller gets the message back and may change it. Literals: no call.
            "context": {"library": {"name": LIBRARY_NAME, "version": __version__}}
            if context is None
            else {
                **(context if type(context) is dict else mapping("context", context)),
                "library": {"name": LIBRARY_NAME, "version": __version__},
            },
            "integrations": {} if integrations is None else mapping("integrations", integrations),
            # Both keys always, None when not given, as the official client sends them:
            # code written for it reads msg["anonymousId"] without a default.
            "userId": uid,
            "anonymousId": aid,
        }
        return msg

    def _enqueue(self, msg: Dict[str, Any]) -> Result:
        # One getpid per call, for the id list and the sink's fork check alike (a
        # syscall: ≈0.2 µs each, three of them per call before).
        pid = _getpid()
        if msg["messageId"] is None:  # the key is there already: the order is kept
            msg["messageId"] = new_message_id(pid)
        try:
            data, msg = serialize_sent(msg)  # returned as sent, as the official client does
        except Unencodable as exc:
            return self._reject(msg, "oversize" if exc.reason == "oversize" else "unserializable", str(exc))
        except Exception as exc:  # noqa: BLE001 - str() of a user object may raise anything
            return self._reject(msg, "unserializable", f"{type(exc).__name__} while encoding")
        if len(data) > MAX_MESSAGE_BYTES:
            return self._reject(msg, "oversize", f"{len(data)} bytes > {MAX_MESSAGE_BYTES} limit")
        if not self.settings.send:
            return True, msg
        if PROCESS.closing:
            return self._reject(msg, "shutdown", "this process's exit drain had begun")
        refusal = self._sink.put(data, pid)
        if refusal is None:
            return True, msg
        self._ledger.lost(refusal, [msg], told=True)
        return False, msg

    def _reject(self, msg: Dict[str, Any], reason: DropReason, detail: str) -> Result:
        self._ledger.lost(MessageRejected(reason, detail), [msg], told=True)
        return False, msg

    # -- lifecycle -----------------------------------------------------------------

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Send everything queued; wait at most ``timeout`` seconds (default 30).

        True only when every event accepted before the call was delivered: nothing of
        this client is left queued (shared mode: of its source on the host; another
        source's backlog is not waited for) and nothing was given up since the previous
        ``flush()``/``shutdown()`` answered. Otherwise False, with one WARNING line
        (rate-limited) and the reason in ``stats()`` (``dropped``, ``last_error``,
        ``depth``); what is still queued stays queued."""
        return self._ledger.answer(
            "flush",
            self._sink.flush(DEFAULT_FLUSH_TIMEOUT if timeout is None else duration("timeout", timeout)),
        )

    def shutdown(self, timeout: Optional[float] = None) -> bool:
        """Flush within ``timeout`` seconds, then stop the consumer. What is still
        queued at the deadline is counted as ``dropped['shutdown']`` and reported to
        ``on_error``. A later call restarts the consumer. Returns as :meth:`flush` does.
        Every loss since the last shutdown is summed up in one WARNING line (the
        per-reason warnings at the time are rate-limited)."""
        drained = self._sink.shutdown(
            DEFAULT_FLUSH_TIMEOUT if timeout is None else duration("timeout", timeout)
        )
        if not PROCESS.draining_all:  # at exit, one line for the whole process
            self._ledger.report_losses()
            return self._ledger.answer("shutdown", drained)
        return drained and not self._ledger.given_up_since()

    async def aflush(self, timeout: Optional[float] = None) -> bool:
        """:meth:`flush`, awaitable from ``async`` code: the wait runs on a thread of
        cdpmp's own (never the loop's default executor), so the event loop keeps
        serving while events are delivered; cancelled, it stops waiting (False)."""
        wait = DEFAULT_FLUSH_TIMEOUT if timeout is None else duration("timeout", timeout)
        return await run_off_loop(lambda stop: self._flush_until(wait, stop))

    async def ashutdown(self, timeout: Optional[float] = None) -> bool:
        """:meth:`shutdown`, awaitable (see :meth:`aflush`); cancelled, it stops
        waiting and leaves the client running."""
        wait = DEFAULT_FLUSH_TIMEOUT if timeout is None else duration("timeout", timeout)
        return await run_off_loop(lambda stop: self._shutdown_until(wait, stop))

    def _flush_until(self, timeout: float, stop: threading.Event) -> bool:
        """:meth:`flush` in slices, ending early once ``stop`` is set (a cancelled await)."""
        return self._ledger.answer("flush", sliced(self._sink.flush, timeout, stop))

    def _shutdown_until(self, timeout: float, stop: threading.Event) -> bool:
        """:meth:`shutdown` in slices; once ``stop`` is set, nothing is shut down."""
        drained = sliced(self._sink.flush, timeout, stop)
        return False if stop.is_set() else self.shutdown(0.0) and drained

    def join(self, timeout: Optional[float] = None) -> bool:
        """The official client's ``join``: here the same as :meth:`shutdown` (it also
        drains the queue instead of finishing only the batch in flight)."""
        return self.shutdown(timeout)

    def stats(self) -> Stats:
        """Cheap counters for this client in this process (docs/observability.md)."""
        return self._ledger.snapshot(self._sink.mode, self._sink.depth(), self._sink.host())

    def _reset_after_fork(self) -> None:
        self._sink.reset_after_fork()

    def _depth(self) -> int:
        return self._sink.depth()

    def _stop_threads(self, deadline: float) -> bool:
        return self._sink.stop_threads(deadline)

    def _retire(self) -> None:
        """Replaced (new module settings): send what is held, release threads and
        sockets, without waiting."""
        self._sink.retire()

    def _retired(self) -> bool:
        return self._sink.retired()


Client.__init__.__signature__ = CLIENT_SIGNATURE  # type: ignore[attr-defined]
