"""Bearer-token authentication: HS256 with OBSERVATORY_JWT_SECRET, or RS256
with OBSERVATORY_JWT_PUBLIC_KEY.

What a token must hold: `sub` (the caller's UUID) and `exp`; `role` is
"admin" or "user" (missing means user); `iss` and `aud` must match
OBSERVATORY_JWT_ISSUER and OBSERVATORY_JWT_AUDIENCE when those are set;
`nbf` and `iat`, when present, must not lie in the future. Every time check
allows LEEWAY_S seconds of skew between the issuer's clock and ours."""

from __future__ import annotations

import contextvars
import os
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.types import Options

from server import errors
from server.settings import ConfigurationError, Settings

ADMIN = "admin"
USER = "user"
# Seconds of clock skew allowed on exp, nbf and iat.
LEEWAY_S = 30
MIN_SECRET_BYTES = 32
MIN_RSA_BITS = 2048
_SECRET_FILE = "jwt_secret"  # noqa: S105 (a file name)
# A client's text is quoted in an error message only this far.
_QUOTE_CHARS = 40


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


# -- keys ---------------------------------------------------------------------


def prepare(settings: Settings) -> Settings:
    """Settings with their token keys resolved and checked, for a server about
    to start (call it before workers fork, so they share what it makes).

    With neither OBSERVATORY_JWT_SECRET nor OBSERVATORY_JWT_PUBLIC_KEY, the
    development secret in the data dir is made (once) and filled in; it serves
    only the embedded database unless OBSERVATORY_ALLOW_DEV_SECRET is set.
    Raises ConfigurationError for keys that would not authenticate safely."""
    if not settings.jwt_secret and not settings.jwt_public_key:
        if settings.database_url and not settings.allow_dev_secret:
            raise ConfigurationError(
                "DATABASE_URL is set but no token key is: set OBSERVATORY_JWT_SECRET "
                f"(at least {MIN_SECRET_BYTES} bytes) or OBSERVATORY_JWT_PUBLIC_KEY; the "
                "development secret serves only the embedded database unless "
                "OBSERVATORY_ALLOW_DEV_SECRET=1"
            )
        settings = settings.model_copy(update={"jwt_secret": dev_secret(settings.data_dir)})
    verification_keys(settings)
    return settings


def dev_secret(data_dir: Path) -> str:
    """The development HS256 secret in `data_dir`, made by the first caller with
    an exclusive create and mode 0600, so racing processes share one secret."""
    path = data_dir / _SECRET_FILE
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_dev_secret(path)
    with os.fdopen(fd, "w") as file:
        file.write(secrets.token_urlsafe(48))
        file.flush()
        os.fsync(file.fileno())
    return _read_dev_secret(path)


def _read_dev_secret(path: Path) -> str:
    if path.stat().st_mode & 0o077:
        raise ConfigurationError(f"{path} is readable by others: chmod 600 it, or delete it")
    # Its creator may still be writing it.
    deadline = time.monotonic() + 2.0
    secret = path.read_text().strip()
    while not secret and time.monotonic() < deadline:
        time.sleep(0.01)
        secret = path.read_text().strip()
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise ConfigurationError(
            f"{path} holds no usable secret: delete it and a new one is made at start"
        )
    return secret


def verification_keys(settings: Settings) -> list[tuple[str, Any]]:
    """(algorithm, key) pairs the settings verify tokens with; ConfigurationError
    when there is none or one is too weak to use."""
    keys: list[tuple[str, Any]] = []
    if settings.jwt_public_key:
        keys.append(("RS256", _load_public_key(settings.jwt_public_key)))
    if settings.jwt_secret:
        size = len(settings.jwt_secret.encode())
        if size < MIN_SECRET_BYTES:
            raise ConfigurationError(
                f"OBSERVATORY_JWT_SECRET is {size} bytes; HS256 needs at least "
                f"{MIN_SECRET_BYTES} (for example: openssl rand -base64 48)"
            )
        keys.append(("HS256", settings.jwt_secret))
    if not keys:
        raise ConfigurationError("set OBSERVATORY_JWT_SECRET or OBSERVATORY_JWT_PUBLIC_KEY")
    return keys


