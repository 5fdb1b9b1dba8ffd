"""ExportContent in XLSX through gRPC: openpyxl reads back the CSV export's
rows, typed; sheets continue past their row limit."""

import csv
import io
import json
import uuid
from datetime import UTC, datetime, timedelta

import openpyxl
import pytest
from observatory.v1 import content_pb2

from server.content import xlsx
from tests.helpers import ingest_requests, make_content
from tests.networks.helpers import excel_text

pytestmark = pytest.mark.asyncio

XLSX = content_pb2.EXPORT_FORMAT_XLSX
CSV = content_pb2.EXPORT_FORMAT_CSV
NASTY = (
    'back\\slash "quoted", new\nline, tab\there, carriage\r\n, æøå ✓ 😀, <b>&amp;</b> \x01 _x0041_'
)
COUNTS = ("views_count", "likes_count", "shares_count", "comments_count")
TIMES = ("published_at", "collected_at", "create_time", "update_time", "delete_time")


async def export(stub, caller, **request) -> tuple[bytes, list[content_pb2.ExportChunk]]:
    chunks = [
        chunk
        async for chunk in stub.ExportContent(
            content_pb2.ExportContentRequest(**request), metadata=caller.metadata
        )
    ]
    return b"".join(chunk.data for chunk in chunks), chunks


def csv_time(text: str) -> datetime:
    """A CSV timestamp ("2026-01-02 03:04:05.123456+00") as a naive UTC
    datetime, as openpyxl reads Excel dates."""
    return datetime.fromisoformat(text).astimezone(UTC).replace(tzinfo=None)


def expected_cell(field: str, text: str):
    """What an XLSX cell holds for the CSV export's `text` of `field` (a time:
    see same_cell)."""
    if text == "":
        return None
    if field in COUNTS:
        return int(text)
    if field in TIMES:
        return csv_time(text)
    return text


def same_cell(value, expected) -> bool:
    """Excel keeps times to the millisecond: a time is the same within half of
    one (a time exactly between two milliseconds may go either way)."""
    if isinstance(expected, datetime) and isinstance(value, datetime):
        return value.microsecond % 1000 == 0 and abs(value - expected) <= timedelta(
            microseconds=500
        )
    return value == expected


async def make_rows(content_stub, caller, run: str, count: int = 3) -> None:
    base = datetime(2026, 3, 4, 5, 6, 7, 123000, tzinfo=UTC)
    contents = [
        make_content(
            platform="twitter",
            collection_run_id=run,
            title=f"{NASTY} {i}",
            text_content=" leading and trailing spaces ",
            author_display_name="",
            views_count=10**12 + i,
            likes_count=0,
            search_terms_matched=["a,b", 'q"uote', "æ"],
            raw_metadata={"nested": {"k": [1, "two", None]}, "text": NASTY},
            published_at=base + timedelta(days=i, milliseconds=i),
        )
        for i in range(count)
    ]
    contents.append(make_content(platform="rss", collection_run_id=run, url="", title="only"))
    reply = await content_stub.IngestContent(
        iter(ingest_requests(contents)), metadata=caller.metadata
    )
    assert reply.inserted == len(contents)


async def test_the_workbook_holds_the_csv_exports_rows_typed(content_stub, alice):
    run = f"run-{uuid.uuid4().hex}"
    await make_rows(content_stub, alice, run)
    request = {"filter": content_pb2.ContentFilter(collection_run_id=run), "include_metadata": True}

    csv_data, _ = await export(content_stub, alice, format=CSV, **request)
    xlsx_data, chunks = await export(content_stub, alice, format=XLSX, **request)

    expected = list(csv.reader(io.StringIO(csv_data.decode(), newline="")))
    header, records = expected[0], expected[1:]
    book = openpyxl.load_workbook(io.BytesIO(xlsx_data))
    assert book.sheetnames == ["content"]
    rows = list(book["content"].iter_rows(values_only=True))
    assert list(rows[0]) == header
    got = {row[header.index("id")]: row for row in rows[1:]}
    assert len(got) == len(records) == 4
    for record in records:
        row = got[record[header.index("id")]]
        for field, text, cell in zip(header, record, row, strict=True):
            value = excel_text(cell) if isinstance(cell, str) else cell
            assert same_cell(value, expected_cell(field, text)), (field, value, text)
    # Lists and raw_metadata are JSON text.
    first = next(row for row in got.values() if row[header.index("platform")] == "twitter")
    assert json.loads(first[header.index("search_terms_matched")]) == ["a,b", 'q"uote', "æ"]
    assert json.loads(excel_text(first[header.index("raw_metadata")]))["text"] == NASTY
    assert [c.rows_total for c in chunks] == [4] * len(chunks)
    assert chunks[-1].rows_sent == sum(c.rows for c in chunks) == 4


