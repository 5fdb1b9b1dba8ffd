"""A crafted data set whose networks are worked out by hand in the tests, and
ways to look at a network and at a spreadsheet cell."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from observatory.v1 import actor_pb2, content_pb2, network_pb2

from tests.helpers import Caller, ingest_requests, make_content

ACTOR_CO = network_pb2.NETWORK_KIND_ACTOR_COOCCURRENCE
TERM_CO = network_pb2.NETWORK_KIND_TERM_COOCCURRENCE
ACTOR_TERM = network_pb2.NETWORK_KIND_ACTOR_TERM
ACTOR = network_pb2.NODE_KIND_ACTOR
TERM = network_pb2.NODE_KIND_TERM


@dataclass
class World:
    """The crafted data set of one owner: `run` tags its content (so admins can
    filter to it), `a1` is the one resolved actor, `ids` the content IDs by name."""

    run: str
    a1: str
    ids: dict[str, str]

    def filter(self, **fields: object) -> content_pb2.ContentFilter:
        return content_pb2.ContentFilter(collection_run_id=self.run, **fields)


TW_U2 = "account:twitter:u2"
TW_U3 = "account:twitter:u3"
FB_U2 = "account:facebook:u2"
RD_U4 = "account:reddit:u4"

# name: (platform, author: "a1" | account id | None, display name, terms)
CONTENTS = {
    "c1": ("twitter", "a1", None, ["climate", "energy"]),
    "c2": ("reddit", "a1", None, ["climate"]),
    "c3": ("twitter", "u2", "User Two", ["climate", "energy", "climate"]),
    "c4": ("twitter", "u3", "User Three", ["housing"]),
    "c5": ("facebook", "u2", None, ["energy"]),
    "c6": ("twitter", None, None, ["climate", "housing"]),
    "c7": ("reddit", "u4", None, []),
}


async def make_world(content_stub, actor_stub, caller: Caller) -> World:
    """The crafted data set (see CONTENTS) for `caller`."""
    run = f"run-{uuid.uuid4().hex}"
    a1 = await actor_stub.CreateActor(
        actor_pb2.CreateActorRequest(actor=actor_pb2.Actor(canonical_name="Actor One")),
        metadata=caller.metadata,
    )
    messages = []
    for name, (platform, author, display, terms) in CONTENTS.items():
        fields: dict[str, object] = {
            "platform": platform,
            "platform_id": name,
            "collection_run_id": run,
            "search_terms_matched": terms,
        }
        if author == "a1":
            fields["author_id"] = a1.id
        elif author is not None:
            fields["author_platform_id"] = author
            if display:
                fields["author_display_name"] = display
        messages.append(make_content(**fields))
    reply = await content_stub.IngestContent(
        iter(ingest_requests(messages)), metadata=caller.metadata
    )
    assert reply.inserted == len(messages), reply
    listed = await content_stub.ListContent(
        content_pb2.ListContentRequest(
            filter=content_pb2.ContentFilter(collection_run_id=run), page_size=100
        ),
        metadata=caller.metadata,
    )
    ids = {content.platform_id: content.id for content in listed.contents}
    return World(run=run, a1=a1.id, ids=ids)


def nodes_of(response: network_pb2.GetNetworkResponse) -> dict[str, tuple]:
    """id -> (label, kind, weight, degree, platforms)."""
    return {n.id: (n.label, n.kind, n.weight, n.degree, list(n.platforms)) for n in response.nodes}


def edges_of(response: network_pb2.GetNetworkResponse) -> dict[tuple[str, str], tuple]:
    """(source, target) -> (weight, terms)."""
    return {(e.source, e.target): (e.weight, list(e.terms)) for e in response.edges}


def pair(a: str, b: str) -> tuple[str, str]:
    """An undirected edge's (source, target): source < target."""
    return (a, b) if a < b else (b, a)


def excel_text(value: str | None) -> str | None:
    """A cell's text as Excel shows it: `_xHHHH_` escapes decoded, in one pass."""
    if value is None:
        return None
    return re.sub(r"_x([0-9A-Fa-f]{4})_", lambda m: chr(int(m.group(1), 16)), value)
