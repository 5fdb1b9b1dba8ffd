"""UpsertItems commits batch by batch: a stream that breaks off keeps exactly
the batches that committed and frees its connections; the same stream sent
again answers as one unbroken stream would and leaves the same items; bad
items anywhere in the stream are reported by index while the good ones land;
and of two writes of one id in batches written at once, the later wins."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
import pytest_asyncio
from observatory.v1 import content_pb2, content_pb2_grpc, vector_pb2, vector_pb2_grpc

from tests.helpers import expect_rpc_error, make_content, new_caller, wait_until
from tests.streams.conftest import serving
from tests.streams.helpers import BrokenStream
from tests.vectors.helpers import create_collection

pytestmark = [pytest.mark.asyncio, pytest.mark.usefixtures("drop_vector_collections")]

# A server whose batches are cut at the smallest byte budget, so that a few
# thousand items make several batches (each item written costs an HNSW insert).
BATCH_BYTES = 64 * 1024
# Batches written at once: a whole stream's, in the tests below.
WRITERS = 4
DIMENSION = 4


def make_items(count: int, start: int = 0) -> list[vector_pb2.Item]:
    """Items of equal encoded size (fixed-width ids and texts, 4 floats)."""
    vectors = np.random.default_rng(start).normal(size=(count, DIMENSION)).tolist()
    return [
        vector_pb2.Item(id=f"item-{i:06}", vector=vector, text=f"t{i:06}")
        for i, vector in enumerate(vectors, start)
    ]


# Items per batch: the budget is reached by this many items of that size.
BATCH_ITEMS = -(-BATCH_BYTES // make_items(1)[0].ByteSize())


@pytest_asyncio.fixture(scope="module")
async def small_batches(database_url):
    async with serving(
        database_url, OBSERVATORY_BULK_BATCH_BYTES=BATCH_BYTES, OBSERVATORY_BULK_WRITERS=WRITERS
    ) as served:
        yield served


@pytest.fixture
def app(small_batches):
    return small_batches[0]


@pytest.fixture
def vector_stub(small_batches):
    return vector_pb2_grpc.VectorServiceStub(small_batches[1])


@pytest.fixture
def content_stub(small_batches):
    return content_pb2_grpc.ContentServiceStub(small_batches[1])


def messages_of(
    name: str, items: list[vector_pb2.Item], size: int = 500
) -> list[vector_pb2.UpsertItemsRequest]:
    return [
        vector_pb2.UpsertItemsRequest(
            collection=name if start == 0 else "", items=items[start : start + size]
        )
        for start in range(0, len(items), size)
    ]


async def stored(db, caller, name: str) -> dict[str, str | None]:
    """The collection's items: id -> text."""
    rows = await db.fetch(
        "SELECT i.id, i.text FROM vector_items AS i JOIN vector_collections AS c "
        "ON c.id = i.collection_id WHERE c.owner_id = $1 AND c.name = $2",
        caller.user_id,
        name,
    )
    return {row["id"]: row["text"] for row in rows}


async def audited_upserts(db, caller) -> int:
    return await db.fetchval(
        "SELECT coalesce(sum((detail->>'upserted')::int), 0) FROM audit_log "
        "WHERE user_id = $1 AND action = 'vectors.items.upsert'",
        caller.user_id,
    )


async def sessions_in_transaction(db) -> int:
    return await db.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = 'observatory' AND state <> 'idle'"
    )


