"""TLS and mutual TLS: plaintext refused on a TLS port, client certificates
required when a client CA is set, certificate files re-read when they change."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from observatory.v1 import content_pb2, content_pb2_grpc

from server import tls
from server.app import App, create_server
from server.settings import ConfigurationError
from tests.conftest import make_settings
from tests.helpers import make_content
from tests.platform.certs import Authority, Issued

SERVING = health_pb2.HealthCheckResponse.SERVING
# Each channel dials its own connections, so each call below is a new handshake.
OWN_CONNECTIONS = (("grpc.use_local_subchannel_pool", 1),)


@dataclass
class Files:
    cert: Path
    key: Path
    client_ca: Path

    def settings(self, *, mutual: bool = False) -> dict[str, str]:
        values = {"OBSERVATORY_TLS_CERT": str(self.cert), "OBSERVATORY_TLS_KEY": str(self.key)}
        if mutual:
            values["OBSERVATORY_TLS_CLIENT_CA"] = str(self.client_ca)
        return values


@pytest.fixture(scope="module")
def server_ca() -> Authority:
    return Authority("server CA")


@pytest.fixture(scope="module")
def client_ca() -> Authority:
    return Authority("client CA")


@pytest.fixture
def files(tmp_path: Path, server_ca: Authority, client_ca: Authority) -> Files:
    files = Files(tmp_path / "server.crt", tmp_path / "server.key", tmp_path / "clients.crt")
    server_ca.server().write(files.cert, files.key)
    files.client_ca.write_bytes(client_ca.pem)
    return files


@pytest_asyncio.fixture
async def tls_server(database_url: str, files: Files) -> AsyncIterator[App]:
    app = await create_server(make_settings(**files.settings()), database_url)
    yield app
    await app.stop(0)


@pytest_asyncio.fixture
async def mtls_server(database_url: str, files: Files) -> AsyncIterator[App]:
    app = await create_server(make_settings(**files.settings(mutual=True)), database_url)
    yield app
    await app.stop(0)


def _tls(port: int, roots: bytes, client: Issued | None = None) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=roots,
        private_key=client.key if client else None,
        certificate_chain=client.cert if client else None,
    )
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options=OWN_CONNECTIONS)


async def _check(channel: grpc.aio.Channel) -> grpc.StatusCode:
    """OK when the health check is answered SERVING, else the call's code."""
    try:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
    except grpc.aio.AioRpcError as error:
        return error.code()
    finally:
        await channel.close()
    assert response.status == SERVING
    return grpc.StatusCode.OK


@pytest.mark.asyncio
class TestTls:
    async def test_a_client_trusting_the_server_ca_is_served(self, tls_server, server_ca, alice):
        async with _tls(tls_server.port, server_ca.pem) as channel:
            created = await content_pb2_grpc.ContentServiceStub(channel).CreateContent(
                content_pb2.CreateContentRequest(content=make_content()), metadata=alice.metadata
            )

        assert created.owner_id == str(alice.user_id)

    async def test_plaintext_is_refused_on_a_tls_port(self, tls_server):
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{tls_server.port}", options=OWN_CONNECTIONS)

        assert await _check(channel) == grpc.StatusCode.UNAVAILABLE

    async def test_a_client_that_does_not_trust_the_certificate_is_refused(self, tls_server):
        assert await _check(_tls(tls_server.port, Authority("stranger").pem)) == (
            grpc.StatusCode.UNAVAILABLE
        )


@pytest.mark.asyncio
class TestMutualTls:
    async def test_a_client_certificate_from_the_client_ca_is_served(
        self, mtls_server, server_ca, client_ca
    ):
        channel = _tls(mtls_server.port, server_ca.pem, client_ca.client())

        assert await _check(channel) == grpc.StatusCode.OK

    async def test_a_client_without_a_certificate_is_refused(self, mtls_server, server_ca):
        assert await _check(_tls(mtls_server.port, server_ca.pem)) == grpc.StatusCode.UNAVAILABLE

    async def test_a_client_certificate_from_another_ca_is_refused(self, mtls_server, server_ca):
        foreign = Authority("client CA").client()  # same name, other key

        assert await _check(_tls(mtls_server.port, server_ca.pem, foreign)) == (
            grpc.StatusCode.UNAVAILABLE
        )

    async def test_plaintext_is_refused(self, mtls_server):
        channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{mtls_server.port}", options=OWN_CONNECTIONS
        )

        assert await _check(channel) == grpc.StatusCode.UNAVAILABLE

    async def test_a_replaced_client_ca_is_used_for_new_connections(
        self, mtls_server, files, server_ca, client_ca
    ):
        successor = Authority("next client CA")
        _replace(files.client_ca, successor.pem)

        assert await _check(_tls(mtls_server.port, server_ca.pem, successor.client())) == (
            grpc.StatusCode.OK
        )
        assert await _check(_tls(mtls_server.port, server_ca.pem, client_ca.client())) == (
            grpc.StatusCode.UNAVAILABLE
        )


