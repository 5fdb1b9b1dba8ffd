"""Actor business rules, applied inside the unit of work each RPC is handed.

Every change to an actor's aliases or presences, and every merge and split,
first locks the actors involved (in ID order), so concurrent changes to the
same actors queue instead of deadlocking, and an actor merged away meanwhile
is NOT_FOUND rather than half-updated.

GetActor and ResolveActor are coalesced point reads: the rows come by key from
one query for everyone waiting, and tenancy is checked here, per caller.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import asyncpg
from observatory.v1 import actor_pb2

from server import errors, pagination
from server.actors import convert
from server.actors.repository import (
    AccountKey,
    ActorQuery,
    ActorRepository,
    account_key,
    read_create_answer,
)
from server.audit import AuditRepository, entry_params
from server.auth import Principal
from server.coalesce import PointReads
from server.content.actor_links import ContentAuthorRepository
from server.idempotency import IdempotencyRepository, claim_params
from server.uow import Database, UnitOfWork

CREATE_METHOD = "CreateActor"
# A ListActors page ends early once its actors hold this many bytes encoded
# (descriptions, metadata, aliases, presences), within the 4 MiB a gRPC
# client receives by default; next_page_token goes on from there.
PAGE_BYTES = 2_000_000
_STRATEGIES = {
    1: actor_pb2.MATCH_STRATEGY_EXACT_NAME,
    2: actor_pb2.MATCH_STRATEGY_SHARED_USERNAME,
    3: actor_pb2.MATCH_STRATEGY_TRIGRAM,
}


def _owner_scope(caller: Principal) -> uuid.UUID | None:
    """Admins see every owner's rows; users only their own."""
    return None if caller.is_admin else caller.user_id


def _visible(caller: Principal, row: Mapping[str, Any] | None) -> bool:
    return row is not None and (caller.is_admin or row["owner_id"] == caller.user_id)


def _resource(actor_id: uuid.UUID) -> str:
    return f"actors/{actor_id}"


async def _by_ids(uow: UnitOfWork, actor_ids: Sequence[uuid.UUID]) -> list[asyncpg.Record]:
    return await ActorRepository(uow).by_ids(actor_ids)


async def _by_accounts(uow: UnitOfWork, keys: Sequence[AccountKey]) -> list[asyncpg.Record]:
    return await ActorRepository(uow).by_accounts(keys)


def _created(
    values: Mapping[str, Any], actor_id: uuid.UUID, create_time: datetime
) -> actor_pb2.Actor:
    """A new actor as CreateActor answers it: what was asked for, plus the ID
    and time the database gave it."""
    return convert.to_proto(
        {
            **values,
            "id": actor_id,
            "aliases": [],
            "presences": [],
            "create_time": create_time,
            "update_time": create_time,
            "delete_time": None,
        }
    )


async def _locked_live(
    repo: ActorRepository, actor_id: uuid.UUID, caller: Principal, *, relinking: bool = False
) -> asyncpg.Record:
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


