"""CreditService: the arithmetic of every transition, each error reason,
idempotent retries, access rules, listing, estimates and VerifyLedger."""

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from observatory.v1 import credit_pb2

from tests.credits.helpers import (
    balance,
    grant,
    kinds,
    release,
    reserve,
    settle,
    sums,
    transactions,
    verify,
)
from tests.helpers import expect_rpc_error, new_caller

pytestmark = pytest.mark.asyncio

INVALID = grpc.StatusCode.INVALID_ARGUMENT
FAILED = grpc.StatusCode.FAILED_PRECONDITION
DENIED = grpc.StatusCode.PERMISSION_DENIED
NOT_FOUND = grpc.StatusCode.NOT_FOUND
PENDING = credit_pb2.RESERVATION_STATUS_PENDING
SETTLED = credit_pb2.RESERVATION_STATUS_SETTLED
RELEASED = credit_pb2.RESERVATION_STATUS_RELEASED
EXPIRED = credit_pb2.RESERVATION_STATUS_EXPIRED


class TestGrantCredits:
    async def test_grant_makes_credits_available(self, credit_stub, admin, alice):
        allocation = await grant(credit_stub, admin, alice, 100, memo="welcome")

        assert allocation.user_id == str(alice.user_id)
        assert (allocation.amount, allocation.memo) == (100, "welcome")
        assert not allocation.HasField("valid_until")
        assert sums(await balance(credit_stub, alice)) == (100, 0, 0, 100)

    async def test_only_admins_grant(self, credit_stub, alice):
        error = await expect_rpc_error(grant(credit_stub, alice, alice, 100))
        assert error.code == DENIED

    @pytest.mark.parametrize("amount", [0, -5])
    async def test_amount_must_be_positive(self, credit_stub, admin, alice, amount):
        error = await expect_rpc_error(grant(credit_stub, admin, alice, amount))
        assert (error.code, error.fields) == (INVALID, ["amount"])

    async def test_a_grant_that_would_overflow_the_total_is_invalid(
        self, credit_stub, admin, alice
    ):
        await grant(credit_stub, admin, alice, 2**63 - 1)
        error = await expect_rpc_error(grant(credit_stub, admin, alice, 1))
        assert (error.code, error.fields) == (INVALID, ["amount"])
        assert sums(await balance(credit_stub, alice)) == (2**63 - 1, 0, 0, 2**63 - 1)

    async def test_valid_until_must_follow_valid_from(self, credit_stub, admin, alice):
        start = datetime.now(UTC) + timedelta(days=1)
        error = await expect_rpc_error(
            grant(credit_stub, admin, alice, 5, valid_from=start, valid_until=start)
        )
        assert (error.code, error.fields) == (INVALID, ["valid_until"])

    async def test_user_id_is_required(self, credit_stub, admin):
        request = credit_pb2.GrantCreditsRequest(amount=5)
        error = await expect_rpc_error(credit_stub.GrantCredits(request, metadata=admin.metadata))
        assert (error.code, error.fields) == (INVALID, ["user_id"])

    async def test_only_grants_valid_now_are_allocated(self, credit_stub, admin, alice):
        now = datetime.now(UTC)
        await grant(credit_stub, admin, alice, 10)
        await grant(credit_stub, admin, alice, 20, valid_from=now + timedelta(days=1))
        await grant(
            credit_stub,
            admin,
            alice,
            40,
            valid_from=now - timedelta(days=2),
            valid_until=now - timedelta(days=1),
        )
        await grant(credit_stub, admin, alice, 80, valid_until=now + timedelta(days=1))

        got = await balance(credit_stub, alice)
        assert sums(got) == (90, 0, 0, 90)
        assert got.granted == 150

    async def test_available_never_goes_below_zero_when_a_spent_grant_expires(
        self, credit_stub, admin, alice, db
    ):
        soon = datetime.now(UTC) + timedelta(seconds=1)
        await grant(credit_stub, admin, alice, 50, valid_until=soon)
        held = await reserve(credit_stub, alice, 40)
        await settle(credit_stub, alice, held.id, 40)
        await asyncio.sleep(max(0.0, (soon - datetime.now(UTC)).total_seconds()) + 0.1)

        assert sums(await balance(credit_stub, alice)) == (0, 0, 40, 0)
        error = await expect_rpc_error(reserve(credit_stub, alice, 1))
        assert error.info.metadata["available"] == "0"


