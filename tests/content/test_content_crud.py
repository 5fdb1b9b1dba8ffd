"""CreateContent, GetContent, UpdateContent, DeleteContent and UndeleteContent."""

import asyncio
import hashlib
import random
import uuid
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf import field_mask_pb2
from observatory.v1 import content_pb2

from tests.actors.helpers import create_actor
from tests.helpers import expect_rpc_error, make_content, timestamp

pytestmark = pytest.mark.asyncio

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS
PUBLISHED = datetime(2025, 6, 1, 12, 30, tzinfo=UTC)


# About 0.9 M characters (under the size limit) with more distinct words than
# one PostgreSQL tsvector could hold if all of it were indexed.
TOO_MANY_WORDS = " ".join(f"w{i}" for i in range(120_000))


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


async def create(stub, caller, content=None, **fields):
    request = content_pb2.CreateContentRequest(content=content or make_content(**fields))
    return await stub.CreateContent(request, metadata=caller.metadata)


async def get(stub, caller, content_id):
    return await stub.GetContent(
        content_pb2.GetContentRequest(id=content_id), metadata=caller.metadata
    )


def update_request(content, *paths):
    return content_pb2.UpdateContentRequest(
        content=content, update_mask=field_mask_pb2.FieldMask(paths=list(paths))
    )


