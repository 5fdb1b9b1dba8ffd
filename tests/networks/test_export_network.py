"""ExportNetwork: each format read back by networkx is the network GetNetwork
returns (nodes, edges, their attributes); chunks add up; a cancelled export
frees its connection."""

import io
import json

import grpc
import networkx as nx
import pytest
import pytest_asyncio
from observatory.v1 import network_pb2

from server.app import App
from server.networks import export
from tests.helpers import expect_rpc_error, ingest_requests, make_content, wait_until
from tests.networks.helpers import ACTOR, ACTOR_CO, ACTOR_TERM, TERM_CO, make_world

pytestmark = pytest.mark.asyncio

GEXF = network_pb2.NETWORK_FORMAT_GEXF
GRAPHML = network_pb2.NETWORK_FORMAT_GRAPHML
KIND_NAMES = {network_pb2.NODE_KIND_ACTOR: "actor", network_pb2.NODE_KIND_TERM: "term"}


@pytest_asyncio.fixture
async def world(content_stub, actor_stub, alice):
    return await make_world(content_stub, actor_stub, alice)


async def export_file(stub, caller, **request) -> tuple[bytes, list]:
    chunks = [
        chunk
        async for chunk in stub.ExportNetwork(
            network_pb2.ExportNetworkRequest(**request), metadata=caller.metadata
        )
    ]
    return b"".join(chunk.data for chunk in chunks), chunks


def read_graph(fmt: int, data: bytes) -> nx.Graph:
    """The file through networkx, as a simple graph (networkx makes GEXF a
    multigraph)."""
    if fmt == GEXF:
        graph = nx.read_gexf(io.BytesIO(data))
        return nx.DiGraph(graph) if graph.is_directed() else nx.Graph(graph)
    return nx.read_graphml(io.BytesIO(data))


def expected_nodes(network) -> dict[str, dict]:
    out = {}
    for n in network.nodes:
        attrs = {"label": n.label, "kind": KIND_NAMES[n.kind], "weight": n.weight}
        if n.kind == ACTOR:
            attrs["platforms"] = list(n.platforms)
        out[n.id] = attrs
    return out


def file_nodes(graph: nx.Graph) -> dict[str, dict]:
    out = {}
    for node, data in graph.nodes(data=True):
        attrs = {"label": data["label"], "kind": data["kind"], "weight": data["weight"]}
        if "platforms" in data:
            attrs["platforms"] = json.loads(data["platforms"])
        out[node] = attrs
    return out


def file_edges(graph: nx.Graph, with_terms: bool) -> dict[tuple[str, str], tuple]:
    out = {}
    for source, target, data in graph.edges(data=True):
        if not graph.is_directed():
            source, target = min(source, target), max(source, target)
        terms = json.loads(data["terms"]) if with_terms else []
        out[(source, target)] = (int(data["weight"]), terms)
    return out


@pytest.mark.parametrize("fmt", [GEXF, GRAPHML], ids=["gexf", "graphml"])
@pytest.mark.parametrize(
    "kind", [ACTOR_CO, TERM_CO, ACTOR_TERM], ids=["actor", "term", "bipartite"]
)
async def test_the_file_holds_the_network_of_get_network(network_stub, alice, world, fmt, kind):
    network = await network_stub.GetNetwork(
        network_pb2.GetNetworkRequest(kind=kind, filter=world.filter()), metadata=alice.metadata
    )
    data, chunks = await export_file(
        network_stub, alice, kind=kind, filter=world.filter(), format=fmt
    )

    graph = read_graph(fmt, data)
    assert graph.is_directed() == (kind == ACTOR_TERM)
    assert file_nodes(graph) == expected_nodes(network)
    assert file_edges(graph, with_terms=kind == ACTOR_CO) == {
        (e.source, e.target): (e.weight, list(e.terms)) for e in network.edges
    }
    elements = len(network.nodes) + len(network.edges)
    assert [c.rows_total for c in chunks] == [elements] * len(chunks)
    assert sum(c.rows for c in chunks) == chunks[-1].rows_sent == elements


@pytest.mark.parametrize("fmt", [GEXF, GRAPHML], ids=["gexf", "graphml"])
async def test_min_weight_and_max_nodes_apply(network_stub, alice, world, fmt):
    data, _ = await export_file(
        network_stub,
        alice,
        kind=TERM_CO,
        filter=world.filter(),
        format=fmt,
        min_weight=2,
        max_nodes=2,
    )
    graph = read_graph(fmt, data)
    assert set(graph.nodes) == {"term:climate", "term:energy"}
    assert file_edges(graph, with_terms=False) == {("term:climate", "term:energy"): (2, [])}


