"""AIP-155 request IDs on CreateContent and IngestContent."""

import asyncio
import uuid

import grpc
import pytest
from observatory.v1 import content_pb2

from server.idempotency import forget_old_request_ids
from tests.helpers import expect_rpc_error, ingest_requests, make_content

pytestmark = pytest.mark.asyncio


async def content_count(db, caller) -> int:
    return await db.fetchval("SELECT count(*) FROM content WHERE owner_id = $1", caller.user_id)


async def audit_actions(db, caller) -> list[str]:
    rows = await db.fetch(
        "SELECT action FROM audit_log WHERE user_id = $1 ORDER BY create_time, id", caller.user_id
    )
    return [row["action"] for row in rows]


def create(stub, caller, content, request_id):
    return stub.CreateContent(
        content_pb2.CreateContentRequest(content=content, request_id=request_id),
        metadata=caller.metadata,
    )


def ingest(stub, caller, *messages, request_id=""):
    return stub.IngestContent(
        iter(ingest_requests(*messages, request_id=request_id)), metadata=caller.metadata
    )


def assert_request_id_reused(error) -> None:
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "REQUEST_ID_REUSED"
    assert error.fields == ["request_id"]


class TestCreateContent:
    async def test_a_retry_returns_the_first_result_and_changes_nothing(
        self, content_stub, alice, db
    ):
        request_id = str(uuid.uuid4())
        content = make_content()

        first = await create(content_stub, alice, content, request_id)
        retry = await create(content_stub, alice, content, request_id)

        assert retry == first
        assert await content_count(db, alice) == 1
        assert await audit_actions(db, alice) == ["content.create"]

    async def test_without_a_request_id_a_repeat_is_a_natural_key_clash(
        self, content_stub, alice, db
    ):
        content = make_content()
        await create(content_stub, alice, content, "")

        error = await expect_rpc_error(create(content_stub, alice, content, ""))

        assert error.code == grpc.StatusCode.ALREADY_EXISTS
        assert await content_count(db, alice) == 1

    async def test_a_retry_after_the_row_changed_still_returns_the_first_result(
        self, content_stub, alice, db
    ):
        request_id = str(uuid.uuid4())
        content = make_content()
        first = await create(content_stub, alice, content, request_id)
        await content_stub.DeleteContent(
            content_pb2.DeleteContentRequest(id=first.id), metadata=alice.metadata
        )

        retry = await create(content_stub, alice, content, request_id)

        assert retry == first
        assert await content_count(db, alice) == 1
        assert await audit_actions(db, alice) == ["content.create", "content.delete"]

    async def test_the_same_request_id_with_another_payload_is_refused(
        self, content_stub, alice, db
    ):
        request_id = str(uuid.uuid4())
        await create(content_stub, alice, make_content(title="first"), request_id)

        error = await expect_rpc_error(
            create(content_stub, alice, make_content(title="second"), request_id)
        )

        assert_request_id_reused(error)
        assert await content_count(db, alice) == 1
        assert await audit_actions(db, alice) == ["content.create"]

    async def test_a_changed_field_of_the_same_row_is_another_payload(
        self, content_stub, alice, db
    ):
        request_id = str(uuid.uuid4())
        content = make_content(likes_count=1)
        await create(content_stub, alice, content, request_id)
        content.likes_count = 2

        error = await expect_rpc_error(create(content_stub, alice, content, request_id))

        assert_request_id_reused(error)
        stored = await db.fetchval(
            "SELECT likes_count FROM content WHERE owner_id = $1", alice.user_id
        )
        assert stored == 1

    async def test_another_user_may_use_the_same_request_id(self, content_stub, alice, bob, db):
        request_id = str(uuid.uuid4())
        content = make_content()

        mine = await create(content_stub, alice, content, request_id)
        theirs = await create(content_stub, bob, content, request_id)

        assert theirs.id != mine.id
        assert theirs.owner_id == str(bob.user_id)
        assert mine.owner_id == str(alice.user_id)
        assert await content_count(db, alice) == 1
        assert await content_count(db, bob) == 1
        # Each user's retry still answers with that user's own first result.
        assert await create(content_stub, alice, content, request_id) == mine
        assert await create(content_stub, bob, content, request_id) == theirs

    @pytest.mark.parametrize(
        "request_id",
        ["not-a-uuid", "1234", str(uuid.uuid4())[:-1], str(uuid.uuid4()) + "0", " "],
    )
    async def test_a_malformed_request_id_is_invalid(self, content_stub, alice, db, request_id):
        error = await expect_rpc_error(create(content_stub, alice, make_content(), request_id))

        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert error.fields == ["request_id"]
        assert await content_count(db, alice) == 0
        assert await audit_actions(db, alice) == []

    async def test_concurrent_calls_with_one_request_id_create_one_row(
        self, content_stub, alice, db
    ):
        request_id = str(uuid.uuid4())
        content = make_content()

        results = await asyncio.gather(
            *(create(content_stub, alice, content, request_id) for _ in range(8))
        )

        assert all(result == results[0] for result in results)
        assert await content_count(db, alice) == 1
        assert await audit_actions(db, alice) == ["content.create"]

    async def test_concurrent_calls_with_one_request_id_and_different_payloads(
        self, content_stub, alice, db
    ):
        request_id = str(uuid.uuid4())

        outcomes = await asyncio.gather(
            *(
                create(content_stub, alice, make_content(title=f"title {i}"), request_id)
                for i in range(6)
            ),
            return_exceptions=True,
        )

        created = [o for o in outcomes if isinstance(o, content_pb2.Content)]
        refused = [o for o in outcomes if not isinstance(o, content_pb2.Content)]
        assert len(created) == 1
        for error in refused:
            assert isinstance(error, grpc.aio.AioRpcError)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert await content_count(db, alice) == 1


