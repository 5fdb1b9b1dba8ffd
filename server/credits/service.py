"""Credit rules: two-phase spending over an append-only ledger, inside the
unit of work the servicer hands in.

The ledger's own rules (never overdraw, a reservation leaves PENDING at most
once and not after its expire_time, entries and balance rows in step, one
audit entry and one stored answer per mutation) live in the server-side
functions the repository calls, each one statement under the account's row
lock (see migration 0006 and server/credits/repository.py). The service adds
who may act on which account.

`allocated` depends on the clock (grants have validity windows), so it is not
stored: it is summed from the account's allocations valid at the moment of
reading. The balance row keeps the lifetime sums `granted`, `reserved` and
`settled`; a pending reservation past its expire_time is subtracted from
`reserved` on read until the sweeper writes its EXPIRE entry.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import asyncpg
from observatory.v1 import admin_pb2, credit_pb2

from server import errors, pagination
from server.audit import current_request_id
from server.auth import ADMIN, Principal
from server.coalesce import PointReads
from server.credits import convert
from server.credits.repository import AccountState, CreditRepository, RequestKey
from server.uow import Database, UnitOfWork

MAX_PAGE_SIZE = 200
INT64_MAX = 2**63 - 1
# Accounts swept per transaction.
EXPIRY_BATCH = 100
# Who the audit log names for the sweeper's expiries.
SYSTEM = Principal(user_id=uuid.UUID(int=0), role=ADMIN)


def _check_account(caller: Principal, user_id: uuid.UUID) -> uuid.UUID:
    """A user acts on their own account; an admin on anyone's."""
    if user_id != caller.user_id and not caller.is_admin:
        raise errors.PermissionDenied("only admins may use another user's credits")
    return user_id


def _sequence(value: object) -> int:
    """An entry number read back from a page token."""
    if not isinstance(value, int) or not 0 < value <= INT64_MAX:
        raise ValueError(value)
    return value


def _audit_request_id() -> str | None:
    return current_request_id.get() or None


async def _fetch_balances(uow: UnitOfWork, user_ids: Sequence[uuid.UUID]) -> list[asyncpg.Record]:
    return await CreditRepository(uow).balances(user_ids)


def _user_of(row: asyncpg.Record) -> uuid.UUID:
    user_id: uuid.UUID = row["user_id"]
    return user_id


