"""ExportContent: each format is one valid file of exactly the filtered rows,
read from one snapshot; a cancelled export frees its connection at once."""

import csv
import io
import json
import uuid
from datetime import UTC, datetime, timedelta

import grpc
import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet
import pytest
import pytest_asyncio
from observatory.v1 import actor_pb2, content_pb2

from server.app import App
from tests.helpers import (
    expect_rpc_error,
    ingest_requests,
    make_content,
    timestamp,
    wait_until,
)

pytestmark = pytest.mark.asyncio

NOW = datetime.now(UTC).replace(microsecond=0)
NASTY = 'back\\slash "quoted", new\nline, tab\there, carriage\r\n, æøå ✓ 😀, \\n \\" \x01'
FORMATS = {
    "ndjson": content_pb2.EXPORT_FORMAT_NDJSON,
    "csv": content_pb2.EXPORT_FORMAT_CSV,
    "parquet": content_pb2.EXPORT_FORMAT_PARQUET,
    "arrow": content_pb2.EXPORT_FORMAT_ARROW_IPC,
}


async def export(stub, caller, **request) -> tuple[bytes, list[content_pb2.ExportChunk]]:
    chunks = [
        chunk
        async for chunk in stub.ExportContent(
            content_pb2.ExportContentRequest(**request), metadata=caller.metadata
        )
    ]
    return b"".join(chunk.data for chunk in chunks), chunks


def read_rows(kind: str, data: bytes) -> list[dict]:
    """The exported rows through each format's standard reader."""
    if kind == "ndjson":
        return [json.loads(line) for line in data.decode().split("\n") if line]
    if kind == "csv":
        return list(csv.DictReader(io.StringIO(data.decode(), newline="")))
    if kind == "parquet":
        return pyarrow.parquet.read_table(pa.BufferReader(data)).to_pylist()
    return pyarrow.ipc.open_stream(data).read_all().to_pylist()


async def create(stub, caller, **fields) -> content_pb2.Content:
    return await stub.CreateContent(
        content_pb2.CreateContentRequest(content=make_content(**fields)), metadata=caller.metadata
    )


@pytest_asyncio.fixture
async def alices_rows(content_stub, alice, bob):
    """Alice: three twitter rows (one full of awkward characters), one reddit
    row, one deleted twitter row. Bob: a twitter row."""
    wanted = [
        await create(
            content_stub,
            alice,
            title=NASTY,
            text_content=NASTY,
            published_at=NOW - timedelta(days=1),
            search_terms_matched=["a,b", 'c"d', "e\nf"],
            likes_count=7,
            raw_metadata={"nested": {"k": NASTY}, "n": 1.5},
        ),
        await create(
            content_stub,
            alice,
            text_content="plain",
            views_count=0,
            search_terms_matched=["x", "y z", "ø", ""],
        ),
        await create(content_stub, alice, title="", text_content="", url="https://e.com/x"),
    ]
    await create(content_stub, alice, platform="reddit")
    deleted = await create(content_stub, alice)
    await content_stub.DeleteContent(
        content_pb2.DeleteContentRequest(id=deleted.id), metadata=alice.metadata
    )
    await create(content_stub, bob)
    return {row.id: row for row in wanted}


@pytest.mark.parametrize("kind", FORMATS)
async def test_each_format_holds_exactly_the_filtered_rows(content_stub, alice, alices_rows, kind):
    data, chunks = await export(
        content_stub,
        alice,
        filter=content_pb2.ContentFilter(platforms=["twitter"]),
        format=FORMATS[kind],
        include_metadata=True,
    )
    rows = read_rows(kind, data)
    assert sorted(row["id"] for row in rows) == sorted(alices_rows)
    assert chunks[0].rows_total == 3
    assert [c.rows_total for c in chunks] == [3] * len(chunks)
    assert sum(c.rows for c in chunks) == chunks[-1].rows_sent == 3
    nasty = next(row for row in rows if row["id"] == next(iter(alices_rows)))
    assert nasty["title"] == nasty["text_content"] == NASTY
    expected = alices_rows[nasty["id"]]
    published = expected.published_at.ToDatetime(tzinfo=UTC)
    if kind in ("parquet", "arrow"):
        assert nasty["published_at"] == published
        assert nasty["likes_count"] == 7 and nasty["views_count"] is None
        assert nasty["search_terms_matched"] == ["a,b", 'c"d', "e\nf"]
        metadata = json.loads(nasty["raw_metadata"])
    elif kind == "csv":
        assert datetime.fromisoformat(nasty["published_at"]) == published
        assert nasty["likes_count"] == "7" and nasty["views_count"] == ""
        assert json.loads(nasty["search_terms_matched"]) == ["a,b", 'c"d', "e\nf"]
        metadata = json.loads(nasty["raw_metadata"])
    else:
        assert datetime.fromisoformat(nasty["published_at"]) == published
        assert nasty["likes_count"] == 7 and nasty["views_count"] is None
        assert nasty["search_terms_matched"] == ["a,b", 'c"d', "e\nf"]
        metadata = nasty["raw_metadata"]
    assert metadata == {"nested": {"k": NASTY}, "n": 1.5}