class TestIngestContent:
    async def test_a_retry_returns_the_first_result_and_changes_nothing(
        self, content_stub, alice, db
    ):
        request_id = str(uuid.uuid4())
        existing = make_content()
        await create(content_stub, alice, existing, "")
        bad = make_content(url="not a url")
        messages = ([make_content(), existing], [bad, make_content()])

        first = await ingest(content_stub, alice, *messages, request_id=request_id)
        retry = await ingest(content_stub, alice, *messages, request_id=request_id)

        assert first == retry
        assert (first.received, first.inserted, first.duplicates, first.error_count) == (4, 2, 1, 1)
        assert await content_count(db, alice) == 3
        assert await audit_actions(db, alice) == ["content.create", "content.ingest"]

    async def test_without_a_request_id_a_repeat_counts_duplicates(self, content_stub, alice, db):
        rows = [make_content(), make_content()]
        await ingest(content_stub, alice, rows)

        repeat = await ingest(content_stub, alice, rows)

        assert (repeat.inserted, repeat.duplicates) == (0, 2)
        assert await audit_actions(db, alice) == ["content.ingest", "content.ingest"]

    async def test_the_same_request_id_with_other_rows_is_refused(self, content_stub, alice, db):
        request_id = str(uuid.uuid4())
        await ingest(content_stub, alice, [make_content()], request_id=request_id)

        error = await expect_rpc_error(
            ingest(content_stub, alice, [make_content(), make_content()], request_id=request_id)
        )

        assert_request_id_reused(error)
        assert await content_count(db, alice) == 1
        assert await audit_actions(db, alice) == ["content.ingest"]

    async def test_a_stream_that_adds_a_row_is_another_payload(self, content_stub, alice, db):
        request_id = str(uuid.uuid4())
        rows = [make_content(), make_content()]
        await ingest(content_stub, alice, rows, request_id=request_id)

        error = await expect_rpc_error(
            ingest(content_stub, alice, rows, [make_content()], request_id=request_id)
        )

        assert_request_id_reused(error)
        assert await content_count(db, alice) == 2

    async def test_an_empty_stream_is_another_payload(self, content_stub, alice, db):
        request_id = str(uuid.uuid4())
        await ingest(content_stub, alice, [make_content()], request_id=request_id)

        error = await expect_rpc_error(ingest(content_stub, alice, [], request_id=request_id))

        assert_request_id_reused(error)

    async def test_another_user_may_use_the_same_request_id(self, content_stub, alice, bob, db):
        request_id = str(uuid.uuid4())
        rows = [make_content(), make_content()]

        mine = await ingest(content_stub, alice, rows, request_id=request_id)
        theirs = await ingest(content_stub, bob, rows, request_id=request_id)

        assert mine.inserted == theirs.inserted == 2
        assert await content_count(db, alice) == 2
        assert await content_count(db, bob) == 2

    async def test_a_request_id_is_shared_between_methods(self, content_stub, alice, db):
        request_id = str(uuid.uuid4())
        content = make_content()
        await create(content_stub, alice, content, request_id)

        error = await expect_rpc_error(
            ingest(content_stub, alice, [content], request_id=request_id)
        )
        assert_request_id_reused(error)

        other_id = str(uuid.uuid4())
        await ingest(content_stub, alice, [make_content()], request_id=other_id)
        error = await expect_rpc_error(create(content_stub, alice, make_content(), other_id))
        assert_request_id_reused(error)
        assert await content_count(db, alice) == 2

    @pytest.mark.parametrize("request_id", ["not-a-uuid", "{}", str(uuid.uuid4()).upper() + "x"])
    async def test_a_malformed_request_id_is_invalid(self, content_stub, alice, db, request_id):
        error = await expect_rpc_error(
            ingest(content_stub, alice, [make_content()], request_id=request_id)
        )

        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert error.fields == ["request_id"]
        assert await content_count(db, alice) == 0
        assert await audit_actions(db, alice) == []

    async def test_only_the_first_message_carries_the_request_id(self, content_stub, alice, db):
        rows = [make_content()]
        requests = ingest_requests([], rows)
        requests[1].request_id = str(uuid.uuid4())

        first = await content_stub.IngestContent(iter(requests), metadata=alice.metadata)
        second = await content_stub.IngestContent(iter(requests), metadata=alice.metadata)

        assert (first.inserted, first.duplicates) == (1, 0)
        assert (second.inserted, second.duplicates) == (0, 1)
        assert await audit_actions(db, alice) == ["content.ingest", "content.ingest"]

    async def test_concurrent_streams_with_one_request_id_apply_once(self, content_stub, alice, db):
        request_id = str(uuid.uuid4())
        messages = [[make_content() for _ in range(300)] for _ in range(3)]

        results = await asyncio.gather(
            *(ingest(content_stub, alice, *messages, request_id=request_id) for _ in range(4))
        )

        assert all(result == results[0] for result in results)
        assert (results[0].inserted, results[0].duplicates) == (900, 0)
        assert await content_count(db, alice) == 900
        assert await audit_actions(db, alice) == ["content.ingest"]

    async def test_a_retry_of_a_large_stream_replays(self, content_stub, alice, db):
        request_id = str(uuid.uuid4())
        messages = [[make_content() for _ in range(2000)] for _ in range(3)]

        first = await ingest(content_stub, alice, *messages, request_id=request_id)
        # A large stream commits batch by batch, each with its audit entry.
        audited = await audit_actions(db, alice)
        retry = await ingest(content_stub, alice, *messages, request_id=request_id)

        assert first == retry
        assert first.inserted == 6000
        assert await content_count(db, alice) == 6000
        assert audited and set(audited) == {"content.ingest"}
        assert await audit_actions(db, alice) == audited  # the retry changed nothing


class TestRetention:
    async def test_request_ids_past_retention_are_forgotten_and_recent_ones_kept(
        self, app, content_stub, alice, db
    ):
        old_id, recent_id = str(uuid.uuid4()), str(uuid.uuid4())
        for request_id in (old_id, recent_id):
            await content_stub.CreateContent(
                content_pb2.CreateContentRequest(content=make_content(), request_id=request_id),
                metadata=alice.metadata,
            )
        await db.execute(
            "UPDATE idempotency_keys SET create_time = now() - interval '8 days' "
            "WHERE owner_id = $1 AND request_id = $2",
            alice.user_id,
            uuid.UUID(old_id),
        )

        assert await forget_old_request_ids(app.units, days=7) >= 1

        kept = await db.fetch(
            "SELECT request_id::text AS id FROM idempotency_keys WHERE owner_id = $1",
            alice.user_id,
        )
        assert [row["id"] for row in kept] == [recent_id]
        # A retry after the retention window runs anew.
        await content_stub.CreateContent(
            content_pb2.CreateContentRequest(content=make_content(), request_id=old_id),
            metadata=alice.metadata,
        )
        assert (
            await db.fetchval("SELECT count(*) FROM content WHERE owner_id = $1", alice.user_id)
            == 3
        )
