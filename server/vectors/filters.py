"""`where` (Filter, Condition) checked at the edge and compiled to SQL.

Every value and every key segment of a condition is a bind parameter: the SQL
text depends only on the filter's shape (which tests, how deep each key) and
on which keys the collection has indexed. A key with a metadata index of the
test's kind is read through that index's function (`vector_mi_<collection>_
<hash>(metadata)`, a server-made name, see migration 0008), the very
expression the index is built on, so the planner can use the index; any other
key is read as `metadata -> $a -> $b`. Both read the same value, so a search
answers the same with or without the index.

Semantics (the contract's): a condition on a missing key, or on a value of
the wrong type, is false and never an error, so `must_not` keeps items that
lack the key; `equals` and `any_of` on an array value match when an element
matches (jsonb `@>` of a scalar: equality, or membership of an array).
`range` reads numbers (`vector_number`), `time_range` RFC 3339 strings
(`vector_time`); both are NULL for anything else. `must` clauses stand bare
at the top level of the WHERE (NULL there is false), so an index can serve
them; `must_not` tests `IS NOT TRUE`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import struct_pb2
from observatory.v1 import vector_pb2

from server import errors, validate
from server.protoconv import timestamp_field

MAX_CONDITIONS = 64  # per list (must, should, must_not)
MAX_KEY_BYTES = 255
MAX_KEY_DEPTH = 16
MAX_VALUE_CHARS = validate.MAX_KEY_BYTES  # a string compared with equals / any_of

KEYWORD, NUMBER, TIME = "keyword", "number", "time"
INDEX_TYPES = {
    vector_pb2.METADATA_INDEX_TYPE_KEYWORD: KEYWORD,
    vector_pb2.METADATA_INDEX_TYPE_NUMBER: NUMBER,
    vector_pb2.METADATA_INDEX_TYPE_TIME: TIME,
}
INDEX_TYPE_ENUMS = {name: enum for enum, name in INDEX_TYPES.items()}


class Params:
    """The bind parameters of one statement: `add` returns the placeholder of
    the next one, cast to its type (`$4::jsonb`)."""

    __slots__ = ("types", "values")

    def __init__(self) -> None:
        self.values: list[Any] = []
        self.types: list[str] = []

    def add(self, value: Any, sql_type: str) -> str:
        self.values.append(value)
        self.types.append(sql_type)
        return f"${len(self.values)}::{sql_type}"


@dataclass(frozen=True, slots=True)
class Condition:
    """One checked condition: `test` is equals, any_of, range, time_range or
    exists; `value` its operand (JSON text, JSON texts, bounds, a bool)."""

    key: str
    path: tuple[str, ...]
    test: str
    value: Any


@dataclass(frozen=True, slots=True)
class Where:
    must: tuple[Condition, ...] = ()
    should: tuple[Condition, ...] = ()
    must_not: tuple[Condition, ...] = ()


def key_path(key: str, field: str) -> tuple[str, ...]:
    """A metadata key's path ("a.b" is key b of object a), checked."""
    validate.text(key, field, max_bytes=MAX_KEY_BYTES, required=True)
    path = tuple(key.split("."))
    if len(path) > MAX_KEY_DEPTH:
        raise errors.InvalidArgument(field, f"reaches deeper than {MAX_KEY_DEPTH} levels")
    if not all(path):
        raise errors.InvalidArgument(
            field, "has an empty segment (two dots in a row, or at an end)"
        )
    return path


def _scalar(value: struct_pb2.Value, field: str) -> str:
    """A Value compared with equals / any_of, as JSON text."""
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        validate.text(value.string_value, field, max_chars=MAX_VALUE_CHARS)
        return json.dumps(value.string_value, ensure_ascii=False)
    if kind == "number_value":
        return json.dumps(validate.finite(value.number_value, field))
    if kind == "bool_value":
        return "true" if value.bool_value else "false"
    if kind == "null_value":
        return "null"
    raise errors.InvalidArgument(field, "must be a string, a number, a bool or null")


def _bound(message: vector_pb2.Range, name: str, field: str) -> float | None:
    if not message.HasField(name):  # type: ignore[arg-type]
        return None
    return validate.finite(getattr(message, name), f"{field}.{name}")


