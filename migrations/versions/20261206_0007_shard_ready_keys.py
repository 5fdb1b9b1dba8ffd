"""Shard-ready keys: every tenant table's primary key and unique constraints
carry its tenant column, and so does every foreign key between tenant tables,
so that Citus can distribute them all by tenant, co-located (docs/scaling.md).

The tenant column is `owner_id`, except in the credit tables and the audit
log, where it is the account's (the actor's) `user_id`, the same user ID.
The tenant column goes last in each key, so every look-up the old key served
(by `id` alone, say) is served by the new one as before.

`vector_items` gains `owner_id` (its collection's owner). Each collection's
partition is detached, given the column with the owner as a constant default
(PostgreSQL stores that once in the catalogue: no row is rewritten and the
HNSW graph is left as it is), and attached again; attaching builds the
partition's new primary-key index and adopts its other indexes. Partitioned
tables stay partitioned: `content` by RANGE (published_at), `vector_items` by
LIST (collection_id).

The downgrade restores the keys of 0006 and drops `vector_items.owner_id`.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from collections.abc import Sequence
from typing import NamedTuple

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


class Key(NamedTuple):
    table: str
    name: str
    before: tuple[str, ...]
    after: tuple[str, ...]


class Reference(NamedTuple):
    name: str
    table: str
    columns: tuple[str, ...]
    referred: str
    referred_columns: tuple[str, ...]
    tenant: str
    ondelete: str | None


PRIMARY_KEYS = (
    Key("actors", "pk_actors", ("id",), ("id", "owner_id")),
    Key("actor_presences", "pk_actor_presences", ("id",), ("id", "owner_id")),
    Key("content", "pk_content", ("id", "published_at"), ("id", "published_at", "owner_id")),
    Key("vector_collections", "pk_vector_collections", ("id",), ("id", "owner_id")),
    Key("credit_allocations", "pk_credit_allocations", ("id",), ("id", "user_id")),
    Key("credit_reservations", "pk_credit_reservations", ("id",), ("id", "user_id")),
    Key("credit_entries", "pk_credit_entries", ("id",), ("id", "user_id")),
    Key("audit_log", "pk_audit_log", ("id",), ("id", "user_id")),
)
ITEMS_KEY = Key(
    "vector_items", "pk_vector_items", ("collection_id", "id"), ("collection_id", "id", "owner_id")
)

# Foreign keys between tenant tables: each gains the tenant column on both
# sides, in the same position (what Citus asks of a co-located foreign key).
REFERENCES = (
    Reference(
        "fk_actor_aliases_actor_id_actors",
        "actor_aliases",
        ("actor_id",),
        "actors",
        ("id",),
        "owner_id",
        "CASCADE",
    ),
    Reference(
        "fk_actor_presences_actor_id_actors",
        "actor_presences",
        ("actor_id",),
        "actors",
        ("id",),
        "owner_id",
        "CASCADE",
    ),
    Reference(
        "fk_credit_entries_reservation_id_credit_reservations",
        "credit_entries",
        ("reservation_id",),
        "credit_reservations",
        ("id",),
        "user_id",
        None,
    ),
    Reference(
        "fk_credit_entries_allocation_id_credit_allocations",
        "credit_entries",
        ("allocation_id",),
        "credit_allocations",
        ("id",),
        "user_id",
        None,
    ),
)

ALIAS_UNIQUE = "uq_actor_aliases_actor_lower_alias"
ALIAS_UNIQUE_BEFORE = (
    f"CREATE UNIQUE INDEX {ALIAS_UNIQUE} ON actor_aliases (actor_id, lower(alias))"
)
ALIAS_UNIQUE_AFTER = (
    f"CREATE UNIQUE INDEX {ALIAS_UNIQUE} ON actor_aliases (actor_id, lower(alias), owner_id)"
)

# Each partition of vector_items: its quoted name, its bound as PostgreSQL
# prints it, its collection's owner (NULL for a partition that is not one
# collection's, which is filled row by row instead) and its primary key's
# quoted name.
ITEM_PARTITIONS = """
SELECT c.oid::regclass::text AS name, pg_get_expr(c.relpartbound, c.oid) AS bound,
       (SELECT v.owner_id FROM vector_collections v
         WHERE pg_get_expr(c.relpartbound, c.oid) = format('FOR VALUES IN (%L)', v.id)) AS owner,
       (SELECT quote_ident(k.conname) FROM pg_constraint k
         WHERE k.conrelid = c.oid AND k.contype = 'p') AS primary_key
  FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
 WHERE i.inhparent = 'vector_items'::regclass
 ORDER BY c.relname
"""


def _create_references(*, with_tenant: bool) -> None:
    for ref in REFERENCES:
        extra = (ref.tenant,) if with_tenant else ()
        op.create_foreign_key(
            ref.name,
            ref.table,
            ref.referred,
            [*ref.columns, *extra],
            [*ref.referred_columns, *extra],
            ondelete=ref.ondelete,
        )


def _drop_references() -> None:
    for ref in REFERENCES:
        op.drop_constraint(ref.name, ref.table, type_="foreignkey")


def _replace_key(key: Key, columns: tuple[str, ...]) -> None:
    op.drop_constraint(key.name, key.table, type_="primary")
    op.create_primary_key(key.name, key.table, list(columns))


def _give_items_their_owner() -> None:
    partitions = op.get_bind().execute(sa.text(ITEM_PARTITIONS)).all()
    for name, _, owner, primary_key in partitions:
        op.execute(f"ALTER TABLE vector_items DETACH PARTITION {name}")
        if primary_key is not None:
            op.execute(f"ALTER TABLE {name} DROP CONSTRAINT {primary_key}")
        if owner is not None:
            # A constant default: kept in the catalogue, no row rewritten.
            op.execute(f"ALTER TABLE {name} ADD COLUMN owner_id uuid NOT NULL DEFAULT '{owner}'")
            op.execute(f"ALTER TABLE {name} ALTER COLUMN owner_id DROP DEFAULT")
        else:
            op.execute(f"ALTER TABLE {name} ADD COLUMN owner_id uuid")
            op.execute(
                f"UPDATE {name} i SET owner_id = v.owner_id FROM vector_collections v "
                "WHERE v.id = i.collection_id"
            )
            op.execute(f"ALTER TABLE {name} ALTER COLUMN owner_id SET NOT NULL")
    op.add_column("vector_items", sa.Column("owner_id", pg.UUID(as_uuid=True), nullable=False))
    _replace_key(ITEMS_KEY, ITEMS_KEY.after)
    for name, bound, _, _ in partitions:
        op.execute(f"ALTER TABLE vector_items ATTACH PARTITION {name} {bound}")


def upgrade() -> None:
    _drop_references()
    for key in PRIMARY_KEYS:
        _replace_key(key, key.after)
    op.execute(f"DROP INDEX {ALIAS_UNIQUE}")
    op.execute(ALIAS_UNIQUE_AFTER)
    _give_items_their_owner()
    _create_references(with_tenant=True)


def downgrade() -> None:
    _drop_references()
    _replace_key(ITEMS_KEY, ITEMS_KEY.before)
    op.drop_column("vector_items", "owner_id")
    op.execute(f"DROP INDEX {ALIAS_UNIQUE}")
    op.execute(ALIAS_UNIQUE_BEFORE)
    for key in reversed(PRIMARY_KEYS):
        _replace_key(key, key.before)
    _create_references(with_tenant=False)
