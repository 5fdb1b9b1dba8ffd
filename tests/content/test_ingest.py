"""IngestContent: a client stream of rows, validated one by one, stored in batches."""

import asyncio
import functools
import hashlib
import random
import secrets
import string
import uuid
from datetime import UTC, datetime, timedelta

import grpc
import pytest
import pytest_asyncio
from observatory.v1 import content_pb2

from tests.actors.helpers import create_actor
from tests.helpers import (
    expect_rpc_error,
    ingest_requests,
    make_content,
    new_caller,
    timestamp,
)

pytestmark = pytest.mark.asyncio

BATCH_ROWS = 5000  # the service's COPY batch size
NOW = datetime.now(UTC).replace(microsecond=0)


async def stored_platform_ids(db, caller) -> list[str]:
    rows = await db.fetch("SELECT platform_id FROM content WHERE owner_id = $1", caller.user_id)
    return sorted(row["platform_id"] for row in rows)


async def stored_count(db, caller) -> int:
    return await db.fetchval("SELECT count(*) FROM content WHERE owner_id = $1", caller.user_id)


def with_ids(contents: list[content_pb2.Content]) -> list[str]:
    return sorted(content.platform_id for content in contents)


async def ingest(stub, caller, *messages, request_id=""):
    return await stub.IngestContent(
        iter(ingest_requests(*messages, request_id=request_id)), metadata=caller.metadata
    )


REFUSED_TITLE = "a title the database refuses"


@pytest_asyncio.fixture
async def refusing_database(db):
    """Makes the database itself refuse rows titled REFUSED_TITLE, as it might
    refuse a row for a reason validation did not foresee."""
    await db.execute(
        f"ALTER TABLE content ADD CONSTRAINT test_refuse CHECK (title IS DISTINCT FROM '{REFUSED_TITLE}')"
    )
    yield
    await db.execute("ALTER TABLE content DROP CONSTRAINT test_refuse")


@functools.cache
def huge_text() -> str:
    """Under the length limit, with far more distinct words than one tsvector holds."""
    rnd = random.Random(7)
    alphabet = string.ascii_lowercase + string.digits
    return " ".join("".join(rnd.choices(alphabet, k=4)) for _ in range(170_000))


def nested_metadata(depth: int) -> dict:
    """An object in which objects and arrays nest `depth` deep, alternately."""
    value: dict | list = {"leaf": 1}
    for level in range(depth - 1):
        value = [value] if level % 2 == 0 and level < depth - 2 else {"k": value}
    assert isinstance(value, dict)
    return value


def missing_platform() -> content_pb2.Content:
    row = make_content()
    row.ClearField("platform")
    return row


def missing_published_at() -> content_pb2.Content:
    row = make_content()
    row.ClearField("published_at")
    return row


def no_title_text_or_url() -> content_pb2.Content:
    row = make_content()
    for name in ("title", "text_content", "url"):
        row.ClearField(name)
    return row


def out_of_range_published_at() -> content_pb2.Content:
    row = make_content()
    row.published_at.seconds = 253402300800 + 86400  # after 9999-12-31
    return row


