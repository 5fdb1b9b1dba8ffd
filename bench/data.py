"""Synthetic content rows: as Content messages (for the gRPC client), as
serialized IngestContentRequest batches, and as COPY records built by the
service's own converter (so both ingest paths store exactly the same rows)."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from observatory.v1 import content_pb2

from server.content import convert

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


def copy_records(rows: list[content_pb2.Content], owner_id: uuid.UUID) -> list[tuple[Any, ...]]:
    """The COPY records (convert.INSERT_COLUMNS order) the service would write."""
    return [convert.ingest_record(row, owner_id) for row in rows]
