"""Synthetic content rows: as Content messages (for the gRPC client), as
serialized IngestContentRequest batches, and as COPY records of the columns
the service stores for them (made here, by the contract's rules, so that the
raw baselines use no code of the service's)."""

from __future__ import annotations

import hashlib
import json
import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import json_format
from observatory.v1 import content_pb2

PLATFORMS = ("twitter", "reddit", "facebook", "rss", "youtube", "telegram")
ARENAS = ("news", "politics", "science", "sport", "culture")
LANGUAGES = ("en", "da", "de", "pt-BR", "fr")
TERMS = ("climate", "election", "vaccine", "energy", "football", "housing", "ai")
_TEXT = (
    "the weather report says rain is coming to the north while the south stays dry "
    "ministers met today to discuss a new plan for energy prices and housing costs "
    "scientists publish results on a study of coastal erosion over twenty years "
    "fans gathered outside the stadium before the match in the late afternoon sun"
)
WORDS = tuple(_TEXT.split(" "))

# The text and count columns of content that a client writes.
TEXT_COLUMNS = (
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
COUNT_COLUMNS = ("views_count", "likes_count", "shares_count", "comments_count")
# The columns an ingest writes, in the order of `copy_records`' records.
INSERT_COLUMNS = (
    "owner_id",
    *TEXT_COLUMNS,
    "published_at",
    "collected_at",
    "author_id",
    *COUNT_COLUMNS,
    "search_terms_matched",
    "raw_metadata",
    "content_hash",
    "url_normalized",
)
# Every column a read returns (all but the derived full-text vector), in the
# table's order, as SQL.
SELECT_COLUMNS = (
    "id, owner_id, platform, arena, platform_id, content_type, title, text_content, url, "
    "language, published_at, collected_at, author_platform_id, author_display_name, "
    "author_id, views_count, likes_count, shares_count, comments_count, "
    "search_terms_matched, raw_metadata, collection_run_id, content_hash, duplicate_of, "
    "url_normalized, create_time, update_time, delete_time"
)


def _sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize()


def make_rows(count: int, seed: int, now: datetime | None = None) -> list[content_pb2.Content]:
    """`count` valid Content messages with unique platform IDs (per seed),
    published over the last 30 days; about 700 bytes each when serialized."""
    rng = random.Random(seed)
    now = now or datetime.now(UTC).replace(microsecond=0)
    rows: list[content_pb2.Content] = []
    for i in range(count):
        platform = PLATFORMS[i % len(PLATFORMS)]
        author = rng.randrange(5000)
        message = content_pb2.Content(
            platform=platform,
            arena=rng.choice(ARENAS),
            platform_id=f"{seed}-{i}",
            content_type="post",
            title=_sentence(rng, 9),
            text_content=_sentence(rng, 55),
            url=f"https://example.com/{platform}/{seed}/{i}?utm_source=bench",
            language=rng.choice(LANGUAGES),
            author_platform_id=f"user{author}",
            author_display_name=f"User {author}",
            views_count=rng.randrange(100_000),
            likes_count=rng.randrange(5_000),
            shares_count=rng.randrange(1_000),
            comments_count=rng.randrange(500),
            search_terms_matched=rng.sample(TERMS, 2),
            collection_run_id=f"run-{seed}-{i // 10_000}",
        )
        published = now - timedelta(seconds=rng.randrange(30 * 86400))
        message.published_at.FromDatetime(published)
        message.collected_at.FromDatetime(published + timedelta(minutes=rng.randrange(600)))
        message.raw_metadata.update(
            {"lang_score": round(rng.random(), 3), "source": "bench", "rank": rng.randrange(100)}
        )
        rows.append(message)
    return rows


def ingest_batches(rows: list[content_pb2.Content], batch_rows: int) -> list[bytes]:
    """Serialized IngestContentRequest messages of `batch_rows` rows each."""
    batches = []
    for start in range(0, len(rows), batch_rows):
        request = content_pb2.IngestContentRequest()
        request.contents.extend(rows[start : start + batch_rows])
        batches.append(request.SerializeToString())
    return batches


def content_hash(text: str) -> str:
    """The contract's content_hash of ASCII text: SHA-256 hex of the text
    lower-cased with its whitespace collapsed (make_rows writes only ASCII)."""
    return hashlib.sha256(" ".join(text.lower().split()).encode()).hexdigest()


def normalized_url(url: str) -> str:
    """The duplicate-finding key of a make_rows URL: the contract's rules come
    down to dropping its utm_ query."""
    return url.split("?", 1)[0]


def copy_records(rows: list[content_pb2.Content], owner_id: uuid.UUID) -> list[tuple[Any, ...]]:
    """The COPY records (INSERT_COLUMNS order) of make_rows' rows: what the
    service stores for them (raw_metadata as JSON text)."""
    records = []
    for row in rows:
        records.append(
            (
                owner_id,
                *(getattr(row, name) or None for name in TEXT_COLUMNS),
                row.published_at.ToDatetime(tzinfo=UTC),
                row.collected_at.ToDatetime(tzinfo=UTC),
                None,
                *(getattr(row, name) for name in COUNT_COLUMNS),
                list(row.search_terms_matched),
                json.dumps(
                    json_format.MessageToDict(row.raw_metadata),
                    separators=(",", ":"),
                    ensure_ascii=False,
                ),
                content_hash(row.text_content or row.title),
                normalized_url(row.url),
            )
        )
    return records
