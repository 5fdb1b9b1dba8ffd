"""Actor business rules. Each public method is one unit of work.

Every change to an actor's aliases or presences, and every merge and split,
first locks the actors involved (in ID order), so concurrent changes to the
same actors queue instead of deadlocking, and an actor merged away meanwhile
is NOT_FOUND rather than half-updated.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf import field_mask_pb2
from observatory.v1 import actor_pb2

from server import errors, idempotency, pagination
from server.actors import convert
from server.actors.repository import (
    ActorQuery,
    ActorRepository,
    find_candidates,
    lookup_actor,
    resolve_actor,
)
from server.audit import AuditRepository
from server.auth import Principal
from server.db import Database
from server.protoconv import mask_fields, parse_uuid

DEFAULT_THRESHOLD = 0.4
DEFAULT_CANDIDATES = 20
MAX_CANDIDATES = 100
MAX_MERGE_DUPLICATES = 100
MAX_SPLIT_PRESENCES = 1000
_STRATEGIES = {
    1: actor_pb2.MATCH_STRATEGY_EXACT_NAME,
    2: actor_pb2.MATCH_STRATEGY_SHARED_USERNAME,
    3: actor_pb2.MATCH_STRATEGY_TRIGRAM,
}


def _owner_scope(caller: Principal) -> uuid.UUID | None:
    """Admins see every owner's rows; users only their own."""
    return None if caller.is_admin else caller.user_id


def _resource(actor_id: uuid.UUID) -> str:
    return f"actors/{actor_id}"


async def _locked_live(
    repo: ActorRepository, actor_id: uuid.UUID, caller: Principal, *, relinking: bool = False
) -> Mapping[Any, Any]:
    """Locks one actor the caller may change; NOT_FOUND when it is not there,
    FAILED_PRECONDITION when it is soft-deleted."""
    rows = await repo.lock([actor_id], _owner_scope(caller), relinking=relinking)
    if not rows:
        raise errors.NotFound(f"actor {actor_id} not found")
    if rows[0]["delete_time"] is not None:
        raise errors.FailedPrecondition(
            f"actor {actor_id} is deleted; undelete it first", reason="ACTOR_DELETED"
        )
    return rows[0]


async def _current(repo: ActorRepository, actor_id: uuid.UUID) -> actor_pb2.Actor:
    row = await repo.get(actor_id, None)
    assert row is not None
    return convert.to_proto(row)