class TestCreateContent:
    async def test_returns_the_stored_item_with_every_writable_field(
        self, content_stub, actor_stub, alice
    ):
        author_id = (await create_actor(actor_stub, alice)).id
        content = make_content(
            published_at=PUBLISHED,
            platform="reddit",
            arena="r/science",
            content_type="post",
            title="Volcanic activity",
            text_content="Lava flows seen near the town",
            url="https://reddit.com/r/science/1",
            language="pt-BR",
            author_platform_id="u123",
            author_display_name="Ana",
            author_id=author_id,
            views_count=1000,
            likes_count=0,
            shares_count=7,
            search_terms_matched=["lava", "volcano"],
            collection_run_id="run-42",
            raw_metadata={"score": 12, "flair": "news", "tags": ["a", "b"], "nested": {"x": True}},
        )
        content.collected_at.CopyFrom(timestamp(PUBLISHED + timedelta(days=1)))

        created = await create(content_stub, alice, content)

        uuid.UUID(created.id)
        assert created.owner_id == str(alice.user_id)
        for field in (
            "platform",
            "arena",
            "platform_id",
            "content_type",
            "title",
            "text_content",
            "url",
            "language",
            "published_at",
            "collected_at",
            "author_platform_id",
            "author_display_name",
            "author_id",
            "views_count",
            "likes_count",
            "shares_count",
            "search_terms_matched",
            "raw_metadata",
            "collection_run_id",
        ):
            assert getattr(created, field) == getattr(content, field), field
        assert created.HasField("create_time")
        assert created.HasField("update_time")
        assert not created.HasField("delete_time")
        assert not created.duplicate_of

    async def test_keeps_unset_counts_absent_and_zero_counts_present(self, content_stub, alice):
        created = await create(content_stub, alice, likes_count=0)

        assert created.HasField("likes_count")
        assert created.likes_count == 0
        assert not created.HasField("views_count")
        assert not created.HasField("shares_count")
        assert not created.HasField("comments_count")

    async def test_stores_the_row_for_the_caller(self, content_stub, alice, db):
        created = await create(content_stub, alice, title="Stored")

        row = await db.fetchrow(
            "SELECT owner_id, title, delete_time FROM content WHERE id = $1", uuid.UUID(created.id)
        )
        assert row["owner_id"] == alice.user_id
        assert row["title"] == "Stored"
        assert row["delete_time"] is None

    async def test_ignores_output_only_fields(self, content_stub, alice, bob):
        content = make_content(text_content="Plain words")
        given_id = str(uuid.uuid4())
        content.id = given_id
        content.owner_id = str(bob.user_id)
        content.content_hash = "0" * 64
        content.duplicate_of = str(uuid.uuid4())
        content.create_time.CopyFrom(timestamp(datetime(2001, 1, 1, tzinfo=UTC)))
        content.update_time.CopyFrom(timestamp(datetime(2001, 1, 1, tzinfo=UTC)))
        content.delete_time.CopyFrom(timestamp(datetime(2001, 1, 1, tzinfo=UTC)))

        created = await create(content_stub, alice, content)

        assert created.id != given_id
        assert created.owner_id == str(alice.user_id)
        assert created.content_hash == sha256_hex("plain words")
        assert not created.duplicate_of
        assert not created.HasField("delete_time")
        assert created.create_time.ToDatetime(tzinfo=UTC) > datetime.now(UTC) - timedelta(hours=1)
        assert created.update_time.ToDatetime(tzinfo=UTC) > datetime.now(UTC) - timedelta(hours=1)

    async def test_content_hash_is_sha256_of_the_normalised_text(self, content_stub, alice):
        created = await create(content_stub, alice, text_content="  Hello\n  WORLD\t again ")

        assert created.content_hash == sha256_hex("hello world again")

    async def test_texts_differing_only_in_case_and_spacing_share_a_hash(self, content_stub, alice):
        first = await create(content_stub, alice, text_content="Breaking News: rain")
        second = await create(content_stub, alice, text_content="breaking   news:\nRAIN")
        other = await create(content_stub, alice, text_content="Breaking News: snow")

        assert first.content_hash == second.content_hash
        assert first.content_hash != other.content_hash

    async def test_accepts_an_item_with_only_a_url(self, content_stub, alice):
        created = await create(
            content_stub, alice, title="", text_content="", url="https://a.example/x"
        )

        assert created.url == "https://a.example/x"
        assert not created.title
        assert not created.text_content

    async def test_requires_platform(self, content_stub, alice):
        error = await expect_rpc_error(create(content_stub, alice, platform=""))

        assert error.code == INVALID
        assert error.fields == ["content.platform"]

    async def test_requires_published_at(self, content_stub, alice):
        content = make_content()
        content.ClearField("published_at")

        error = await expect_rpc_error(create(content_stub, alice, content))

        assert error.code == INVALID
        assert error.fields == ["content.published_at"]

    async def test_requires_title_text_or_url(self, content_stub, alice):
        error = await expect_rpc_error(
            create(content_stub, alice, title="", text_content="", url="")
        )

        assert error.code == INVALID
        assert len(error.fields) == 1
        assert error.fields[0] in {"content.title", "content.text_content", "content.url"}

    async def test_rejects_a_request_without_content(self, content_stub, alice):
        error = await expect_rpc_error(
            content_stub.CreateContent(content_pb2.CreateContentRequest(), metadata=alice.metadata)
        )

        assert error.code == INVALID
        assert len(error.fields) == 1
        assert error.fields[0].startswith("content")

    async def test_rejects_a_malformed_author_id(self, content_stub, alice):
        error = await expect_rpc_error(create(content_stub, alice, author_id="not-a-uuid"))

        assert error.code == INVALID
        assert error.reason == "INVALID_FIELD"
        assert error.fields == ["content.author_id"]

    async def test_rejects_a_negative_count(self, content_stub, alice):
        error = await expect_rpc_error(create(content_stub, alice, views_count=-1))

        assert error.code == INVALID
        assert error.fields == ["content.views_count"]

    async def test_rejects_a_relative_url(self, content_stub, alice):
        error = await expect_rpc_error(create(content_stub, alice, url="/just/a/path"))

        assert error.code == INVALID
        assert error.fields == ["content.url"]

    async def test_rejects_an_out_of_range_published_at(self, content_stub, alice):
        content = make_content()
        content.published_at.seconds = 10**12

        error = await expect_rpc_error(create(content_stub, alice, content))

        assert error.code == INVALID
        assert error.fields == ["content.published_at"]

    async def test_rejects_text_with_nul_characters(self, content_stub, alice):
        error = await expect_rpc_error(create(content_stub, alice, text_content="a\x00b"))

        assert error.code == INVALID
        assert error.fields == ["content.text_content"]

    async def test_text_with_more_words_than_the_index_holds_is_stored(self, content_stub, alice):
        created = await create(content_stub, alice, title="Huge", text_content=TOO_MANY_WORDS)

        assert (await get(content_stub, alice, created.id)).text_content == TOO_MANY_WORDS
        found = await content_stub.SearchContent(
            content_pb2.SearchContentRequest(filter=content_pb2.ContentFilter(query="w17")),
            metadata=alice.metadata,
        )
        assert [result.content.id for result in found.results] == [created.id]

    async def test_natural_key_clash_is_already_exists(self, content_stub, alice):
        first = make_content(published_at=PUBLISHED, platform_id="p-1")
        await create(content_stub, alice, first)
        again = make_content(published_at=PUBLISHED, platform_id="p-1", title="Other title")

        error = await expect_rpc_error(create(content_stub, alice, again))

        assert error.code == ALREADY_EXISTS

    async def test_same_platform_id_at_another_time_is_a_new_item(self, content_stub, alice):
        first = await create(content_stub, alice, published_at=PUBLISHED, platform_id="p-1")
        second = await create(
            content_stub, alice, published_at=PUBLISHED + timedelta(seconds=1), platform_id="p-1"
        )

        assert first.id != second.id

    async def test_same_platform_id_on_another_platform_is_a_new_item(self, content_stub, alice):
        first = await create(
            content_stub, alice, published_at=PUBLISHED, platform="twitter", platform_id="p-1"
        )
        second = await create(
            content_stub, alice, published_at=PUBLISHED, platform="reddit", platform_id="p-1"
        )

        assert first.id != second.id


