"""The verified-token cache: a token is checked once and then remembered, but
never past a minute, never past its `exp`, and the cache stays bounded."""

from __future__ import annotations

import time
import uuid
from types import SimpleNamespace

import jwt
import pytest

from server import auth, errors
from tests.conftest import make_settings
from tests.helpers import TEST_SECRET


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """time.time() as server.auth sees it, moved by hand (PyJWT keeps the real one)."""
    clock = Clock()
    monkeypatch.setattr(auth, "time", SimpleNamespace(time=clock))
    return clock


def bearer(ttl_seconds: int, user: uuid.UUID | None = None) -> str:
    return "Bearer " + auth.issue_token(TEST_SECRET, user or uuid.uuid4(), ttl_seconds=ttl_seconds)


def test_a_remembered_token_is_refused_once_it_has_expired():
    authenticator = auth.Authenticator(make_settings())
    user = uuid.uuid4()
    # Its exp (with the leeway allowed for clock skew) passes a second from now.
    now = int(time.time())
    claims = {"sub": str(user), "iat": now - 60, "exp": now - auth.LEEWAY_S + 1}
    token = "Bearer " + jwt.encode(claims, TEST_SECRET, algorithm="HS256")
    assert authenticator.authenticate(token).user_id == user
    time.sleep(1.5)
    with pytest.raises(errors.Unauthenticated, match="expired"):
        authenticator.authenticate(token)


def test_a_token_is_verified_again_after_a_minute(clock: Clock, monkeypatch):
    authenticator = auth.Authenticator(make_settings())
    token = bearer(ttl_seconds=3600)
    authenticator.authenticate(token)
    verified = []
    decode = authenticator._decode
    monkeypatch.setattr(authenticator, "_decode", lambda t: verified.append(t) or decode(t))
    clock.now += auth.Authenticator.CACHE_SECONDS - 1
    authenticator.authenticate(token)
    assert verified == []
    clock.now += 2
    authenticator.authenticate(token)
    assert len(verified) == 1


def test_the_cache_forgets_its_oldest_tokens_when_full(monkeypatch):
    monkeypatch.setattr(auth.Authenticator, "CACHE_SIZE", 3)
    authenticator = auth.Authenticator(make_settings())
    tokens = [bearer(ttl_seconds=3600) for _ in range(5)]
    for token in tokens:
        authenticator.authenticate(token)
    assert list(authenticator._verified) == tokens[-3:]
