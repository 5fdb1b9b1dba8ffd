"""Every read-only RPC works when answered by a hot standby: none of them
writes, takes a lock a standby refuses, or asks for the primary's WAL."""

from __future__ import annotations

import uuid

import grpc
import pytest
from observatory.v1 import (
    actor_pb2,
    actor_pb2_grpc,
    admin_pb2,
    admin_pb2_grpc,
    content_pb2,
    content_pb2_grpc,
    credit_pb2,
    credit_pb2_grpc,
    network_pb2,
    network_pb2_grpc,
    vector_pb2,
    vector_pb2_grpc,
)

from server.app import App
from tests.helpers import make_content, new_caller
from tests.scaling.conftest import wait_for_replay

pytestmark = pytest.mark.asyncio


async def _drain(call) -> list:
    return [message async for message in call]


async def test_every_read_only_rpc_is_answered_by_the_standby(
    replicated: App, replicated_channel: grpc.aio.Channel, cluster
):
    user, admin = new_caller(), new_caller("admin")
    auth, admin_auth = user.metadata, admin.metadata
    content = content_pb2_grpc.ContentServiceStub(replicated_channel)
    actors = actor_pb2_grpc.ActorServiceStub(replicated_channel)
    credits = credit_pb2_grpc.CreditServiceStub(replicated_channel)
    vectors = vector_pb2_grpc.VectorServiceStub(replicated_channel)
    networks = network_pb2_grpc.NetworkServiceStub(replicated_channel)
    admin_stub = admin_pb2_grpc.AdminServiceStub(replicated_channel)

    # Something to read, written through the primary.
    actor = await actors.CreateActor(
        actor_pb2.CreateActorRequest(actor=actor_pb2.Actor(canonical_name="Ada Lovelace")),
        metadata=auth,
    )
    await actors.AddPresence(
        actor_pb2.AddPresenceRequest(
            presence=actor_pb2.Presence(
                actor_id=actor.id, platform="twitter", platform_user_id="42", username="ada"
            )
        ),
        metadata=auth,
    )
    created = []
    for platform in ("twitter", "reddit"):
        item = make_content(platform=platform, author_id=actor.id)
        item.search_terms_matched.extend(["engine", "analytical"])
        created.append(
            await content.CreateContent(
                content_pb2.CreateContentRequest(content=item), metadata=auth
            )
        )
    await credits.GrantCredits(
        credit_pb2.GrantCreditsRequest(user_id=str(user.user_id), amount=100),
        metadata=admin_auth,
    )
    collection = "c_" + uuid.uuid4().hex[:12]
    await vectors.CreateCollection(
        vector_pb2.CreateCollectionRequest(
            collection=vector_pb2.Collection(name=collection, dimension=4)
        ),
        metadata=auth,
    )

    async def upserts():
        yield vector_pb2.UpsertItemsRequest(
            collection=collection,
            items=[
                vector_pb2.Item(id=f"i{n}", vector=[1.0, n, 0.5, 0.0], text=f"weather {n}")
                for n in range(5)
            ],
        )

    await vectors.UpsertItems(upserts(), metadata=auth)
    await wait_for_replay(cluster)

    replica = replicated.replica
    assert replica is not None and replica.usable
    served, diverted = replica.reads_served, replica.reads_diverted
    content_filter = content_pb2.ContentFilter()
    vector = [1.0, 2.0, 0.5, 0.0]
    reads = {
        "GetContent": content.GetContent(
            content_pb2.GetContentRequest(id=created[0].id), metadata=auth
        ),
        "ListContent": content.ListContent(content_pb2.ListContentRequest(), metadata=auth),
        "SearchContent": content.SearchContent(
            content_pb2.SearchContentRequest(filter=content_pb2.ContentFilter(query="weather")),
            metadata=auth,
        ),
        "FindDuplicates": content.FindDuplicates(
            content_pb2.FindDuplicatesRequest(filter=content_filter), metadata=auth
        ),
        "GetContentStats": content.GetContentStats(
            content_pb2.GetContentStatsRequest(filter=content_filter, granularity="day"),
            metadata=auth,
        ),
        "GetActor": actors.GetActor(actor_pb2.GetActorRequest(id=actor.id), metadata=auth),
        "ListActors": actors.ListActors(
            actor_pb2.ListActorsRequest(name_query="ada"), metadata=auth
        ),
        "ResolveActor": actors.ResolveActor(
            actor_pb2.ResolveActorRequest(platform="twitter", platform_user_id="42"),
            metadata=auth,
        ),
        "FindCandidateMatches": actors.FindCandidateMatches(
            actor_pb2.FindCandidateMatchesRequest(actor_id=actor.id), metadata=auth
        ),
        "GetBalance": credits.GetBalance(credit_pb2.GetBalanceRequest(), metadata=auth),
        "ListTransactions": credits.ListTransactions(
            credit_pb2.ListTransactionsRequest(), metadata=auth
        ),
        "EstimateCost": credits.EstimateCost(
            credit_pb2.EstimateCostRequest(arena="social", expected_records=1000),
            metadata=auth,
        ),
        "GetCollection": vectors.GetCollection(
            vector_pb2.GetCollectionRequest(name=collection), metadata=auth
        ),
        "ListCollections": vectors.ListCollections(
            vector_pb2.ListCollectionsRequest(), metadata=auth
        ),
        "GetItem": vectors.GetItem(
            vector_pb2.GetItemRequest(collection=collection, id="i1"), metadata=auth
        ),
        "ListItems": vectors.ListItems(
            vector_pb2.ListItemsRequest(collection=collection), metadata=auth
        ),
        "CountItems": vectors.CountItems(
            vector_pb2.CountItemsRequest(collection=collection), metadata=auth
        ),
        "SearchSimilarBatch": vectors.SearchSimilarBatch(
            vector_pb2.SearchSimilarBatchRequest(
                collection=collection, searches=[vector_pb2.SimilarQuery(vector=vector)]
            ),
            metadata=auth,
        ),
        "CheckDuplicate": vectors.CheckDuplicate(
            vector_pb2.CheckDuplicateRequest(collection=collection, vector=vector),
            metadata=auth,
        ),
        "GetNetwork": networks.GetNetwork(
            network_pb2.GetNetworkRequest(
                kind=network_pb2.NETWORK_KIND_TERM_COOCCURRENCE, filter=content_filter
            ),
            metadata=auth,
        ),
        "ListCrossPlatformActors": networks.ListCrossPlatformActors(
            network_pb2.ListCrossPlatformActorsRequest(filter=content_filter), metadata=auth
        ),
        "ListAuditLog": admin_stub.ListAuditLog(
            admin_pb2.ListAuditLogRequest(), metadata=admin_auth
        ),
        "VerifyLedger": admin_stub.VerifyLedger(
            admin_pb2.VerifyLedgerRequest(), metadata=admin_auth
        ),
    }
    streams = {
        "ExportContent": content.ExportContent(
            content_pb2.ExportContentRequest(format=content_pb2.EXPORT_FORMAT_NDJSON),
            metadata=auth,
        ),
        "SearchSimilar": vectors.SearchSimilar(
            vector_pb2.SearchSimilarRequest(collection=collection, vector=vector), metadata=auth
        ),
        "SearchText": vectors.SearchText(
            vector_pb2.SearchTextRequest(collection=collection, query="weather"), metadata=auth
        ),
        "HybridSearch": vectors.HybridSearch(
            vector_pb2.HybridSearchRequest(collection=collection, vector=vector, query="weather"),
            metadata=auth,
        ),
        "ExportNetwork": networks.ExportNetwork(
            network_pb2.ExportNetworkRequest(
                kind=network_pb2.NETWORK_KIND_ACTOR_TERM,
                filter=content_filter,
                format=network_pb2.NETWORK_FORMAT_GRAPHML,
            ),
            metadata=auth,
        ),
    }
    failed, answered = {}, 0
    for name, call in [*reads.items(), *streams.items()]:
        try:
            if name in streams:
                assert await _drain(call), name
            else:
                await call
            answered += 1
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNIMPLEMENTED:  # not built yet is not our concern
                failed[name] = f"{error.code().name}: {error.details()}"
    assert not failed
    assert replica.reads_diverted == diverted
    # A unit each at least, but the two point reads (GetContent, GetActor)
    # may have been answered by a batch of their own.
    assert replica.reads_served >= served + answered - 2
