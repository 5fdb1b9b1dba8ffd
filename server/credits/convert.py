"""Rows of the credit tables as protos."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from observatory.v1 import credit_pb2

from server.credits.repository import AccountState
from server.protoconv import set_timestamp

_STATUS = {
    "PENDING": credit_pb2.RESERVATION_STATUS_PENDING,
    "SETTLED": credit_pb2.RESERVATION_STATUS_SETTLED,
    "RELEASED": credit_pb2.RESERVATION_STATUS_RELEASED,
    "EXPIRED": credit_pb2.RESERVATION_STATUS_EXPIRED,
}
_KIND = {
    "GRANT": credit_pb2.TRANSACTION_KIND_GRANT,
    "RESERVE": credit_pb2.TRANSACTION_KIND_RESERVE,
    "SETTLE": credit_pb2.TRANSACTION_KIND_SETTLE,
    "RELEASE": credit_pb2.TRANSACTION_KIND_RELEASE,
    "EXPIRE": credit_pb2.TRANSACTION_KIND_EXPIRE,
}


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def allocation(row: Mapping[Any, Any]) -> credit_pb2.Allocation:
    message = credit_pb2.Allocation(
        id=str(row["id"]), user_id=str(row["user_id"]), amount=row["amount"], memo=row["memo"]
    )
    set_timestamp(message.valid_from, row["valid_from"])
    if row["valid_until"] is not None:
        set_timestamp(message.valid_until, row["valid_until"])
    set_timestamp(message.create_time, row["create_time"])
    return message


def reservation(row: Mapping[Any, Any]) -> credit_pb2.Reservation:
    """A reservation as a mutation answered it (and answers a retry): the
    status it had then."""
    message = credit_pb2.Reservation(
        id=str(row["id"]),
        user_id=str(row["user_id"]),
        amount=row["amount"],
        settled_amount=row["settled_amount"],
        status=_STATUS[row["status"]],
        reference=row["reference"],
    )
    set_timestamp(message.expire_time, row["expire_time"])
    set_timestamp(message.create_time, row["create_time"])
    set_timestamp(message.update_time, row["update_time"])
    return message


def balance(user_id: str, state: AccountState | None, as_of: datetime) -> credit_pb2.Balance:
    message = credit_pb2.Balance(user_id=user_id)
    if state is not None:
        message.granted = state.granted
        message.allocated = state.allocated
        message.reserved = state.held
        message.settled = state.settled
        message.available = state.available
        as_of = state.as_of
    set_timestamp(message.as_of, as_of)
    return message


def transaction(row: Mapping[Any, Any], target: credit_pb2.Transaction) -> None:
    target.id = str(row["id"])
    target.user_id = str(row["user_id"])
    target.kind = _KIND[row["kind"]]
    target.amount = row["amount"]
    target.reservation_id = _text(row["reservation_id"])
    target.allocation_id = _text(row["allocation_id"])
    target.reference = row["reference"]
    target.sequence = row["seq"]
    set_timestamp(target.create_time, row["create_time"])