@pytest.mark.asyncio
class TestRotation:
    @pytest.mark.parametrize("how", ["renamed over", "rewritten in place"])
    async def test_new_connections_see_a_replaced_certificate(
        self, tls_server, files, server_ca, how
    ):
        assert await _check(_tls(tls_server.port, server_ca.pem)) == grpc.StatusCode.OK
        successor = Authority("next server CA")
        issued = successor.server()

        if how == "renamed over":
            _replace(files.key, issued.key)
            _replace(files.cert, issued.cert)
        else:
            issued.write(files.cert, files.key)

        assert await _check(_tls(tls_server.port, successor.pem)) == grpc.StatusCode.OK
        assert await _check(_tls(tls_server.port, server_ca.pem)) == grpc.StatusCode.UNAVAILABLE

    async def test_a_connection_made_before_the_change_keeps_working(
        self, tls_server, files, server_ca, alice
    ):
        async with _tls(tls_server.port, server_ca.pem) as channel:
            stub = content_pb2_grpc.ContentServiceStub(channel)
            await stub.CreateContent(
                content_pb2.CreateContentRequest(content=make_content()), metadata=alice.metadata
            )
            Authority("next server CA").server().write(files.cert, files.key)

            created = await stub.CreateContent(
                content_pb2.CreateContentRequest(content=make_content()), metadata=alice.metadata
            )

        assert created.owner_id == str(alice.user_id)

    async def test_a_key_that_does_not_match_keeps_the_current_certificate(
        self, tls_server, files, server_ca, caplog
    ):
        successor = Authority("next server CA")
        issued = successor.server()

        with caplog.at_level(logging.WARNING, logger="server.tls"):
            files.cert.write_bytes(issued.cert)  # the key is not written yet
            assert await _check(_tls(tls_server.port, server_ca.pem)) == grpc.StatusCode.OK
        assert any("keeping the current certificate" in r.message for r in caplog.records)

        files.key.write_bytes(issued.key)
        assert await _check(_tls(tls_server.port, successor.pem)) == grpc.StatusCode.OK


class TestSettings:
    @pytest.mark.parametrize(
        ("named", "complaint"),
        [
            ({"OBSERVATORY_TLS_CERT"}, "both"),
            ({"OBSERVATORY_TLS_KEY"}, "both"),
            ({"OBSERVATORY_TLS_CLIENT_CA"}, "OBSERVATORY_TLS_CERT"),
        ],
    )
    def test_an_incomplete_set_of_files_is_refused(self, files, named, complaint):
        every = files.settings(mutual=True)
        settings = make_settings(**{name: every[name] for name in named})

        with pytest.raises(ConfigurationError, match=complaint):
            tls.check(settings)

    def test_a_missing_file_is_refused_by_name(self, files):
        files.key.unlink()

        with pytest.raises(ConfigurationError, match=r"OBSERVATORY_TLS_KEY.*server\.key"):
            tls.check(make_settings(**files.settings()))

    def test_a_key_that_is_not_the_certificates_is_refused(self, files):
        files.key.write_bytes(Authority("other").server().key)

        with pytest.raises(ConfigurationError, match="not the key of the certificate"):
            tls.check(make_settings(**files.settings()))

    def test_a_file_that_is_not_pem_is_refused(self, files):
        files.cert.write_text("not a certificate")

        with pytest.raises(ConfigurationError, match="no PEM certificate"):
            tls.check(make_settings(**files.settings()))

    @pytest.mark.parametrize(
        "listen", ["0.0.0.0:50051", "[::]:50051", ":50051", "192.0.2.10:50051"]
    )
    def test_plaintext_on_an_address_others_reach_is_warned_about(self, listen, caplog):
        with caplog.at_level(logging.WARNING, logger="server.tls"):
            tls.warn_if_plaintext_exposed(make_settings(OBSERVATORY_LISTEN=listen))

        assert [r.levelname for r in caplog.records] == ["WARNING"]
        assert "OBSERVATORY_TLS_CERT" in caplog.records[0].message

    @pytest.mark.parametrize(
        "listen", ["127.0.0.1:50051", "localhost:50051", "[::1]:50051", "unix:/tmp/obs.sock"]
    )
    def test_plaintext_on_loopback_is_not_warned_about(self, listen, caplog):
        with caplog.at_level(logging.WARNING, logger="server.tls"):
            tls.warn_if_plaintext_exposed(make_settings(OBSERVATORY_LISTEN=listen))

        assert caplog.records == []

    def test_tls_on_any_address_is_not_warned_about(self, files, caplog):
        settings = make_settings(OBSERVATORY_LISTEN="0.0.0.0:50051", **files.settings())

        with caplog.at_level(logging.WARNING, logger="server.tls"):
            tls.warn_if_plaintext_exposed(settings)

        assert caplog.records == []


def _replace(path: Path, content: bytes) -> None:
    """Swaps the file for a new one at once, as deploy tools and Kubernetes do."""
    staged = path.with_suffix(".new")
    staged.write_bytes(content)
    os.replace(staged, path)
