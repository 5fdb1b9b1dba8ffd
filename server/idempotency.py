"""AIP-155 request IDs: a retry with the same request_id and payload gets the
first answer back and changes nothing; another payload is REQUEST_ID_REUSED.

One recipe, in three sizes: a call claims its key in `idempotency_keys`
(INSERT ... ON CONFLICT DO NOTHING, so a concurrent claim of the same key waits
for the first transaction), makes its change, stores its answer, all in its
unit's transaction; a call that finds the key taken gets `replay` of the stored
answer. `once` does it in three statements around any Python `work`;
`claim_insert` / `stored_select` put the claim and the answer into the
change's own statement as data-modifying CTEs (CreateContent, CreateActor);
the credit functions of migration 0006 do the same steps in PL/pgSQL, and
streams (IngestContent, UpsertItems) claim once and store the answer when the
stream ends.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

import asyncpg
from google.protobuf.message import Message
from sqlalchemy import Insert, Select, bindparam, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.expression import ColumnElement, FromClause

from server import errors, uow
from server.auth import Principal
from server.db import PreparedStatement
from server.protoconv import parse_uuid
from server.tables import idempotency_keys

M = TypeVar("M", bound=Message)


def request_hash(method: str, *parts: Message | bytes) -> bytes:
    """A digest of what the request asks for (the request_id itself excluded)."""
    digest = hashlib.sha256(method.encode())
    for part in parts:
        digest.update(
            part.SerializeToString(deterministic=True) if isinstance(part, Message) else part
        )
    return digest.digest()


class IdempotencyRepository:
    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def claim(
        self, owner: uuid.UUID, request_id: uuid.UUID, method: str, digest: bytes
    ) -> bool:
        """Takes the key for this transaction; False when it was already taken.
        A concurrent claim waits here until the first transaction ends."""
        result = await self._conn.execute(
            insert(idempotency_keys)
            .values(owner_id=owner, request_id=request_id, method=method, request_hash=digest)
            .on_conflict_do_nothing()
            .returning(idempotency_keys.c.request_id)
        )
        return result.first() is not None

    async def stored(
        self, owner: uuid.UUID, request_id: uuid.UUID
    ) -> tuple[str, bytes, bytes | None]:
        row = (
            await self._conn.execute(
                select(
                    idempotency_keys.c.method,
                    idempotency_keys.c.request_hash,
                    idempotency_keys.c.response,
                ).where(
                    idempotency_keys.c.owner_id == owner,
                    idempotency_keys.c.request_id == request_id,
                )
            )
        ).one()
        return row.method, row.request_hash, row.response

    async def forget_older_than(self, days: int) -> int:
        """Deletes keys made more than `days` ago; returns how many."""
        result = await self._conn.execute(
            idempotency_keys.delete().where(
                idempotency_keys.c.create_time < func.now() - timedelta(days=days)
            )
        )
        return int(result.rowcount)

    async def save_response(
        self, owner: uuid.UUID, request_id: uuid.UUID, response: bytes, digest: bytes | None = None
    ) -> None:
        values: dict[str, bytes] = {"response": response}
        if digest is not None:
            values["request_hash"] = digest
        await self._conn.execute(
            idempotency_keys.update()
            .where(
                idempotency_keys.c.owner_id == owner, idempotency_keys.c.request_id == request_id
            )
            .values(**values)
        )


async def forget_old_request_ids(units: uow.Database, days: int) -> int:
    """Retention for request IDs: a retry later than `days` runs anew. One
    server of a fleet at a time; the others skip their turn (and return 0)."""
    async with units.write() as unit:
        if not await unit.try_advisory_lock("observatory.request_id_cleanup"):
            return 0
        return await IdempotencyRepository(unit.conn).forget_older_than(days)


async def once(
    conn: AsyncConnection,
    caller: Principal,
    request_id: str,
    method: str,
    digest: bytes,
    response_type: type[M],
    work: Callable[[], Awaitable[M]],
) -> M:
    """Runs `work` unless this caller already ran the same request under
    `request_id`, in which case the first response is returned."""
    if not request_id:
        return await work()
    key = parse_uuid(request_id, "request_id")
    repo = IdempotencyRepository(conn)
    if await repo.claim(caller.user_id, key, method, digest):
        response = await work()
        await repo.save_response(caller.user_id, key, response.SerializeToString())
        return response
    return replay(await repo.stored(caller.user_id, key), method, digest, response_type)


def claim_insert(source: FromClause, response: ColumnElement[bytes]) -> Insert:
    """The claim of a request ID as an INSERT ... SELECT from `source` (one
    row), storing `response` (an expression over it) as the answer at once:
    to run as a data-modifying CTE of the statement that makes the change, when
    the answer is known in SQL. It returns a row only when the key was free
    (then the change may go ahead); a concurrent claim of the same key waits
    for the first one's transaction. Its parameters are named by `claim_params`."""
    k = idempotency_keys.c
    return (
        insert(idempotency_keys)
        .from_select(
            ["owner_id", "request_id", "method", "request_hash", "response"],
            select(
                bindparam("claim_owner_id", type_=k.owner_id.type),
                bindparam("claim_request_id", type_=k.request_id.type),
                bindparam("claim_method", type_=k.method.type),
                bindparam("claim_request_hash", type_=k.request_hash.type),
                response,
            ).select_from(source),
        )
        .on_conflict_do_nothing()
        .returning(k.request_id)
    )


def claim_params(
    owner: uuid.UUID, request_id: uuid.UUID, method: str, digest: bytes
) -> dict[str, Any]:
    """The driver parameters of a `claim_insert` statement."""
    return {
        "claim_owner_id": owner,
        "claim_request_id": request_id,
        "claim_method": method,
        "claim_request_hash": digest,
    }


def stored_select() -> Select[Any]:
    """The stored (method, request_hash, response) of the key named by the
    `claim_params` parameters, as the statement's snapshot sees it: beside a
    `claim_insert` that finds the key taken, a retry of a call that committed
    before it gets the first answer from the same statement."""
    k = idempotency_keys.c
    return select(k.method, k.request_hash, k.response).where(
        k.owner_id == bindparam("claim_owner_id", type_=k.owner_id.type),
        k.request_id == bindparam("claim_request_id", type_=k.request_id.type),
    )


def replay(
    stored: tuple[str | None, bytes | None, bytes | None],
    method: str,
    digest: bytes,
    response_type: type[M],
) -> M:
    """The first answer to a retried call from its stored (method,
    request_hash, response); REQUEST_ID_REUSED when the retry asks for
    something else."""
    stored_method, stored_hash, stored_response = stored
    if stored_method != method or stored_hash != digest or stored_response is None:
        raise errors.RequestIdReused()
    return response_type.FromString(stored_response)


_STORE_RESPONSE = PreparedStatement(
    idempotency_keys.update()
    .where(
        idempotency_keys.c.owner_id == bindparam("owner_id"),
        idempotency_keys.c.request_id == bindparam("request_id"),
    )
    .values(response=bindparam("response"))
)


async def store_response(
    driver: asyncpg.Connection, owner: uuid.UUID, request_id: uuid.UUID, response: bytes
) -> None:
    """Stores the answer of a claimed key (a prepared statement on the unit's
    driver), for a change whose answer is known only after it ran."""
    await _STORE_RESPONSE.fetch(driver, owner_id=owner, request_id=request_id, response=response)
