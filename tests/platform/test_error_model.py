"""The error model holds for every input: oversized and edge values sent to
every RPC of every service come back as the contract's errors (a real code, one
ErrorInfo in the observatory.v1 domain, a BadRequest naming the field for bad
input), small enough for any client (a message of at most 1 KiB that echoes at
most 200 characters of input, all trailers under 8 KiB), and never as UNKNOWN,
INTERNAL or UNAVAILABLE, nor by throwing the connection pool away.

Cases that wait for fixes outside this test's owner (actors, vectors) are
marked xfail(strict=True) with "see error-model-todo" (/work/briefs/
error-model-todo.md), so they flip once fixed."""

from __future__ import annotations

import base64
import json
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import grpc
import pyarrow
import pyarrow.parquet
import pytest
import pytest_asyncio
from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2
from google.rpc import error_details_pb2, status_pb2
from observatory.v1 import (
    actor_pb2,
    admin_pb2,
    content_pb2,
    credit_pb2,
    network_pb2,
    network_pb2_grpc,
    vector_pb2,
    vector_pb2_grpc,
)

from server import errors, pagination
from server.app import App, create_server
from server.db import classify_database_error
from server.interceptor import to_status
from tests.conftest import make_settings
from tests.helpers import Caller, error_details, make_content, new_caller, wait_until

pytestmark = pytest.mark.asyncio

# Every oversized text is this character, so an echo of it is easy to measure
# (and, outside ASCII, grpc percent-encodes it: three bytes of trailer each).
CHAR = "é"
BIG = CHAR * 200_000
HUGE = CHAR * 1_000_001  # over the 1,000,000 characters of the longest fields
MAX_MESSAGE_BYTES = 1024
MAX_ECHO = 200
TRAILER_LIMIT = 8 * 1024
TODO = "see error-model-todo"
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
FIRST = timestamp_pb2.Timestamp(seconds=-62135596800)
LAST = timestamp_pb2.Timestamp(seconds=253402300799, nanos=999_999_000)
BEFORE_FIRST = timestamp_pb2.Timestamp(seconds=-62135596801)
AFTER_LAST = timestamp_pb2.Timestamp(seconds=253402300800)


def _uuids(count: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(count)]


@dataclass
class World:
    """Stubs, callers and rows the cases refer to."""

    content: Any
    actors: Any
    credits: Any
    admin_stub: Any
    networks: Any
    vectors: Any
    alice: Caller
    admin: Caller
    content_id: str
    actor_id: str
    foreign_actor_id: str
    foreign_content_id: str
    collection: str

    @property
    def md(self) -> tuple[tuple[str, str], ...]:
        return self.alice.metadata


@pytest_asyncio.fixture(scope="module")
async def world(app: App, channel: grpc.aio.Channel) -> AsyncIterator[World]:
    from observatory.v1 import (
        actor_pb2_grpc,
        admin_pb2_grpc,
        content_pb2_grpc,
        credit_pb2_grpc,
    )

    alice, bob, admin = new_caller(), new_caller(), new_caller("admin")
    content = content_pb2_grpc.ContentServiceStub(channel)
    actors = actor_pb2_grpc.ActorServiceStub(channel)
    vectors = vector_pb2_grpc.VectorServiceStub(channel)
    created = await content.CreateContent(
        content_pb2.CreateContentRequest(content=make_content()), metadata=alice.metadata
    )
    foreign = await content.CreateContent(
        content_pb2.CreateContentRequest(content=make_content()), metadata=bob.metadata
    )
    actor = await actors.CreateActor(
        actor_pb2.CreateActorRequest(actor=actor_pb2.Actor(canonical_name="Alice's actor")),
        metadata=alice.metadata,
    )
    bobs = await actors.CreateActor(
        actor_pb2.CreateActorRequest(actor=actor_pb2.Actor(canonical_name="Bob's actor")),
        metadata=bob.metadata,
    )
    collection = "errors_" + uuid.uuid4().hex[:12]
    await vectors.CreateCollection(
        vector_pb2.CreateCollectionRequest(
            collection=vector_pb2.Collection(name=collection, dimension=3)
        ),
        metadata=alice.metadata,
    )
    yield World(
        content=content,
        actors=actors,
        credits=credit_pb2_grpc.CreditServiceStub(channel),
        admin_stub=admin_pb2_grpc.AdminServiceStub(channel),
        networks=network_pb2_grpc.NetworkServiceStub(channel),
        vectors=vectors,
        alice=alice,
        admin=admin,
        content_id=created.id,
        actor_id=actor.id,
        foreign_actor_id=bobs.id,
        foreign_content_id=foreign.id,
        collection=collection,
    )
    await vectors.DeleteCollection(
        vector_pb2.DeleteCollectionRequest(name=collection), metadata=alice.metadata
    )


# -- the cases -----------------------------------------------------------------------

Call = Callable[[World], Awaitable[Any]]


@dataclass
class Case:
    id: str
    call: Call
    field: str | None  # the BadRequest field, for INVALID_ARGUMENT
    code: grpc.StatusCode = INVALID
    reason: str = "INVALID_FIELD"
    todo: bool = False  # waits for a fix in another engineer's files


async def _drain(call: Any) -> None:
    async for _ in call:
        pass


async def _stream(*messages: Any) -> AsyncIterator[Any]:
    for message in messages:
        yield message


def _content(**fields: Any) -> content_pb2.Content:
    return make_content(**fields)


def _filter(**fields: Any) -> content_pb2.ContentFilter:
    return content_pb2.ContentFilter(**fields)


def _signed(fingerprint: str, *key: Any) -> str:
    """A token signed with the server's key that holds values of the wrong types."""
    return pagination.encode_token(fingerprint, key)


def _tampered(w: World) -> str:
    token = pagination.encode_token("x", [1])
    body, _, mac = token.partition(".")
    return f"{body[:-2]}AA.{mac}"


def _actor(**fields: Any) -> actor_pb2.Actor:
    return actor_pb2.Actor(**fields)


def _update_content(w: World, mask: list[str] | None = None, **fields: Any) -> Awaitable[Any]:
    content = content_pb2.Content(id=fields.pop("id", w.content_id), **fields)
    return w.content.UpdateContent(
        content_pb2.UpdateContentRequest(
            content=content, update_mask=field_mask_pb2.FieldMask(paths=mask or list(fields))
        ),
        metadata=w.md,
    )


def _ingest(w: World, *messages: content_pb2.IngestContentRequest) -> Awaitable[Any]:
    return w.content.IngestContent(_stream(*messages), metadata=w.md)


def _upsert(w: World, *messages: vector_pb2.UpsertItemsRequest) -> Awaitable[Any]:
    return w.vectors.UpsertItems(_stream(*messages), metadata=w.md)


def _where_key(key: str) -> vector_pb2.Filter:
    return vector_pb2.Filter(must=[vector_pb2.Condition(key=key, exists=True)])


