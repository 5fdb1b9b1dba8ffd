"""VectorService tables. Items are LIST-partitioned by collection: each
collection's partition carries that collection's own HNSW index (see
server/vectors/repository.py), so one tenant's data never shares, or
degrades, another's graph."""

from __future__ import annotations

from pgvector.sqlalchemy import HALFVEC, VECTOR
from sqlalchemy import (
    CheckConstraint,
    Column,
    Computed,
    DateTime,
    Index,
    Integer,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, TSVECTOR, UUID

from server.tables import metadata

# Full-text over item text: 'simple' treats every language alike (no stemming).
# Only the first 100,000 characters are indexed, so no text can overflow a tsvector.
ITEM_SEARCH_VECTOR = "to_tsvector('simple'::regconfig, left(coalesce(text, ''), 100000))"

vector_collections = Table(
    "vector_collections",
    metadata,
    Column("id", UUID(as_uuid=True), nullable=False, server_default=text("uuidv7()")),
    Column("owner_id", UUID(as_uuid=True), nullable=False),
    Column("name", Text, nullable=False),
    Column("dimension", Integer, nullable=False),
    Column("metric", Text, nullable=False),
    Column("precision", Text, nullable=False),
    Column("hnsw_m", Integer, nullable=False),
    Column("hnsw_ef_construction", Integer, nullable=False),
    Column("create_time", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # 'none' or 'binary' (the HNSW index over binary_quantize(vector)).
    Column("quantization", Text, nullable=False, server_default=text("'none'")),
    # The keys CreateMetadataIndex indexed: [{"key": ..., "type": ...}, ...].
    Column("metadata_indexes", JSONB, nullable=False, server_default=text("'[]'::jsonb")),
    # Every key carries the tenant (owner_id): see docs/scaling.md.
    PrimaryKeyConstraint("id", "owner_id"),
    UniqueConstraint("owner_id", "name"),
    CheckConstraint("metric IN ('cosine', 'l2', 'inner_product')", name="metric"),
    CheckConstraint("precision IN ('float32', 'float16')", name="precision"),
    CheckConstraint("quantization IN ('none', 'binary')", name="quantization"),
)

vector_items = Table(
    "vector_items",
    metadata,
    Column("collection_id", UUID(as_uuid=True), nullable=False),
    Column("id", Text, nullable=False),
    # Exactly one of the two is set, by the collection's precision; neither has a
    # fixed dimension: each partition's index expression casts to its own.
    Column("embedding", VECTOR()),
    Column("embedding_half", HALFVEC()),
    Column("text", Text),
    Column("metadata", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("content_id", UUID(as_uuid=True)),
    Column("url", Text),
    Column("url_normalized", Text),
    Column("text_search", TSVECTOR, Computed(ITEM_SEARCH_VECTOR, persisted=True)),
    Column("update_time", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # The collection's owner, written with every item: the tenant, in the key
    # beside the partition key.
    Column("owner_id", UUID(as_uuid=True), nullable=False),
    PrimaryKeyConstraint("collection_id", "id", "owner_id"),
    postgresql_partition_by="LIST (collection_id)",
)

Index(
    "ix_vector_items_metadata",
    vector_items.c.metadata,
    postgresql_using="gin",
    postgresql_ops={"metadata": "jsonb_path_ops"},
)
Index("ix_vector_items_text_search", vector_items.c.text_search, postgresql_using="gin")
Index(
    "ix_vector_items_url",
    vector_items.c.collection_id,
    vector_items.c.url_normalized,
    postgresql_where=vector_items.c.url_normalized.isnot(None),
)
