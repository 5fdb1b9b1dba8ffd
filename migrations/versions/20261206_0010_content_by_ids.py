"""content_by_ids(uuid[]): content rows by ID, planned once per session.

content is partitioned by publication month and an ID says nothing of its
row's month, so a look-up by ID reads every partition's primary key. As a
prepared statement PostgreSQL re-plans it on every execution (its custom
plans look cheaper than the generic one), and planning a scan of every
partition with all their indexes is most of the work: 560-615 µs of
PostgreSQL's CPU per look-up of three IDs over 15 partitions, against 95 µs
with the generic plan (bench/README.md). The partitions reach a year ahead,
and each month adds one, so the cost only grows.

This function runs the look-up with `plan_cache_mode = force_generic_plan`
(its own SET clause: nothing else on the connection changes), and PL/pgSQL
keeps that plan for the session. Every row of those IDs, whoever owns it and
deleted or not: callers check what the caller may see, as before.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION content_by_ids(ids uuid[]) RETURNS SETOF content
        LANGUAGE plpgsql STABLE
        SET plan_cache_mode = force_generic_plan
        AS $$
        BEGIN
            RETURN QUERY SELECT * FROM content WHERE id = ANY(ids);
        END
        $$
        """
    )


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS content_by_ids(uuid[])")
