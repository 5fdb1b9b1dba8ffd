"""Vector protos <-> validated values. Every check names the offending field."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf import struct_pb2
from observatory.v1 import vector_pb2

from server import errors, validate
from server.protoconv import (
    MAX_STRUCT_BYTES,
    MAX_STRUCT_DEPTH,
    bounded_struct,
    dict_to_struct,
    optional_uuid,
    set_timestamp,
    struct_to_dict,
    to_json,
)
from server.urls import normalize_url
from server.vectors import filters
from server.vectors.repository import (
    GROUP_COLUMNS,
    CollectionSpec,
    Hits,
    SimilarSearch,
    binary_vectors,
)
from server.vectors.wire import WireItem

SimilarRequest = vector_pb2.SearchSimilarRequest | vector_pb2.SimilarQuery

NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,62}")
MAX_DIMENSION = 16_000  # pgvector's storage limit (the contract's range)
FLOAT16_MAX = 65_504.0
MAX_ITEM_ID = 256
DEFAULT_TOP_K = 10
MAX_TOP_K = 1000
DEFAULT_HNSW_M = 16
DEFAULT_EF_CONSTRUCTION = 64
MAX_EF_SEARCH = 1000
DEFAULT_OVERSAMPLING = 4.0
MAX_OVERSAMPLING = 100.0
MAX_SEARCHES = 100
MAX_GROUP_SIZE = 1000
# Item.text: the documented limit (only its first 100,000 characters are
# searchable, see tables.ITEM_SEARCH_VECTOR).
MAX_ITEM_TEXT_CHARS = validate.MAX_TEXT_CHARS
# Item.metadata: at most this many bytes as the Struct's protobuf encoding
# (about its size as JSON), objects and arrays nested at most this deep.
MAX_ITEM_METADATA_BYTES = MAX_STRUCT_BYTES
MAX_ITEM_METADATA_DEPTH = MAX_STRUCT_DEPTH

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
QUANTIZATIONS = {
    vector_pb2.QUANTIZATION_UNSPECIFIED: "none",
    vector_pb2.QUANTIZATION_BINARY: "binary",
}
QUANTIZATION_ENUMS = {name: enum for enum, name in QUANTIZATIONS.items()}


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
    if message.quantization not in QUANTIZATIONS:
        raise errors.InvalidArgument(
            "collection.quantization", f"unknown quantization {message.quantization}"
        )
    precision = PRECISIONS[message.precision]
    dimension = _in_range(message.dimension, 1, MAX_DIMENSION, "collection.dimension")
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
        "quantization": QUANTIZATIONS[message.quantization],
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
        quantization=QUANTIZATION_ENUMS[spec.quantization],
    )
    for key, kind in spec.metadata_indexes:
        message.metadata_indexes.add(key=key, type=filters.INDEX_TYPE_ENUMS[kind])
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
    with np.errstate(over="ignore"):
        norm = np.linalg.norm(array)
    if not np.isfinite(norm):
        # Each value fits a float32 but their norm does not: every distance
        # to this vector would be NaN or infinite.
        raise errors.InvalidArgument(field, "has values so large that its norm overflows")
    if spec.precision == "float16" and np.abs(array).max() > FLOAT16_MAX:
        raise errors.InvalidArgument(
            field, f"holds a value beyond float16's range (|value| <= {FLOAT16_MAX:g})"
        )
    return array


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
        return to_json(struct_to_dict(value))
    except ValueError as exc:
        raise errors.InvalidArgument(field, str(exc)) from None


def item_records(
    items: Sequence[WireItem], spec: CollectionSpec
) -> list[tuple[Any, ...] | errors.InvalidArgument]:
    """Per item, its COPY record (repository.STAGED_COLUMNS order) or why it is
    refused (fields relative to the item). The vectors of all `items` (as
    server.vectors.wire decodes them) are converted and checked together,
    with one numpy call each."""
    vectors, problems = _item_vectors(items, spec)
    half = spec.precision == "float16"
    out: list[tuple[Any, ...] | errors.InvalidArgument] = []
    for item, vector, problem in zip(items, vectors, problems, strict=True):
        if problem is not None:
            out.append(errors.InvalidArgument("vector", problem))
            continue
        try:
            url = validate.text(item.url, "url", max_bytes=validate.MAX_KEY_BYTES) or None
            out.append(
                (
                    check_item_id(item.id, "id"),
                    None if half else vector,
                    vector if half else None,
                    validate.text(item.text, "text", max_chars=MAX_ITEM_TEXT_CHARS) or None,
                    item_metadata(item.metadata),
                    optional_uuid(item.content_id, "content_id"),
                    url,
                    normalize_url(url),
                )
            )
        except errors.InvalidArgument as error:
            out.append(error)
    return out


def _item_vectors(
    items: Sequence[WireItem], spec: CollectionSpec
) -> tuple[list[Any], list[str | None]]:
    """The items' vectors in the collection's binary form, and per item why its
    vector is refused (None: it is not), as `vector_value` would refuse it.
    Each vector arrives as its float32 bytes: the right-sized ones are read
    by one np.frombuffer, not value by value."""
    dimension = spec.dimension
    width = 4 * dimension
    raw = [item.vector for item in items]
    problems: list[str | None] = [
        None
        if len(vector) == width
        else f"has {len(vector) // 4} values; the collection's dimension is {dimension}"
        for vector in raw
    ]
    sized = [i for i, problem in enumerate(problems) if problem is None]
    matrix: np.ndarray[Any, Any]
    if len(sized) == len(items):  # the usual message: one read-only view, no copy
        matrix = np.frombuffer(b"".join(raw), "<f4").reshape(len(items), dimension)
    else:
        matrix = np.zeros((len(items), dimension), np.float32)
        if sized:
            matrix[sized] = np.frombuffer(b"".join(raw[i] for i in sized), "<f4").reshape(
                len(sized), dimension
            )
    with np.errstate(over="ignore", invalid="ignore"):
        finite = np.logical_and.reduce(np.isfinite(matrix), axis=1)
        # Each value fits a float32 but their norm may not: every distance to
        # such a vector would be NaN or infinite.
        norm_finite = np.isfinite(np.linalg.norm(matrix, axis=1))
        beyond_half = (
            np.abs(matrix).max(axis=1) > FLOAT16_MAX
            if spec.precision == "float16"
            else np.zeros(len(items), bool)
        )
    for i in np.flatnonzero(~finite | ~norm_finite | beyond_half):
        if problems[i] is not None:
            continue
        if not finite[i]:
            problems[i] = "must hold finite numbers only (no NaN or infinity)"
        elif not norm_finite[i]:
            problems[i] = "has values so large that its norm overflows"
        else:
            problems[i] = f"holds a value beyond float16's range (|value| <= {FLOAT16_MAX:g})"
    return binary_vectors(matrix, spec.precision), problems


def item_metadata(value: struct_pb2.Struct) -> str:
    """Item.metadata as JSON (within the bounds of protoconv.bounded_struct)."""
    if not value.fields:  # most items carry none: skip the conversion
        return "{}"
    return to_json(bounded_struct(value, "metadata"))


def filter_json(value: struct_pb2.Struct, field: str = "filter") -> str | None:
    """A metadata filter as JSON for `metadata @> filter`; None for no filter."""
    return metadata_json(value, field) if value.fields else None


def top_k(value: int, field: str = "top_k") -> int:
    return _in_range(value or DEFAULT_TOP_K, 1, MAX_TOP_K, field)


def ef_search(request: SimilarRequest, prefix: str = "") -> int | None:
    if not request.HasField("ef_search"):
        return None
    return _in_range(request.ef_search, 1, MAX_EF_SEARCH, f"{prefix}ef_search")


def score_threshold(request: SimilarRequest, prefix: str = "") -> float | None:
    if not request.HasField("score_threshold"):
        return None
    if not math.isfinite(request.score_threshold):
        raise errors.InvalidArgument(f"{prefix}score_threshold", "must be a finite number")
    return request.score_threshold


def oversampling(value: float, field: str) -> float:
    if value == 0:
        return DEFAULT_OVERSAMPLING
    if not math.isfinite(value) or not 1.0 <= value <= MAX_OVERSAMPLING:
        raise errors.InvalidArgument(field, f"must be between 1 and {MAX_OVERSAMPLING:g}")
    return value


def group_by(value: str, field: str) -> str | tuple[str, ...] | None:
    """A group key: a column of GROUP_COLUMNS, or a metadata key's path."""
    if not value:
        return None
    if value in GROUP_COLUMNS:
        return value
    return filters.key_path(value, field)


@dataclass(frozen=True, slots=True)
class Similar:
    """A checked similarity search, before its vector is checked against the
    collection, and the score threshold applied to its hits."""

    vector: Sequence[float]
    search: SimilarSearch
    threshold: float | None


def similar(request: SimilarRequest, prefix: str = "") -> Similar:
    """SearchSimilarRequest or one SimilarQuery, checked (fields named with
    `prefix`, e.g. "searches[3].")."""
    group_size = request.group_size or 1
    _in_range(group_size, 1, MAX_GROUP_SIZE, f"{prefix}group_size")
    search = SimilarSearch(
        vector=None,
        top_k=top_k(request.top_k, f"{prefix}top_k"),
        filter_json=filter_json(request.filter, f"{prefix}filter"),
        where=filters.parse(request.where, f"{prefix}where"),
        exact=request.exact,
        hits=Hits(with_vector=request.with_vector, with_metadata=request.with_metadata),
        ef_search=ef_search(request, prefix),
        oversampling=oversampling(request.oversampling, f"{prefix}oversampling"),
        group_by=group_by(request.group_by, f"{prefix}group_by"),
        group_size=group_size,
    )
    return Similar(request.vector, search, score_threshold(request, prefix))


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