@pytest.mark.parametrize("kind", ["csv", "parquet"])
async def test_every_filter_field_narrows_the_export(content_stub, actor_stub, alice, kind):
    run = f"run-{uuid.uuid4().hex}"
    # An author_id must name one of the caller's actors.
    author = (
        await actor_stub.CreateActor(
            actor_pb2.CreateActorRequest(actor=actor_pb2.Actor(canonical_name="Export Author")),
            metadata=alice.metadata,
        )
    ).id
    day = NOW - timedelta(days=2)
    wanted = await create(
        content_stub,
        alice,
        arena="news",
        language="da",
        author_id=author,
        collection_run_id=run,
        search_terms_matched=["valg"],
        text_content="kommunalvalg i dag",
        published_at=day,
    )
    for other in (
        {"arena": "sport"},
        {"language": "en"},
        {"search_terms_matched": ["other"]},
        {"text_content": "nothing relevant"},
        {"published_at": day - timedelta(days=1)},
    ):
        fields = {
            "arena": "news",
            "language": "da",
            "author_id": author,
            "collection_run_id": run,
            "search_terms_matched": ["valg"],
            "text_content": "kommunalvalg i dag",
            "published_at": day,
            **other,
        }
        await create(content_stub, alice, **fields)
    data, chunks = await export(
        content_stub,
        alice,
        format=FORMATS[kind],
        columns=["id"],
        filter=content_pb2.ContentFilter(
            platforms=["twitter"],
            arenas=["news"],
            languages=["da"],
            author_ids=[author],
            collection_run_id=run,
            search_term="valg",
            query="kommunalvalg",
            published_after=timestamp(day - timedelta(hours=1)),
            published_before=timestamp(day + timedelta(hours=1)),
        ),
    )
    assert [row["id"] for row in read_rows(kind, data)] == [wanted.id]
    assert chunks[0].rows_total == 1


async def test_parquet_columns_are_typed(content_stub, alice, alices_rows):
    data, _ = await export(content_stub, alice, format=FORMATS["parquet"], include_metadata=True)
    schema = pyarrow.parquet.read_schema(pa.BufferReader(data))
    assert schema.field("id").type == pa.string()
    assert schema.field("likes_count").type == pa.int64()
    assert schema.field("published_at").type == pa.timestamp("us", tz="UTC")
    assert schema.field("search_terms_matched").type == pa.list_(pa.string())
    assert schema.field("raw_metadata").type == pa.string()
    table = pyarrow.parquet.read_table(pa.BufferReader(data))
    terms = {row["id"]: row["search_terms_matched"] for row in table.to_pylist()}
    # alice's twitter rows, and her reddit row without terms
    expected = [tuple(row.search_terms_matched) for row in alices_rows.values()] + [()]
    assert sorted(map(tuple, terms.values())) == sorted(expected)


@pytest.mark.parametrize("kind", FORMATS)
async def test_text_that_reads_like_a_null_stays_text(content_stub, alice, kind):
    # pyarrow reads "N/A", "null", "NaN"... as NULL unless told otherwise.
    platform = f"nullish-{uuid.uuid4().hex[:12]}"
    words = ["N/A", "null", "NULL", "NaN", "nan", "NA", "#N/A", "-nan", "None"]
    for word in words:
        await create(content_stub, alice, platform=platform, title=word, text_content=word)
    data, _ = await export(
        content_stub,
        alice,
        filter=content_pb2.ContentFilter(platforms=[platform]),
        format=FORMATS[kind],
        columns=["title", "text_content", "collection_run_id"],
    )
    rows = read_rows(kind, data)
    assert sorted(row["title"] for row in rows) == sorted(words)
    assert all(row["text_content"] == row["title"] for row in rows)
    # An unset run is NULL: empty in CSV, null in the other formats.
    assert {row["collection_run_id"] for row in rows} == {"" if kind == "csv" else None}


