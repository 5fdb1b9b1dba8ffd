"""VectorService collections: create, get, list, delete; validation, tenancy,
audit, idempotency, and uniqueness under a multi-process storm."""

import asyncio
import uuid

import grpc
import pytest
from observatory.v1 import vector_pb2, vector_pb2_grpc

from tests.helpers import error_details, expect_rpc_error, in_processes, new_caller
from tests.vectors.helpers import clustered, collection_name, create_collection, items, upsert

pytestmark = [pytest.mark.asyncio, pytest.mark.usefixtures("drop_vector_collections")]


def _create(name: str, dimension: int = 8, **fields) -> vector_pb2.CreateCollectionRequest:
    return vector_pb2.CreateCollectionRequest(
        collection=vector_pb2.Collection(name=name, dimension=dimension, **fields)
    )


async def _partition_exists(db, owner, name) -> bool:
    return bool(
        await db.fetchval(
            "SELECT to_regclass('vector_items_' || replace(id::text, '-', '')) IS NOT NULL "
            "FROM vector_collections WHERE owner_id = $1 AND name = $2",
            owner.user_id,
            name,
        )
    )


async def test_create_applies_defaults_and_get_returns_it(vector_stub, alice):
    name = collection_name()
    created = await vector_stub.CreateCollection(_create(name, 12), metadata=alice.metadata)
    assert created.name == name and created.dimension == 12
    assert created.metric == vector_pb2.METRIC_COSINE
    assert created.precision == vector_pb2.PRECISION_FLOAT32
    assert (created.hnsw_m, created.hnsw_ef_construction) == (16, 64)
    assert created.item_count == 0 and created.create_time.seconds > 0
    got = await vector_stub.GetCollection(
        vector_pb2.GetCollectionRequest(name=name), metadata=alice.metadata
    )
    assert got == created


async def test_each_collection_gets_its_own_hnsw_index_with_its_parameters(vector_stub, alice, db):
    name = collection_name()
    await vector_stub.CreateCollection(
        _create(
            name,
            16,
            metric=vector_pb2.METRIC_INNER_PRODUCT,
            precision=vector_pb2.PRECISION_FLOAT16,
            hnsw_m=8,
            hnsw_ef_construction=40,
        ),
        metadata=alice.metadata,
    )
    definition = await db.fetchval(
        "SELECT indexdef FROM pg_indexes WHERE indexname = "
        "(SELECT 'vector_items_' || replace(id::text, '-', '') || '_hnsw' FROM vector_collections "
        "WHERE owner_id = $1 AND name = $2)",
        alice.user_id,
        name,
    )
    assert "USING hnsw" in definition
    assert "halfvec(16)" in definition and "halfvec_ip_ops" in definition
    assert "m='8'" in definition and "ef_construction='40'" in definition


async def test_a_name_is_unique_per_owner(vector_stub, alice, bob):
    name = collection_name()
    await vector_stub.CreateCollection(_create(name), metadata=alice.metadata)
    details = await expect_rpc_error(
        vector_stub.CreateCollection(_create(name), metadata=alice.metadata)
    )
    assert details.code == grpc.StatusCode.ALREADY_EXISTS
    # Another owner's namespace is separate.
    await vector_stub.CreateCollection(_create(name), metadata=bob.metadata)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"name": "Upper"}, "collection.name"),
        ({"name": "1abc"}, "collection.name"),
        ({"name": "a" * 64}, "collection.name"),
        ({"name": ""}, "collection.name"),
        ({"dimension": 0}, "collection.dimension"),
        ({"dimension": 16001}, "collection.dimension"),
        ({"quantization": 5}, "collection.quantization"),
        ({"metric": 9}, "collection.metric"),
        ({"precision": 7}, "collection.precision"),
        ({"hnsw_m": 1}, "collection.hnsw_m"),
        ({"hnsw_m": 101}, "collection.hnsw_m"),
        ({"hnsw_m": 40, "hnsw_ef_construction": 64}, "collection.hnsw_ef_construction"),
        ({"hnsw_ef_construction": 1001}, "collection.hnsw_ef_construction"),
    ],
)
async def test_bad_collections_are_invalid(vector_stub, alice, fields, field):
    values = {"name": collection_name(), "dimension": 8, **fields}
    request = vector_pb2.CreateCollectionRequest(collection=vector_pb2.Collection(**values))
    details = await expect_rpc_error(vector_stub.CreateCollection(request, metadata=alice.metadata))
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.fields == [field]


