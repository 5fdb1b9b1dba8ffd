"""Content rows <-> protobuf, and the validation of incoming content."""

from __future__ import annotations

import hashlib
import re
import unicodedata
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from google.protobuf import struct_pb2
from observatory.v1 import content_pb2

from server import errors, validate
from server.protoconv import (
    MAX_STRUCT_BYTES,
    MAX_STRUCT_DEPTH,
    bounded_struct,
    dict_to_struct,
    flat_struct_to_dict,
    optional_uuid,
    set_timestamp,
    timestamp_field,
    timestamp_value,
    to_json,
)
from server.urls import normalize_url, plain_normalized_url

TEXT_FIELDS = (
    "platform",
    "arena",
    "platform_id",
    "content_type",
    "title",
    "text_content",
    "url",
    "language",
    "author_platform_id",
    "author_display_name",
    "collection_run_id",
)
COUNT_FIELDS = ("views_count", "likes_count", "shares_count", "comments_count")
TIME_FIELDS = ("published_at", "collected_at")
# Every field a client may write; the rest of Content is output only.
WRITABLE_FIELDS = frozenset(
    (*TEXT_FIELDS, *COUNT_FIELDS, *TIME_FIELDS, "author_id", "search_terms_matched", "raw_metadata")
)
OUTPUT_ONLY_FIELDS = frozenset(
    ("id", "owner_id", "content_hash", "duplicate_of", "create_time", "update_time", "delete_time")
)
# The columns IngestContent and CreateContent write, in COPY order.
INSERT_COLUMNS = (
    "owner_id",
    *TEXT_FIELDS,
    "published_at",
    "collected_at",
    "author_id",
    *COUNT_FIELDS,
    "search_terms_matched",
    "raw_metadata",
    "content_hash",
    "url_normalized",
)
# Limits of each text field (documented in docs/limits.md): characters, and
# UTF-8 bytes for what B-tree or GIN indexes hold (PostgreSQL refuses an index
# entry above about 2,700 bytes; the natural key holds platform and platform_id
# together). Free text is bounded only by characters.
MAX_TEXT = validate.MAX_TEXT_CHARS
MAX_KEY_BYTES = validate.MAX_KEY_BYTES
MAX_SHORT_CHARS = 10_000
MAX_INDEXED_BYTES = {
    "platform": validate.MAX_NAME_BYTES,
    "arena": validate.MAX_NAME_BYTES,
    "language": validate.MAX_NAME_BYTES,
    "content_type": validate.MAX_NAME_BYTES,
    "platform_id": MAX_KEY_BYTES,
    "collection_run_id": MAX_KEY_BYTES,
    "author_platform_id": MAX_KEY_BYTES,
    "url": MAX_KEY_BYTES,
}
MAX_CHARS = {"author_display_name": MAX_SHORT_CHARS}
# search_terms_matched: at most this many terms, each at most MAX_KEY_BYTES.
MAX_TERMS = 1000
# raw_metadata: at most MAX_METADATA_BYTES as the Struct's protobuf encoding
# (about its size as JSON), and objects and arrays nested at most
# MAX_METADATA_DEPTH deep. (The protobuf decoder itself refuses a message that
# nests a Struct deeper than about 31 levels, as a whole.)
MAX_METADATA_BYTES = MAX_STRUCT_BYTES
MAX_METADATA_DEPTH = MAX_STRUCT_DEPTH
_LANGUAGE = re.compile(r"[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8})*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def content_hash(title: str | None, text_content: str | None) -> str | None:
    """SHA-256 hex of the normalised text (the body, or the title when there is
    no body): NFKC, case-folded, whitespace collapsed. None when there is no text."""
    text = text_content or title
    if not text:
        return None
    if text.isascii():  # NFKC leaves ASCII alone, and casefold is lower there
        normalised = " ".join(text.lower().split())
    else:
        normalised = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    if not normalised:
        return None
    return hashlib.sha256(normalised.encode()).hexdigest()


def _check_text(field: str, value: str, max_bytes: int | None = None) -> str | None:
    """`value`, or None when empty; refused if PostgreSQL could not store it
    (NUL) or index it (over `max_bytes` of UTF-8)."""
    return validate.optional_text(
        value, field, max_chars=MAX_CHARS.get(field, MAX_TEXT), max_bytes=max_bytes
    )


def _check_url(url: str) -> None:
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:  # e.g. an unclosed IPv6 bracket
        host = None
    else:
        if parts.scheme not in ("http", "https"):
            host = None
    if not host or _CONTROL.search(url) or " " in host:
        raise errors.InvalidArgument("url", "must be an absolute http(s) URL")


def writable_values(
    message: content_pb2.Content, fields: frozenset[str] = WRITABLE_FIELDS
) -> dict[str, Any]:
    """Column values for the writable `fields` of `message`, each validated on its
    own. Field names in errors are relative to the Content message."""
    values: dict[str, Any] = {}
    for name in TEXT_FIELDS:
        if name in fields:
            values[name] = _check_text(name, getattr(message, name), MAX_INDEXED_BYTES.get(name))
    if values.get("language") and not _LANGUAGE.fullmatch(values["language"]):
        raise errors.InvalidArgument("language", "must be a BCP 47 tag such as 'en' or 'pt-BR'")
    if "url" in fields:
        if values["url"]:
            _check_url(values["url"])
        values["url_normalized"] = normalized_url(values["url"])
    for name in TIME_FIELDS:
        if name in fields:
            values[name] = timestamp_field(message, name)
    for name in COUNT_FIELDS:
        if name in fields:
            count = getattr(message, name) if message.HasField(name) else None  # type: ignore[arg-type]
            if count is not None and count < 0:
                raise errors.InvalidArgument(name, "must not be negative")
            values[name] = count
    if "author_id" in fields:
        values["author_id"] = optional_uuid(message.author_id, "author_id")
    if "search_terms_matched" in fields:
        terms = message.search_terms_matched
        validate.texts(terms, "search_terms_matched", max_items=MAX_TERMS, max_bytes=MAX_KEY_BYTES)
        values["search_terms_matched"] = list(terms)
    if "raw_metadata" in fields:
        values["raw_metadata"] = metadata_value(message.raw_metadata)
    return values


def metadata_value(struct: struct_pb2.Struct) -> dict[str, Any]:
    """raw_metadata as a dict that JSONB can hold (see protoconv.bounded_struct)."""
    return bounded_struct(struct, "raw_metadata")


def check_complete(values: Mapping[str, Any]) -> None:
    """The rules a stored item must satisfy as a whole."""
    if not values.get("platform"):
        raise errors.InvalidArgument("platform", "is required")
    if values.get("published_at") is None:
        raise errors.InvalidArgument("published_at", "is required")
    if not (values.get("title") or values.get("text_content") or values.get("url")):
        raise errors.InvalidArgument("title", "one of title, text_content or url is required")


def new_content_values(message: content_pb2.Content, owner_id: uuid.UUID) -> dict[str, Any]:
    values = writable_values(message)
    check_complete(values)
    values["owner_id"] = owner_id
    values["content_hash"] = content_hash(values["title"], values["text_content"])
    return values


def normalized_url(url: str | None) -> str | None:
    """The URL's duplicate-finding key (server.urls), which a B-tree indexes:
    refused when it would not fit there."""
    normalized = normalize_url(url)
    if (
        normalized is not None
        and len(normalized) > MAX_KEY_BYTES // 4
        and len(normalized.encode()) > MAX_KEY_BYTES
    ):
        raise errors.InvalidArgument("url", f"is longer than {MAX_KEY_BYTES} bytes once normalised")
    return normalized


def ingest_record(message: content_pb2.Content, owner_id: uuid.UUID) -> tuple[Any, ...]:
    """One COPY record (INSERT_COLUMNS order); raw_metadata as JSON text.

    The record of a row that is plainly valid is made in one pass
    (`_plain_record`, the bulk of any ingest); any other row goes through
    `new_content_values`, which refuses it, naming the field, exactly as
    CreateContent would, or converts what the quick checks would not vouch for."""
    record = _plain_record(message, owner_id)
    if record is not None:
        return record
    values = new_content_values(message, owner_id)
    values["raw_metadata"] = to_json(values["raw_metadata"])
    return tuple(values[column] for column in INSERT_COLUMNS)


# (text field, the length up to which a value of it is within its limits
# whatever its characters), in INSERT_COLUMNS order: a longer value may still
# be valid, and gets the full check.
_PLAIN_TEXT_LENGTHS = tuple(
    (
        name,
        min(MAX_CHARS.get(name, MAX_TEXT), MAX_INDEXED_BYTES[name] // 4)
        if name in MAX_INDEXED_BYTES
        else MAX_CHARS.get(name, MAX_TEXT),
    )
    for name in TEXT_FIELDS
)
_PLAIN_TERM_LENGTH = MAX_KEY_BYTES // 4


# An absolute http(s) URL that urlsplit takes apart exactly as the groups do
# (host, path, query; the fragment dropped), given only printable ASCII and no
# space: a host name of letters, digits, dots and hyphens (no port, no user
# info, no IPv6 literal, no trailing dot), then a path, query and fragment.
def _plain_record(message: content_pb2.Content, owner_id: uuid.UUID) -> tuple[Any, ...] | None:
    """The record `new_content_values` would make of a row, from checks that
    only vouch for plainly valid values; None whenever one cannot (a long or
    unusual value, or one that is invalid), for the full checks to decide.
    Only raw_metadata, the last field the full checks look at, may be refused
    here, once every other field is known to be valid: by the full check's
    own code, so with its message."""
    texts: list[str | None] = []
    for name, plain_length in _PLAIN_TEXT_LENGTHS:
        value: str = getattr(message, name)
        if not value:
            texts.append(None)
        elif len(value) > plain_length or "\x00" in value:
            return None
        else:
            texts.append(value)
    platform, _, _, _, title, text_content, url, language = texts[:8]
    if not platform or not (title or text_content or url):
        return None
    if language is not None and not _LANGUAGE.fullmatch(language):
        return None
    normalized = None
    if url is not None:
        normalized = _plain_normalized_url(url)
        if normalized is None:
            return None
    if not message.HasField("published_at"):
        return None
    published = timestamp_value(message.published_at)
    if published is None:
        return None
    collected = None
    if message.HasField("collected_at"):
        collected = timestamp_value(message.collected_at)
        if collected is None:
            return None
    counts: list[int | None] = []
    for name in COUNT_FIELDS:
        if message.HasField(name):  # type: ignore[arg-type]
            count: int = getattr(message, name)
            if count < 0:
                return None
            counts.append(count)
        else:
            counts.append(None)
    author_id = None
    if message.author_id:
        try:
            author_id = optional_uuid(message.author_id, "author_id")
        except errors.InvalidArgument:
            return None
    terms = list(message.search_terms_matched)
    if len(terms) > MAX_TERMS:
        return None
    for term in terms:
        if len(term) > _PLAIN_TERM_LENGTH or "\x00" in term:
            return None
    metadata_struct = message.raw_metadata
    metadata: dict[str, Any] | None = None
    if metadata_struct.ByteSize() <= MAX_METADATA_BYTES:
        metadata = flat_struct_to_dict(metadata_struct)
    if metadata is None:
        # Nested, or to be refused: the full conversion, whose errors are the
        # same as the full path's (every other field is valid by now).
        metadata = metadata_value(metadata_struct)
    return (
        owner_id,
        *texts,
        published,
        collected,
        author_id,
        *counts,
        terms,
        to_json(metadata),
        content_hash(title, text_content),
        normalized,
    )


def _plain_normalized_url(url: str) -> str | None:
    """`normalized_url(url)` of an http(s) URL that `_check_url` accepts and
    urls.plain_normalized_url vouches for; None for any other URL."""
    normalized = plain_normalized_url(url)
    if normalized is None or len(normalized) > MAX_KEY_BYTES:  # ASCII: characters are bytes
        return None
    return normalized


def to_proto(
    row: Mapping[Any, Any], target: content_pb2.Content | None = None
) -> content_pb2.Content:
    message = target if target is not None else content_pb2.Content()
    message.id = str(row["id"])
    message.owner_id = str(row["owner_id"])
    for name in TEXT_FIELDS:
        value = row[name]
        if value:
            setattr(message, name, value)
    for name in COUNT_FIELDS:
        value = row[name]
        if value is not None:
            setattr(message, name, value)
    for name in (*TIME_FIELDS, "create_time", "update_time", "delete_time"):
        value = row[name]
        if value is not None:
            set_timestamp(getattr(message, name), value)
    if row["author_id"] is not None:
        message.author_id = str(row["author_id"])
    if row["duplicate_of"] is not None:
        message.duplicate_of = str(row["duplicate_of"])
    if row["content_hash"]:
        message.content_hash = row["content_hash"]
    if row["search_terms_matched"]:
        message.search_terms_matched.extend(row["search_terms_matched"])
    metadata = row["raw_metadata"]
    if metadata:
        dict_to_struct(metadata, message.raw_metadata)
    return message