CONTENT_CASES = [
    Case(
        "CreateContent.platform",
        lambda w: w.content.CreateContent(
            content_pb2.CreateContentRequest(content=_content(platform=BIG)), metadata=w.md
        ),
        "content.platform",
    ),
    Case(
        "CreateContent.title",
        lambda w: w.content.CreateContent(
            content_pb2.CreateContentRequest(content=_content(title=HUGE)), metadata=w.md
        ),
        "content.title",
    ),
    Case(
        "CreateContent.url",
        lambda w: w.content.CreateContent(
            content_pb2.CreateContentRequest(
                content=_content(url="https://example.com/" + "a" * 3000)
            ),
            metadata=w.md,
        ),
        "content.url",
    ),
    Case(
        "CreateContent.text_content.nul",
        lambda w: w.content.CreateContent(
            content_pb2.CreateContentRequest(content=_content(text_content="a\x00b")),
            metadata=w.md,
        ),
        "content.text_content",
    ),
    Case(
        "CreateContent.search_terms_matched",
        lambda w: w.content.CreateContent(
            content_pb2.CreateContentRequest(
                content=_content(search_terms_matched=[f"t{i}" for i in range(20_000)])
            ),
            metadata=w.md,
        ),
        "content.search_terms_matched",
    ),
    Case(
        "CreateContent.published_at",
        lambda w: w.content.CreateContent(
            content_pb2.CreateContentRequest(
                content=content_pb2.Content(platform="p", title="t", published_at=AFTER_LAST)
            ),
            metadata=w.md,
        ),
        "content.published_at",
    ),
    Case(
        "CreateContent.collected_at",
        lambda w: w.content.CreateContent(
            content_pb2.CreateContentRequest(content=_content(collected_at=BEFORE_FIRST)),
            metadata=w.md,
        ),
        "content.collected_at",
    ),
    Case(
        "CreateContent.author_id.foreign",
        lambda w: w.content.CreateContent(
            content_pb2.CreateContentRequest(content=_content(author_id=w.foreign_actor_id)),
            metadata=w.md,
        ),
        None,
        NOT_FOUND,
        "NOT_FOUND",
    ),
    Case(
        "CreateContent.request_id",
        lambda w: w.content.CreateContent(
            content_pb2.CreateContentRequest(content=_content(), request_id=BIG), metadata=w.md
        ),
        "request_id",
    ),
    Case(
        "GetContent.id",
        lambda w: w.content.GetContent(content_pb2.GetContentRequest(id=BIG), metadata=w.md),
        "id",
    ),
    Case(
        "ListContent.filter.platforms",
        lambda w: w.content.ListContent(
            content_pb2.ListContentRequest(
                filter=_filter(platforms=[f"p{i}" for i in range(50_000)])
            ),
            metadata=w.md,
        ),
        "filter.platforms",
    ),
    Case(
        "ListContent.filter.platforms.value",
        lambda w: w.content.ListContent(
            content_pb2.ListContentRequest(filter=_filter(platforms=["x", BIG])), metadata=w.md
        ),
        "filter.platforms[1]",
    ),
    Case(
        "ListContent.filter.author_ids",
        lambda w: w.content.ListContent(
            content_pb2.ListContentRequest(filter=_filter(author_ids=_uuids(20_000))),
            metadata=w.md,
        ),
        "filter.author_ids",
    ),
    Case(
        "ListContent.filter.collection_run_id",
        lambda w: w.content.ListContent(
            content_pb2.ListContentRequest(filter=_filter(collection_run_id=BIG)), metadata=w.md
        ),
        "filter.collection_run_id",
    ),
    Case(
        "ListContent.filter.published_after",
        lambda w: w.content.ListContent(
            content_pb2.ListContentRequest(filter=_filter(published_after=BEFORE_FIRST)),
            metadata=w.md,
        ),
        "filter.published_after",
    ),
    Case(
        "ListContent.page_token.big",
        lambda w: w.content.ListContent(
            content_pb2.ListContentRequest(page_token=BIG), metadata=w.md
        ),
        "page_token",
    ),
    Case(
        "ListContent.page_token.tampered",
        lambda w: w.content.ListContent(
            content_pb2.ListContentRequest(page_token=_tampered(w)), metadata=w.md
        ),
        "page_token",
    ),
    Case(
        "ListContent.page_token.types",
        lambda w: w.content.ListContent(
            content_pb2.ListContentRequest(
                page_token=_signed(
                    pagination.fingerprint("ListContent", _filter(), str(w.alice.user_id)),
                    12345,
                    "not-a-uuid",
                )
            ),
            metadata=w.md,
        ),
        "page_token",
    ),
    Case(
        "UpdateContent.update_mask",
        lambda w: _update_content(w, mask=[BIG], title="t"),
        "update_mask.paths[0]",
    ),
    Case("UpdateContent.id", lambda w: _update_content(w, id=BIG, title="t"), "content.id"),
    Case("UpdateContent.title", lambda w: _update_content(w, title=HUGE), "content.title"),
    Case(
        "UpdateContent.language",
        lambda w: _update_content(w, language=BIG),
        "content.language",
    ),
    Case(
        "UpdateContent.author_id.foreign",
        lambda w: _update_content(w, author_id=w.foreign_actor_id),
        None,
        NOT_FOUND,
        "NOT_FOUND",
    ),
    Case(
        "DeleteContent.id",
        lambda w: w.content.DeleteContent(content_pb2.DeleteContentRequest(id=BIG), metadata=w.md),
        "id",
    ),
    Case(
        "UndeleteContent.id",
        lambda w: w.content.UndeleteContent(
            content_pb2.UndeleteContentRequest(id=BIG), metadata=w.md
        ),
        "id",
    ),
    Case(
        "SearchContent.filter.query",
        lambda w: w.content.SearchContent(
            content_pb2.SearchContentRequest(filter=_filter(query="word " * 100_000)),
            metadata=w.md,
        ),
        "filter.query",
    ),
    Case(
        "SearchContent.filter.search_term",
        lambda w: w.content.SearchContent(
            content_pb2.SearchContentRequest(filter=_filter(query="a", search_term=BIG)),
            metadata=w.md,
        ),
        "filter.search_term",
    ),
    Case(
        "SearchContent.page_token.types",
        lambda w: w.content.SearchContent(
            content_pb2.SearchContentRequest(
                filter=_filter(query="weather"),
                page_token=_signed(
                    pagination.fingerprint(
                        "SearchContent", _filter(query="weather"), str(w.alice.user_id)
                    ),
                    "NaN",
                    str(uuid.uuid4()),
                ),
            ),
            metadata=w.md,
        ),
        "page_token",
    ),
    Case(
        "IngestContent.request_id",
        lambda w: _ingest(
            w, content_pb2.IngestContentRequest(contents=[_content()], request_id=BIG)
        ),
        "request_id",
    ),
    Case(
        "ExportContent.columns.name",
        lambda w: _drain(
            w.content.ExportContent(
                content_pb2.ExportContentRequest(format=1, columns=[BIG]), metadata=w.md
            )
        ),
        "columns[0]",
    ),
    Case(
        "ExportContent.filter.languages",
        lambda w: _drain(
            w.content.ExportContent(
                content_pb2.ExportContentRequest(
                    format=2, filter=_filter(languages=["en"] * 10_000)
                ),
                metadata=w.md,
            )
        ),
        "filter.languages",
    ),
    Case(
        "FindDuplicates.filter.arenas",
        lambda w: w.content.FindDuplicates(
            content_pb2.FindDuplicatesRequest(filter=_filter(arenas=["a"] * 30_000)),
            metadata=w.md,
        ),
        "filter.arenas",
    ),
    Case(
        "MarkDuplicates.duplicate_ids",
        lambda w: w.content.MarkDuplicates(
            content_pb2.MarkDuplicatesRequest(
                canonical_id=w.content_id, duplicate_ids=_uuids(20_000)
            ),
            metadata=w.md,
        ),
        "duplicate_ids",
    ),
    Case(
        "MarkDuplicates.canonical_id",
        lambda w: w.content.MarkDuplicates(
            content_pb2.MarkDuplicatesRequest(canonical_id=BIG, duplicate_ids=_uuids(1)),
            metadata=w.md,
        ),
        "canonical_id",
    ),
    Case(
        "GetContentStats.granularity",
        lambda w: w.content.GetContentStats(
            content_pb2.GetContentStatsRequest(granularity=BIG), metadata=w.md
        ),
        "granularity",
    ),
    Case(
        "GetContentStats.filter.search_term",
        lambda w: w.content.GetContentStats(
            content_pb2.GetContentStatsRequest(filter=_filter(search_term=BIG)), metadata=w.md
        ),
        "filter.search_term",
    ),
]

