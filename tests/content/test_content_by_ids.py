"""Content rows by ID (GetContent's coalesced reads, other domains' ownership
checks) go through content_by_ids (migration 0010): every partition, and one
plan per session."""

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from observatory.v1 import content_pb2

from tests.helpers import expect_rpc_error, make_content

pytestmark = pytest.mark.asyncio


async def test_get_content_finds_rows_in_every_partition_and_only_the_callers(
    content_stub, alice, bob
):
    now = datetime.now(UTC).replace(microsecond=0)
    dates = [
        now - timedelta(days=800),  # a month with no partition of its own: the default one
        now - timedelta(days=1),
        now + timedelta(days=40),
        datetime(2091, 5, 17, 12, 0, tzinfo=UTC),  # far beyond the partitions made ahead
    ]
    created = [
        await content_stub.CreateContent(
            content_pb2.CreateContentRequest(content=make_content(published_at=when)),
            metadata=alice.metadata,
        )
        for when in dates
    ]

    # Together, so that they share the coalesced reads' queries.
    got = await asyncio.gather(
        *(
            content_stub.GetContent(
                content_pb2.GetContentRequest(id=row.id), metadata=alice.metadata
            )
            for row in created
        )
    )

    assert list(got) == created
    for row in created:
        details = await expect_rpc_error(
            content_stub.GetContent(content_pb2.GetContentRequest(id=row.id), metadata=bob.metadata)
        )
        assert details.code == grpc.StatusCode.NOT_FOUND


async def test_the_look_up_returns_each_rows_whatever_its_owner_or_deletion(db):
    owners = [uuid.uuid4(), uuid.uuid4()]
    ids = []
    for i, owner in enumerate(owners):
        ids.append(
            await db.fetchval(
                "INSERT INTO content (owner_id, platform, title, published_at, delete_time) "
                "VALUES ($1, 'test', 'by id', $2, $3) RETURNING id",
                owner,
                datetime(2026, 1 + i, 3, tzinfo=UTC),
                datetime.now(UTC) if i else None,
            )
        )
    unknown = uuid.uuid4()

    rows = await db.fetch("SELECT id, owner_id FROM content_by_ids($1)", [*ids, unknown])

    assert {(row["id"], row["owner_id"]) for row in rows} == set(zip(ids, owners, strict=True))


async def test_the_look_up_is_planned_generically(db):
    # Its own setting: a custom plan per execution would plan a scan of every
    # partition each time (what the function is for).
    config = await db.fetchval("SELECT proconfig FROM pg_proc WHERE proname = 'content_by_ids'")
    assert config == ["plan_cache_mode=force_generic_plan"]
    # ...and only while it runs: the session keeps its own.
    before = await db.fetchval("SHOW plan_cache_mode")
    await db.fetch("SELECT * FROM content_by_ids($1)", [uuid.uuid4()])
    assert await db.fetchval("SHOW plan_cache_mode") == before
