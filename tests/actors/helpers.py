"""Factories for ActorService tests."""

from __future__ import annotations

import uuid
from typing import Any

from observatory.v1 import actor_pb2

from tests.helpers import ingest_requests, make_content


async def create_actor(stub, caller, name="Jane Doe", **fields: Any) -> actor_pb2.Actor:
    request = actor_pb2.CreateActorRequest(actor=actor_pb2.Actor(canonical_name=name, **fields))
    return await stub.CreateActor(request, metadata=caller.metadata)


async def add_presence(
    stub, caller, actor_id: str, platform: str, platform_user_id: str, **fields: Any
) -> actor_pb2.Presence:
    presence = actor_pb2.Presence(
        actor_id=actor_id, platform=platform, platform_user_id=platform_user_id, **fields
    )
    return await stub.AddPresence(
        actor_pb2.AddPresenceRequest(presence=presence), metadata=caller.metadata
    )


async def add_alias(stub, caller, actor_id: str, alias: str) -> actor_pb2.Actor:
    return await stub.AddAlias(
        actor_pb2.AddAliasRequest(actor_id=actor_id, alias=alias), metadata=caller.metadata
    )


async def get_actor(stub, caller, actor_id: str) -> actor_pb2.Actor:
    return await stub.GetActor(actor_pb2.GetActorRequest(id=actor_id), metadata=caller.metadata)


async def merge(stub, caller, canonical_id: str, *duplicate_ids: str) -> actor_pb2.Actor:
    return await stub.MergeActors(
        actor_pb2.MergeActorsRequest(canonical_id=canonical_id, duplicate_ids=duplicate_ids),
        metadata=caller.metadata,
    )


async def write_content(content_stub, caller, authors: dict[tuple[str, str], int]) -> None:
    """Ingests `count` items by each (platform, account); ingest links them to
    the account's actor."""
    rows = [
        make_content(platform=platform, author_platform_id=account)
        for (platform, account), count in authors.items()
        for _ in range(count)
    ]
    response = await content_stub.IngestContent(
        iter(ingest_requests(rows)), metadata=caller.metadata
    )
    assert response.inserted == len(rows)


async def content_by_author(db, caller) -> dict[uuid.UUID | None, int]:
    rows = await db.fetch(
        "SELECT author_id, count(*) AS n FROM content WHERE owner_id = $1 GROUP BY author_id",
        caller.user_id,
    )
    return {row["author_id"]: row["n"] for row in rows}


async def presences_by_actor(db, caller) -> dict[uuid.UUID, int]:
    rows = await db.fetch(
        "SELECT actor_id, count(*) AS n FROM actor_presences WHERE owner_id = $1 GROUP BY actor_id",
        caller.user_id,
    )
    return {row["actor_id"]: row["n"] for row in rows}


async def orphans(db, caller) -> tuple[int, int]:
    """Content and presences whose actor no longer exists."""
    content = await db.fetchval(
        "SELECT count(*) FROM content c WHERE c.owner_id = $1 AND c.author_id IS NOT NULL "
        "AND NOT EXISTS (SELECT 1 FROM actors a WHERE a.id = c.author_id)",
        caller.user_id,
    )
    presences = await db.fetchval(
        "SELECT count(*) FROM actor_presences p WHERE p.owner_id = $1 "
        "AND NOT EXISTS (SELECT 1 FROM actors a WHERE a.id = p.actor_id)",
        caller.user_id,
    )
    return content, presences