ACTOR_CASES = [
    Case(
        "CreateActor.canonical_name",
        lambda w: w.actors.CreateActor(
            actor_pb2.CreateActorRequest(actor=_actor(canonical_name=BIG)), metadata=w.md
        ),
        "actor.canonical_name",
    ),
    Case(
        "CreateActor.description",
        lambda w: w.actors.CreateActor(
            actor_pb2.CreateActorRequest(actor=_actor(canonical_name="n", description=HUGE)),
            metadata=w.md,
        ),
        "actor.description",
    ),
    Case(
        "GetActor.id",
        lambda w: w.actors.GetActor(actor_pb2.GetActorRequest(id=BIG), metadata=w.md),
        "id",
    ),
    Case(
        "ListActors.name_query",
        lambda w: w.actors.ListActors(actor_pb2.ListActorsRequest(name_query=BIG), metadata=w.md),
        "name_query",
    ),
    Case(
        "ListActors.page_token.types",
        lambda w: w.actors.ListActors(
            actor_pb2.ListActorsRequest(
                page_token=_signed(
                    pagination.fingerprint("ListActors", str(w.alice.user_id), None, "", "False"),
                    ["a list"],
                    42,
                )
            ),
            metadata=w.md,
        ),
        "page_token",
    ),
    Case(
        "UpdateActor.canonical_name",
        lambda w: w.actors.UpdateActor(
            actor_pb2.UpdateActorRequest(actor=_actor(id=w.actor_id, canonical_name=BIG)),
            metadata=w.md,
        ),
        "actor.canonical_name",
    ),
    Case(
        "UpdateActor.update_mask",
        lambda w: w.actors.UpdateActor(
            actor_pb2.UpdateActorRequest(
                actor=_actor(id=w.actor_id, canonical_name="n"),
                update_mask=field_mask_pb2.FieldMask(paths=[BIG, BIG]),
            ),
            metadata=w.md,
        ),
        "update_mask.paths[0]",
    ),
    Case(
        "DeleteActor.id",
        lambda w: w.actors.DeleteActor(actor_pb2.DeleteActorRequest(id=BIG), metadata=w.md),
        "id",
    ),
    Case(
        "UndeleteActor.id",
        lambda w: w.actors.UndeleteActor(actor_pb2.UndeleteActorRequest(id=BIG), metadata=w.md),
        "id",
    ),
    Case(
        "AddAlias.alias",
        lambda w: w.actors.AddAlias(
            actor_pb2.AddAliasRequest(actor_id=w.actor_id, alias=BIG), metadata=w.md
        ),
        "alias",
    ),
    Case(
        "AddPresence.platform",
        lambda w: w.actors.AddPresence(
            actor_pb2.AddPresenceRequest(
                presence=actor_pb2.Presence(actor_id=w.actor_id, platform=BIG, platform_user_id="u")
            ),
            metadata=w.md,
        ),
        "presence.platform",
    ),
    Case(
        "AddPresence.profile_url",
        lambda w: w.actors.AddPresence(
            actor_pb2.AddPresenceRequest(
                presence=actor_pb2.Presence(
                    actor_id=w.actor_id, platform="p", platform_user_id="u", profile_url=BIG
                )
            ),
            metadata=w.md,
        ),
        "presence.profile_url",
    ),
    Case(
        "RemovePresence.id",
        lambda w: w.actors.RemovePresence(actor_pb2.RemovePresenceRequest(id=BIG), metadata=w.md),
        "id",
    ),
    Case(
        "ResolveActor.platform",
        lambda w: w.actors.ResolveActor(
            actor_pb2.ResolveActorRequest(platform=BIG, username="u"), metadata=w.md
        ),
        "platform",
    ),
    Case(
        "ResolveActor.username",
        lambda w: w.actors.ResolveActor(
            actor_pb2.ResolveActorRequest(platform="p", username=BIG), metadata=w.md
        ),
        "username",
    ),
    Case(
        "ResolveActor.platform.echo",
        lambda w: w.actors.ResolveActor(
            actor_pb2.ResolveActorRequest(platform="a" * 255, username="nobody"),
            metadata=w.md,
        ),
        None,
        NOT_FOUND,
        "NOT_FOUND",
    ),
    Case(
        "FindCandidateMatches.actor_id",
        lambda w: w.actors.FindCandidateMatches(
            actor_pb2.FindCandidateMatchesRequest(actor_id=BIG), metadata=w.md
        ),
        "actor_id",
    ),
    Case(
        "FindCandidateMatches.threshold",
        lambda w: w.actors.FindCandidateMatches(
            actor_pb2.FindCandidateMatchesRequest(actor_id=w.actor_id, threshold=float("nan")),
            metadata=w.md,
        ),
        "threshold",
    ),
    Case(
        "MergeActors.duplicate_ids",
        lambda w: w.actors.MergeActors(
            actor_pb2.MergeActorsRequest(canonical_id=w.actor_id, duplicate_ids=_uuids(20_000)),
            metadata=w.md,
        ),
        "duplicate_ids",
    ),
    Case(
        "SplitActor.new_canonical_name",
        lambda w: w.actors.SplitActor(
            actor_pb2.SplitActorRequest(
                actor_id=w.actor_id, presence_ids=_uuids(1), new_canonical_name=BIG
            ),
            metadata=w.md,
        ),
        "new_canonical_name",
    ),
    Case(
        "SplitActor.presence_ids",
        lambda w: w.actors.SplitActor(
            actor_pb2.SplitActorRequest(
                actor_id=w.actor_id, presence_ids=_uuids(20_000), new_canonical_name="n"
            ),
            metadata=w.md,
        ),
        "presence_ids",
    ),
]

CREDIT_CASES = [
    Case(
        "GrantCredits.memo",
        lambda w: w.credits.GrantCredits(
            credit_pb2.GrantCreditsRequest(user_id=str(w.alice.user_id), amount=1, memo=BIG),
            metadata=w.admin.metadata,
        ),
        "memo",
    ),
    Case(
        "GrantCredits.valid_until",
        lambda w: w.credits.GrantCredits(
            credit_pb2.GrantCreditsRequest(
                user_id=str(w.alice.user_id), amount=1, valid_until=AFTER_LAST
            ),
            metadata=w.admin.metadata,
        ),
        "valid_until",
    ),
    Case(
        "GetBalance.user_id",
        lambda w: w.credits.GetBalance(credit_pb2.GetBalanceRequest(user_id=BIG), metadata=w.md),
        "user_id",
    ),
    Case(
        "ReserveCredits.reference",
        lambda w: w.credits.ReserveCredits(
            credit_pb2.ReserveCreditsRequest(amount=1, reference=BIG), metadata=w.md
        ),
        "reference",
    ),
    Case(
        "ReserveCredits.ttl",
        lambda w: w.credits.ReserveCredits(
            credit_pb2.ReserveCreditsRequest(
                amount=1, ttl=duration_pb2.Duration(seconds=2**62, nanos=999_999_999)
            ),
            metadata=w.md,
        ),
        "ttl",
    ),
    Case(
        "SettleReservation.reservation_id",
        lambda w: w.credits.SettleReservation(
            credit_pb2.SettleReservationRequest(reservation_id=BIG, amount=1), metadata=w.md
        ),
        "reservation_id",
    ),
    Case(
        "ReleaseReservation.reservation_id",
        lambda w: w.credits.ReleaseReservation(
            credit_pb2.ReleaseReservationRequest(reservation_id=BIG), metadata=w.md
        ),
        "reservation_id",
    ),
    Case(
        "ListTransactions.page_token.types",
        lambda w: w.credits.ListTransactions(
            credit_pb2.ListTransactionsRequest(
                page_token=_signed(
                    pagination.fingerprint("ListTransactions", str(w.alice.user_id)), "7"
                )
            ),
            metadata=w.md,
        ),
        "page_token",
    ),
    Case(
        "ListTransactions.page_token.range",
        lambda w: w.credits.ListTransactions(
            credit_pb2.ListTransactionsRequest(
                page_token=_signed(
                    pagination.fingerprint("ListTransactions", str(w.alice.user_id)), 2**70
                )
            ),
            metadata=w.md,
        ),
        "page_token",
    ),
    Case(
        "EstimateCost.arena",
        lambda w: w.credits.EstimateCost(
            credit_pb2.EstimateCostRequest(arena=BIG, expected_records=1), metadata=w.md
        ),
        "arena",
    ),
    Case(
        "EstimateCost.expected_records",
        lambda w: w.credits.EstimateCost(
            credit_pb2.EstimateCostRequest(arena="a", expected_records=-(2**63)), metadata=w.md
        ),
        "expected_records",
    ),
]

