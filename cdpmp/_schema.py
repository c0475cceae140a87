"""The wire contract the collector enforces: message schema, limits and auth header.

Kept apart from :mod:`cdpmp.testing` (the server) so that the rules read as one list;
``cdpmp.testing`` re-exports the public names.
"""

from __future__ import annotations

import base64
import re
from typing import Any

from dateutil.parser import isoparse

from ._options import REGION_KEY as _REGION_KEY

MAX_MESSAGE_BYTES = 32 * 1024
MAX_REQUEST_BYTES = 500_000
TYPES = ("identify", "track", "page", "screen", "group", "alias")


class SchemaError(ValueError):
    pass


def require(condition: bool, message: str) -> None:
    if not condition:
        raise SchemaError(message)


def _is_str(value: object) -> bool:
    return isinstance(value, str) and bool(value)


# ISO-8601 date-time with an explicit offset. A regex, not a parser: the collector
# shares the CPU with the clients it measures in the benchmarks.
_ISO_WITH_OFFSET = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d(:\d\d(\.\d{1,9})?)?(Z|[+-]\d\d:?\d\d)")


def check_time(value: object, field: str) -> None:
    require(isinstance(value, str), f"{field} must be a string")
    if not _ISO_WITH_OFFSET.fullmatch(str(value)):
        try:
            isoparse(str(value))
        except ValueError:
            raise SchemaError(f"{field} is not ISO-8601") from None
        raise SchemaError(f"{field} has no UTC offset")


def validate_message(msg: Any) -> None:
    """Raise :class:`SchemaError` unless ``msg`` is a valid Pipelines message."""
    require(isinstance(msg, dict), "message is not an object")
    kind = msg.get("type")
    require(kind in TYPES, f"unknown type {kind!r}")
    require(_is_str(msg.get("messageId")), "messageId missing")
    check_time(msg.get("timestamp"), "timestamp")
    context = msg.get("context")
    require(isinstance(context, dict), "context missing")
    library = context.get("library")
    require(
        isinstance(library, dict) and _is_str(library.get("name")) and _is_str(library.get("version")),
        "context.library {name, version} missing",
    )
    require(isinstance(msg.get("integrations", {}), dict), "integrations must be an object")
    for field in ("userId", "anonymousId"):  # null is accepted as "absent", as the service does
        require(msg.get(field) is None or _is_str(msg[field]), f"{field} must be a non-empty string")
    if kind in ("identify", "track", "page", "screen"):
        require(
            msg.get("userId") is not None or msg.get("anonymousId") is not None,
            "userId or anonymousId required",
        )
    if kind == "track":
        require(_is_str(msg.get("event")), "event missing")
    if kind in ("track", "page", "screen"):
        require(isinstance(msg.get("properties", {}), dict), "properties must be an object")
    if kind in ("page", "screen"):
        for field in ("name", "category"):
            require(msg.get(field) is None or isinstance(msg[field], str), f"{field} must be a string")
    if kind in ("identify", "group"):
        require(isinstance(msg.get("traits", {}), dict), "traits must be an object")
    if kind == "group":
        require(_is_str(msg.get("groupId")), "groupId missing")
        require("objectTypeId" not in msg or _is_str(msg["objectTypeId"]), "objectTypeId must be a string")
    if kind == "alias":
        require(
            _is_str(msg.get("previousId")) and _is_str(msg.get("userId")), "previousId and userId required"
        )


def expected_authorization(write_key: str) -> str:
    if _REGION_KEY.match(write_key):
        return "Bearer " + write_key
    return "Basic " + base64.b64encode((write_key + ":").encode()).decode()