async def _lock_all(
    repo: ActorRepository, caller: Principal, actor_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, asyncpg.Record]:
    """Locks every actor of a merge (in ID order): all must exist, be live and
    have one owner; field names point at the offending request entry."""
    rows: dict[uuid.UUID, asyncpg.Record] = {
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


async def _current(repo: ActorRepository, actor_id: uuid.UUID) -> actor_pb2.Actor:
    row = await repo.get(actor_id)
    assert row is not None
    return convert.to_proto(row)


def _fill_page(
    response: actor_pb2.ListActorsResponse, rows: Sequence[Mapping[Any, Any]], size: int
) -> int:
    """Adds up to `size` of `rows` (fetched with a limit of `size` + 1) to the
    page and says how many: fewer once their encoded actors pass PAGE_BYTES
    (never none), so a page fits what a client receives by default."""
    total = 0
    for i, row in enumerate(rows[:size]):
        actor = convert.to_proto(row, response.actors.add())
        total += actor.ByteSize()
        if total > PAGE_BYTES and i:
            del response.actors[-1]
            return i
    return min(len(rows), size)


class ActorService:
    def __init__(self, units: Database) -> None:
        self._by_id = PointReads(units, _by_ids, lambda row: row["id"])
        self._by_account = PointReads(units, _by_accounts, account_key)

    # -- coalesced reads (no unit: PointReads runs one per batch) ----------------

    async def get(self, caller: Principal, actor_id: uuid.UUID) -> actor_pb2.Actor:
        row = await self._by_id.get(actor_id)
        if not _visible(caller, row):
            raise errors.NotFound(f"actor {actor_id} not found")
        return convert.to_proto(row)  # type: ignore[arg-type]

    async def resolve(
        self,
        caller: Principal,
        platform: str,
        platform_user_id: str | None,
        username: str | None,
    ) -> actor_pb2.Actor:
        """The actor of the caller's latest account matching the platform user
        ID (or, without one, the username, in any case)."""
        key = AccountKey(
            _owner_scope(caller),
            platform,
            platform_user_id,
            None if platform_user_id is not None else username,
        )
        row = await self._by_account.get(key)
        if not _visible(caller, row):
            raise errors.NotFound(f"no actor has that account on {errors.quote(platform)}")
        return convert.to_proto(row)  # type: ignore[arg-type]

    # -- reads -------------------------------------------------------------------

    async def list(
        self,
        uow: UnitOfWork,
        caller: Principal,
        name_query: str | None,
        actor_types: Sequence[str],
        show_deleted: bool,
        size: int,
        page_token: str,
    ) -> actor_pb2.ListActorsResponse:
        query = ActorQuery(
            owner_id=_owner_scope(caller),
            name_query=name_query,
            actor_types=actor_types,
            show_deleted=show_deleted,
        )
        token_query = pagination.fingerprint(
            "ListActors",
            str(query.owner_id),
            name_query,
            ",".join(actor_types),
            str(show_deleted),
        )
        after = pagination.decode_token(page_token, token_query, str, uuid.UUID)
        rows = await ActorRepository(uow).find_page(query, after=after, limit=size + 1)
        response = actor_pb2.ListActorsResponse()
        served = _fill_page(response, rows, size)
        response.next_page_token = pagination.next_page_token(
            rows[: served + 1], served, token_query, lambda row: (row["canonical_name"], row["id"])
        )
        return response

    async def find_candidates(
        self,
        uow: UnitOfWork,
        caller: Principal,
        actor_id: uuid.UUID,
        threshold: float,
        limit: int,
    ) -> actor_pb2.FindCandidateMatchesResponse:
        rows = await ActorRepository(uow).candidates(
            actor_id, _owner_scope(caller), threshold, limit
        )
        if rows is None:
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

    # -- changes -----------------------------------------------------------------

    async def create(
        self,
        uow: UnitOfWork,
        caller: Principal,
        values: Mapping[str, Any],
        request_id: uuid.UUID | None,
        digest: bytes,
    ) -> actor_pb2.Actor:
        """One statement: the actor, its audit entry and (with a request ID) the
        claim with its stored answer. A retry of the same request gets the
        first answer back: the ID and time stored with the claim, and the rest
        from the request, which a retry repeats exactly."""
        values = {**values, "owner_id": caller.user_id}
        claim = (
            claim_params(caller.user_id, request_id, CREATE_METHOD, digest)
            if request_id is not None
            else None
        )
        created = await ActorRepository(uow).create(
            values, entry_params(caller, "actor.create"), claim
        )
        if created is not None:
            return _created(values, created["id"], created["create_time"])
        assert request_id is not None
        method, stored_digest, answer = await IdempotencyRepository(uow.conn).stored(
            caller.user_id, request_id
        )
        if method != CREATE_METHOD or stored_digest != digest or answer is None:
            raise errors.RequestIdReused()
        try:
            return _created(values, *read_create_answer(answer))
        except ValueError:
            # Stored before answers were kept as JSON: the whole Actor message.
            return actor_pb2.Actor.FromString(answer)

    async def update(
        self, uow: UnitOfWork, caller: Principal, actor_id: uuid.UUID, values: dict[str, Any]
    ) -> actor_pb2.Actor:
        repo = ActorRepository(uow)
        audit = entry_params(caller, "actor.update", {"fields": sorted(values)})
        row = await repo.update(actor_id, _owner_scope(caller), values, audit)
        if row is None:
            existing = await repo.get(actor_id)
            if existing is None or not _visible(caller, existing):
                raise errors.NotFound(f"actor {actor_id} not found")
            if existing["delete_time"] is not None:
                raise errors.FailedPrecondition(
                    f"actor {actor_id} is deleted; undelete it first", reason="ACTOR_DELETED"
                )
            raise errors.Aborted(f"actor {actor_id} was restored meanwhile; retry")
        return convert.to_proto(row)

    async def set_deleted(
        self, uow: UnitOfWork, caller: Principal, actor_id: uuid.UUID, deleted: bool
    ) -> actor_pb2.Actor:
        repo = ActorRepository(uow)
        audit = entry_params(caller, "actor.delete" if deleted else "actor.undelete")
        row = await repo.set_deleted(actor_id, _owner_scope(caller), deleted, audit)
        if row is None:
            if deleted or not _visible(caller, await repo.get(actor_id)):
                raise errors.NotFound(f"actor {actor_id} not found")
            raise errors.AlreadyExists(f"actor {actor_id} is not deleted")
        return convert.to_proto(row)

    async def add_alias(
        self, uow: UnitOfWork, caller: Principal, actor_id: uuid.UUID, alias: str
    ) -> actor_pb2.Actor:
        repo = ActorRepository(uow)
        actor = await _locked_live(repo, actor_id, caller)
        if await repo.add_alias(actor_id, actor["owner_id"], alias):
            await repo.touch(actor_id)
            await AuditRepository(uow.conn).record(
                caller, "actor.add_alias", _resource(actor_id), {"alias": alias}
            )
        return await _current(repo, actor_id)

    async def add_presence(
        self, uow: UnitOfWork, caller: Principal, values: dict[str, Any]
    ) -> actor_pb2.Presence:
        actor_id = values["actor_id"]
        repo = ActorRepository(uow)
        actor = await _locked_live(repo, actor_id, caller)
        row = await repo.upsert_presence({**values, "owner_id": actor["owner_id"]})
        if row is None:
            raise errors.AlreadyExists(
                f"the account {errors.quote(values['platform_user_id'])} on "
                f"{errors.quote(values['platform'])} belongs to another actor"
            )
        await repo.touch(actor_id)
        await AuditRepository(uow.conn).record(
            caller,
            "actor.add_presence",
            _resource(actor_id),
            {"presence_id": str(row["id"]), "platform": values["platform"]},
        )
        return convert.presence_to_proto(row)

    async def remove_presence(
        self, uow: UnitOfWork, caller: Principal, presence_id: uuid.UUID
    ) -> actor_pb2.Actor:
        repo = ActorRepository(uow)
        actor_id = await repo.presence_actor(presence_id, _owner_scope(caller))
        if actor_id is None:
            raise errors.NotFound(f"presence {presence_id} not found")
        await _locked_live(repo, actor_id, caller)
        # Under the actor's lock: a merge or split may have moved it meanwhile.
        if not await repo.delete_presence(presence_id, actor_id):
            raise errors.Aborted("the presence moved to another actor meanwhile; retry")
        await repo.touch(actor_id)
        await AuditRepository(uow.conn).record(
            caller,
            "actor.remove_presence",
            _resource(actor_id),
            {"presence_id": str(presence_id)},
        )
        return await _current(repo, actor_id)

    async def merge(
        self,
        uow: UnitOfWork,
        caller: Principal,
        canonical_id: uuid.UUID,
        duplicate_ids: Sequence[uuid.UUID],
    ) -> actor_pb2.Actor:
        repo = ActorRepository(uow)
        locked = await _lock_all(repo, caller, [canonical_id, *duplicate_ids])
        owner_id = locked[canonical_id]["owner_id"]
        await repo.copy_names_as_aliases(canonical_id, owner_id, duplicate_ids)
        # Presences are unique per owner, so the duplicates' accounts never
        # clash with the canonical's: they all move.
        moved = await repo.move_presences(canonical_id, from_actors=duplicate_ids)
        repointed = await ContentAuthorRepository(uow).repoint(
            owner_id, duplicate_ids, canonical_id
        )
        await repo.delete_for_good(duplicate_ids)
        await repo.touch(canonical_id)
        await AuditRepository(uow.conn).record(
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
        uow: UnitOfWork,
        caller: Principal,
        actor_id: uuid.UUID,
        presence_ids: Sequence[uuid.UUID],
        new_name: str,
    ) -> actor_pb2.SplitActorResponse:
        repo = ActorRepository(uow)
        actor = await _locked_live(repo, actor_id, caller, relinking=True)
        accounts = await repo.accounts_of(actor_id, presence_ids)
        for i, presence_id in enumerate(presence_ids):
            if presence_id not in accounts:
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
        repointed = await ContentAuthorRepository(uow).repoint_accounts(
            actor["owner_id"], actor_id, new_id, list(accounts.values())
        )
        await repo.touch(actor_id)
        await AuditRepository(uow.conn).record(
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
