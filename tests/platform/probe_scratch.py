import base64, json, uuid
from datetime import UTC, datetime
import grpc, pytest
from google.protobuf import timestamp_pb2, field_mask_pb2
from observatory.v1 import content_pb2, actor_pb2, credit_pb2, admin_pb2, network_pb2, network_pb2_grpc, vector_pb2
from tests.helpers import error_details, make_content, timestamp

pytestmark = pytest.mark.asyncio
BIG = "x" * 200_000

def size(err):
    total = 0
    for k, v in err.trailing_metadata() or ():
        total += len(k) + (len(base64.b64encode(v)) if isinstance(v, bytes) else len(v)) + 32
    return total

async def show(name, call):
    try:
        r = await call
        print(f"{name}: OK")
        return r
    except grpc.aio.AioRpcError as e:
        d = error_details(e)
        print(f"{name}: {e.code().name} reason={d.reason} fields={d.fields[:3]} msglen={len(e.details() or '')} trailers={size(e)} msg={(e.details() or '')[:150]!r}")

def ts(s, n=0):
    return timestamp_pb2.Timestamp(seconds=s, nanos=n)

async def test_probe(content_stub, actor_stub, credit_stub, admin_stub, channel, alice, admin):
    md = alice.metadata
    net = network_pb2_grpc.NetworkServiceStub(channel)
    for label, t in [("min", ts(-62135596800)), ("max", ts(253402300799, 999999000))]:
        c = make_content(); c.published_at.CopyFrom(t); c.collected_at.CopyFrom(t)
        r = await show(f"create {label}", content_stub.CreateContent(content_pb2.CreateContentRequest(content=c), metadata=md))
        if r: print(r.published_at, r.collected_at)
    await show("list", content_stub.ListContent(content_pb2.ListContentRequest(), metadata=md))
    for f in ["canonical_name", "description"]:
        a = actor_pb2.Actor(id=str(uuid.uuid4()), canonical_name="n"); setattr(a, f, BIG)
        await show(f"UpdateActor {f}", actor_stub.UpdateActor(actor_pb2.UpdateActorRequest(actor=a), metadata=md))
    a = actor_pb2.Actor(id=str(uuid.uuid4()), canonical_name="n")
    await show("UpdateActor mask", actor_stub.UpdateActor(actor_pb2.UpdateActorRequest(actor=a, update_mask=field_mask_pb2.FieldMask(paths=[BIG])), metadata=md))
    await show("UpdateActor id", actor_stub.UpdateActor(actor_pb2.UpdateActorRequest(actor=actor_pb2.Actor(id=BIG)), metadata=md))
    a = actor_pb2.Actor(canonical_name="n"); a.metadata.update({BIG: 1})
    await show("CreateActor md key", actor_stub.CreateActor(actor_pb2.CreateActorRequest(actor=a), metadata=md))
    c = make_content(url="https://example.com/" + "".join(uuid.uuid4().hex for _ in range(400)))
    await show("create long url", content_stub.CreateContent(content_pb2.CreateContentRequest(content=c), metadata=md))
    await show("search huge", content_stub.SearchContent(content_pb2.SearchContentRequest(filter=content_pb2.ContentFilter(query=" ".join(uuid.uuid4().hex for _ in range(60000)))), metadata=md))
    await show("list 50k platforms", content_stub.ListContent(content_pb2.ListContentRequest(filter=content_pb2.ContentFilter(platforms=[str(i) for i in range(50000)])), metadata=md))
    await show("list ok after", content_stub.ListContent(content_pb2.ListContentRequest(), metadata=md))
    tok = base64.urlsafe_b64encode(json.dumps({"q": "x", "k": [1, 2]}).encode()).decode()
    await show("bad token", content_stub.ListContent(content_pb2.ListContentRequest(page_token=tok), metadata=md))
    await show("export cols", content_stub.ExportContent(content_pb2.ExportContentRequest(format=1, columns=[BIG]), metadata=md).read())
    await show("stats week", content_stub.GetContentStats(content_pb2.GetContentStatsRequest(granularity="week"), metadata=md))
    await show("stats bad", content_stub.GetContentStats(content_pb2.GetContentStatsRequest(granularity=BIG), metadata=md))
    await show("network", net.GetNetwork(network_pb2.GetNetworkRequest(kind=1), metadata=md))
    await show("audit", admin_stub.ListAuditLog(admin_pb2.ListAuditLogRequest(action=BIG), metadata=admin.metadata))
    await show("grant", credit_stub.GrantCredits(credit_pb2.GrantCreditsRequest(user_id=str(alice.user_id), amount=5, valid_from=ts(-62135596800), valid_until=ts(253402300799, 999999000)), metadata=admin.metadata))
    await show("estimate", credit_stub.EstimateCost(credit_pb2.EstimateCostRequest(arena="x", expected_records=2**62), metadata=md))