BAD_ROWS = [
    pytest.param(missing_platform, {"platform"}, id="missing-platform"),
    pytest.param(missing_published_at, {"published_at"}, id="missing-published-at"),
    pytest.param(out_of_range_published_at, {"published_at"}, id="published-at-out-of-range"),
    pytest.param(no_title_text_or_url, {"title", "text_content", "url"}, id="no-title-text-url"),
    pytest.param(lambda: make_content(author_id="not-a-uuid"), {"author_id"}, id="author-id"),
    pytest.param(lambda: make_content(likes_count=-1), {"likes_count"}, id="negative-likes"),
    pytest.param(lambda: make_content(views_count=-5), {"views_count"}, id="negative-views"),
    pytest.param(lambda: make_content(text_content="a\x00b"), {"text_content"}, id="nul-text"),
    pytest.param(lambda: make_content(title="nul\x00"), {"title"}, id="nul-title"),
    pytest.param(
        lambda: make_content(raw_metadata={"k": "v\x00"}), {"raw_metadata"}, id="nul-metadata"
    ),
    pytest.param(lambda: make_content(url="not a url"), {"url"}, id="url-not-absolute"),
    pytest.param(lambda: make_content(url="javascript:alert(1)"), {"url"}, id="url-scheme"),
    pytest.param(lambda: make_content(url="https://"), {"url"}, id="url-without-host"),
    pytest.param(lambda: make_content(language="english!"), {"language"}, id="language-junk"),
    pytest.param(lambda: make_content(language="e"), {"language"}, id="language-too-short"),
    pytest.param(lambda: make_content(url="http://[::1"), {"url"}, id="url-unclosed-bracket"),
    pytest.param(
        lambda: make_content(url="https://exa mple.com/"), {"url"}, id="url-space-in-host"
    ),
    pytest.param(lambda: make_content(url="https://example.com/\n"), {"url"}, id="url-newline"),
    pytest.param(lambda: make_content(language="en\n"), {"language"}, id="language-newline"),
    pytest.param(
        lambda: make_content(language="en" + "-abcdefgh" * 40), {"language"}, id="language-long"
    ),
    pytest.param(
        lambda: make_content(raw_metadata={"x": float("nan")}), {"raw_metadata"}, id="nan-metadata"
    ),
    pytest.param(
        lambda: make_content(raw_metadata={"x": [1, float("-inf")]}),
        {"raw_metadata"},
        id="infinite-metadata",
    ),
    pytest.param(
        lambda: make_content(platform_id=secrets.token_urlsafe(3000)),
        {"platform_id"},
        id="platform-id-too-long-to-index",
    ),
    pytest.param(
        lambda: make_content(platform="p" + secrets.token_hex(200)),
        {"platform"},
        id="platform-too-long-to-index",
    ),
    pytest.param(
        lambda: make_content(arena=secrets.token_urlsafe(3000)), {"arena"}, id="arena-too-long"
    ),
    pytest.param(
        lambda: make_content(collection_run_id=secrets.token_urlsafe(3000)),
        {"collection_run_id"},
        id="collection-run-id-too-long",
    ),
    pytest.param(
        lambda: make_content(search_terms_matched=["ok", secrets.token_urlsafe(3000)]),
        {"search_terms_matched[1]"},
        id="search-term-too-long",
    ),
    pytest.param(
        lambda: make_content(raw_metadata=nested_metadata(21)),
        {"raw_metadata"},
        id="metadata-too-deep",
    ),
    pytest.param(
        lambda: make_content(raw_metadata={"blob": "x" * (1024 * 1024)}),
        {"raw_metadata"},
        id="metadata-too-large",
    ),
]


class TestCounts:
    async def test_every_row_of_every_message_is_stored(self, content_stub, alice, db):
        messages = [[make_content() for _ in range(size)] for size in (4, 1, 7)]

        response = await ingest(content_stub, alice, *messages)

        assert response == content_pb2.IngestContentResponse(received=12, inserted=12)
        assert await stored_platform_ids(db, alice) == with_ids(
            [row for message in messages for row in message]
        )

    async def test_an_empty_stream_returns_zeros(self, content_stub, alice, db):
        response = await content_stub.IngestContent(iter([]), metadata=alice.metadata)

        assert response == content_pb2.IngestContentResponse()
        assert await stored_count(db, alice) == 0

    async def test_messages_without_rows_return_zeros(self, content_stub, alice, db):
        response = await ingest(content_stub, alice, [], [])

        assert response == content_pb2.IngestContentResponse()
        assert await stored_count(db, alice) == 0

    async def test_rows_are_stored_for_the_caller_only(self, content_stub, alice, bob, db):
        await ingest(content_stub, alice, [make_content() for _ in range(3)])

        assert await stored_count(db, alice) == 3
        assert await stored_count(db, bob) == 0

    async def test_an_unauthenticated_stream_is_refused(self, content_stub):
        error = await expect_rpc_error(
            content_stub.IngestContent(iter(ingest_requests([make_content()])))
        )

        assert error.code == grpc.StatusCode.UNAUTHENTICATED


