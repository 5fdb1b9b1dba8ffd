"""Vector additions: quantization, metadata indexes and the safe casts that
`where` conditions compile to.

- `vector_collections.quantization` ('none' or 'binary') and
  `vector_collections.metadata_indexes` (the keys CreateMetadataIndex
  indexed: a JSON array of {"key", "type"}).
- `vector_number(jsonb)` and `vector_time(jsonb)`: a metadata value as a
  number or as an instant, or NULL when it is of another type (a number
  written as a string, an invalid time). IMMUTABLE, so per-collection
  expression indexes can be built on them; a wrong-typed value is false in a
  condition, never an error. `vector_time` accepts RFC 3339 only (a date,
  a time and an offset), which PostgreSQL reads the same under any TimeZone or
  DateStyle.
- `vector_create_metadata_index(...)`: makes one collection's index over one
  key. The key reaches the DDL only through `format('%L')` inside the
  database: the server passes it as a bind parameter. It makes an IMMUTABLE
  SQL function per index (the key's path written into its body) and an index
  over that function on the collection's partition; `where` conditions on the
  key call the same function, so the planner matches the index without any
  client text in the query.

The downgrade drops the per-index functions (and with them their indexes),
the helpers and the two columns.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

VECTOR_NUMBER = """
CREATE FUNCTION vector_number(value jsonb) RETURNS numeric
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN jsonb_typeof(value) = 'number' THEN value::numeric END
"""

# RFC 3339: a full date, 'T' (or a space), a time with optional fraction, and
# 'Z' or a numeric offset; pg_input_is_valid refuses what matches yet is no
# real instant (2026-02-30).
VECTOR_TIME = r"""
CREATE FUNCTION vector_time(value jsonb) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE
  WHEN jsonb_typeof(value) = 'string'
   AND (value #>> '{}') ~ '^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$'
   AND pg_input_is_valid(value #>> '{}', 'timestamptz')
  THEN (value #>> '{}')::timestamptz
END
"""

CREATE_METADATA_INDEX = """
CREATE FUNCTION vector_create_metadata_index(
  partition regclass, function_name text, index_name text, path text[], kind text
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
  value text := 'metadata';
  segment text;
BEGIN
  FOREACH segment IN ARRAY path LOOP
    value := value || format(' -> %L', segment);
  END LOOP;
  IF kind = 'keyword' THEN
    EXECUTE format(
      'CREATE FUNCTION %I(metadata jsonb) RETURNS jsonb LANGUAGE sql IMMUTABLE '
      'PARALLEL SAFE RETURN %s', function_name, value);
    EXECUTE format('CREATE INDEX %I ON %s USING gin ((%I(metadata)) jsonb_path_ops)',
                   index_name, partition, function_name);
  ELSIF kind = 'number' THEN
    EXECUTE format(
      'CREATE FUNCTION %I(metadata jsonb) RETURNS numeric LANGUAGE sql IMMUTABLE '
      'PARALLEL SAFE RETURN vector_number(%s)', function_name, value);
    EXECUTE format('CREATE INDEX %I ON %s ((%I(metadata)))', index_name, partition, function_name);
  ELSIF kind = 'time' THEN
    EXECUTE format(
      'CREATE FUNCTION %I(metadata jsonb) RETURNS timestamptz LANGUAGE sql IMMUTABLE '
      'PARALLEL SAFE RETURN vector_time(%s)', function_name, value);
    EXECUTE format('CREATE INDEX %I ON %s ((%I(metadata)))', index_name, partition, function_name);
  ELSE
    RAISE EXCEPTION 'unknown metadata index kind %', kind USING ERRCODE = '22023';
  END IF;
END
$$
"""

# Per-index functions are named vector_mi_<collection hex>_<key hash>.
DROP_INDEX_FUNCTIONS = r"""
DO $$
DECLARE f regprocedure;
BEGIN
  FOR f IN SELECT oid::regprocedure FROM pg_proc WHERE proname LIKE 'vector\_mi\_%' LOOP
    EXECUTE format('DROP FUNCTION %s CASCADE', f);
  END LOOP;
END
$$
"""


def upgrade() -> None:
    op.add_column(
        "vector_collections",
        sa.Column("quantization", sa.Text, nullable=False, server_default=sa.text("'none'")),
    )
    op.add_column(
        "vector_collections",
        sa.Column(
            "metadata_indexes", pg.JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")
        ),
    )
    op.create_check_constraint(
        "ck_vector_collections_quantization",
        "vector_collections",
        "quantization IN ('none', 'binary')",
    )
    op.execute(VECTOR_NUMBER)
    op.execute(VECTOR_TIME)
    op.execute(CREATE_METADATA_INDEX)


def downgrade() -> None:
    op.execute(DROP_INDEX_FUNCTIONS)
    op.execute("DROP FUNCTION vector_create_metadata_index(regclass, text, text, text[], text)")
    op.execute("DROP FUNCTION vector_time(jsonb)")
    op.execute("DROP FUNCTION vector_number(jsonb)")
    op.drop_constraint("ck_vector_collections_quantization", "vector_collections", type_="check")
    op.drop_column("vector_collections", "metadata_indexes")
    op.drop_column("vector_collections", "quantization")