@pytest.mark.parametrize("kind", FORMATS)
async def test_columns_choose_and_order_the_fields(content_stub, alice, alices_rows, kind):
    data, _ = await export(
        content_stub,
        alice,
        filter=content_pb2.ContentFilter(platforms=["twitter"]),
        format=FORMATS[kind],
        columns=["url", "id"],
    )
    rows = read_rows(kind, data)
    assert [list(row) for row in rows] == [["url", "id"]] * 3
    assert {row["id"] for row in rows} == set(alices_rows)


async def test_raw_metadata_only_with_include_metadata(content_stub, alice, alices_rows):
    without, _ = await export(content_stub, alice, format=FORMATS["ndjson"])
    assert "raw_metadata" not in read_rows("ndjson", without)[0]
    with_it, _ = await export(
        content_stub, alice, format=FORMATS["ndjson"], columns=["id"], include_metadata=True
    )
    assert list(read_rows("ndjson", with_it)[0]) == ["id", "raw_metadata"]


async def test_an_empty_export_is_still_a_valid_file(content_stub, alice):
    for kind, fmt in FORMATS.items():
        data, chunks = await export(content_stub, alice, format=fmt)
        assert len(chunks) == 1 and chunks[0].rows_total == 0
        assert read_rows(kind, data) == []


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"format": FORMATS["csv"], "columns": ["id", "nope"]}, "columns[1]"),
        ({"format": FORMATS["csv"], "columns": ["id", "id"]}, "columns[1]"),
        ({}, "format"),
        ({"format": 99}, "format"),
        (
            {"format": FORMATS["csv"], "filter": content_pb2.ContentFilter(author_ids=["x"])},
            "filter.author_ids[0]",
        ),
    ],
)
async def test_bad_requests_name_the_field(content_stub, alice, request_fields, field):
    error = await expect_rpc_error(export(content_stub, alice, **request_fields))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.fields == [field]


# -- snapshot and cancellation ------------------------------------------------------

BIG_ROWS = 1500
BIG_TEXT = "x" * 4000  # 1,500 rows of ~4 KB: several 1 MiB chunks


@pytest_asyncio.fixture
async def big_export(content_stub, alice):
    contents = [make_content(text_content=f"{i} {BIG_TEXT}") for i in range(BIG_ROWS)]
    await content_stub.IngestContent(iter(ingest_requests(contents)), metadata=alice.metadata)


async def test_rows_inserted_during_an_export_are_not_in_it(content_stub, alice, big_export):
    stream = content_stub.ExportContent(
        content_pb2.ExportContentRequest(format=FORMATS["ndjson"], columns=["id", "text_content"]),
        metadata=alice.metadata,
    )
    first = await stream.read()
    assert first.rows_total == BIG_ROWS
    # The export is paused on this slow reader; rows arrive meanwhile.
    added = [
        await create(content_stub, alice, text_content="arrived during the export")
        for _ in range(3)
    ]
    data = [first.data]
    while (chunk := await stream.read()) is not grpc.aio.EOF:
        data.append(chunk.data)
        assert chunk.rows_total == BIG_ROWS
    ids = {row["id"] for row in read_rows("ndjson", b"".join(data))}
    assert len(ids) == BIG_ROWS
    assert not ids & {row.id for row in added}


@pytest.mark.parametrize("kind", ["csv", "arrow"])
async def test_cancelled_exports_leave_the_pool_whole(
    app: App, content_stub, alice, big_export, db, kind
):
    for _ in range(30):
        stream = content_stub.ExportContent(
            content_pb2.ExportContentRequest(format=FORMATS[kind]), metadata=alice.metadata
        )
        await stream.read()  # the export is now running, waiting on this reader
        stream.cancel()

    async def released() -> bool:
        exporting = await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE application_name = 'observatory' AND state <> 'idle' AND query ILIKE '%FROM content%'"
        )
        return exporting == 0 and app.units.pool.checkedout() == 0

    assert await wait_until(released, timeout=10), (
        "a cancelled export kept its connection or its query"
    )
    data, _ = await export(content_stub, alice, format=FORMATS["csv"], columns=["id"])
    assert len(read_rows("csv", data)) == BIG_ROWS


async def test_an_admin_exports_every_owner(content_stub, alice, bob, admin):
    mine = await create(content_stub, alice, platform=f"p{uuid.uuid4().hex}")
    theirs = await create(content_stub, bob, platform=mine.platform)
    data, _ = await export(
        content_stub,
        admin,
        format=FORMATS["csv"],
        filter=content_pb2.ContentFilter(platforms=[mine.platform]),
    )
    assert {row["id"] for row in read_rows("csv", data)} == {mine.id, theirs.id}
