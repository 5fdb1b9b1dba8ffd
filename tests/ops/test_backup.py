"""Backups for real: `python -m server backup` and `restore` against databases
of the embedded server, to a directory and to an S3-compatible server that
the test starts on loopback; the restored database equals the original table
by table, and searches (vector and full text) work on it."""

import asyncio
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
import pytest_asyncio
from observatory.v1 import content_pb2, content_pb2_grpc, vector_pb2, vector_pb2_grpc

from server import migrate
from server.app import create_server
from server.auth import ADMIN, USER, issue_token
from server.ops import backup, demo
from tests.conftest import make_settings
from tests.helpers import TEST_SECRET
from tests.ops.helpers import ROOT, free_port

pytestmark = pytest.mark.asyncio


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server", *args],
        cwd=ROOT,
        env={**os.environ, "OBSERVATORY_JWT_SECRET": TEST_SECRET, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest_asyncio.fixture
async def loaded(databases):
    """A migrated database holding the demo data set (every service's), loaded
    through the API."""
    url = databases("source")
    await asyncio.to_thread(migrate.upgrade, url)
    app = await create_server(make_settings(), url)
    try:
        await demo.load(
            f"127.0.0.1:{app.port}",
            issue_token(TEST_SECRET, demo.demo_user(), USER),
            issue_token(TEST_SECRET, demo.admin_user(), ADMIN),
        )
    finally:
        await app.stop(0)
    return url


async def _tables(url: str) -> dict[str, tuple[int, str]]:
    """Every table's row count and a checksum of its rows."""
    conn = await asyncpg.connect(url)
    try:
        names = await conn.fetch(
            "SELECT format('%I.%I', n.nspname, c.relname) AS name FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.relkind = 'r' AND n.nspname = 'public' ORDER BY 1"
        )
        found = {}
        for (name,) in names:
            count, digest = await conn.fetchrow(
                f"SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), ''))"
                f" FROM {name} t"
            )
            found[name] = (count, digest)
        return found
    finally:
        await conn.close()


async def _searches(url: str) -> tuple[list[tuple[str, float]], list[str]]:
    """A vector search and a full-text search, as the demo user."""
    app = await create_server(make_settings(), url)
    metadata = (("authorization", f"Bearer {issue_token(TEST_SECRET, demo.demo_user(), USER)}"),)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            hits = [
                (hit.item.id, round(hit.score, 5))
                async for hit in vector_pb2_grpc.VectorServiceStub(channel).SearchSimilar(
                    vector_pb2.SearchSimilarRequest(
                        collection=demo.COLLECTION,
                        vector=demo.embed("wind power and the climate"),
                        top_k=5,
                    ),
                    metadata=metadata,
                )
            ]
            found = await content_pb2_grpc.ContentServiceStub(channel).SearchContent(
                content_pb2.SearchContentRequest(filter=content_pb2.ContentFilter(query="klimaet")),
                metadata=metadata,
            )
            return hits, [result.content.id for result in found.results]
    finally:
        await app.stop(0)


async def test_round_trip_through_a_directory(loaded, databases, tmp_path):
    store = tmp_path / "backups"
    taken = _cli("backup", DATABASE_URL=loaded, OBSERVATORY_BACKUP_URL=str(store))
    assert taken.returncode == 0, taken.stderr
    name = taken.stdout.split()[1]
    assert backup.taken_at(name) is not None
    assert (store / name).stat().st_size > 0

    listed = _cli("restore", "--list", OBSERVATORY_BACKUP_URL=str(store))
    assert listed.stdout.splitlines()[0].split("\t")[0] == name

    fresh = databases("restored")
    restored = _cli("restore", name, DATABASE_URL=fresh, OBSERVATORY_BACKUP_URL=str(store))
    assert restored.returncode == 0, restored.stderr
    original, copy = await _tables(loaded), await _tables(fresh)
    assert copy == original
    partitions = [
        count for name, (count, _) in original.items() if name.startswith("public.content_")
    ]
    assert sum(partitions) == len(list(demo.posts()))
    hits, found = await _searches(fresh)
    assert (hits, found) == await _searches(loaded)
    assert len(hits) == 5
    assert found


async def test_restore_refuses_a_database_with_tables_unless_forced(loaded, tmp_path):
    store = str(tmp_path / "backups")
    assert _cli("backup", DATABASE_URL=loaded, OBSERVATORY_BACKUP_URL=store).returncode == 0
    refused = _cli("restore", "latest", DATABASE_URL=loaded, OBSERVATORY_BACKUP_URL=store)
    assert refused.returncode == 1
    assert "--force" in refused.stderr
    before = await _tables(loaded)
    forced = _cli("restore", "latest", "--force", DATABASE_URL=loaded, OBSERVATORY_BACKUP_URL=store)
    assert forced.returncode == 0, forced.stderr
    assert await _tables(loaded) == before


async def test_dry_run_and_retention_pruning(loaded, tmp_path):
    store = tmp_path / "backups"
    now = datetime.now(UTC)
    old = backup.object_name(now - timedelta(days=40))
    recent = backup.object_name(now - timedelta(days=3))
    for name in (old, recent):
        (store / name).parent.mkdir(parents=True, exist_ok=True)
        (store / name).write_bytes(b"an older backup")
    unrelated = store / "postgres" / "notes.txt"
    unrelated.write_text("not a backup")

    dry = _cli("backup", "--dry-run", DATABASE_URL=loaded, OBSERVATORY_BACKUP_URL=str(store))
    assert dry.returncode == 0, dry.stderr
    assert f"would prune {old}" in dry.stdout
    assert recent not in dry.stdout
    assert (store / old).exists()
    assert len(list(store.rglob("*.dump"))) == 2

    taken = _cli(
        "backup",
        DATABASE_URL=loaded,
        OBSERVATORY_BACKUP_URL=str(store),
        OBSERVATORY_BACKUP_RETENTION_DAYS="30",
    )
    assert taken.returncode == 0, taken.stderr
    assert f"pruned {old}" in taken.stdout
    assert not (store / old).exists()
    assert (store / recent).exists()
    assert unrelated.exists()
    assert len(list(store.rglob("*.dump"))) == 2


@pytest.fixture
def s3_server():
    """An S3-compatible server (moto's) on a loopback port, with a bucket."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    bucket = f"observatory-{uuid.uuid4().hex[:8]}"
    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=bucket)
    yield env, bucket, client
    client.close()
    server.stop()


async def test_round_trip_through_s3(loaded, databases, s3_server):
    env, bucket, client = s3_server
    url = f"s3://{bucket}/nightly"
    taken = _cli("backup", DATABASE_URL=loaded, OBSERVATORY_BACKUP_URL=url, **env)
    assert taken.returncode == 0, taken.stderr
    name = taken.stdout.split()[1]
    keys = [item["Key"] for item in client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == [f"nightly/{name}"]

    listed = _cli("restore", "--list", OBSERVATORY_BACKUP_URL=url, **env)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.startswith(name + "\t")

    fresh = databases("from_s3")
    restored = _cli("restore", name, DATABASE_URL=fresh, OBSERVATORY_BACKUP_URL=url, **env)
    assert restored.returncode == 0, restored.stderr
    assert await _tables(fresh) == await _tables(loaded)
