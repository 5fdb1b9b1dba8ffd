"""Migration 0006 (the credit functions): answers stored as protobuf before it
are replayed after it, and the downgrade gives them back as they were."""

import asyncio
import hashlib
import os
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
import pytest_asyncio
from observatory.v1 import credit_pb2

from server import migrate
from tests.helpers import timestamp

pytestmark = pytest.mark.asyncio
BEFORE = "0005"


@pytest_asyncio.fixture
async def scratch_url(postgres):
    if postgres.embedded is None:
        pytest.skip("needs the embedded server to make a scratch database")
    name = f"observatory_credit_functions_{os.getpid()}"
    url = await asyncio.to_thread(postgres.embedded.ensure_database, name, fresh=True)
    yield url
    await asyncio.to_thread(postgres.embedded.drop_database, name)


def stored_reservation() -> credit_pb2.Reservation:
    now = datetime.now(UTC).replace(microsecond=123456)
    answer = credit_pb2.Reservation(
        id=str(uuid.uuid4()),
        user_id=str(uuid.uuid4()),
        amount=30,
        status=credit_pb2.RESERVATION_STATUS_PENDING,
        reference="run-1",
    )
    answer.expire_time.CopyFrom(timestamp(now + timedelta(hours=1)))
    answer.create_time.CopyFrom(timestamp(now))
    answer.update_time.CopyFrom(timestamp(now))
    return answer


def stored_allocation() -> credit_pb2.Allocation:
    now = datetime.now(UTC)
    answer = credit_pb2.Allocation(
        id=str(uuid.uuid4()), user_id=str(uuid.uuid4()), amount=100, memo="welcome"
    )
    answer.valid_from.CopyFrom(timestamp(now))
    answer.create_time.CopyFrom(timestamp(now))
    return answer


async def test_answers_stored_before_are_replayed_after_and_restored_by_the_downgrade(
    scratch_url,
):
    await asyncio.to_thread(migrate.upgrade, scratch_url, BEFORE)
    owner, digest = uuid.uuid4(), hashlib.sha256(b"payload").digest()
    reservation, allocation = stored_reservation(), stored_allocation()
    keys = {
        "ReserveCredits": (uuid.uuid4(), reservation),
        "GrantCredits": (uuid.uuid4(), allocation),
    }
    conn = await asyncpg.connect(scratch_url)
    try:
        for method, (request_id, answer) in keys.items():
            await conn.execute(
                "INSERT INTO idempotency_keys (owner_id, request_id, method, request_hash, "
                "response) VALUES ($1, $2, $3, $4, $5)",
                owner,
                request_id,
                method,
                digest,
                answer.SerializeToString(),
            )
        await asyncio.to_thread(migrate.upgrade, scratch_url)

        replayed = await conn.fetchrow(
            "SELECT * FROM credit_reserve($1, $2, $3, NULL, $1, 30, 'run-1', '1 hour')",
            owner,
            keys["ReserveCredits"][0],
            digest,
        )
        assert str(replayed["id"]) == reservation.id
        assert replayed["status"] == "PENDING"
        assert replayed["create_time"] == reservation.create_time.ToDatetime(tzinfo=UTC)
        granted = await conn.fetchrow(
            "SELECT * FROM credit_grant($1, $2, $3, NULL, $1, 100, 'welcome', now(), NULL)",
            owner,
            keys["GrantCredits"][0],
            digest,
        )
        assert (str(granted["id"]), granted["valid_until"]) == (allocation.id, None)

        await asyncio.to_thread(migrate.downgrade, scratch_url, BEFORE)
        for method, (request_id, answer) in keys.items():
            stored = await conn.fetchval(
                "SELECT response FROM idempotency_keys WHERE request_id = $1", request_id
            )
            assert type(answer).FromString(stored) == answer, method
        functions = await conn.fetchval(
            "SELECT count(*) FROM pg_proc WHERE proname LIKE 'credit\\_%' "
            "AND proname <> 'credit_entries_append_only'"
        )
        assert functions == 0
    finally:
        await conn.close()
