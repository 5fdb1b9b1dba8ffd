"""Credit rules: two-phase spending over an append-only ledger. Each public
method is one unit of work.

Consistency: every change to an account first takes its balance row's lock
(`lock_account`), then reads the account in a fresh snapshot, checks the rule
and posts entries and balance deltas together. So an account's changes run one
after another (numbered by the entries' `seq`), while different accounts never
wait for each other. A reservation leaves PENDING at most once, by an UPDATE
conditional on `status = 'PENDING'` and on its expire_time not having passed.

`allocated` depends on the clock (grants have validity windows), so it is not
stored: it is summed from the account's allocations valid at the moment of
reading (an indexed per-user sum, independent of the ledger's length). The
balance row keeps the lifetime sums `granted`, `reserved` and `settled`, and a
pending reservation past its expire_time is subtracted from `reserved` on read
until the sweeper (`expire_lapsed`) writes its EXPIRE entry.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from google.protobuf.message import Message
from observatory.v1 import admin_pb2, credit_pb2
from sqlalchemy.ext.asyncio import AsyncConnection

from server import errors, idempotency, pagination
from server.audit import AuditRepository
from server.auth import ADMIN, Principal
from server.credits import convert
from server.credits.repository import CreditRepository, Entry
from server.db import Database
from server.protoconv import optional_uuid, parse_uuid, timestamp_field

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)
IdempotentRequest = (
    credit_pb2.GrantCreditsRequest
    | credit_pb2.ReserveCreditsRequest
    | credit_pb2.SettleReservationRequest
)

MAX_PAGE_SIZE = 200
MAX_TEXT = 1000
DEFAULT_TTL = timedelta(hours=1)
MAX_TTL = timedelta(days=7)
INT64_MAX = 2**63 - 1
# Accounts swept per transaction.
EXPIRY_BATCH = 100
# Who the audit log names for the sweeper's expiries.
SYSTEM = Principal(user_id=uuid.UUID(int=0), role=ADMIN)


def _account_of(caller: Principal, user_id: str) -> uuid.UUID:
    """The account a request is about: the caller's unless an admin names another."""
    target = optional_uuid(user_id, "user_id")
    if target is None or target == caller.user_id:
        return caller.user_id
    if not caller.is_admin:
        raise errors.PermissionDenied("only admins may use another user's credits")
    return target


def _sequence(value: object) -> int:
    """An entry number read back from a page token."""
    if not isinstance(value, int) or not 0 < value <= INT64_MAX:
        raise ValueError(value)
    return value


def _owner_scope(caller: Principal) -> uuid.UUID | None:
    return None if caller.is_admin else caller.user_id


def _positive(amount: int, field: str = "amount") -> int:
    if amount <= 0:
        raise errors.InvalidArgument(field, "must be a positive number of credits")
    return amount


def _text(value: str, field: str) -> str:
    if len(value) > MAX_TEXT:
        raise errors.InvalidArgument(field, f"must be at most {MAX_TEXT} characters")
    if "\x00" in value:
        raise errors.InvalidArgument(field, "must not contain NUL characters")
    return value


def _ttl(request: credit_pb2.ReserveCreditsRequest) -> timedelta:
    if not request.HasField("ttl"):
        return DEFAULT_TTL
    seconds, nanos = request.ttl.seconds, request.ttl.nanos
    if not -999_999_999 <= nanos <= 999_999_999 or seconds * nanos < 0:
        raise errors.InvalidArgument("ttl", "is not a valid duration")
    if seconds < 0 or (seconds == 0 and nanos <= 0):
        raise errors.InvalidArgument("ttl", "must be positive")
    ttl = timedelta(seconds=min(seconds, MAX_TTL.total_seconds() + 1), microseconds=nanos / 1000)
    if ttl > MAX_TTL:
        raise errors.InvalidArgument("ttl", "must be at most 7 days")
    return ttl