ADMIN_CASES = [
    Case(
        "ListAuditLog.action",
        lambda w: w.admin_stub.ListAuditLog(
            admin_pb2.ListAuditLogRequest(action=BIG), metadata=w.admin.metadata
        ),
        "action",
    ),
    Case(
        "ListAuditLog.action.nul",
        lambda w: w.admin_stub.ListAuditLog(
            admin_pb2.ListAuditLogRequest(action="content.\x00create"), metadata=w.admin.metadata
        ),
        "action",
    ),
    Case(
        "ListAuditLog.after",
        lambda w: w.admin_stub.ListAuditLog(
            admin_pb2.ListAuditLogRequest(after=BEFORE_FIRST), metadata=w.admin.metadata
        ),
        "after",
    ),
    Case(
        "ListAuditLog.page_token.types",
        lambda w: w.admin_stub.ListAuditLog(
            admin_pb2.ListAuditLogRequest(
                page_token=_signed(
                    pagination.fingerprint("ListAuditLog", "", "", "None", "None"), True, 5
                )
            ),
            metadata=w.admin.metadata,
        ),
        "page_token",
    ),
    Case(
        "VerifyLedger.user_id",
        lambda w: w.admin_stub.VerifyLedger(
            admin_pb2.VerifyLedgerRequest(user_id=BIG), metadata=w.admin.metadata
        ),
        "user_id",
    ),
]

NETWORK_CASES = [
    Case(
        "GetNetwork.filter.platforms",
        lambda w: w.networks.GetNetwork(
            network_pb2.GetNetworkRequest(kind=1, filter=_filter(platforms=["x"] * 50_000)),
            metadata=w.md,
        ),
        "filter.platforms",
    ),
    Case(
        "GetNetwork.filter.query",
        lambda w: w.networks.GetNetwork(
            network_pb2.GetNetworkRequest(kind=2, filter=_filter(query=BIG)), metadata=w.md
        ),
        "filter.query",
    ),
    Case(
        "ExportNetwork.filter.author_ids",
        lambda w: _drain(
            w.networks.ExportNetwork(
                network_pb2.ExportNetworkRequest(
                    kind=1, format=1, filter=_filter(author_ids=[BIG])
                ),
                metadata=w.md,
            )
        ),
        "filter.author_ids[0]",
    ),
    Case(
        "ListCrossPlatformActors.filter.search_term",
        lambda w: w.networks.ListCrossPlatformActors(
            network_pb2.ListCrossPlatformActorsRequest(filter=_filter(search_term=BIG)),
            metadata=w.md,
        ),
        "filter.search_term",
    ),
    Case(
        "ListCrossPlatformActors.page_token.types",
        lambda w: w.networks.ListCrossPlatformActors(
            network_pb2.ListCrossPlatformActorsRequest(
                page_token=_signed(
                    pagination.fingerprint(
                        "ListCrossPlatformActors", _filter(), str(w.alice.user_id), "2"
                    ),
                    "two",
                    1.5,
                    "x",
                )
            ),
            metadata=w.md,
        ),
        "page_token",
    ),
]

VECTOR_CASES = [
    Case(
        "CreateCollection.name",
        lambda w: w.vectors.CreateCollection(
            vector_pb2.CreateCollectionRequest(
                collection=vector_pb2.Collection(name=BIG, dimension=3)
            ),
            metadata=w.md,
        ),
        "collection.name",
    ),
    Case(
        "GetCollection.name",
        lambda w: w.vectors.GetCollection(vector_pb2.GetCollectionRequest(name=BIG), metadata=w.md),
        "name",
    ),
    Case(
        "DeleteCollection.name",
        lambda w: w.vectors.DeleteCollection(
            vector_pb2.DeleteCollectionRequest(name=BIG), metadata=w.md
        ),
        "name",
    ),
    Case(
        "ListCollections.page_token.types",
        lambda w: w.vectors.ListCollections(
            vector_pb2.ListCollectionsRequest(
                page_token=_signed(
                    pagination.fingerprint("ListCollections", str(w.alice.user_id)), 1, 2
                )
            ),
            metadata=w.md,
        ),
        "page_token",
    ),
    Case(
        "UpsertItems.collection",
        lambda w: _upsert(
            w,
            vector_pb2.UpsertItemsRequest(
                collection=BIG, items=[vector_pb2.Item(id="a", vector=[1, 2, 3])]
            ),
        ),
        "collection",
    ),
    Case(
        "GetItem.id",
        lambda w: w.vectors.GetItem(
            vector_pb2.GetItemRequest(collection=w.collection, id=BIG), metadata=w.md
        ),
        "id",
    ),
    Case(
        "GetItem.id.echo",
        lambda w: w.vectors.GetItem(
            vector_pb2.GetItemRequest(collection=w.collection, id="a" * 256), metadata=w.md
        ),
        None,
        NOT_FOUND,
        "NOT_FOUND",
    ),
    Case(
        "DeleteItems.ids",
        lambda w: w.vectors.DeleteItems(
            vector_pb2.DeleteItemsRequest(
                collection=w.collection, ids=[f"i{i}" for i in range(200_000)]
            ),
            metadata=w.md,
        ),
        "ids",
    ),
    Case(
        "SearchSimilar.vector",
        lambda w: _drain(
            w.vectors.SearchSimilar(
                vector_pb2.SearchSimilarRequest(collection=w.collection, vector=[0.5] * 100_000),
                metadata=w.md,
            )
        ),
        "vector",
    ),
    Case(
        "SearchSimilar.where.key",
        lambda w: _drain(
            w.vectors.SearchSimilar(
                vector_pb2.SearchSimilarRequest(
                    collection=w.collection, vector=[1, 2, 3], where=_where_key(BIG)
                ),
                metadata=w.md,
            )
        ),
        "where.must[0].key",
    ),
    Case(
        "SearchText.query",
        lambda w: _drain(
            w.vectors.SearchText(
                vector_pb2.SearchTextRequest(collection=w.collection, query="word " * 300_000),
                metadata=w.md,
            )
        ),
        "query",
    ),
    Case(
        "HybridSearch.query",
        lambda w: _drain(
            w.vectors.HybridSearch(
                vector_pb2.HybridSearchRequest(
                    collection=w.collection, vector=[1, 2, 3], query="word " * 300_000
                ),
                metadata=w.md,
            )
        ),
        "query",
    ),
    Case(
        "CheckDuplicate.url",
        lambda w: w.vectors.CheckDuplicate(
            vector_pb2.CheckDuplicateRequest(collection=w.collection, url="https://e.com/" + BIG),
            metadata=w.md,
        ),
        "url",
    ),
    Case(
        "SearchSimilarBatch.searches",
        lambda w: w.vectors.SearchSimilarBatch(
            vector_pb2.SearchSimilarBatchRequest(
                collection=w.collection,
                searches=[vector_pb2.SimilarQuery(vector=[1, 2, 3])] * 1000,
            ),
            metadata=w.md,
        ),
        "searches",
    ),
    Case(
        "ListItems.where.key",
        lambda w: w.vectors.ListItems(
            vector_pb2.ListItemsRequest(collection=w.collection, where=_where_key(BIG)),
            metadata=w.md,
        ),
        "where.must[0].key",
    ),
    Case(
        "CountItems.where.key",
        lambda w: w.vectors.CountItems(
            vector_pb2.CountItemsRequest(collection=w.collection, where=_where_key(BIG)),
            metadata=w.md,
        ),
        "where.must[0].key",
    ),
    Case(
        "CreateMetadataIndex.key",
        lambda w: w.vectors.CreateMetadataIndex(
            vector_pb2.CreateMetadataIndexRequest(collection=w.collection, key=BIG, type=1),
            metadata=w.md,
        ),
        "key",
    ),
]

CASES = [
    *CONTENT_CASES,
    *ACTOR_CASES,
    *CREDIT_CASES,
    *ADMIN_CASES,
    *NETWORK_CASES,
    *VECTOR_CASES,
]


def _params() -> list[Any]:
    return [
        pytest.param(case, id=case.id, marks=[pytest.mark.xfail(strict=True, reason=TODO)])
        if case.todo
        else pytest.param(case, id=case.id)
        for case in CASES
    ]


# -- the checks ----------------------------------------------------------------------------


