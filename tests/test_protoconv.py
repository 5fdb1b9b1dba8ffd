"""Conversions between protobuf well-known types and Python values."""

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf import struct_pb2, timestamp_pb2

from server import protoconv
from server.content.convert import content_hash
from server.protoconv import set_timestamp, struct_to_dict


@pytest.mark.parametrize(
    "value",
    [
        datetime(2026, 11, 22, 17, 30, 1, 123456, tzinfo=UTC),
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2020, 6, 1, 12, 0, tzinfo=timezone(timedelta(hours=-7))),
    ],
)
def test_set_timestamp_matches_from_datetime(value):
    expected = timestamp_pb2.Timestamp()
    expected.FromDatetime(value)
    actual = timestamp_pb2.Timestamp()
    set_timestamp(actual, value)
    assert actual == expected


def _struct(value: dict) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct


def test_struct_to_dict_keeps_every_json_kind():
    value = {
        "s": "x",
        "n": 1.5,
        "b": True,
        "z": None,
        "l": [1.0, "a", [False]],
        "o": {"k": {"v": 2.0}},
    }
    assert struct_to_dict(_struct(value)) == value


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_struct_to_dict_refuses_non_finite_numbers(bad):
    with pytest.raises(ValueError, match="finite"):
        struct_to_dict(_struct({"deep": [{"x": bad}]}))


@pytest.mark.parametrize("value", [{"a\x00": 1.0}, {"a": "b\x00"}, {"a": ["\x00"]}])
def test_struct_to_dict_refuses_nul_characters(value):
    with pytest.raises(ValueError, match="NUL"):
        struct_to_dict(_struct(value))


def test_content_hash_normalises_case_width_and_whitespace():
    assert content_hash(None, "Hello   World\n") == content_hash(None, "hello world")
    full_width_hello = "\uff28\uff25\uff2c\uff2c\uff2f"
    assert content_hash(None, full_width_hello) == content_hash(None, "hello")  # NFKC
    assert content_hash(None, "Straße") == content_hash(None, "STRASSE")  # case-folded
    assert content_hash("Title only", "") == content_hash(None, "title only")
    assert content_hash("", "") is None
    assert content_hash(None, "   ") is None


@pytest.mark.parametrize(
    "value",
    [
        {},
        {"cluster": 12.0, "n": 3, "big": 2**70, "ok": True, "no": False, "none": None},
        {"å ü 🚀": 'tab\there "quoted" back\\slash \u2028 \x01', "": ""},
        {"nested": {"list": [1, 2.5, [], {}, [None, "x"]], "deep": {"a": {"b": [0.1, 1e300]}}}},
        [1, "two", 3.0],
        "plain text",
        -0.0,
    ],
)
def test_to_json_writes_what_json_dumps_writes(value):
    assert protoconv.to_json(value) == json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def test_to_json_refuses_what_is_not_json():
    with pytest.raises(TypeError, match="set"):
        protoconv.to_json({"k": {1, 2}})