class TestReserveSettleRelease:
    async def test_reserve_holds_credits(self, credit_stub, admin, alice):
        await grant(credit_stub, admin, alice, 100)
        held = await reserve(credit_stub, alice, 30, reference="run-1")

        assert (held.amount, held.status, held.reference) == (30, PENDING, "run-1")
        assert held.user_id == str(alice.user_id)
        ttl = held.expire_time.ToDatetime(UTC) - held.create_time.ToDatetime(UTC)
        assert ttl == timedelta(hours=1)
        assert sums(await balance(credit_stub, alice)) == (100, 30, 0, 70)

    async def test_partial_settle_returns_the_rest(self, credit_stub, admin, alice):
        await grant(credit_stub, admin, alice, 100)
        held = await reserve(credit_stub, alice, 30)
        settled = await settle(credit_stub, alice, held.id, 20)

        assert (settled.status, settled.settled_amount, settled.amount) == (SETTLED, 20, 30)
        assert sums(await balance(credit_stub, alice)) == (100, 0, 20, 80)
        entries = await transactions(credit_stub, alice)
        assert kinds(entries) == [("GRANT", 100), ("RESERVE", 30), ("SETTLE", 20), ("RELEASE", 10)]
        assert [e.sequence for e in entries] == [4, 3, 2, 1]
        assert {e.reservation_id for e in entries[:3]} == {held.id}

    async def test_full_settle_writes_no_release(self, credit_stub, admin, alice):
        await grant(credit_stub, admin, alice, 100)
        held = await reserve(credit_stub, alice, 30)
        await settle(credit_stub, alice, held.id, 30)

        assert sums(await balance(credit_stub, alice)) == (100, 0, 30, 70)
        assert kinds(await transactions(credit_stub, alice))[-1] == ("SETTLE", 30)

    async def test_settling_zero_returns_everything(self, credit_stub, admin, alice):
        await grant(credit_stub, admin, alice, 100)
        held = await reserve(credit_stub, alice, 30)
        settled = await settle(credit_stub, alice, held.id, 0)

        assert (settled.status, settled.settled_amount) == (SETTLED, 0)
        assert sums(await balance(credit_stub, alice)) == (100, 0, 0, 100)

    async def test_release_returns_the_whole_hold(self, credit_stub, admin, alice):
        await grant(credit_stub, admin, alice, 100)
        held = await reserve(credit_stub, alice, 30)
        released = await release(credit_stub, alice, held.id)

        assert (released.status, released.settled_amount) == (RELEASED, 0)
        assert sums(await balance(credit_stub, alice)) == (100, 0, 0, 100)
        assert kinds(await transactions(credit_stub, alice))[-1] == ("RELEASE", 30)

    async def test_reserving_more_than_available_is_insufficient_credits(
        self, credit_stub, admin, alice
    ):
        await grant(credit_stub, admin, alice, 100)
        await reserve(credit_stub, alice, 70)
        error = await expect_rpc_error(reserve(credit_stub, alice, 31))

        assert (error.code, error.reason) == (FAILED, "INSUFFICIENT_CREDITS")
        assert error.info.metadata["available"] == "30"
        assert sums(await balance(credit_stub, alice)) == (100, 70, 0, 30)
        await reserve(credit_stub, alice, 30)

    async def test_a_user_without_grants_has_nothing_to_reserve(self, credit_stub, alice):
        error = await expect_rpc_error(reserve(credit_stub, alice, 1))
        assert (error.code, error.reason) == (FAILED, "INSUFFICIENT_CREDITS")
        assert error.info.metadata["available"] == "0"
        assert sums(await balance(credit_stub, alice)) == (0, 0, 0, 0)

    async def test_settling_more_than_reserved_is_refused(self, credit_stub, admin, alice):
        await grant(credit_stub, admin, alice, 100)
        held = await reserve(credit_stub, alice, 30)
        error = await expect_rpc_error(settle(credit_stub, alice, held.id, 31))

        assert (error.code, error.reason) == (FAILED, "SETTLE_EXCEEDS_RESERVED")
        assert sums(await balance(credit_stub, alice)) == (100, 30, 0, 70)

    @pytest.mark.parametrize("first", ["settle", "release"])
    @pytest.mark.parametrize("then", ["settle", "release"])
    async def test_a_reservation_resolves_once(self, credit_stub, admin, alice, first, then):
        await grant(credit_stub, admin, alice, 100)
        held = await reserve(credit_stub, alice, 30)
        calls = {
            "settle": lambda: settle(credit_stub, alice, held.id, 10),
            "release": lambda: release(credit_stub, alice, held.id),
        }
        await calls[first]()
        before = await balance(credit_stub, alice)
        error = await expect_rpc_error(calls[then]())

        assert (error.code, error.reason) == (FAILED, "RESERVATION_NOT_PENDING")
        assert sums(await balance(credit_stub, alice)) == sums(before)

    @pytest.mark.parametrize(("amount", "field"), [(0, "amount"), (-1, "amount")])
    async def test_reserve_amount_must_be_positive(self, credit_stub, alice, amount, field):
        error = await expect_rpc_error(reserve(credit_stub, alice, amount))
        assert (error.code, error.fields) == (INVALID, [field])

    @pytest.mark.parametrize("ttl_s", [0, -1, 7 * 86400 + 0.001, -(10**12), 10**12])
    async def test_ttl_must_be_positive_and_at_most_a_week(self, credit_stub, alice, ttl_s):
        error = await expect_rpc_error(reserve(credit_stub, alice, 1, ttl_s=ttl_s))
        assert (error.code, error.fields) == (INVALID, ["ttl"])

    async def test_negative_settle_amount_is_invalid(self, credit_stub, alice):
        error = await expect_rpc_error(settle(credit_stub, alice, str(uuid.uuid4()), -1))
        assert (error.code, error.fields) == (INVALID, ["amount"])

    async def test_malformed_and_unknown_reservation_ids(self, credit_stub, alice):
        error = await expect_rpc_error(release(credit_stub, alice, "nope"))
        assert (error.code, error.fields) == (INVALID, ["reservation_id"])
        error = await expect_rpc_error(release(credit_stub, alice, str(uuid.uuid4())))
        assert error.code == NOT_FOUND

    async def test_every_mutation_is_audited_once(self, credit_stub, admin, alice, db):
        allocation = await grant(credit_stub, admin, alice, 100)
        first = await reserve(credit_stub, alice, 30)
        second = await reserve(credit_stub, alice, 30)
        await settle(credit_stub, alice, first.id, 5)
        await release(credit_stub, alice, second.id)

        rows = await db.fetch(
            "SELECT action, resource FROM audit_log WHERE resource = ANY($1::text[]) "
            "ORDER BY create_time, id",
            [
                f"allocations/{allocation.id}",
                f"reservations/{first.id}",
                f"reservations/{second.id}",
            ],
        )
        assert [(r["action"], r["resource"]) for r in rows] == [
            ("credits.grant", f"allocations/{allocation.id}"),
            ("credits.reserve", f"reservations/{first.id}"),
            ("credits.reserve", f"reservations/{second.id}"),
            ("credits.settle", f"reservations/{first.id}"),
            ("credits.release", f"reservations/{second.id}"),
        ]


