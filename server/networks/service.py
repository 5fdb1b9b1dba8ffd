"""NetworkService rules: checked requests in, networks out, inside the unit
of work the servicer opens. GetNetwork and ListCrossPlatformActors are one
statement each (a read unit), ExportNetwork one statement read through a
cursor (a snapshot unit that its export task opens: server.streams)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from observatory.v1 import content_pb2, network_pb2

from server import errors, pagination
from server.actors import convert as actor_convert
from server.auth import Principal
from server.content.repository import ContentQuery
from server.content.service import content_query
from server.networks import export
from server.networks.repository import PART_NODE, Kind, NetworkRepository
from server.streams import Outlet
from server.uow import UnitOfWork

GET_DEFAULT_NODES = 500
GET_MAX_NODES = 10_000
EXPORT_DEFAULT_NODES = 10_000
EXPORT_MAX_NODES = 1_000_000
DEFAULT_MIN_PLATFORMS = 2
# GetNetwork answers in one message (at most 64 MiB): a network with more
# edges than this, or a larger answer, is refused with advice instead.
GET_MAX_EDGES = 200_000
GET_MAX_RESPONSE_BYTES = 48 << 20
FORMATS: dict[int, Callable[[Kind], export.GraphWriter]] = {
    network_pb2.NETWORK_FORMAT_GEXF: export.GexfWriter,
    network_pb2.NETWORK_FORMAT_GRAPHML: export.GraphmlWriter,
}


@dataclass(frozen=True, slots=True)
class NetworkQuery:
    """A checked GetNetwork or ExportNetwork request."""

    kind: Kind
    content: ContentQuery
    min_weight: int
    max_nodes: int


class NetworkRequest(Protocol):
    @property
    def kind(self) -> network_pb2.NetworkKind.ValueType: ...
    @property
    def filter(self) -> content_pb2.ContentFilter: ...
    @property
    def min_weight(self) -> int: ...
    @property
    def max_nodes(self) -> int: ...


def network_query(
    caller: Principal, request: NetworkRequest, *, default_nodes: int, most_nodes: int
) -> NetworkQuery:
    """Checks a GetNetworkRequest or ExportNetworkRequest: `max_nodes` 0 means
    `default_nodes`, more than `most_nodes` is clamped to it (as page sizes are)."""
    if request.kind not in {k.value for k in Kind}:
        raise errors.InvalidArgument("kind", "must be one of the NETWORK_KIND_* values")
    if request.min_weight < 0:
        raise errors.InvalidArgument("min_weight", "must not be negative")
    if request.max_nodes < 0:
        raise errors.InvalidArgument("max_nodes", "must not be negative")
    return NetworkQuery(
        kind=Kind(request.kind),
        content=content_query(caller, request.filter),
        # No edge weighs more than int32 (a count of terms or contents).
        min_weight=min(max(request.min_weight, 1), 2**31 - 1),
        max_nodes=min(request.max_nodes or default_nodes, most_nodes),
    )


def graph_writer(value: int, kind: Kind) -> export.GraphWriter:
    writer = FORMATS.get(value)
    if writer is None:
        raise errors.InvalidArgument("format", "must be one of the NETWORK_FORMAT_* values")
    return writer(kind)


def _too_large(what: str, found: str, limit: str) -> errors.FailedPrecondition:
    return errors.FailedPrecondition(
        f"the network has {what}, more than GetNetwork returns; raise min_weight, lower "
        "max_nodes, narrow the filter, or use ExportNetwork",
        reason="NETWORK_TOO_LARGE",
        metadata={"found": found, "max": limit},
    )


async def get_network(uow: UnitOfWork, query: NetworkQuery) -> network_pb2.GetNetworkResponse:
    """The whole network in one answer (one statement)."""
    rows = await NetworkRepository(uow).network(
        query.kind,
        query.content,
        min_weight=query.min_weight,
        max_nodes=query.max_nodes,
        max_edges=GET_MAX_EDGES + 1,
    )
    response = network_pb2.GetNetworkResponse()
    if not rows:
        return response
    total_nodes, total_edges = rows[0]["total_nodes"], rows[0]["total_edges"]
    if total_edges > GET_MAX_EDGES:
        raise _too_large(f"{total_edges:,} edges", str(total_edges), str(GET_MAX_EDGES))
    response.truncated = total_nodes > query.max_nodes
    nodes, edges = response.nodes, response.edges
    for part, a, b, kind, weight, degree, listed, _, _ in rows:
        if part == PART_NODE:
            nodes.add(
                id=a, label=b or "", kind=kind, weight=weight, degree=degree, platforms=listed
            )
        else:
            edges.add(source=a, target=b, weight=weight, terms=listed)
    size = response.ByteSize()
    if size > GET_MAX_RESPONSE_BYTES:
        raise _too_large(f"{size:,} bytes", str(size), str(GET_MAX_RESPONSE_BYTES))
    return response


async def export_network(
    uow: UnitOfWork, query: NetworkQuery, writer: export.GraphWriter, outlet: Outlet
) -> None:
    """Puts the network's file on `outlet` in ExportChunks, read through a
    cursor: `uow` must be a snapshot."""
    rows = NetworkRepository(uow).stream(
        query.kind, query.content, min_weight=query.min_weight, max_nodes=query.max_nodes
    )
    async for chunk in export.chunks(rows, writer, query.max_nodes):
        await outlet.put(chunk)


@dataclass(frozen=True, slots=True)
class CrossPlatformPage:
    """A checked ListCrossPlatformActors request."""

    content: ContentQuery
    min_platforms: int
    size: int
    token_query: str
    after: tuple[int, int, uuid.UUID] | None


def cross_platform_request(
    caller: Principal, request: network_pb2.ListCrossPlatformActorsRequest
) -> CrossPlatformPage:
    query = content_query(caller, request.filter)
    if request.min_platforms < 0:
        raise errors.InvalidArgument("min_platforms", "must not be negative")
    min_platforms = request.min_platforms or DEFAULT_MIN_PLATFORMS
    size = pagination.page_size(request.page_size)
    token_query = pagination.fingerprint(
        "ListCrossPlatformActors", request.filter, str(query.owner_id), str(min_platforms)
    )
    after = pagination.decode_token(request.page_token, token_query, int, int, uuid.UUID)
    return CrossPlatformPage(
        content=query,
        min_platforms=min_platforms,
        size=size,
        token_query=token_query,
        after=None if after is None else (after[0], after[1], after[2]),
    )


async def cross_platform_actors(
    uow: UnitOfWork, page: CrossPlatformPage
) -> network_pb2.ListCrossPlatformActorsResponse:
    rows = await NetworkRepository(uow).cross_platform(
        page.content, min_platforms=page.min_platforms, after=page.after, limit=page.size + 1
    )
    response = network_pb2.ListCrossPlatformActorsResponse()
    for row in rows[: page.size]:
        item = response.actors.add()
        actor_convert.to_proto(row, item.actor)
        item.platforms.extend(row["platforms"])
        item.content_counts.update(zip(row["platforms"], row["counts"], strict=True))
    response.next_page_token = pagination.next_page_token(
        rows,
        page.size,
        page.token_query,
        lambda row: (row["platform_count"], row["total"], row["id"]),
    )
    return response
