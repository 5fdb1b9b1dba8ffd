"""The content table: collected items, RANGE-partitioned by published_at
(monthly partitions made ahead by `content_ensure_partitions`)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    ColumnElement,
    Computed,
    DateTime,
    Index,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    case,
    func,
    literal_column,
    text,
    type_coerce,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, TSVECTOR, UUID

from server.tables import metadata

# Full-text configuration for content. 'simple' lower-cases and splits words
# without stemming, so it treats every language the same. Only the first 10,000
# characters of the title and 100,000 of the text are indexed: at worst about
# five bytes of tsvector per character, that stays under PostgreSQL's 1 MB limit
# for one tsvector, so no text a client may send can make the row unstorable.
CONTENT_TS_CONFIG = "simple"
CONTENT_SEARCH_VECTOR = (
    "setweight(to_tsvector('simple'::regconfig, left(coalesce(title, ''), 10000)), 'A') || "
    "setweight(to_tsvector('simple'::regconfig, left(coalesce(text_content, ''), 100000)), 'B')"
)

# asyncpg writes the two ends of the Timestamp range, 0001-01-01T00:00:00Z and
# 9999-12-31T23:59:59.999999Z, as PostgreSQL's -infinity and infinity (and
# reads those back as them). They sort and compare as those instants do; SQL
# that prints or truncates a client's timestamp goes through `finite_time`.
FIRST_INSTANT = "0001-01-01 00:00:00+00"
LAST_INSTANT = "9999-12-31 23:59:59.999999+00"


def finite_time(column: ColumnElement[Any]) -> ColumnElement[Any]:
    """`column` with ±infinity read as the first and last instants of the range."""
    timestamptz = DateTime(timezone=True)
    return type_coerce(
        case(
            (
                column == literal_column("'infinity'::timestamptz"),
                literal_column(f"'{LAST_INSTANT}'::timestamptz"),
            ),
            (
                column == literal_column("'-infinity'::timestamptz"),
                literal_column(f"'{FIRST_INSTANT}'::timestamptz"),
            ),
            else_=column,
        ),
        timestamptz,
    )


# An item's identity per owner: ingest and create skip or refuse a second one.
CONTENT_NATURAL_KEY = ("owner_id", "platform", "platform_id", "published_at")

content = Table(
    "content",
    metadata,
    Column("id", UUID(as_uuid=True), nullable=False, server_default=text("uuidv7()")),
    Column("owner_id", UUID(as_uuid=True), nullable=False),
    Column("platform", Text, nullable=False),
    Column("arena", Text),
    Column("platform_id", Text),
    Column("content_type", Text),
    Column("title", Text),
    Column("text_content", Text),
    Column("url", Text),
    Column("language", Text),
    Column("published_at", DateTime(timezone=True), nullable=False),
    Column("collected_at", DateTime(timezone=True)),
    Column("author_platform_id", Text),
    Column("author_display_name", Text),
    Column("author_id", UUID(as_uuid=True)),
    Column("views_count", BigInteger),
    Column("likes_count", BigInteger),
    Column("shares_count", BigInteger),
    Column("comments_count", BigInteger),
    Column("search_terms_matched", ARRAY(Text), nullable=False, server_default=text("'{}'")),
    Column("raw_metadata", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("collection_run_id", Text),
    Column("content_hash", String(64)),
    Column("duplicate_of", UUID(as_uuid=True)),
    # server.urls.normalize_url(url), kept by every write of url: FindDuplicates
    # groups on it.
    Column("url_normalized", Text),
    Column("create_time", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("update_time", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("delete_time", DateTime(timezone=True)),
    Column("search_vector", TSVECTOR, Computed(CONTENT_SEARCH_VECTOR, persisted=True)),
    # The partition key (published_at) and the tenant (owner_id) are in every
    # key: PostgreSQL asks for the one, Citus for the other (docs/scaling.md).
    PrimaryKeyConstraint("id", "published_at", "owner_id"),
    UniqueConstraint(*CONTENT_NATURAL_KEY, name="uq_content_natural_key"),
    postgresql_partition_by="RANGE (published_at)",
)

Index(
    "ix_content_owner_published",
    content.c.owner_id,
    content.c.published_at.desc(),
    content.c.id.desc(),
)
Index("ix_content_published", content.c.published_at.desc(), content.c.id.desc())
# An owner's live rows by time: counts (ExportContent's rows_total) by an
# index-only scan, without reading the table (migration 0009).
Index(
    "ix_content_live_owner_published",
    content.c.owner_id,
    content.c.published_at,
    postgresql_where=content.c.delete_time.is_(None),
)
Index(
    "ix_content_owner_platform",
    content.c.owner_id,
    content.c.platform,
    content.c.published_at.desc(),
)
Index("ix_content_owner_arena", content.c.owner_id, content.c.arena, content.c.published_at.desc())
Index("ix_content_owner_language", content.c.owner_id, content.c.language)
Index("ix_content_author", content.c.author_id, postgresql_where=content.c.author_id.isnot(None))
Index(
    "ix_content_collection_run",
    content.c.collection_run_id,
    postgresql_where=content.c.collection_run_id.isnot(None),
)
Index("ix_content_hash", content.c.owner_id, content.c.content_hash)
Index(
    "ix_content_url_normalized",
    content.c.owner_id,
    content.c.url_normalized,
    postgresql_where=content.c.url_normalized.isnot(None),
)
Index("ix_content_search_terms", content.c.search_terms_matched, postgresql_using="gin")
Index(
    "ix_content_raw_metadata",
    content.c.raw_metadata,
    postgresql_using="gin",
    postgresql_ops={"raw_metadata": "jsonb_path_ops"},
)
Index("ix_content_search_vector", content.c.search_vector, postgresql_using="gin")
