"""Exceptions raised by cdpmp, and the error objects handed to ``on_error``.

Hierarchy (each subclasses the stdlib type that fits, so callers that already catch
``TypeError``/``ValueError`` keep working)::

    CdpmpError                      base of everything cdpmp raises or reports
    ├── InvalidArgumentType(TypeError)   an argument of the wrong type (names it)
    ├── UnknownOption(TypeError)         an argument cdpmp does not know (names it)
    ├── InvalidArgument(ValueError)      an argument with a bad value (names it)
    │   └── MissingIdentity              neither user_id nor anonymous_id given
    ├── ConfigurationError(ValueError)   a setting that cannot be used
    └── DeliveryError                    reported to ``on_error``, never raised into
        │                                the request path
        ├── APIError                     the collector answered with an error status
        ├── TransportError               timeout / connection failure after retries
        ├── InternalError                an unexpected exception inside cdpmp
        │                                (logged at WARNING with its traceback)
        ├── MessageRejected              a message refused before queueing
        │                                (oversize, not serialisable, queue full)
        └── ShutdownAbandoned            still queued when a shutdown deadline passed

Messages never contain the write key: the key is not part of any argument that is
echoed, and :class:`APIError` only carries the status and the server's text.
"""

from __future__ import annotations


class CdpmpError(Exception):
    """Base class of every exception cdpmp raises or reports."""


class InvalidArgumentType(CdpmpError, TypeError):
    """An argument has the wrong type; ``argument`` names it."""

    def __init__(self, argument: str, expected: str, got: object) -> None:
        self.argument = argument
        super().__init__(f"{argument} must be {expected}, got {type(got).__name__}")


class UnknownOption(CdpmpError, TypeError):
    """An argument name (or count) that the callee does not take."""

    def __init__(self, callee: str, reason: str) -> None:
        self.callee = callee
        super().__init__(f"{callee}: {reason}")


class InvalidArgument(CdpmpError, ValueError):
    """An argument has a value cdpmp cannot use; ``argument`` names it."""

    def __init__(self, argument: str, reason: str) -> None:
        self.argument = argument
        super().__init__(f"{argument}: {reason}")


class MissingIdentity(InvalidArgument):
    """A call that needs ``user_id`` or ``anonymous_id`` got neither."""

    def __init__(self, argument: str = "user_id or anonymous_id") -> None:
        reason = "one of them is required" if " or " in argument else "is required"
        super().__init__(argument, reason)

    @classmethod
    def for_argument(cls, argument: str) -> MissingIdentity:
        return cls(argument)


class ConfigurationError(CdpmpError, ValueError):
    """A client setting is invalid; ``setting`` names it."""

    def __init__(self, setting: str, reason: str) -> None:
        self.setting = setting
        super().__init__(f"{setting}: {reason}")


class MissingWriteKey(ConfigurationError, AssertionError):
    """No write key given nor in ``CDP_WRITE_KEY``. Also an ``AssertionError``: the
    official client raises that (from its ``require()``), and code written for it
    may catch it."""

    def __init__(self) -> None:
        super().__init__(
            "write_key", "is required: pass write_key= or set the CDP_WRITE_KEY environment variable"
        )


class DeliveryError(CdpmpError):
    """A batch or message could not be delivered; handed to ``on_error``.

    ``final`` is True when sending it again cannot succeed (cdpmp's one outcome
    policy, :func:`cdpmp._outcome.classify_status`, decides it)."""

    final = False


class APIError(DeliveryError):
    """The endpoint answered with a non-2xx status."""

    def __init__(self, status: int, code: str, message: str, final: bool = True) -> None:
        self.status = status
        self.final = final
        self.code = code
        self.message = message
        super().__init__(f"[cdp] {code}: {message} ({status})")


class TransportError(DeliveryError):
    """Timeouts or connection failures exhausted the retry policy, or the request
    could not be made at all (``final``: e.g. an invalid URL)."""

    def __init__(self, message: str, final: bool = False) -> None:
        self.final = final
        super().__init__(message)


class InternalError(DeliveryError):
    """An unexpected exception inside cdpmp while delivering: a bug or a broken
    environment (e.g. a late monkey-patch). Never retried: it would fail again."""

    final = True


class MessageRejected(DeliveryError):
    """A message was refused before it was queued; ``reason`` is the counter name."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


class ShutdownAbandoned(DeliveryError):
    """Messages were still unsent when a flush/shutdown deadline expired."""
