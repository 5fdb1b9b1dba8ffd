"""Factories for ActorService tests."""

from __future__ import annotations

from typing import Any

from observatory.v1 import actor_pb2


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