class CreditService:
    def __init__(self, units: Database) -> None:
        self._balances = PointReads(units, _fetch_balances, _user_of)

    async def grant(
        self,
        uow: UnitOfWork,
        caller: Principal,
        key: RequestKey | None,
        *,
        user_id: uuid.UUID,
        amount: int,
        memo: str,
        valid_from: datetime,
        valid_until: datetime | None,
    ) -> credit_pb2.Allocation:
        caller.require_admin()
        row = await CreditRepository(uow).grant(
            caller.user_id,
            key,
            _audit_request_id(),
            user_id=user_id,
            amount=amount,
            memo=memo,
            valid_from=valid_from,
            valid_until=valid_until,
        )
        return convert.allocation(row)

    async def balance(self, caller: Principal, user_id: uuid.UUID) -> credit_pb2.Balance:
        """Coalesced with the other balance reads in flight (no unit of its
        own: the batch has one). An account never granted anything reads as
        zeros."""
        row = await self._balances.get(_check_account(caller, user_id))
        state = None if row is None else AccountState.of(row)
        return convert.balance(str(user_id), state, datetime.now(UTC))

    async def reserve(
        self,
        uow: UnitOfWork,
        caller: Principal,
        key: RequestKey | None,
        *,
        user_id: uuid.UUID,
        amount: int,
        reference: str,
        ttl: timedelta,
    ) -> credit_pb2.Reservation:
        row = await CreditRepository(uow).reserve(
            caller.user_id,
            key,
            _audit_request_id(),
            user_id=_check_account(caller, user_id),
            amount=amount,
            reference=reference,
            ttl=ttl,
        )
        return convert.reservation(row)

    async def settle(
        self,
        uow: UnitOfWork,
        caller: Principal,
        key: RequestKey | None,
        reservation_id: uuid.UUID,
        spent: int,
    ) -> credit_pb2.Reservation:
        """Spends `spent` credits of a pending reservation; the rest returns."""
        return await self._resolve(uow, caller, key, reservation_id, spent)

    async def release(
        self, uow: UnitOfWork, caller: Principal, reservation_id: uuid.UUID
    ) -> credit_pb2.Reservation:
        """Returns a pending reservation's credits whole."""
        return await self._resolve(uow, caller, None, reservation_id, None)

    async def _resolve(
        self,
        uow: UnitOfWork,
        caller: Principal,
        key: RequestKey | None,
        reservation_id: uuid.UUID,
        spent: int | None,
    ) -> credit_pb2.Reservation:
        # Another user's reservation is NOT_FOUND, as if it did not exist.
        row = await CreditRepository(uow).resolve(
            caller.user_id,
            key,
            _audit_request_id(),
            owner_id=None if caller.is_admin else caller.user_id,
            reservation_id=reservation_id,
            spent=spent,
        )
        return convert.reservation(row)

    async def list_transactions(
        self, uow: UnitOfWork, caller: Principal, user_id: uuid.UUID, size: int, page_token: str
    ) -> credit_pb2.ListTransactionsResponse:
        _check_account(caller, user_id)
        token_query = pagination.fingerprint("ListTransactions", str(user_id))
        after = pagination.decode_token(page_token, token_query, _sequence)
        before_seq = INT64_MAX if after is None else after[0]
        rows = await CreditRepository(uow).entries_page(user_id, before_seq, size + 1)
        response = credit_pb2.ListTransactionsResponse()
        for row in rows[:size]:
            convert.transaction(row, response.transactions.add())
        response.next_page_token = pagination.next_page_token(
            rows, size, token_query, lambda row: (row["seq"],)
        )
        return response

    async def estimate_cost(
        self, uow: UnitOfWork, arena: str, expected_records: int
    ) -> credit_pb2.EstimateCostResponse:
        rate = await CreditRepository(uow).rate(arena)
        per_thousand = int(rate["credits_per_thousand"])
        credits = -(-expected_records * per_thousand // 1000)
        if credits > INT64_MAX:
            raise errors.InvalidArgument("expected_records", "is too large to price")
        return credit_pb2.EstimateCostResponse(
            credits=credits, credits_per_thousand=per_thousand, rate_arena=rate["arena"]
        )

    async def expire_lapsed(self, uow: UnitOfWork) -> tuple[int, int]:
        """One sweep of up to EXPIRY_BATCH accounts: their pending
        reservations past expire_time become EXPIRED, each with an EXPIRE
        entry. Returns (accounts swept, reservations expired); fewer than
        EXPIRY_BATCH accounts means nothing is left, or that another sweeper
        (another worker or server) is at work."""
        return await CreditRepository(uow).expire_lapsed(EXPIRY_BATCH, SYSTEM.user_id)

    async def verify_ledger(
        self, uow: UnitOfWork, user_id: uuid.UUID | None
    ) -> admin_pb2.VerifyLedgerResponse:
        """Recomputes each account (or one) from its entries; reports every
        account whose balance row, or whose pending reservations, disagree."""
        rows = await CreditRepository(uow).recompute(user_id)
        response = admin_pb2.VerifyLedgerResponse(accounts_checked=len(rows))
        for row in rows:
            consistent = (
                row["recorded_granted"] == row["derived_granted"]
                and row["recorded_reserved"] == row["derived_reserved"] == row["pending_reserved"]
                and row["recorded_settled"] == row["derived_settled"]
                and row["recorded_entries"] == row["derived_entries"] == row["max_seq"]
            )
            if not consistent:
                response.mismatches.add(
                    user_id=str(row["user_id"]),
                    **{name: int(row[name]) for name in _MISMATCH_FIELDS},
                )
        return response


_MISMATCH_FIELDS = (
    "recorded_granted",
    "derived_granted",
    "recorded_reserved",
    "derived_reserved",
    "recorded_settled",
    "derived_settled",
    "pending_reserved",
    "recorded_entries",
    "derived_entries",
)
