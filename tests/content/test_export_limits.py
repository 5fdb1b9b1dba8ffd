"""ExportContent and the size of a row: the largest row the contract accepts
exports in every format, and a file of rows larger than a chunk, an Arrow
batch or a Parquet row group is still one valid file."""

from __future__ import annotations

import csv
import json
import sys

import pytest
from observatory.v1 import content_pb2

from server.content.convert import MAX_METADATA_BYTES
from server.content.export import CHUNK_BYTES
from tests.content.test_content_export import FORMATS, export, read_rows
from tests.helpers import make_content

pytestmark = pytest.mark.asyncio

CHARS = 1_000_000  # free text: at most 1,000,000 characters
WIDE = "é😀"  # two and four bytes of UTF-8


def largest_row() -> content_pb2.Content:
    """Every field at (or next to) its limit."""
    text = (WIDE * (CHARS // 2))[:CHARS]
    return make_content(
        platform="p" * 255,
        arena="a" * 255,
        content_type="t" * 255,
        language="en-" + "x" * 8,
        platform_id="i" * 2000,
        collection_run_id="r" * 2000,
        author_platform_id="u" * 2000,
        author_display_name="n" * 10_000,
        title=text,
        text_content=text[: CHARS - 30][::-1] + '"\n,' * 10,
        url="https://example.com/" + "q" * 1900,
        search_terms_matched=[f"{i:04d}" + "s" * 1990 for i in range(1000)],
        raw_metadata={"blob": "m" * (MAX_METADATA_BYTES - 4096), "n": 1.5},
    )


@pytest.fixture
def large_csv_fields():
    """Python's csv module reads fields of at most 128 KiB unless told otherwise."""
    before = csv.field_size_limit(sys.maxsize)
    yield
    csv.field_size_limit(before)


async def test_the_largest_row_exports_in_every_format(content_stub, alice, large_csv_fields):
    row = largest_row()
    ingested = await content_stub.IngestContent(
        iter([content_pb2.IngestContentRequest(contents=[row, make_content(title="small")])]),
        metadata=alice.metadata,
    )
    assert (ingested.inserted, ingested.error_count) == (2, 0), ingested.errors

    for kind, fmt in FORMATS.items():
        data, chunks = await export(content_stub, alice, format=fmt, include_metadata=True)
        assert chunks[-1].rows_sent == 2
        assert all(len(chunk.data) <= CHUNK_BYTES for chunk in chunks), kind
        rows = {r["title"]: r for r in read_rows(kind, data)}
        big = rows[row.title]
        assert big["text_content"] == row.text_content, kind
        assert big["platform_id"] == row.platform_id, kind
        terms = big["search_terms_matched"]
        if kind == "csv":
            terms = json.loads(terms)
        assert list(terms) == list(row.search_terms_matched), kind
        assert "small" in rows


async def test_many_large_rows_make_one_valid_file_in_every_format(
    content_stub, alice, large_csv_fields
):
    body = "word " * 60_000  # 300 KB a row: many per Arrow batch and row group
    rows = [make_content(text_content=body + str(i)) for i in range(120)]
    await content_stub.IngestContent(
        iter([content_pb2.IngestContentRequest(contents=rows)]), metadata=alice.metadata
    )
    for kind, fmt in FORMATS.items():
        data, chunks = await export(content_stub, alice, format=fmt, columns=["text_content"])
        assert chunks[-1].rows_sent == len(rows)
        assert sum(chunk.rows for chunk in chunks) == len(rows)
        assert sorted(r["text_content"] for r in read_rows(kind, data)) == sorted(
            r.text_content for r in rows
        ), kind
