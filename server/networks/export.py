"""ExportNetwork's files, written incrementally: GEXF 1.3 and GraphML.

A writer turns each node and edge row into its XML as it arrives from the
database cursor; `chunks` gathers the text into ~1 MiB ExportChunks. Nothing
holds more than one chunk, whatever the size of the network.

Attributes. Nodes: `label` (GEXF's own label; a GraphML key), `kind`
("actor" or "term"), `weight` (long), `platforms` (a list: GEXF 1.3's
`liststring`, written `["a", "b"]` as its primer allows; in GraphML, which has
no list type, the same JSON text in a string). Edges: `weight` (GEXF's own
weight; a GraphML key of type long) and, for actor co-occurrence, `terms` (a
list like `platforms`). Actor-term networks are directed (actor -> term), the
co-occurrence networks undirected. Characters XML 1.0 cannot hold (control
characters other than tab, LF and CR) are written as U+FFFD.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

from observatory.v1 import content_pb2

from server.networks.repository import Kind, NodeKind

CHUNK_CHARS = 1 << 20

_ATTRIBUTE_ESCAPES = {
    "&": "&amp;",
    "<": "&lt;",
    ">": "&gt;",
    '"': "&quot;",
    # Attribute values lose tabs and line ends to spaces unless escaped.
    "\t": "&#9;",
    "\n": "&#10;",
    "\r": "&#13;",
}
_NEEDS_ESCAPE = re.compile('[&<>"\t\n\r\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]')


def _escape_match(match: re.Match[str]) -> str:
    char = match.group()
    return _ATTRIBUTE_ESCAPES.get(char, "\ufffd")


def attr(value: str) -> str:
    """`value` for a double-quoted XML attribute or element text."""
    if _NEEDS_ESCAPE.search(value) is None:
        return value
    return _NEEDS_ESCAPE.sub(_escape_match, value)


def json_list(values: Sequence[str] | None) -> str:
    return json.dumps(list(values or ()), ensure_ascii=False, separators=(", ", ": "))


NODE_KIND_NAMES = {NodeKind.ACTOR: "actor", NodeKind.TERM: "term"}


class GraphWriter(Protocol):
    def start(self) -> str: ...

    def node(
        self, node_id: str, label: str, kind: int, weight: int, platforms: Sequence[str] | None
    ) -> str: ...

    def edges_start(self) -> str: ...

    def edge(self, source: str, target: str, weight: int, terms: Sequence[str] | None) -> str: ...

    def end(self) -> str: ...


class GexfWriter:
    """GEXF 1.3 (http://gexf.net/1.3), as Gephi and networkx read it."""

    def __init__(self, kind: Kind) -> None:
        self._kind = kind
        self._with_terms = kind is Kind.ACTOR_COOCCURRENCE

    def start(self) -> str:
        edge_type = "directed" if self._kind is Kind.ACTOR_TERM else "undirected"
        edge_attributes = (
            '<attributes class="edge" mode="static">'
            '<attribute id="terms" title="terms" type="liststring"/></attributes>\n'
            if self._with_terms
            else ""
        )
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            '<gexf xmlns="http://gexf.net/1.3" '
            'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
            'xsi:schemaLocation="http://gexf.net/1.3 http://gexf.net/1.3/gexf.xsd" '
            'version="1.3">\n'
            f"<meta><creator>Observatory</creator><description>{self._kind.name.lower()} "
            "network</description></meta>\n"
            f'<graph mode="static" defaultedgetype="{edge_type}">\n'
            '<attributes class="node" mode="static">'
            '<attribute id="kind" title="kind" type="string"/>'
            '<attribute id="weight" title="weight" type="long"/>'
            '<attribute id="platforms" title="platforms" type="liststring"/></attributes>\n'
            f"{edge_attributes}<nodes>\n"
        )

    def node(
        self, node_id: str, label: str, kind: int, weight: int, platforms: Sequence[str] | None
    ) -> str:
        listed = (
            f'<attvalue for="platforms" value="{attr(json_list(platforms))}"/>'
            if kind == NodeKind.ACTOR
            else ""
        )
        return (
            f'<node id="{attr(node_id)}" label="{attr(label)}"><attvalues>'
            f'<attvalue for="kind" value="{NODE_KIND_NAMES[NodeKind(kind)]}"/>'
            f'<attvalue for="weight" value="{weight}"/>{listed}</attvalues></node>\n'
        )

    def edges_start(self) -> str:
        return "</nodes>\n<edges>\n"

    def edge(self, source: str, target: str, weight: int, terms: Sequence[str] | None) -> str:
        head = f'<edge source="{attr(source)}" target="{attr(target)}" weight="{weight}"'
        if not self._with_terms:
            return head + "/>\n"
        return (
            f'{head}><attvalues><attvalue for="terms" value="{attr(json_list(terms))}"/>'
            "</attvalues></edge>\n"
        )

    def end(self) -> str:
        return "</edges>\n</graph>\n</gexf>\n"