@pytest.mark.parametrize("fmt", [GEXF, GRAPHML], ids=["gexf", "graphml"])
async def test_an_empty_network_is_a_valid_empty_file(network_stub, bob, world, fmt):
    data, chunks = await export_file(
        network_stub, bob, kind=ACTOR_CO, filter=world.filter(), format=fmt
    )
    graph = read_graph(fmt, data)
    assert graph.number_of_nodes() == 0 and graph.number_of_edges() == 0
    assert len(chunks) == 1 and chunks[0].rows_total == 0


@pytest.mark.parametrize("fmt", [GEXF, GRAPHML], ids=["gexf", "graphml"])
async def test_names_with_markup_and_control_characters_survive(
    network_stub, content_stub, alice, world, fmt
):
    odd = 'a "quoted" <b>term</b> & more,\ttab\nline'
    contents = [
        make_content(
            platform="rss",
            author_platform_id='<id "1">&',
            author_display_name="Name\r\nwith\x01control",
            collection_run_id=world.run,
            search_terms_matched=[odd, "plain"],
        )
    ]
    await content_stub.IngestContent(iter(ingest_requests(contents)), metadata=alice.metadata)

    data, _ = await export_file(
        network_stub,
        alice,
        kind=ACTOR_CO,
        filter=world.filter(platforms=["rss"]),
        format=fmt,
    )
    graph = read_graph(fmt, data)
    node_id = 'account:rss:<id "1">&'
    assert graph.nodes[node_id]["label"] == "Name\r\nwith\ufffdcontrol"

    data, _ = await export_file(
        network_stub, alice, kind=TERM_CO, filter=world.filter(platforms=["rss"]), format=fmt
    )
    graph = read_graph(fmt, data)
    assert set(graph.nodes) == {f"term:{odd}", "term:plain"}
    assert graph.nodes[f"term:{odd}"]["label"] == odd


async def test_a_large_export_comes_in_many_chunks_that_make_one_file(
    network_stub, content_stub, alice, world, monkeypatch
):
    monkeypatch.setattr(export, "CHUNK_CHARS", 2000)
    contents = [
        make_content(
            platform="rss",
            author_platform_id=f"user{i}",
            collection_run_id=world.run,
            search_terms_matched=[f"t{i % 7}", f"t{i % 11}"],
        )
        for i in range(200)
    ]
    await content_stub.IngestContent(iter(ingest_requests(contents)), metadata=alice.metadata)
    request = {"kind": ACTOR_TERM, "filter": world.filter(platforms=["rss"])}
    network = await network_stub.GetNetwork(
        network_pb2.GetNetworkRequest(**request), metadata=alice.metadata
    )

    for fmt in (GEXF, GRAPHML):
        data, chunks = await export_file(network_stub, alice, format=fmt, **request)
        assert len(chunks) > 10
        assert all(len(c.data) < 4000 for c in chunks)
        graph = read_graph(fmt, data)
        assert graph.number_of_nodes() == len(network.nodes) == 200 + 11
        assert graph.number_of_edges() == len(network.edges)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"kind": ACTOR_CO}, "format"),
        ({"kind": ACTOR_CO, "format": 7}, "format"),
        ({"format": GEXF}, "kind"),
        ({"kind": TERM_CO, "format": GEXF, "max_nodes": -1}, "max_nodes"),
    ],
)
async def test_bad_requests_name_the_field(network_stub, alice, fields, field):
    async def drain():
        async for _ in network_stub.ExportNetwork(
            network_pb2.ExportNetworkRequest(**fields), metadata=alice.metadata
        ):
            pass

    error = await expect_rpc_error(drain())
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.fields == [field]


async def test_cancelled_exports_leave_the_pool_whole(
    app: App, network_stub, content_stub, alice, world, db, monkeypatch
):
    monkeypatch.setattr(export, "CHUNK_CHARS", 500)
    contents = [
        make_content(
            platform="rss",
            author_platform_id=f"user{i}",
            collection_run_id=world.run,
            search_terms_matched=[f"t{i % 5}"],
        )
        for i in range(300)
    ]
    await content_stub.IngestContent(iter(ingest_requests(contents)), metadata=alice.metadata)
    for _ in range(20):
        stream = network_stub.ExportNetwork(
            network_pb2.ExportNetworkRequest(
                kind=ACTOR_TERM, filter=world.filter(), format=GRAPHML
            ),
            metadata=alice.metadata,
        )
        await stream.read()  # the export is running, waiting on this reader
        stream.cancel()

    async def released() -> bool:
        running = await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE state <> 'idle' "
            "AND query ILIKE '%term_rows%' AND pid <> pg_backend_pid()"
        )
        return running == 0 and app.units.pool.checkedout() == 0

    assert await wait_until(released, timeout=10), "a cancelled export kept its connection"
    data, _ = await export_file(
        network_stub, alice, kind=ACTOR_TERM, filter=world.filter(), format=GRAPHML
    )
    assert read_graph(GRAPHML, data).number_of_nodes() == 300 + 5 + 5 + 3
