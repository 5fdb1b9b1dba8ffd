"""Helpers for the VectorService tests: seeded clustered vectors, collections,
upserts and searches."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
from observatory.v1 import vector_pb2

from tests.helpers import Caller


def clustered(count: int, dimension: int, *, clusters: int = 20, seed: int = 7) -> np.ndarray:
    """`count` float32 vectors around `clusters` random centres (a fixed seed)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dimension)).astype(np.float32)
    labels = rng.integers(0, clusters, size=count)
    noise = rng.normal(scale=0.35, size=(count, dimension)).astype(np.float32)
    return (centres[labels] + noise).astype(np.float32)


def collection_name() -> str:
    return "c_" + uuid.uuid4().hex[:12]


async def create_collection(stub, caller: Caller, dimension: int, **fields: Any) -> str:
    name = fields.pop("name", None) or collection_name()
    await stub.CreateCollection(
        vector_pb2.CreateCollectionRequest(
            collection=vector_pb2.Collection(name=name, dimension=dimension, **fields)
        ),
        metadata=caller.metadata,
    )
    return name


def items(
    vectors: np.ndarray, *, metadata: Sequence[dict[str, Any]] | None = None, **fields: Any
) -> list[vector_pb2.Item]:
    out = []
    for i, vector in enumerate(vectors):
        item = vector_pb2.Item(id=f"item-{i}", vector=vector.tolist(), **fields)
        if metadata is not None:
            item.metadata.update(metadata[i])
        out.append(item)
    return out


async def upsert(
    stub, caller: Caller, name: str, batch: Sequence[vector_pb2.Item], per_message: int = 500
) -> vector_pb2.UpsertItemsResponse:
    async def requests():
        for start in range(0, max(len(batch), 1), per_message):
            yield vector_pb2.UpsertItemsRequest(
                collection=name if start == 0 else "", items=batch[start : start + per_message]
            )

    return await stub.UpsertItems(requests(), metadata=caller.metadata)


async def search(stub, caller: Caller, **fields: Any) -> list[vector_pb2.ScoredItem]:
    vector = fields.pop("vector", None)
    if vector is not None:
        fields["vector"] = list(map(float, vector))
    call = stub.SearchSimilar(vector_pb2.SearchSimilarRequest(**fields), metadata=caller.metadata)
    return [hit async for hit in call]


def exact_top(data: np.ndarray, query: np.ndarray, k: int, metric: str = "cosine") -> list[int]:
    """Indices of the k nearest rows by numpy (ground truth)."""
    if metric == "cosine":
        norms = np.linalg.norm(data, axis=1) * np.linalg.norm(query)
        order = -(data @ query) / norms
    elif metric == "l2":
        order = np.linalg.norm(data - query, axis=1)
    else:
        order = -(data @ query)
    return [int(i) for i in np.argsort(order, kind="stable")[:k]]


def index_of(hit: vector_pb2.ScoredItem) -> int:
    return int(hit.item.id.removeprefix("item-"))


def embedding_like(count: int, dimension: int, *, seed: int = 42) -> np.ndarray:
    """Vectors around 100 centres, each cluster spread over a 24-dimensional
    subspace plus a little noise: like real embeddings (and bench.vectors), an
    intrinsic dimension far below `dimension`."""
    rng = np.random.default_rng(seed)
    clusters, latent = 100, 24
    centres = rng.normal(size=(clusters, dimension))
    bases = rng.normal(size=(clusters, latent, dimension)) / np.sqrt(latent)
    labels = rng.integers(0, clusters, size=count)
    vectors = rng.normal(scale=0.05, size=(count, dimension))
    spread = rng.normal(size=(count, latent)) * 0.6
    for cluster in range(clusters):
        members = labels == cluster
        vectors[members] += centres[cluster] + spread[members] @ bases[cluster]
    return vectors.astype(np.float32)
