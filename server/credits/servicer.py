"""CreditService over gRPC: checks each request's shape, opens the RPC's unit
of work, calls the service.

A credit mutation is one statement (a server-side function; see
server/credits/repository.py), which without a surrounding transaction is its
own transaction: so mutations run on a `driver_autocommit()` unit and pay no
BEGIN/COMMIT round trips. Reads are one statement each (`read()`); GetBalance
is coalesced with the balance reads in flight and has the batch's unit.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from observatory.v1 import credit_pb2, credit_pb2_grpc

from server import errors, idempotency, pagination
from server.auth import principal
from server.credits.repository import RequestKey
from server.credits.service import MAX_PAGE_SIZE, CreditService
from server.ops import metrics
from server.protoconv import optional_uuid, parse_uuid, timestamp_field
from server.uow import Database

Context = grpc.aio.ServicerContext[Any, Any]

IdempotentRequest = (
    credit_pb2.GrantCreditsRequest
    | credit_pb2.ReserveCreditsRequest
    | credit_pb2.SettleReservationRequest
)

MAX_TEXT = 1000
DEFAULT_TTL = timedelta(hours=1)
MAX_TTL = timedelta(days=7)


def _request_key(method: str, request: IdempotentRequest, *context: bytes) -> RequestKey | None:
    """The request's AIP-155 key: its request_id and a digest of the rest of
    it (plus `context`); None without a request_id."""
    if not request.request_id:
        return None
    key = parse_uuid(request.request_id, "request_id")
    payload = type(request).FromString(request.SerializeToString())
    payload.ClearField("request_id")
    return RequestKey(key, idempotency.request_hash(method, payload, *context))


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


class CreditServicer(credit_pb2_grpc.CreditServiceServicer):
    def __init__(self, service: CreditService, db: Database) -> None:
        self._service = service
        self._db = db

    async def GrantCredits(
        self, request: credit_pb2.GrantCreditsRequest, context: Context
    ) -> credit_pb2.Allocation:
        caller = principal()
        user_id = parse_uuid(request.user_id, "user_id")
        amount = _positive(request.amount)
        valid_from = timestamp_field(request, "valid_from") or datetime.now(UTC)
        valid_until = timestamp_field(request, "valid_until")
        if valid_until is not None and valid_until <= valid_from:
            raise errors.InvalidArgument("valid_until", "must be later than valid_from")
        memo = _text(request.memo, "memo")
        key = _request_key("GrantCredits", request)
        async with self._db.driver_autocommit() as uow:
            allocation = await self._service.grant(
                uow,
                caller,
                key,
                user_id=user_id,
                amount=amount,
                memo=memo,
                valid_from=valid_from,
                valid_until=valid_until,
            )
        metrics.CREDITS_GRANTED.inc(allocation.amount)
        return allocation

    async def GetBalance(
        self, request: credit_pb2.GetBalanceRequest, context: Context
    ) -> credit_pb2.Balance:
        caller = principal()
        user_id = optional_uuid(request.user_id, "user_id") or caller.user_id
        return await self._service.balance(caller, user_id)

    async def ReserveCredits(
        self, request: credit_pb2.ReserveCreditsRequest, context: Context
    ) -> credit_pb2.Reservation:
        caller = principal()
        user_id = optional_uuid(request.user_id, "user_id") or caller.user_id
        amount = _positive(request.amount)
        reference = _text(request.reference, "reference")
        ttl = _ttl(request)
        key = _request_key("ReserveCredits", request, user_id.bytes)
        async with self._db.driver_autocommit() as uow:
            reservation = await self._service.reserve(
                uow, caller, key, user_id=user_id, amount=amount, reference=reference, ttl=ttl
            )
        metrics.CREDITS_RESERVED.inc(reservation.amount)
        return reservation

    async def SettleReservation(
        self, request: credit_pb2.SettleReservationRequest, context: Context
    ) -> credit_pb2.Reservation:
        caller = principal()
        reservation_id = parse_uuid(request.reservation_id, "reservation_id")
        if request.amount < 0:
            raise errors.InvalidArgument("amount", "must not be negative")
        key = _request_key("SettleReservation", request)
        async with self._db.driver_autocommit() as uow:
            reservation = await self._service.settle(
                uow, caller, key, reservation_id, request.amount
            )
        metrics.CREDITS_SETTLED.inc(reservation.settled_amount)
        metrics.CREDITS_RELEASED.inc(reservation.amount - reservation.settled_amount)
        return reservation

    async def ReleaseReservation(
        self, request: credit_pb2.ReleaseReservationRequest, context: Context
    ) -> credit_pb2.Reservation:
        caller = principal()
        reservation_id = parse_uuid(request.reservation_id, "reservation_id")
        async with self._db.driver_autocommit() as uow:
            reservation = await self._service.release(uow, caller, reservation_id)
        metrics.CREDITS_RELEASED.inc(reservation.amount)
        return reservation

    async def ListTransactions(
        self, request: credit_pb2.ListTransactionsRequest, context: Context
    ) -> credit_pb2.ListTransactionsResponse:
        caller = principal()
        user_id = optional_uuid(request.user_id, "user_id") or caller.user_id
        size = pagination.page_size(request.page_size, maximum=MAX_PAGE_SIZE)
        async with self._db.read() as uow:
            return await self._service.list_transactions(
                uow, caller, user_id, size, request.page_token
            )

    async def EstimateCost(
        self, request: credit_pb2.EstimateCostRequest, context: Context
    ) -> credit_pb2.EstimateCostResponse:
        arena = _text(request.arena, "arena")
        if request.expected_records < 0:
            raise errors.InvalidArgument("expected_records", "must not be negative")
        async with self._db.read() as uow:
            return await self._service.estimate_cost(uow, arena, request.expected_records)