class TestAccess:
    async def test_users_cannot_touch_another_users_reservation(
        self, credit_stub, admin, alice, bob
    ):
        await grant(credit_stub, admin, alice, 100)
        held = await reserve(credit_stub, alice, 30)

        for call in (settle(credit_stub, bob, held.id, 1), release(credit_stub, bob, held.id)):
            assert (await expect_rpc_error(call)).code == NOT_FOUND
        assert sums(await balance(credit_stub, alice)) == (100, 30, 0, 70)

    async def test_users_see_only_their_own_balance_and_entries(
        self, credit_stub, admin, alice, bob
    ):
        await grant(credit_stub, admin, alice, 100)
        error = await expect_rpc_error(balance(credit_stub, bob, alice))
        assert error.code == DENIED
        request = credit_pb2.ListTransactionsRequest(user_id=str(alice.user_id))
        error = await expect_rpc_error(credit_stub.ListTransactions(request, metadata=bob.metadata))
        assert error.code == DENIED
        error = await expect_rpc_error(reserve(credit_stub, bob, 1, user_id=str(alice.user_id)))
        assert error.code == DENIED
        assert (await balance(credit_stub, alice, alice)).allocated == 100

    async def test_admins_act_on_any_account(self, credit_stub, admin, alice):
        await grant(credit_stub, admin, alice, 100)
        held = await reserve(credit_stub, admin, 40, user_id=str(alice.user_id))
        assert held.user_id == str(alice.user_id)
        assert sums(await balance(credit_stub, admin, alice)) == (100, 40, 0, 60)
        await settle(credit_stub, admin, held.id, 40)
        assert sums(await balance(credit_stub, alice)) == (100, 0, 40, 60)


