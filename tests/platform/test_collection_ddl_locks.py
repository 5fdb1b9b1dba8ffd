"""Collection create and drop change the schema at run time (a partition of
vector_items): each try waits for its lock at most a short lock_timeout and is
retried with a backoff, so the statements queued behind it on vector_items
are never stalled; when the table stays busy the call ends with ABORTED
instead of waiting, and succeeds once the table is free."""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg
import grpc
import pytest
from observatory.v1 import vector_pb2

from tests.helpers import expect_rpc_error, new_caller

pytestmark = [pytest.mark.asyncio, pytest.mark.usefixtures("drop_vector_collections")]


async def _collection(vector_stub, caller, name: str) -> None:
    await vector_stub.CreateCollection(
        vector_pb2.CreateCollectionRequest(
            collection=vector_pb2.Collection(name=name, dimension=3)
        ),
        metadata=caller.metadata,
    )


async def _reads_while(task: asyncio.Task, vector_stub, caller, name: str) -> float:
    """The slowest GetItem on collection `name` while `task` runs."""
    slowest = 0.0
    while not task.done():
        started = time.monotonic()
        await vector_stub.GetItem(
            vector_pb2.GetItemRequest(collection=name, id="item"), metadata=caller.metadata
        )
        slowest = max(slowest, time.monotonic() - started)
        await asyncio.sleep(0.05)
    return slowest


async def test_collection_ddl_gives_way_to_traffic_and_goes_through_once_free(
    database_url, vector_stub
) -> None:
    reader, owner = new_caller(), new_caller()
    busy = f"busy_{uuid.uuid4().hex[:12]}"
    doomed = f"doomed_{uuid.uuid4().hex[:12]}"
    fresh = f"fresh_{uuid.uuid4().hex[:12]}"
    await _collection(vector_stub, reader, busy)
    await vector_stub.UpsertItems(
        iter(
            [
                vector_pb2.UpsertItemsRequest(
                    collection=busy, items=[vector_pb2.Item(id="item", vector=[1.0, 0.0, 0.0])]
                )
            ]
        ),
        metadata=reader.metadata,
    )
    await _collection(vector_stub, owner, doomed)

    # A long transaction that has read vector_items (as any report might).
    holder = await asyncpg.connect(database_url)
    transaction = holder.transaction()
    await transaction.start()
    await holder.execute("LOCK TABLE vector_items IN ACCESS SHARE MODE")
    try:
        for call in (
            vector_stub.CreateCollection(
                vector_pb2.CreateCollectionRequest(
                    collection=vector_pb2.Collection(name=fresh, dimension=3)
                ),
                metadata=owner.metadata,
            ),
            vector_stub.DeleteCollection(
                vector_pb2.DeleteCollectionRequest(name=doomed), metadata=owner.metadata
            ),
        ):
            started = time.monotonic()
            ddl = asyncio.create_task(expect_rpc_error(call))
            slowest = await _reads_while(ddl, vector_stub, reader, busy)
            error = await ddl
            assert error.code == grpc.StatusCode.ABORTED, error
            assert time.monotonic() - started < 15
            assert slowest < 1.0, f"a read waited {slowest:.2f} s behind the DDL"
    finally:
        await transaction.rollback()
        await holder.close()

    # Nothing was left half done: both calls go through now.
    await _collection(vector_stub, owner, fresh)
    await vector_stub.DeleteCollection(
        vector_pb2.DeleteCollectionRequest(name=doomed), metadata=owner.metadata
    )
    names = await vector_stub.ListCollections(
        vector_pb2.ListCollectionsRequest(), metadata=owner.metadata
    )
    assert [c.name for c in names.collections] == [fresh]
