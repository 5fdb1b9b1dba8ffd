"""`python -m server [serve|migrate|token]`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import uuid
from collections.abc import Sequence

from server import logs, migrate
from server.auth import ADMIN, USER, dev_secret, issue_token
from server.embedded import EmbeddedPostgres
from server.settings import Settings
from server.workers import run_forked

log = logging.getLogger("observatory")


def _database(settings: Settings) -> tuple[str, EmbeddedPostgres | None]:
    if settings.database_url:
        return settings.database_url, None
    embedded = EmbeddedPostgres(settings.data_dir)
    embedded.start()
    return embedded.ensure_database(), embedded


async def _serve_worker(settings: Settings, database_url: str) -> None:
    from server.app import create_server  # imported here: no gRPC object before forking

    app = await create_server(settings, database_url)
    log.info("serving", extra={"listen": settings.listen, "port": app.port, "pid": os.getpid()})
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("shutting down", extra={"grace_s": settings.shutdown_grace})
    await app.stop(settings.shutdown_grace)


def _run_worker(settings: Settings, database_url: str) -> None:
    logs.configure(settings.log_level)
    asyncio.run(_serve_worker(settings, database_url))


def serve(settings: Settings) -> None:
    database_url, embedded = _database(settings)
    try:
        migrate.upgrade(database_url)
        if settings.workers == 1:
            asyncio.run(_serve_worker(settings, database_url))
            return
        # Fork every worker before any gRPC object exists; each binds the same
        # port with SO_REUSEPORT and the kernel spreads connections.
        run_forked(settings.workers, _run_worker, (settings, database_url))
    finally:
        if embedded is not None:
            embedded.stop()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="observatory")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="serve gRPC (the default)")
    commands.add_parser("migrate", help="alembic upgrade head")
    token = commands.add_parser("token", help="print a development JWT for the configured secret")
    token.add_argument("--role", choices=(USER, ADMIN), default=USER)
    token.add_argument("--sub", type=uuid.UUID, help="user ID (default: a fixed dev user per role)")
    token.add_argument("--ttl", type=int, default=86400, help="seconds until it expires")
    args = parser.parse_args(argv)

    settings = Settings()
    logs.configure(settings.log_level)
    if args.command == "token":
        secret = settings.jwt_secret or dev_secret(settings.data_dir)
        sub = args.sub or uuid.uuid5(uuid.NAMESPACE_URL, f"observatory:dev:{args.role}")
        sys.stdout.write(issue_token(secret, sub, args.role, args.ttl) + "\n")
    elif args.command == "migrate":
        database_url, embedded = _database(settings)
        try:
            migrate.upgrade(database_url)
        finally:
            if embedded is not None:
                embedded.stop()
    else:
        serve(settings)


if __name__ == "__main__":
    main()
