"""All SQL for the credit ledger. Never commits: the caller's unit of work does.

Each mutation is one call of its server-side function (migration 0006:
`credit_grant`, `credit_reserve`, `credit_resolve`, `credit_expire_lapsed`),
which claims the request_id, takes the account's row lock, checks the rule,
appends the ledger entries and moves the balance row together, writes the
audit entry and stores the answer. One statement: on a unit without a
transaction it is its own transaction, with no BEGIN/COMMIT round trips.
The functions refuse with SQLSTATEs of class OC, translated here into the
service's errors.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg
from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Integer,
    Text,
    bindparam,
    case,
    func,
    literal_column,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.engine import RowMapping

from server import errors
from server.credits.tables import (
    DEFAULT_ARENA,
    credit_accounts,
    credit_entries,
    credit_rates,
    credit_reservations,
)
from server.db import PreparedStatement
from server.uow import UnitOfWork

_accounts = credit_accounts.c
_reservations = credit_reservations.c
_entries = credit_entries.c
_ZERO: ColumnElement[Any] = literal_column("0")

# What the functions raise (see migration 0006).
INSUFFICIENT_CREDITS = "OC001"
SETTLE_EXCEEDS_RESERVED = "OC002"
RESERVATION_NOT_PENDING = "OC003"
RESERVATION_NOT_FOUND = "OC004"
REQUEST_ID_REUSED = "OC005"
GRANT_OVERFLOW = "OC006"


@dataclass(frozen=True, slots=True)
class RequestKey:
    """An AIP-155 request_id and the digest of the payload it was sent with."""

    request_id: uuid.UUID
    digest: bytes


@dataclass(frozen=True, slots=True)
class AccountState:
    """An account at `as_of`: the balance row's sums, the grants valid then,
    and the pending holds already past their expire_time (`lapsed`), which
    count as released even before the sweeper writes their EXPIRE entries."""

    granted: int
    reserved: int
    settled: int
    allocated: int
    lapsed: int
    as_of: datetime

    @classmethod
    def of(cls, row: asyncpg.Record) -> AccountState:
        return cls(
            granted=row["granted"],
            reserved=row["reserved"],
            settled=row["settled"],
            allocated=row["allocated"],
            lapsed=row["lapsed"],
            as_of=row["as_of"],
        )

    @property
    def held(self) -> int:
        return self.reserved - self.lapsed

    @property
    def available(self) -> int:
        return max(0, self.allocated - self.held - self.settled)


_BALANCES = PreparedStatement(
    text("SELECT * FROM credit_balances(CAST(:user_ids AS uuid[]), statement_timestamp())")
)
_GRANT = PreparedStatement(
    text(
        "SELECT * FROM credit_grant(:caller, :request_id, :digest, :audit_request_id, "
        ":user_id, :amount, :memo, :valid_from, :valid_until)"
    )
)
_RESERVE = PreparedStatement(
    text(
        "SELECT * FROM credit_reserve(:caller, :request_id, :digest, :audit_request_id, "
        ":user_id, :amount, :reference, :ttl)"
    )
)
_RESOLVE = PreparedStatement(
    text(
        "SELECT * FROM credit_resolve(:caller, :request_id, :digest, :audit_request_id, "
        ":owner_id, :reservation_id, :spent)"
    )
)
_EXPIRE = PreparedStatement(text("SELECT * FROM credit_expire_lapsed(:limit, :actor)"))
_ENTRIES_PAGE = PreparedStatement(
    select(*credit_entries.c)
    .where(
        _entries.user_id == bindparam("user_id", type_=UUID(as_uuid=True)),
        _entries.seq < bindparam("before_seq", type_=BigInteger),
    )
    .order_by(_entries.seq.desc())
    .limit(bindparam("limit", type_=Integer))
)
# Constants written into the SQL, not bound: prepared statements bind only
# their named parameters.
_DEFAULT_ARENA: ColumnElement[Any] = literal_column(f"'{DEFAULT_ARENA}'")
_RATE = PreparedStatement(
    select(*credit_rates.c)
    .where(credit_rates.c.arena.in_((bindparam("arena", type_=Text), _DEFAULT_ARENA)))
    .order_by((credit_rates.c.arena == _DEFAULT_ARENA).asc())
    .limit(literal_column("1"))
)


@contextmanager
def _refusals(requested: int = 0) -> Iterator[None]:
    """Turns the credit functions' refusals into the service's errors."""
    try:
        yield
    except asyncpg.PostgresError as exc:
        refusal = _refusal(exc, requested)
        if refusal is None:
            raise
        raise refusal from None


def _refusal(exc: asyncpg.PostgresError, requested: int) -> errors.ObservatoryError | None:
    code, message, detail = exc.sqlstate, str(exc.message), str(exc.detail or "")
    if code == INSUFFICIENT_CREDITS:
        return errors.FailedPrecondition(
            message,
            reason="INSUFFICIENT_CREDITS",
            metadata={"available": detail, "requested": str(requested)},
        )
    if code == SETTLE_EXCEEDS_RESERVED:
        return errors.FailedPrecondition(
            message,
            reason="SETTLE_EXCEEDS_RESERVED",
            metadata={"reserved": detail, "requested": str(requested)},
        )
    if code == RESERVATION_NOT_PENDING:
        return errors.FailedPrecondition(
            message,
            reason="RESERVATION_NOT_PENDING",
            metadata={"status": f"RESERVATION_STATUS_{detail}"},
        )
    if code == RESERVATION_NOT_FOUND:
        return errors.NotFound(message)
    if code == REQUEST_ID_REUSED:
        return errors.RequestIdReused()
    if code == GRANT_OVERFLOW:
        return errors.InvalidArgument("amount", "would overflow the account's 64-bit total")
    return None


def _key_params(key: RequestKey | None) -> dict[str, Any]:
    if key is None:
        return {"request_id": None, "digest": None}
    return {"request_id": key.request_id, "digest": key.digest}


class CreditRepository:
    def __init__(self, uow: UnitOfWork) -> None:
        self._uow = uow
        self._driver = uow.driver

    # -- mutations (one statement each) --------------------------------------------

    async def grant(
        self,
        caller: uuid.UUID,
        key: RequestKey | None,
        audit_request_id: str | None,
        *,
        user_id: uuid.UUID,
        amount: int,
        memo: str,
        valid_from: datetime,
        valid_until: datetime | None,
    ) -> asyncpg.Record:
        """The new allocation (or, for a retried request_id, the first answer)."""
        with _refusals(amount):
            row = await _GRANT.fetchrow(
                self._driver,
                caller=caller,
                **_key_params(key),
                audit_request_id=audit_request_id,
                user_id=user_id,
                amount=amount,
                memo=memo,
                valid_from=valid_from,
                valid_until=valid_until,
            )
        assert row is not None
        return row

    async def reserve(
        self,
        caller: uuid.UUID,
        key: RequestKey | None,
        audit_request_id: str | None,
        *,
        user_id: uuid.UUID,
        amount: int,
        reference: str,
        ttl: timedelta,
    ) -> asyncpg.Record:
        """The new pending reservation (or, for a retried request_id, the
        first answer); INSUFFICIENT_CREDITS when the account cannot cover it."""
        with _refusals(amount):
            row = await _RESERVE.fetchrow(
                self._driver,
                caller=caller,
                **_key_params(key),
                audit_request_id=audit_request_id,
                user_id=user_id,
                amount=amount,
                reference=reference,
                ttl=ttl,
            )
        assert row is not None
        return row

    async def resolve(
        self,
        caller: uuid.UUID,
        key: RequestKey | None,
        audit_request_id: str | None,
        *,
        owner_id: uuid.UUID | None,
        reservation_id: uuid.UUID,
        spent: int | None,
    ) -> asyncpg.Record:
        """Settles `spent` credits of a pending reservation within `owner_id`'s
        (anyone's when None), the rest returning, or releases it whole when
        `spent` is None. The reservation as it became."""
        with _refusals(spent or 0):
            row = await _RESOLVE.fetchrow(
                self._driver,
                caller=caller,
                **_key_params(key),
                audit_request_id=audit_request_id,
                owner_id=owner_id,
                reservation_id=reservation_id,
                spent=spent,
            )
        assert row is not None
        return row

    async def expire_lapsed(self, limit: int, actor: uuid.UUID) -> tuple[int, int]:
        """One sweep of up to `limit` accounts: (accounts swept, holds expired).
        Another sweeper at work: (0, 0)."""
        row = await _EXPIRE.fetchrow(self._driver, limit=limit, actor=actor)
        assert row is not None
        return row["swept_accounts"], row["expired_holds"]

    # -- reads -------------------------------------------------------------------

    async def balances(self, user_ids: Sequence[uuid.UUID]) -> list[asyncpg.Record]:
        """The accounts of `user_ids` that exist, now (one snapshot)."""
        return await _BALANCES.fetch(self._driver, user_ids=list(user_ids))

    async def entries_page(
        self, user_id: uuid.UUID, before_seq: int, limit: int
    ) -> list[asyncpg.Record]:
        """The account's entries numbered below `before_seq`, newest first."""
        return await _ENTRIES_PAGE.fetch(
            self._driver, user_id=user_id, before_seq=before_seq, limit=limit
        )

    async def rate(self, arena: str) -> asyncpg.Record:
        """The arena's rate row, or the default one."""
        row = await _RATE.fetchrow(self._driver, arena=arena)
        assert row is not None
        return row

    async def recompute(self, user_id: uuid.UUID | None) -> list[RowMapping]:
        """Each account's balance row beside what its entries and pending
        reservations add up to, in one statement (one snapshot)."""

        def total(*kinds: str) -> ColumnElement[Any]:
            return func.coalesce(
                func.sum(case((_entries.kind.in_(kinds), _entries.amount), else_=0)), 0
            )

        sums = (
            select(
                _entries.user_id,
                total("GRANT").label("granted"),
                (total("RESERVE") - total("SETTLE", "RELEASE", "EXPIRE")).label("reserved"),
                total("SETTLE").label("settled"),
                func.count().label("entries"),
                func.max(_entries.seq).label("max_seq"),
            )
            .group_by(_entries.user_id)
            .subquery()
        )
        pending = (
            select(_reservations.user_id, func.sum(_reservations.amount).label("pending_reserved"))
            .where(_reservations.status == "PENDING")
            .group_by(_reservations.user_id)
            .subquery()
        )
        query = (
            select(
                _accounts.user_id,
                _accounts.granted.label("recorded_granted"),
                _accounts.reserved.label("recorded_reserved"),
                _accounts.settled.label("recorded_settled"),
                _accounts.last_seq.label("recorded_entries"),
                func.coalesce(sums.c.granted, _ZERO).label("derived_granted"),
                func.coalesce(sums.c.reserved, _ZERO).label("derived_reserved"),
                func.coalesce(sums.c.settled, _ZERO).label("derived_settled"),
                func.coalesce(sums.c.entries, _ZERO).label("derived_entries"),
                func.coalesce(sums.c.max_seq, _ZERO).label("max_seq"),
                func.coalesce(pending.c.pending_reserved, _ZERO).label("pending_reserved"),
            )
            .select_from(
                credit_accounts.outerjoin(sums, sums.c.user_id == _accounts.user_id).outerjoin(
                    pending, pending.c.user_id == _accounts.user_id
                )
            )
            .order_by(_accounts.user_id)
        )
        if user_id is not None:
            query = query.where(_accounts.user_id == user_id)
        return list((await self._uow.conn.execute(query)).mappings())
