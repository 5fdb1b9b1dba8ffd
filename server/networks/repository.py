"""All SQL for networks: each network is one statement, computed entirely in
PostgreSQL over the content a ContentQuery selects (its WHERE clause is
content's own `filter_conditions`: a search_term filter goes through the GIN
index on search_terms_matched). Nothing here commits.

The statement's shape, for every kind:

- `scope`: the filtered content, narrowed to what networks use: the actor key
  (the author_id as text, or `account:<platform>:<author_platform_id>`),
  platform, display name and terms;
- `term_rows`: one row per (content, term), each term once per content
  (a lateral `SELECT DISTINCT` over the content's own terms);
- the node weights (contents per actor, contents per term), of which `kept`
  holds the heaviest `max_nodes` (ties by ID), each numbered (`ord`) in ID
  order, so that the pair counting below joins and groups small integers;
- `edges` among the kept nodes with weight >= `min_weight`: two kept terms of
  one content (term_rows joined with itself on the content), two kept actors
  whose content matched one term (the distinct (actor, term) pairs of the
  kept actors' content joined with themselves on the term), or actor -> term
  (term_rows grouped by both), each counted by GROUP BY.

The output is one row per node, then one row per edge (`part` 0 and 1), with
the totals (`total_nodes`, `total_edges`) on every row. Node IDs compare with
COLLATE "C" (code point order, as Python compares str), so `source < target`
holds for every co-occurrence edge whatever the database's locale.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from sqlalchemy import (
    CTE,
    BigInteger,
    ColumnElement,
    Integer,
    Select,
    Text,
    and_,
    cast,
    func,
    literal,
    null,
    or_,
    select,
    true,
    type_coerce,
    union_all,
)
from sqlalchemy.dialects.postgresql import ARRAY, aggregate_order_by
from sqlalchemy.engine import RowMapping

from server.actors.repository import DETAILS
from server.actors.tables import actors
from server.content.repository import ContentQuery, filter_conditions
from server.content.tables import content
from server.db import compile_for_driver
from server.uow import UnitOfWork

MAX_EDGE_TERMS = 10
# Rows a cursor fetches per round trip.
CURSOR_PREFETCH = 2000
ACCOUNT_PREFIX = "account:"
TERM_PREFIX = "term:"
_C = "C"


class Kind(enum.IntEnum):
    """The kinds of network (values as in observatory.v1.NetworkKind)."""

    ACTOR_COOCCURRENCE = 1
    TERM_COOCCURRENCE = 2
    ACTOR_TERM = 3


class NodeKind(enum.IntEnum):
    """Values as in observatory.v1.NodeKind."""

    ACTOR = 1
    TERM = 2


# Output columns, in order.
PART_NODE = 0
PART_EDGE = 1


def _text_array(value: ColumnElement[Any]) -> ColumnElement[Any]:
    return type_coerce(value, ARRAY(Text))


def _no_list() -> ColumnElement[Any]:
    return cast(null(), ARRAY(Text))


def _scope(q: ContentQuery) -> CTE:
    c = content.c
    account = literal(ACCOUNT_PREFIX) + c.platform + literal(":") + c.author_platform_id
    actor = func.coalesce(cast(c.author_id, Text), account)
    return (
        select(
            c.id,
            c.platform,
            c.author_id,
            c.author_platform_id,
            c.author_display_name,
            c.search_terms_matched.label("terms"),
            actor.label("actor"),
        )
        .where(*filter_conditions(q))
        .cte("scope")
    )


def _term_rows(scope: CTE) -> CTE:
    """(content id, actor, term): each distinct term of each content once.

    The terms are made distinct per content (a lateral DISTINCT over its own
    array): linear in the terms, and the array is read once. Keeping "the
    first position of each term" with array_position instead is quadratic and
    detoasts the whole array per term: seconds for one content of 1,000 long
    terms."""
    unnested = func.unnest(scope.c.terms).table_valued("term").render_derived(name="t")
    distinct_terms = select(unnested.c.term).distinct().lateral("d")
    return (
        select(scope.c.id, scope.c.actor, distinct_terms.c.term)
        .select_from(scope)
        .join(distinct_terms, true())
        .cte("term_rows")
    )


def _actor_nodes(scope: CTE) -> CTE:
    """One row per actor: weight (contents), platforms (sorted), the name parts."""
    per_platform = (
        select(
            scope.c.actor,
            scope.c.author_id,
            scope.c.platform,
            func.count().label("n"),
            func.max(scope.c.author_display_name).label("display_name"),
            func.max(scope.c.author_platform_id).label("account"),
        )
        .where(scope.c.actor.isnot(None))
        .group_by(scope.c.actor, scope.c.author_id, scope.c.platform)
        .subquery("per_platform")
    )
    p = per_platform.c
    return (
        select(
            p.actor.label("id"),
            p.author_id,
            cast(func.sum(p.n), BigInteger).label("weight"),
            func.array_agg(aggregate_order_by(p.platform, p.platform.collate(_C))).label(
                "platforms"
            ),
            func.max(p.display_name).label("display_name"),
            func.max(p.account).label("account"),
        )
        .group_by(p.actor, p.author_id)
        .cte("actor_nodes")
    )


def _term_nodes(term_rows: CTE) -> CTE:
    return (
        select(
            (literal(TERM_PREFIX) + term_rows.c.term).label("id"),
            term_rows.c.term,
            func.count().label("weight"),
        )
        .group_by(term_rows.c.term)
        .cte("term_nodes")
    )


def _nodes(actor_nodes: CTE | None, term_nodes: CTE | None) -> CTE:
    """(id, kind, weight, term) of every node in scope (term NULL for actors)."""
    parts: list[Select[Any]] = []
    if actor_nodes is not None:
        parts.append(
            select(
                actor_nodes.c.id,
                literal(int(NodeKind.ACTOR), Integer).label("kind"),
                actor_nodes.c.weight,
                cast(null(), Text).label("term"),
            )
        )
    if term_nodes is not None:
        parts.append(
            select(
                term_nodes.c.id,
                literal(int(NodeKind.TERM), Integer).label("kind"),
                term_nodes.c.weight,
                term_nodes.c.term,
            )
        )
    if len(parts) == 1:
        return parts[0].cte("nodes")
    return union_all(*parts).cte("nodes")


def _kept(nodes: CTE, max_nodes: int) -> CTE:
    """The heaviest `max_nodes` nodes (ties by ID), each with `ord`, its rank in
    ID order: the joins and groupings below use these small integers, and
    `a.ord < b.ord` exactly when `a.id < b.id`."""
    top = (
        select(nodes.c.id, nodes.c.kind, nodes.c.weight, nodes.c.term)
        .order_by(nodes.c.weight.desc(), nodes.c.id.collate(_C))
        .limit(max_nodes)
        .subquery("top")
    )
    ord_ = func.row_number().over(order_by=top.c.id.collate(_C))
    return select(*top.c, ord_.label("ord")).cte("kept")


def _edges(kind: Kind, scope: CTE, term_rows: CTE, kept: CTE, min_weight: int) -> CTE:
    """(s, t, weight, terms) of the edges among the kept nodes, with s and t
    their `ord`s."""
    if kind is Kind.TERM_COOCCURRENCE:
        return _term_pairs(term_rows, kept, min_weight)
    if kind is Kind.ACTOR_TERM:
        return _actor_term_pairs(term_rows, kept, min_weight)
    return _actor_pairs(scope, kept, min_weight)


def _actor_term_pairs(term_rows: CTE, kept: CTE, min_weight: int) -> CTE:
    """An actor's contents per term: term_rows grouped by (actor, term), the
    kept ones only."""
    k_actor, k_term = kept.alias("k_actor"), kept.alias("k_term")
    count = func.count()
    return (
        select(
            k_actor.c.ord.label("s"),
            k_term.c.ord.label("t"),
            count.label("weight"),
            _no_list().label("terms"),
        )
        .select_from(term_rows)
        .join(k_actor, k_actor.c.id == term_rows.c.actor)
        .join(k_term, k_term.c.term == term_rows.c.term)
        .group_by(k_actor.c.ord, k_term.c.ord)
        .having(count >= min_weight)
        .cte("edges")
    )


def _term_pairs(term_rows: CTE, kept: CTE, min_weight: int) -> CTE:
    """Two kept terms of one content: the (content, kept term) rows joined with
    themselves on the content."""
    kept_terms = (
        select(term_rows.c.id, kept.c.ord)
        .select_from(term_rows)
        .join(kept, kept.c.term == term_rows.c.term)
        .cte("kept_term_rows")
    )
    a, b = kept_terms.alias("a"), kept_terms.alias("b")
    count = func.count()
    return (
        select(
            a.c.ord.label("s"),
            b.c.ord.label("t"),
            count.label("weight"),
            _no_list().label("terms"),
        )
        .select_from(a)
        .join(b, and_(a.c.id == b.c.id, a.c.ord < b.c.ord))
        .group_by(a.c.ord, b.c.ord)
        .having(count >= min_weight)
        .cte("edges")
    )


def _actor_pairs(scope: CTE, kept: CTE, min_weight: int) -> CTE:
    """Two kept actors whose content matched one term: the distinct (kept
    actor, term) pairs, from the kept actors' content only, joined with
    themselves on the term. Terms get numbers in their sort order (`tid`), so
    that the grouping sorts integers only."""
    unnested = func.unnest(scope.c.terms).table_valued("term").render_derived(name="t")
    actor_terms = (
        select(kept.c.ord, unnested.c.term)
        .select_from(scope)
        .join(kept, kept.c.id == scope.c.actor)
        .join(unnested, true())
        .distinct()
        .cte("actor_terms")
    )
    distinct_terms = select(actor_terms.c.term).distinct().subquery("distinct_terms")
    term_ids = select(
        distinct_terms.c.term,
        func.row_number().over(order_by=distinct_terms.c.term.collate(_C)).label("tid"),
    ).cte("term_ids")
    numbered = (
        select(actor_terms.c.ord, term_ids.c.tid, term_ids.c.term)
        .join(term_ids, term_ids.c.term == actor_terms.c.term)
        .cte("numbered")
    )
    a, b = numbered.alias("a"), numbered.alias("b")
    count = func.count()
    shared = func.array_agg(aggregate_order_by(a.c.term, a.c.tid))
    return (
        select(
            a.c.ord.label("s"),
            b.c.ord.label("t"),
            count.label("weight"),
            _text_array(shared)[1:MAX_EDGE_TERMS].label("terms"),
        )
        .select_from(a)
        .join(b, and_(a.c.tid == b.c.tid, a.c.ord < b.c.ord))
        .group_by(a.c.ord, b.c.ord)
        .having(count >= min_weight)
        .cte("edges")
    )


def network_statement(
    kind: Kind,
    q: ContentQuery,
    *,
    min_weight: int,
    max_nodes: int,
    max_edges: int | None = None,
    with_degree: bool = True,
) -> Select[Any]:
    """The network as rows of (part, a, b, kind, weight, degree, list,
    total_nodes, total_edges): nodes first (part 0: a = id, b = label, list =
    platforms), then edges (part 1: a = source, b = target, list = shared
    terms). With `max_edges` (GetNetwork), each part is heaviest first and at
    most `max_edges` edges come; without it (exports), the edges come in no
    particular order. `with_degree` False leaves degree NULL."""
    scope = _scope(q)
    term_rows = _term_rows(scope)
    with_actors = kind in (Kind.ACTOR_COOCCURRENCE, Kind.ACTOR_TERM)
    with_terms = kind in (Kind.TERM_COOCCURRENCE, Kind.ACTOR_TERM)
    actor_nodes = _actor_nodes(scope) if with_actors else None
    term_nodes = _term_nodes(term_rows) if with_terms else None
    nodes = _nodes(actor_nodes, term_nodes)
    kept = _kept(nodes, max_nodes)
    edges = _edges(kind, scope, term_rows, kept, min_weight)
    total_nodes = select(func.count()).select_from(nodes).scalar_subquery()
    total_edges = select(func.count()).select_from(edges).scalar_subquery()

    label: ColumnElement[Any] = kept.c.term
    platforms: ColumnElement[Any] = _no_list()
    node_query = select(kept.c.id, kept.c.kind, kept.c.weight).select_from(kept)
    if actor_nodes is not None:
        # Content may name any author_id: only the caller's own actors lend
        # their names.
        named_by = [actors.c.id == actor_nodes.c.author_id]
        if q.owner_id is not None:
            named_by.append(actors.c.owner_id == q.owner_id)
        node_query = node_query.outerjoin(actor_nodes, actor_nodes.c.id == kept.c.id).outerjoin(
            actors, and_(*named_by)
        )
        label = func.coalesce(
            kept.c.term, actors.c.canonical_name, actor_nodes.c.display_name, actor_nodes.c.account
        )
        platforms = actor_nodes.c.platforms
    degree: ColumnElement[Any] = null()
    if with_degree:
        ends = union_all(select(edges.c.s.label("ord")), select(edges.c.t.label("ord"))).subquery(
            "ends"
        )
        degrees = (
            select(ends.c.ord, func.count().label("degree"))
            .group_by(ends.c.ord)
            .subquery("degrees")
        )
        node_query = node_query.outerjoin(degrees, degrees.c.ord == kept.c.ord)
        degree = func.coalesce(degrees.c.degree, 0)
    node_rows = node_query.add_columns(
        cast(label, Text).label("label"),
        cast(degree, BigInteger).label("degree"),
        _text_array(platforms).label("list"),
    ).subquery("node_rows")

    source, target = kept.alias("source"), kept.alias("target")
    edge_query = (
        select(
            source.c.id.label("source"), target.c.id.label("target"), edges.c.weight, edges.c.terms
        )
        .select_from(edges)
        .join(source, source.c.ord == edges.c.s)
        .join(target, target.c.ord == edges.c.t)
    )
    if max_edges is not None:
        edge_query = edge_query.order_by(
            edges.c.weight.desc(), source.c.id.collate(_C), target.c.id.collate(_C)
        ).limit(max_edges)
    edge_rows = edge_query.subquery("edge_rows")
    n, e = node_rows.c, edge_rows.c
    network = union_all(
        select(
            literal(PART_NODE, Integer).label("part"),
            n.id.label("a"),
            n.label.label("b"),
            n.kind,
            n.weight,
            n.degree,
            n.list,
            total_nodes.label("total_nodes"),
            total_edges.label("total_edges"),
        ),
        select(
            literal(PART_EDGE, Integer),
            e.source,
            e.target,
            cast(null(), Integer),
            e.weight,
            cast(null(), BigInteger),
            e.terms,
            total_nodes,
            total_edges,
        ),
    ).subquery("network")
    out = network.c
    ordered = select(*out).order_by(out.part)
    if max_edges is not None:
        # A small answer: sorted whole, heaviest first within each part.
        ordered = ordered.order_by(out.weight.desc(), out.a.collate(_C), out.b.collate(_C))
    return ordered


# -- cross-platform actors ---------------------------------------------------------


def cross_platform_statement(
    q: ContentQuery,
    *,
    min_platforms: int,
    after: tuple[int, int, uuid.UUID] | None,
    limit: int,
) -> Select[Any]:
    """Actors (with aliases and presences) whose content in scope is on at
    least `min_platforms` platforms, with `platforms` and `counts` (parallel
    arrays, sorted by platform), `platform_count` and `total`: most platforms
    first, then most content, ties by ID; after the keyset `after`."""
    c = content.c
    per_platform = (
        select(c.author_id, c.platform, func.count().label("n"))
        .where(*filter_conditions(q), c.author_id.isnot(None))
        .group_by(c.author_id, c.platform)
        .subquery("per_platform")
    )
    p = per_platform.c
    platform_count = func.count().label("platform_count")
    per_actor = (
        select(
            p.author_id,
            platform_count,
            cast(func.sum(p.n), BigInteger).label("total"),
            func.array_agg(aggregate_order_by(p.platform, p.platform.collate(_C))).label(
                "platforms"
            ),
            func.array_agg(aggregate_order_by(p.n, p.platform.collate(_C))).label("counts"),
        )
        .group_by(p.author_id)
        .having(func.count() >= min_platforms)
        .subquery("per_actor")
    )
    a = per_actor.c
    conditions: list[ColumnElement[bool]] = []
    if q.owner_id is not None:
        conditions.append(actors.c.owner_id == q.owner_id)
    if not q.show_deleted:
        conditions.append(actors.c.delete_time.is_(None))
    if after is not None:
        platforms_after, total_after, id_after = after
        conditions.append(
            or_(
                a.platform_count < platforms_after,
                and_(a.platform_count == platforms_after, a.total < total_after),
                and_(
                    a.platform_count == platforms_after,
                    a.total == total_after,
                    actors.c.id > id_after,
                ),
            )
        )
    return (
        select(*DETAILS, a.platforms, a.counts, a.platform_count, a.total)
        .select_from(per_actor)
        .join(actors, actors.c.id == a.author_id)
        .where(*conditions)
        .order_by(a.platform_count.desc(), a.total.desc(), actors.c.id)
        .limit(limit)
    )


class NetworkRepository:
    """Runs the network statements on one unit of work's connection."""

    def __init__(self, unit: UnitOfWork) -> None:
        self._unit = unit

    async def network(
        self, kind: Kind, q: ContentQuery, *, min_weight: int, max_nodes: int, max_edges: int
    ) -> list[asyncpg.Record]:
        """The whole network, nodes with degrees, at most `max_edges` edges."""
        sql, args = compile_for_driver(
            network_statement(
                kind, q, min_weight=min_weight, max_nodes=max_nodes, max_edges=max_edges
            )
        )
        return list(await self._unit.driver.fetch(sql, *args))

    async def stream(
        self, kind: Kind, q: ContentQuery, *, min_weight: int, max_nodes: int
    ) -> AsyncIterator[asyncpg.Record]:
        """The network's rows (no degrees) through a server-side cursor: needs a
        unit with a transaction (a snapshot)."""
        sql, args = compile_for_driver(
            network_statement(
                kind, q, min_weight=min_weight, max_nodes=max_nodes, with_degree=False
            )
        )
        async for row in self._unit.driver.cursor(sql, *args, prefetch=CURSOR_PREFETCH):
            yield row

    async def cross_platform(
        self,
        q: ContentQuery,
        *,
        min_platforms: int,
        after: tuple[int, int, uuid.UUID] | None,
        limit: int,
    ) -> list[RowMapping]:
        statement = cross_platform_statement(
            q, min_platforms=min_platforms, after=after, limit=limit
        )
        return list((await self._unit.conn.execute(statement)).mappings())
