"""Helpers for the credit tests: grants, reservations and balances in one line."""

from __future__ import annotations

import uuid
from datetime import datetime

from observatory.v1 import admin_pb2, credit_pb2

from tests.helpers import Caller, timestamp


async def grant(
    stub,
    admin: Caller,
    user: Caller,
    amount: int,
    *,
    valid_from: datetime | None = None,
    valid_until: datetime | None = None,
    request_id: str = "",
    memo: str = "",
) -> credit_pb2.Allocation:
    request = credit_pb2.GrantCreditsRequest(
        user_id=str(user.user_id), amount=amount, memo=memo, request_id=request_id
    )
    if valid_from is not None:
        request.valid_from.CopyFrom(timestamp(valid_from))
    if valid_until is not None:
        request.valid_until.CopyFrom(timestamp(valid_until))
    return await stub.GrantCredits(request, metadata=admin.metadata)


async def reserve(
    stub, caller: Caller, amount: int, *, ttl_s: float | None = None, **fields
) -> credit_pb2.Reservation:
    request = credit_pb2.ReserveCreditsRequest(amount=amount, **fields)
    if ttl_s is not None:
        request.ttl.FromMilliseconds(int(ttl_s * 1000))
    return await stub.ReserveCredits(request, metadata=caller.metadata)


async def settle(
    stub, caller: Caller, reservation_id: str, amount: int, request_id: str = ""
) -> credit_pb2.Reservation:
    request = credit_pb2.SettleReservationRequest(
        reservation_id=reservation_id, amount=amount, request_id=request_id
    )
    return await stub.SettleReservation(request, metadata=caller.metadata)


async def release(stub, caller: Caller, reservation_id: str) -> credit_pb2.Reservation:
    request = credit_pb2.ReleaseReservationRequest(reservation_id=reservation_id)
    return await stub.ReleaseReservation(request, metadata=caller.metadata)


async def balance(stub, caller: Caller, user: Caller | None = None) -> credit_pb2.Balance:
    request = credit_pb2.GetBalanceRequest(user_id=str(user.user_id) if user else "")
    return await stub.GetBalance(request, metadata=caller.metadata)


def sums(b: credit_pb2.Balance) -> tuple[int, int, int, int]:
    return b.allocated, b.reserved, b.settled, b.available


async def transactions(stub, caller: Caller, page_size: int = 200) -> list[credit_pb2.Transaction]:
    request = credit_pb2.ListTransactionsRequest(page_size=page_size)
    return list((await stub.ListTransactions(request, metadata=caller.metadata)).transactions)


def kinds(entries: list[credit_pb2.Transaction]) -> list[tuple[str, int]]:
    """(kind, amount) oldest first."""
    return [
        (credit_pb2.TransactionKind.Name(e.kind).removeprefix("TRANSACTION_KIND_"), e.amount)
        for e in reversed(entries)
    ]


async def verify(admin_stub, admin: Caller, user: Caller | uuid.UUID | None = None):
    user_id = user.user_id if isinstance(user, Caller) else user
    request = admin_pb2.VerifyLedgerRequest(user_id=str(user_id) if user_id else "")
    return await admin_stub.VerifyLedger(request, metadata=admin.metadata)