class TestIdempotency:
    async def test_a_retried_reserve_counts_once(self, credit_stub, admin, alice, db):
        await grant(credit_stub, admin, alice, 100)
        request_id = str(uuid.uuid4())
        first = await reserve(credit_stub, alice, 30, request_id=request_id)
        again = await reserve(credit_stub, alice, 30, request_id=request_id)

        assert again == first
        assert sums(await balance(credit_stub, alice)) == (100, 30, 0, 70)

    async def test_a_retried_grant_counts_once(self, credit_stub, admin, alice):
        request_id = str(uuid.uuid4())
        first = await grant(credit_stub, admin, alice, 100, request_id=request_id)
        again = await grant(credit_stub, admin, alice, 100, request_id=request_id)

        assert again == first
        assert sums(await balance(credit_stub, alice)) == (100, 0, 0, 100)

    async def test_a_retried_settle_answers_as_the_first_did(self, credit_stub, admin, alice):
        await grant(credit_stub, admin, alice, 100)
        held = await reserve(credit_stub, alice, 30)
        request_id = str(uuid.uuid4())
        first = await settle(credit_stub, alice, held.id, 10, request_id=request_id)
        again = await settle(credit_stub, alice, held.id, 10, request_id=request_id)

        assert again == first
        assert sums(await balance(credit_stub, alice)) == (100, 0, 10, 90)

    async def test_a_retry_answers_as_the_first_call_did_even_after_later_changes(
        self, credit_stub, admin, alice
    ):
        await grant(credit_stub, admin, alice, 100)
        request_id = str(uuid.uuid4())
        first = await reserve(credit_stub, alice, 30, request_id=request_id)
        await settle(credit_stub, alice, first.id, 30)
        again = await reserve(credit_stub, alice, 30, request_id=request_id)

        assert again == first
        assert again.status == PENDING

    async def test_concurrent_retries_count_once_and_get_one_answer(
        self, credit_stub, admin, alice
    ):
        await grant(credit_stub, admin, alice, 100)
        request_id = str(uuid.uuid4())
        answers = await asyncio.gather(
            *(reserve(credit_stub, alice, 30, request_id=request_id) for _ in range(8))
        )

        assert all(answer == answers[0] for answer in answers)
        assert sums(await balance(credit_stub, alice)) == (100, 30, 0, 70)
        assert kinds(await transactions(credit_stub, alice)) == [("GRANT", 100), ("RESERVE", 30)]

    async def test_a_refused_call_keeps_no_request_id(self, credit_stub, admin, alice):
        request_id = str(uuid.uuid4())
        error = await expect_rpc_error(reserve(credit_stub, alice, 30, request_id=request_id))
        assert error.reason == "INSUFFICIENT_CREDITS"
        await grant(credit_stub, admin, alice, 100)

        held = await reserve(credit_stub, alice, 30, request_id=request_id)

        assert held.status == PENDING
        assert sums(await balance(credit_stub, alice)) == (100, 30, 0, 70)

    async def test_the_same_request_id_with_another_payload_is_refused(
        self, credit_stub, admin, alice
    ):
        await grant(credit_stub, admin, alice, 100)
        request_id = str(uuid.uuid4())
        await reserve(credit_stub, alice, 30, request_id=request_id)
        for call in (
            reserve(credit_stub, alice, 31, request_id=request_id),
            reserve(credit_stub, alice, 30, request_id=request_id, reference="other"),
            settle(credit_stub, alice, str(uuid.uuid4()), 1, request_id=request_id),
        ):
            error = await expect_rpc_error(call)
            assert (error.code, error.reason) == (INVALID, "REQUEST_ID_REUSED")
        assert sums(await balance(credit_stub, alice)) == (100, 30, 0, 70)


