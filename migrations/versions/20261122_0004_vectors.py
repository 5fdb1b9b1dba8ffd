"""Vectors: pgvector, collections, items LIST-partitioned by collection.

Each collection's partition and its HNSW index are made at run time by
CreateCollection (from the collection's validated values) and dropped by
DeleteCollection; dropping vector_items here drops them all.

Revision ID: 0004
Revises: 0001
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from pgvector.sqlalchemy import HALFVEC, VECTOR
from sqlalchemy.dialects import postgresql as pg

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ITEM_SEARCH_VECTOR = "to_tsvector('simple'::regconfig, left(coalesce(text, ''), 100000))"


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS vector")
    uuid = pg.UUID(as_uuid=True)
    tstz = sa.DateTime(timezone=True)
    op.create_table(
        "vector_collections",
        sa.Column("id", uuid, nullable=False, server_default=sa.text("uuidv7()")),
        sa.Column("owner_id", uuid, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("dimension", sa.Integer, nullable=False),
        sa.Column("metric", sa.Text, nullable=False),
        sa.Column("precision", sa.Text, nullable=False),
        sa.Column("hnsw_m", sa.Integer, nullable=False),
        sa.Column("hnsw_ef_construction", sa.Integer, nullable=False),
        sa.Column("create_time", tstz, nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("id", name="pk_vector_collections"),
        sa.UniqueConstraint("owner_id", "name", name="uq_vector_collections_owner_id_name"),
        sa.CheckConstraint(
            "metric IN ('cosine', 'l2', 'inner_product')", name="ck_vector_collections_metric"
        ),
        sa.CheckConstraint(
            "precision IN ('float32', 'float16')", name="ck_vector_collections_precision"
        ),
    )
    op.create_table(
        "vector_items",
        sa.Column("collection_id", uuid, nullable=False),
        sa.Column("id", sa.Text, nullable=False),
        sa.Column("embedding", VECTOR()),
        sa.Column("embedding_half", HALFVEC()),
        sa.Column("text", sa.Text),
        sa.Column("metadata", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("content_id", uuid),
        sa.Column("url", sa.Text),
        sa.Column("url_normalized", sa.Text),
        sa.Column("text_search", pg.TSVECTOR, sa.Computed(ITEM_SEARCH_VECTOR, persisted=True)),
        sa.Column("update_time", tstz, nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("collection_id", "id", name="pk_vector_items"),
        postgresql_partition_by="LIST (collection_id)",
    )
    op.create_index(
        "ix_vector_items_metadata",
        "vector_items",
        ["metadata"],
        postgresql_using="gin",
        postgresql_ops={"metadata": "jsonb_path_ops"},
    )
    op.create_index(
        "ix_vector_items_text_search", "vector_items", ["text_search"], postgresql_using="gin"
    )
    op.create_index(
        "ix_vector_items_url",
        "vector_items",
        ["collection_id", "url_normalized"],
        postgresql_where=sa.text("url_normalized IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_table("vector_items")
    op.drop_table("vector_collections")
    op.execute("DROP EXTENSION IF EXISTS vector")
