"""UpsertItems, GetItem and DeleteItems: insert or replace by id, bad items
reported by index with the rest kept."""

import asyncio
import math

import grpc
import pytest
from observatory.v1 import content_pb2, vector_pb2

from server.vectors import repository
from server.vectors.repository import CollectionRepository
from tests.helpers import expect_rpc_error, make_content, new_caller
from tests.vectors.helpers import clustered, collection_name, create_collection, items, upsert

pytestmark = [pytest.mark.asyncio, pytest.mark.usefixtures("drop_vector_collections")]


async def _get(stub, caller, name, item_id, with_vector=True) -> vector_pb2.Item:
    return await stub.GetItem(
        vector_pb2.GetItemRequest(collection=name, id=item_id, with_vector=with_vector),
        metadata=caller.metadata,
    )


async def _count(stub, caller, name) -> int:
    got = await stub.GetCollection(
        vector_pb2.GetCollectionRequest(name=name), metadata=caller.metadata
    )
    return got.item_count


async def test_upsert_inserts_then_replaces_by_id(vector_stub, content_stub, alice):
    content = await content_stub.CreateContent(
        content_pb2.CreateContentRequest(content=make_content()), metadata=alice.metadata
    )
    name = await create_collection(vector_stub, alice, 4)
    first = items(clustered(20, 4), text="before", url="https://a.org/x")
    response = await upsert(vector_stub, alice, name, first, per_message=7)
    assert (response.upserted, response.received, response.error_count) == (20, 20, 0)

    replacement = vector_pb2.Item(
        id="item-3",
        vector=[1, 2, 3, 4],
        text="after",
        content_id=content.id,
    )
    replacement.metadata.update({"k": "v"})
    response = await upsert(vector_stub, alice, name, [replacement])
    assert response.upserted == 1
    assert await _count(vector_stub, alice, name) == 20
    got = await _get(vector_stub, alice, name, "item-3")
    assert list(got.vector) == [1, 2, 3, 4]
    assert got.text == "after" and got.url == "" and dict(got.metadata) == {"k": "v"}
    assert got.content_id == content.id
    without = await _get(vector_stub, alice, name, "item-3", with_vector=False)
    assert not without.vector and without.text == "after"


async def test_the_last_of_repeated_ids_in_a_stream_wins(vector_stub, alice):
    name = await create_collection(vector_stub, alice, 2)
    batch = [vector_pb2.Item(id="same", vector=[float(i), 1.0], text=str(i)) for i in range(5)]
    response = await upsert(vector_stub, alice, name, batch, per_message=2)
    assert response.upserted == 5 and not response.errors
    assert await _count(vector_stub, alice, name) == 1
    assert (await _get(vector_stub, alice, name, "same")).text == "4"


async def test_bad_items_are_reported_by_index_and_the_rest_kept(vector_stub, alice):
    name = await create_collection(vector_stub, alice, 3, precision=vector_pb2.PRECISION_FLOAT16)
    good = [1.0, 2.0, 3.0]
    batch = [
        vector_pb2.Item(id="ok-0", vector=good),
        vector_pb2.Item(id="short", vector=[1.0, 2.0]),
        vector_pb2.Item(id="nan", vector=[1.0, math.nan, 3.0]),
        vector_pb2.Item(id="ok-1", vector=good),
        vector_pb2.Item(id="inf", vector=[1.0, math.inf, 3.0]),
        vector_pb2.Item(id="", vector=good),
        vector_pb2.Item(id="x" * 257, vector=good),
        vector_pb2.Item(id="huge", vector=[1e6, 0.0, 0.0]),
        vector_pb2.Item(id="content", vector=good, content_id="not-a-uuid"),
        vector_pb2.Item(id="nul", vector=good, text="a\x00b"),
        vector_pb2.Item(id="ok-2", vector=good),
    ]
    response = await upsert(vector_stub, alice, name, batch, per_message=4)
    assert response.received == 11 and response.upserted == 3
    assert response.error_count == 8
    assert [(e.index, e.field) for e in response.errors] == [
        (1, "vector"),
        (2, "vector"),
        (4, "vector"),
        (5, "id"),
        (6, "id"),
        (7, "vector"),
        (8, "content_id"),
        (9, "text"),
    ]
    assert all(e.reason for e in response.errors)
    assert await _count(vector_stub, alice, name) == 3
    assert (await _get(vector_stub, alice, name, "ok-2")).vector == good


async def test_upsert_into_an_unknown_collection_is_not_found(vector_stub, alice):
    details = await expect_rpc_error(upsert(vector_stub, alice, "nowhere", items(clustered(1, 4))))
    assert details.code == grpc.StatusCode.NOT_FOUND


async def test_upsert_with_a_bad_collection_name_is_invalid(vector_stub, alice):
    details = await expect_rpc_error(upsert(vector_stub, alice, "No Such", items(clustered(1, 4))))
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.fields == ["collection"]


async def test_get_of_an_unknown_item_is_not_found(vector_stub, alice):
    name = await create_collection(vector_stub, alice, 4)
    details = await expect_rpc_error(_get(vector_stub, alice, name, "missing"))
    assert details.code == grpc.StatusCode.NOT_FOUND


