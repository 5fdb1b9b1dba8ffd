"""AIP-158 page sizes and opaque keyset page tokens.

A token carries the sort key of the last row served and a fingerprint of the
query it belongs to, so it can only continue the listing that made it.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any

from google.protobuf.message import Message

from server import errors

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def page_size(value: int, *, maximum: int = MAX_PAGE_SIZE, field: str = "page_size") -> int:
    if value < 0:
        raise errors.InvalidArgument(field, "must not be negative")
    if value == 0:
        return min(DEFAULT_PAGE_SIZE, maximum)
    return min(value, maximum)


def fingerprint(kind: str, *query: Message | str | None) -> str:
    digest = hashlib.sha256(kind.encode())
    for part in query:
        if isinstance(part, Message):
            digest.update(part.SerializeToString(deterministic=True))
        elif part is not None:
            digest.update(part.encode())
        digest.update(b"\x00")
    return digest.hexdigest()[:24]


def next_page_token(
    rows: Sequence[Any], size: int, query_fingerprint: str, key: Callable[[Any], Sequence[Any]]
) -> str:
    """For `rows` fetched with a limit of `size` + 1: the token for the page
    after the first `size` rows (`key` gives a row's sort key), or "" when
    the extra row did not come, i.e. this is the last page."""
    if len(rows) <= size:
        return ""
    return encode_token(query_fingerprint, key(rows[size - 1]))


def encode_token(query_fingerprint: str, key: Sequence[Any]) -> str:
    """A token for the page after the row whose sort key is `key` (datetimes
    and UUIDs are written as text)."""
    payload = json.dumps(
        {"q": query_fingerprint, "k": list(key)}, separators=(",", ":"), default=str
    )
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def decode_token(
    token: str, query_fingerprint: str, *parsers: Callable[[Any], Any], field: str = "page_token"
) -> tuple[Any, ...] | None:
    """The sort key of the previous page's last row, each part read back by its
    parser (e.g. `datetime.fromisoformat`, `uuid.UUID`), or None for the first page."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        payload = json.loads(raw)
        key, query = payload["k"], payload["q"]
    except (ValueError, KeyError, TypeError):
        raise errors.InvalidArgument(field, "is not a token this service issued") from None
    if query != query_fingerprint:
        raise errors.InvalidArgument(
            field, "belongs to a different query; keep the filter unchanged while paging"
        )
    try:
        if not isinstance(key, list) or len(key) != len(parsers):
            raise ValueError(key)
        return tuple(parse(part) for parse, part in zip(parsers, key, strict=True))
    except (TypeError, ValueError):
        raise errors.InvalidArgument(field, "is not a token this service issued") from None
