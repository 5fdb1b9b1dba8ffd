"""All SQL for the credit ledger. Never commits: the caller's unit of work does.

`post` is the only code that writes ledger entries or changes a balance row,
and it does both in one go, so the two stay in step."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Interval,
    Select,
    and_,
    bindparam,
    case,
    func,
    literal_column,
    or_,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import UUID, insert
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from server.credits.tables import (
    DEFAULT_ARENA,
    credit_accounts,
    credit_allocations,
    credit_entries,
    credit_rates,
    credit_reservations,
)
from server.db import PreparedStatement, driver_connection

# The sweeper's lock: one sweep at a time across every worker and server.
EXPIRY_LOCK = "observatory.credit_expiry"

_accounts = credit_accounts.c
_reservations = credit_reservations.c
_allocations = credit_allocations.c
_entries = credit_entries.c


@dataclass(frozen=True, slots=True)
class Entry:
    """A ledger entry about to be appended."""

    kind: str
    amount: int
    reservation_id: uuid.UUID | None = None
    allocation_id: uuid.UUID | None = None
    reference: str = ""


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

    @property
    def held(self) -> int:
        return self.reserved - self.lapsed

    @property
    def available(self) -> int:
        return max(0, self.allocated - self.held - self.settled)


# Constants written into the SQL, not bound: the prepared statements bind only
# their named parameters.
_PENDING: ColumnElement[Any] = literal_column("'PENDING'")
_ZERO: ColumnElement[Any] = literal_column("0")


def _pending_lapsed(at: ColumnElement[Any]) -> ColumnElement[bool]:
    return and_(_reservations.status == _PENDING, _reservations.expire_time <= at)


_NOW = func.statement_timestamp()
_USER = bindparam("user_id", type_=UUID(as_uuid=True))
_STATE = PreparedStatement(
    select(
        _accounts.granted,
        _accounts.reserved,
        _accounts.settled,
        select(func.coalesce(func.sum(_allocations.amount), _ZERO))
        .where(
            _allocations.user_id == _USER,
            _allocations.valid_from <= _NOW,
            or_(_allocations.valid_until.is_(None), _allocations.valid_until > _NOW),
        )
        .scalar_subquery()
        .label("allocated"),
        select(func.coalesce(func.sum(_reservations.amount), _ZERO))
        .where(_reservations.user_id == _USER, _pending_lapsed(_NOW))
        .scalar_subquery()
        .label("lapsed"),
        _NOW.label("as_of"),
    ).where(_accounts.user_id == _USER)
)
_INSERT_RESERVATION = PreparedStatement(
    credit_reservations.insert()
    .values(
        user_id=_USER,
        amount=bindparam("amount"),
        reference=bindparam("reference"),
        expire_time=func.now() + bindparam("ttl", type_=Interval),
    )
    .returning(*credit_reservations.c)
)
_RESOLVE = PreparedStatement(
    credit_reservations.update()
    .where(
        _reservations.id == bindparam("id"),
        _reservations.status == _PENDING,
        _reservations.expire_time > _NOW,
    )
    .values(
        status=bindparam("new_status"), settled_amount=bindparam("spent"), update_time=func.now()
    )
    .returning(*credit_reservations.c)
)
# The balance row moves and the entries are appended in one statement; the
# entries come as parallel arrays, numbered after the row's last_seq.
_POST = PreparedStatement(
    text("""
WITH account AS (
  UPDATE credit_accounts
     SET granted = granted + :granted, reserved = reserved + :reserved,
         settled = settled + :settled,
         last_seq = last_seq + cardinality(CAST(:kinds AS text[])), update_time = now()
   WHERE user_id = :user_id
  RETURNING last_seq - cardinality(CAST(:kinds AS text[])) AS first_seq
)
INSERT INTO credit_entries (user_id, seq, kind, amount, reservation_id, allocation_id, reference)
SELECT :user_id, account.first_seq + e.n, e.kind, e.amount, e.reservation_id,
       e.allocation_id, e.reference
  FROM account,
       unnest(CAST(:kinds AS text[]), CAST(:amounts AS bigint[]),
              CAST(:reservation_ids AS uuid[]), CAST(:allocation_ids AS uuid[]),
              CAST(:references AS text[]))
       WITH ORDINALITY AS e(kind, amount, reservation_id, allocation_id, reference, n)