def _load_public_key(value: str) -> rsa.RSAPublicKey:
    """The key itself (PEM text) or a path to a PEM file."""
    source = "OBSERVATORY_JWT_PUBLIC_KEY"
    if "-----BEGIN" in value:
        pem = value.encode()
    else:
        try:
            pem = Path(value).read_bytes()
        except OSError as exc:
            raise ConfigurationError(f"{source}: cannot read {value}: {exc.strerror}") from None
        source = value
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError:
        raise ConfigurationError(f"{source} is not a PEM public key") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise ConfigurationError(f"{source} is not an RSA public key (RS256 needs one)")
    if key.key_size < MIN_RSA_BITS:
        raise ConfigurationError(
            f"{source} is a {key.key_size}-bit RSA key; RS256 needs at least {MIN_RSA_BITS}"
        )
    return key


# -- verification ----------------------------------------------------------------


class Authenticator:
    """Verifies bearer tokens. A verified token is remembered for a minute (and
    never past its `exp`), so steady clients do not pay for the signature check
    on every call; a hit costs one dict look-up and a clock read."""

    CACHE_SIZE = 10_000
    CACHE_SECONDS = 60

    def __init__(self, settings: Settings) -> None:
        # authorization value -> (caller, time.time() until which it is accepted
        # without verifying again), oldest first.
        self._verified: dict[str, tuple[Principal, float]] = {}
        self._keys = verification_keys(settings)
        self._issuer = settings.jwt_issuer or None
        self._audience = settings.jwt_audience or None
        required = ["sub", "exp"]
        if self._issuer:
            required.append("iss")
        if self._audience:
            required.append("aud")
        self._options: Options = {
            "require": required,
            "verify_aud": self._audience is not None,
        }

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise errors.Unauthenticated(
                "missing authorization metadata: send 'authorization: Bearer <JWT>'"
            )
        cached = self._verified.get(authorization)
        if cached is not None:
            if cached[1] > time.time():
                return cached[0]
            del self._verified[authorization]
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise errors.Unauthenticated("authorization metadata must be 'Bearer <JWT>'")
        claims = self._decode(token.strip())
        try:
            user_id = uuid.UUID(str(claims["sub"]))
        except ValueError:
            raise errors.Unauthenticated("the token's sub claim must be a UUID") from None
        role = claims.get("role") or USER
        if role not in (ADMIN, USER):
            raise errors.Unauthenticated(f"the token's role claim must be {ADMIN!r} or {USER!r}")
        caller = Principal(user_id=user_id, role=role)
        self._remember(authorization, caller, _usable_until(claims))
        return caller

    def _remember(self, authorization: str, caller: Principal, usable_until: float) -> None:
        verified = self._verified
        if len(verified) >= self.CACHE_SIZE:
            # Forget the oldest entry (dicts keep insertion order).
            del verified[next(iter(verified))]
        verified[authorization] = (caller, min(usable_until, time.time() + self.CACHE_SECONDS))

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
                    token,
                    key,
                    algorithms=[alg],
                    issuer=self._issuer,
                    audience=self._audience,
                    leeway=LEEWAY_S,
                    options=self._options,
                )
                return claims
            except jwt.PyJWTError as exc:
                raise errors.Unauthenticated(_refusal(exc)) from None
        accepted = ", ".join(alg for alg, _ in self._keys)
        raise errors.Unauthenticated(
            f"tokens signed with {_quote(algorithm)} are not accepted (only {accepted})"
        )


def _refusal(exc: jwt.PyJWTError) -> str:
    """Why a token was refused, in words that quote nothing of it."""
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "the token has expired"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "the token is not valid yet (its nbf or iat lies in the future)"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"the token has no {exc.claim} claim"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "the token's iss claim is not the issuer this service trusts"
    if isinstance(exc, jwt.InvalidAudienceError):
        return "the token's aud claim does not name this service"
    if isinstance(exc, jwt.InvalidSignatureError):
        return "the token's signature does not verify"
    return "the token is invalid: malformed claims or encoding"


def _usable_until(claims: dict[str, Any]) -> float:
    """When a verified token stops being accepted (PyJWT checked `exp` is a number)."""
    try:
        return float(claims["exp"]) + LEEWAY_S
    except (OverflowError, TypeError, ValueError):
        return 0.0


def _quote(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _QUOTE_CHARS else text[: _QUOTE_CHARS - 3] + "..."


def issue_token(
    secret: str,
    sub: uuid.UUID,
    role: str = USER,
    ttl_seconds: int = 86400,
    *,
    issuer: str | None = None,
    audience: str | None = None,
) -> str:
    """An HS256 token, for development and tests."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": str(sub), "role": role, "iat": now, "exp": now + ttl_seconds}
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    return jwt.encode(claims, secret, algorithm="HS256")
