"""ActorService over gRPC: proto in, shape checks, one unit of work, the
service call, proto out."""

from __future__ import annotations

import math
from typing import Any

import grpc
from observatory.v1 import actor_pb2, actor_pb2_grpc

from server import errors, idempotency, pagination
from server.actors import convert
from server.actors.service import CREATE_METHOD, ActorService
from server.auth import principal
from server.protoconv import mask_fields, optional_uuid, parse_uuid
from server.uow import Database

Context = grpc.aio.ServicerContext[Any, Any]

DEFAULT_THRESHOLD = 0.4
DEFAULT_CANDIDATES = 20
MAX_CANDIDATES = 100
MAX_MERGE_DUPLICATES = 100
MAX_SPLIT_PRESENCES = 1000


class ActorServicer(actor_pb2_grpc.ActorServiceServicer):
    def __init__(self, service: ActorService, units: Database) -> None:
        self._service = service
        self._db = units

    async def CreateActor(
        self, request: actor_pb2.CreateActorRequest, context: Context
    ) -> actor_pb2.Actor:
        values = convert.actor_values(request.actor)
        request_id = optional_uuid(request.request_id, "request_id")
        digest = idempotency.request_hash(CREATE_METHOD, request.actor) if request_id else b""
        async with self._db.write() as uow:
            return await self._service.create(uow, principal(), values, request_id, digest)

    async def GetActor(
        self, request: actor_pb2.GetActorRequest, context: Context
    ) -> actor_pb2.Actor:
        # A coalesced read: the service's PointReads runs the unit for a batch.
        return await self._service.get(principal(), parse_uuid(request.id, "id"))

    async def ListActors(
        self, request: actor_pb2.ListActorsRequest, context: Context
    ) -> actor_pb2.ListActorsResponse:
        name_query = convert.text_value(request.name_query, "name_query", strip=True)
        actor_types = sorted(
            {
                convert.actor_type(value, f"actor_types[{i}]")
                for i, value in enumerate(request.actor_types)
            }
        )
        size = pagination.page_size(request.page_size)
        async with self._db.read() as uow:
            return await self._service.list(
                uow,
                principal(),
                name_query,
                actor_types,
                request.show_deleted,
                size,
                request.page_token,
            )

    async def UpdateActor(
        self, request: actor_pb2.UpdateActorRequest, context: Context
    ) -> actor_pb2.Actor:
        actor_id = parse_uuid(request.actor.id, "actor.id")
        fields = mask_fields(
            request.update_mask, convert.WRITABLE_FIELDS, convert.OUTPUT_ONLY_FIELDS, "Actor"
        )
        values = convert.actor_values(request.actor, fields)
        async with self._db.write() as uow:
            return await self._service.update(uow, principal(), actor_id, values)

    async def DeleteActor(
        self, request: actor_pb2.DeleteActorRequest, context: Context
    ) -> actor_pb2.Actor:
        actor_id = parse_uuid(request.id, "id")
        async with self._db.write() as uow:
            return await self._service.set_deleted(uow, principal(), actor_id, deleted=True)

    async def UndeleteActor(
        self, request: actor_pb2.UndeleteActorRequest, context: Context
    ) -> actor_pb2.Actor:
        actor_id = parse_uuid(request.id, "id")
        async with self._db.write() as uow:
            return await self._service.set_deleted(uow, principal(), actor_id, deleted=False)

    async def AddAlias(
        self, request: actor_pb2.AddAliasRequest, context: Context
    ) -> actor_pb2.Actor:
        actor_id = parse_uuid(request.actor_id, "actor_id")
        alias = convert.name_value(request.alias, "alias")
        async with self._db.write() as uow:
            return await self._service.add_alias(uow, principal(), actor_id, alias)

    async def AddPresence(
        self, request: actor_pb2.AddPresenceRequest, context: Context
    ) -> actor_pb2.Presence:
        values = convert.presence_values(request.presence)
        async with self._db.write() as uow:
            return await self._service.add_presence(uow, principal(), values)

    async def RemovePresence(
        self, request: actor_pb2.RemovePresenceRequest, context: Context
    ) -> actor_pb2.Actor:
        presence_id = parse_uuid(request.id, "id")
        async with self._db.write() as uow:
            return await self._service.remove_presence(uow, principal(), presence_id)

    async def ResolveActor(
        self, request: actor_pb2.ResolveActorRequest, context: Context
    ) -> actor_pb2.Actor:
        platform = convert.text_value(
            request.platform, "platform", required=True, max_bytes=convert.MAX_PLATFORM_BYTES
        )
        assert platform is not None
        platform_user_id = convert.text_value(
            request.platform_user_id,
            "platform_user_id",
            max_bytes=convert.MAX_PLATFORM_USER_ID_BYTES,
        )
        username = convert.text_value(
            request.username, "username", max_bytes=convert.MAX_USERNAME_BYTES, strip=True
        )
        if platform_user_id is None and username is None:
            raise errors.InvalidArgument("platform_user_id", "give platform_user_id or username")
        # A coalesced read: the service's PointReads runs the unit for a batch.
        return await self._service.resolve(principal(), platform, platform_user_id, username)

    async def FindCandidateMatches(
        self, request: actor_pb2.FindCandidateMatchesRequest, context: Context
    ) -> actor_pb2.FindCandidateMatchesResponse:
        actor_id = parse_uuid(request.actor_id, "actor_id")
        threshold = request.threshold or DEFAULT_THRESHOLD
        if not math.isfinite(threshold) or not 0 < threshold <= 1:
            raise errors.InvalidArgument("threshold", "must be between 0 and 1")
        limit = pagination.page_size(request.limit, maximum=MAX_CANDIDATES, field="limit")
        if not request.limit:
            limit = DEFAULT_CANDIDATES
        # One statement (the threshold is a session setting, set only when it
        # changes): no transaction needed.
        async with self._db.read() as uow:
            return await self._service.find_candidates(uow, principal(), actor_id, threshold, limit)

    async def MergeActors(
        self, request: actor_pb2.MergeActorsRequest, context: Context
    ) -> actor_pb2.Actor:
        canonical_id = parse_uuid(request.canonical_id, "canonical_id")
        duplicate_ids = convert.uuid_list(request.duplicate_ids, "duplicate_ids")
        if not duplicate_ids:
            raise errors.InvalidArgument("duplicate_ids", "name at least one actor to merge")
        if len(duplicate_ids) > MAX_MERGE_DUPLICATES:
            raise errors.InvalidArgument(
                "duplicate_ids", f"at most {MAX_MERGE_DUPLICATES} actors per merge"
            )
        if canonical_id in duplicate_ids:
            index = duplicate_ids.index(canonical_id)
            raise errors.InvalidArgument(
                f"duplicate_ids[{index}]", "must not be the canonical actor"
            )
        async with self._db.write() as uow:
            return await self._service.merge(uow, principal(), canonical_id, duplicate_ids)

    async def SplitActor(
        self, request: actor_pb2.SplitActorRequest, context: Context
    ) -> actor_pb2.SplitActorResponse:
        actor_id = parse_uuid(request.actor_id, "actor_id")
        presence_ids = convert.uuid_list(request.presence_ids, "presence_ids")
        new_name = convert.name_value(request.new_canonical_name, "new_canonical_name")
        if not presence_ids:
            raise errors.InvalidArgument("presence_ids", "name at least one presence to move")
        if len(presence_ids) > MAX_SPLIT_PRESENCES:
            raise errors.InvalidArgument(
                "presence_ids", f"at most {MAX_SPLIT_PRESENCES} presences per split"
            )
        async with self._db.write() as uow:
            return await self._service.split(uow, principal(), actor_id, presence_ids, new_name)
