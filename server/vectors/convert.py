"""Vector protos <-> validated values. Every check names the offending field."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from google.protobuf import struct_pb2
from observatory.v1 import vector_pb2

from server import errors
from server.protoconv import dict_to_struct, optional_uuid, set_timestamp, struct_to_dict
from server.urls import normalize_url
from server.vectors.repository import CollectionSpec, Hits, dump_json

NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,62}")
MAX_DIMENSION = 16_000  # pgvector's storage limit (the contract's range)
# HNSW indexes at most this many dimensions per precision (pgvector 0.8).
MAX_INDEXED_DIMENSION = {"float32": 2_000, "float16": 4_000}
FLOAT16_MAX = 65_504.0
MAX_ITEM_ID = 256
DEFAULT_TOP_K = 10
MAX_TOP_K = 1000
DEFAULT_HNSW_M = 16
DEFAULT_EF_CONSTRUCTION = 64
MAX_EF_SEARCH = 1000

METRICS = {
    vector_pb2.METRIC_UNSPECIFIED: "cosine",
    vector_pb2.METRIC_COSINE: "cosine",
    vector_pb2.METRIC_L2: "l2",
    vector_pb2.METRIC_INNER_PRODUCT: "inner_product",
}
METRIC_ENUMS = {
    "cosine": vector_pb2.METRIC_COSINE,
    "l2": vector_pb2.METRIC_L2,
    "inner_product": vector_pb2.METRIC_INNER_PRODUCT,
}
PRECISIONS = {
    vector_pb2.PRECISION_UNSPECIFIED: "float32",
    vector_pb2.PRECISION_FLOAT32: "float32",
    vector_pb2.PRECISION_FLOAT16: "float16",
}
PRECISION_ENUMS = {"float32": vector_pb2.PRECISION_FLOAT32, "float16": vector_pb2.PRECISION_FLOAT16}


def check_name(name: str, field: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise errors.InvalidArgument(
            field,
            "must match ^[a-z][a-z0-9_]{0,62}$ (a lower-case letter, then up to 62 "
            "lower-case letters, digits or underscores)",
        )
    return name


def _in_range(value: int, low: int, high: int, field: str) -> int:
    if not low <= value <= high:
        raise errors.InvalidArgument(field, f"must be between {low} and {high}, not {value}")
    return value


def collection_values(message: vector_pb2.Collection) -> dict[str, Any]:
    """The columns of a new collection (without owner), validated, defaults applied."""
    check_name(message.name, "collection.name")
    if message.metric not in METRICS:
        raise errors.InvalidArgument("collection.metric", f"unknown metric {message.metric}")
    if message.precision not in PRECISIONS:
        raise errors.InvalidArgument(
            "collection.precision", f"unknown precision {message.precision}"
        )
    precision = PRECISIONS[message.precision]
    dimension = _in_range(message.dimension, 1, MAX_DIMENSION, "collection.dimension")
    if dimension > MAX_INDEXED_DIMENSION[precision]:
        raise errors.InvalidArgument(
            "collection.dimension",
            f"HNSW indexes {precision} vectors of at most {MAX_INDEXED_DIMENSION[precision]} "
            "dimensions; use PRECISION_FLOAT16 for up to 4000",
        )
    m = _in_range(message.hnsw_m or DEFAULT_HNSW_M, 2, 100, "collection.hnsw_m")
    ef_construction = _in_range(
        message.hnsw_ef_construction or DEFAULT_EF_CONSTRUCTION,
        4,
        1000,
        "collection.hnsw_ef_construction",
    )
    if ef_construction < 2 * m:
        raise errors.InvalidArgument(
            "collection.hnsw_ef_construction", "must be at least twice hnsw_m"
        )
    return {
        "name": message.name,
        "dimension": dimension,
        "metric": METRICS[message.metric],
        "precision": precision,
        "hnsw_m": m,
        "hnsw_ef_construction": ef_construction,
    }


def collection_to_proto(spec: CollectionSpec, item_count: int) -> vector_pb2.Collection:
    message = vector_pb2.Collection(
        name=spec.name,
        dimension=spec.dimension,
        metric=METRIC_ENUMS[spec.metric],
        precision=PRECISION_ENUMS[spec.precision],
        hnsw_m=spec.hnsw_m,
        hnsw_ef_construction=spec.hnsw_ef_construction,
        item_count=item_count,
    )
    set_timestamp(message.create_time, spec.create_time)
    return message


def vector_value(values: Sequence[float], spec: CollectionSpec, field: str) -> np.ndarray[Any, Any]:
    """`values` as a float32 array, checked against the collection."""
    if len(values) != spec.dimension:
        raise errors.InvalidArgument(
            field, f"has {len(values)} values; the collection's dimension is {spec.dimension}"
        )
    array = np.asarray(values, dtype=np.float32)
    if not np.isfinite(array).all():
        raise errors.InvalidArgument(field, "must hold finite numbers only (no NaN or infinity)")
    if spec.precision == "float16" and np.abs(array).max() > FLOAT16_MAX:
        raise errors.InvalidArgument(
            field, f"holds a value beyond float16's range (|value| <= {FLOAT16_MAX:g})"
        )
    return array


def _text(value: str, field: str) -> str | None:
    if "\x00" in value:
        raise errors.InvalidArgument(field, "must not contain NUL characters")
    return value or None


def check_item_id(value: str, field: str) -> str:
    if not 1 <= len(value) <= MAX_ITEM_ID:
        raise errors.InvalidArgument(field, f"must be 1 to {MAX_ITEM_ID} characters long")
    if "\x00" in value:
        raise errors.InvalidArgument(field, "must not contain NUL characters")
    return value


def metadata_json(value: struct_pb2.Struct, field: str) -> str:
    if not value.fields:  # most items carry none: skip the conversion
        return "{}"
    try:
        return dump_json(struct_to_dict(value))
    except ValueError as exc:
        raise errors.InvalidArgument(field, str(exc)) from None


def item_record(item: vector_pb2.Item, spec: CollectionSpec) -> tuple[Any, ...]:
    """One COPY record (repository.STAGED_COLUMNS order); fields relative to the item."""
    vector = vector_value(item.vector, spec, "vector")
    url = _text(item.url, "url")
    return (
        check_item_id(item.id, "id"),
        vector if spec.precision == "float32" else None,
        vector if spec.precision == "float16" else None,
        _text(item.text, "text"),
        metadata_json(item.metadata, "metadata"),
        optional_uuid(item.content_id, "content_id"),
        url,
        normalize_url(url),
    )


def filter_json(value: struct_pb2.Struct, field: str = "filter") -> str | None:
    """A metadata filter as JSON for `metadata @> filter`; None for no filter."""
    return metadata_json(value, field) if value.fields else None


def top_k(value: int, field: str = "top_k") -> int:
    return _in_range(value or DEFAULT_TOP_K, 1, MAX_TOP_K, field)


def ef_search(request: vector_pb2.SearchSimilarRequest) -> int | None:
    if not request.HasField("ef_search"):
        return None
    return _in_range(request.ef_search, 1, MAX_EF_SEARCH, "ef_search")


def score_threshold(request: vector_pb2.SearchSimilarRequest) -> float | None:
    if not request.HasField("score_threshold"):
        return None
    if not math.isfinite(request.score_threshold):
        raise errors.InvalidArgument("score_threshold", "must be a finite number")
    return request.score_threshold


def item_to_proto(row: Any, spec: CollectionSpec, hits: Hits, target: vector_pb2.Item) -> None:
    """Fills `target` from a row with the columns `hits` selected."""
    target.id = row["id"]
    target.text = row["text"] or ""
    target.url = row["url"] or ""
    if row["content_id"] is not None:
        target.content_id = str(row["content_id"])
    if hits.with_metadata and row["metadata"]:
        dict_to_struct(row["metadata"], target.metadata)
    if hits.with_vector and row[spec.column] is not None:
        target.vector.extend(row[spec.column].to_list())


def scored_items(
    rows: Sequence[Any], spec: CollectionSpec, hits: Hits, threshold: float | None = None
) -> list[vector_pb2.ScoredItem]:
    """Search hits, best first. Rows with a `distance` (vector searches) are
    scored by the collection's metric and cut at `threshold`; rows with a
    `score` (text and hybrid) carry their own."""
    out: list[vector_pb2.ScoredItem] = []
    ranked = bool(rows) and "score" in rows[0]
    for row in rows:
        if ranked:
            hit = vector_pb2.ScoredItem(score=row["score"], distance=row.get("distance", 0.0))
        else:
            distance = row["distance"]
            value = score(spec, distance)
            if threshold is not None and value < threshold:
                break  # best first: every later hit scores lower still
            hit = vector_pb2.ScoredItem(score=value, distance=distance)
        item_to_proto(row, spec, hits, hit.item)
        out.append(hit)
    return out


def score(spec: CollectionSpec, distance: float) -> float:
    """Higher is better: cosine similarity, -L2 distance, or the dot product
    (pgvector's <#> is the negative inner product)."""
    return 1.0 - distance if spec.metric == "cosine" else -distance
