"""Conversions between protobuf well-known types and Python values, with
validation that names the offending field."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2
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


def set_timestamp(target: timestamp_pb2.Timestamp, value: datetime) -> None:
    target.FromDatetime(value)


def struct_to_dict(value: struct_pb2.Struct) -> dict[str, Any]:
    result: dict[str, Any] = json_format.MessageToDict(value)
    return result


def dict_to_struct(value: dict[str, Any], target: struct_pb2.Struct) -> None:
    target.update(value)