class TestBadRows:
    @pytest.mark.parametrize(("bad_row", "fields"), BAD_ROWS)
    async def test_a_bad_row_is_reported_and_every_good_row_kept(
        self, content_stub, alice, db, bad_row, fields
    ):
        first = [make_content(), make_content()]
        second = [make_content(), bad_row(), make_content()]

        response = await ingest(content_stub, alice, first, second)

        assert response.received == 5
        assert response.inserted == 4
        assert response.duplicates == 0
        assert response.error_count == 1
        [error] = response.errors
        assert error.index == 3
        assert error.field in fields
        assert error.reason
        assert await stored_platform_ids(db, alice) == with_ids([*first, second[0], second[2]])

    async def test_errors_carry_their_index_in_the_whole_stream(self, content_stub, alice, db):
        messages = [
            [missing_platform(), make_content(), make_content()],
            [make_content(likes_count=-1)],
            [],
            [make_content(), make_content(url="nope"), make_content(), missing_published_at()],
        ]

        response = await ingest(content_stub, alice, *messages)

        assert response.received == 8
        assert response.inserted == 4
        assert response.error_count == 4
        assert [(e.index, e.field) for e in response.errors] == [
            (0, "platform"),
            (3, "likes_count"),
            (5, "url"),
            (7, "published_at"),
        ]
        good = [messages[0][1], messages[0][2], messages[3][0], messages[3][2]]
        assert await stored_platform_ids(db, alice) == with_ids(good)

    async def test_rows_the_database_refuses_are_found_in_any_batch(
        self, content_stub, alice, db, refusing_database
    ):
        total = BATCH_ROWS + 500
        rows = [make_content() for _ in range(total)]
        refused = {3, 4, 1001, BATCH_ROWS + 17, 2001}
        for i in refused:
            rows[i].title = REFUSED_TITLE
        rows[10].url = "not a url"
        messages = [rows[i : i + 700] for i in range(0, total, 700)]

        response = await ingest(content_stub, alice, *messages)

        assert response.received == total
        assert response.error_count == len(refused) + 1
        assert [e.index for e in response.errors] == sorted([*refused, 10])
        assert {e.index for e in response.errors if e.field == "url"} == {10}
        assert response.inserted == total - len(refused) - 1
        assert response.duplicates == 0
        kept = [row for i, row in enumerate(rows) if i not in refused and i != 10]
        assert await stored_platform_ids(db, alice) == with_ids(kept)

    async def test_text_beyond_what_the_search_index_takes_is_stored_and_searchable(
        self, content_stub, alice, db
    ):
        huge = huge_text()
        rows = [make_content(text_content=huge), make_content(title=huge, text_content="short")]

        response = await ingest(content_stub, alice, rows)

        assert (response.inserted, response.error_count) == (2, 0)
        found = await content_stub.SearchContent(
            content_pb2.SearchContentRequest(
                filter=content_pb2.ContentFilter(query=huge.split()[0])
            ),
            metadata=alice.metadata,
        )
        assert len(found.results) == 2

    async def test_values_at_the_size_limits_are_kept(self, content_stub, alice, db):
        row = make_content(
            raw_metadata={"blob": "x" * (1024 * 1024 - 2000), "deep": nested_metadata(19)},
            platform="p" * 255,
            platform_id=secrets.token_urlsafe(1500),
            arena="a" * 255,
            collection_run_id=secrets.token_urlsafe(1500),
            search_terms_matched=[secrets.token_urlsafe(1500)],
            text_content="long " * 100_000,
        )

        response = await ingest(content_stub, alice, [row])

        assert response == content_pb2.IngestContentResponse(received=1, inserted=1)
        assert await stored_platform_ids(db, alice) == [row.platform_id]

    async def test_a_stream_of_only_bad_rows_stores_nothing(self, content_stub, alice, db):
        response = await ingest(content_stub, alice, [missing_platform(), missing_platform()])

        assert response.received == 2
        assert response.inserted == 0
        assert response.error_count == 2
        assert [e.index for e in response.errors] == [0, 1]
        assert await stored_count(db, alice) == 0

    async def test_reported_errors_stop_at_ten_thousand_but_all_are_counted(
        self, content_stub, alice, db
    ):
        bad = missing_platform()
        messages = [[bad] * 2000 for _ in range(5)] + [[make_content(), bad, bad]]

        response = await ingest(content_stub, alice, *messages)

        assert response.received == 10_003
        assert response.inserted == 1
        assert response.error_count == 10_002
        assert len(response.errors) == 10_000
        assert [e.index for e in response.errors] == list(range(10_000))
        assert await stored_count(db, alice) == 1


