"""/livez and /readyz in every state: ready, database unreachable, draining,
and the side port turned off."""

import pytest

from server.app import create_server
from tests.conftest import make_settings
from tests.ops.helpers import free_port, http_json

pytestmark = pytest.mark.asyncio


async def test_ready_with_the_database_and_pool_state(database_url):
    app = await create_server(make_settings(OBSERVATORY_HTTP_LISTEN="127.0.0.1:0"), database_url)
    try:
        port = app.side_port.port
        assert await http_json(port, "/livez") == (200, {"status": "ok"})
        status, body = await http_json(port, "/readyz")
        assert status == 200
        assert body["status"] == "ready"
        assert body["database"]["reachable"] is True
        assert body["database"]["latency_ms"] >= 0
        assert set(body["pool"]) == {"size", "open", "checked_out", "overflow", "waiting"}
        assert body["pool"]["size"] == 15
    finally:
        await app.stop(0)


async def test_not_ready_while_the_database_is_unreachable(database_url):
    nowhere = f"postgresql://observatory@127.0.0.1:{free_port()}/observatory"
    app = await create_server(make_settings(OBSERVATORY_HTTP_LISTEN="127.0.0.1:0"), nowhere)
    try:
        port = app.side_port.port
        assert (await http_json(port, "/livez"))[0] == 200
        status, body = await http_json(port, "/readyz")
        assert status == 503
        assert body["status"] == "not ready"
        assert body["database"]["reachable"] is False
        assert body["database"]["error"]
    finally:
        await app.stop(0)


async def test_not_ready_while_shutting_down(database_url):
    app = await create_server(make_settings(OBSERVATORY_HTTP_LISTEN="127.0.0.1:0"), database_url)
    try:
        port = app.side_port.port
        app.side_port.serving = False  # what App.stop does first
        status, body = await http_json(port, "/readyz")
        assert status == 503
        assert body["serving"] is False
        assert body["database"]["reachable"] is True
    finally:
        await app.stop(0)


async def test_an_empty_listen_address_turns_the_side_port_off(database_url):
    app = await create_server(make_settings(OBSERVATORY_HTTP_LISTEN=""), database_url)
    try:
        assert app.side_port is None
    finally:
        await app.stop(0)


async def test_a_busy_side_port_fails_start_up_with_a_clear_message(database_url):
    # One worker: several would share the port on purpose (SO_REUSEPORT).
    first = await create_server(
        make_settings(OBSERVATORY_HTTP_LISTEN="127.0.0.1:0", OBSERVATORY_WORKERS=1), database_url
    )
    try:
        busy = f"127.0.0.1:{first.side_port.port}"
        with pytest.raises(OSError, match="OBSERVATORY_HTTP_LISTEN"):
            await create_server(
                make_settings(OBSERVATORY_HTTP_LISTEN=busy, OBSERVATORY_WORKERS=1), database_url
            )
    finally:
        await first.stop(0)