async def test_another_owners_collection_is_not_found(vector_stub, alice, bob):
    name = await create_collection(vector_stub, alice, 4)
    await upsert(vector_stub, alice, name, items(clustered(3, 4)))
    calls = [
        vector_stub.GetCollection(
            vector_pb2.GetCollectionRequest(name=name), metadata=bob.metadata
        ),
        vector_stub.DeleteCollection(
            vector_pb2.DeleteCollectionRequest(name=name), metadata=bob.metadata
        ),
        vector_stub.GetItem(
            vector_pb2.GetItemRequest(collection=name, id="item-0"), metadata=bob.metadata
        ),
        vector_stub.DeleteItems(
            vector_pb2.DeleteItemsRequest(collection=name, ids=["item-0"]), metadata=bob.metadata
        ),
        upsert(vector_stub, bob, name, items(clustered(1, 4))),
        _drain(
            vector_stub.SearchSimilar(
                vector_pb2.SearchSimilarRequest(collection=name, vector=[1, 0, 0, 0]),
                metadata=bob.metadata,
            )
        ),
        vector_stub.CheckDuplicate(
            vector_pb2.CheckDuplicateRequest(collection=name, url="https://x.org"),
            metadata=bob.metadata,
        ),
    ]
    for call in calls:
        details = await expect_rpc_error(call)
        assert details.code == grpc.StatusCode.NOT_FOUND
    got = await vector_stub.GetCollection(
        vector_pb2.GetCollectionRequest(name=name), metadata=alice.metadata
    )
    assert got.item_count == 3


async def _drain(call):
    return [hit async for hit in call]


async def test_list_pages_through_the_callers_collections_by_name(vector_stub, bob):
    caller = new_caller()
    names = sorted([await create_collection(vector_stub, caller, 4) for _ in range(3)])
    await create_collection(vector_stub, bob, 4)
    first = await vector_stub.ListCollections(
        vector_pb2.ListCollectionsRequest(page_size=2), metadata=caller.metadata
    )
    assert [c.name for c in first.collections] == names[:2]
    assert first.next_page_token
    second = await vector_stub.ListCollections(
        vector_pb2.ListCollectionsRequest(page_size=2, page_token=first.next_page_token),
        metadata=caller.metadata,
    )
    assert [c.name for c in second.collections] == names[2:]
    assert not second.next_page_token
    details = await expect_rpc_error(
        vector_stub.ListCollections(
            vector_pb2.ListCollectionsRequest(page_token=first.next_page_token),
            metadata=bob.metadata,
        )
    )
    assert details.fields == ["page_token"]


async def test_delete_drops_the_items_and_the_partition(vector_stub, alice, db):
    name = await create_collection(vector_stub, alice, 4)
    await upsert(vector_stub, alice, name, items(clustered(10, 4)))
    assert await _partition_exists(db, alice, name)
    partition = await db.fetchval(
        "SELECT 'vector_items_' || replace(id::text, '-', '') FROM vector_collections "
        "WHERE owner_id = $1 AND name = $2",
        alice.user_id,
        name,
    )
    await vector_stub.DeleteCollection(
        vector_pb2.DeleteCollectionRequest(name=name), metadata=alice.metadata
    )
    assert await db.fetchval("SELECT to_regclass($1)", partition) is None
    details = await expect_rpc_error(
        vector_stub.GetCollection(
            vector_pb2.GetCollectionRequest(name=name), metadata=alice.metadata
        )
    )
    assert details.code == grpc.StatusCode.NOT_FOUND
    # The name is free again, and the new collection starts empty.
    await create_collection(vector_stub, alice, 4, name=name)
    got = await vector_stub.GetCollection(
        vector_pb2.GetCollectionRequest(name=name), metadata=alice.metadata
    )
    assert got.item_count == 0


async def test_every_mutation_writes_one_audit_entry(vector_stub, db):
    caller = new_caller()
    name = await create_collection(vector_stub, caller, 4)
    await upsert(vector_stub, caller, name, items(clustered(5, 4)))
    await vector_stub.DeleteItems(
        vector_pb2.DeleteItemsRequest(collection=name, ids=["item-0", "nope"]),
        metadata=caller.metadata,
    )
    await _drain(
        vector_stub.SearchSimilar(
            vector_pb2.SearchSimilarRequest(collection=name, vector=[1, 0, 0, 0]),
            metadata=caller.metadata,
        )
    )
    await vector_stub.DeleteCollection(
        vector_pb2.DeleteCollectionRequest(name=name), metadata=caller.metadata
    )
    rows = await db.fetch(
        "SELECT action, detail FROM audit_log WHERE user_id = $1 ORDER BY create_time, id",
        caller.user_id,
    )
    assert [row["action"] for row in rows] == [
        "vectors.collection.create",
        "vectors.items.upsert",
        "vectors.items.delete",
        "vectors.collection.delete",
    ]