class TestDuplicates:
    async def test_rows_already_stored_are_counted_as_duplicates(self, content_stub, alice, db):
        existing = make_content()
        await content_stub.CreateContent(
            content_pb2.CreateContentRequest(content=existing), metadata=alice.metadata
        )
        fresh = [make_content(), make_content()]
        again = make_content(
            platform=existing.platform,
            platform_id=existing.platform_id,
            published_at=existing.published_at.ToDatetime(tzinfo=UTC),
            title="a different title, same natural key",
        )

        response = await ingest(content_stub, alice, [fresh[0], again, fresh[1]])

        assert response == content_pb2.IngestContentResponse(received=3, inserted=2, duplicates=1)
        assert await stored_platform_ids(db, alice) == with_ids([existing, *fresh])
        stored_title = await db.fetchval(
            "SELECT title FROM content WHERE owner_id = $1 AND platform_id = $2",
            alice.user_id,
            existing.platform_id,
        )
        assert stored_title == existing.title

    async def test_a_second_ingest_of_the_same_rows_inserts_nothing(self, content_stub, alice, db):
        rows = [make_content() for _ in range(20)]
        await ingest(content_stub, alice, rows[:10], rows[10:])

        response = await ingest(content_stub, alice, rows)

        assert response == content_pb2.IngestContentResponse(received=20, inserted=0, duplicates=20)
        assert await stored_count(db, alice) == 20

    async def test_rows_repeated_within_a_stream_are_duplicates(self, content_stub, alice, db):
        a, b, c = make_content(), make_content(), make_content()

        response = await ingest(content_stub, alice, [a, b, a, a], [c, b], [a])

        assert response == content_pb2.IngestContentResponse(received=7, inserted=3, duplicates=4)
        assert await stored_platform_ids(db, alice) == with_ids([a, b, c])

    async def test_only_the_whole_natural_key_makes_a_duplicate(self, content_stub, alice, db):
        base = make_content(platform="reddit")
        when = base.published_at.ToDatetime(tzinfo=UTC)
        other_platform = make_content(
            platform="twitter", platform_id=base.platform_id, published_at=when
        )
        other_time = make_content(
            platform="reddit",
            platform_id=base.platform_id,
            published_at=when + timedelta(seconds=1),
        )
        other_id = make_content(platform="reddit", published_at=when)

        response = await ingest(content_stub, alice, [base, other_platform, other_time, other_id])

        assert response == content_pb2.IngestContentResponse(received=4, inserted=4)
        assert await stored_count(db, alice) == 4

    async def test_another_users_rows_are_not_duplicates(self, content_stub, alice, bob, db):
        rows = [make_content() for _ in range(3)]
        await ingest(content_stub, alice, rows)

        response = await ingest(content_stub, bob, rows)

        assert response == content_pb2.IngestContentResponse(received=3, inserted=3)
        assert await stored_platform_ids(db, bob) == with_ids(rows)

    async def test_a_bad_row_is_an_error_even_when_its_key_is_taken(self, content_stub, alice, db):
        row = make_content()
        clash = content_pb2.Content()
        clash.CopyFrom(row)
        clash.likes_count = -1

        response = await ingest(content_stub, alice, [row, clash])

        assert response.inserted == 1
        assert response.duplicates == 0
        assert [(e.index, e.field) for e in response.errors] == [(1, "likes_count")]


