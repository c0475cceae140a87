"""Rows of a backfill file, read as a stream, each made a Pipelines message or refused.

Owns the file formats (JSON Lines, CSV with its column convention, gzip by suffix,
``-`` for stdin), the stable ``messageId`` a row gets when it has none, and the checks
a row must pass before it is sent: the collector's own schema (:mod:`cdpmp._schema`,
the API's contract) and the 32 KB message limit. A refused row is never an exception
out of here: :func:`read` yields it with its line number and the reason.

Why the id is derived from the file's *name*, line number and the row's bytes: a re-run
of the same file (after a crash, or by hand) sends every row under the id it had the
first time, so the API deduplicates what was sent twice; two files with the same rows
under other names are two imports. The file's directory is left out so that a file
moved between attempts keeps its ids.
"""

from __future__ import annotations

import csv
import datetime as _dt
import gzip
import hashlib
import io
import os
import sys
import uuid
from typing import IO, Any, Dict, Iterator, NamedTuple, Optional, Union

import orjson

from .._message import format_timestamp, identifier, now_iso
from .._schema import MAX_MESSAGE_BYTES, SchemaError, validate_message
from .._version import LIBRARY_NAME, __version__
from ..errors import InvalidArgument, InvalidArgumentType

_LIBRARY = {"name": LIBRARY_NAME, "version": __version__}
_ID_FIELDS = ("userId", "anonymousId", "previousId", "groupId")
#: CSV cells that go in as they are; "properties.x" / "traits.x" / "context.x" nest.
CSV_FIELDS = ("type", "messageId", "timestamp", "event", "name", "category", *_ID_FIELDS)
_CSV_GROUPS = ("properties", "traits", "context")
_CSV_KINDS = ("str", "number", "bool", "json")


class Row(NamedTuple):
    """One input row: its line number (1-based; for CSV the line the record ends on),
    and either the message ready to send (``data``, with ``message_id``) or why not."""

    line: int
    data: Optional[bytes]
    message_id: Optional[str]
    reason: Optional[str]
    raw: bytes  # the row as read

    @property
    def text(self) -> str:
        """The row for the rejects file, cut to 1,000 bytes (decoded only for a refused
        row: a good one never needs it)."""
        return self.raw[:1000].decode("utf-8", "replace").rstrip("\r\n")


def derive_id(source: str, line: int, raw: bytes) -> str:
    """The stable messageId of a row that brings none (see the module docstring)."""
    name = os.path.basename(source).removesuffix(".gz")  # compressing a file keeps its ids
    digest = hashlib.sha256(f"{name}\0{line}\0".encode() + raw).digest()
    return str(uuid.UUID(bytes=digest[:16], version=5))


def _timestamp(value: Any) -> str:
    if value is None or value == "":
        return now_iso()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = value / 1000 if abs(value) >= 1e11 else value  # epoch milliseconds or seconds
        return format_timestamp(_dt.datetime.fromtimestamp(seconds, _dt.timezone.utc))
    return format_timestamp(value)


def message(fields: Any, source: str, line: int, raw: bytes) -> Row:
    """Make one row's decoded value a Pipelines message (bytes) or say why not."""
    if not isinstance(fields, dict):
        return Row(line, None, None, f"not a JSON object ({type(fields).__name__})", raw)
    msg: Dict[str, Any] = dict(fields)
    try:
        for name in _ID_FIELDS:
            if msg.get(name) is not None:
                msg[name] = identifier(name, msg[name])
        msg["timestamp"] = _timestamp(msg.get("timestamp"))
    except (InvalidArgument, InvalidArgumentType, OverflowError, OSError, ValueError) as exc:
        return Row(line, None, None, str(exc), raw)
    message_id = msg.get("messageId")
    if message_id is None or message_id == "":
        message_id = msg["messageId"] = derive_id(source, line, raw)
    elif not isinstance(message_id, str):
        message_id = msg["messageId"] = str(message_id)
    context = msg.get("context")
    msg["context"] = {**context, "library": _LIBRARY} if isinstance(context, dict) else {"library": _LIBRARY}
    try:
        validate_message(msg)
        data = orjson.dumps(msg)
    except SchemaError as exc:
        return Row(line, None, message_id, str(exc), raw)
    except (TypeError, orjson.JSONEncodeError) as exc:  # e.g. nesting deeper than orjson takes
        return Row(line, None, message_id, f"cannot be encoded: {exc}", raw)
    if len(data) > MAX_MESSAGE_BYTES:
        return Row(line, None, message_id, f"message of {len(data)} bytes is over {MAX_MESSAGE_BYTES}", raw)
    return Row(line, data, message_id, None, raw)


