"""The ledger under a storm: several OS processes, each with its own channel
and many calls in flight, reserving, settling and releasing on one account
with a limited grant for a few seconds. Nothing may overdraw it."""

import asyncio
import random
import time
import uuid
from collections import Counter

import grpc
import pytest
from observatory.v1 import credit_pb2, credit_pb2_grpc

from tests.credits.helpers import balance, grant, verify
from tests.helpers import in_processes, new_caller

pytestmark = pytest.mark.asyncio
PROCESSES = 4
CALLS_IN_FLIGHT = 8  # per process
STORM_SECONDS = 3.0
# A slow machine may not exhaust the grant in STORM_SECONDS: each process then
# goes on until it has been refused once, for at most this long.
STORM_MAX_SECONDS = 30.0
GRANTED = 2_000


def storm(port: int, token: str, seed: int, seconds: float) -> dict[str, int]:
    """Runs in a child process: reserve, then settle part, release, or keep the
    hold, until `seconds` have passed and a reservation has been refused for
    want of credits (or STORM_MAX_SECONDS). Returns the outcomes by kind."""

    async def run() -> dict[str, int]:
        metadata = (("authorization", f"Bearer {token}"),)
        outcomes: Counter[str] = Counter()
        rng = random.Random(seed)
        started = time.monotonic()

        def storming() -> bool:
            elapsed = time.monotonic() - started
            refused = outcomes["reserve FAILED_PRECONDITION"] > 0
            return elapsed < seconds or (not refused and elapsed < STORM_MAX_SECONDS)

        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = credit_pb2_grpc.CreditServiceStub(channel)

            async def call(kind: str, method, request) -> credit_pb2.Reservation | None:
                try:
                    reply = await method(request, metadata=metadata, timeout=60)
                except grpc.aio.AioRpcError as error:
                    outcomes[f"{kind} {error.code().name}"] += 1
                    return None
                outcomes[f"{kind} OK"] += 1
                return reply

            async def client() -> None:
                while storming():
                    amount = rng.randint(1, 40)
                    request = credit_pb2.ReserveCreditsRequest(
                        amount=amount, request_id=str(uuid.uuid4())
                    )
                    held = await call("reserve", stub.ReserveCredits, request)
                    if held is None:
                        continue
                    outcomes["reserved credits"] += amount
                    choice = rng.random()
                    if choice < 0.5:
                        spent = rng.randint(0, amount)
                        settle = credit_pb2.SettleReservationRequest(
                            reservation_id=held.id, amount=spent, request_id=str(uuid.uuid4())
                        )
                        if await call("settle", stub.SettleReservation, settle) is not None:
                            outcomes["settled credits"] += spent
                    elif choice < 0.8:
                        release = credit_pb2.ReleaseReservationRequest(reservation_id=held.id)
                        await call("release", stub.ReleaseReservation, release)

            await asyncio.gather(*(client() for _ in range(CALLS_IN_FLIGHT)))
        return dict(outcomes)

    return asyncio.run(run())


async def test_a_storm_of_reserves_never_overdraws_the_account(
    app, credit_stub, admin_stub, admin, db
):
    caller = new_caller()
    await grant(credit_stub, admin, caller, GRANTED)
    calls = [(app.port, caller.token, seed, STORM_SECONDS) for seed in range(PROCESSES)]
    work = asyncio.ensure_future(in_processes(storm, calls))
    # VerifyLedger reads in one snapshot: consistent even mid-storm.
    while not work.done():
        report = await verify(admin_stub, admin, caller)
        assert not report.mismatches
        await asyncio.sleep(0.3)
    results = await work
    outcomes: Counter[str] = Counter()
    for result in results:
        outcomes.update(result)

    unexpected = {
        key: n
        for key, n in outcomes.items()
        if key.split()[-1] not in {"OK", "FAILED_PRECONDITION", "credits"}
    }
    assert not unexpected
    assert outcomes["reserve OK"] > 0
    assert outcomes["reserve FAILED_PRECONDITION"] > 0, "the grant was never exhausted"
    # Settles and releases only ever touch holds their own client made.
    assert outcomes["settle FAILED_PRECONDITION"] == outcomes["release FAILED_PRECONDITION"] == 0

    entries = await db.fetch(
        "SELECT seq, kind, amount FROM credit_entries WHERE user_id = $1 ORDER BY seq",
        caller.user_id,
    )
    assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))
    granted = reserved = settled = 0
    for entry in entries:
        kind, amount = entry["kind"], entry["amount"]
        if kind == "GRANT":
            granted += amount
        elif kind == "RESERVE":
            reserved += amount
        elif kind == "SETTLE":
            reserved -= amount
            settled += amount
        else:
            reserved -= amount
        assert reserved >= 0 and reserved + settled <= granted, f"overdraft at seq {entry['seq']}"

    kinds = Counter(entry["kind"] for entry in entries)
    assert kinds["RESERVE"] == outcomes["reserve OK"]
    assert kinds["SETTLE"] == outcomes["settle OK"]
    final = await balance(credit_stub, caller)
    assert (final.reserved, final.settled) == (reserved, settled)
    assert settled == outcomes["settled credits"]
    assert final.reserved + final.settled <= GRANTED
    assert final.available == GRANTED - reserved - settled
    pending = await db.fetchval(
        "SELECT coalesce(sum(amount), 0) FROM credit_reservations "
        "WHERE user_id = $1 AND status = 'PENDING'",
        caller.user_id,
    )
    assert pending == reserved
    report = await verify(admin_stub, admin)
    assert report.accounts_checked >= 1
    assert not report.mismatches