class GraphmlWriter:
    """GraphML (http://graphml.graphdrawing.org/xmlns)."""

    def __init__(self, kind: Kind) -> None:
        self._kind = kind
        self._with_terms = kind is Kind.ACTOR_COOCCURRENCE

    def start(self) -> str:
        edge_default = "directed" if self._kind is Kind.ACTOR_TERM else "undirected"
        terms_key = (
            '<key id="e_terms" for="edge" attr.name="terms" attr.type="string"/>\n'
            if self._with_terms
            else ""
        )
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            '<graphml xmlns="http://graphml.graphdrawing.org/xmlns" '
            'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
            'xsi:schemaLocation="http://graphml.graphdrawing.org/xmlns '
            'http://graphml.graphdrawing.org/xmlns/1.0/graphml.xsd">\n'
            '<key id="n_label" for="node" attr.name="label" attr.type="string"/>\n'
            '<key id="n_kind" for="node" attr.name="kind" attr.type="string"/>\n'
            '<key id="n_weight" for="node" attr.name="weight" attr.type="long"/>\n'
            '<key id="n_platforms" for="node" attr.name="platforms" attr.type="string"/>\n'
            '<key id="e_weight" for="edge" attr.name="weight" attr.type="long"/>\n'
            f'{terms_key}<graph id="{self._kind.name.lower()}" edgedefault="{edge_default}">\n'
        )

    def node(
        self, node_id: str, label: str, kind: int, weight: int, platforms: Sequence[str] | None
    ) -> str:
        listed = (
            f'<data key="n_platforms">{attr(json_list(platforms))}</data>'
            if kind == NodeKind.ACTOR
            else ""
        )
        return (
            f'<node id="{attr(node_id)}"><data key="n_label">{attr(label)}</data>'
            f'<data key="n_kind">{NODE_KIND_NAMES[NodeKind(kind)]}</data>'
            f'<data key="n_weight">{weight}</data>{listed}</node>\n'
        )

    def edges_start(self) -> str:
        return ""

    def edge(self, source: str, target: str, weight: int, terms: Sequence[str] | None) -> str:
        listed = f'<data key="e_terms">{attr(json_list(terms))}</data>' if self._with_terms else ""
        return (
            f'<edge source="{attr(source)}" target="{attr(target)}">'
            f'<data key="e_weight">{weight}</data>{listed}</edge>\n'
        )

    def end(self) -> str:
        return "</graph>\n</graphml>\n"


async def chunks(
    rows: AsyncIterator[Any], writer: GraphWriter, max_nodes: int
) -> AsyncIterator[content_pb2.ExportChunk]:
    """The file of the network whose rows (`network_statement`'s, nodes first)
    come from `rows`, in chunks of about CHUNK_CHARS characters. `rows` counts
    nodes and edges: `rows_total` is the kept nodes plus the edges."""
    parts: list[str] = [writer.start()]
    size = len(parts[0])
    in_chunk = sent = total = 0
    in_edges = False

    def chunk() -> content_pb2.ExportChunk:
        nonlocal parts, size, in_chunk, sent
        sent += in_chunk
        message = content_pb2.ExportChunk(
            data="".join(parts).encode(), rows=in_chunk, rows_sent=sent, rows_total=total
        )
        parts, size, in_chunk = [], 0, 0
        return message

    async for row in rows:
        part, a, b, kind, weight, _degree, listed, total_nodes, total_edges = row
        if not total:
            total = min(total_nodes, max_nodes) + total_edges
        if part == 0:
            if in_edges:
                raise RuntimeError("a node row came after the edges")
            text = writer.node(a, b, kind, weight, listed)
        else:
            if not in_edges:
                in_edges = True
                parts.append(writer.edges_start())
            text = writer.edge(a, b, weight, listed)
        parts.append(text)
        size += len(text)
        in_chunk += 1
        if size >= CHUNK_CHARS:
            yield chunk()
    if not in_edges:
        parts.append(writer.edges_start())
    parts.append(writer.end())
    yield chunk()