async def test_a_retried_create_returns_the_first_result(vector_stub, alice):
    request = _create(collection_name())
    request.request_id = str(uuid.uuid4())
    first = await vector_stub.CreateCollection(request, metadata=alice.metadata)
    again = await vector_stub.CreateCollection(request, metadata=alice.metadata)
    assert again == first
    request.collection.dimension = 9
    details = await expect_rpc_error(vector_stub.CreateCollection(request, metadata=alice.metadata))
    assert details.reason == "REQUEST_ID_REUSED"


PROCESSES = 4
CALLS_PER_PROCESS = 6


def storm(port: int, token: str, name: str) -> list[str]:
    """Runs in a child process: CALLS_PER_PROCESS CreateCollection at once."""

    async def run() -> list[str]:
        metadata = (("authorization", f"Bearer {token}"),)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = vector_pb2_grpc.VectorServiceStub(channel)

            async def create() -> str:
                try:
                    await stub.CreateCollection(_create(name), metadata=metadata, timeout=60)
                except grpc.aio.AioRpcError as error:
                    return f"{error.code().name}:{error_details(error).reason}"
                return "OK"

            return list(await asyncio.gather(*(create() for _ in range(CALLS_PER_PROCESS))))

    return asyncio.run(run())


async def test_one_name_is_created_once_whoever_races_for_it(app, db):
    caller = new_caller()
    name = collection_name()
    results = await in_processes(storm, [(app.port, caller.token, name)] * PROCESSES)
    outcomes = [outcome for result in results for outcome in result]
    assert outcomes.count("OK") == 1
    assert outcomes.count("ALREADY_EXISTS:ALREADY_EXISTS") == PROCESSES * CALLS_PER_PROCESS - 1
    assert (
        await db.fetchval(
            "SELECT count(*) FROM vector_collections WHERE owner_id = $1", caller.user_id
        )
        == 1
    )
    assert await _partition_exists(db, caller, name)
    assert (
        await db.fetchval(
            "SELECT count(*) FROM audit_log WHERE user_id = $1 AND action = 'vectors.collection.create'",
            caller.user_id,
        )
        == 1
    )


async def test_a_collection_deleted_by_another_process_is_not_found(vector_stub, alice, db):
    name = await create_collection(vector_stub, alice, 4)
    await upsert(vector_stub, alice, name, items(clustered(3, 4)))
    request = vector_pb2.SearchSimilarRequest(collection=name, vector=[1, 0, 0, 0])
    assert len(await _drain(vector_stub.SearchSimilar(request, metadata=alice.metadata))) == 3
    # As another server process would: this one still has the collection cached.
    collection_id = await db.fetchval(
        "DELETE FROM vector_collections WHERE owner_id = $1 AND name = $2 RETURNING id",
        alice.user_id,
        name,
    )
    await db.execute(f'DROP TABLE "vector_items_{collection_id.hex}"')
    details = await expect_rpc_error(
        _drain(vector_stub.SearchSimilar(request, metadata=alice.metadata))
    )
    assert details.code == grpc.StatusCode.NOT_FOUND
    await create_collection(vector_stub, alice, 4, name=name)
    assert await _drain(vector_stub.SearchSimilar(request, metadata=alice.metadata)) == []


async def test_a_collection_re_created_by_another_process_asks_for_a_retry(vector_stub, alice, db):
    name = await create_collection(vector_stub, alice, 4)
    request = vector_pb2.SearchSimilarRequest(collection=name, vector=[1, 0, 0, 0])
    await _drain(vector_stub.SearchSimilar(request, metadata=alice.metadata))  # now cached
    # Another server process deletes it and makes a new one of the same name.
    old_id = await db.fetchval(
        "DELETE FROM vector_collections WHERE owner_id = $1 AND name = $2 RETURNING id",
        alice.user_id,
        name,
    )
    await db.execute(f'DROP TABLE "vector_items_{old_id.hex}"')
    new_id = await db.fetchval(
        "INSERT INTO vector_collections (owner_id, name, dimension, metric, precision, hnsw_m, "
        "hnsw_ef_construction) VALUES ($1, $2, 4, 'cosine', 'float32', 16, 64) RETURNING id",
        alice.user_id,
        name,
    )
    await db.execute(
        f'CREATE TABLE "vector_items_{new_id.hex}" PARTITION OF vector_items '
        f"FOR VALUES IN ('{new_id}')"
    )
    details = await expect_rpc_error(
        _drain(vector_stub.SearchSimilar(request, metadata=alice.metadata))
    )
    assert details.code == grpc.StatusCode.ABORTED
    assert await _drain(vector_stub.SearchSimilar(request, metadata=alice.metadata)) == []
