"""ActorService over gRPC: proto in, shape checks, service call, proto out."""

from __future__ import annotations

from typing import Any

import grpc
from observatory.v1 import actor_pb2, actor_pb2_grpc

from server import errors
from server.actors import convert
from server.actors.service import ActorService
from server.auth import principal
from server.protoconv import parse_uuid

Context = grpc.aio.ServicerContext[Any, Any]


class ActorServicer(actor_pb2_grpc.ActorServiceServicer):
    def __init__(self, service: ActorService) -> None:
        self._service = service

    async def CreateActor(
        self, request: actor_pb2.CreateActorRequest, context: Context
    ) -> actor_pb2.Actor:
        return await self._service.create(principal(), request.actor, request.request_id)

    async def GetActor(
        self, request: actor_pb2.GetActorRequest, context: Context
    ) -> actor_pb2.Actor:
        return await self._service.get(principal(), parse_uuid(request.id, "id"))

    async def ListActors(
        self, request: actor_pb2.ListActorsRequest, context: Context
    ) -> actor_pb2.ListActorsResponse:
        return await self._service.list(principal(), request)

    async def UpdateActor(
        self, request: actor_pb2.UpdateActorRequest, context: Context
    ) -> actor_pb2.Actor:
        return await self._service.update(principal(), request.actor, request.update_mask)

    async def DeleteActor(
        self, request: actor_pb2.DeleteActorRequest, context: Context
    ) -> actor_pb2.Actor:
        return await self._service.set_deleted(
            principal(), parse_uuid(request.id, "id"), deleted=True
        )

    async def UndeleteActor(
        self, request: actor_pb2.UndeleteActorRequest, context: Context
    ) -> actor_pb2.Actor:
        return await self._service.set_deleted(
            principal(), parse_uuid(request.id, "id"), deleted=False
        )

    async def AddAlias(
        self, request: actor_pb2.AddAliasRequest, context: Context
    ) -> actor_pb2.Actor:
        return await self._service.add_alias(
            principal(),
            parse_uuid(request.actor_id, "actor_id"),
            convert.name_value(request.alias, "alias"),
        )

    async def AddPresence(
        self, request: actor_pb2.AddPresenceRequest, context: Context
    ) -> actor_pb2.Presence:
        return await self._service.add_presence(
            principal(), convert.presence_values(request.presence)
        )

    async def RemovePresence(
        self, request: actor_pb2.RemovePresenceRequest, context: Context
    ) -> actor_pb2.Actor:
        return await self._service.remove_presence(principal(), parse_uuid(request.id, "id"))

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
        return await self._service.resolve(
            principal(), platform, platform_user_id or "", username or ""
        )

    async def FindCandidateMatches(
        self, request: actor_pb2.FindCandidateMatchesRequest, context: Context
    ) -> actor_pb2.FindCandidateMatchesResponse:
        return await self._service.find_candidates(principal(), request)

    async def MergeActors(
        self, request: actor_pb2.MergeActorsRequest, context: Context
    ) -> actor_pb2.Actor:
        return await self._service.merge(
            principal(),
            parse_uuid(request.canonical_id, "canonical_id"),
            convert.uuid_list(request.duplicate_ids, "duplicate_ids"),
        )

    async def SplitActor(
        self, request: actor_pb2.SplitActorRequest, context: Context
    ) -> actor_pb2.SplitActorResponse:
        return await self._service.split(
            principal(),
            parse_uuid(request.actor_id, "actor_id"),
            convert.uuid_list(request.presence_ids, "presence_ids"),
            convert.name_value(request.new_canonical_name, "new_canonical_name"),
        )