async def test_delete_items_counts_what_existed(vector_stub, alice):
    name = await create_collection(vector_stub, alice, 4)
    await upsert(vector_stub, alice, name, items(clustered(5, 4)))
    response = await vector_stub.DeleteItems(
        vector_pb2.DeleteItemsRequest(collection=name, ids=["item-1", "item-2", "nope"]),
        metadata=alice.metadata,
    )
    assert response.deleted == 2
    assert await _count(vector_stub, alice, name) == 3
    details = await expect_rpc_error(
        vector_stub.DeleteItems(
            vector_pb2.DeleteItemsRequest(collection=name, ids=[]), metadata=alice.metadata
        )
    )
    assert details.fields == ["ids"]
    details = await expect_rpc_error(
        vector_stub.DeleteItems(
            vector_pb2.DeleteItemsRequest(collection=name, ids=["ok", ""]), metadata=alice.metadata
        )
    )
    assert details.fields == ["ids[1]"]


async def test_concurrent_gets_of_mixed_callers_see_only_their_own_items(vector_stub, alice, bob):
    # Same collection name, same item ids, different owners: the coalesced
    # reads answer each caller from their own collection only.
    name = collection_name()
    for caller in (alice, bob):
        await create_collection(vector_stub, caller, 2, name=name)
        batch = [
            vector_pb2.Item(id=f"item-{i}", vector=[float(i), 1.0], text=f"{caller.user_id}:{i}")
            for i in range(20)
        ]
        await upsert(vector_stub, caller, name, batch)
    carol = new_caller()  # no collection of that name

    async def get(caller, i):
        return await _get(vector_stub, caller, name, f"item-{i}", with_vector=i % 2 == 0)

    calls = [(caller, i) for i in range(25) for caller in (alice, bob, carol)]
    results = await asyncio.gather(*(get(c, i) for c, i in calls), return_exceptions=True)
    for (caller, i), result in zip(calls, results, strict=True):
        if caller is carol or i >= 20:
            assert isinstance(result, grpc.aio.AioRpcError), result
            assert result.code() == grpc.StatusCode.NOT_FOUND
            continue
        assert not isinstance(result, BaseException), result
        assert result.text == f"{caller.user_id}:{i}"
        assert list(result.vector) == ([float(i), 1.0] if i % 2 == 0 else [])


async def test_get_after_another_process_re_created_the_collection(vector_stub, alice, db):
    name = await create_collection(vector_stub, alice, 2)
    await upsert(vector_stub, alice, name, [vector_pb2.Item(id="a", vector=[1, 2], text="old")])
    assert (await _get(vector_stub, alice, name, "a")).text == "old"  # now cached
    # Another server process deletes it and makes a new one of the same name.
    old_id = await db.fetchval(
        "DELETE FROM vector_collections WHERE owner_id = $1 AND name = $2 RETURNING id",
        alice.user_id,
        name,
    )
    await db.execute(f'DROP TABLE "vector_items_{old_id.hex}"')
    new_id = await db.fetchval(
        "INSERT INTO vector_collections (owner_id, name, dimension, metric, precision, hnsw_m, "
        "hnsw_ef_construction) VALUES ($1, $2, 2, 'cosine', 'float32', 16, 64) RETURNING id",
        alice.user_id,
        name,
    )
    await db.execute(
        f'CREATE TABLE "vector_items_{new_id.hex}" PARTITION OF vector_items '
        f"FOR VALUES IN ('{new_id}')"
    )
    await db.execute(
        "INSERT INTO vector_items (collection_id, owner_id, id, embedding, text) "
        "VALUES ($1, $2, 'a', '[3,4]', 'new')",
        new_id,
        alice.user_id,
    )
    assert (await _get(vector_stub, alice, name, "a")).text == "new"
    await db.execute(f'DROP TABLE "vector_items_{new_id.hex}"')
    await db.execute("DELETE FROM vector_collections WHERE id = $1", new_id)
    details = await expect_rpc_error(_get(vector_stub, alice, name, "a"))
    assert details.code == grpc.StatusCode.NOT_FOUND
    assert "collection" in details.message


async def test_reads_by_collection_touch_only_that_collections_partition(app, vector_stub, alice):
    # With many collections, a statement that joined or correlated to all of
    # vector_items would plan, lock and open every partition.
    names = [await create_collection(vector_stub, alice, 2) for _ in range(4)]
    async with app.units.read() as uow:
        specs = [await CollectionRepository(uow).find(alice.user_id, name) for name in names]
        for statement, args in (
            (repository.ITEMS_BY_KEY, ([specs[1].id], ["a", "b"])),
            (repository.COUNT_ITEMS, ([specs[1].id],)),
        ):
            rows = await uow.driver.fetch(f"EXPLAIN {statement}", *args)
            plan = "\n".join(row[0] for row in rows)
            assert specs[1].partition.strip('"') in plan, plan
            others = [s.partition.strip('"') for s in specs if s is not specs[1]]
            assert not any(other in plan for other in others), plan
