"""Runs Alembic migrations programmatically, one process at a time per database."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import TypeAlias

from alembic import command
from alembic.config import Config
from sqlalchemy import pool, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from server.db import normalize_database_url

ROOT = Path(__file__).resolve().parent.parent
# The PostgreSQL advisory lock every migrating process holds ("obsmigr" in ASCII).
MIGRATION_LOCK_KEY = 0x6F62736D69677200
# How often a process waiting for another's migrations asks for the lock again.
MIGRATION_LOCK_POLL_S = 0.2

_Command: TypeAlias = Callable[[Config], None]


def alembic_config(database_url: str) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.attributes["database_url"] = database_url
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """`alembic upgrade` under the migration lock: servers starting at once on
    a fresh database apply each migration exactly once, the others wait and
    then find nothing left to do."""
    asyncio.run(_locked(database_url, lambda config: command.upgrade(config, revision)))


def downgrade(database_url: str, revision: str) -> None:
    asyncio.run(_locked(database_url, lambda config: command.downgrade(config, revision)))


async def _locked(database_url: str, run: _Command) -> None:
    url, connect_args = normalize_database_url(database_url)
    engine = create_async_engine(url, poolclass=pool.NullPool, connect_args=connect_args)
    try:
        async with engine.connect() as connection:
            # A session lock: it outlives the transactions Alembic commits, and
            # goes with the connection when a migration fails or the process dies.
            lock = {"key": MIGRATION_LOCK_KEY}
            # Asked again and again rather than waited for: a session blocked
            # in pg_advisory_lock holds a snapshot, which a migration's CREATE
            # INDEX CONCURRENTLY would wait for (a deadlock: 0009 builds one).
            while not await connection.scalar(text("SELECT pg_try_advisory_lock(:key)"), lock):
                await connection.rollback()
                await asyncio.sleep(MIGRATION_LOCK_POLL_S)
            await connection.commit()
            await connection.run_sync(_on, database_url, run)
            await connection.commit()
            await connection.execute(text("SELECT pg_advisory_unlock(:key)"), lock)
            await connection.commit()
    finally:
        await engine.dispose()


def _on(connection: Connection, database_url: str, run: _Command) -> None:
    """Runs an Alembic command on `connection` (migrations/env.py uses it)."""
    config = alembic_config(database_url)
    config.attributes["connection"] = connection
    run(config)
