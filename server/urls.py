"""URL normalisation for duplicate finding (ContentService.FindDuplicates and
VectorService.CheckDuplicate share it, so both agree on what "the same URL" is)."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit

# Query parameters that only track where a click came from.
TRACKING_PARAMS = frozenset({"fbclid", "gclid", "ref", "source", "_ga"})
TRACKING_PREFIXES = ("utm_",)
_DEFAULT_PORTS = {"http": 80, "https": 443}
# A query that parse_qsl + urlencode would give back unchanged, pair by pair:
# no escapes, no '+', no '=' inside a value, nothing urlencode would quote. Ingest normalises every
# row's URL, so this common case skips the decode/re-encode round trip.
_PLAIN_QUERY = re.compile(r"[A-Za-z0-9_.~=&-]*")
# An http(s) URL whose parts need no parsing: a host of letters, digits, dots
# and hyphens (no user info, no port, no trailing dot), then path, query and
# fragment. Ingest and upserts normalise every row's URL; this common case
# skips urlsplit.
_PLAIN_URL = re.compile(
    r"https?://([A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)(/[^?#]*)?(?:\?([^#]*))?(?:#.*)?"
)


def _is_tracking(name: str) -> bool:
    lowered = name.lower()
    return lowered in TRACKING_PARAMS or lowered.startswith(TRACKING_PREFIXES)


def normalize_url(url: str | None) -> str | None:
    """The key two URLs share when they point at the same page, or None for an
    empty or unparseable URL.

    Rules (the contract's, plus the obvious ones): the host is lower-cased and
    loses a leading ``www.`` and a default port; ``utm_*``, ``fbclid``,
    ``gclid``, ``ref``, ``source`` and ``_ga`` are dropped and the remaining
    query parameters sorted; the path loses its trailing slash; the fragment
    and any user info are dropped. ``http`` and ``https`` are treated as the
    same page, and a URL written without a scheme (``example.com/a``) as https.
    URLs of other schemes are returned stripped but otherwise as given.
    """
    if url is None:
        return None
    plain = plain_normalized_url(url)
    return plain if plain is not None else parsed_normalized_url(url)


def parsed_normalized_url(url: str) -> str | None:
    """`normalize_url(url)` by parsing `url` (any URL)."""
    text = url.strip()
    if not text:
        return None
    try:
        parts = urlsplit(text)
        if not parts.netloc and not parts.scheme:
            parts = urlsplit("//" + text)
        scheme = parts.scheme.lower() or "https"
        if scheme not in _DEFAULT_PORTS:
            return text
        host = (parts.hostname or "").rstrip(".")
        port = parts.port
    except ValueError:  # e.g. a port that is not a number, or a bad IPv6 literal
        return None
    if not host:
        return None
    if host.startswith("www."):
        host = host[4:]
    if ":" in host:  # an IPv6 literal keeps its brackets
        host = f"[{host}]"
    if port is not None and port != _DEFAULT_PORTS[scheme]:
        host = f"{host}:{port}"
    path = parts.path.rstrip("/")
    normalized = f"https://{host}{path}"
    query = _normalized_query(parts.query)
    return f"{normalized}?{query}" if query else normalized


def _normalized_query(query: str) -> str:
    """The query without tracking parameters, the rest sorted by name, then value."""
    if not query:
        return ""
    items = query.split("&")
    if _PLAIN_QUERY.fullmatch(query) and all(item.count("=") <= 1 for item in items):
        pairs = sorted(
            (name, value)
            for name, _, value in (item.partition("=") for item in items if item)
            if not _is_tracking(name)
        )
        return "&".join(f"{name}={value}" for name, value in pairs)
    return urlencode(
        sorted(
            (name, value)
            for name, value in parse_qsl(query, keep_blank_values=True)
            if not _is_tracking(name)
        )
    )


def plain_normalized_url(url: str) -> str | None:
    """`normalize_url(url)` of a plain http(s) URL (printable ASCII, no
    spaces, a host of letters, digits, dots and hyphens, no port or user
    info), by one regular expression; None for any other URL (which
    `normalize_url` then parses)."""
    if not url.isascii() or not url.isprintable() or " " in url:
        return None
    match = _PLAIN_URL.fullmatch(url)
    if match is None:
        return None
    host, path, query = match.groups()
    host = host.lower()
    if host.startswith("www."):
        host = host[4:]
        if not host:
            return None
    normalized = f"https://{host}{path.rstrip('/') if path else ''}"
    query = _normalized_query(query) if query else ""
    return f"{normalized}?{query}" if query else normalized
