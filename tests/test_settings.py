"""Database URL normalisation and settings from the environment."""

import os

import pytest

from server.db import normalize_database_url
from server.settings import Settings


def test_postgres_scheme_becomes_asyncpg():
    url, args = normalize_database_url("postgres://u:p@db.example:5433/obs")
    assert url.drivername == "postgresql+asyncpg"
    assert (url.host, url.port, url.database, url.username) == ("db.example", 5433, "obs", "u")
    assert args == {}


@pytest.mark.parametrize("scheme", ["postgresql", "postgresql+asyncpg"])
def test_postgresql_schemes_are_accepted(scheme):
    url, _ = normalize_database_url(f"{scheme}://u@h/obs")
    assert url.drivername == "postgresql+asyncpg"


def test_sslmode_becomes_the_asyncpg_ssl_argument():
    url, args = normalize_database_url(
        "postgresql://u@h/obs?sslmode=require&channel_binding=require"
    )
    assert args["ssl"] == "require"
    assert "sslmode" not in url.query
    assert "channel_binding" not in url.query


def test_sslmode_disable_turns_ssl_off():
    _, args = normalize_database_url("postgresql://u@h/obs?sslmode=disable")
    assert args["ssl"] is False


def test_unknown_sslmode_is_rejected():
    with pytest.raises(ValueError, match="sslmode"):
        normalize_database_url("postgresql://u@h/obs?sslmode=sometimes")


def test_unix_socket_host_is_kept():
    url, _ = normalize_database_url("postgresql://postgres:@/obs?host=/tmp/pg")
    assert url.query["host"] == "/tmp/pg"


def test_non_postgres_url_is_rejected():
    with pytest.raises(ValueError, match="PostgreSQL"):
        normalize_database_url("mysql://u@h/db")


def test_settings_read_the_documented_environment(monkeypatch):
    monkeypatch.setenv("OBSERVATORY_LISTEN", "0.0.0.0:6000")
    monkeypatch.setenv("DATABASE_POOL_SIZE", "7")
    monkeypatch.setenv("DATABASE_MAX_OVERFLOW", "3")
    monkeypatch.setenv("OBSERVATORY_WORKERS", "4")
    monkeypatch.setenv("OBSERVATORY_REFLECTION", "0")
    settings = Settings()
    assert settings.listen == "0.0.0.0:6000"
    assert (settings.pool_size, settings.max_overflow, settings.workers) == (7, 3, 4)
    assert settings.reflection is False


def test_settings_defaults_match_the_contract(monkeypatch):
    for name in (
        "OBSERVATORY_LISTEN",
        "DATABASE_URL",
        "OBSERVATORY_DATA_DIR",
        "DATABASE_POOL_SIZE",
    ):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert settings.listen == "127.0.0.1:50051"
    assert settings.database_url is None
    assert str(settings.data_dir) == ".data"
    assert (
        settings.pool_size,
        settings.max_overflow,
        settings.pool_timeout,
        settings.pool_recycle,
    ) == (
        5,
        10,
        30,
        3600,
    )


def test_workers_default_to_the_cpus_the_process_may_use(monkeypatch):
    monkeypatch.delenv("OBSERVATORY_WORKERS", raising=False)
    assert Settings().workers == len(os.sched_getaffinity(0))


def test_the_event_loop_defaults_to_uvloop_and_takes_only_known_loops(monkeypatch):
    monkeypatch.delenv("OBSERVATORY_EVENT_LOOP", raising=False)
    assert Settings().event_loop == "uvloop"
    monkeypatch.setenv("OBSERVATORY_EVENT_LOOP", "asyncio")
    assert Settings().event_loop == "asyncio"
    monkeypatch.setenv("OBSERVATORY_EVENT_LOOP", "trio")
    with pytest.raises(ValueError, match="OBSERVATORY_EVENT_LOOP"):
        Settings()
