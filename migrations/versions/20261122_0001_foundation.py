"""Foundation: partitioned content, audit log, idempotency keys.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# PostgreSQL 18 ships uuidv7(); older servers get an equivalent in public.
UUIDV7_POLYFILL = """
DO $do$
BEGIN
  IF current_setting('server_version_num')::int < 180000 THEN
    CREATE OR REPLACE FUNCTION public.uuidv7() RETURNS uuid LANGUAGE sql VOLATILE AS $f$
      SELECT encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid())
             PLACING substring(int8send((extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
             FROM 1 FOR 6), 52, 1), 53, 1), 'hex')::uuid
    $f$;
  END IF;
END
$do$;
"""

# Creates the monthly partitions [first_month, first_month + months). Rows that
# already sit in the default partition for such a month are moved into it.
# Serialised by an advisory lock, so concurrent start-ups are safe.
ENSURE_PARTITIONS = """
CREATE OR REPLACE FUNCTION content_ensure_partitions(first_month date, months integer)
RETURNS integer LANGUAGE plpgsql AS $fn$
DECLARE
  lo timestamptz;
  hi timestamptz;
  part text;
  cols text;
  made integer := 0;
BEGIN
  PERFORM pg_advisory_xact_lock(hashtext('observatory.content_partitions'));
  SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) INTO cols
    FROM pg_attribute
   WHERE attrelid = 'content'::regclass AND attnum > 0 AND NOT attisdropped AND attgenerated = '';
  FOR i IN 0 .. months - 1 LOOP
    lo := (date_trunc('month', first_month::timestamp) + make_interval(months => i)) AT TIME ZONE 'UTC';
    hi := ((date_trunc('month', first_month::timestamp) + make_interval(months => i + 1))) AT TIME ZONE 'UTC';
    part := 'content_p' || to_char(lo AT TIME ZONE 'UTC', 'YYYYMM');
    CONTINUE WHEN to_regclass(part) IS NOT NULL;
    IF EXISTS (SELECT 1 FROM content_default WHERE published_at >= lo AND published_at < hi) THEN
      EXECUTE format('CREATE TEMP TABLE content_moving ON COMMIT DROP AS SELECT %s FROM content_default WITH NO DATA', cols);
      EXECUTE format('WITH moved AS (DELETE FROM content_default WHERE published_at >= %L AND published_at < %L RETURNING %s) '
                     'INSERT INTO content_moving SELECT * FROM moved', lo, hi, cols);
      EXECUTE format('CREATE TABLE %I PARTITION OF content FOR VALUES FROM (%L) TO (%L)', part, lo, hi);
      EXECUTE format('INSERT INTO content (%s) SELECT %s FROM content_moving', cols, cols);
      DROP TABLE content_moving;
    ELSE
      EXECUTE format('CREATE TABLE %I PARTITION OF content FOR VALUES FROM (%L) TO (%L)', part, lo, hi);
    END IF;
    made := made + 1;
  END LOOP;
  RETURN made;
