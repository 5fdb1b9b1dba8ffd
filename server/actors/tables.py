"""Actors, their aliases and their platform accounts (presences).

Names, aliases and usernames keep the case they were given and are compared
through lower(): the trigram (GIN) indexes are on the lowered text, and
aliases are unique per actor case-insensitively. Platform and
platform_user_id are compared exactly, as content stores them.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKeyConstraint,
    Index,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID

from server.tables import metadata

# PostgreSQL's built-in (17+) code-point collation: names sort the same on every
# server whatever its locale, so ListActors' ORDER BY, its keyset comparison and
# the (owner_id, canonical_name, id) index always agree, and lower() still
# folds all of Unicode (COLLATE "C" would fold ASCII only).
NAME_COLLATION = "pg_c_utf8"
ACTOR_TYPES = ("PERSON", "ORGANIZATION", "MEDIA", "UNKNOWN")

actors = Table(
    "actors",
    metadata,
    Column("id", UUID(as_uuid=True), nullable=False, server_default=text("uuidv7()")),
    Column("owner_id", UUID(as_uuid=True), nullable=False),
    Column("canonical_name", Text(collation=NAME_COLLATION), nullable=False),
    Column("actor_type", Text, nullable=False),
    Column("description", Text),
    Column("metadata", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("create_time", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("update_time", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("delete_time", DateTime(timezone=True)),
    # Every key carries the tenant (owner_id), last: see docs/scaling.md.
    PrimaryKeyConstraint("id", "owner_id"),
    CheckConstraint(
        "actor_type IN ('PERSON', 'ORGANIZATION', 'MEDIA', 'UNKNOWN')", name="actor_type"
    ),
)
Index("ix_actors_owner_name", actors.c.owner_id, actors.c.canonical_name, actors.c.id)
Index("ix_actors_owner_lower_name", actors.c.owner_id, func.lower(actors.c.canonical_name))
Index(
    "ix_actors_name_trgm",
    func.lower(actors.c.canonical_name).label("lower_name"),
    postgresql_using="gin",
    postgresql_ops={"lower_name": "gin_trgm_ops"},
)

actor_aliases = Table(
    "actor_aliases",
    metadata,
    Column("actor_id", UUID(as_uuid=True), nullable=False),
    # The actor's owner, copied so that name searches stay within one tenant.
    Column("owner_id", UUID(as_uuid=True), nullable=False),
    Column("alias", Text(collation=NAME_COLLATION), nullable=False),
    Column("create_time", DateTime(timezone=True), nullable=False, server_default=func.now()),
    ForeignKeyConstraint(
        ["actor_id", "owner_id"], ["actors.id", "actors.owner_id"], ondelete="CASCADE"
    ),
)
# What an alias's ON CONFLICT names (ALIAS_KEY): one alias per actor, in any case.
Index(
    "uq_actor_aliases_actor_lower_alias",
    actor_aliases.c.actor_id,
    func.lower(actor_aliases.c.alias),
    actor_aliases.c.owner_id,
    unique=True,
)
ALIAS_KEY = (actor_aliases.c.actor_id, func.lower(actor_aliases.c.alias), actor_aliases.c.owner_id)
Index(
    "ix_actor_aliases_owner_lower_alias",
    actor_aliases.c.owner_id,
    func.lower(actor_aliases.c.alias),
)
Index(
    "ix_actor_aliases_alias_trgm",
    func.lower(actor_aliases.c.alias).label("lower_alias"),
    postgresql_using="gin",
    postgresql_ops={"lower_alias": "gin_trgm_ops"},
)

actor_presences = Table(
    "actor_presences",
    metadata,
    Column("id", UUID(as_uuid=True), nullable=False, server_default=text("uuidv7()")),
    Column("actor_id", UUID(as_uuid=True), nullable=False),
    Column("owner_id", UUID(as_uuid=True), nullable=False),
    Column("platform", Text, nullable=False),
    Column("platform_user_id", Text, nullable=False),
    Column("username", Text),
    Column("profile_url", Text),
    Column("verified", Boolean, nullable=False, server_default=text("false")),
    Column("follower_count", BigInteger),
    Column("create_time", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("update_time", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("id", "owner_id"),
    ForeignKeyConstraint(
        ["actor_id", "owner_id"], ["actors.id", "actors.owner_id"], ondelete="CASCADE"
    ),
    # One account belongs to one actor per owner; also what ingest joins on.
    UniqueConstraint("owner_id", "platform", "platform_user_id", name="uq_actor_presences_account"),
)
PRESENCE_ACCOUNT_KEY = ("owner_id", "platform", "platform_user_id")
Index("ix_actor_presences_actor", actor_presences.c.actor_id)
Index(
    "ix_actor_presences_owner_username",
    actor_presences.c.owner_id,
    func.lower(actor_presences.c.username),
    postgresql_where=actor_presences.c.username.isnot(None),
)