async def test_chosen_columns_in_their_order(content_stub, alice):
    run = f"run-{uuid.uuid4().hex}"
    await make_rows(content_stub, alice, run, count=1)
    data, _ = await export(
        content_stub,
        alice,
        format=XLSX,
        filter=content_pb2.ContentFilter(collection_run_id=run, platforms=["twitter"]),
        columns=["views_count", "title", "published_at"],
    )
    rows = list(openpyxl.load_workbook(io.BytesIO(data))["content"].iter_rows(values_only=True))
    assert rows == [
        ("views_count", "title", "published_at"),
        (10**12, rows[1][1], datetime(2026, 3, 4, 5, 6, 7, 123000)),
    ]
    assert excel_text(rows[1][1]) == f"{NASTY} 0"


async def test_rows_beyond_a_sheet_continue_on_content_2(content_stub, alice, monkeypatch):
    monkeypatch.setattr(xlsx, "SHEET_ROWS", 3)  # the header and two rows
    run = f"run-{uuid.uuid4().hex}"
    contents = [make_content(collection_run_id=run, title=f"row {i}") for i in range(5)]
    await content_stub.IngestContent(iter(ingest_requests(contents)), metadata=alice.metadata)

    data, chunks = await export(
        content_stub,
        alice,
        format=XLSX,
        filter=content_pb2.ContentFilter(collection_run_id=run),
        columns=["title"],
    )
    book = openpyxl.load_workbook(io.BytesIO(data))
    assert book.sheetnames == ["content", "content_2", "content_3"]
    titles = []
    for sheet in book.worksheets:
        rows = list(sheet.iter_rows(values_only=True))
        assert rows[0] == ("title",)
        titles += [row[0] for row in rows[1:]]
    assert sorted(titles) == [f"row {i}" for i in range(5)]
    assert chunks[-1].rows_sent == 5


async def test_an_empty_export_is_a_workbook_with_a_header(content_stub, alice):
    data, chunks = await export(
        content_stub,
        alice,
        format=XLSX,
        filter=content_pb2.ContentFilter(collection_run_id="nothing-here"),
        columns=["id", "title"],
    )
    rows = list(openpyxl.load_workbook(io.BytesIO(data))["content"].iter_rows(values_only=True))
    assert rows == [("id", "title")]
    assert chunks[-1].rows_total == 0


async def test_times_excel_cannot_show_as_dates_are_text(content_stub, alice):
    run = f"run-{uuid.uuid4().hex}"
    first = datetime(1, 1, 1, tzinfo=UTC)
    last = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    contents = [
        make_content(collection_run_id=run, title="first", published_at=first),
        make_content(collection_run_id=run, title="last", published_at=last),
    ]
    reply = await content_stub.IngestContent(
        iter(ingest_requests(contents)), metadata=alice.metadata
    )
    assert reply.inserted == 2, reply

    data, _ = await export(
        content_stub,
        alice,
        format=XLSX,
        filter=content_pb2.ContentFilter(collection_run_id=run),
        columns=["title", "published_at"],
    )
    rows = list(openpyxl.load_workbook(io.BytesIO(data))["content"].iter_rows(values_only=True))
    assert dict(rows[1:]) == {
        "first": "0001-01-01T00:00:00.000000Z",
        "last": "9999-12-31T23:59:59.999999Z",
    }