END
$fn$;
"""

SEARCH_VECTOR = (
    "setweight(to_tsvector('simple'::regconfig, left(coalesce(title, ''), 10000)), 'A') || "
    "setweight(to_tsvector('simple'::regconfig, left(coalesce(text_content, ''), 100000)), 'B')"
)


def upgrade() -> None:
    op.execute(UUIDV7_POLYFILL)
    uuid = pg.UUID(as_uuid=True)
    tstz = sa.DateTime(timezone=True)
    op.create_table(
        "content",
        sa.Column("id", uuid, nullable=False, server_default=sa.text("uuidv7()")),
        sa.Column("owner_id", uuid, nullable=False),
        sa.Column("platform", sa.Text, nullable=False),
        sa.Column("arena", sa.Text),
        sa.Column("platform_id", sa.Text),
        sa.Column("content_type", sa.Text),
        sa.Column("title", sa.Text),
        sa.Column("text_content", sa.Text),
        sa.Column("url", sa.Text),
        sa.Column("language", sa.Text),
        sa.Column("published_at", tstz, nullable=False),
        sa.Column("collected_at", tstz),
        sa.Column("author_platform_id", sa.Text),
        sa.Column("author_display_name", sa.Text),
        sa.Column("author_id", uuid),
        sa.Column("views_count", sa.BigInteger),
        sa.Column("likes_count", sa.BigInteger),
        sa.Column("shares_count", sa.BigInteger),
        sa.Column("comments_count", sa.BigInteger),
        sa.Column(
            "search_terms_matched",
            pg.ARRAY(sa.Text),
            nullable=False,
            server_default=sa.text("'{}'"),
        ),
        sa.Column("raw_metadata", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("collection_run_id", sa.Text),
        sa.Column("content_hash", sa.String(64)),
        sa.Column("duplicate_of", uuid),
        sa.Column("create_time", tstz, nullable=False, server_default=sa.func.now()),
        sa.Column("update_time", tstz, nullable=False, server_default=sa.func.now()),
        sa.Column("delete_time", tstz),
        sa.Column("search_vector", pg.TSVECTOR, sa.Computed(SEARCH_VECTOR, persisted=True)),
        sa.PrimaryKeyConstraint("id", "published_at", name="pk_content"),
        sa.UniqueConstraint(
            "owner_id", "platform", "platform_id", "published_at", name="uq_content_natural_key"
        ),
        postgresql_partition_by="RANGE (published_at)",
    )
    op.execute("CREATE TABLE content_default PARTITION OF content DEFAULT")
    op.create_index(
        "ix_content_owner_published",
        "content",
        ["owner_id", sa.text("published_at DESC"), sa.text("id DESC")],
    )
    op.create_index(
        "ix_content_published", "content", [sa.text("published_at DESC"), sa.text("id DESC")]
    )
    op.create_index(
        "ix_content_owner_platform",
        "content",
        ["owner_id", "platform", sa.text("published_at DESC")],
    )
    op.create_index(
        "ix_content_owner_arena", "content", ["owner_id", "arena", sa.text("published_at DESC")]
    )
    op.create_index("ix_content_owner_language", "content", ["owner_id", "language"])
    op.create_index(
        "ix_content_author",
        "content",
        ["author_id"],
        postgresql_where=sa.text("author_id IS NOT NULL"),
    )
    op.create_index(
        "ix_content_collection_run",
        "content",
        ["collection_run_id"],
        postgresql_where=sa.text("collection_run_id IS NOT NULL"),
    )
    op.create_index("ix_content_hash", "content", ["owner_id", "content_hash"])
    op.create_index(
        "ix_content_search_terms", "content", ["search_terms_matched"], postgresql_using="gin"
    )
    op.create_index(
        "ix_content_raw_metadata",
        "content",
        ["raw_metadata"],
        postgresql_using="gin",
        postgresql_ops={"raw_metadata": "jsonb_path_ops"},
    )
    op.create_index(
        "ix_content_search_vector", "content", ["search_vector"], postgresql_using="gin"
    )
    op.execute(ENSURE_PARTITIONS)
    op.execute("SELECT content_ensure_partitions((now() AT TIME ZONE 'UTC')::date, 13)")

    op.create_table(
        "audit_log",
        sa.Column("id", uuid, nullable=False, server_default=sa.text("uuidv7()")),
        sa.Column("user_id", uuid, nullable=False),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("resource", sa.Text, nullable=False),
        sa.Column("detail", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("request_id", sa.Text),
        sa.Column("create_time", tstz, nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
    )
    op.create_index(
        "ix_audit_log_time", "audit_log", [sa.text("create_time DESC"), sa.text("id DESC")]
    )
    op.create_index("ix_audit_log_user_time", "audit_log", ["user_id", sa.text("create_time DESC")])

    op.create_table(
        "idempotency_keys",
        sa.Column("owner_id", uuid, nullable=False),
        sa.Column("request_id", uuid, nullable=False),
        sa.Column("method", sa.Text, nullable=False),
        sa.Column("request_hash", sa.LargeBinary, nullable=False),
        sa.Column("response", sa.LargeBinary),
        sa.Column("create_time", tstz, nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("owner_id", "request_id", name="pk_idempotency_keys"),
    )
    op.create_index("ix_idempotency_keys_create_time", "idempotency_keys", ["create_time"])


def downgrade() -> None:
    op.drop_table("idempotency_keys")
    op.drop_table("audit_log")
    op.execute("DROP FUNCTION content_ensure_partitions(date, integer)")
    op.drop_table("content")
    op.execute("DROP FUNCTION IF EXISTS public.uuidv7()")