class TestLargeStreams:
    async def test_several_batches_with_duplicates_and_errors_across_them(
        self, content_stub, alice, db
    ):
        total = 2 * BATCH_ROWS + 2345
        rows = [make_content(published_at=NOW - timedelta(minutes=i)) for i in range(total)]
        bad_indexes = {7, BATCH_ROWS - 1, BATCH_ROWS, BATCH_ROWS + 1, 2 * BATCH_ROWS + 3, total + 5}
        repeated = [rows[i] for i in (0, 1, BATCH_ROWS + 10, 2 * BATCH_ROWS + 100)]
        stream = list(rows) + repeated
        for index in sorted(bad_indexes):
            stream.insert(index, missing_platform())
        message_size = 1250
        messages = [stream[i : i + message_size] for i in range(0, len(stream), message_size)]

        response = await ingest(content_stub, alice, *messages)

        assert response.received == len(stream)
        assert response.inserted == total
        assert response.duplicates == len(repeated)
        assert response.error_count == len(bad_indexes)
        assert [(e.index, e.field) for e in response.errors] == [
            (i, "platform") for i in sorted(bad_indexes)
        ]
        assert await stored_platform_ids(db, alice) == with_ids(rows)

    async def test_one_message_larger_than_a_batch(self, content_stub, alice, db):
        rows = [make_content() for _ in range(BATCH_ROWS + 1)]

        response = await ingest(content_stub, alice, rows)

        assert response == content_pb2.IngestContentResponse(
            received=BATCH_ROWS + 1, inserted=BATCH_ROWS + 1
        )
        assert await stored_count(db, alice) == BATCH_ROWS + 1


def months_ago(months: int, day: int = 15) -> datetime:
    year, month = divmod(NOW.year * 12 + NOW.month - 1 - months, 12)
    return datetime(year, month + 1, day, 12, 30, tzinfo=UTC)


