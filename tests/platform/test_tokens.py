"""Which tokens open the service: every claim rule for HS256 and RS256, the
keys the server refuses to start with, and the development secret."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from observatory.v1 import admin_pb2, admin_pb2_grpc, content_pb2, content_pb2_grpc

from server import auth
from server.app import App, create_server
from server.interceptor import ObservatoryInterceptor
from server.settings import ConfigurationError
from tests.conftest import make_settings
from tests.helpers import TEST_SECRET, error_details, new_caller

ROOT = Path(__file__).resolve().parents[2]
ISSUER = "https://issuer.example"
AUDIENCE = "observatory-tests"
ALGORITHMS = ("HS256", "RS256")
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
LEEWAY = auth.LEEWAY_S


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _public_pem(key: rsa.RSAPrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


async def _server(database_url: str, rsa_key: rsa.RSAPrivateKey, **settings: Any) -> App:
    return await create_server(
        make_settings(OBSERVATORY_JWT_PUBLIC_KEY=_public_pem(rsa_key), **settings), database_url
    )


@pytest_asyncio.fixture(scope="module")
async def strict_channel(database_url, rsa_key) -> AsyncIterator[grpc.aio.Channel]:
    """A server that accepts both algorithms and requires iss and aud."""
    app = await _server(
        database_url, rsa_key, OBSERVATORY_JWT_ISSUER=ISSUER, OBSERVATORY_JWT_AUDIENCE=AUDIENCE
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield channel
    await app.stop(0)


@pytest_asyncio.fixture(scope="module")
async def open_channel(database_url, rsa_key) -> AsyncIterator[grpc.aio.Channel]:
    """A server that accepts both algorithms and checks neither iss nor aud."""
    app = await _server(database_url, rsa_key)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield channel
    await app.stop(0)


Signer = Callable[[dict[str, Any]], str]


@pytest.fixture(params=ALGORITHMS)
def sign(request, rsa_key) -> Signer:
    """Signs claims with the server's HS256 secret or its RS256 key."""
    if request.param == "HS256":
        return lambda claims: jwt.encode(claims, TEST_SECRET, algorithm="HS256")
    return lambda claims: jwt.encode(claims, rsa_key, algorithm="RS256")


@dataclass(frozen=True)
class In:
    """A time claim `seconds` from now (negative: ago)."""

    seconds: int

    def __repr__(self) -> str:
        return f"now{self.seconds:+d}s"


