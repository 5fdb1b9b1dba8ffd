"""Conversions between protobuf well-known types and Python values, with
validation that names the offending field."""

from __future__ import annotations

import json
import json.encoder
import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

from google.protobuf import field_mask_pb2, struct_pb2, timestamp_pb2
from google.protobuf.message import Message

from server import errors
from server.validate import optional_uuid as optional_uuid  # also offered here
from server.validate import parse_uuid as parse_uuid


def _not_json(value: Any) -> NoReturn:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _compact_json() -> Callable[[Any], str]:
    """`json.dumps(value, separators=(",", ":"), ensure_ascii=False)` for
    values without cycles (what a Struct converts to). JSONEncoder.encode
    builds its C encoder anew on every call, which costs more than encoding
    a small object; this one is built once."""
    make = getattr(json.encoder, "c_make_encoder", None)  # not in typeshed
    if make is None:  # a Python without the _json accelerator
        return json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
    encoder = make(
        None, _not_json, json.encoder.encode_basestring, None, ":", ",", False, False, True
    )
    return lambda value: "".join(encoder(value, 0))


# JSON text for JSONB columns: compact, non-ASCII characters as they are.
to_json = _compact_json()

# The range of Timestamp (and of the service): 0001-01-01T00:00:00Z to
# 9999-12-31T23:59:59.999999999Z. PostgreSQL keeps microseconds, so the last
# instant it can hold is 9999-12-31T23:59:59.999999Z.
MIN_SECONDS = -62135596800
MAX_SECONDS = 253402300799


def timestamp_field(message: Message, name: str, field: str | None = None) -> datetime | None:
    """The Timestamp field `name` of `message` as an aware datetime (UTC), or None
    when unset. Nanoseconds below a microsecond are dropped, as PostgreSQL would."""
    if not message.HasField(name):
        return None
    ts: timestamp_pb2.Timestamp = getattr(message, name)
    seconds, nanos = ts.seconds, ts.nanos
    if not (0 <= nanos < 1_000_000_000) or not (MIN_SECONDS <= seconds <= MAX_SECONDS):
        raise errors.InvalidArgument(
            field or name,
            "must be a valid Timestamp from 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999Z",
        )
    return _EPOCH + timedelta(seconds=seconds, microseconds=nanos // 1000)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp_value(ts: timestamp_pb2.Timestamp) -> datetime | None:
    """A Timestamp as `timestamp_field` reads it, or None when it is out of the
    service's range (the caller decides what to say): the fast path of bulk
    streams, which read a row's timestamps directly."""
    seconds, nanos = ts.seconds, ts.nanos
    if not (0 <= nanos < 1_000_000_000) or not (MIN_SECONDS <= seconds <= MAX_SECONDS):
        return None
    return _EPOCH + timedelta(seconds=seconds, microseconds=nanos // 1000)


def set_timestamp(target: timestamp_pb2.Timestamp, value: datetime) -> None:
    """Like Timestamp.FromDatetime for an aware datetime, at a fifth of the cost
    (it runs for every timestamp of every row served).

    A naive datetime is taken as UTC: asyncpg reads PostgreSQL's `infinity`
    and `-infinity` as naive `datetime.max` and `datetime.min`, and writes
    exactly 9999-12-31T23:59:59.999999Z and 0001-01-01T00:00:00Z as those, so
    the ends of the range come back as they went in."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    delta = value - _EPOCH
    target.seconds = delta.days * 86400 + delta.seconds
    target.nanos = delta.microseconds * 1000


def struct_to_dict(value: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as plain JSON values. Raises ValueError for what JSON and
    PostgreSQL cannot hold: NaN, infinities and NUL characters."""
    return {_text(key): _json_value(item) for key, item in value.fields.items()}


def flat_struct_to_dict(value: struct_pb2.Struct) -> dict[str, Any] | None:
    """`struct_to_dict` for the common Struct, whose values are all strings,
    finite numbers, booleans or nulls: one pass, no recursion. None for
    anything else (a nested object or list, NaN, an infinity, a NUL), which
    `struct_to_dict` then converts or refuses with its message."""
    result: dict[str, Any] = {}
    fields = value.fields
    # Keys, then each value by key: the map's items() is Python-level
    # (collections.abc), at about twice the cost.
    for key in fields:
        item = fields[key]
        kind = item.WhichOneof("kind")
        if kind == "string_value":
            text = item.string_value
            if "\x00" in text:
                return None
            result[key] = text
        elif kind == "number_value":
            number = item.number_value
            if not math.isfinite(number):
                return None
            result[key] = number
        elif kind == "bool_value":
            result[key] = item.bool_value
        elif kind == "struct_value" or kind == "list_value":
            return None
        else:
            result[key] = None
        if "\x00" in key:
            return None
    return result


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
                f"update_mask.paths[{i}]", f"{errors.quote(path)} is not a field of {message_name}"
            )
    return frozenset(fields)


# Struct fields that JSONB stores (Content.raw_metadata, Item.metadata): at
# most this many bytes encoded and this deep in objects and arrays.
MAX_STRUCT_BYTES = 1024 * 1024
MAX_STRUCT_DEPTH = 20


def bounded_struct(struct: struct_pb2.Struct, field: str) -> dict[str, Any]:
    """`struct` as a dict that JSONB can hold (finite numbers, no NUL), within
    MAX_STRUCT_BYTES and MAX_STRUCT_DEPTH; INVALID_ARGUMENT naming `field`
    otherwise."""
    if struct.ByteSize() > MAX_STRUCT_BYTES:
        raise errors.InvalidArgument(field, f"is larger than {MAX_STRUCT_BYTES} bytes (encoded)")
    flat = flat_struct_to_dict(struct)
    if flat is not None:  # the common case: one level, nothing to refuse
        return flat
    try:
        value = struct_to_dict(struct)
    except ValueError as error:
        raise errors.InvalidArgument(field, str(error)) from None
    if _nesting(value) > MAX_STRUCT_DEPTH:
        raise errors.InvalidArgument(
            field, f"nests objects and arrays more than {MAX_STRUCT_DEPTH} deep"
        )
    return value


def _nesting(value: dict[str, Any] | list[Any]) -> int:
    """How deep objects and arrays nest in `value` (1: no object or array inside)."""
    inner = [
        item
        for item in (value.values() if isinstance(value, dict) else value)
        if isinstance(item, dict | list)
    ]
    return 1 + max(map(_nesting, inner), default=0)