""")
)


class CreditRepository:
    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    # -- accounts ----------------------------------------------------------------

    async def ensure_account(self, user_id: uuid.UUID) -> None:
        await self._conn.execute(
            insert(credit_accounts).values(user_id=user_id).on_conflict_do_nothing()
        )

    async def lock_account(self, user_id: uuid.UUID) -> bool:
        """Takes the account's row lock for the transaction; False when the
        account does not exist. Every change to an account holds this lock, so
        an account's changes happen one after the other."""
        query = select(_accounts.user_id).where(_accounts.user_id == user_id).with_for_update()
        return (await self._conn.execute(query)).first() is not None

    async def state(self, user_id: uuid.UUID) -> AccountState | None:
        """The account now, read in one snapshot. Under `lock_account` (taken
        by an earlier statement, so this one's snapshot sees every change made
        before the lock was granted) it stays true until the transaction ends."""
        row = await _STATE.fetchrow(await driver_connection(self._conn), user_id=user_id)
        if row is None:
            return None
        # sum() of bigint is numeric in PostgreSQL.
        return AccountState(
            granted=row["granted"],
            reserved=row["reserved"],
            settled=row["settled"],
            allocated=int(row["allocated"]),
            lapsed=int(row["lapsed"]),
            as_of=row["as_of"],
        )

    async def post(
        self,
        user_id: uuid.UUID,
        entries: Sequence[Entry],
        *,
        granted: int = 0,
        reserved: int = 0,
        settled: int = 0,
    ) -> None:
        """Appends `entries` to the account's ledger, numbered on from its last
        entry, and moves the balance row's sums by the given amounts: one
        statement, so the two cannot part."""
        await _POST.fetchrow(
            await driver_connection(self._conn),
            user_id=user_id,
            granted=granted,
            reserved=reserved,
            settled=settled,
            kinds=[entry.kind for entry in entries],
            amounts=[entry.amount for entry in entries],
            reservation_ids=[entry.reservation_id for entry in entries],
            allocation_ids=[entry.allocation_id for entry in entries],
            references=[entry.reference for entry in entries],
        )

    # -- allocations and reservations ----------------------------------------------

    async def insert_allocation(self, values: dict[str, Any]) -> RowMapping:
        statement = credit_allocations.insert().values(**values).returning(*credit_allocations.c)
        return (await self._conn.execute(statement)).mappings().one()

    async def insert_reservation(
        self, user_id: uuid.UUID, amount: int, reference: str, ttl: timedelta
    ) -> Mapping[str, Any]:
        row: Mapping[str, Any] | None = await _INSERT_RESERVATION.fetchrow(
            await driver_connection(self._conn),
            user_id=user_id,
            amount=amount,
            reference=reference,
            ttl=ttl,
        )
        assert row is not None
        return row

    async def get_reservation(
        self, reservation_id: uuid.UUID, owner_id: uuid.UUID | None, *, lock: bool = False
    ) -> RowMapping | None:
        """The reservation (within `owner_id`'s unless None); with `lock`, its
        account's row lock is taken too, in the same statement."""
        query = select(*credit_reservations.c).where(_reservations.id == reservation_id)
        if owner_id is not None:
            query = query.where(_reservations.user_id == owner_id)
        if lock:
            query = query.join(
                credit_accounts, _accounts.user_id == _reservations.user_id
            ).with_for_update(of=credit_accounts)
        return (await self._conn.execute(query)).mappings().first()

    async def resolve_reservation(
        self, reservation_id: uuid.UUID, status: str, settled_amount: int = 0
    ) -> Mapping[str, Any] | None:
        """Moves a pending, unexpired reservation to `status`; None when it is
        not pending (any more) or has expired. Run under the account's lock."""
        return await _RESOLVE.fetchrow(
            await driver_connection(self._conn),
            id=reservation_id,
            new_status=status,
            spent=settled_amount,
        )

    # -- expiry ------------------------------------------------------------------

    async def take_expiry_lock(self) -> bool:
        """The sweeper's transaction-scoped advisory lock; False when another
        sweeper (another worker or server) holds it."""
        query = select(func.pg_try_advisory_xact_lock(func.hashtext(EXPIRY_LOCK)))
        return bool((await self._conn.execute(query)).scalar_one())

    async def lock_accounts_with_lapsed(self, limit: int) -> list[uuid.UUID]:
        """Locks up to `limit` accounts that hold lapsed reservations, in
        user_id order (a single-account transaction cannot deadlock with it)."""
        due = select(_reservations.user_id).where(_pending_lapsed(func.now()))
        query = (
            select(_accounts.user_id)
            .where(_accounts.user_id.in_(due))
            .order_by(_accounts.user_id)
            .limit(limit)
            .with_for_update()
        )
        return list((await self._conn.execute(query)).scalars())

    async def expire_lapsed(self, user_id: uuid.UUID) -> list[RowMapping]:
        """Marks the account's lapsed reservations EXPIRED. Run under its lock."""
        statement = (
            credit_reservations.update()
            .where(_reservations.user_id == user_id, _pending_lapsed(func.now()))
            .values(status="EXPIRED", update_time=func.now())
            .returning(_reservations.id, _reservations.amount, _reservations.reference)
        )
        return list((await self._conn.execute(statement)).mappings())

    # -- reads -------------------------------------------------------------------

    async def entries_page(
        self, user_id: uuid.UUID, before_seq: int | None, limit: int
    ) -> list[RowMapping]:
        query: Select[Any] = select(*credit_entries.c).where(_entries.user_id == user_id)
        if before_seq is not None:
            query = query.where(_entries.seq < before_seq)
        query = query.order_by(_entries.seq.desc()).limit(limit)
        return list((await self._conn.execute(query)).mappings())

    async def rate(self, arena: str) -> RowMapping:
        """The arena's rate row, or the default one."""
        query = (
            select(*credit_rates.c)
            .where(credit_rates.c.arena.in_((arena, DEFAULT_ARENA)))
            .order_by((credit_rates.c.arena == DEFAULT_ARENA).asc())
            .limit(1)
        )
        return (await self._conn.execute(query)).mappings().one()

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
        return list((await self._conn.execute(query)).mappings())
