"""`python -m server` starting up: servers racing to migrate a fresh database,
a busy port, a development server reachable from other hosts."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
import pytest_asyncio
from alembic.script import ScriptDirectory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from observatory.v1 import content_pb2, content_pb2_grpc

from server import migrate
from tests.helpers import TEST_SECRET, make_content, new_caller

pytestmark = pytest.mark.asyncio
ROOT = Path(__file__).resolve().parents[2]
OWN_CONNECTIONS = (("grpc.use_local_subchannel_pool", 1),)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _environment(**env: str | None) -> dict[str, str]:
    """This process's environment for a server: a test secret, no side port,
    changed as asked (None unsets a variable)."""
    environment = {
        **os.environ,
        "OBSERVATORY_JWT_SECRET": TEST_SECRET,
        "OBSERVATORY_HTTP_LISTEN": "",
        "OBSERVATORY_SHUTDOWN_GRACE": "1",
    }
    environment.pop("GRPC_ENABLE_FORK_SUPPORT", None)
    for name, value in env.items():
        if value is None:
            environment.pop(name, None)
        else:
            environment[name] = value
    return environment


class ServerProcess:
    """`python -m server` on `port`, its stderr (the JSON log) kept in `log_path`."""

    def __init__(
        self, log_path: Path, port: int, listen_host: str = "127.0.0.1", **env: str | None
    ):
        self.port = port
        self.log_path = log_path
        self.env = _environment(OBSERVATORY_LISTEN=f"{listen_host}:{port}", **env)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "server"], cwd=ROOT, env=self.env, stderr=log
            )

    async def wait_serving(self, timeout: float = 90) -> None:
        assert self.process is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while loop.time() < deadline:
                assert self.process.poll() is None, f"the server exited:\n{self.log()}"
                try:
                    response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if response.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.2)
        raise AssertionError(f"the server never became SERVING:\n{self.log()}")

    async def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.to_thread(self.process.wait), 30)
            except TimeoutError:
                self.process.kill()
                await asyncio.to_thread(self.process.wait)
        return self.process.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def records(self) -> list[dict[str, Any]]:
        """The JSON records of the log (lines from gRPC's C core are not JSON)."""
        records = []
        for line in self.log().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records


def _errors(server: ServerProcess) -> list[str]:
    found = [
        json.dumps(record)
        for record in server.records()
        if record.get("level") in ("ERROR", "CRITICAL")
    ]
    if "Traceback" in server.log():
        found.append(server.log())
    return found


async def _served(port: int, metadata: Any) -> grpc.StatusCode:
    """The code of an authenticated call over a new connection."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=OWN_CONNECTIONS) as channel:
        try:
            await content_pb2_grpc.ContentServiceStub(channel).GetContent(
                content_pb2.GetContentRequest(id=str(uuid.uuid4())), metadata=metadata, timeout=10
            )
        except grpc.aio.AioRpcError as error:
            return error.code()
    return grpc.StatusCode.OK


async def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m server *args` to its end."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "server", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest_asyncio.fixture
async def fresh_database(postgres) -> AsyncIterator[str]:
    if postgres.embedded is None:
        pytest.skip("needs the embedded server to make a fresh database")
    name = f"observatory_startup_{os.getpid()}"
    url = await asyncio.to_thread(postgres.embedded.ensure_database, name, fresh=True)
    yield url
    await asyncio.to_thread(postgres.embedded.drop_database, name)


async def test_servers_started_at_once_on_a_fresh_database_migrate_it_once(
    fresh_database, tmp_path
):
    servers = [
        ServerProcess(
            tmp_path / f"server-{i}.log",
            _free_port(),
            DATABASE_URL=fresh_database,
            OBSERVATORY_WORKERS="1",
            OBSERVATORY_DATA_DIR=str(tmp_path / f"data-{i}"),
        )
        for i in range(3)
    ]
    caller = new_caller()
    try:
        for server in servers:
            server.start()
        await asyncio.gather(*(server.wait_serving() for server in servers))

        for server in servers:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                await content_pb2_grpc.ContentServiceStub(channel).CreateContent(
                    content_pb2.CreateContentRequest(content=make_content()),
                    metadata=caller.metadata,
                )
    finally:
        codes = [await server.stop() for server in servers]

    script = ScriptDirectory.from_config(migrate.alembic_config(fresh_database))
    conn = await asyncpg.connect(fresh_database)
    try:
        versions = [row["version_num"] for row in await conn.fetch("TABLE alembic_version")]
        stored = await conn.fetchval(
            "SELECT count(*) FROM content WHERE owner_id = $1", caller.user_id
        )
    finally:
        await conn.close()
    assert versions == [script.get_current_head()]
    assert stored == 3
    applied = sum(server.log().count("Running upgrade") for server in servers)
    assert applied == len(list(script.walk_revisions()))
    assert codes == [0, 0, 0]
    assert [_errors(server) for server in servers] == [[], [], []]


@pytest_asyncio.fixture(scope="module")
async def dev_server(database_url, tmp_path_factory) -> AsyncIterator[ServerProcess]:
    """Two workers on every interface, with the development secret (allowed for
    a database of our own), as a developer might start it."""
    data_dir = tmp_path_factory.mktemp("dev-data")
    server = ServerProcess(
        data_dir / "server.log",
        _free_port(),
        listen_host="0.0.0.0",  # noqa: S104 (the point of the test)
        DATABASE_URL=database_url,
        OBSERVATORY_WORKERS="2",
        OBSERVATORY_DATA_DIR=str(data_dir),
        OBSERVATORY_JWT_SECRET=None,
        OBSERVATORY_ALLOW_DEV_SECRET="1",
    )
    server.start()
    try:
        await server.wait_serving()
        yield server
    finally:
        await server.stop()


class TestDevelopmentServer:
    async def test_plaintext_on_every_interface_is_warned_about_once(self, dev_server):
        warnings = [
            record
            for record in dev_server.records()
            if "plaintext on a non-loopback address" in record.get("message", "")
        ]

        assert [record["level"] for record in warnings] == ["WARNING"]

    async def test_every_worker_accepts_tokens_from_make_token(self, dev_server):
        made = await _run(dev_server.env, "token")
        assert made.returncode == 0, made.stderr
        metadata = (("authorization", f"Bearer {made.stdout.strip()}"),)

        # Each call on a new connection, which the kernel gives either worker.
        codes = {await _served(dev_server.port, metadata) for _ in range(10)}

        assert codes == {grpc.StatusCode.NOT_FOUND}

    async def test_the_secret_is_readable_by_its_owner_only(self, dev_server):
        secret = dev_server.log_path.parent / "jwt_secret"

        assert secret.stat().st_mode & 0o777 == 0o600

    async def test_a_second_server_on_the_busy_port_says_so_in_one_line(self, dev_server):
        second = await _run(dev_server.env)

        assert second.returncode != 0
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert "already in use" in lines[0]
        assert str(dev_server.port) in lines[0]
        await dev_server.wait_serving(timeout=5)  # the first one carries on
