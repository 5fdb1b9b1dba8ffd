"""SearchSimilarBatch (each result what SearchSimilar answers), group_by,
ListItems / CountItems scrolling, and tenancy of every new RPC."""

import asyncio

import grpc
import numpy as np
import pytest
import pytest_asyncio
from observatory.v1 import vector_pb2

from tests.helpers import expect_rpc_error, new_caller
from tests.vectors.helpers import clustered, create_collection, items, search, upsert

pytestmark = [pytest.mark.asyncio, pytest.mark.usefixtures("drop_vector_collections")]
COUNT = 1500
DIMENSION = 16


@pytest.fixture(scope="module")
def owner():
    return new_caller()


@pytest.fixture(scope="module")
def sample() -> np.ndarray:
    return clustered(COUNT + 20, DIMENSION, seed=3)


@pytest_asyncio.fixture(scope="module")
async def collection(channel, owner, sample) -> str:
    from observatory.v1 import vector_pb2_grpc

    stub = vector_pb2_grpc.VectorServiceStub(channel)
    name = await create_collection(stub, owner, DIMENSION)
    batch = items(
        sample[:COUNT],
        metadata=[{"doc": f"d{i % 100}", "rank": float(i % 10)} for i in range(COUNT)],
    )
    for i, item in enumerate(batch):
        item.url = f"https://example.org/{i % 40}"
    response = await upsert(stub, owner, name, batch)
    assert response.upserted == COUNT
    return name


def _queries(sample: np.ndarray) -> list[np.ndarray]:
    return list(sample[COUNT:])


def _key(hits):
    return [
        (h.item.id, h.score, h.distance, h.item.SerializeToString(deterministic=True)) for h in hits
    ]


async def test_each_batch_result_equals_searchsimilar(vector_stub, owner, collection, sample):
    queries = _queries(sample)
    shapes = [
        {},
        {"ef_search": 80},
        {"exact": True, "with_metadata": True},
        {"filter": {"doc": "d7"}},
        {"where": vector_pb2.Filter(must=[vector_pb2.Condition(key="rank", range={"lt": 3})])},
        {"top_k": 3, "with_vector": True, "score_threshold": 0.5},
        {"group_by": "doc", "group_size": 2, "top_k": 7},
    ]
    searches = [
        vector_pb2.SimilarQuery(vector=q.tolist(), **shapes[i % len(shapes)])
        for i, q in enumerate(queries)
    ]
    response = await vector_stub.SearchSimilarBatch(
        vector_pb2.SearchSimilarBatchRequest(collection=collection, searches=searches),
        metadata=owner.metadata,
    )
    assert len(response.results) == len(searches)
    for query, result in zip(searches, response.results, strict=True):
        fields = {f.name: v for f, v in query.ListFields()}
        single = await search(vector_stub, owner, collection=collection, **fields)
        assert single and _key(result.hits) == _key(single)


async def test_group_by_keeps_group_size_per_value_best_first(
    vector_stub, owner, collection, sample
):
    data = sample[:COUNT]
    query = sample[COUNT]
    similarity = data @ query / (np.linalg.norm(data, axis=1) * np.linalg.norm(query))
    order = np.argsort(-similarity, kind="stable")
    for group_by, key_of, size in (
        ("doc", lambda i: i % 100, 2),
        ("url", lambda i: i % 40, 1),
        ("rank", lambda i: i % 10, 3),  # 10 groups: fewer than top_k x group_size hits exist
    ):
        per_group: dict[int, int] = {}
        truth = []
        for i in order:
            if per_group.get(key_of(i), 0) < size:
                per_group[key_of(i)] = per_group.get(key_of(i), 0) + 1
                truth.append(f"item-{i}")
        for exact in (True, False):
            hits = await search(
                vector_stub,
                owner,
                collection=collection,
                vector=query,
                top_k=40,
                group_by=group_by,
                group_size=size,
                exact=exact,
            )
            found = [h.item.id for h in hits]
            assert len(found) == min(40, len(truth)), (group_by, exact)
            counts: dict[int, int] = {}
            for item in found:
                group = key_of(int(item.removeprefix("item-")))
                counts[group] = counts.get(group, 0) + 1
            assert max(counts.values()) <= size
            assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
            if exact:
                assert found == truth[:40]
            else:
                assert len(set(found) & set(truth[:40])) >= 0.9 * len(found)


async def test_group_by_content_id_skips_items_without_one(vector_stub, owner, content_stub):
    from observatory.v1 import content_pb2

    from tests.helpers import make_content

    contents = [
        await content_stub.CreateContent(
            content_pb2.CreateContentRequest(content=make_content()), metadata=owner.metadata
        )
        for _ in range(3)
    ]
    name = await create_collection(vector_stub, owner, 4)
    vectors = clustered(30, 4, seed=9)
    batch = items(vectors)
    for i, item in enumerate(batch):
        if i % 4:
            item.content_id = contents[i % 3].id
    await upsert(vector_stub, owner, name, batch)
    hits = await search(
        vector_stub, owner, collection=name, vector=vectors[0], top_k=10, group_by="content_id"
    )
    assert sorted(h.item.content_id for h in hits) == sorted(c.id for c in contents)