class TestGetContent:
    async def test_returns_the_created_item(self, content_stub, alice):
        created = await create(content_stub, alice, title="Read me")

        fetched = await get(content_stub, alice, created.id)

        assert fetched == created

    async def test_rejects_a_malformed_id(self, content_stub, alice):
        error = await expect_rpc_error(get(content_stub, alice, "1234"))

        assert error.code == INVALID
        assert error.reason == "INVALID_FIELD"
        assert error.fields == ["id"]

    async def test_rejects_an_empty_id(self, content_stub, alice):
        error = await expect_rpc_error(get(content_stub, alice, ""))

        assert error.code == INVALID
        assert error.fields == ["id"]

    async def test_unknown_id_is_not_found(self, content_stub, alice):
        error = await expect_rpc_error(get(content_stub, alice, str(uuid.uuid4())))

        assert error.code == NOT_FOUND
        assert error.reason == "NOT_FOUND"

    async def test_returns_a_deleted_item_with_its_delete_time(self, content_stub, alice):
        created = await create(content_stub, alice)
        deleted = await content_stub.DeleteContent(
            content_pb2.DeleteContentRequest(id=created.id), metadata=alice.metadata
        )

        fetched = await get(content_stub, alice, created.id)

        assert fetched.HasField("delete_time")
        assert fetched.delete_time == deleted.delete_time

    async def test_reads_in_flight_together_each_see_only_their_callers_rows(
        self, content_stub, alice, bob, admin
    ):
        """Concurrent reads are answered together by one query; each caller
        still gets only what it may see, and only the call that should fail
        fails."""
        rows = {alice: [], bob: []}
        for owner in (alice, bob):
            for _ in range(5):
                rows[owner].append((await create(content_stub, owner)).id)
        unknown = [str(uuid.uuid4()) for _ in range(3)]
        calls = []
        for _ in range(8):
            for caller in (alice, bob, admin):
                for owner, ids in rows.items():
                    for content_id in ids:
                        visible = caller is owner or caller is admin
                        calls.append((caller, content_id, content_id if visible else NOT_FOUND))
                calls.extend((caller, content_id, NOT_FOUND) for content_id in unknown)
                calls.append((caller, "not-a-uuid", INVALID))
        random.Random(7).shuffle(calls)

        async def outcome(caller, content_id):
            try:
                return (await get(content_stub, caller, content_id)).id
            except grpc.aio.AioRpcError as error:
                return error.code()

        outcomes = await asyncio.gather(*(outcome(caller, i) for caller, i, _ in calls))

        assert outcomes == [expected for _, _, expected in calls]


