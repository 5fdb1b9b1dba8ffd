"""The audit log: one entry per mutation, in the mutation's transaction, and
AdminService.ListAuditLog over it."""

import uuid
from datetime import timedelta

import grpc
import pytest
from google.protobuf import field_mask_pb2
from observatory.v1 import admin_pb2, content_pb2

from tests.helpers import expect_rpc_error, ingest_requests, make_content

pytestmark = pytest.mark.asyncio


async def audit_log(admin_stub, admin, **filters) -> list[admin_pb2.AuditEntry]:
    """Every entry matching `filters`, newest first, read page by page."""
    entries: list[admin_pb2.AuditEntry] = []
    request = admin_pb2.ListAuditLogRequest(page_size=filters.pop("page_size", 0), **filters)
    while True:
        page = await admin_stub.ListAuditLog(request, metadata=admin.metadata)
        entries.extend(page.entries)
        if not page.next_page_token:
            return entries
        request.page_token = page.next_page_token


async def entries_of(admin_stub, admin, caller, **filters) -> list[admin_pb2.AuditEntry]:
    return await audit_log(admin_stub, admin, user_id=str(caller.user_id), **filters)


async def stored_entries(db, caller) -> int:
    return await db.fetchval("SELECT count(*) FROM audit_log WHERE user_id = $1", caller.user_id)


async def create(stub, caller, **fields) -> content_pb2.Content:
    return await stub.CreateContent(
        content_pb2.CreateContentRequest(content=make_content(**fields)), metadata=caller.metadata
    )


def key(entry: admin_pb2.AuditEntry) -> tuple[int, int, str]:
    return (entry.create_time.seconds, entry.create_time.nanos, entry.id)


class TestEntriesPerMutation:
    async def test_create_writes_one_entry(self, content_stub, admin_stub, alice, admin):
        created = await create(content_stub, alice)

        [entry] = await entries_of(admin_stub, admin, alice)

        assert entry.action == "content.create"
        assert entry.user_id == str(alice.user_id)
        assert entry.resource == f"contents/{created.id}"
        assert uuid.UUID(entry.id)
        # Written in the same transaction as the row: the same now().
        assert entry.create_time == created.create_time

    async def test_update_writes_one_entry(self, content_stub, admin_stub, alice, admin):
        created = await create(content_stub, alice)
        change = content_pb2.Content(id=created.id, title="new title")

        updated = await content_stub.UpdateContent(
            content_pb2.UpdateContentRequest(
                content=change, update_mask=field_mask_pb2.FieldMask(paths=["title"])
            ),
            metadata=alice.metadata,
        )

        entry = (await entries_of(admin_stub, admin, alice))[0]
        assert entry.action == "content.update"
        assert entry.user_id == str(alice.user_id)
        assert entry.resource == f"contents/{created.id}"
        assert entry.create_time == updated.update_time
        assert [e.action for e in await entries_of(admin_stub, admin, alice)] == [
            "content.update",
            "content.create",
        ]

    async def test_delete_and_undelete_write_one_entry_each(
        self, content_stub, admin_stub, alice, admin
    ):
        created = await create(content_stub, alice)

        deleted = await content_stub.DeleteContent(
            content_pb2.DeleteContentRequest(id=created.id), metadata=alice.metadata
        )
        restored = await content_stub.UndeleteContent(
            content_pb2.UndeleteContentRequest(id=created.id), metadata=alice.metadata
        )

        entries = await entries_of(admin_stub, admin, alice)
        assert [e.action for e in entries] == [
            "content.undelete",
            "content.delete",
            "content.create",
        ]
        assert {e.resource for e in entries} == {f"contents/{created.id}"}
        assert entries[1].create_time == deleted.delete_time
        assert entries[0].create_time == restored.update_time

    async def test_ingest_writes_one_entry_for_the_whole_stream(
        self, content_stub, admin_stub, alice, admin
    ):
        existing = make_content()
        await content_stub.CreateContent(
            content_pb2.CreateContentRequest(content=existing), metadata=alice.metadata
        )
        bad = make_content(language="??")
        messages = ingest_requests(
            [make_content(), make_content()], [existing, bad], [make_content()]
        )

        response = await content_stub.IngestContent(iter(messages), metadata=alice.metadata)

        entries = await entries_of(admin_stub, admin, alice)
        assert [e.action for e in entries] == ["content.ingest", "content.create"]
        entry = entries[0]
        assert entry.user_id == str(alice.user_id)
        assert entry.resource.startswith("contents")
        assert (response.received, response.inserted, response.duplicates) == (5, 3, 1)
        assert dict(entry.detail) == {
            "received": 5,
            "inserted": 3,
            "duplicates": 1,
            "errors": 1,
        }

    async def test_an_admin_is_recorded_as_the_actor(self, content_stub, admin_stub, admin):
        created = await create(content_stub, admin)

        [entry] = await entries_of(admin_stub, admin, admin)

        assert entry.user_id == str(admin.user_id)
        assert entry.resource == f"contents/{created.id}"

    async def test_reads_write_no_entry(self, content_stub, admin_stub, alice, admin, db):
        created = await create(content_stub, alice, title="searchable words")

        await content_stub.GetContent(
            content_pb2.GetContentRequest(id=created.id), metadata=alice.metadata
        )
        await content_stub.ListContent(content_pb2.ListContentRequest(), metadata=alice.metadata)
        await content_stub.SearchContent(
            content_pb2.SearchContentRequest(filter=content_pb2.ContentFilter(query="searchable")),
            metadata=alice.metadata,
        )
        await entries_of(admin_stub, admin, alice)

        assert await stored_entries(db, alice) == 1
        assert await stored_entries(db, admin) == 0


