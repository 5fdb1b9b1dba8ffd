"""Dimensions above the HNSW limits and binary quantization: expression
indexes over halfvec and binary_quantize, candidates re-ranked by exact
distance, recall against numpy's exact answers."""

import numpy as np
import pytest
from observatory.v1 import vector_pb2

from server.vectors.repository import CollectionRepository
from tests.vectors.helpers import (
    clustered,
    create_collection,
    embedding_like,
    exact_top,
    items,
    search,
    upsert,
)

pytestmark = [pytest.mark.asyncio, pytest.mark.usefixtures("drop_vector_collections")]


def _recall(found: list[int], truth: list[int]) -> float:
    return len(set(found) & set(truth)) / len(truth)


def _ids(hits) -> list[int]:
    return [int(h.item.id.removeprefix("item-")) for h in hits]


async def _index_definition(app, caller, name) -> tuple[str, int]:
    async with app.units.read() as uow:
        spec = await CollectionRepository(uow).find(caller.user_id, name)
        row = await uow.driver.fetchrow(
            "SELECT indexdef, pg_relation_size(indexname::regclass) AS size FROM pg_indexes "
            "WHERE indexname = $1",
            spec.index_name.strip('"'),
        )
    return row["indexdef"], row["size"]


async def _recall_of(stub, caller, name, data, queries, **fields) -> float:
    recalls = []
    for query in queries:
        hits = await search(stub, caller, collection=name, vector=query, top_k=10, **fields)
        assert len(hits) == 10
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=True)  # re-ranked exactly
        recalls.append(_recall(_ids(hits), exact_top(data, query, 10)))
    return float(np.mean(recalls))


async def test_a_float32_collection_of_3072_dimensions_is_indexed_as_halfvec(
    app, vector_stub, alice
):
    sample = clustered(420, 3072, seed=21)
    data, queries = sample[:400], sample[400:]
    name = await create_collection(vector_stub, alice, 3072)
    response = await upsert(vector_stub, alice, name, items(data), per_message=100)
    assert response.upserted == 400
    definition, _ = await _index_definition(app, alice, name)
    assert "halfvec(3072)" in definition and "halfvec_cosine_ops" in definition
    assert await _recall_of(vector_stub, alice, name, data, queries) >= 0.95
    hit = (await search(vector_stub, alice, collection=name, vector=queries[0], top_k=1))[0]
    best = data[_ids([hit])[0]]
    cosine = float(best @ queries[0] / (np.linalg.norm(best) * np.linalg.norm(queries[0])))
    assert hit.score == pytest.approx(cosine, abs=1e-5)  # the float32 distance, not halfvec's


async def test_binary_quantization_re_ranks_its_candidates(app, vector_stub, alice):
    # Binary quantization suits embedding-like data (here a 24-dimensional
    # structure in 512 dimensions); isotropic clusters would need far more
    # candidates.
    sample = embedding_like(2020, 512, seed=5)
    data, queries = sample[:2000], sample[2000:]
    full = await create_collection(vector_stub, alice, 512)
    binary = await create_collection(
        vector_stub, alice, 512, quantization=vector_pb2.QUANTIZATION_BINARY
    )
    got = await vector_stub.GetCollection(
        vector_pb2.GetCollectionRequest(name=binary), metadata=alice.metadata
    )
    assert got.quantization == vector_pb2.QUANTIZATION_BINARY
    for name in (full, binary):
        await upsert(vector_stub, alice, name, items(data))
    definition, binary_size = await _index_definition(app, alice, binary)
    assert "binary_quantize" in definition and "bit_hamming_ops" in definition
    _, full_size = await _index_definition(app, alice, full)
    assert binary_size < full_size / 2
    low = await _recall_of(vector_stub, alice, binary, data, queries, oversampling=1)
    default = await _recall_of(vector_stub, alice, binary, data, queries)
    high = await _recall_of(vector_stub, alice, binary, data, queries, oversampling=20)
    assert low < default <= high and default >= 0.95, (low, default, high)
    exact = await _recall_of(vector_stub, alice, binary, data, queries, exact=True)
    assert exact == 1.0


async def test_float16_above_4000_dimensions_is_binary_indexed(app, vector_stub, alice):
    sample = embedding_like(160, 8000, seed=8)
    data, queries = sample[:150], sample[150:]
    name = await create_collection(vector_stub, alice, 8000, precision=vector_pb2.PRECISION_FLOAT16)
    response = await upsert(vector_stub, alice, name, items(data), per_message=25)
    assert response.upserted == 150
    definition, _ = await _index_definition(app, alice, name)
    assert "bit(8000)" in definition
    # 150 items over 100 clusters: neighbours across clusters, hard for bits.
    assert await _recall_of(vector_stub, alice, name, data, queries) >= 0.75
    assert await _recall_of(vector_stub, alice, name, data, queries, oversampling=10) >= 0.95
    hits = await search(
        vector_stub, alice, collection=name, vector=data[17], top_k=3, with_vector=True
    )
    assert _ids(hits)[0] == 17 and len(hits[0].item.vector) == 8000