class TestExpiry:
    async def test_an_expired_reservation_stops_counting_before_the_sweep(
        self, credit_stub, admin, alice
    ):
        await grant(credit_stub, admin, alice, 100)
        held = await reserve(credit_stub, alice, 60, ttl_s=0.5)
        await asyncio.sleep(0.7)

        assert sums(await balance(credit_stub, alice)) == (100, 0, 0, 100)
        await reserve(credit_stub, alice, 100)
        for call in (settle(credit_stub, alice, held.id, 1), release(credit_stub, alice, held.id)):
            error = await expect_rpc_error(call)
            assert (error.code, error.reason) == (FAILED, "RESERVATION_NOT_PENDING")
            assert error.info.metadata["status"] == "RESERVATION_STATUS_EXPIRED"

    async def test_the_sweeper_writes_an_expire_entry(
        self, credit_stub, admin_stub, admin, alice, db, database_url
    ):
        from server.app import create_server
        from tests.conftest import make_settings

        await grant(credit_stub, admin, alice, 100)
        held = await reserve(credit_stub, alice, 60, ttl_s=0.3, reference="run-9")
        kept = await reserve(credit_stub, alice, 10)
        sweeping = await create_server(
            make_settings(OBSERVATORY_CREDIT_EXPIRY_INTERVAL=0.2), database_url
        )
        try:
            for _ in range(100):
                status = await db.fetchval(
                    "SELECT status FROM credit_reservations WHERE id = $1", uuid.UUID(held.id)
                )
                if status == "EXPIRED":
                    break
                await asyncio.sleep(0.1)
        finally:
            await sweeping.stop(0)

        assert status == "EXPIRED"
        assert kinds(await transactions(credit_stub, alice))[-1] == ("EXPIRE", 60)
        assert sums(await balance(credit_stub, alice)) == (100, 10, 0, 90)
        assert (
            await db.fetchval(
                "SELECT status FROM credit_reservations WHERE id = $1", uuid.UUID(kept.id)
            )
            == "PENDING"
        )
        assert (
            await db.fetchval(
                "SELECT count(*) FROM audit_log WHERE action = 'credits.expire' AND resource = $1",
                f"reservations/{held.id}",
            )
            == 1
        )
        assert not (await verify(admin_stub, admin, alice)).mismatches

    async def test_concurrent_sweeps_expire_each_reservation_once(
        self, app, credit_stub, admin, db
    ):
        from server.credits.service import CreditService

        users = [new_caller() for _ in range(3)]
        held = []
        for user in users:
            await grant(credit_stub, admin, user, 100)
            held += [await reserve(credit_stub, user, 10, ttl_s=0.2) for _ in range(3)]
        await asyncio.sleep(0.4)
        credits = CreditService(app.units)

        async def sweep() -> tuple[int, int]:
            async with app.units.autocommit() as unit:
                return await credits.expire_lapsed(unit)

        sweeps = await asyncio.gather(*(sweep() for _ in range(4)))

        counts = await db.fetch(
            "SELECT reservation_id, count(*) AS n FROM credit_entries "
            "WHERE kind = 'EXPIRE' AND reservation_id = ANY($1::uuid[]) GROUP BY reservation_id",
            [uuid.UUID(h.id) for h in held],
        )
        assert sorted(row["n"] for row in counts) == [1] * len(held)
        assert sum(expired for _, expired in sweeps) <= len(held)
        for user in users:
            assert sums(await balance(credit_stub, user)) == (100, 0, 0, 100)