class TestUpdateContent:
    async def test_changes_only_the_fields_in_the_mask(self, content_stub, alice):
        created = await create(content_stub, alice, title="Old title", text_content="Old text")
        change = content_pb2.Content(id=created.id, title="New title", text_content="New text")

        updated = await content_stub.UpdateContent(
            update_request(change, "title"), metadata=alice.metadata
        )

        assert updated.title == "New title"
        assert updated.text_content == "Old text"
        assert updated.platform == created.platform
        assert updated.published_at == created.published_at
        assert await get(content_stub, alice, created.id) == updated

    async def test_empty_mask_replaces_every_writable_field(self, content_stub, alice):
        created = await create(
            content_stub, alice, arena="news", views_count=5, search_terms_matched=["x"]
        )
        replacement = make_content(
            published_at=PUBLISHED, platform="rss", title="Replaced", text_content="", url=""
        )
        replacement.id = created.id

        updated = await content_stub.UpdateContent(
            update_request(replacement), metadata=alice.metadata
        )

        assert updated.platform == "rss"
        assert updated.title == "Replaced"
        assert updated.published_at == timestamp(PUBLISHED)
        assert not updated.text_content
        assert not updated.url
        assert not updated.arena
        assert not updated.HasField("views_count")
        assert list(updated.search_terms_matched) == []
        assert updated.id == created.id
        assert updated.owner_id == created.owner_id
        assert updated.create_time == created.create_time

    async def test_ignores_fields_outside_the_mask_even_invalid_ones(self, content_stub, alice):
        created = await create(content_stub, alice)
        change = content_pb2.Content(
            id=created.id, title="Fine", author_id="garbage", views_count=-3
        )

        updated = await content_stub.UpdateContent(
            update_request(change, "title"), metadata=alice.metadata
        )

        assert updated.title == "Fine"
        assert not updated.author_id
        assert not updated.HasField("views_count")

    async def test_ignores_output_only_paths_and_fields(self, content_stub, alice, bob):
        created = await create(content_stub, alice, text_content="Original body")
        change = content_pb2.Content(
            id=created.id,
            owner_id=str(bob.user_id),
            content_hash="f" * 64,
            duplicate_of=str(uuid.uuid4()),
            title="Retitled",
        )
        change.delete_time.CopyFrom(timestamp(datetime(2001, 1, 1, tzinfo=UTC)))
        change.create_time.CopyFrom(timestamp(datetime(2001, 1, 1, tzinfo=UTC)))
        mask = ("owner_id", "content_hash", "duplicate_of", "delete_time", "create_time", "title")

        updated = await content_stub.UpdateContent(
            update_request(change, *mask), metadata=alice.metadata
        )

        assert updated.title == "Retitled"
        assert updated.owner_id == str(alice.user_id)
        assert updated.content_hash == created.content_hash
        assert not updated.duplicate_of
        assert not updated.HasField("delete_time")
        assert updated.create_time == created.create_time

    async def test_only_output_only_paths_change_nothing(self, content_stub, alice):
        created = await create(content_stub, alice)
        change = content_pb2.Content(id=created.id, owner_id=str(uuid.uuid4()), title="Ignored")

        updated = await content_stub.UpdateContent(
            update_request(change, "owner_id", "id"), metadata=alice.metadata
        )

        assert updated.owner_id == created.owner_id
        assert updated.title == created.title

    async def test_recomputes_content_hash_when_the_text_changes(self, content_stub, alice):
        created = await create(content_stub, alice, text_content="First version")
        change = content_pb2.Content(id=created.id, text_content="Second   VERSION")

        updated = await content_stub.UpdateContent(
            update_request(change, "text_content"), metadata=alice.metadata
        )

        assert created.content_hash == sha256_hex("first version")
        assert updated.content_hash == sha256_hex("second version")

    async def test_stored_hash_follows_the_new_text(self, content_stub, alice, db):
        created = await create(content_stub, alice, text_content="Before")
        change = content_pb2.Content(id=created.id, text_content="After")

        await content_stub.UpdateContent(
            update_request(change, "text_content"), metadata=alice.metadata
        )

        stored = await db.fetchval(
            "SELECT content_hash FROM content WHERE id = $1", uuid.UUID(created.id)
        )
        assert stored == sha256_hex("after")

    async def test_advances_update_time_and_keeps_create_time(self, content_stub, alice):
        created = await create(content_stub, alice)
        await asyncio.sleep(0.01)
        change = content_pb2.Content(id=created.id, title="Later")

        updated = await content_stub.UpdateContent(
            update_request(change, "title"), metadata=alice.metadata
        )

        assert updated.create_time == created.create_time
        assert updated.update_time.ToDatetime() > created.update_time.ToDatetime()

    async def test_can_move_an_item_to_another_published_at(self, content_stub, alice):
        created = await create(content_stub, alice, published_at=PUBLISHED)
        moved_to = datetime.now(UTC).replace(microsecond=0) + timedelta(days=40)
        change = content_pb2.Content(id=created.id)
        change.published_at.CopyFrom(timestamp(moved_to))

        updated = await content_stub.UpdateContent(
            update_request(change, "published_at"), metadata=alice.metadata
        )

        assert updated.published_at == timestamp(moved_to)
        assert (await get(content_stub, alice, created.id)).published_at == timestamp(moved_to)

    async def test_rejects_an_unknown_mask_path(self, content_stub, alice):
        created = await create(content_stub, alice)
        change = content_pb2.Content(id=created.id, title="x")

        error = await expect_rpc_error(
            content_stub.UpdateContent(
                update_request(change, "title", "no_such_field"), metadata=alice.metadata
            )
        )

        assert error.code == INVALID
        assert error.fields == ["update_mask.paths[1]"]
        assert (await get(content_stub, alice, created.id)).title == created.title

    async def test_rejects_a_malformed_id(self, content_stub, alice):
        change = content_pb2.Content(id="nope", title="x")

        error = await expect_rpc_error(
            content_stub.UpdateContent(update_request(change, "title"), metadata=alice.metadata)
        )

        assert error.code == INVALID
        assert error.fields == ["content.id"]

    async def test_unknown_id_is_not_found(self, content_stub, alice):
        change = content_pb2.Content(id=str(uuid.uuid4()), title="x")

        error = await expect_rpc_error(
            content_stub.UpdateContent(update_request(change, "title"), metadata=alice.metadata)
        )

        assert error.code == NOT_FOUND

    async def test_rejects_an_invalid_value_in_the_mask(self, content_stub, alice):
        created = await create(content_stub, alice)
        change = content_pb2.Content(id=created.id, author_id="garbage")

        error = await expect_rpc_error(
            content_stub.UpdateContent(update_request(change, "author_id"), metadata=alice.metadata)
        )

        assert error.code == INVALID
        assert error.fields == ["content.author_id"]

    async def test_cannot_clear_the_platform(self, content_stub, alice):
        created = await create(content_stub, alice)
        change = content_pb2.Content(id=created.id)

        error = await expect_rpc_error(
            content_stub.UpdateContent(update_request(change, "platform"), metadata=alice.metadata)
        )

        assert error.code == INVALID
        assert error.fields == ["content.platform"]

    async def test_cannot_clear_published_at(self, content_stub, alice):
        created = await create(content_stub, alice)
        change = content_pb2.Content(id=created.id)

        error = await expect_rpc_error(
            content_stub.UpdateContent(
                update_request(change, "published_at"), metadata=alice.metadata
            )
        )

        assert error.code == INVALID
        assert error.fields == ["content.published_at"]

    async def test_cannot_clear_title_text_and_url_together(self, content_stub, alice):
        created = await create(content_stub, alice)
        change = content_pb2.Content(id=created.id)

        error = await expect_rpc_error(
            content_stub.UpdateContent(
                update_request(change, "title", "text_content", "url"), metadata=alice.metadata
            )
        )

        assert error.code == INVALID
        assert (await get(content_stub, alice, created.id)) == created

    async def test_text_with_more_words_than_the_index_holds_is_stored(self, content_stub, alice):
        created = await create(content_stub, alice)
        change = content_pb2.Content(id=created.id, text_content=TOO_MANY_WORDS)

        updated = await content_stub.UpdateContent(
            update_request(change, "text_content"), metadata=alice.metadata
        )

        assert updated.text_content == TOO_MANY_WORDS
        assert updated.content_hash == sha256_hex(TOO_MANY_WORDS)

    async def test_natural_key_clash_is_already_exists(self, content_stub, alice):
        taken = await create(content_stub, alice, published_at=PUBLISHED, platform_id="taken")
        other = await create(content_stub, alice, published_at=PUBLISHED, platform_id="free")
        change = content_pb2.Content(id=other.id, platform_id="taken")

        error = await expect_rpc_error(
            content_stub.UpdateContent(
                update_request(change, "platform_id"), metadata=alice.metadata
            )
        )

        assert error.code == ALREADY_EXISTS
        assert (await get(content_stub, alice, other.id)).platform_id == "free"
        assert (await get(content_stub, alice, taken.id)) == taken