class TestFailedMutations:
    async def test_a_natural_key_clash_writes_no_entry(self, content_stub, alice, db):
        content = make_content()
        await content_stub.CreateContent(
            content_pb2.CreateContentRequest(content=content), metadata=alice.metadata
        )

        error = await expect_rpc_error(
            content_stub.CreateContent(
                content_pb2.CreateContentRequest(content=content), metadata=alice.metadata
            )
        )

        assert error.code == grpc.StatusCode.ALREADY_EXISTS
        assert await stored_entries(db, alice) == 1

    async def test_invalid_content_writes_no_entry(self, content_stub, alice, db):
        error = await expect_rpc_error(
            content_stub.CreateContent(
                content_pb2.CreateContentRequest(content=make_content(url="nope")),
                metadata=alice.metadata,
            )
        )

        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert await stored_entries(db, alice) == 0

    async def test_failed_updates_write_no_entry(self, content_stub, alice, bob, db):
        mine = await create(content_stub, alice)
        theirs = await create(content_stub, bob)
        before = await stored_entries(db, alice)

        for change, mask in [
            (content_pb2.Content(id=str(uuid.uuid4()), title="x"), ["title"]),
            (content_pb2.Content(id=theirs.id, title="x"), ["title"]),
            (content_pb2.Content(id=mine.id, title="x"), ["no_such_field"]),
            (content_pb2.Content(id=mine.id, url="not a url"), ["url"]),
            (content_pb2.Content(id=mine.id), ["title", "text_content", "url"]),
        ]:
            await expect_rpc_error(
                content_stub.UpdateContent(
                    content_pb2.UpdateContentRequest(
                        content=change, update_mask=field_mask_pb2.FieldMask(paths=mask)
                    ),
                    metadata=alice.metadata,
                )
            )

        assert await stored_entries(db, alice) == before

    async def test_deleting_twice_or_undeleting_a_live_row_writes_no_entry(
        self, content_stub, alice, db
    ):
        created = await create(content_stub, alice)
        error = await expect_rpc_error(
            content_stub.UndeleteContent(
                content_pb2.UndeleteContentRequest(id=created.id), metadata=alice.metadata
            )
        )
        assert error.code == grpc.StatusCode.ALREADY_EXISTS
        await content_stub.DeleteContent(
            content_pb2.DeleteContentRequest(id=created.id), metadata=alice.metadata
        )
        entries_after_delete = await stored_entries(db, alice)

        error = await expect_rpc_error(
            content_stub.DeleteContent(
                content_pb2.DeleteContentRequest(id=created.id), metadata=alice.metadata
            )
        )

        assert error.code == grpc.StatusCode.NOT_FOUND
        assert entries_after_delete == 2
        assert await stored_entries(db, alice) == 2

    async def test_an_ingest_that_fails_writes_no_entry(self, channel, alice, db):
        ingest_raw = channel.stream_unary(
            "/observatory.v1.ContentService/IngestContent",
            request_serializer=None,
            response_deserializer=None,
        )
        good = ingest_requests([make_content()])[0].SerializeToString()

        error = await expect_rpc_error(
            ingest_raw(iter([good, b"\xff\xff\xff"]), metadata=alice.metadata)
        )

        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert await stored_entries(db, alice) == 0


