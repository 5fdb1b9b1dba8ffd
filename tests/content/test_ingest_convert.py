"""IngestContent's per-row conversion: its one-pass record of a plainly valid
row is the record the full checks make (CreateContent's), and every other row
is refused exactly as they refuse it."""

from __future__ import annotations

import json
import random
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from observatory.v1 import content_pb2

from server import errors
from server.content import convert

OWNER = uuid.UUID("6f1c2f1e-0000-4000-8000-000000000001")

# Values that pass or fail each check near its edge, for fields picked at random.
URLS = [
    "https://example.com/a?utm_source=x",
    "https://Example.COM/a/",
    "http://www.example.com",
    "https://www.example.com/?b=2&a=1&fbclid=z#top",
    "https://example.com./a",
    "https://example.com:443/a",
    "https://example.com:8443/a",
    "https://user:pw@example.com/a",
    "https://[::1]:8080/a",
    "https://[::1/a",
    "https://example.com/a b",
    "https://exa mple.com/a",
    "https://example.com/a\x7f",
    "https://example.com/\x00",
    "  https://example.com/a  ",
    "ftp://example.com/a",
    "example.com/a",
    "HTTPS://example.com/a",
    "https://",
    "https:///a",
    "https://example.com/a?q=%20x&b=+",
    "https://example.com/a?a=1=2",
    "https://example.com/a?&&a=&",
    "https://exämple.com/a",
    "https://example.com/ä?x=ü",
    "https://www./a",
    "https://-a-.com/a",
    "https://a.b-c.d/" + "p" * 1990,
    "https://a.b/" + "p" * 2500,
    "https://a.b/" + "ä" * 600,
    "https://example.com:x/a",
    "https://example.com#frag?x=1",
    "https://example.com?x=1/2",
    "https://example.com;p/a",
]
TEXTS = [
    "",
    "plain",
    "x" * 63,
    "x" * 64,
    "x" * 255,
    "x" * 256,
    "ä" * 127,
    "ä" * 128,
    "k" * 500,
    "k" * 2000,
    "k" * 2001,
    "é" * 1000,
    "é" * 1001,
    "nul\x00inside",
    "line\nbreak\ttab",
    "  spaced  ",
    "😀" * 400,
]
LANGUAGES = ["", "en", "pt-BR", "e", "english1", "zh-Hant-TW", "en_US", "x" * 300]
METADATA: list[dict[str, Any]] = [
    {},
    {"a": 1, "b": "two", "c": True, "d": None},
    {"nested": {"x": [1, 2, {"y": "z"}]}},
    {"nan": float("nan")},
    {"inf": float("-inf")},
    {"nul\x00key": 1},
    {"k": "nul\x00value"},
    {"deep": [[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]},
    {"list": ["a", 1.5, False]},
    {"big": "m" * (convert.MAX_METADATA_BYTES + 10)},
]


def _random_content(rng: random.Random) -> content_pb2.Content:
    """A row whose fields are each usually plain and valid, and otherwise one
    of the values near or past an edge above."""

    def pick(plain: Any, edges: list[Any]) -> Any:
        return plain if rng.random() < 0.9 else rng.choice(edges)

    message = content_pb2.Content(
        platform=pick("twitter", ["", "x" * 255, "x" * 256, "ä" * 128, "ä" * 63]),
        arena=pick("news", TEXTS[:8]),
        platform_id=pick("p-1", TEXTS),
        content_type=pick("post", ["", "nul\x00", "x" * 256]),
        title=pick("A title", TEXTS),
        text_content=pick("Body text", ["", "Ünïcode body", "x" * 1_000_001, "x\x00"]),
        url=pick("https://example.com/p/1?utm_source=b", [*URLS, ""]),
        language=pick("en", LANGUAGES),
        author_platform_id=pick("user1", TEXTS),
        author_display_name=pick("User 1", ["", "n" * 10_000, "n" * 10_001]),
        collection_run_id=pick("run-1", TEXTS),
        author_id=pick("", [str(uuid.uuid4()), "not-a-uuid", "{" + "0" * 32 + "}"]),
        search_terms_matched=pick(
            ["a", "b"], [[], ["k" * 2001], ["nul\x00"], ["t"] * 1001, ["é" * 600], ["k" * 2000]]
        ),
    )
    for name in convert.COUNT_FIELDS:
        count = pick(7, [None, 0, -1])
        if count is not None:
            setattr(message, name, count)
    for name in convert.TIME_FIELDS:
        choice = pick("now", ["unset", "min", "max", "before", "after", "bad nanos"])
        if choice == "unset":
            continue
        ts = getattr(message, name)
        if choice == "now":
            ts.FromDatetime(datetime(2026, 5, 17, 12, 0, 1, 123456, tzinfo=UTC))
            ts.nanos += 789
        elif choice == "min":
            ts.seconds = -62135596800
        elif choice == "max":
            ts.seconds, ts.nanos = 253402300799, 999_999_999
        elif choice == "before":
            ts.seconds = -62135596801
        elif choice == "after":
            ts.seconds = 253402300800
        else:
            ts.seconds, ts.nanos = 0, -1
    metadata = pick({"score": 0.5, "source": "b", "rank": 3}, METADATA)
    if metadata:
        message.raw_metadata.update(metadata)
    return message


def _reference(message: content_pb2.Content) -> tuple[Any, ...]:
    """The record of the full checks, which CreateContent runs."""
    values = convert.new_content_values(message, OWNER)
    values["raw_metadata"] = json.dumps(
        values["raw_metadata"], separators=(",", ":"), ensure_ascii=False
    )
    return tuple(values[column] for column in convert.INSERT_COLUMNS)


def _outcome(convert_row: Any, message: content_pb2.Content) -> Any:
    try:
        return ("record", convert_row(message))
    except errors.InvalidArgument as error:
        return ("refused", error.field, error.field_violations[0][1])


def test_every_row_converts_or_is_refused_exactly_as_the_full_checks_do() -> None:
    rng = random.Random(20261206)
    outcomes = {"one pass": 0, "record": 0, "refused": 0}
    for _ in range(5000):
        message = _random_content(rng)
        fast = _outcome(lambda m: convert.ingest_record(m, OWNER), message)
        assert fast == _outcome(_reference, message), message
        outcomes[fast[0]] += 1
        if fast[0] == "record":
            outcomes["one pass"] += convert._plain_record(message, OWNER) is not None
    # Both paths and both outcomes were exercised.
    assert outcomes["one pass"] > 100
    assert outcomes["record"] - outcomes["one pass"] > 100
    assert outcomes["refused"] > 1000, outcomes


def test_a_plain_row_takes_the_one_pass_path_and_matches_the_full_checks() -> None:
    message = content_pb2.Content(
        platform="twitter",
        platform_id="1",
        title="Hello",
        url="https://www.Example.com/a/?b=2&utm_source=x&a=1#c",
        language="en",
        likes_count=3,
        search_terms_matched=["x"],
    )
    message.published_at.FromDatetime(datetime(2026, 1, 2, tzinfo=UTC))
    message.raw_metadata.update({"score": 0.5, "tag": "t", "ok": True, "none": None})
    record = convert._plain_record(message, OWNER)
    assert record is not None
    assert record == _reference(message)
    assert record[convert.INSERT_COLUMNS.index("url_normalized")] == (
        "https://example.com/a?a=1&b=2"
    )


@pytest.mark.parametrize("url", URLS)
def test_each_url_normalises_as_the_full_checks_do(url: str) -> None:
    message = content_pb2.Content(platform="p", url=url)
    message.published_at.seconds = 0
    assert _outcome(lambda m: convert.ingest_record(m, OWNER), message) == _outcome(
        _reference, message
    )


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("platform", "", "is required"),
        ("title", "nul\x00", "must not contain NUL characters"),
        ("url", "ftp://example.com/a", "must be an absolute http(s) URL"),
        ("language", "english1", "must be a BCP 47 tag such as 'en' or 'pt-BR'"),
        ("author_id", "nope", "'nope' is not a UUID"),
    ],
)
def test_a_bad_field_is_named_with_its_reason(field: str, value: str, reason: str) -> None:
    message = content_pb2.Content(platform="p", title="t")
    message.published_at.seconds = 0
    setattr(message, field, value)
    with pytest.raises(errors.InvalidArgument) as raised:
        convert.ingest_record(message, OWNER)
    assert raised.value.field == field
    assert raised.value.field_violations[0][1] == reason
