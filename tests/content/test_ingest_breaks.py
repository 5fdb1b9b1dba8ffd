"""IngestContent commits batch by batch: a stream that breaks off keeps exactly
the batches that committed and frees its connections, and a retry with the
same request_id writes each row once and answers as the first try would have."""

from __future__ import annotations

import uuid

import grpc
import pytest
from observatory.v1 import content_pb2

from tests.helpers import expect_rpc_error, make_content, wait_until
from tests.streams.helpers import BrokenStream

pytestmark = pytest.mark.asyncio

BATCH_ROWS = 5000  # the service's batch size (server.bulk.BATCH_ROWS)


async def stored_count(db, caller) -> int:
    return await db.fetchval("SELECT count(*) FROM content WHERE owner_id = $1", caller.user_id)


async def audited_inserts(db, caller) -> int:
    return await db.fetchval(
        "SELECT coalesce(sum((detail->>'inserted')::int), 0) FROM audit_log "
        "WHERE user_id = $1 AND action = 'content.ingest'",
        caller.user_id,
    )


async def sessions_in_transaction(db) -> int:
    return await db.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = 'observatory' AND state <> 'idle'"
    )


def messages_of(rows, size: int = 500) -> list[content_pb2.IngestContentRequest]:
    return [
        content_pb2.IngestContentRequest(contents=rows[i : i + size])
        for i in range(0, len(rows), size)
    ]


async def test_a_client_that_disconnects_leaves_exactly_the_committed_batches(
    content_stub, alice, db, app
):
    rows = [make_content() for _ in range(2 * BATCH_ROWS + BATCH_ROWS // 2)]
    stream = BrokenStream(content_stub.IngestContent, alice, messages_of(rows))
    await stream.sent.wait()
    # Two full batches went out; the half batch waits for more rows.
    assert await wait_until(lambda: _at_least(stored_count(db, alice), 2 * BATCH_ROWS), timeout=60)
    await stream.break_off()

    assert await wait_until(lambda: _equal(_checked_out(app), 0), timeout=10)
    assert await sessions_in_transaction(db) == 0
    stored = await stored_count(db, alice)
    assert stored == 2 * BATCH_ROWS
    assert await audited_inserts(db, alice) == stored
    stored_ids = {
        row["platform_id"]
        for row in await db.fetch(
            "SELECT platform_id FROM content WHERE owner_id = $1", alice.user_id
        )
    }
    assert stored_ids == {row.platform_id for row in rows[: 2 * BATCH_ROWS]}


async def test_a_client_that_disconnects_while_batches_are_written_leaves_whole_batches(
    content_stub, alice, db, app
):
    rows = [make_content() for _ in range(3 * BATCH_ROWS)]
    stream = BrokenStream(content_stub.IngestContent, alice, messages_of(rows))
    await stream.sent.wait()
    # Break off at once: batches may be in flight; each commits whole or not at all.
    await stream.break_off()

    assert await wait_until(lambda: _equal(_checked_out(app), 0), timeout=10)
    stored = await stored_count(db, alice)
    assert stored % BATCH_ROWS == 0
    assert await audited_inserts(db, alice) == stored


def retried_stream() -> list[content_pb2.Content]:
    """Rows over three batches, with bad rows, natural-key duplicates and rows
    with no platform_id (which no natural key protects from a second write)."""
    rows = [make_content() for _ in range(2 * BATCH_ROWS + 700)]
    for i in (3, BATCH_ROWS + 11, 2 * BATCH_ROWS + 5):
        rows[i].ClearField("platform")
    for i in range(0, len(rows), 97):
        rows[i].ClearField("platform_id")
    rows[BATCH_ROWS + 20].CopyFrom(rows[20])
    rows[2 * BATCH_ROWS + 30].CopyFrom(rows[BATCH_ROWS + 30])
    return rows


async def test_a_retry_after_a_break_writes_each_row_once_and_answers_as_one_stream(
    content_stub, alice, bob, db
):
    rows = retried_stream()
    request_id = str(uuid.uuid4())
    # What one unbroken stream of these rows answers (another caller, same rows).
    whole = await content_stub.IngestContent(iter(messages_of(rows)), metadata=bob.metadata)
    assert (whole.received, whole.error_count, whole.duplicates) == (len(rows), 3, 2)

    first = messages_of(rows[: BATCH_ROWS + 1200])
    first[0].request_id = request_id
    stream = BrokenStream(content_stub.IngestContent, alice, first)
    await stream.sent.wait()
    assert await wait_until(lambda: _at_least(stored_count(db, alice), BATCH_ROWS - 2), 60)
    await stream.break_off()
    kept = await stored_count(db, alice)

    again = messages_of(rows, size=900)  # other message boundaries, the same rows
    again[0].request_id = request_id
    response = await content_stub.IngestContent(iter(again), metadata=alice.metadata)

    assert response == whole
    assert kept < whole.inserted
    assert await stored_count(db, alice) == whole.inserted
    assert await audited_inserts(db, alice) == whole.inserted

    # A retry of the finished stream gets the same answer and writes nothing.
    once_more = messages_of(rows)
    once_more[0].request_id = request_id
    assert await content_stub.IngestContent(iter(once_more), metadata=alice.metadata) == whole
    assert await stored_count(db, alice) == whole.inserted


async def test_a_retry_with_other_rows_is_refused(content_stub, alice, db):
    request_id = str(uuid.uuid4())
    rows = [make_content() for _ in range(10)]
    sent = messages_of(rows)
    sent[0].request_id = request_id
    await content_stub.IngestContent(iter(sent), metadata=alice.metadata)

    other = messages_of([*rows[:9], make_content()])
    other[0].request_id = request_id
    error = await expect_rpc_error(content_stub.IngestContent(iter(other), metadata=alice.metadata))

    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "REQUEST_ID_REUSED"
    assert await stored_count(db, alice) == 10


async def test_a_retry_after_a_break_with_other_rows_is_refused(content_stub, alice, db):
    request_id = str(uuid.uuid4())
    rows = [make_content() for _ in range(BATCH_ROWS + 10)]
    first = messages_of(rows)
    first[0].request_id = request_id
    stream = BrokenStream(content_stub.IngestContent, alice, first)
    await stream.sent.wait()
    assert await wait_until(lambda: _at_least(stored_count(db, alice), BATCH_ROWS), 60)
    await stream.break_off()

    other = messages_of([make_content(), *rows[1:]])
    other[0].request_id = request_id
    error = await expect_rpc_error(content_stub.IngestContent(iter(other), metadata=alice.metadata))

    assert error.reason == "REQUEST_ID_REUSED"
    assert await stored_count(db, alice) == BATCH_ROWS


async def _at_least(value, expected: int) -> bool:
    return await value >= expected


async def _equal(value, expected: int) -> bool:
    return await value == expected


async def _checked_out(app) -> int:
    return app.units.pool.checkedout()
