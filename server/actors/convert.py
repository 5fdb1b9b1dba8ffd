"""Actor rows <-> protobuf, and the validation of incoming actors and presences."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from google.protobuf import struct_pb2
from observatory.v1 import actor_pb2

from server import errors
from server.protoconv import dict_to_struct, parse_uuid, set_timestamp, struct_to_dict

MAX_NAME_CHARS = 500
MAX_DESCRIPTION_CHARS = 100_000
MAX_PROFILE_URL_CHARS = 2048
# UTF-8 bytes of the indexed presence fields (a B-tree entry must stay under
# about 2,700 bytes, and the account key holds platform and platform_user_id).
MAX_PLATFORM_BYTES = 255
MAX_PLATFORM_USER_ID_BYTES = 1000
MAX_USERNAME_BYTES = 500
# Actor.metadata: at most MAX_METADATA_BYTES as the Struct's protobuf encoding
# (checked before decoding), and keys, at any depth, of at most
# MAX_METADATA_KEY_CHARS characters.
MAX_METADATA_BYTES = 64 * 1024
MAX_METADATA_KEY_CHARS = 255

WRITABLE_FIELDS = frozenset(("canonical_name", "actor_type", "description", "metadata"))
OUTPUT_ONLY_FIELDS = frozenset(
    ("id", "owner_id", "aliases", "presences", "create_time", "update_time", "delete_time")
)

_TYPE_TO_DB = {
    actor_pb2.ACTOR_TYPE_PERSON: "PERSON",
    actor_pb2.ACTOR_TYPE_ORGANIZATION: "ORGANIZATION",
    actor_pb2.ACTOR_TYPE_MEDIA: "MEDIA",
    actor_pb2.ACTOR_TYPE_UNKNOWN: "UNKNOWN",
    actor_pb2.ACTOR_TYPE_UNSPECIFIED: "UNKNOWN",
}
_DB_TO_TYPE = {name: value for value, name in _TYPE_TO_DB.items() if value}


def actor_type(value: int, field: str) -> str:
    try:
        return _TYPE_TO_DB[value]  # type: ignore[index]
    except KeyError:
        raise errors.InvalidArgument(field, f"{value} is not an ActorType") from None


def text_value(
    value: str,
    field: str,
    *,
    required: bool = False,
    max_chars: int = MAX_NAME_CHARS,
    max_bytes: int | None = None,
    strip: bool = False,
) -> str | None:
    """`value` (trimmed when `strip`), or None when empty; refused when
    PostgreSQL could not store it (NUL) or it is over its limits."""
    if strip:
        value = value.strip()
    if not value:
        if required:
            raise errors.InvalidArgument(field, "is required")
        return None
    if "\x00" in value:
        raise errors.InvalidArgument(field, "must not contain NUL characters")
    if len(value) > max_chars:
        raise errors.InvalidArgument(field, f"is longer than {max_chars} characters")
    if max_bytes is not None and len(value.encode()) > max_bytes:
        raise errors.InvalidArgument(field, f"is longer than {max_bytes} bytes (UTF-8)")
    return value


def name_value(value: str, field: str) -> str:
    name = text_value(value, field, required=True, strip=True)
    assert name is not None
    return name


def actor_values(
    message: actor_pb2.Actor, fields: frozenset[str] = WRITABLE_FIELDS, prefix: str = "actor"
) -> dict[str, Any]:
    """Column values for the writable `fields` of `message`, validated."""
    values: dict[str, Any] = {}
    if "canonical_name" in fields:
        values["canonical_name"] = name_value(message.canonical_name, f"{prefix}.canonical_name")
    if "actor_type" in fields:
        values["actor_type"] = actor_type(message.actor_type, f"{prefix}.actor_type")
    if "description" in fields:
        values["description"] = text_value(
            message.description, f"{prefix}.description", max_chars=MAX_DESCRIPTION_CHARS
        )
    if "metadata" in fields:
        values["metadata"] = metadata_value(message.metadata, f"{prefix}.metadata")
    return values


def metadata_value(struct: struct_pb2.Struct, field: str) -> dict[str, Any]:
    """Actor.metadata as a dict that JSONB can hold (finite numbers, no NUL),
    within MAX_METADATA_BYTES and MAX_METADATA_KEY_CHARS."""
    if struct.ByteSize() > MAX_METADATA_BYTES:
        raise errors.InvalidArgument(field, f"is larger than {MAX_METADATA_BYTES} bytes (encoded)")
    try:
        value = struct_to_dict(struct)
    except ValueError as error:
        raise errors.InvalidArgument(field, str(error)) from None
    _check_keys(value, field)
    return value


def _check_keys(value: Any, field: str) -> None:
    """Refuses an object key, at any depth, longer than MAX_METADATA_KEY_CHARS."""
    if isinstance(value, dict):
        for key, item in value.items():
            if len(key) > MAX_METADATA_KEY_CHARS:
                raise errors.InvalidArgument(
                    field, f"has a key longer than {MAX_METADATA_KEY_CHARS} characters"
                )
            _check_keys(item, field)
    elif isinstance(value, list):
        for item in value:
            _check_keys(item, field)


def presence_values(message: actor_pb2.Presence, prefix: str = "presence") -> dict[str, Any]:
    """Column values of a presence to add (actor_id included), validated."""
    profile_url = text_value(
        message.profile_url, f"{prefix}.profile_url", max_chars=MAX_PROFILE_URL_CHARS
    )
    if profile_url is not None:
        try:
            parts = urlsplit(profile_url)
            valid = parts.scheme in ("http", "https") and bool(parts.hostname)
        except ValueError:
            valid = False
        if not valid:
            raise errors.InvalidArgument(f"{prefix}.profile_url", "must be an absolute http(s) URL")
    follower_count = message.follower_count if message.HasField("follower_count") else None
    if follower_count is not None and follower_count < 0:
        raise errors.InvalidArgument(f"{prefix}.follower_count", "must not be negative")
    return {
        "actor_id": parse_uuid(message.actor_id, f"{prefix}.actor_id"),
        "platform": text_value(
            message.platform, f"{prefix}.platform", required=True, max_bytes=MAX_PLATFORM_BYTES
        ),
        "platform_user_id": text_value(
            message.platform_user_id,
            f"{prefix}.platform_user_id",
            required=True,
            max_bytes=MAX_PLATFORM_USER_ID_BYTES,
        ),
        "username": text_value(
            message.username, f"{prefix}.username", max_bytes=MAX_USERNAME_BYTES, strip=True
        ),
        "profile_url": profile_url,
        "verified": message.verified,
        "follower_count": follower_count,
    }


def uuid_list(values: Iterable[str], field: str) -> list[uuid.UUID]:
    """Distinct UUIDs in the order given; each malformed one named by index."""
    parsed: dict[uuid.UUID, None] = {}
    for i, value in enumerate(values):
        parsed.setdefault(parse_uuid(value, f"{field}[{i}]"))
    return list(parsed)


def presence_to_proto(
    row: Mapping[Any, Any], target: actor_pb2.Presence | None = None
) -> actor_pb2.Presence:
    message = target if target is not None else actor_pb2.Presence()
    message.id = str(row["id"])
    message.actor_id = str(row["actor_id"])
    message.platform = row["platform"]
    message.platform_user_id = row["platform_user_id"]
    if row["username"]:
        message.username = row["username"]
    if row["profile_url"]:
        message.profile_url = row["profile_url"]
    message.verified = bool(row["verified"])
    if row["follower_count"] is not None:
        message.follower_count = int(row["follower_count"])
    return message


def to_proto(row: Mapping[Any, Any], target: actor_pb2.Actor | None = None) -> actor_pb2.Actor:
    """An actor row with its `aliases` (list) and `presences` (JSON list)."""
    message = target if target is not None else actor_pb2.Actor()
    message.id = str(row["id"])
    message.owner_id = str(row["owner_id"])
    message.canonical_name = row["canonical_name"]
    message.actor_type = _DB_TO_TYPE[row["actor_type"]]
    if row["description"]:
        message.description = row["description"]
    if row["metadata"]:
        dict_to_struct(row["metadata"], message.metadata)
    message.aliases.extend(row["aliases"])
    for presence in row["presences"]:
        presence_to_proto(presence, message.presences.add())
    for name in ("create_time", "update_time", "delete_time"):
        value = row[name]
        if value is not None:
            set_timestamp(getattr(message, name), value)
    return message