class TestDeleteContent:
    async def test_sets_and_returns_delete_time(self, content_stub, alice, db):
        created = await create(content_stub, alice)

        deleted = await content_stub.DeleteContent(
            content_pb2.DeleteContentRequest(id=created.id), metadata=alice.metadata
        )

        assert deleted.id == created.id
        assert deleted.HasField("delete_time")
        stored = await db.fetchval(
            "SELECT delete_time FROM content WHERE id = $1", uuid.UUID(created.id)
        )
        assert stored == deleted.delete_time.ToDatetime(tzinfo=UTC)

    async def test_keeps_the_row(self, content_stub, alice, db):
        created = await create(content_stub, alice)

        await content_stub.DeleteContent(
            content_pb2.DeleteContentRequest(id=created.id), metadata=alice.metadata
        )

        assert (
            await db.fetchval("SELECT count(*) FROM content WHERE id = $1", uuid.UUID(created.id))
            == 1
        )

    async def test_deleting_a_deleted_item_is_not_found(self, content_stub, alice):
        created = await create(content_stub, alice)
        request = content_pb2.DeleteContentRequest(id=created.id)
        first = await content_stub.DeleteContent(request, metadata=alice.metadata)

        error = await expect_rpc_error(content_stub.DeleteContent(request, metadata=alice.metadata))

        assert error.code == NOT_FOUND
        assert (await get(content_stub, alice, created.id)).delete_time == first.delete_time

    async def test_unknown_id_is_not_found(self, content_stub, alice):
        error = await expect_rpc_error(
            content_stub.DeleteContent(
                content_pb2.DeleteContentRequest(id=str(uuid.uuid4())), metadata=alice.metadata
            )
        )

        assert error.code == NOT_FOUND

    async def test_rejects_a_malformed_id(self, content_stub, alice):
        error = await expect_rpc_error(
            content_stub.DeleteContent(
                content_pb2.DeleteContentRequest(id="zzz"), metadata=alice.metadata
            )
        )

        assert error.code == INVALID
        assert error.fields == ["id"]


