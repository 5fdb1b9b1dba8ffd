"""Bearer-token authentication: HS256 with OBSERVATORY_JWT_SECRET, or RS256
with OBSERVATORY_JWT_PUBLIC_KEY."""

from __future__ import annotations

import contextvars
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cachetools import TTLCache

from server import errors
from server.settings import Settings

ADMIN = "admin"
USER = "user"
_SECRET_FILE = "jwt_secret"  # noqa: S105 (a file name)


@dataclass(frozen=True, slots=True)
class Principal:
    """The verified caller."""

    user_id: uuid.UUID
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN

    def require_admin(self) -> None:
        if not self.is_admin:
            raise errors.PermissionDenied("this RPC needs an admin token")


current_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal")


def principal() -> Principal:
    """The caller of the RPC being served (set by the interceptor)."""
    return current_principal.get()


def dev_secret(data_dir: Path) -> str:
    """The development HS256 secret: made once, kept in the data dir."""
    path = data_dir / _SECRET_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(48))
        path.chmod(0o600)
    return path.read_text().strip()


class Authenticator:
    """Verifies bearer tokens. A verified token is remembered for a minute (and
    never past its `exp`), so steady clients do not pay for the signature check
    on every call."""

    CACHE_SIZE = 10_000
    CACHE_SECONDS = 60

    def __init__(self, settings: Settings) -> None:
        self._verified: TTLCache[str, tuple[Principal, float]] = TTLCache(
            self.CACHE_SIZE, self.CACHE_SECONDS
        )
        self._keys: list[tuple[str, Any]] = []
        if settings.jwt_public_key:
            self._keys.append(("RS256", _load_public_key(settings.jwt_public_key)))
        secret = settings.jwt_secret
        if secret is None and not settings.jwt_public_key:
            secret = dev_secret(settings.data_dir)
        if secret:
            self._keys.append(("HS256", secret))

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise errors.Unauthenticated(
                "missing authorization metadata: send 'authorization: Bearer <JWT>'"
            )
        cached = self._verified.get(authorization)
        if cached is not None and cached[1] > time.time():
            return cached[0]
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise errors.Unauthenticated("authorization metadata must be 'Bearer <JWT>'")
        claims = self._decode(token.strip())
        try:
            user_id = uuid.UUID(str(claims.get("sub", "")))
        except ValueError:
            raise errors.Unauthenticated("the token's sub claim must be a UUID") from None
        role = claims.get("role") or USER
        if role not in (ADMIN, USER):
            raise errors.Unauthenticated(f"the token's role claim must be {ADMIN!r} or {USER!r}")
        caller = Principal(user_id=user_id, role=role)
        expires = float(claims.get("exp", float("inf")))
        self._verified[authorization] = (caller, expires)
        return caller

    def _decode(self, token: str) -> dict[str, Any]:
        try:
            algorithm = jwt.get_unverified_header(token).get("alg")
        except jwt.PyJWTError:
            raise errors.Unauthenticated("the token is not a JWT") from None
        for alg, key in self._keys:
            if alg != algorithm:
                continue
            try:
                claims: dict[str, Any] = jwt.decode(
                    token, key, algorithms=[alg], options={"require": ["sub"], "verify_aud": False}
                )
                return claims
            except jwt.ExpiredSignatureError:
                raise errors.Unauthenticated("the token has expired") from None
            except jwt.PyJWTError as exc:
                raise errors.Unauthenticated(f"the token is invalid: {exc}") from None
        raise errors.Unauthenticated(f"tokens signed with {algorithm!r} are not accepted")


def _load_public_key(value: str) -> str:
    """The key itself (PEM text) or a path to a PEM file."""
    if "-----BEGIN" in value:
        return value
    return Path(value).read_text()


def issue_token(secret: str, sub: uuid.UUID, role: str = USER, ttl_seconds: int = 86400) -> str:
    """An HS256 token, for development and tests."""
    now = int(time.time())
    return jwt.encode(
        {"sub": str(sub), "role": role, "iat": now, "exp": now + ttl_seconds},
        secret,
        algorithm="HS256",
    )