def _longest_run(text: str) -> int:
    """The longest run of one repeated character: the inputs are such runs."""
    longest = run = 0
    previous = ""
    for char in text:
        run = run + 1 if char == previous else 1
        previous = char
        longest = max(longest, run)
    return longest


def trailer_bytes(error: grpc.aio.AioRpcError) -> int:
    """The error's trailers as HTTP/2 counts them against a client's metadata
    limit: name + value + 32 per entry, binary values base64-encoded, the
    message percent-encoded outside printable ASCII."""
    total = len("grpc-status") + 2 + 32
    message = (error.details() or "").encode()
    total += len("grpc-message") + 32 + len(message)
    total += 2 * sum(1 for b in message if b < 0x20 or b > 0x7E or b == ord("%"))
    for key, value in error.trailing_metadata() or ():
        size = len(base64.b64encode(value)) if isinstance(value, bytes) else len(value)
        total += len(key) + size + 32
    return total


async def expect_error(case: Case, world: World) -> None:
    try:
        await case.call(world)
    except grpc.aio.AioRpcError as error:
        details = error_details(error)
        assert error.code() == case.code, f"{error.code().name}: {details.message[:300]}"
        assert details.info is not None, "no ErrorInfo"
        assert details.info.domain == "observatory.v1"
        assert details.reason == case.reason
        if case.field is not None:
            assert case.field in details.fields, details.fields
        message = details.message
        assert len(message.encode()) <= MAX_MESSAGE_BYTES
        texts = [message, *details.info.metadata.values()]
        if details.bad_request is not None:
            for violation in details.bad_request.field_violations:
                texts += [violation.field, violation.description]
        assert max(map(_longest_run, texts)) <= MAX_ECHO, "echoes more than 200 characters"
        assert trailer_bytes(error) < TRAILER_LIMIT
    else:
        raise AssertionError("the call succeeded")


@pytest.mark.parametrize("case", _params())
async def test_edge_input_gets_a_small_error(case: Case, world: World, app: App) -> None:
    pool = app.units.engine.pool
    await expect_error(case, world)
    assert app.units.engine.pool is pool, "the connection pool was thrown away"


# -- the same, from inside: what the interceptor sends for any error -----------------------


async def test_any_error_is_cut_down_to_fit_a_clients_metadata_limit() -> None:
    huge = errors.ObservatoryError(
        CHAR * 100_000,
        reason="SOME_REASON",
        metadata={f"key{i}-" + "k" * 1000: CHAR * 100_000 for i in range(100)},
        field_violations=[(f"field{i}" + "f" * 100_000, CHAR * 100_000) for i in range(10_000)],
    )
    status = to_status(huge, "request-1")
    message = status.details.encode()
    assert len(message) <= MAX_MESSAGE_BYTES
    percent_encoded = len(message) + 2 * sum(1 for b in message if b > 0x7E or b < 0x20)
    size = len("grpc-message") + 32 + percent_encoded + len("grpc-status") + 2 + 32
    for key, value in status.trailing_metadata:
        size += len(key) + len(base64.b64encode(value)) + 32
    assert size < TRAILER_LIMIT
    rpc = status_pb2.Status.FromString(dict(status.trailing_metadata)["grpc-status-details-bin"])
    info = error_details_pb2.ErrorInfo()
    rpc.details[0].Unpack(info)
    assert (info.domain, info.reason, info.metadata["request_id"]) == (
        "observatory.v1",
        "SOME_REASON",
        "request-1",
    )
    bad_request = error_details_pb2.BadRequest()
    rpc.details[1].Unpack(bad_request)
    assert bad_request.field_violations[0].field.startswith("field0")
    texts = [status.details, *info.metadata.values()]
    texts += [v.field for v in bad_request.field_violations]
    assert max(map(_longest_run, texts)) <= MAX_ECHO


async def test_a_small_error_is_sent_as_it_is() -> None:
    error = errors.InvalidArgument("content.title", "is required")
    status = to_status(error, "request-2")
    assert status.details == "content.title: is required"
    rpc = status_pb2.Status.FromString(dict(status.trailing_metadata)["grpc-status-details-bin"])
    bad_request = error_details_pb2.BadRequest()
    rpc.details[1].Unpack(bad_request)
    assert [(v.field, v.description) for v in bad_request.field_violations] == [
        ("content.title", "is required")
    ]


async def test_quoting_input_keeps_64_characters() -> None:
    assert errors.quote("abc") == "'abc'"
    assert errors.quote("x" * 1000) == repr("x" * 64) + "…"


# -- values that pass through PostgreSQL and come back --------------------------------------


async def test_content_at_the_ends_of_the_range_round_trips(world: World) -> None:
    caller = new_caller()
    stub = world.content
    first = make_content(title="first")
    first.published_at.CopyFrom(FIRST)
    first.collected_at.CopyFrom(LAST)
    last = make_content(title="last")
    last.published_at.CopyFrom(LAST)
    created = [
        await stub.CreateContent(content_pb2.CreateContentRequest(content=c), metadata=md)
        for c, md in ((first, caller.metadata), (last, caller.metadata))
    ]
    assert (created[0].published_at, created[0].collected_at) == (FIRST, LAST)
    assert created[1].published_at == LAST
    got = await stub.GetContent(
        content_pb2.GetContentRequest(id=created[0].id), metadata=caller.metadata
    )
    assert (got.published_at, got.collected_at) == (FIRST, LAST)
    # Newest first, one per page: the page token holds the ends of the range.
    page = await stub.ListContent(
        content_pb2.ListContentRequest(page_size=1), metadata=caller.metadata
    )
    assert [c.published_at for c in page.contents] == [LAST]
    page = await stub.ListContent(
        content_pb2.ListContentRequest(page_size=1, page_token=page.next_page_token),
        metadata=caller.metadata,
    )
    assert [c.published_at for c in page.contents] == [FIRST]
    window = _filter(published_after=FIRST, published_before=LAST)
    page = await stub.ListContent(
        content_pb2.ListContentRequest(filter=window), metadata=caller.metadata
    )
    assert [c.id for c in page.contents] == [created[0].id]  # [after, before)
    update = content_pb2.Content(id=created[1].id, published_at=FIRST, collected_at=FIRST)
    updated = await stub.UpdateContent(
        content_pb2.UpdateContentRequest(
            content=update,
            update_mask=field_mask_pb2.FieldMask(paths=["published_at", "collected_at"]),
        ),
        metadata=caller.metadata,
    )
    assert (updated.published_at, updated.collected_at) == (FIRST, FIRST)
    for granularity in ("day", "week", "month"):
        stats = await stub.GetContentStats(
            content_pb2.GetContentStatsRequest(granularity=granularity), metadata=caller.metadata
        )
        assert stats.total == 2
        assert stats.volume[0].period_start == FIRST


async def test_ingested_content_at_the_ends_of_the_range_round_trips(world: World) -> None:
    caller = new_caller()
    rows = []
    for stamp in (FIRST, LAST):
        row = make_content()
        row.published_at.CopyFrom(stamp)
        row.collected_at.CopyFrom(stamp)
        rows.append(row)
    response = await world.content.IngestContent(
        _stream(content_pb2.IngestContentRequest(contents=rows)), metadata=caller.metadata
    )
    assert (response.inserted, response.error_count) == (2, 0)
    page = await world.content.ListContent(
        content_pb2.ListContentRequest(), metadata=caller.metadata
    )
    assert [(c.published_at, c.collected_at) for c in page.contents] == [
        (LAST, LAST),
        (FIRST, FIRST),
    ]


async def _export(world: World, caller: Caller, fmt: int) -> bytes:
    request = content_pb2.ExportContentRequest(
        format=fmt, columns=["platform_id", "published_at", "collected_at"]
    )
    chunks = [
        chunk.data async for chunk in world.content.ExportContent(request, metadata=caller.metadata)
    ]
    return b"".join(chunks)