def _claims(**changes: Any) -> dict[str, Any]:
    """Claims the strict server accepts, changed as asked (None removes one)."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": str(uuid.uuid4()),
        "role": "user",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 600,
    }
    for name, value in changes.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = now + value.seconds if isinstance(value, In) else value
    return claims


async def _call(channel: grpc.aio.Channel, token: str) -> tuple[grpc.StatusCode, str]:
    """The code and message of a call that needs a token and no admin role (an
    unknown ID: NOT_FOUND once authenticated)."""
    stub = content_pb2_grpc.ContentServiceStub(channel)
    try:
        await stub.GetContent(
            content_pb2.GetContentRequest(id=str(uuid.uuid4())),
            metadata=(("authorization", f"Bearer {token}"),),
        )
    except grpc.aio.AioRpcError as error:
        details = error_details(error)
        if details.code == UNAUTHENTICATED:
            assert details.reason == "UNAUTHENTICATED"
        return details.code, details.message
    return grpc.StatusCode.OK, ""


async def _accepted(channel: grpc.aio.Channel, token: str) -> bool:
    code, _ = await _call(channel, token)
    return code != UNAUTHENTICATED


async def _refusal(channel: grpc.aio.Channel, token: str) -> str:
    code, message = await _call(channel, token)
    assert code == UNAUTHENTICATED, f"accepted: {code.name}"
    return message


@pytest.mark.asyncio
class TestClaims:
    """Each rule for tokens of both algorithms, through the gRPC surface."""

    async def test_a_token_with_every_claim_right_is_accepted(self, strict_channel, sign):
        assert await _accepted(strict_channel, sign(_claims()))

    @pytest.mark.parametrize(
        ("changes", "complaint"),
        [
            ({"exp": None}, "no exp claim"),
            ({"exp": In(-LEEWAY - 30)}, "expired"),
            ({"nbf": In(LEEWAY + 60)}, "not valid yet"),
            ({"iat": In(LEEWAY + 60)}, "not valid yet"),
            ({"sub": None}, "no sub claim"),
            ({"sub": "alice"}, "sub claim must be a UUID"),
            ({"role": "root"}, "role claim"),
            ({"exp": "tomorrow"}, "invalid"),
        ],
        ids=lambda value: str(value),
    )
    async def test_a_token_breaking_a_rule_is_refused(
        self, strict_channel, sign, changes, complaint
    ):
        assert complaint in await _refusal(strict_channel, sign(_claims(**changes)))

    @pytest.mark.parametrize(
        "changes",
        [
            {"exp": In(-LEEWAY + 10)},
            {"nbf": In(LEEWAY - 10)},
            {"iat": In(LEEWAY - 10)},
            {"nbf": In(-60)},
        ],
        ids=lambda value: str(value),
    )
    async def test_clocks_may_differ_by_the_leeway(self, strict_channel, sign, changes):
        assert await _accepted(strict_channel, sign(_claims(**changes)))

    async def test_iat_is_optional(self, strict_channel, sign):
        assert await _accepted(strict_channel, sign(_claims(iat=None)))

    @pytest.mark.parametrize(
        ("changes", "complaint"),
        [
            ({"iss": None}, "no iss claim"),
            ({"iss": "https://elsewhere.example"}, "iss claim"),
            ({"aud": None}, "no aud claim"),
            ({"aud": "another-service"}, "aud claim"),
            ({"aud": ["another-service", "a-third"]}, "aud claim"),
        ],
        ids=lambda value: str(value),
    )
    async def test_issuer_and_audience_are_enforced_when_set(
        self, strict_channel, sign, changes, complaint
    ):
        assert complaint in await _refusal(strict_channel, sign(_claims(**changes)))

    async def test_an_audience_list_naming_the_service_is_accepted(self, strict_channel, sign):
        claims = _claims(aud=["another-service", AUDIENCE])

        assert await _accepted(strict_channel, sign(claims))

    @pytest.mark.parametrize(
        "changes",
        [{"iss": None, "aud": None}, {"iss": "https://anyone.example", "aud": "anything"}],
        ids=["absent", "any value"],
    )
    async def test_issuer_and_audience_are_not_checked_when_unset(
        self, open_channel, sign, changes
    ):
        assert await _accepted(open_channel, sign(_claims(**changes)))

    async def test_exp_is_required_even_when_nothing_else_is(self, open_channel, sign):
        assert "no exp claim" in await _refusal(open_channel, sign(_claims(exp=None)))

    async def test_a_token_without_a_role_is_a_user(self, strict_channel, sign):
        metadata = (("authorization", f"Bearer {sign(_claims(role=None))}"),)

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await admin_pb2_grpc.AdminServiceStub(strict_channel).VerifyLedger(
                admin_pb2.VerifyLedgerRequest(), metadata=metadata
            )

        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED

    async def test_a_token_with_the_admin_role_is_an_admin(self, strict_channel, sign):
        metadata = (("authorization", f"Bearer {sign(_claims(role='admin'))}"),)

        await admin_pb2_grpc.AdminServiceStub(strict_channel).VerifyLedger(
            admin_pb2.VerifyLedgerRequest(user_id=str(uuid.uuid4())), metadata=metadata
        )

    async def test_a_token_once_accepted_is_refused_when_its_leeway_runs_out(
        self, strict_channel, sign
    ):
        # Accepted for one to two more seconds, then past exp + leeway.
        claims = _claims(exp=In(-LEEWAY + 2))
        token = sign(claims)
        assert await _accepted(strict_channel, token)

        await asyncio.sleep(max(0.0, claims["exp"] + LEEWAY + 0.2 - time.time()))

        assert "expired" in await _refusal(strict_channel, token)


@pytest.mark.asyncio
class TestSignatures:
    async def test_an_hs256_token_signed_with_another_secret_is_refused(self, strict_channel):
        token = jwt.encode(_claims(), "another-secret-that-is-long-enough-too!", algorithm="HS256")

        assert "signature" in await _refusal(strict_channel, token)

    async def test_an_rs256_token_signed_with_another_key_is_refused(self, strict_channel):
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)

        assert "signature" in await _refusal(
            strict_channel, jwt.encode(_claims(), other, algorithm="RS256")
        )

    async def test_claims_changed_after_signing_are_refused(self, strict_channel, sign):
        header, _, signature = sign(_claims()).split(".")
        forged = _b64(json.dumps(_claims(role="admin")).encode())

        assert "signature" in await _refusal(strict_channel, f"{header}.{forged}.{signature}")

    async def test_an_unsigned_token_is_refused(self, strict_channel):
        token = jwt.encode(_claims(), None, algorithm="none")

        assert "not accepted" in await _refusal(strict_channel, token)

    async def test_the_public_key_used_as_an_hs256_secret_is_refused(self, strict_channel, rsa_key):
        # The classic algorithm confusion: HMAC keyed with the server's public key.
        token = _hs256_by_hand(_claims(), _public_pem(rsa_key).encode())

        assert "signature" in await _refusal(strict_channel, token)

    async def test_an_algorithm_the_server_has_no_key_for_is_refused(self, strict_channel):
        token = jwt.encode(_claims(), ec.generate_private_key(ec.SECP256R1()), algorithm="ES256")

        assert "not accepted" in await _refusal(strict_channel, token)

    async def test_a_refusal_quotes_little_of_the_token(self, strict_channel):
        header = _b64(json.dumps({"alg": "X" * 2000, "typ": "JWT"}).encode())
        token = f"{header}.{_b64(b'{}')}.c2ln"

        message = await _refusal(strict_channel, token)

        assert len(message) < 200
        assert "X" * 50 not in message


@pytest.mark.asyncio
class TestBeforeTheHandler:
    """A call without a good token is refused before its body is decoded and
    before its handler runs."""

    async def test_undecodable_bytes_without_a_token_are_unauthenticated(self, channel):
        create = channel.unary_unary("/observatory.v1.ContentService/CreateContent")

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await create(b"\xff\xff\xff not a protobuf")

        assert caught.value.code() == UNAUTHENTICATED

    async def test_undecodable_bytes_with_a_token_are_invalid(self, channel, alice):
        create = channel.unary_unary("/observatory.v1.ContentService/CreateContent")

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await create(b"\xff\xff\xff not a protobuf", metadata=alice.metadata)

        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    async def test_an_undecodable_stream_without_a_token_is_unauthenticated(self, channel):
        ingest = channel.stream_unary("/observatory.v1.ContentService/IngestContent")

        async def garbage():
            yield b"\xff\xff\xff not a protobuf"

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await ingest(garbage())

        assert caught.value.code() == UNAUTHENTICATED

    @pytest.mark.parametrize("kind", ["unary", "client stream"])
    @pytest.mark.parametrize("authorization", [None, "Bearer not-a-jwt"])
    async def test_neither_decoder_nor_handler_runs(self, kind, authorization):
        seen: list[str] = []

        def decode(raw: bytes) -> bytes:
            seen.append("decoded")
            return raw

        async def unary(request: bytes, context) -> bytes:
            seen.append("handled")
            return request

        async def client_stream(requests, context) -> bytes:
            seen.append("handled")
            return b"".join([request async for request in requests])

        if kind == "unary":
            handler = grpc.unary_unary_rpc_method_handler(unary, decode, lambda raw: raw)
        else:
            handler = grpc.stream_unary_rpc_method_handler(client_stream, decode, lambda raw: raw)
        interceptor = ObservatoryInterceptor(auth.Authenticator(make_settings()))
        server = grpc.aio.server(interceptors=[interceptor])
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("test.Echo", {"Call": handler}),)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        metadata = (("authorization", authorization),) if authorization else ()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                if kind == "unary":
                    call = channel.unary_unary("/test.Echo/Call")
                    send = lambda metadata: call(b"body", metadata=metadata)  # noqa: E731
                else:
                    stream = channel.stream_unary("/test.Echo/Call")
                    send = lambda metadata: stream(iter([b"body", b"more"]), metadata=metadata)  # noqa: E731
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await send(metadata)
                refused_seen = list(seen)
                await send(new_caller().metadata)  # the same call with a good token runs
        finally:
            await server.stop(0)

        assert caught.value.code() == UNAUTHENTICATED
        assert refused_seen == []
        assert "handled" in seen


class TestStartRefusals:
    def test_a_secret_shorter_than_32_bytes_is_refused(self):
        with pytest.raises(ConfigurationError, match="31 bytes; HS256 needs at least 32"):
            auth.prepare(make_settings(OBSERVATORY_JWT_SECRET="s" * 31))

    def test_a_secret_of_32_bytes_is_accepted(self):
        settings = auth.prepare(make_settings(OBSERVATORY_JWT_SECRET="s" * 32))

        assert settings.jwt_secret == "s" * 32

    def test_a_public_key_that_is_not_pem_is_refused(self):
        with pytest.raises(ConfigurationError, match="not a PEM public key"):
            auth.prepare(make_settings(OBSERVATORY_JWT_PUBLIC_KEY="-----BEGIN nonsense"))

    def test_a_public_key_file_that_cannot_be_read_is_refused(self, tmp_path):
        with pytest.raises(ConfigurationError, match="cannot read"):
            auth.prepare(make_settings(OBSERVATORY_JWT_PUBLIC_KEY=str(tmp_path / "missing.pem")))

    def test_a_public_key_file_is_read(self, tmp_path, rsa_key):
        path = tmp_path / "jwt.pem"
        path.write_text(_public_pem(rsa_key))

        auth.prepare(make_settings(OBSERVATORY_JWT_PUBLIC_KEY=str(path)))

    def test_a_weak_rsa_key_is_refused(self):
        weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505

        with pytest.raises(ConfigurationError, match="1024-bit"):
            auth.prepare(make_settings(OBSERVATORY_JWT_PUBLIC_KEY=_public_pem(weak)))

    def test_a_server_refuses_to_start_with_a_short_secret_in_one_line(self, tmp_path):
        result = _python_m_server(tmp_path, OBSERVATORY_JWT_SECRET="too-short")

        assert result.returncode != 0
        assert _one_line(result.stderr)
        assert "OBSERVATORY_JWT_SECRET is 9 bytes" in result.stderr


class TestDevelopmentSecret:
    def test_it_is_made_once_with_mode_0600(self, tmp_path):
        first = auth.dev_secret(tmp_path)

        assert auth.dev_secret(tmp_path) == first
        assert len(first.encode()) >= auth.MIN_SECRET_BYTES
        assert (tmp_path / "jwt_secret").stat().st_mode & 0o777 == 0o600

    def test_processes_racing_to_make_it_share_one(self, tmp_path):
        start = time.time() + 2  # every process is ready by then
        script = (
            "import sys, time; from server.auth import dev_secret; "
            "time.sleep(max(0.0, float(sys.argv[1]) - time.time())); "
            "print(dev_secret(__import__('pathlib').Path(sys.argv[2])))"
        )
        racers = [
            subprocess.Popen(
                [sys.executable, "-c", script, str(start), str(tmp_path)],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(4)
        ]

        secrets = {racer.communicate(timeout=60)[0].strip() for racer in racers}

        assert len(secrets) == 1
        assert secrets == {(tmp_path / "jwt_secret").read_text()}

    def test_a_secret_file_others_can_read_is_refused(self, tmp_path):
        auth.dev_secret(tmp_path)
        (tmp_path / "jwt_secret").chmod(0o644)

        with pytest.raises(ConfigurationError, match="chmod 600"):
            auth.dev_secret(tmp_path)

    def test_it_serves_the_embedded_database(self, tmp_path):
        settings = auth.prepare(_without_keys(tmp_path, DATABASE_URL=None))

        assert settings.jwt_secret == (tmp_path / "jwt_secret").read_text()

    def test_it_is_refused_with_another_database(self, tmp_path):
        settings = _without_keys(tmp_path, DATABASE_URL="postgresql://db.example/obs")

        with pytest.raises(ConfigurationError, match="OBSERVATORY_ALLOW_DEV_SECRET"):
            auth.prepare(settings)
        assert not (tmp_path / "jwt_secret").exists()

    def test_it_serves_another_database_when_allowed(self, tmp_path):
        settings = _without_keys(
            tmp_path, DATABASE_URL="postgresql://db.example/obs", OBSERVATORY_ALLOW_DEV_SECRET=True
        )

        assert auth.prepare(settings).jwt_secret == auth.dev_secret(tmp_path)

    def test_a_server_with_another_database_and_no_key_refuses_in_one_line(self, tmp_path):
        result = _python_m_server(
            tmp_path, OBSERVATORY_JWT_SECRET=None, DATABASE_URL="postgresql://db.example/obs"
        )

        assert result.returncode != 0
        assert _one_line(result.stderr)
        assert "OBSERVATORY_ALLOW_DEV_SECRET" in result.stderr

    def test_make_token_signs_for_the_configured_issuer_and_audience(self, tmp_path):
        result = _python_m_server(
            tmp_path,
            "token",
            OBSERVATORY_JWT_SECRET=TEST_SECRET,
            OBSERVATORY_JWT_ISSUER=ISSUER,
            OBSERVATORY_JWT_AUDIENCE=AUDIENCE,
        )
        settings = make_settings(OBSERVATORY_JWT_ISSUER=ISSUER, OBSERVATORY_JWT_AUDIENCE=AUDIENCE)

        caller = auth.Authenticator(settings).authenticate(f"Bearer {result.stdout.strip()}")

        assert caller.role == "user"


def _without_keys(data_dir: Path, **settings: Any):
    values: dict[str, Any] = {"OBSERVATORY_JWT_SECRET": None, "OBSERVATORY_DATA_DIR": str(data_dir)}
    values.update(settings)
    return make_settings(**values)


def _python_m_server(
    data_dir: Path, *args: str, **env: str | None
) -> subprocess.CompletedProcess[str]:
    """Runs `python -m server` with the data dir and environment given (None
    unsets a variable) to its end."""
    environment = {
        **os.environ,
        "OBSERVATORY_DATA_DIR": str(data_dir),
        "OBSERVATORY_LISTEN": "127.0.0.1:0",
    }
    for name in ("DATABASE_URL", "OBSERVATORY_JWT_PUBLIC_KEY"):
        environment.pop(name, None)
    for name, value in env.items():
        if value is None:
            environment.pop(name, None)
        else:
            environment[name] = value
    return subprocess.run(
        [sys.executable, "-m", "server", *args],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _one_line(stderr: str) -> bool:
    return len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _hs256_by_hand(claims: dict[str, Any], key: bytes) -> str:
    """HS256 signed without PyJWT, which refuses PEM keys as HMAC secrets."""
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    signing_input = f"{header}.{_b64(json.dumps(claims).encode())}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"
