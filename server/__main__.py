"""`python -m server [serve|migrate|token]`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import uuid
from collections.abc import Coroutine, Sequence
from typing import Any

from server import auth, logs, migrate, tls
from server.auth import ADMIN, USER, issue_token
from server.embedded import EmbeddedPostgres
from server.ops import backup, demo, multiprocess
from server.settings import ConfigurationError, Settings
from server.workers import run_forked, settle_heap

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
    settle_heap()
    log.info("serving", extra={"listen": settings.listen, "port": app.port, "pid": os.getpid()})
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("shutting down", extra={"grace_s": settings.shutdown_grace})
    await app.stop(settings.shutdown_grace)


def _run_loop(settings: Settings, main: Coroutine[Any, Any, None]) -> None:
    """Runs a worker's `main` on the event loop OBSERVATORY_EVENT_LOOP names."""
    if settings.event_loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            main.close()
            raise ConfigurationError(
                "uvloop is not installed: install it, or set OBSERVATORY_EVENT_LOOP=asyncio"
            ) from None
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main)
        return
    asyncio.run(main)


def _run_worker(settings: Settings, database_url: str) -> None:
    logs.configure(settings.log_level)
    try:
        _run_loop(settings, _serve_worker(settings, database_url))
    except ConfigurationError as exc:
        log.error(str(exc))
        raise SystemExit(1) from None
    finally:
        from server.ops import metrics

        metrics.mark_process_dead(os.getpid())


def serve(settings: Settings) -> None:
    # What can refuse to start refuses here, before a database starts or a
    # worker forks; the development secret is made here, once, for all workers.
    settings = auth.prepare(settings)
    tls.check(settings)
    tls.ensure_address_free(settings.listen)
    if settings.http_listen:
        tls.ensure_address_free(settings.http_listen)  # the HTTP side port
    tls.warn_if_plaintext_exposed(settings)
    database_url, embedded = _database(settings)
    metrics_dir = None
    try:
        migrate.upgrade(database_url)
        if settings.workers == 1:
            _run_loop(settings, _serve_worker(settings, database_url))
            return
        # Metrics of all workers go to shared files, so any worker's /metrics
        # shows the sum; set up before the first worker exists.
        metrics_dir = multiprocess.prepare()
        # Fork every worker before any gRPC object exists; each binds the same
        # port with SO_REUSEPORT and the kernel spreads connections.
        failed = run_forked(settings.workers, _run_worker, (settings, database_url))
        if failed:
            raise SystemExit(failed)
    finally:
        multiprocess.cleanup(metrics_dir)
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
    backup.add_commands(commands)
    demo.add_command(commands)
    args = parser.parse_args(argv)

    settings = Settings()
    logs.configure(settings.log_level)
    try:
        _run(args, settings)
    except ConfigurationError as exc:
        log.error(str(exc))  # one line, no traceback: the message says what to change
        raise SystemExit(1) from None


def _run(args: argparse.Namespace, settings: Settings) -> None:
    if args.command == "token":
        settings = auth.prepare(settings)
        if not settings.jwt_secret:
            raise ConfigurationError(
                "only OBSERVATORY_JWT_PUBLIC_KEY is set: RS256 tokens come from its private key"
            )
        sub = args.sub or uuid.uuid5(uuid.NAMESPACE_URL, f"observatory:dev:{args.role}")
        token = issue_token(
            settings.jwt_secret,
            sub,
            args.role,
            args.ttl,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
        )
        sys.stdout.write(token + "\n")
    elif args.command in ("backup", "restore"):
        backup.run(args, settings, _database)
    elif args.command == "demo":
        demo.run(args, settings)
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