async def test_exports_write_the_ends_of_the_range_as_instants(world: World) -> None:
    caller = new_caller()
    row = make_content(platform_id="edge")
    row.published_at.CopyFrom(LAST)
    row.collected_at.CopyFrom(FIRST)
    await world.content.CreateContent(
        content_pb2.CreateContentRequest(content=row), metadata=caller.metadata
    )
    csv = (await _export(world, caller, content_pb2.EXPORT_FORMAT_CSV)).decode()
    assert "edge,9999-12-31 23:59:59.999999+00,0001-01-01 00:00:00+00" in csv
    ndjson = json.loads(await _export(world, caller, content_pb2.EXPORT_FORMAT_NDJSON))
    assert ndjson["published_at"] == "9999-12-31T23:59:59.999999+00:00"
    assert ndjson["collected_at"] == "0001-01-01T00:00:00+00:00"
    table = pyarrow.parquet.read_table(
        pyarrow.BufferReader(await _export(world, caller, content_pb2.EXPORT_FORMAT_PARQUET))
    )
    assert table.column("published_at").to_pylist() == [
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    ]
    assert table.column("collected_at").to_pylist() == [datetime(1, 1, 1, tzinfo=UTC)]
    xlsx = await _export(world, caller, content_pb2.EXPORT_FORMAT_XLSX)
    assert xlsx.startswith(b"PK")


async def test_credits_and_audit_at_the_ends_of_the_range(world: World) -> None:
    caller = new_caller()
    grant = await world.credits.GrantCredits(
        credit_pb2.GrantCreditsRequest(
            user_id=str(caller.user_id), amount=5, valid_from=FIRST, valid_until=LAST
        ),
        metadata=world.admin.metadata,
    )
    assert (grant.valid_from, grant.valid_until) == (FIRST, LAST)
    balance = await world.credits.GetBalance(
        credit_pb2.GetBalanceRequest(), metadata=caller.metadata
    )
    assert balance.allocated == 5
    audit = await world.admin_stub.ListAuditLog(
        admin_pb2.ListAuditLogRequest(user_id=str(world.admin.user_id), after=FIRST, before=LAST),
        metadata=world.admin.metadata,
    )
    assert audit.entries


# -- references to other resources ----------------------------------------------------------


async def test_content_may_name_its_owners_actor_as_author(world: World) -> None:
    created = await world.content.CreateContent(
        content_pb2.CreateContentRequest(content=_content(author_id=world.actor_id)),
        metadata=world.md,
    )
    assert created.author_id == world.actor_id


async def test_ingest_row_with_another_callers_actor_is_refused(world: World) -> None:
    rows = [_content(author_id=world.foreign_actor_id), _content(author_id=world.actor_id)]
    response = await world.content.IngestContent(
        _stream(content_pb2.IngestContentRequest(contents=rows)), metadata=world.md
    )
    assert response.inserted == 1
    assert [(e.index, e.field) for e in response.errors] == [(0, "author_id")]


async def test_upsert_item_with_another_callers_content_is_refused(world: World) -> None:
    items = [
        vector_pb2.Item(id="foreign", vector=[1, 2, 3], content_id=world.foreign_content_id),
        vector_pb2.Item(id="own", vector=[1, 2, 3], content_id=world.content_id),
    ]
    response = await world.vectors.UpsertItems(
        _stream(vector_pb2.UpsertItemsRequest(collection=world.collection, items=items)),
        metadata=world.md,
    )
    assert response.upserted == 1
    assert [(e.index, e.field) for e in response.errors] == [(0, "content_id")]


async def test_an_ingested_rows_error_is_small(world: World) -> None:
    rows = [_content(platform=BIG), _content(url="https://example.com/" + BIG)]
    response = await world.content.IngestContent(
        _stream(content_pb2.IngestContentRequest(contents=rows)), metadata=world.md
    )
    assert [(e.index, e.field) for e in response.errors] == [(0, "platform"), (1, "url")]
    assert all(len(e.reason) < 200 for e in response.errors)


# -- page tokens ------------------------------------------------------------------------------


@pytest.fixture
def restore_token_key() -> Iterator[None]:
    key = pagination._key
    yield
    pagination.use_key(key)


async def test_every_server_of_a_deployment_reads_the_others_page_tokens(restore_token_key) -> None:
    pagination.use_key(pagination.derive_key("the deployment's secret, at least 32 bytes"))
    token = pagination.encode_token("q", [datetime(2026, 1, 2, tzinfo=UTC), uuid.UUID(int=7)])
    # Another worker or server derives the same key from the same secret.
    pagination.use_key(pagination.derive_key("the deployment's secret, at least 32 bytes"))
    assert pagination.decode_token(token, "q", datetime.fromisoformat, uuid.UUID) == (
        datetime(2026, 1, 2, tzinfo=UTC),
        uuid.UUID(int=7),
    )
    pagination.use_key(pagination.derive_key("another deployment's secret, 32 bytes+"))
    with pytest.raises(errors.InvalidArgument):
        pagination.decode_token(token, "q", datetime.fromisoformat, uuid.UUID)


async def test_a_deployment_key_is_the_same_from_every_server(tmp_path) -> None:
    secret = "the deployment's secret, at least 32 bytes"
    assert pagination.deployment_key(secret, None) == pagination.deployment_key(secret, None)
    assert pagination.deployment_key(secret, None) != pagination.derive_key(secret + "!")
    pem = "-----BEGIN PUBLIC KEY-----\nMFkw...\n-----END PUBLIC KEY-----\n"
    (tmp_path / "key.pem").write_text(pem)
    from_file = pagination.deployment_key(None, str(tmp_path / "key.pem"))
    assert from_file == pagination.deployment_key(None, pem)


@pytest.mark.parametrize(
    ("parser", "value"),
    [
        (int, "7"),
        (int, True),
        (int, 1.5),
        (int, 2**64),
        (float, "1.5"),
        (float, None),
        (str, 5),
        (str, ["x"]),
        (uuid.UUID, 5),
        (uuid.UUID, "not-a-uuid"),
        (datetime.fromisoformat, 1700000000),
        (datetime.fromisoformat, "yesterday"),
    ],
)
async def test_a_signed_token_with_a_value_of_the_wrong_type_is_refused(parser, value) -> None:
    token = pagination.encode_token("q", [value])
    with pytest.raises(errors.InvalidArgument) as caught:
        pagination.decode_token(token, "q", parser)
    assert caught.value.field == "page_token"


async def test_page_tokens_read_back_the_ends_of_the_range() -> None:
    for stamp in (datetime.max, datetime.min):  # how asyncpg reads ±infinity
        token = pagination.encode_token("q", [stamp])
        (read,) = pagination.decode_token(token, "q", datetime.fromisoformat)
        assert read == stamp.replace(tzinfo=UTC)


# -- what the database refuses --------------------------------------------------------------------


async def _driver_error(db, sql: str, *args: Any) -> BaseException:
    try:
        await db.fetch(sql, *args)
    except Exception as exc:
        return exc
    raise AssertionError("the statement succeeded")


async def test_database_refusals_of_values_are_invalid_argument(db) -> None:
    refusals = [
        await _driver_error(db, "SELECT $1::bigint", 2**70),  # refused by the driver
        await _driver_error(db, "SELECT $1::text", "a\x00b"),
        await _driver_error(
            db,
            "SELECT websearch_to_tsquery('simple', $1)",
            " ".join(uuid.uuid4().hex for _ in range(40_000)),  # a tsquery over 1 MB
        ),
        await _driver_error(
            db,
            "SELECT 1 WHERE 1 IN (" + ",".join(f"${i + 1}::int" for i in range(40_000)) + ")",
            *range(40_000),
        ),
    ]
    await db.execute("CREATE TEMP TABLE wide (value text); CREATE INDEX ON wide (value)")
    refusals.append(
        await _driver_error(
            db,
            "INSERT INTO wide SELECT string_agg(md5(i::text), '') FROM generate_series(1, 300) i",
        )
    )
    for refusal in refusals:
        assert isinstance(classify_database_error(refusal), errors.InvalidArgument), refusal
    assert not db.is_closed()


async def test_a_closed_connection_is_unavailable(database_url) -> None:
    conn = await asyncpg.connect(database_url)
    await conn.close()
    error = await _driver_error(conn, "SELECT 1")
    assert isinstance(classify_database_error(error), errors.Unavailable)