def open_binary(path: str) -> IO[bytes]:
    """The file's bytes (``-``: stdin), decompressed when its name ends in ``.gz``."""
    if path == "-":
        return sys.stdin.buffer
    if path.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]  # a GzipFile reads bytes
    return open(path, "rb")


def is_csv(path: str) -> bool:
    return path.removesuffix(".gz").lower().endswith(".csv")


def jsonl_rows(stream: IO[bytes], source: str, skip: int) -> Iterator[Row]:
    for line, raw in enumerate(stream, 1):
        if line <= skip or not raw.strip():
            continue
        try:
            fields = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            yield Row(line, None, None, f"not JSON: {exc}", raw)
            continue
        yield message(fields, source, line, raw)


def _cell(kind: str, value: str) -> Union[str, float, int, bool, Any]:
    if kind == "str":
        return value
    if kind == "bool":
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{value!r} is not a bool")
        return value.lower() in ("true", "1")
    try:
        parsed = orjson.loads(value)
    except orjson.JSONDecodeError:
        parsed = ValueError  # a marker: never a JSON value
    if kind == "number" and (isinstance(parsed, bool) or not isinstance(parsed, (int, float))):
        raise ValueError(f"{value!r} is not a number")
    if parsed is ValueError:
        raise ValueError(f"{value!r} is not JSON")
    return parsed


def _columns(header: list[str]) -> list[tuple[str, Optional[str], str]]:
    """(group or field, nested name or None, kind) per column; ValueError names a bad one."""
    out: list[tuple[str, Optional[str], str]] = []
    for column in header:
        name, _, kind = column.strip().partition(":")
        kind = kind or "str"
        group, dot, nested = name.partition(".")
        if kind not in _CSV_KINDS:
            raise ValueError(f"column {column!r}: the type after ':' must be one of {', '.join(_CSV_KINDS)}")
        if dot and group in _CSV_GROUPS and nested:
            out.append((group, nested, kind))
        elif not dot and name in CSV_FIELDS:
            out.append((name, None, kind))
        else:
            raise ValueError(
                f"column {column!r} is neither one of {', '.join(CSV_FIELDS)} nor properties.<name>, "
                "traits.<name> or context.<name>"
            )
    return out


def csv_rows(stream: IO[bytes], source: str, skip: int) -> Iterator[Row]:
    """CSV: a header, then one message per record; empty cells are left out."""
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")
    reader = csv.reader(text)
    header = next(reader, None)
    if header is None:
        return
    columns = _columns(header)  # ValueError: the caller's usage error
    for record in reader:
        line = reader.line_num
        if line <= skip or not any(record):
            continue
        raw = ",".join(record).encode()
        if len(record) != len(columns):
            yield Row(line, None, None, f"{len(record)} cells, the header has {len(columns)}", raw)
            continue
        fields: Dict[str, Any] = {}
        try:
            for (group, nested, kind), value in zip(columns, record):
                if value == "":
                    continue
                if nested is None:
                    fields[group] = _cell(kind, value)
                else:
                    fields.setdefault(group, {})[nested] = _cell(kind, value)
        except ValueError as exc:
            yield Row(line, None, None, str(exc), raw)
            continue
        yield message(fields, source, line, raw)


def check(path: str) -> None:
    """Raise ``ValueError`` for a file that cannot be imported at all (a CSV header
    with a column outside the convention), before anything is sent."""
    if is_csv(path) and path != "-":
        with open_binary(path) as stream:
            header = next(csv.reader(io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")), None)
        if header is not None:
            _columns(header)


def read(path: str, skip: int = 0) -> Iterator[Row]:
    """Every row of ``path`` after its first ``skip`` lines, in order, streamed."""
    stream = open_binary(path)
    try:
        yield from (csv_rows if is_csv(path) else jsonl_rows)(stream, path, skip)
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