class TestListAuditLogAccess:
    async def test_a_user_is_refused(self, admin_stub, alice):
        error = await expect_rpc_error(
            admin_stub.ListAuditLog(admin_pb2.ListAuditLogRequest(), metadata=alice.metadata)
        )

        assert error.code == grpc.StatusCode.PERMISSION_DENIED
        assert error.reason == "PERMISSION_DENIED"

    async def test_a_user_is_refused_even_for_their_own_entries(
        self, content_stub, admin_stub, alice
    ):
        await create(content_stub, alice)

        error = await expect_rpc_error(
            admin_stub.ListAuditLog(
                admin_pb2.ListAuditLogRequest(user_id=str(alice.user_id)),
                metadata=alice.metadata,
            )
        )

        assert error.code == grpc.StatusCode.PERMISSION_DENIED

    async def test_no_token_is_unauthenticated(self, admin_stub):
        error = await expect_rpc_error(admin_stub.ListAuditLog(admin_pb2.ListAuditLogRequest()))

        assert error.code == grpc.StatusCode.UNAUTHENTICATED

    @pytest.mark.parametrize(
        ("request_fields", "field"),
        [
            ({"user_id": "not-a-uuid"}, "user_id"),
            ({"page_size": -1}, "page_size"),
            ({"page_token": "garbage!"}, "page_token"),
        ],
    )
    async def test_bad_requests_are_invalid(self, admin_stub, admin, request_fields, field):
        error = await expect_rpc_error(
            admin_stub.ListAuditLog(
                admin_pb2.ListAuditLogRequest(**request_fields), metadata=admin.metadata
            )
        )

        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert error.fields == [field]


class TestListAuditLogFilters:
    async def test_by_user(self, content_stub, admin_stub, alice, bob, admin):
        for _ in range(2):
            await create(content_stub, alice)
        await create(content_stub, bob)

        alices = await entries_of(admin_stub, admin, alice)
        bobs = await entries_of(admin_stub, admin, bob)

        assert len(alices) == 2
        assert {e.user_id for e in alices} == {str(alice.user_id)}
        assert len(bobs) == 1
        assert bobs[0].user_id == str(bob.user_id)

    async def test_without_a_user_every_users_entries_are_listed(
        self, content_stub, admin_stub, alice, bob, admin
    ):
        mine = await create(content_stub, alice)
        theirs = await create(content_stub, bob)

        entries = await audit_log(admin_stub, admin, after=mine.create_time)

        resources = {(e.user_id, e.resource) for e in entries}
        assert (str(alice.user_id), f"contents/{mine.id}") in resources
        assert (str(bob.user_id), f"contents/{theirs.id}") in resources

    async def test_by_action(self, content_stub, admin_stub, alice, admin):
        first = await create(content_stub, alice)
        await create(content_stub, alice)
        await content_stub.DeleteContent(
            content_pb2.DeleteContentRequest(id=first.id), metadata=alice.metadata
        )

        deletes = await entries_of(admin_stub, admin, alice, action="content.delete")
        creates = await entries_of(admin_stub, admin, alice, action="content.create")
        nothing = await entries_of(admin_stub, admin, alice, action="content.nope")

        assert [(e.action, e.resource) for e in deletes] == [
            ("content.delete", f"contents/{first.id}")
        ]
        assert [e.action for e in creates] == ["content.create"] * 2
        assert nothing == []

    async def test_by_time_after_is_inclusive_and_before_exclusive(
        self, content_stub, admin_stub, alice, admin
    ):
        for _ in range(5):
            await create(content_stub, alice)
        newest_first = await entries_of(admin_stub, admin, alice)
        e1, e2, e3, e4, e5 = reversed(newest_first)
        assert e1.create_time.ToDatetime() < e5.create_time.ToDatetime()

        after = await entries_of(admin_stub, admin, alice, after=e2.create_time)
        before = await entries_of(admin_stub, admin, alice, before=e4.create_time)
        between = await entries_of(
            admin_stub, admin, alice, after=e2.create_time, before=e4.create_time
        )

        assert [e.id for e in after] == [e5.id, e4.id, e3.id, e2.id]
        assert [e.id for e in before] == [e3.id, e2.id, e1.id]
        assert [e.id for e in between] == [e3.id, e2.id]

    async def test_a_window_in_the_future_is_empty(self, content_stub, admin_stub, alice, admin):
        created = await create(content_stub, alice)
        later = created.create_time.ToDatetime() + timedelta(hours=1)
        after = admin_pb2.ListAuditLogRequest().after
        after.FromDatetime(later)

        assert await entries_of(admin_stub, admin, alice, after=after) == []

    async def test_filters_combine(self, content_stub, admin_stub, alice, bob, admin):
        created = await create(content_stub, alice)
        await content_stub.DeleteContent(
            content_pb2.DeleteContentRequest(id=created.id), metadata=alice.metadata
        )
        theirs = await create(content_stub, bob)
        await content_stub.DeleteContent(
            content_pb2.DeleteContentRequest(id=theirs.id), metadata=bob.metadata
        )

        entries = await entries_of(
            admin_stub, admin, alice, action="content.delete", after=created.create_time
        )

        assert [(e.user_id, e.resource) for e in entries] == [
            (str(alice.user_id), f"contents/{created.id}")
        ]


