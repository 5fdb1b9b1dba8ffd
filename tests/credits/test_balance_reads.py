"""GetBalance is a coalesced point read: the calls that arrive while a query
is in flight are answered together by one query, whoever made them. Under a
storm of mixed callers each still sees only the balance it may see, and
exactly the calls that should fail do."""

import asyncio
import random
import uuid
from dataclasses import dataclass

import grpc
import pytest
from observatory.v1 import credit_pb2

from server.credits.repository import CreditRepository
from tests.credits.helpers import grant, reserve
from tests.helpers import Caller, error_details, new_caller

pytestmark = pytest.mark.asyncio

CALLS = 300
DENIED = "PERMISSION_DENIED"
INVALID = "INVALID_ARGUMENT"


@dataclass(frozen=True)
class Call:
    caller: Caller
    user_id: str  # the request's user_id ("" for the caller's own)
    # The (user_id, allocated, reserved) the answer must carry, or the status
    # code the call must fail with.
    expect: tuple[str, int, int] | str


async def outcome(stub, call: Call) -> tuple[str, int, int] | str:
    request = credit_pb2.GetBalanceRequest(user_id=call.user_id)
    try:
        got = await stub.GetBalance(request, metadata=call.caller.metadata)
    except grpc.aio.AioRpcError as error:
        details = error_details(error)
        assert details.info is not None and details.info.reason
        return error.code().name
    assert got.available == got.allocated - got.reserved - got.settled
    return got.user_id, got.allocated, got.reserved


async def test_a_storm_of_mixed_callers_sees_only_what_it_may(credit_stub, admin, monkeypatch):
    users = [new_caller() for _ in range(4)]
    balances: dict[Caller, tuple[str, int, int]] = {}
    for n, user in enumerate(users):
        await grant(credit_stub, admin, user, 100 * (n + 1))
        await reserve(credit_stub, user, n + 1)
        balances[user] = (str(user.user_id), 100 * (n + 1), n + 1)
    # An account never granted anything reads as zeros, for anyone allowed.
    never_granted = new_caller()
    zeros = (str(never_granted.user_id), 0, 0)

    rng = random.Random(12)
    calls: list[Call] = []
    while len(calls) < CALLS:
        stranger = str(uuid.uuid4())
        n = rng.randrange(len(users))
        user, other = users[n], users[(n + 1) % len(users)]
        calls += [
            Call(user, "", balances[user]),
            Call(user, str(user.user_id), balances[user]),
            Call(user, str(other.user_id), DENIED),
            Call(user, "not-a-uuid", INVALID),
            Call(never_granted, "", zeros),
            Call(admin, str(other.user_id), balances[other]),
            Call(admin, str(never_granted.user_id), zeros),
            Call(admin, stranger, (stranger, 0, 0)),
        ]
    rng.shuffle(calls)
    reads: list[list[uuid.UUID]] = []
    balances_of = CreditRepository.balances

    async def spy(repo, user_ids):
        reads.append(list(user_ids))
        return await balances_of(repo, user_ids)

    monkeypatch.setattr(CreditRepository, "balances", spy)

    outcomes = await asyncio.gather(*(outcome(credit_stub, call) for call in calls))

    wrong = [
        (call.caller.role, call.user_id, call.expect, got)
        for call, got in zip(calls, outcomes, strict=True)
        if got != call.expect
    ]
    assert not wrong
    # The reads were coalesced, and batches mixed the callers' accounts.
    queried = sum(not isinstance(call.expect, str) for call in calls)
    assert sum(len(keys) for keys in reads) <= queried
    # (How many share a query depends on the machine's speed: fewer than one
    # query per read, and batches that mix accounts, is what coalescing means.)
    assert len(reads) < queried
    assert any(len(set(keys)) > 1 for keys in reads)


async def test_a_balance_read_alone_is_answered_at_once(credit_stub, admin, alice):
    await grant(credit_stub, admin, alice, 5)
    request = credit_pb2.GetBalanceRequest()

    got = await asyncio.wait_for(credit_stub.GetBalance(request, metadata=alice.metadata), 5)

    assert (got.allocated, got.available) == (5, 5)
