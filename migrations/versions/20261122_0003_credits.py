"""Credits: the append-only ledger, balance rows, reservations, allocations
and the per-arena rate table.

Revision ID: 0003
Revises: 0001
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Ledger entries never change: the database refuses UPDATE and DELETE too.
APPEND_ONLY = """
CREATE FUNCTION credit_entries_append_only() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
  RAISE EXCEPTION 'credit_entries is append-only: % refused', TG_OP
    USING ERRCODE = 'restrict_violation';
END
$fn$
"""
APPEND_ONLY_TRIGGER = """
CREATE TRIGGER credit_entries_append_only
  BEFORE UPDATE OR DELETE ON credit_entries
  FOR EACH ROW EXECUTE FUNCTION credit_entries_append_only();
"""

# Credits per 1,000 records by arena; "*" is the default for other arenas.
RATES = [
    ("*", 10),
    ("facebook", 40),
    ("instagram", 40),
    ("reddit", 15),
    ("rss", 2),
    ("telegram", 10),
    ("tiktok", 50),
    ("twitter", 50),
    ("web", 5),
    ("youtube", 30),
]


def upgrade() -> None:
    uuid = pg.UUID(as_uuid=True)
    tstz = sa.DateTime(timezone=True)
    op.create_table(
        "credit_accounts",
        sa.Column("user_id", uuid, nullable=False),
        sa.Column("granted", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("reserved", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("settled", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("last_seq", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("update_time", tstz, nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("user_id", name="pk_credit_accounts"),
        sa.CheckConstraint(
            "granted >= 0 AND reserved >= 0 AND settled >= 0",
            name="ck_credit_accounts_non_negative",
        ),
    )
    op.create_table(
        "credit_allocations",
        sa.Column("id", uuid, nullable=False, server_default=sa.text("uuidv7()")),
        sa.Column("user_id", uuid, nullable=False),
        sa.Column("amount", sa.BigInteger, nullable=False),
        sa.Column("valid_from", tstz, nullable=False),
        sa.Column("valid_until", tstz),
        sa.Column("memo", sa.Text, nullable=False, server_default=sa.text("''")),
        sa.Column("create_time", tstz, nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("id", name="pk_credit_allocations"),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["credit_accounts.user_id"],
            name="fk_credit_allocations_user_id_credit_accounts",
        ),
        sa.CheckConstraint("amount > 0", name="ck_credit_allocations_amount_positive"),
        sa.CheckConstraint(
            "valid_until IS NULL OR valid_until > valid_from", name="ck_credit_allocations_window"
        ),
    )
    op.create_index("ix_credit_allocations_user", "credit_allocations", ["user_id", "valid_from"])
    op.create_table(
        "credit_reservations",
        sa.Column("id", uuid, nullable=False, server_default=sa.text("uuidv7()")),
        sa.Column("user_id", uuid, nullable=False),
        sa.Column("amount", sa.BigInteger, nullable=False),
        sa.Column("settled_amount", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("status", sa.Text, nullable=False, server_default=sa.text("'PENDING'")),
        sa.Column("reference", sa.Text, nullable=False, server_default=sa.text("''")),
        sa.Column("expire_time", tstz, nullable=False),
        sa.Column("create_time", tstz, nullable=False, server_default=sa.func.now()),
        sa.Column("update_time", tstz, nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("id", name="pk_credit_reservations"),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["credit_accounts.user_id"],
            name="fk_credit_reservations_user_id_credit_accounts",
        ),
        sa.CheckConstraint("amount > 0", name="ck_credit_reservations_amount_positive"),
        sa.CheckConstraint(
            "settled_amount >= 0 AND settled_amount <= amount",
            name="ck_credit_reservations_settled_range",
        ),
        sa.CheckConstraint(
            "status IN ('PENDING', 'SETTLED', 'RELEASED', 'EXPIRED')",
            name="ck_credit_reservations_status",
        ),
    )
    op.create_index(
        "ix_credit_reservations_pending",
        "credit_reservations",
        ["user_id", "expire_time"],
        postgresql_where=sa.text("status = 'PENDING'"),
    )
    op.create_index(
        "ix_credit_reservations_expiry",
        "credit_reservations",
        ["expire_time"],
        postgresql_where=sa.text("status = 'PENDING'"),
    )
    op.create_table(
        "credit_entries",
        sa.Column("id", uuid, nullable=False, server_default=sa.text("uuidv7()")),
        sa.Column("user_id", uuid, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("amount", sa.BigInteger, nullable=False),
        sa.Column("reservation_id", uuid),
        sa.Column("allocation_id", uuid),
        sa.Column("reference", sa.Text, nullable=False, server_default=sa.text("''")),
        sa.Column("create_time", tstz, nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("id", name="pk_credit_entries"),
        sa.UniqueConstraint("user_id", "seq", name="uq_credit_entries_user_seq"),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["credit_accounts.user_id"],
            name="fk_credit_entries_user_id_credit_accounts",
        ),
        sa.ForeignKeyConstraint(
            ["reservation_id"],
            ["credit_reservations.id"],
            name="fk_credit_entries_reservation_id_credit_reservations",
        ),
        sa.ForeignKeyConstraint(
            ["allocation_id"],
            ["credit_allocations.id"],
            name="fk_credit_entries_allocation_id_credit_allocations",
        ),
        sa.CheckConstraint("amount >= 0", name="ck_credit_entries_amount_not_negative"),
        sa.CheckConstraint(
            "kind IN ('GRANT', 'RESERVE', 'SETTLE', 'RELEASE', 'EXPIRE')",
            name="ck_credit_entries_kind",
        ),
    )
    op.execute(APPEND_ONLY)
    op.execute(APPEND_ONLY_TRIGGER)
    rates = op.create_table(
        "credit_rates",
        sa.Column("arena", sa.Text, nullable=False),
        sa.Column("credits_per_thousand", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("arena", name="pk_credit_rates"),
        sa.CheckConstraint("credits_per_thousand >= 0", name="ck_credit_rates_rate_not_negative"),
    )
    op.bulk_insert(rates, [{"arena": arena, "credits_per_thousand": rate} for arena, rate in RATES])


def downgrade() -> None:
    op.drop_table("credit_rates")
    op.drop_table("credit_entries")
    op.execute("DROP FUNCTION credit_entries_append_only()")
    op.drop_table("credit_reservations")
    op.drop_table("credit_allocations")
    op.drop_table("credit_accounts")
