"""The shared MetaData (each domain keeps its own tables in
`server/<domain>/tables.py`) and the tables of the shared machinery: the audit
trail and the idempotency keys."""

from __future__ import annotations

from sqlalchemy import (
    Column,
    DateTime,
    Index,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.sql.elements import TextClause

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _uuid_pk_default() -> TextClause:
    return text("uuidv7()")


audit_log = Table(
    "audit_log",
    metadata,
    Column("id", UUID(as_uuid=True), nullable=False, server_default=_uuid_pk_default()),
    # Who acted: the tenant of the entry, in its key (docs/scaling.md).
    Column("user_id", UUID(as_uuid=True), nullable=False),
    Column("action", Text, nullable=False),
    Column("resource", Text, nullable=False),
    Column("detail", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("request_id", Text),
    Column("create_time", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("id", "user_id"),
)
Index("ix_audit_log_time", audit_log.c.create_time.desc(), audit_log.c.id.desc())
Index("ix_audit_log_user_time", audit_log.c.user_id, audit_log.c.create_time.desc())

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("owner_id", UUID(as_uuid=True), nullable=False),
    Column("request_id", UUID(as_uuid=True), nullable=False),
    Column("method", Text, nullable=False),
    Column("request_hash", LargeBinary, nullable=False),
    Column("response", LargeBinary),
    Column("create_time", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("owner_id", "request_id"),
)
Index("ix_idempotency_keys_create_time", idempotency_keys.c.create_time)