class TestUndeleteContent:
    async def test_restores_a_deleted_item(self, content_stub, alice):
        created = await create(content_stub, alice)
        await content_stub.DeleteContent(
            content_pb2.DeleteContentRequest(id=created.id), metadata=alice.metadata
        )

        restored = await content_stub.UndeleteContent(
            content_pb2.UndeleteContentRequest(id=created.id), metadata=alice.metadata
        )

        assert not restored.HasField("delete_time")
        assert restored.title == created.title
        assert not (await get(content_stub, alice, created.id)).HasField("delete_time")

    async def test_undeleting_a_live_item_is_already_exists(self, content_stub, alice):
        created = await create(content_stub, alice)

        error = await expect_rpc_error(
            content_stub.UndeleteContent(
                content_pb2.UndeleteContentRequest(id=created.id), metadata=alice.metadata
            )
        )

        assert error.code == ALREADY_EXISTS

    async def test_unknown_id_is_not_found(self, content_stub, alice):
        error = await expect_rpc_error(
            content_stub.UndeleteContent(
                content_pb2.UndeleteContentRequest(id=str(uuid.uuid4())), metadata=alice.metadata
            )
        )

        assert error.code == NOT_FOUND

    async def test_rejects_a_malformed_id(self, content_stub, alice):
        error = await expect_rpc_error(
            content_stub.UndeleteContent(
                content_pb2.UndeleteContentRequest(id="{oops}"), metadata=alice.metadata
            )
        )

        assert error.code == INVALID
        assert error.fields == ["id"]

    async def test_a_restored_item_can_be_deleted_again(self, content_stub, alice):
        created = await create(content_stub, alice)
        delete = content_pb2.DeleteContentRequest(id=created.id)
        await content_stub.DeleteContent(delete, metadata=alice.metadata)
        await content_stub.UndeleteContent(
            content_pb2.UndeleteContentRequest(id=created.id), metadata=alice.metadata
        )

        deleted_again = await content_stub.DeleteContent(delete, metadata=alice.metadata)

        assert deleted_again.HasField("delete_time")
