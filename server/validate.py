"""The shapes every RPC's input shares, checked once at the edge: text that
PostgreSQL can store (no NUL) within a documented size, UUIDs, numbers in a
range, lists within their caps. Every check raises `errors.InvalidArgument`
naming the offending field path, and quotes at most `errors.QUOTE_CHARS`
characters of what it refuses.

The limits below are the service's documented input limits (see
docs/limits.md); a domain may set tighter ones for its own fields.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence

from server import errors

# Free text (titles, bodies, descriptions), in characters.
MAX_TEXT_CHARS = 1_000_000
# Text that a B-tree index holds (IDs on a platform, run IDs, terms, URLs), in
# UTF-8 bytes: PostgreSQL refuses an index entry above about 2,700 bytes.
MAX_KEY_BYTES = 2000
# Short names (platform, arena, language, actions), in UTF-8 bytes.
MAX_NAME_BYTES = 255
# A full-text query, in characters (PostgreSQL refuses a tsquery above 1 MB).
MAX_QUERY_CHARS = 10_000
# Values in one list of a filter (platforms, arenas, languages).
MAX_FILTER_VALUES = 100
# IDs in one list (author_ids, duplicate_ids and the like).
MAX_IDS = 10_000


def text(
    value: str,
    field: str,
    *,
    max_chars: int = MAX_TEXT_CHARS,
    max_bytes: int | None = None,
    required: bool = False,
) -> str:
    """`value` when PostgreSQL can store it (no NUL) and it is within its limits:
    `max_chars` characters and, when given, `max_bytes` bytes of UTF-8."""
    if not value:
        if required:
            raise errors.InvalidArgument(field, "is required")
        return value
    if len(value) > max_chars:
        raise errors.InvalidArgument(field, f"is longer than {max_chars} characters")
    if max_bytes is not None and len(value) > max_bytes // 4 and _utf8_size(value) > max_bytes:
        raise errors.InvalidArgument(field, f"is longer than {max_bytes} bytes (UTF-8)")
    if "\x00" in value:
        raise errors.InvalidArgument(field, "must not contain NUL characters")
    return value


def _utf8_size(value: str) -> int:
    return len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))


def optional_text(
    value: str, field: str, *, max_chars: int = MAX_TEXT_CHARS, max_bytes: int | None = None
) -> str | None:
    """Like `text`, but None for an empty value."""
    return text(value, field, max_chars=max_chars, max_bytes=max_bytes) or None


def texts(
    values: Sequence[str],
    field: str,
    *,
    max_items: int = MAX_FILTER_VALUES,
    max_chars: int = MAX_TEXT_CHARS,
    max_bytes: int | None = MAX_KEY_BYTES,
) -> tuple[str, ...]:
    """A repeated string field: at most `max_items` values, each checked as by
    `text` (errors name `field[i]`)."""
    items(values, field, max_items)
    for i, value in enumerate(values):
        text(value, f"{field}[{i}]", max_chars=max_chars, max_bytes=max_bytes)
    return tuple(values)


def items(values: Sequence[object], field: str, max_items: int) -> None:
    """Refuses a repeated field with more than `max_items` values."""
    if len(values) > max_items:
        raise errors.InvalidArgument(
            field, f"holds {len(values)} values; at most {max_items} are allowed"
        )


def parse_uuid(value: str, field: str) -> uuid.UUID:
    """A required UUID in canonical text form (other spellings Python accepts,
    such as braces or no hyphens, are taken too)."""
    if not value:
        raise errors.InvalidArgument(field, "is required")
    if len(value) <= 45:  # the longest spelling uuid.UUID accepts
        try:
            return uuid.UUID(value)
        except ValueError:
            pass
    raise errors.InvalidArgument(field, f"{errors.quote(value)} is not a UUID")


def optional_uuid(value: str, field: str) -> uuid.UUID | None:
    return parse_uuid(value, field) if value else None


def uuids(values: Sequence[str], field: str, *, max_items: int = MAX_IDS) -> list[uuid.UUID]:
    """A repeated ID field: at most `max_items` UUIDs (errors name `field[i]`)."""
    items(values, field, max_items)
    return [parse_uuid(value, f"{field}[{i}]") for i, value in enumerate(values)]


def int_range(value: int, field: str, low: int, high: int) -> int:
    if not low <= value <= high:
        raise errors.InvalidArgument(field, f"must be between {low} and {high}")
    return value


def finite(value: float, field: str) -> float:
    """Refuses NaN and the infinities."""
    if not math.isfinite(value):
        raise errors.InvalidArgument(field, "must be a finite number")
    return value