class TestListAuditLogPaging:
    async def test_pages_cover_every_entry_once_newest_first(
        self, content_stub, admin_stub, alice, admin
    ):
        for _ in range(7):
            await create(content_stub, alice)
        request = admin_pb2.ListAuditLogRequest(user_id=str(alice.user_id), page_size=3)

        pages = []
        while True:
            page = await admin_stub.ListAuditLog(request, metadata=admin.metadata)
            pages.append(list(page.entries))
            if not page.next_page_token:
                break
            request.page_token = page.next_page_token

        assert [len(page) for page in pages] == [3, 3, 1]
        entries = [entry for page in pages for entry in page]
        assert len({e.id for e in entries}) == 7
        assert [key(e) for e in entries] == sorted((key(e) for e in entries), reverse=True)
        assert entries == await entries_of(admin_stub, admin, alice, page_size=1000)

    async def test_an_exact_last_page_has_no_token(self, content_stub, admin_stub, alice, admin):
        for _ in range(4):
            await create(content_stub, alice)
        request = admin_pb2.ListAuditLogRequest(user_id=str(alice.user_id), page_size=2)

        first = await admin_stub.ListAuditLog(request, metadata=admin.metadata)
        request.page_token = first.next_page_token
        second = await admin_stub.ListAuditLog(request, metadata=admin.metadata)

        assert len(first.entries) == len(second.entries) == 2
        assert second.next_page_token == ""

    async def test_entries_written_while_paging_are_neither_repeated_nor_skipped(
        self, content_stub, admin_stub, alice, admin
    ):
        for _ in range(6):
            await create(content_stub, alice)
        original = await entries_of(admin_stub, admin, alice)
        request = admin_pb2.ListAuditLogRequest(user_id=str(alice.user_id), page_size=2)

        seen = []
        while True:
            page = await admin_stub.ListAuditLog(request, metadata=admin.metadata)
            seen.extend(e.id for e in page.entries)
            await create(content_stub, alice)
            if not page.next_page_token:
                break
            request.page_token = page.next_page_token

        assert len(seen) == len(set(seen))
        assert set(seen) >= {e.id for e in original}

    async def test_a_token_only_continues_its_own_filter(
        self, content_stub, admin_stub, alice, bob, admin
    ):
        for _ in range(3):
            await create(content_stub, alice)
        page = await admin_stub.ListAuditLog(
            admin_pb2.ListAuditLogRequest(user_id=str(alice.user_id), page_size=1),
            metadata=admin.metadata,
        )
        assert page.next_page_token

        for other in [
            {"user_id": str(bob.user_id)},
            {"user_id": str(alice.user_id), "action": "content.delete"},
            {},
        ]:
            error = await expect_rpc_error(
                admin_stub.ListAuditLog(
                    admin_pb2.ListAuditLogRequest(
                        page_size=1, page_token=page.next_page_token, **other
                    ),
                    metadata=admin.metadata,
                )
            )
            assert error.code == grpc.StatusCode.INVALID_ARGUMENT
            assert error.fields == ["page_token"]

    async def test_page_size_is_clamped_not_refused(self, content_stub, admin_stub, alice, admin):
        await create(content_stub, alice)

        page = await admin_stub.ListAuditLog(
            admin_pb2.ListAuditLogRequest(user_id=str(alice.user_id), page_size=100_000),
            metadata=admin.metadata,
        )

        assert len(page.entries) == 1
        assert page.next_page_token == ""