async def test_a_client_that_disconnects_leaves_exactly_the_committed_batches(
    vector_stub, alice, db, app
):
    name = await create_collection(vector_stub, alice, DIMENSION)
    items = make_items(2 * BATCH_ITEMS + BATCH_ITEMS // 2)
    stream = BrokenStream(vector_stub.UpsertItems, alice, messages_of(name, items))
    await stream.sent.wait()
    # Two full batches went out; the half batch waits for more items.
    assert await wait_until(lambda: _at_least(_count(db, alice, name), 2 * BATCH_ITEMS), timeout=60)
    await stream.break_off()

    assert await wait_until(lambda: _equal(_checked_out(app), 0), timeout=10)
    assert await sessions_in_transaction(db) == 0
    kept = await stored(db, alice, name)
    assert kept == {item.id: item.text for item in items[: 2 * BATCH_ITEMS]}
    assert await audited_upserts(db, alice) == 2 * BATCH_ITEMS


async def test_a_client_that_disconnects_while_batches_are_written_leaves_whole_batches(
    vector_stub, alice, db, app
):
    name = await create_collection(vector_stub, alice, DIMENSION)
    items = make_items(3 * BATCH_ITEMS)
    stream = BrokenStream(vector_stub.UpsertItems, alice, messages_of(name, items))
    await stream.sent.wait()
    # Break off at once: batches may be in flight; each commits whole or not at all.
    await stream.break_off()

    assert await wait_until(lambda: _equal(_checked_out(app), 0), timeout=10)
    kept = await stored(db, alice, name)
    assert len(kept) % BATCH_ITEMS == 0
    assert await audited_upserts(db, alice) == len(kept)
    batches = {int(item_id.removeprefix("item-")) // BATCH_ITEMS for item_id in kept}
    assert len(kept) == len(batches) * BATCH_ITEMS


def retried_stream(content_id: str) -> list[vector_pb2.Item]:
    """Items over three batches, with bad items, ids repeated within and
    across batches, and a content_id the caller does not own."""
    items = make_items(2 * BATCH_ITEMS + 700)
    items[3].vector[:] = [1.0, 2.0]  # wrong dimension
    items[BATCH_ITEMS + 11].vector[1] = float("nan")
    items[2 * BATCH_ITEMS + 5].id = ""
    items[BATCH_ITEMS + 20].id = items[20].id  # across batches: the later wins
    items[BATCH_ITEMS + 20].text = "second"
    items[2 * BATCH_ITEMS + 30].id = items[2 * BATCH_ITEMS + 31].id  # within a batch
    items[BATCH_ITEMS + 40].content_id = content_id
    return items


async def test_the_same_stream_sent_again_after_a_break_answers_as_one_whole_stream(
    vector_stub, content_stub, alice, bob, db
):
    # Content of a third caller's: neither may point an item at it.
    content = await content_stub.CreateContent(
        content_pb2.CreateContentRequest(content=make_content()), metadata=new_caller().metadata
    )
    items = retried_stream(content.id)
    # What one unbroken stream of these items answers and stores (another
    # caller's collection of the same name).
    name = await create_collection(vector_stub, bob, DIMENSION)
    await create_collection(vector_stub, alice, DIMENSION, name=name)
    whole = await vector_stub.UpsertItems(iter(messages_of(name, items)), metadata=bob.metadata)
    assert (whole.received, whole.upserted, whole.error_count) == (len(items), len(items) - 4, 4)
    assert [(e.index, e.field) for e in whole.errors] == [
        (3, "vector"),
        (BATCH_ITEMS + 11, "vector"),
        (BATCH_ITEMS + 40, "content_id"),
        (2 * BATCH_ITEMS + 5, "id"),
    ]
    expected = await stored(db, bob, name)
    assert expected[items[20].id] == "second"

    stream = BrokenStream(
        vector_stub.UpsertItems, alice, messages_of(name, items[: BATCH_ITEMS + 1200])
    )
    await stream.sent.wait()
    assert await wait_until(lambda: _at_least(_count(db, alice, name), BATCH_ITEMS - 1), 60)
    await stream.break_off()
    assert len(await stored(db, alice, name)) < len(expected)

    # Sent again, with other message boundaries: the same answer, the same items.
    again = await vector_stub.UpsertItems(
        iter(messages_of(name, items, size=900)), metadata=alice.metadata
    )
    assert again == whole
    assert await stored(db, alice, name) == expected


async def test_bad_items_in_any_batch_are_reported_by_index_and_the_good_ones_land(
    vector_stub, alice, db
):
    name = await create_collection(vector_stub, alice, DIMENSION)
    items = make_items(3 * BATCH_ITEMS)
    bad = {
        7: ("vector", [1.0, 2.0, 3.0]),
        BATCH_ITEMS + 1: ("vector", [1.0, float("inf"), 3.0, 4.0]),
        2 * BATCH_ITEMS + 2: ("vector", [3e38, 3e38, 3e38, 3e38]),  # its norm overflows
        3 * BATCH_ITEMS - 1: ("text", "a\x00b"),
    }
    for index, (field, value) in bad.items():
        if field == "vector":
            items[index].vector[:] = value
        else:
            items[index].text = value
    response = await vector_stub.UpsertItems(
        iter(messages_of(name, items, size=1000)), metadata=alice.metadata
    )
    assert (response.received, response.upserted, response.error_count) == (
        len(items),
        len(items) - len(bad),
        len(bad),
    )
    assert [(e.index, e.field) for e in response.errors] == [
        (index, field) for index, (field, _) in sorted(bad.items())
    ]
    assert all(e.reason for e in response.errors)
    kept = await stored(db, alice, name)
    assert set(kept) == {item.id for i, item in enumerate(items) if i not in bad}


async def test_of_two_writes_of_one_id_in_batches_written_at_once_the_later_wins(
    vector_stub, alice, db
):
    name = await create_collection(vector_stub, alice, DIMENSION)
    # Three full batches, then a last one of five items, all written at once
    # (the last one's few rows would otherwise commit first). Each writes "same".
    items = make_items(3 * BATCH_ITEMS + 5)
    same = [
        *(batch * BATCH_ITEMS + offset for batch in range(3) for offset in (10, BATCH_ITEMS - 100)),
        3 * BATCH_ITEMS + 2,
    ]
    for i in same:
        items[i].id, items[i].text = "same", f"at {i}"
    response = await vector_stub.UpsertItems(
        iter(messages_of(name, items, size=2500)), metadata=alice.metadata
    )
    assert (response.upserted, response.error_count) == (len(items), 0)
    kept = await stored(db, alice, name)
    assert kept["same"] == f"at {same[-1]}"
    assert len(kept) == len(items) - len(same) + 1


async def test_a_collection_deleted_during_the_stream_ends_it_as_not_found(vector_stub, alice, db):
    name = await create_collection(vector_stub, alice, DIMENSION)
    deleted = asyncio.Event()

    async def requests():
        yield vector_pb2.UpsertItemsRequest(collection=name, items=make_items(BATCH_ITEMS))
        await wait_until(lambda: _at_least(_count(db, alice, name), BATCH_ITEMS), 60)
        await vector_stub.DeleteCollection(
            vector_pb2.DeleteCollectionRequest(name=name), metadata=alice.metadata
        )
        deleted.set()
        yield vector_pb2.UpsertItemsRequest(items=make_items(10, start=BATCH_ITEMS))

    error = await expect_rpc_error(vector_stub.UpsertItems(requests(), metadata=alice.metadata))
    assert deleted.is_set()
    assert error.code == grpc.StatusCode.NOT_FOUND


async def _count(db, caller, name: str) -> int:
    return len(await stored(db, caller, name))


async def _at_least(value, expected: int) -> bool:
    return await value >= expected


async def _equal(value, expected: int) -> bool:
    return await value == expected


async def _checked_out(app) -> int:
    return app.units.pool.checkedout()
