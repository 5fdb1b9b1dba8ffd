"""The credit ledger's tables.

`credit_entries` is the ledger: append-only (a trigger refuses UPDATE and
DELETE), numbered 1, 2, 3, ... per account. `credit_accounts` is the balance
row kept in step with it in the same transaction, and the lock that
serialises an account's mutations. `credit_reservations` holds each hold's
status, which leaves PENDING exactly once; `credit_allocations` the grants
with their validity windows.

The tenant of every credit table is the account's `user_id`: it is in every
key and every reference between them (docs/scaling.md).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import UUID

from server.tables import metadata

ENTRY_KINDS = ("GRANT", "RESERVE", "SETTLE", "RELEASE", "EXPIRE")
RESERVATION_STATUSES = ("PENDING", "SETTLED", "RELEASED", "EXPIRED")
# The rate table's row for arenas it does not name.
DEFAULT_ARENA = "*"


def _id() -> Column[Any]:
    return Column("id", UUID(as_uuid=True), nullable=False, server_default=text("uuidv7()"))


def _key() -> PrimaryKeyConstraint:
    return PrimaryKeyConstraint("id", "user_id")


def _of_account(column: str, table: str) -> ForeignKeyConstraint:
    """`column` names a row of `table` of the same account."""
    return ForeignKeyConstraint([column, "user_id"], [f"{table}.id", f"{table}.user_id"])


def _account() -> Column[Any]:
    return Column(
        "user_id", UUID(as_uuid=True), ForeignKey("credit_accounts.user_id"), nullable=False
    )


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(value) for value in values)})"


credit_accounts = Table(
    "credit_accounts",
    metadata,
    Column("user_id", UUID(as_uuid=True), primary_key=True),
    # Lifetime sums, kept in step with the entries.
    Column("granted", BigInteger, nullable=False, server_default=text("0")),
    Column("reserved", BigInteger, nullable=False, server_default=text("0")),
    Column("settled", BigInteger, nullable=False, server_default=text("0")),
    # The sequence number of the account's last entry.
    Column("last_seq", BigInteger, nullable=False, server_default=text("0")),
    Column("update_time", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("granted >= 0 AND reserved >= 0 AND settled >= 0", name="non_negative"),
)

credit_allocations = Table(
    "credit_allocations",
    metadata,
    _id(),
    _account(),
    Column("amount", BigInteger, nullable=False),
    Column("valid_from", DateTime(timezone=True), nullable=False),
    Column("valid_until", DateTime(timezone=True)),
    Column("memo", Text, nullable=False, server_default=text("''")),
    Column("create_time", DateTime(timezone=True), nullable=False, server_default=func.now()),
    _key(),
    CheckConstraint("amount > 0", name="amount_positive"),
    CheckConstraint("valid_until IS NULL OR valid_until > valid_from", name="window"),
)
Index("ix_credit_allocations_user", credit_allocations.c.user_id, credit_allocations.c.valid_from)

credit_reservations = Table(
    "credit_reservations",
    metadata,
    _id(),
    _account(),
    Column("amount", BigInteger, nullable=False),
    Column("settled_amount", BigInteger, nullable=False, server_default=text("0")),
    Column("status", Text, nullable=False, server_default=text("'PENDING'")),
    Column("reference", Text, nullable=False, server_default=text("''")),
    Column("expire_time", DateTime(timezone=True), nullable=False),
    Column("create_time", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("update_time", DateTime(timezone=True), nullable=False, server_default=func.now()),
    _key(),
    CheckConstraint("amount > 0", name="amount_positive"),
    CheckConstraint("settled_amount >= 0 AND settled_amount <= amount", name="settled_range"),
    CheckConstraint(_in("status", RESERVATION_STATUSES), name="status"),
)
# The pending holds of an account (lapsed ones are subtracted on read) and the
# sweeper's queue of holds past their expire_time.
Index(
    "ix_credit_reservations_pending",
    credit_reservations.c.user_id,
    credit_reservations.c.expire_time,
    postgresql_where=credit_reservations.c.status == "PENDING",
)
Index(
    "ix_credit_reservations_expiry",
    credit_reservations.c.expire_time,
    postgresql_where=credit_reservations.c.status == "PENDING",
)

credit_entries = Table(
    "credit_entries",
    metadata,
    _id(),
    _account(),
    Column("seq", BigInteger, nullable=False),
    Column("kind", Text, nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("reservation_id", UUID(as_uuid=True)),
    Column("allocation_id", UUID(as_uuid=True)),
    Column("reference", Text, nullable=False, server_default=text("''")),
    Column("create_time", DateTime(timezone=True), nullable=False, server_default=func.now()),
    _key(),
    _of_account("reservation_id", "credit_reservations"),
    _of_account("allocation_id", "credit_allocations"),
    UniqueConstraint("user_id", "seq", name="uq_credit_entries_user_seq"),
    CheckConstraint("amount >= 0", name="amount_not_negative"),
    CheckConstraint(_in("kind", ENTRY_KINDS), name="kind"),
)

credit_rates = Table(
    "credit_rates",
    metadata,
    Column("arena", Text, primary_key=True),
    Column("credits_per_thousand", BigInteger, nullable=False),
    CheckConstraint("credits_per_thousand >= 0", name="rate_not_negative"),
)