class CreditService:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def _once(
        self,
        caller: Principal,
        method: str,
        request: IdempotentRequest,
        response_type: type[M],
        work: Callable[[AsyncConnection], Awaitable[M]],
        *context: bytes,
    ) -> M:
        """Runs `work` in one transaction, once per request_id (AIP-155): the
        payload is the request without its request_id, plus `context`."""
        payload = type(request).FromString(request.SerializeToString())
        payload.ClearField("request_id")
        digest = idempotency.request_hash(method, payload, *context)
        async with self._db.write() as conn:
            return await idempotency.once(
                conn, caller, request.request_id, method, digest, response_type, lambda: work(conn)
            )

    async def grant(
        self, caller: Principal, request: credit_pb2.GrantCreditsRequest
    ) -> credit_pb2.Allocation:
        caller.require_admin()
        user_id = parse_uuid(request.user_id, "user_id")
        amount = _positive(request.amount)
        valid_from = timestamp_field(request, "valid_from")
        valid_until = timestamp_field(request, "valid_until")
        if valid_until is not None and valid_until <= (valid_from or datetime.now(UTC)):
            raise errors.InvalidArgument("valid_until", "must be later than valid_from")
        memo = _text(request.memo, "memo")

        async def work(conn: AsyncConnection) -> credit_pb2.Allocation:
            repo = CreditRepository(conn)
            await repo.ensure_account(user_id)
            await repo.lock_account(user_id)
            state = await repo.state(user_id)
            assert state is not None
            if state.granted > INT64_MAX - amount:
                raise errors.InvalidArgument("amount", "would overflow the account's 64-bit total")
            row = await repo.insert_allocation(
                {
                    "user_id": user_id,
                    "amount": amount,
                    "memo": memo,
                    "valid_from": valid_from or datetime.now(UTC),
                    "valid_until": valid_until,
                }
            )
            entry = Entry("GRANT", amount, allocation_id=row["id"], reference=memo)
            await repo.post(user_id, [entry], granted=amount)
            await AuditRepository(conn).record(
                caller, "credits.grant", f"allocations/{row['id']}", _detail(user_id, amount)
            )
            return convert.allocation(row)

        return await self._once(caller, "GrantCredits", request, credit_pb2.Allocation, work)

    async def balance(
        self, caller: Principal, request: credit_pb2.GetBalanceRequest
    ) -> credit_pb2.Balance:
        user_id = _account_of(caller, request.user_id)
        async with self._db.read() as conn:
            state = await CreditRepository(conn).state(user_id)
        return convert.balance(str(user_id), state, datetime.now(UTC))

    async def reserve(
        self, caller: Principal, request: credit_pb2.ReserveCreditsRequest
    ) -> credit_pb2.Reservation:
        user_id = _account_of(caller, request.user_id)
        amount = _positive(request.amount)
        reference = _text(request.reference, "reference")
        ttl = _ttl(request)

        async def work(conn: AsyncConnection) -> credit_pb2.Reservation:
            repo = CreditRepository(conn)
            state = await repo.state(user_id) if await repo.lock_account(user_id) else None
            available = 0 if state is None else state.available
            if available < amount:
                raise errors.FailedPrecondition(
                    f"{amount} credits asked for, {available} available",
                    reason="INSUFFICIENT_CREDITS",
                    metadata={"available": str(available), "requested": str(amount)},
                )
            row = await repo.insert_reservation(user_id, amount, reference, ttl)
            entry = Entry("RESERVE", amount, reservation_id=row["id"], reference=reference)
            await repo.post(user_id, [entry], reserved=amount)
            await AuditRepository(conn).record(
                caller, "credits.reserve", f"reservations/{row['id']}", _detail(user_id, amount)
            )
            return convert.reservation(row)

        return await self._once(
            caller, "ReserveCredits", request, credit_pb2.Reservation, work, user_id.bytes
        )

    async def settle(
        self, caller: Principal, request: credit_pb2.SettleReservationRequest
    ) -> credit_pb2.Reservation:
        reservation_id = parse_uuid(request.reservation_id, "reservation_id")
        if request.amount < 0:
            raise errors.InvalidArgument("amount", "must not be negative")
        spent = request.amount

        async def work(conn: AsyncConnection) -> credit_pb2.Reservation:
            return await _resolve(conn, caller, reservation_id, spent)

        return await self._once(caller, "SettleReservation", request, credit_pb2.Reservation, work)

    async def release(
        self, caller: Principal, request: credit_pb2.ReleaseReservationRequest
    ) -> credit_pb2.Reservation:
        reservation_id = parse_uuid(request.reservation_id, "reservation_id")
        async with self._db.write() as conn:
            return await _resolve(conn, caller, reservation_id, None)

    async def list_transactions(
        self, caller: Principal, request: credit_pb2.ListTransactionsRequest
    ) -> credit_pb2.ListTransactionsResponse:
        user_id = _account_of(caller, request.user_id)
        size = pagination.page_size(request.page_size, maximum=MAX_PAGE_SIZE)
        token_query = pagination.fingerprint("ListTransactions", str(user_id))
        after = pagination.decode_token(request.page_token, token_query, _sequence)
        async with self._db.read() as conn:
            rows = await CreditRepository(conn).entries_page(
                user_id, None if after is None else after[0], size + 1
            )
        response = credit_pb2.ListTransactionsResponse()
        for row in rows[:size]:
            convert.transaction(row, response.transactions.add())
        response.next_page_token = pagination.next_page_token(
            rows, size, token_query, lambda row: (row["seq"],)
        )
        return response

    async def estimate_cost(
        self, caller: Principal, request: credit_pb2.EstimateCostRequest
    ) -> credit_pb2.EstimateCostResponse:
        arena = _text(request.arena, "arena")
        if request.expected_records < 0:
            raise errors.InvalidArgument("expected_records", "must not be negative")
        async with self._db.read() as conn:
            rate = await CreditRepository(conn).rate(arena)
        per_thousand = int(rate["credits_per_thousand"])
        credits = -(-request.expected_records * per_thousand // 1000)
        if credits > INT64_MAX:
            raise errors.InvalidArgument("expected_records", "is too large to price")
        return credit_pb2.EstimateCostResponse(
            credits=credits, credits_per_thousand=per_thousand, rate_arena=rate["arena"]
        )

    async def expire_lapsed(self) -> int:
        """Releases pending reservations past their expire_time with an EXPIRE
        entry each; returns how many. One sweeper at a time runs (an advisory
        lock; others skip their turn), a batch of accounts per transaction."""
        expired = 0
        while True:
            async with self._db.write() as conn:
                repo = CreditRepository(conn)
                if not await repo.take_expiry_lock():
                    return expired
                accounts = await repo.lock_accounts_with_lapsed(EXPIRY_BATCH)
                for user_id in accounts:
                    expired += await _expire_account(conn, repo, user_id)
            if len(accounts) < EXPIRY_BATCH:
                return expired


async def _expire_account(conn: AsyncConnection, repo: CreditRepository, user_id: uuid.UUID) -> int:
    rows = await repo.expire_lapsed(user_id)
    if not rows:
        return 0
    entries = [
        Entry("EXPIRE", row["amount"], reservation_id=row["id"], reference=row["reference"])
        for row in rows
    ]
    await repo.post(user_id, entries, reserved=-sum(entry.amount for entry in entries))
    audit = AuditRepository(conn)
    for row in rows:
        await audit.record(
            SYSTEM, "credits.expire", f"reservations/{row['id']}", _detail(user_id, row["amount"])
        )
    return len(rows)


async def _resolve(
    conn: AsyncConnection, caller: Principal, reservation_id: uuid.UUID, spent: int | None
) -> credit_pb2.Reservation:
    """Settles `spent` credits of a pending reservation (the rest returns), or
    releases it whole when `spent` is None."""
    repo = CreditRepository(conn)
    found = await repo.get_reservation(reservation_id, _owner_scope(caller), lock=True)
    if found is None:
        raise errors.NotFound(f"reservation {reservation_id} not found")
    user_id, held = found["user_id"], found["amount"]
    if spent is not None and spent > held:
        raise errors.FailedPrecondition(
            f"cannot settle {spent} credits of a reservation of {held}",
            reason="SETTLE_EXCEEDS_RESERVED",
            metadata={"reserved": str(held), "requested": str(spent)},
        )
    status = "RELEASED" if spent is None else "SETTLED"
    row = await repo.resolve_reservation(reservation_id, status, spent or 0)
    if row is None:
        current = await repo.get_reservation(reservation_id, None)
        assert current is not None
        shown = convert.reservation(current).status
        raise errors.FailedPrecondition(
            f"reservation {reservation_id} is not pending",
            reason="RESERVATION_NOT_PENDING",
            metadata={"status": credit_pb2.ReservationStatus.Name(shown)},
        )
    reference, used = row["reference"], spent or 0
    entries = []
    if spent is not None:
        entries.append(Entry("SETTLE", used, reservation_id=reservation_id, reference=reference))
    if held > used:
        entries.append(
            Entry("RELEASE", held - used, reservation_id=reservation_id, reference=reference)
        )
    await repo.post(user_id, entries, reserved=-held, settled=used)
    action = "credits.release" if spent is None else "credits.settle"
    await AuditRepository(conn).record(
        caller, action, f"reservations/{reservation_id}", _detail(user_id, used)
    )
    return convert.reservation(row)


def _detail(user_id: uuid.UUID, amount: int) -> dict[str, object]:
    return {"user_id": str(user_id), "amount": amount}


async def verify_ledger(
    db: Database, request: admin_pb2.VerifyLedgerRequest
) -> admin_pb2.VerifyLedgerResponse:
    """Recomputes each account (or one) from its entries; reports every
    account whose balance row, or whose pending reservations, disagree."""
    user_id = optional_uuid(request.user_id, "user_id")
    async with db.read() as conn:
        rows = await CreditRepository(conn).recompute(user_id)
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
