"""ExportContent's row count: taken in the export's own snapshot on a second
connection while the file is being made (the chunks made meanwhile wait for
it), or first on the export's connection when the pool has none idle."""

from __future__ import annotations

import contextlib
import json
import uuid

import pytest
import pytest_asyncio
from observatory.v1 import content_pb2

from server.app import App
from server.content import export as export_module
from server.uow import ExportedSnapshot
from tests.helpers import ingest_requests, make_content

pytestmark = pytest.mark.asyncio

ROWS = 1200
TEXT = "y" * 4000  # ~5 MB of NDJSON: several 1 MiB chunks


@pytest_asyncio.fixture
async def platform(content_stub, alice) -> str:
    """A platform of ROWS rows of alice's, its name unique to the test."""
    name = f"count-{uuid.uuid4().hex[:12]}"
    contents = [make_content(platform=name, text_content=f"{i} {TEXT}") for i in range(ROWS)]
    await content_stub.IngestContent(iter(ingest_requests(contents)), metadata=alice.metadata)
    return name


async def _export(content_stub, alice, platform: str) -> list[content_pb2.ExportChunk]:
    request = content_pb2.ExportContentRequest(
        format=content_pb2.EXPORT_FORMAT_NDJSON,
        columns=["id", "text_content"],
        filter=content_pb2.ContentFilter(platforms=[platform]),
    )
    return [chunk async for chunk in content_stub.ExportContent(request, metadata=alice.metadata)]


def _check_file(chunks: list[content_pb2.ExportChunk]) -> None:
    """Every chunk carries the whole count, and the file holds exactly it."""
    assert len(chunks) > 3
    assert {chunk.rows_total for chunk in chunks} == {ROWS}
    assert sum(chunk.rows for chunk in chunks) == chunks[-1].rows_sent == ROWS
    lines = b"".join(chunk.data for chunk in chunks).decode().splitlines()
    assert len({json.loads(line)["id"] for line in lines}) == ROWS


@pytest.mark.parametrize("ahead", [0, 2 << 20, 1 << 30], ids=["none", "some", "all"])
async def test_chunks_made_while_counting_wait_for_the_count_in_order(
    content_stub, alice, platform, monkeypatch, ahead
):
    # none: the first chunk waits for the count; some: two chunks are held,
    # then the COPY waits; all: the whole file is held until the count is in.
    monkeypatch.setattr(export_module, "COUNTING_AHEAD_BYTES", ahead)
    _check_file(await _export(content_stub, alice, platform))


async def test_with_no_idle_connection_the_export_counts_on_its_own(
    app: App, content_stub, alice, platform, monkeypatch
):
    pool = app.units.pool
    seen: list[bool] = []
    has_idle = app.units.has_idle_connection

    def spy(on_replica: bool = False) -> bool:
        seen.append(has_idle(on_replica))
        return seen[-1]

    monkeypatch.setattr(app.units, "has_idle_connection", spy)
    held: list[contextlib.AbstractAsyncContextManager] = []
    try:
        while pool.checkedin() > 0:  # type: ignore[attr-defined]
            unit = app.units.read()
            await unit.__aenter__()
            held.append(unit)
        if pool.overflow() >= pool._max_overflow:  # type: ignore[attr-defined]
            # The pool can make no more: the export gets one back, and then
            # there is none idle.
            await held.pop().__aexit__(None, None, None)
        _check_file(await _export(content_stub, alice, platform))
    finally:
        for unit in reversed(held):
            await unit.__aexit__(None, None, None)
    assert seen == [False]


async def test_a_unit_of_an_exported_snapshot_reads_what_its_exporter_reads(
    app: App, content_stub, alice, platform
):
    sql = "SELECT count(*) FROM content WHERE platform = $1"
    async with app.units.snapshot() as exporter:
        exported = await exporter.export_snapshot()
        # Committed after the snapshot was taken: neither unit sees it.
        await content_stub.IngestContent(
            iter(ingest_requests([make_content(platform=platform)])), metadata=alice.metadata
        )
        async with app.units.snapshot_of(exported) as importer:
            assert importer.driver is not exporter.driver
            assert await importer.driver.fetchval(sql, platform) == ROWS
        assert await exporter.driver.fetchval(sql, platform) == ROWS
    async with app.units.snapshot() as later:
        assert await later.driver.fetchval(sql, platform) == ROWS + 1


async def test_only_a_snapshot_id_is_imported(app: App):
    with pytest.raises(ValueError, match="not a snapshot ID"):
        app.units.snapshot_of(ExportedSnapshot("1-1'; SELECT pg_sleep(1); --", False))
