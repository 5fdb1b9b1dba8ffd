"""Actors: actors, aliases, platform presences; pg_trgm for name matching.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# When this migration creates pg_trgm it says so in the extension's comment, so
# that the downgrade drops it only then (a database that had it keeps it).
# Code-point order and Unicode lower() whatever the server's locale (see
# server/actors/tables.py).
NAME_COLLATION = "pg_c_utf8"
_CREATED_TRGM = "text similarity (trigrams); created by observatory migration 0002"


def upgrade() -> None:
    had_trgm = (
        op.get_bind()
        .execute(sa.text("SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm'"))
        .first()
        is not None
    )
    op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    if not had_trgm:
        op.execute(f"COMMENT ON EXTENSION pg_trgm IS '{_CREATED_TRGM}'")
    uuid = pg.UUID(as_uuid=True)
    tstz = sa.DateTime(timezone=True)
    op.create_table(
        "actors",
        sa.Column("id", uuid, nullable=False, server_default=sa.text("uuidv7()")),
        sa.Column("owner_id", uuid, nullable=False),
        sa.Column("canonical_name", sa.Text(collation=NAME_COLLATION), nullable=False),
        sa.Column("actor_type", sa.Text, nullable=False),
        sa.Column("description", sa.Text),
        sa.Column("metadata", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("create_time", tstz, nullable=False, server_default=sa.func.now()),
        sa.Column("update_time", tstz, nullable=False, server_default=sa.func.now()),
        sa.Column("delete_time", tstz),
        sa.PrimaryKeyConstraint("id", name="pk_actors"),
        sa.CheckConstraint(
            "actor_type IN ('PERSON', 'ORGANIZATION', 'MEDIA', 'UNKNOWN')",
            name="ck_actors_actor_type",
        ),
    )
    op.create_index("ix_actors_owner_name", "actors", ["owner_id", "canonical_name", "id"])
    op.execute(
        "CREATE INDEX ix_actors_owner_lower_name ON actors (owner_id, lower(canonical_name))"
    )
    op.execute(
        "CREATE INDEX ix_actors_name_trgm ON actors USING gin (lower(canonical_name) gin_trgm_ops)"
    )

    op.create_table(
        "actor_aliases",
        sa.Column("actor_id", uuid, nullable=False),
        sa.Column("owner_id", uuid, nullable=False),
        sa.Column("alias", sa.Text(collation=NAME_COLLATION), nullable=False),
        sa.Column("create_time", tstz, nullable=False, server_default=sa.func.now()),
        sa.ForeignKeyConstraint(
            ["actor_id"],
            ["actors.id"],
            name="fk_actor_aliases_actor_id_actors",
            ondelete="CASCADE",
        ),
    )
    op.execute(
        "CREATE UNIQUE INDEX uq_actor_aliases_actor_lower_alias ON actor_aliases "
        "(actor_id, lower(alias))"
    )
    op.execute(
        "CREATE INDEX ix_actor_aliases_owner_lower_alias ON actor_aliases (owner_id, lower(alias))"
    )
    op.execute(
        "CREATE INDEX ix_actor_aliases_alias_trgm ON actor_aliases "
        "USING gin (lower(alias) gin_trgm_ops)"
    )

    op.create_table(
        "actor_presences",
        sa.Column("id", uuid, nullable=False, server_default=sa.text("uuidv7()")),
        sa.Column("actor_id", uuid, nullable=False),
        sa.Column("owner_id", uuid, nullable=False),
        sa.Column("platform", sa.Text, nullable=False),
        sa.Column("platform_user_id", sa.Text, nullable=False),
        sa.Column("username", sa.Text),
        sa.Column("profile_url", sa.Text),
        sa.Column("verified", sa.Boolean, nullable=False, server_default=sa.text("false")),
        sa.Column("follower_count", sa.BigInteger),
        sa.Column("create_time", tstz, nullable=False, server_default=sa.func.now()),
        sa.Column("update_time", tstz, nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("id", name="pk_actor_presences"),
        sa.ForeignKeyConstraint(
            ["actor_id"],
            ["actors.id"],
            name="fk_actor_presences_actor_id_actors",
            ondelete="CASCADE",
        ),
        sa.UniqueConstraint(
            "owner_id", "platform", "platform_user_id", name="uq_actor_presences_account"
        ),
    )
    op.create_index("ix_actor_presences_actor", "actor_presences", ["actor_id"])
    op.execute(
        "CREATE INDEX ix_actor_presences_owner_username ON actor_presences "
        "(owner_id, lower(username)) WHERE username IS NOT NULL"
    )


def downgrade() -> None:
    created_trgm = (
        op.get_bind()
        .execute(
            sa.text(
                "SELECT obj_description(oid, 'pg_extension') FROM pg_extension "
                "WHERE extname = 'pg_trgm'"
            )
        )
        .scalar()
        == _CREATED_TRGM
    )
    op.drop_table("actor_presences")
    op.drop_table("actor_aliases")
    op.drop_table("actors")
    if created_trgm:
        op.execute("DROP EXTENSION IF EXISTS pg_trgm")