def _condition(message: vector_pb2.Condition, field: str) -> Condition:
    path = key_path(message.key, f"{field}.key")
    test = message.WhichOneof("test")
    value: Any
    if test == "equals":
        value = _scalar(message.equals, f"{field}.equals")
    elif test == "any_of":
        values = message.any_of.values
        validate.items(values, f"{field}.any_of", validate.MAX_FILTER_VALUES)
        value = tuple(_scalar(v, f"{field}.any_of[{i}]") for i, v in enumerate(values))
    elif test == "range":
        value = tuple(
            _bound(message.range, name, f"{field}.range") for name in ("gt", "gte", "lt", "lte")
        )
    elif test == "time_range":
        value = (
            timestamp_field(message.time_range, "after", f"{field}.time_range.after"),
            timestamp_field(message.time_range, "before", f"{field}.time_range.before"),
        )
    elif test == "exists":
        value = message.exists
    else:
        raise errors.InvalidArgument(
            field, "needs a test: equals, any_of, range, time_range or exists"
        )
    return Condition(message.key, path, test, value)


def parse(message: vector_pb2.Filter, field: str = "where") -> Where | None:
    """The checked filter, or None when it has no conditions."""
    lists = []
    for name in ("must", "should", "must_not"):
        conditions = getattr(message, name)
        validate.items(conditions, f"{field}.{name}", MAX_CONDITIONS)
        lists.append(tuple(_condition(c, f"{field}.{name}[{i}]") for i, c in enumerate(conditions)))
    if not any(lists):
        return None
    return Where(*lists)


def index_function(collection_hex: str, key: str, kind: str) -> str:
    """The name of the function a metadata index of `kind` on `key` is built on
    (server-made: a hash of key and kind, never the key itself)."""
    digest = hashlib.sha256(f"{kind}\x00{key}".encode()).hexdigest()[:12]
    return f"vector_mi_{collection_hex}_{digest}"


# What each test reads: the value itself, or it as a number or an instant.
_KIND_OF_TEST = {
    "equals": KEYWORD,
    "any_of": KEYWORD,
    "exists": KEYWORD,
    "range": NUMBER,
    "time_range": TIME,
}
_CAST = {KEYWORD: "{}", NUMBER: "vector_number({})", TIME: "vector_time({})"}


class Compiler:
    """Compiles conditions of one collection (`indexed`: its (key, kind) pairs
    with a metadata index; `collection_hex`: its ID) into `params`."""

    def __init__(
        self, collection_hex: str, indexed: frozenset[tuple[str, str]], params: Params
    ) -> None:
        self._hex = collection_hex
        self._indexed = indexed
        self._params = params

    def value(self, path: Sequence[str]) -> str:
        """The jsonb value at `path` (NULL when missing), every segment bound."""
        return "metadata" + "".join(f" -> {self._params.add(s, 'text')}" for s in path)

    def _read(self, condition: Condition) -> str:
        kind = _KIND_OF_TEST[condition.test]
        if (condition.key, kind) in self._indexed:
            return f"{index_function(self._hex, condition.key, kind)}(metadata)"
        return _CAST[kind].format(self.value(condition.path))

    def clauses(self, condition: Condition) -> list[str]:
        """The condition as clauses that all hold (NULL counts as false)."""
        read = self._read(condition)
        add = self._params.add
        test, value = condition.test, condition.value
        if test == "equals":
            return [f"{read} @> {add(value, 'jsonb')}"]
        if test == "any_of":
            return [f"{read} @> ANY({add(list(value), 'jsonb[]')})"]
        if test == "exists":
            return [f"{read} IS {'NOT ' if value else ''}NULL"]
        if test == "range":
            ops = (">", ">=", "<", "<=")
            out = [
                f"{read} {op} ({add(bound, 'float8')})::numeric"
                for op, bound in zip(ops, value, strict=True)
                if bound is not None
            ]
        else:
            after, before = value
            out = []
            if after is not None:
                out.append(f"{read} >= {add(after, 'timestamptz')}")
            if before is not None:
                out.append(f"{read} < {add(before, 'timestamptz')}")
        return out or [f"{read} IS NOT NULL"]

    def where(self, where: Where) -> list[str]:
        """Clauses to AND at the top level of a WHERE."""
        out: list[str] = []
        for condition in where.must:
            out.extend(self.clauses(condition))
        if where.should:
            out.append("(" + " OR ".join(_all(self.clauses(c)) for c in where.should) + ")")
        for condition in where.must_not:
            out.append(f"{_all(self.clauses(condition))} IS NOT TRUE")
        return out


def _all(clauses: list[str]) -> str:
    return clauses[0] if len(clauses) == 1 else "(" + " AND ".join(clauses) + ")"