class TestListTransactions:
    async def test_pages_newest_first_without_gaps(self, credit_stub, admin, alice):
        for amount in range(1, 6):
            await grant(credit_stub, admin, alice, amount)
        seen, token = [], ""
        while True:
            request = credit_pb2.ListTransactionsRequest(page_size=2, page_token=token)
            page = await credit_stub.ListTransactions(request, metadata=alice.metadata)
            seen.extend(e.amount for e in page.transactions)
            token = page.next_page_token
            if not token:
                break
        assert seen == [5, 4, 3, 2, 1]

    async def test_page_size_is_clamped_to_200(self, credit_stub, admin, alice):
        await asyncio.gather(*(grant(credit_stub, admin, alice, 1) for _ in range(205)))
        request = credit_pb2.ListTransactionsRequest(page_size=1000)
        page = await credit_stub.ListTransactions(request, metadata=alice.metadata)
        assert len(page.transactions) == 200
        assert page.next_page_token

    async def test_a_token_of_another_account_is_invalid(self, credit_stub, admin, alice):
        await grant(credit_stub, admin, alice, 1)
        await grant(credit_stub, admin, alice, 2)
        request = credit_pb2.ListTransactionsRequest(page_size=1)
        page = await credit_stub.ListTransactions(request, metadata=alice.metadata)
        other = credit_pb2.ListTransactionsRequest(page_size=1, page_token=page.next_page_token)
        error = await expect_rpc_error(
            credit_stub.ListTransactions(other, metadata=new_caller().metadata)
        )
        assert (error.code, error.fields) == (INVALID, ["page_token"])

    @pytest.mark.parametrize("key", [2**70, -1, "x", 1.5])
    async def test_a_forged_token_is_invalid(self, credit_stub, alice, key):
        from server import pagination

        token = pagination.encode_token(
            pagination.fingerprint("ListTransactions", str(alice.user_id)), (key,)
        )
        request = credit_pb2.ListTransactionsRequest(page_token=token)
        error = await expect_rpc_error(
            credit_stub.ListTransactions(request, metadata=alice.metadata)
        )
        assert (error.code, error.fields) == (INVALID, ["page_token"])


class TestEstimateCost:
    @pytest.mark.parametrize(
        ("arena", "records", "credits", "rate_arena"),
        [("twitter", 1500, 75, "twitter"), ("unknown", 1001, 11, "*"), ("", 0, 0, "*")],
    )
    async def test_rate_per_thousand_rounded_up(
        self, credit_stub, alice, arena, records, credits, rate_arena
    ):
        request = credit_pb2.EstimateCostRequest(arena=arena, expected_records=records)
        got = await credit_stub.EstimateCost(request, metadata=alice.metadata)
        assert (got.credits, got.rate_arena) == (credits, rate_arena)

    async def test_negative_records_are_invalid(self, credit_stub, alice):
        request = credit_pb2.EstimateCostRequest(arena="x", expected_records=-1)
        error = await expect_rpc_error(credit_stub.EstimateCost(request, metadata=alice.metadata))
        assert (error.code, error.fields) == (INVALID, ["expected_records"])


class TestLedger:
    async def test_entries_cannot_be_changed_or_deleted(self, credit_stub, admin, alice, db):
        await grant(credit_stub, admin, alice, 100)
        for statement in (
            "UPDATE credit_entries SET amount = 1 WHERE user_id = $1",
            "DELETE FROM credit_entries WHERE user_id = $1",
        ):
            with pytest.raises(Exception, match="append-only"):
                await db.execute(statement, alice.user_id)

    async def test_verify_ledger_finds_a_corrupted_balance_row(
        self, credit_stub, admin_stub, admin, alice, db
    ):
        await grant(credit_stub, admin, alice, 100)
        held = await reserve(credit_stub, alice, 30)
        await settle(credit_stub, alice, held.id, 10)
        assert (await verify(admin_stub, admin, alice)).accounts_checked == 1
        assert not (await verify(admin_stub, admin, alice)).mismatches

        update = "UPDATE credit_accounts SET settled = settled + $2 WHERE user_id = $1"
        await db.execute(update, alice.user_id, 7)
        try:
            report = await verify(admin_stub, admin)
            [mismatch] = [m for m in report.mismatches if m.user_id == str(alice.user_id)]
            assert (mismatch.recorded_settled, mismatch.derived_settled) == (17, 10)
        finally:
            await db.execute(update, alice.user_id, -7)
        assert not (await verify(admin_stub, admin, alice)).mismatches

    async def test_verify_ledger_is_admin_only(self, admin_stub, alice):
        error = await expect_rpc_error(verify(admin_stub, alice))
        assert error.code == DENIED