class ActorService:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(
        self, caller: Principal, message: actor_pb2.Actor, request_id: str
    ) -> actor_pb2.Actor:
        values = convert.actor_values(message)
        values["owner_id"] = caller.user_id
        digest = idempotency.request_hash("CreateActor", message)
        async with self._db.write() as conn:

            async def work() -> actor_pb2.Actor:
                repo = ActorRepository(conn)
                actor_id = await repo.insert(values)
                await AuditRepository(conn).record(caller, "actor.create", _resource(actor_id))
                return await _current(repo, actor_id)

            return await idempotency.once(
                conn, caller, request_id, "CreateActor", digest, actor_pb2.Actor, work
            )

    async def get(self, caller: Principal, actor_id: uuid.UUID) -> actor_pb2.Actor:
        async with self._db.lookup() as driver:
            row = await lookup_actor(driver, actor_id, _owner_scope(caller))
        if row is None:
            raise errors.NotFound(f"actor {actor_id} not found")
        return convert.to_proto(row)

    async def list(
        self, caller: Principal, request: actor_pb2.ListActorsRequest
    ) -> actor_pb2.ListActorsResponse:
        name_query = convert.text_value(request.name_query, "name_query", strip=True)
        types = sorted(
            {
                convert.actor_type(value, f"actor_types[{i}]")
                for i, value in enumerate(request.actor_types)
            }
        )
        query = ActorQuery(
            owner_id=_owner_scope(caller),
            name_query=name_query,
            actor_types=types,
            show_deleted=request.show_deleted,
        )
        size = pagination.page_size(request.page_size)
        token_query = pagination.fingerprint(
            "ListActors",
            str(query.owner_id),
            name_query,
            ",".join(types),
            str(query.show_deleted),
        )
        after = pagination.decode_token(request.page_token, token_query, str, uuid.UUID)
        async with self._db.read() as conn:
            rows = await ActorRepository(conn).find_page(query, after=after, limit=size + 1)
        response = actor_pb2.ListActorsResponse()
        for row in rows[:size]:
            convert.to_proto(row, response.actors.add())
        response.next_page_token = pagination.next_page_token(
            rows, size, token_query, lambda row: (row["canonical_name"], row["id"])
        )
        return response

    async def update(
        self, caller: Principal, message: actor_pb2.Actor, mask: field_mask_pb2.FieldMask
    ) -> actor_pb2.Actor:
        actor_id = parse_uuid(message.id, "actor.id")
        fields = mask_fields(mask, convert.WRITABLE_FIELDS, convert.OUTPUT_ONLY_FIELDS, "Actor")
        values = convert.actor_values(message, fields)
        async with self._db.write() as conn:
            repo = ActorRepository(conn)
            await _locked_live(repo, actor_id, caller)
            await repo.update(actor_id, values)
            await AuditRepository(conn).record(
                caller, "actor.update", _resource(actor_id), {"fields": sorted(fields)}
            )
            return await _current(repo, actor_id)

    async def set_deleted(
        self, caller: Principal, actor_id: uuid.UUID, deleted: bool
    ) -> actor_pb2.Actor:
        async with self._db.write() as conn:
            repo = ActorRepository(conn)
            if not await repo.set_deleted(actor_id, _owner_scope(caller), deleted):
                existing = await repo.get(actor_id, _owner_scope(caller))
                if existing is None or deleted:
                    raise errors.NotFound(f"actor {actor_id} not found")
                raise errors.AlreadyExists(f"actor {actor_id} is not deleted")
            action = "actor.delete" if deleted else "actor.undelete"
            await AuditRepository(conn).record(caller, action, _resource(actor_id))
            return await _current(repo, actor_id)

    async def add_alias(
        self, caller: Principal, actor_id: uuid.UUID, alias: str
    ) -> actor_pb2.Actor:
        async with self._db.write() as conn:
            repo = ActorRepository(conn)
            actor = await _locked_live(repo, actor_id, caller)
            if await repo.add_alias(actor_id, actor["owner_id"], alias):
                await repo.touch(actor_id)
                await AuditRepository(conn).record(
                    caller, "actor.add_alias", _resource(actor_id), {"alias": alias}
                )
            return await _current(repo, actor_id)

    async def add_presence(self, caller: Principal, values: dict[str, Any]) -> actor_pb2.Presence:
        actor_id = values["actor_id"]
        async with self._db.write() as conn:
            repo = ActorRepository(conn)
            actor = await _locked_live(repo, actor_id, caller)
            row = await repo.upsert_presence({**values, "owner_id": actor["owner_id"]})
            if row is None:
                raise errors.AlreadyExists(
                    f"the {values['platform']} account {values['platform_user_id']!r} "
                    "belongs to another actor"
                )
            await repo.touch(actor_id)
            await AuditRepository(conn).record(
                caller,
                "actor.add_presence",
                _resource(actor_id),
                {"presence_id": str(row["id"]), "platform": values["platform"]},
            )
            return convert.presence_to_proto(row)

    async def remove_presence(self, caller: Principal, presence_id: uuid.UUID) -> actor_pb2.Actor:
        async with self._db.write() as conn:
            repo = ActorRepository(conn)
            actor_id = await repo.presence_actor(presence_id, _owner_scope(caller))
            if actor_id is None:
                raise errors.NotFound(f"presence {presence_id} not found")
            await _locked_live(repo, actor_id, caller)
            # Under the actor's lock: a merge or split may have moved it meanwhile.
            if not await repo.delete_presence(presence_id, actor_id):
                raise errors.Aborted("the presence moved to another actor meanwhile; retry")
            await repo.touch(actor_id)
            await AuditRepository(conn).record(
                caller,
                "actor.remove_presence",
                _resource(actor_id),
                {"presence_id": str(presence_id)},
            )
            return await _current(repo, actor_id)

    async def resolve(
        self, caller: Principal, platform: str, platform_user_id: str, username: str
    ) -> actor_pb2.Actor:
        async with self._db.lookup() as driver:
            row = await resolve_actor(
                driver,
                _owner_scope(caller),
                platform,
                platform_user_id=platform_user_id or None,
                username=username if not platform_user_id else None,
            )
        if row is None:
            raise errors.NotFound(f"no actor has that {platform} account")
        return convert.to_proto(row)

    async def find_candidates(
        self, caller: Principal, request: actor_pb2.FindCandidateMatchesRequest
    ) -> actor_pb2.FindCandidateMatchesResponse:
        actor_id = parse_uuid(request.actor_id, "actor_id")
        threshold = request.threshold or DEFAULT_THRESHOLD
        if not math.isfinite(threshold) or not 0 < threshold <= 1:
            raise errors.InvalidArgument("threshold", "must be between 0 and 1")
        limit = pagination.page_size(request.limit, maximum=MAX_CANDIDATES, field="limit")
        if not request.limit:
            limit = DEFAULT_CANDIDATES
        owner_id = _owner_scope(caller)
        # A read-only transaction on a bare connection: the threshold setting is
        # local to it, and the hot path skips SQLAlchemy.
        async with self._db.lookup() as driver, driver.transaction(readonly=True):
            rows = await find_candidates(driver, actor_id, owner_id, threshold, limit)
            if not rows and await lookup_actor(driver, actor_id, owner_id) is None:
                raise errors.NotFound(f"actor {actor_id} not found")
        response = actor_pb2.FindCandidateMatchesResponse()
        for row in rows:
            candidate = response.candidates.add(
                similarity=row["similarity"],
                strategy=_STRATEGIES[row["strategy"]],
                platforms=row["platforms"],
            )
            convert.to_proto(row, candidate.actor)
        return response

    async def merge(
        self, caller: Principal, canonical_id: uuid.UUID, duplicate_ids: Sequence[uuid.UUID]
    ) -> actor_pb2.Actor:
        if not duplicate_ids:
            raise errors.InvalidArgument("duplicate_ids", "name at least one actor to merge")
        if len(duplicate_ids) > MAX_MERGE_DUPLICATES:
            raise errors.InvalidArgument(
                "duplicate_ids", f"at most {MAX_MERGE_DUPLICATES} actors per merge"
            )
        if canonical_id in duplicate_ids:
            index = list(duplicate_ids).index(canonical_id)
            raise errors.InvalidArgument(
                f"duplicate_ids[{index}]", "must not be the canonical actor"
            )
        async with self._db.write() as conn:
            repo = ActorRepository(conn)
            locked = await _lock_all(repo, caller, [canonical_id, *duplicate_ids])
            owner_id = locked[canonical_id]["owner_id"]
            await repo.copy_names_as_aliases(canonical_id, owner_id, duplicate_ids)
            # Presences are unique per owner, so the duplicates' accounts never
            # clash with the canonical's: they all move.
            moved = await repo.move_presences(canonical_id, from_actors=duplicate_ids)
            repointed = await repo.repoint_content(owner_id, duplicate_ids, canonical_id)
            await repo.delete_for_good(duplicate_ids)
            await repo.touch(canonical_id)
            await AuditRepository(conn).record(
                caller,
                "actor.merge",
                _resource(canonical_id),
                {
                    "duplicate_ids": [str(d) for d in duplicate_ids],
                    "presences_moved": moved,
                    "content_repointed": repointed,
                },
            )
            return await _current(repo, canonical_id)

    async def split(
        self,
        caller: Principal,
        actor_id: uuid.UUID,
        presence_ids: Sequence[uuid.UUID],
        new_name: str,
    ) -> actor_pb2.SplitActorResponse:
        if not presence_ids:
            raise errors.InvalidArgument("presence_ids", "name at least one presence to move")
        if len(presence_ids) > MAX_SPLIT_PRESENCES:
            raise errors.InvalidArgument(
                "presence_ids", f"at most {MAX_SPLIT_PRESENCES} presences per split"
            )
        async with self._db.write() as conn:
            repo = ActorRepository(conn)
            actor = await _locked_live(repo, actor_id, caller, relinking=True)
            owned = await repo.presences_of(actor_id, presence_ids)
            for i, presence_id in enumerate(presence_ids):
                if presence_id not in owned:
                    raise errors.NotFound(
                        f"presence {presence_id} (presence_ids[{i}]) is not one of "
                        f"actor {actor_id}'s presences"
                    )
            new_id = await repo.insert(
                {
                    "owner_id": actor["owner_id"],
                    "canonical_name": new_name,
                    "actor_type": actor["actor_type"],
                }
            )
            await repo.move_presences(new_id, presence_ids=presence_ids)
            repointed = await repo.repoint_content(
                actor["owner_id"], [actor_id], new_id, accounts_of=presence_ids
            )
            await repo.touch(actor_id)
            await AuditRepository(conn).record(
                caller,
                "actor.split",
                _resource(actor_id),
                {
                    "new_actor_id": str(new_id),
                    "presence_ids": [str(p) for p in presence_ids],
                    "content_repointed": repointed,
                },
            )
            return actor_pb2.SplitActorResponse(
                original=await _current(repo, actor_id), new_actor=await _current(repo, new_id)
            )


async def _lock_all(
    repo: ActorRepository, caller: Principal, actor_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, Mapping[Any, Any]]:
    """Locks every actor of a merge (in ID order): all must exist, be live and
    have one owner; field names point at the offending request entry."""
    rows: dict[uuid.UUID, Mapping[Any, Any]] = {
        row["id"]: row for row in await repo.lock(actor_ids, _owner_scope(caller), relinking=True)
    }
    fields = ["canonical_id", *(f"duplicate_ids[{i}]" for i in range(len(actor_ids) - 1))]
    owner_id = rows[actor_ids[0]]["owner_id"] if actor_ids[0] in rows else None
    for field, actor_id in zip(fields, actor_ids, strict=True):
        row = rows.get(actor_id)
        # Another owner's actor is as absent as an unknown one (an admin may
        # merge within one owner only).
        if row is None or row["owner_id"] != owner_id:
            raise errors.NotFound(f"actor {actor_id} ({field}) not found")
        if row["delete_time"] is not None:
            raise errors.FailedPrecondition(
                f"actor {actor_id} ({field}) is deleted; undelete it first",
                reason="ACTOR_DELETED",
            )
    return rows