async def test_a_page_of_large_rows_ends_early_and_the_next_goes_on(world: World) -> None:
    caller = new_caller()
    for i in range(10):
        await world.content.CreateContent(
            content_pb2.CreateContentRequest(content=make_content(title=str(i) * 300_000)),
            metadata=caller.metadata,
        )
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await world.content.ListContent(
            content_pb2.ListContentRequest(page_size=10, page_token=token),
            metadata=caller.metadata,
        )
        pages += 1
        assert page.ByteSize() < 4 << 20  # a client's default limit
        seen += [c.id for c in page.contents]
        token = page.next_page_token
        if not token:
            break
    assert pages == 2
    assert len(seen) == len(set(seen)) == 10


# -- every string field of every request ------------------------------------------------------

MODULES = (content_pb2, actor_pb2, credit_pb2, admin_pb2, network_pb2, vector_pb2)
RPCS = [
    (module, method)
    for module in MODULES
    for service in module.DESCRIPTOR.services_by_name.values()
    for method in service.methods
]
ADMIN_RPCS = {"GrantCredits", "ListAuditLog", "VerifyLedger"}


async def test_every_rpc_of_every_service_has_a_case() -> None:
    covered = {case.id.split(".")[0] for case in CASES}
    assert {method.name for _, method in RPCS} - covered == set()


def _string_paths(descriptor: Any, depth: int = 0) -> list[tuple[str, ...]]:
    """Every string field of a message type as a path of field names, nested
    messages (a repeated one by its first element) three levels down."""
    paths: list[tuple[str, ...]] = []
    for field in descriptor.fields:
        if field.type == field.TYPE_STRING:
            paths.append((field.name,))
        elif (
            field.type == field.TYPE_MESSAGE
            and depth < 3
            and not field.message_type.full_name.startswith("google.protobuf.")
            and not field.message_type.GetOptions().map_entry
        ):
            paths += [(field.name, *rest) for rest in _string_paths(field.message_type, depth + 1)]
    return paths


def _with(request: Any, path: tuple[str, ...], text: Any) -> Any:
    """A copy of `request` with the field at `path` set to `text` (a repeated
    field gets it as its first value)."""
    copy = type(request).FromString(request.SerializeToString())
    message = copy
    for name in path[:-1]:
        child = getattr(message, name)
        if message.DESCRIPTOR.fields_by_name[name].is_repeated:
            child = child[0] if len(child) else child.add()
        message = child
    last = path[-1]
    if message.DESCRIPTOR.fields_by_name[last].is_repeated:
        values = getattr(message, last)
        if len(values):
            values[0] = text
        else:
            values.append(text)
    else:
        setattr(message, last, text)
    return copy


def _bases(w: World) -> dict[str, Any]:
    """A request for each RPC that passes its checks (or gets as far as the
    rows it names), so that one bad field at a time is what it is refused for."""
    filter = content_pb2.ContentFilter(query="weather", platforms=["twitter"])
    where = vector_pb2.Filter(must=[vector_pb2.Condition(key="k", exists=True)])
    presence = actor_pb2.Presence(actor_id=w.actor_id, platform="p", platform_user_id="u")
    return {
        "CreateContent": content_pb2.CreateContentRequest(
            content=make_content(), request_id=str(uuid.uuid4())
        ),
        "GetContent": content_pb2.GetContentRequest(id=w.content_id),
        "ListContent": content_pb2.ListContentRequest(filter=filter),
        "UpdateContent": content_pb2.UpdateContentRequest(content=make_content(id=w.content_id)),
        "DeleteContent": content_pb2.DeleteContentRequest(id=str(uuid.uuid4())),
        "UndeleteContent": content_pb2.UndeleteContentRequest(id=str(uuid.uuid4())),
        "SearchContent": content_pb2.SearchContentRequest(filter=filter),
        "IngestContent": content_pb2.IngestContentRequest(contents=[make_content()]),
        "ExportContent": content_pb2.ExportContentRequest(
            format=1, filter=filter, columns=["title"]
        ),
        "FindDuplicates": content_pb2.FindDuplicatesRequest(filter=filter),
        "MarkDuplicates": content_pb2.MarkDuplicatesRequest(
            canonical_id=w.content_id, duplicate_ids=[str(uuid.uuid4())]
        ),
        "GetContentStats": content_pb2.GetContentStatsRequest(filter=filter, granularity="day"),
        "CreateActor": actor_pb2.CreateActorRequest(actor=actor_pb2.Actor(canonical_name="n")),
        "GetActor": actor_pb2.GetActorRequest(id=w.actor_id),
        "ListActors": actor_pb2.ListActorsRequest(name_query="a"),
        "UpdateActor": actor_pb2.UpdateActorRequest(
            actor=actor_pb2.Actor(id=w.actor_id, canonical_name="Alice's actor")
        ),
        "DeleteActor": actor_pb2.DeleteActorRequest(id=str(uuid.uuid4())),
        "UndeleteActor": actor_pb2.UndeleteActorRequest(id=str(uuid.uuid4())),
        "AddAlias": actor_pb2.AddAliasRequest(actor_id=w.actor_id, alias="alias"),
        "AddPresence": actor_pb2.AddPresenceRequest(presence=presence),
        "RemovePresence": actor_pb2.RemovePresenceRequest(id=str(uuid.uuid4())),
        "ResolveActor": actor_pb2.ResolveActorRequest(platform="p", username="u"),
        "FindCandidateMatches": actor_pb2.FindCandidateMatchesRequest(actor_id=w.actor_id),
        "MergeActors": actor_pb2.MergeActorsRequest(
            canonical_id=w.actor_id, duplicate_ids=[str(uuid.uuid4())]
        ),
        "SplitActor": actor_pb2.SplitActorRequest(
            actor_id=w.actor_id, presence_ids=[str(uuid.uuid4())], new_canonical_name="n"
        ),
        "GrantCredits": credit_pb2.GrantCreditsRequest(user_id=str(w.alice.user_id), amount=1),
        "GetBalance": credit_pb2.GetBalanceRequest(user_id=str(w.alice.user_id)),
        "ReserveCredits": credit_pb2.ReserveCreditsRequest(amount=1, reference="r"),
        "SettleReservation": credit_pb2.SettleReservationRequest(
            reservation_id=str(uuid.uuid4()), amount=1
        ),
        "ReleaseReservation": credit_pb2.ReleaseReservationRequest(
            reservation_id=str(uuid.uuid4())
        ),
        "ListTransactions": credit_pb2.ListTransactionsRequest(),
        "EstimateCost": credit_pb2.EstimateCostRequest(arena="a", expected_records=10),
        "ListAuditLog": admin_pb2.ListAuditLogRequest(action="content.create"),
        "VerifyLedger": admin_pb2.VerifyLedgerRequest(user_id=str(w.alice.user_id)),
        "GetNetwork": network_pb2.GetNetworkRequest(kind=1, filter=filter),
        "ExportNetwork": network_pb2.ExportNetworkRequest(kind=1, format=1, filter=filter),
        "ListCrossPlatformActors": network_pb2.ListCrossPlatformActorsRequest(filter=filter),
        "CreateCollection": vector_pb2.CreateCollectionRequest(
            collection=vector_pb2.Collection(name="x" + uuid.uuid4().hex[:12], dimension=3)
        ),
        "GetCollection": vector_pb2.GetCollectionRequest(name=w.collection),
        "DeleteCollection": vector_pb2.DeleteCollectionRequest(name="missing_collection"),
        "ListCollections": vector_pb2.ListCollectionsRequest(),
        "UpsertItems": vector_pb2.UpsertItemsRequest(
            collection=w.collection, items=[vector_pb2.Item(id="x", vector=[1, 2, 3])]
        ),
        "GetItem": vector_pb2.GetItemRequest(collection=w.collection, id="x"),
        "DeleteItems": vector_pb2.DeleteItemsRequest(collection=w.collection, ids=["nothing"]),
        "SearchSimilar": vector_pb2.SearchSimilarRequest(
            collection=w.collection, vector=[1, 2, 3], where=where
        ),
        "SearchText": vector_pb2.SearchTextRequest(collection=w.collection, query="x", where=where),
        "HybridSearch": vector_pb2.HybridSearchRequest(
            collection=w.collection, vector=[1, 2, 3], query="x", where=where
        ),
        "CheckDuplicate": vector_pb2.CheckDuplicateRequest(
            collection=w.collection, vector=[1, 2, 3], url="https://example.com/"
        ),
        "SearchSimilarBatch": vector_pb2.SearchSimilarBatchRequest(
            collection=w.collection,
            searches=[vector_pb2.SimilarQuery(vector=[1, 2, 3], where=where)],
        ),
        "ListItems": vector_pb2.ListItemsRequest(collection=w.collection, where=where),
        "CountItems": vector_pb2.CountItemsRequest(collection=w.collection, where=where),
        "CreateMetadataIndex": vector_pb2.CreateMetadataIndexRequest(
            collection=w.collection, key="k", type=1
        ),
    }