async def test_batch_validates_each_search(vector_stub, owner, collection):
    cases = [
        ([], "searches"),
        ([vector_pb2.SimilarQuery(vector=[1.0] * DIMENSION)] * 101, "searches"),
        (
            [
                vector_pb2.SimilarQuery(vector=[1.0] * DIMENSION),
                vector_pb2.SimilarQuery(vector=[1.0] * 3),
            ],
            "searches[1].vector",
        ),
        ([vector_pb2.SimilarQuery(vector=[1.0] * DIMENSION, top_k=5000)], "searches[0].top_k"),
        (
            [vector_pb2.SimilarQuery(vector=[1.0] * DIMENSION, oversampling=0.5)],
            "searches[0].oversampling",
        ),
        ([vector_pb2.SimilarQuery(vector=[3e38] * DIMENSION)], "searches[0].vector"),
    ]
    for searches, field in cases:
        details = await expect_rpc_error(
            vector_stub.SearchSimilarBatch(
                vector_pb2.SearchSimilarBatchRequest(collection=collection, searches=searches),
                metadata=owner.metadata,
            )
        )
        assert details.code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.fields == [field]


async def test_scroll_returns_each_item_once_while_items_are_upserted(vector_stub, owner):
    name = await create_collection(vector_stub, owner, 4)
    vectors = clustered(600, 4, seed=4)
    await upsert(vector_stub, owner, name, items(vectors))
    seen: list[str] = []

    async def scroll() -> None:
        token = ""
        while True:
            page = await vector_stub.ListItems(
                vector_pb2.ListItemsRequest(collection=name, page_size=25, page_token=token),
                metadata=owner.metadata,
            )
            seen.extend(item.id for item in page.items)
            token = page.next_page_token
            if not token:
                return
            await asyncio.sleep(0)

    async def churn() -> None:
        for round_ in range(10):
            replaced = items(vectors[round_ * 50 : round_ * 50 + 50] + 1)
            for j, item in enumerate(replaced):
                item.id = f"item-{round_ * 50 + j}"
            fresh = [vector_pb2.Item(id=f"new-{round_}-{j}", vector=[1, 2, 3, 4]) for j in range(5)]
            await upsert(vector_stub, owner, name, replaced + fresh)

    await asyncio.gather(scroll(), churn())
    assert len(seen) == len(set(seen))
    assert {f"item-{i}" for i in range(600)} <= set(seen)
    assert seen == sorted(seen)
    total = await vector_stub.CountItems(
        vector_pb2.CountItemsRequest(collection=name), metadata=owner.metadata
    )
    assert total.count == 650


async def test_list_items_pages_end_early_by_bytes(vector_stub, owner):
    name = await create_collection(vector_stub, owner, 2000)
    await upsert(vector_stub, owner, name, items(clustered(400, 2000, seed=2)), per_message=100)
    page = await vector_stub.ListItems(
        vector_pb2.ListItemsRequest(collection=name, page_size=1000, with_vector=True),
        metadata=owner.metadata,
    )
    assert 100 < len(page.items) < 400 and page.next_page_token
    assert len(page.items[0].vector) == 2000
    assert page.ByteSize() < 4 * 1024 * 1024


async def test_a_page_token_belongs_to_its_filter(vector_stub, owner, collection):
    page = await vector_stub.ListItems(
        vector_pb2.ListItemsRequest(collection=collection, page_size=5), metadata=owner.metadata
    )
    details = await expect_rpc_error(
        vector_stub.ListItems(
            vector_pb2.ListItemsRequest(
                collection=collection,
                page_size=5,
                page_token=page.next_page_token,
                where=vector_pb2.Filter(must=[vector_pb2.Condition(key="doc", exists=True)]),
            ),
            metadata=owner.metadata,
        )
    )
    assert details.fields == ["page_token"]


async def test_every_new_rpc_sees_only_the_callers_collections(vector_stub, owner, collection):
    stranger = new_caller()
    calls = [
        vector_stub.SearchSimilarBatch(
            vector_pb2.SearchSimilarBatchRequest(
                collection=collection,
                searches=[vector_pb2.SimilarQuery(vector=[1.0] * DIMENSION)],
            ),
            metadata=stranger.metadata,
        ),
        vector_stub.ListItems(
            vector_pb2.ListItemsRequest(collection=collection), metadata=stranger.metadata
        ),
        vector_stub.CountItems(
            vector_pb2.CountItemsRequest(collection=collection), metadata=stranger.metadata
        ),
        vector_stub.CreateMetadataIndex(
            vector_pb2.CreateMetadataIndexRequest(
                collection=collection, key="doc", type=vector_pb2.METADATA_INDEX_TYPE_KEYWORD
            ),
            metadata=stranger.metadata,
        ),
    ]
    for call in calls:
        details = await expect_rpc_error(call)
        assert details.code == grpc.StatusCode.NOT_FOUND
    got = await vector_stub.GetCollection(
        vector_pb2.GetCollectionRequest(name=collection), metadata=owner.metadata
    )
    assert not got.metadata_indexes


async def test_create_metadata_index_validates(vector_stub, owner, collection):
    for request, field in (
        (vector_pb2.CreateMetadataIndexRequest(collection=collection, key="doc"), "type"),
        (vector_pb2.CreateMetadataIndexRequest(collection=collection, key="", type=1), "key"),
        (vector_pb2.CreateMetadataIndexRequest(collection="Bad", key="a", type=1), "collection"),
    ):
        details = await expect_rpc_error(
            vector_stub.CreateMetadataIndex(request, metadata=owner.metadata)
        )
        assert details.fields == [field]
