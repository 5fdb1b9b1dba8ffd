"""AIP-158 page sizes and opaque keyset page tokens.

A token carries the sort key of the last row served and a fingerprint of the
query it belongs to, so it can only continue the listing that made it. It is
signed (HMAC-SHA256 with a key derived from the deployment's token secret,
see `use_key`), so every server and worker of one deployment reads the tokens
the others issued and nobody can forge one; each value read back is checked
for its exact type all the same, so a token that decodes always yields values
the query can bind.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from google.protobuf.message import Message

from server import errors

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# Longer than any token this service issues (the longest sort keys are a few
# hundred characters): anything longer is refused before it is decoded.
MAX_TOKEN_CHARS = 4096
_MAC_BYTES = 16
_INT64 = 2**63
_UNCONFIGURED_KEY = hashlib.sha256(b"observatory page tokens: no deployment key").digest()
_key = _UNCONFIGURED_KEY


def derive_key(secret: str | bytes) -> bytes:
    """The page-token signing key for a deployment whose token secret (or, for
    RS256-only deployments, public key) is `secret`: one key for every server
    and worker that share it, and a different one from the secret itself."""
    material = secret.encode() if isinstance(secret, str) else secret
    return hmac.new(material, b"observatory.v1 page tokens", hashlib.sha256).digest()


def deployment_key(jwt_secret: str | None, jwt_public_key: str | None) -> bytes:
    """The signing key of a deployment: derived from its HS256 secret, or else
    from its RS256 public key (the PEM text, read from the file when the
    setting names one). A public key is no secret: such tokens are checked
    for integrity, and their values are type-checked all the same."""
    if jwt_secret:
        return derive_key(jwt_secret)
    material = jwt_public_key or ""
    if material and "-----BEGIN" not in material:
        material = Path(material).read_text()
    return derive_key(material)


def use_key(key: bytes) -> None:
    """Signs and checks page tokens with `key` from now on (create_server)."""
    global _key
    _key = key


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


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        # asyncpg reads PostgreSQL's ±infinity as naive datetime.max/min: UTC.
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
    return str(value)


def encode_token(query_fingerprint: str, key: Sequence[Any]) -> str:
    """A token for the page after the row whose sort key is `key` (datetimes
    and UUIDs are written as text)."""
    payload = json.dumps(
        {"q": query_fingerprint, "k": list(key)}, separators=(",", ":"), default=_plain
    ).encode()
    mac = hmac.new(_key, payload, hashlib.sha256).digest()[:_MAC_BYTES]
    return f"{_b64encode(payload)}.{_b64encode(mac)}"


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# -- strict readers of the values a token holds -----------------------------------


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(value)
    return value


def _integer(value: Any) -> int:
    if type(value) is not int or not -_INT64 <= value < _INT64:
        raise TypeError(value)
    return value


def _number(value: Any) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):
        raise TypeError(value)
    return float(value)


def _uuid(value: Any) -> uuid.UUID:
    return uuid.UUID(_text(value))


def _time(value: Any) -> datetime:
    parsed = datetime.fromisoformat(_text(value))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


# The parsers callers name, read strictly: a value of another JSON type is refused
# rather than coerced (int("7"), float(True), a naive or out-of-range time).
_STRICT: dict[Any, Callable[[Any], Any]] = {
    str: _text,
    int: _integer,
    float: _number,
    uuid.UUID: _uuid,
    datetime.fromisoformat: _time,
    date.fromisoformat: lambda value: date.fromisoformat(_text(value)),
}


def decode_token(
    token: str, query_fingerprint: str, *parsers: Callable[[Any], Any], field: str = "page_token"
) -> tuple[Any, ...] | None:
    """The sort key of the previous page's last row, each part read back by its
    parser (`str`, `int`, `float`, `uuid.UUID`, `datetime.fromisoformat` are read
    strictly; any other callable is applied as it is), or None for the first
    page. INVALID_ARGUMENT for anything this service did not issue for this query."""
    if not token:
        return None
    if len(token) > MAX_TOKEN_CHARS:
        raise _foreign(field)
    body, dot, signature = token.partition(".")
    try:
        payload = _b64decode(body)
        mac = _b64decode(signature)
    except (ValueError, binascii.Error):
        raise _foreign(field) from None
    expected = hmac.new(_key, payload, hashlib.sha256).digest()[:_MAC_BYTES]
    if not dot or not hmac.compare_digest(mac, expected):
        raise _foreign(field)
    try:
        decoded = json.loads(payload)
        key, query = decoded["k"], decoded["q"]
    except (ValueError, KeyError, TypeError):
        raise _foreign(field) from None
    if query != query_fingerprint:
        raise errors.InvalidArgument(
            field, "belongs to a different query; keep the filter unchanged while paging"
        )
    if not isinstance(key, list) or len(key) != len(parsers):
        raise _foreign(field)
    try:
        return tuple(
            _STRICT.get(parse, parse)(part) for parse, part in zip(parsers, key, strict=True)
        )
    except (TypeError, ValueError, OverflowError, AttributeError):
        raise _foreign(field) from None


def _foreign(field: str) -> errors.InvalidArgument:
    return errors.InvalidArgument(field, "is not a token this service issued")