FIELD_CASES = [
    (module, method, path) for module, method in RPCS for path in _string_paths(method.input_type)
]


async def _send(
    channel: grpc.aio.Channel, module: Any, method: Any, request: Any, caller: Caller
) -> None:
    service = method.containing_service.full_name
    path = f"/{service}/{method.name}"
    response_class = getattr(module, method.output_type.name, None)
    decode = response_class.FromString if response_class is not None else (lambda raw: raw)
    encode = type(request).SerializeToString
    metadata = caller.metadata
    if method.client_streaming:
        call = channel.stream_unary(path, request_serializer=encode, response_deserializer=decode)
        await call(_stream(request), metadata=metadata)
    elif method.server_streaming:
        call = channel.unary_stream(path, request_serializer=encode, response_deserializer=decode)
        await _drain(call(request, metadata=metadata))
    else:
        call = channel.unary_unary(path, request_serializer=encode, response_deserializer=decode)
        await call(request, metadata=metadata)


@pytest.mark.parametrize("text", [BIG, "a\x00b"], ids=["200k-characters", "nul"])
@pytest.mark.parametrize(
    ("module", "method", "path"),
    FIELD_CASES,
    ids=[f"{m.name}.{'.'.join(path)}" for _, m, path in FIELD_CASES],
)
async def test_any_string_in_any_field_stays_in_the_error_model(
    module, method, path, text, world: World, channel: grpc.aio.Channel, app: App
) -> None:
    """One string field at a time, in a request that is otherwise fine: either
    the call succeeds, or it fails inside the error model (INVALID_ARGUMENT
    naming a field), never with UNKNOWN, INTERNAL, UNAVAILABLE or trailers too
    large for the client."""
    request = _with(_bases(world)[method.name], path, text)
    caller = world.admin if method.name in ADMIN_RPCS else world.alice
    pool = app.units.engine.pool
    try:
        await _send(channel, module, method, request, caller)
    except grpc.aio.AioRpcError as error:
        details = error_details(error)
        assert error.code() not in {
            grpc.StatusCode.UNKNOWN,
            grpc.StatusCode.INTERNAL,
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        }, f"{error.code().name}: {details.message[:300]}"
        assert details.info is not None and details.info.domain == "observatory.v1"
        if error.code() == INVALID:
            named = {re.sub(r"\[\d+\]", "", field) for field in details.fields}
            assert ".".join(path) in named, f"the BadRequest names {details.fields}"
        assert len(details.message.encode()) <= MAX_MESSAGE_BYTES
        assert _longest_run(details.message) <= MAX_ECHO
        assert trailer_bytes(error) < TRAILER_LIMIT
    assert app.units.engine.pool is pool


_INT_RANGES = {
    "TYPE_INT32": (-(2**31), 2**31 - 1),
    "TYPE_SINT32": (-(2**31), 2**31 - 1),
    "TYPE_SFIXED32": (-(2**31), 2**31 - 1),
    "TYPE_INT64": (-(2**63), 2**63 - 1),
    "TYPE_SINT64": (-(2**63), 2**63 - 1),
    "TYPE_SFIXED64": (-(2**63), 2**63 - 1),
    "TYPE_UINT32": (0, 2**32 - 1),
    "TYPE_FIXED32": (0, 2**32 - 1),
    "TYPE_UINT64": (0, 2**64 - 1),
    "TYPE_FIXED64": (0, 2**64 - 1),
    "TYPE_ENUM": (-1, 2**31 - 1),
}
_FLOATS = (float("nan"), float("inf"), -float("inf"), -3.4e38)


def _number_paths(descriptor: Any, depth: int = 0) -> list[tuple[tuple[str, ...], Any]]:
    """(path, extreme value) for every number and enum field, nested messages
    (a repeated one by its first element) three levels down."""
    found: list[tuple[tuple[str, ...], Any]] = []
    types = (
        {getattr(descriptor.fields[0], name): name for name in _INT_RANGES}
        if descriptor.fields
        else {}
    )
    for field in descriptor.fields:
        if field.type in types:
            found += [((field.name,), value) for value in _INT_RANGES[types[field.type]]]
        elif field.type in (field.TYPE_FLOAT, field.TYPE_DOUBLE):
            found += [((field.name,), value) for value in _FLOATS]
        elif (
            field.type == field.TYPE_MESSAGE
            and depth < 3
            and not field.message_type.full_name.startswith("google.protobuf.")
            and not field.message_type.GetOptions().map_entry
        ):
            found += [
                ((field.name, *rest), value)
                for rest, value in _number_paths(field.message_type, depth + 1)
            ]
    return found


NUMBER_CASES = [
    (module, method, path, value)
    for module, method in RPCS
    for path, value in _number_paths(method.input_type)
]
# Numbers that reach the database as parameters of a narrower type: asyncpg
# refuses them while binding and leaves that connection unusable for the next
# caller (see /work/briefs/error-model-todo.md, networks and uow).
NUMBER_TODO: set[str] = set()


def _number_id(method: Any, path: tuple[str, ...], value: Any) -> str:
    return f"{method.name}.{'.'.join(path)}={value}"


@dataclass
class Isolated:
    app: App
    channel: grpc.aio.Channel


@pytest_asyncio.fixture(scope="module")
async def isolated(database_url: str) -> AsyncIterator[Isolated]:
    """A server of its own whose pool is renewed after each case, so that a
    connection one case leaves broken can only fail that case."""
    own = await create_server(make_settings(), database_url)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{own.port}") as channel:
        yield Isolated(own, channel)
    await own.stop(0)


def _all_returned(pool: Any) -> Callable[[], Awaitable[bool]]:
    async def returned() -> bool:
        return bool(pool.checkedout() == 0)

    return returned


@pytest.mark.parametrize(
    ("module", "method", "path", "value"),
    [
        pytest.param(
            *case,
            id=_number_id(*case[1:]),
            marks=[pytest.mark.xfail(strict=True, reason=TODO)]
            if _number_id(*case[1:]) in NUMBER_TODO
            else [],
        )
        for case in NUMBER_CASES
    ],
)
async def test_any_extreme_number_stays_in_the_error_model(
    module, method, path, value, world: World, isolated: Isolated
) -> None:
    """One number (or enum) field at a time at the end of its range (floats:
    NaN and the infinities), in a request that is otherwise fine."""
    request = _with(_bases(world)[method.name], path, value)
    caller = world.admin if method.name in ADMIN_RPCS else world.alice
    app = isolated.app
    pool = app.units.engine.pool
    try:
        await _send(isolated.channel, module, method, request, caller)
    except grpc.aio.AioRpcError as error:
        details = error_details(error)
        assert error.code() not in {
            grpc.StatusCode.UNKNOWN,
            grpc.StatusCode.INTERNAL,
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        }, f"{error.code().name}: {details.message[:300]}"
        assert details.info is not None and details.info.domain == "observatory.v1"
        if error.code() == INVALID:  # (a new list element may lack other fields)
            assert details.fields and all(details.fields), "a BadRequest naming the field"
    finally:
        assert app.units.engine.pool is pool
        if _number_id(method, path, value) in NUMBER_TODO:
            # Its connection is broken (see NUMBER_TODO): the next case gets a
            # new pool, once nothing holds a connection of this one.
            assert await wait_until(_all_returned(pool))
            await app.units.engine.dispose()
