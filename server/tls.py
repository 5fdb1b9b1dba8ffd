"""The transport: TLS (and mutual TLS) from certificate files that are re-read
when they change, or plaintext, on the address in OBSERVATORY_LISTEN."""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from server.settings import ConfigurationError, Settings

log = logging.getLogger(__name__)

_Stamp = tuple[tuple[int, int, int, int], ...]


class CertificateFiles:
    """The server's certificate chain and key, and for mutual TLS the CA bundle
    that client certificates must chain to, as gRPC wants them.

    gRPC calls `fetch` before every TLS handshake; it answers a new
    configuration only when a file has changed since it last looked (a `stat`
    per file otherwise), so new connections see a replaced certificate without a
    restart. Files that fail to load (a half-written pair, a key that does not
    match) are logged and the certificate in use is kept."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None) -> None:
        self._cert = cert
        self._key = key
        self._client_ca = client_ca
        self._stamp: _Stamp | None = None

    @property
    def mutual(self) -> bool:
        return self._client_ca is not None

    def load(self) -> grpc.ServerCertificateConfiguration:
        """The configuration the files hold now; ConfigurationError when they do
        not make one."""
        self._stamp = self._current_stamp()
        return self._read()

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            stamp = self._current_stamp()
        except ConfigurationError:
            return None  # a file is being replaced; look again at the next handshake
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        try:
            configuration = self._read()
        except ConfigurationError as exc:
            log.warning(
                "TLS files changed but cannot be used; keeping the current certificate",
                extra={"error": str(exc)},
            )
            return None
        log.info("TLS certificate reloaded", extra={"cert": str(self._cert)})
        return configuration

    def _paths(self) -> list[tuple[str, Path]]:
        paths = [("OBSERVATORY_TLS_CERT", self._cert), ("OBSERVATORY_TLS_KEY", self._key)]
        if self._client_ca is not None:
            paths.append(("OBSERVATORY_TLS_CLIENT_CA", self._client_ca))
        return paths

    def _current_stamp(self) -> _Stamp:
        stamps = []
        for name, path in self._paths():
            try:
                found = path.stat()
            except OSError as exc:
                raise ConfigurationError(f"{name}: cannot read {path}: {exc.strerror}") from None
            stamps.append((found.st_dev, found.st_ino, found.st_mtime_ns, found.st_size))
        return tuple(stamps)

    def _read(self) -> grpc.ServerCertificateConfiguration:
        chain_pem = _read("OBSERVATORY_TLS_CERT", self._cert)
        key_pem = _read("OBSERVATORY_TLS_KEY", self._key)
        try:
            chain = x509.load_pem_x509_certificates(chain_pem)
        except ValueError:
            raise ConfigurationError(
                f"OBSERVATORY_TLS_CERT: {self._cert} holds no PEM certificate"
            ) from None
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (TypeError, ValueError, UnsupportedAlgorithm):
            raise ConfigurationError(
                f"OBSERVATORY_TLS_KEY: {self._key} holds no unencrypted PEM private key"
            ) from None
        if _public(key.public_key()) != _public(chain[0].public_key()):
            raise ConfigurationError(
                f"OBSERVATORY_TLS_KEY: {self._key} is not the key of the certificate in {self._cert}"
            )
        if chain[0].not_valid_after_utc < datetime.now(UTC):
            log.warning(
                "the TLS certificate has expired; clients will refuse it",
                extra={
                    "cert": str(self._cert),
                    "expired": chain[0].not_valid_after_utc.isoformat(),
                },
            )
        client_ca = None
        if self._client_ca is not None:
            client_ca = _read("OBSERVATORY_TLS_CLIENT_CA", self._client_ca)
            try:
                x509.load_pem_x509_certificates(client_ca)
            except ValueError:
                raise ConfigurationError(
                    f"OBSERVATORY_TLS_CLIENT_CA: {self._client_ca} holds no PEM certificate"
                ) from None
        return grpc.ssl_server_certificate_configuration([(key_pem, chain_pem)], client_ca)


def certificate_files(settings: Settings) -> CertificateFiles | None:
    """The TLS files the settings name, or None for plaintext; ConfigurationError
    when only some of them are named."""
    if not settings.tls_cert and not settings.tls_key:
        if settings.tls_client_ca:
            raise ConfigurationError(
                "OBSERVATORY_TLS_CLIENT_CA needs OBSERVATORY_TLS_CERT and OBSERVATORY_TLS_KEY too"
            )
        return None
    if not settings.tls_cert or not settings.tls_key:
        raise ConfigurationError(
            "set both OBSERVATORY_TLS_CERT and OBSERVATORY_TLS_KEY, or neither"
        )
    return CertificateFiles(
        Path(settings.tls_cert),
        Path(settings.tls_key),
        Path(settings.tls_client_ca) if settings.tls_client_ca else None,
    )


def check(settings: Settings) -> None:
    """ConfigurationError unless the TLS settings are coherent and their files load."""
    files = certificate_files(settings)
    if files is not None:
        files.load()


def listen(server: grpc.aio.Server, settings: Settings) -> int:
    """Binds `settings.listen`, with TLS when the settings name certificate files;
    the port bound. ConfigurationError when it cannot be bound."""
    files = certificate_files(settings)
    try:
        if files is None:
            return server.add_insecure_port(settings.listen)
        # The fetcher may answer None (no change); the type stubs say otherwise.
        fetch = cast(Callable[[], grpc.ServerCertificateConfiguration], files.fetch)
        credentials = grpc.dynamic_ssl_server_credentials(
            files.load(), fetch, require_client_authentication=files.mutual
        )
        return server.add_secure_port(settings.listen, credentials)
    except RuntimeError:
        raise ConfigurationError(
            f"cannot listen on {settings.listen}: in use, not an address of this host, "
            "or a port this user may not bind"
        ) from None


def ensure_address_free(address: str) -> None:
    """ConfigurationError when a server already listens on `address`. Checked
    before anything starts, because workers bind with SO_REUSEPORT and would
    otherwise quietly share the port with that server."""
    if address.startswith(("unix:", "unix-abstract:")):
        return
    host, port = split_address(address)
    if port == 0:
        return
    try:
        found = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ConfigurationError(f"cannot listen on {address}: {exc.strerror}") from None
    for family, kind, proto, _, sockaddr in found:
        with socket.socket(family, kind, proto) as probe:
            # As gRPC binds: connections lingering in TIME_WAIT do not count.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise ConfigurationError(
                        f"cannot listen on {address}: the address is already in use "
                        "(is another server running?)"
                    ) from None
                # Anything else (no IPv6 here, a privileged port) is gRPC's to report.


def warn_if_plaintext_exposed(settings: Settings) -> None:
    """Logs a warning when plaintext is served on an address other hosts reach."""
    if settings.tls_cert or settings.listen.startswith(("unix:", "unix-abstract:")):
        return
    host, _ = split_address(settings.listen)
    if not _is_loopback(host):
        log.warning(
            "serving plaintext on a non-loopback address: tokens and data cross the network "
            "unencrypted; set OBSERVATORY_TLS_CERT and OBSERVATORY_TLS_KEY (see docs/tls.md)",
            extra={"listen": settings.listen},
        )


def split_address(address: str) -> tuple[str, int]:
    """(host, port) of a gRPC listen address; port 0 when it names none."""
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif address.count(":") == 1:
        host, _, port = address.partition(":")
    else:  # a bare host, or an IPv6 address without brackets and port
        host, port = address, ""
    return host, int(port) if port.isdigit() else 0


def _is_loopback(host: str) -> bool:
    if not host:
        return False  # every interface
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        found = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return all(ipaddress.ip_address(sockaddr[0]).is_loopback for *_, sockaddr in found)


def _read(name: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"{name}: cannot read {path}: {exc.strerror}") from None


def _public(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
