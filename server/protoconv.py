"""Conversions between protobuf well-known types and Python values, with
validation that names the offending field."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime
from typing import Any

from google.protobuf import field_mask_pb2, struct_pb2, timestamp_pb2
from google.protobuf.message import Message

from server import errors


def parse_uuid(value: str, field: str) -> uuid.UUID:
    if not value:
        raise errors.InvalidArgument(field, "is required")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise errors.InvalidArgument(field, f"{value[:64]!r} is not a UUID") from None


def optional_uuid(value: str, field: str) -> uuid.UUID | None:
    return parse_uuid(value, field) if value else None


def timestamp_field(message: Message, name: str, field: str | None = None) -> datetime | None:
    """The Timestamp field `name` of `message` as an aware datetime, or None when unset."""
    if not message.HasField(name):
        return None
    ts: timestamp_pb2.Timestamp = getattr(message, name)
    if not (0 <= ts.nanos < 1_000_000_000) or not (-62135596800 <= ts.seconds <= 253402300799):
        raise errors.InvalidArgument(field or name, "is not a valid timestamp")
    return ts.ToDatetime(tzinfo=UTC)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def set_timestamp(target: timestamp_pb2.Timestamp, value: datetime) -> None:
    """Like Timestamp.FromDatetime for an aware datetime, at a fifth of the cost
    (it runs for every timestamp of every row served)."""
    delta = value - _EPOCH
    target.seconds = delta.days * 86400 + delta.seconds
    target.nanos = delta.microseconds * 1000


def struct_to_dict(value: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as plain JSON values. Raises ValueError for what JSON and
    PostgreSQL cannot hold: NaN, infinities and NUL characters."""
    return {_text(key): _json_value(item) for key, item in value.fields.items()}


def _json_value(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return _text(value.string_value)
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):
            raise ValueError("numbers must be finite (no NaN or Infinity)")
        return number
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return struct_to_dict(value.struct_value)
    if kind == "list_value":
        return [_json_value(item) for item in value.list_value.values]
    return None


def _text(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def dict_to_struct(value: dict[str, Any], target: struct_pb2.Struct) -> None:
    target.update(value)


def mask_fields(
    mask: field_mask_pb2.FieldMask,
    writable: frozenset[str],
    output_only: frozenset[str],
    message_name: str,
) -> frozenset[str]:
    """The writable fields an update_mask names (AIP-134): all of them when
    it is empty; output-only paths are ignored, unknown ones refused."""
    if not mask.paths:
        return writable
    fields = set()
    for i, path in enumerate(mask.paths):
        if path in writable:
            fields.add(path)
        elif path not in output_only:
            raise errors.InvalidArgument(
                f"update_mask.paths[{i}]", f"{path!r} is not a field of {message_name}"
            )
    return frozenset(fields)