class TestPartitions:
    async def test_rows_within_the_coming_year_land_in_their_monthly_partition(
        self, content_stub, alice, db
    ):
        month_start = datetime(NOW.year, NOW.month, 1, tzinfo=UTC)
        dates = [
            month_start,
            NOW,
            months_ago(-1),
            months_ago(-6),
            months_ago(-11, day=28),
            NOW + timedelta(days=365),
        ]
        # The last instant of a month belongs to that month.
        dates.append(
            datetime(*divmod_month(months_ago(-2)), 1, tzinfo=UTC) - timedelta(microseconds=1)
        )

        response = await ingest(content_stub, alice, [make_content(published_at=d) for d in dates])

        assert response.inserted == len(dates)
        rows = await db.fetch(
            "SELECT published_at, tableoid::regclass::text AS part FROM content "
            "WHERE owner_id = $1",
            alice.user_id,
        )
        placed = {row["published_at"].astimezone(UTC): row["part"] for row in rows}
        assert placed == {d: f"content_p{d:%Y%m}" for d in dates}

    async def test_rows_older_than_the_partitions_are_kept_in_the_default_partition(
        self, content_stub, alice, db
    ):
        dates = [datetime(2011, 5, 5, tzinfo=UTC), datetime(2016, 2, 29, 23, 59, 59, tzinfo=UTC)]
        rows = [make_content(published_at=d) for d in dates]

        response = await ingest(content_stub, alice, rows)

        assert response.inserted == 2
        placed = await db.fetch(
            "SELECT tableoid::regclass::text AS part FROM content WHERE owner_id = $1",
            alice.user_id,
        )
        assert [row["part"] for row in placed] == ["content_default"] * 2
        assert await stored_platform_ids(db, alice) == with_ids(rows)

    async def test_a_stream_over_many_months_keeps_every_row(self, content_stub, alice, db):
        dates = [datetime(2000 + i // 12, i % 12 + 1, 9, tzinfo=UTC) for i in range(0, 80, 2)]
        dates += [months_ago(-i) for i in range(12)]
        rows = [make_content(published_at=d) for d in dates]

        response = await ingest(content_stub, alice, rows[:15], rows[15:])

        assert response == content_pb2.IngestContentResponse(received=len(rows), inserted=len(rows))
        assert await stored_platform_ids(db, alice) == with_ids(rows)

    async def test_concurrent_streams_into_the_same_months(self, content_stub, db):
        when = datetime(2004, 6, 6, tzinfo=UTC)
        callers = [new_caller() for _ in range(4)]
        streams = [
            [make_content(published_at=when + timedelta(hours=i)) for i in range(50)]
            + [make_content() for _ in range(50)]
            for _ in callers
        ]

        responses = await asyncio.gather(
            *(
                ingest(content_stub, c, s[:60], s[60:])
                for c, s in zip(callers, streams, strict=True)
            )
        )

        assert [r.inserted for r in responses] == [100] * len(callers)
        for caller, rows in zip(callers, streams, strict=True):
            assert await stored_platform_ids(db, caller) == with_ids(rows)

    async def test_a_stream_waiting_for_its_client_holds_no_connection(
        self, content_stub, alice, bob, db, app
    ):
        release = asyncio.Event()
        first = [make_content() for _ in range(BATCH_ROWS)]

        async def slow_stream():
            yield content_pb2.IngestContentRequest(contents=first)
            await release.wait()
            yield content_pb2.IngestContentRequest(contents=[make_content()])

        slow = asyncio.ensure_future(
            content_stub.IngestContent(slow_stream(), metadata=alice.metadata)
        )
        try:
            # The first batch commits while the stream waits for the rest.
            await wait_until(lambda: stored_count(db, alice), BATCH_ROWS)
            await wait_until(lambda: checked_out(app), 0)
            assert await idle_in_transaction(db) == 0
            response = await asyncio.wait_for(
                ingest(
                    content_stub, bob, [make_content(published_at=datetime(2005, 2, 2, tzinfo=UTC))]
                ),
                timeout=20,
            )
            assert response.inserted == 1
        finally:
            release.set()
        assert (await slow).inserted == BATCH_ROWS + 1


async def checked_out(app) -> int:
    return app.units.pool.checkedout()


async def idle_in_transaction(db) -> int:
    return await db.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = 'observatory' AND state = 'idle in transaction'"
    )


async def wait_until(read, expected, timeout: float = 20.0) -> None:
    """Waits until `await read()` equals `expected`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (value := await read()) != expected:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"still {value!r}, not {expected!r}, after {timeout} s")
        await asyncio.sleep(0.02)


def divmod_month(value: datetime) -> tuple[int, int]:
    return value.year, value.month


class TestStoredRows:
    async def test_ingested_rows_read_back_through_get_and_list(
        self, content_stub, actor_stub, alice
    ):
        author = (await create_actor(actor_stub, alice)).id
        collected = NOW - timedelta(minutes=5)
        rows = [
            make_content(
                platform="ingest-readback",
                arena="news",
                content_type="post",
                title="Title one",
                text_content="Hello   WORLD\n again",
                url="https://example.com/a?x=1",
                language="pt-BR",
                author_platform_id="u1",
                author_display_name="User One",
                author_id=author,
                views_count=10,
                likes_count=0,
                search_terms_matched=["climate", "weather"],
                raw_metadata={"source": "api", "nested": {"n": 1}},
                collection_run_id="run-1",
                published_at=NOW - timedelta(days=2),
            ),
            make_content(platform="ingest-readback", text_content="", title="Only a title"),
            make_content(
                platform="ingest-readback", title="", text_content="", url="https://x.test/only"
            ),
        ]
        rows[0].collected_at.CopyFrom(timestamp(collected))

        response = await ingest(content_stub, alice, rows)
        assert response.inserted == 3

        listed = await content_stub.ListContent(
            content_pb2.ListContentRequest(
                filter=content_pb2.ContentFilter(platforms=["ingest-readback"])
            ),
            metadata=alice.metadata,
        )
        assert len(listed.contents) == 3
        by_platform_id = {content.platform_id: content for content in listed.contents}
        for sent in rows:
            got = by_platform_id[sent.platform_id]
            assert uuid.UUID(got.id)
            assert got.owner_id == str(alice.user_id)
            assert got.create_time.seconds > 0
            assert not got.HasField("delete_time")
            expected = content_pb2.Content()
            expected.CopyFrom(sent)
            for name in ("id", "owner_id", "content_hash", "create_time", "update_time"):
                expected.MergeFrom(content_pb2.Content(**{name: getattr(got, name)}))
            assert got == expected
            fetched = await content_stub.GetContent(
                content_pb2.GetContentRequest(id=got.id), metadata=alice.metadata
            )
            assert fetched == got

        first = by_platform_id[rows[0].platform_id]
        assert first.content_hash == hashlib.sha256(b"hello world again").hexdigest()
        assert first.likes_count == 0 and first.HasField("likes_count")
        assert not first.HasField("shares_count")
        title_only = by_platform_id[rows[1].platform_id]
        assert title_only.content_hash == hashlib.sha256(b"only a title").hexdigest()
        assert by_platform_id[rows[2].platform_id].content_hash == ""

    async def test_ingested_rows_hash_like_created_ones(self, content_stub, alice):
        # Full-width letters fold to ASCII under NFKC.
        text = "\uff26\uff55\uff4c\uff4c\uff57\uff49\uff44\uff54\uff48  Text\tWith  Spaces"
        created = await content_stub.CreateContent(
            content_pb2.CreateContentRequest(content=make_content(text_content=text)),
            metadata=alice.metadata,
        )
        await ingest(content_stub, alice, [make_content(platform="hash-check", text_content=text)])
        listed = await content_stub.ListContent(
            content_pb2.ListContentRequest(
                filter=content_pb2.ContentFilter(platforms=["hash-check"])
            ),
            metadata=alice.metadata,
        )

        assert listed.contents[0].content_hash == created.content_hash
        assert created.content_hash == hashlib.sha256(b"fullwidth text with spaces").hexdigest()


class TestUndecodableRequests:
    async def test_undecodable_unary_request_is_invalid_argument(self, channel, alice):
        get = channel.unary_unary(
            "/observatory.v1.ContentService/GetContent",
            request_serializer=None,
            response_deserializer=None,
        )

        error = await expect_rpc_error(get(b"\xff\xff\xff", metadata=alice.metadata))

        assert error.code == grpc.StatusCode.INVALID_ARGUMENT

    async def test_undecodable_first_stream_message_is_invalid_argument(self, channel, alice, db):
        ingest_raw = channel.stream_unary(
            "/observatory.v1.ContentService/IngestContent",
            request_serializer=None,
            response_deserializer=None,
        )

        error = await expect_rpc_error(ingest_raw(iter([b"\xff\xff\xff"]), metadata=alice.metadata))

        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert await stored_count(db, alice) == 0

    async def test_undecodable_later_stream_message_fails_the_stream_keeping_committed_batches(
        self, channel, content_stub, alice, db
    ):
        ingest_raw = channel.stream_unary(
            "/observatory.v1.ContentService/IngestContent",
            request_serializer=None,
            response_deserializer=None,
        )
        # Enough rows before the bad message that a batch is already in the database.
        good = [
            request.SerializeToString()
            for request in ingest_requests(
                *[[make_content() for _ in range(1000)] for _ in range(BATCH_ROWS // 1000 + 1)]
            )
        ]

        error = await expect_rpc_error(
            ingest_raw(iter([*good, b"\xff\xff\xff"]), metadata=alice.metadata)
        )

        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        # A batch that committed before the bad message stays; the rest is gone.
        stored = await stored_count(db, alice)
        assert stored in (0, BATCH_ROWS)
        inserted = await db.fetchval(
            "SELECT coalesce(sum((detail->>'inserted')::int), 0) FROM audit_log "
            "WHERE user_id = $1 AND action = 'content.ingest'",
            alice.user_id,
        )
        assert inserted == stored
        # The connection the failed stream used is fit for the next one.
        for _ in range(3):
            response = await ingest(content_stub, alice, [make_content()])
            assert response.inserted == 1


class TestMessageSize:
    async def test_a_message_far_above_the_grpc_default_of_4_mib_is_accepted(
        self, content_stub, alice, db
    ):
        body = "word " * 180_000  # 900,000 characters
        rows = [make_content(text_content=body) for _ in range(20)]
        request = content_pb2.IngestContentRequest(contents=rows)
        assert request.ByteSize() > 16 * 1024 * 1024

        response = await content_stub.IngestContent(iter([request]), metadata=alice.metadata)

        assert (response.inserted, response.error_count) == (20, 0)
        assert await stored_platform_ids(db, alice) == with_ids(rows)
