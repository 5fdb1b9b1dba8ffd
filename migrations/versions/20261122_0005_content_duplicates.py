"""Content duplicates: a stored normalised URL, indexed per owner for FindDuplicates.

The column holds server.urls.normalize_url(url); the service keeps it on every
write of url. Existing rows are filled here with the same function.

Revision ID: 0005
Revises: 0001
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from server.urls import normalize_url

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BACKFILL_BATCH = 5000


def upgrade() -> None:
    op.add_column("content", sa.Column("url_normalized", sa.Text))
    bind = op.get_bind()
    last: tuple[object, object] | None = None
    while True:
        # Keyset batches over the primary key, so no batch is ever re-read.
        where = "url IS NOT NULL" + ("" if last is None else " AND (id, published_at) > (:id, :p)")
        rows = bind.execute(
            sa.text(
                f"SELECT id, published_at, url FROM content WHERE {where} "
                "ORDER BY id, published_at LIMIT :n"
            ),
            {"n": BACKFILL_BATCH, **({} if last is None else {"id": last[0], "p": last[1]})},
        ).all()
        if not rows:
            break
        bind.execute(
            sa.text("UPDATE content SET url_normalized = :u WHERE id = :id AND published_at = :p"),
            [{"u": normalize_url(url), "id": id_, "p": published} for id_, published, url in rows],
        )
        last = (rows[-1][0], rows[-1][1])
    op.create_index(
        "ix_content_url_normalized",
        "content",
        ["owner_id", "url_normalized"],
        postgresql_where=sa.text("url_normalized IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_content_url_normalized", table_name="content")
    op.drop_column("content", "url_normalized")
