"""normalize_url: the contract's rules for "the same URL"."""

from __future__ import annotations

import pytest

from server.urls import normalize_url


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("https://Example.COM/a", "https://example.com/a"),
        ("https://www.example.com/a", "https://example.com/a"),
        ("https://example.com/a/", "https://example.com/a"),
        ("https://example.com/", "https://example.com"),
        ("https://example.com", "https://example.com"),
        ("http://example.com/a", "https://example.com/a"),
        ("example.com/a", "https://example.com/a"),
        ("https://example.com:443/a", "https://example.com/a"),
        ("http://example.com:80/a", "https://example.com/a"),
        ("https://example.com:8443/a", "https://example.com:8443/a"),
        ("https://example.com/a#comments", "https://example.com/a"),
        ("https://user:pw@example.com/a", "https://example.com/a"),
        ("  https://example.com/a  ", "https://example.com/a"),
        ("https://example.com./a", "https://example.com/a"),
        ("https://[::1]:8080/a", "https://[::1]:8080/a"),
    ],
)
def test_host_path_and_scheme_are_normalised(given: str, expected: str) -> None:
    assert normalize_url(given) == expected


def test_path_case_is_kept_because_servers_may_tell_it_apart() -> None:
    assert normalize_url("https://example.com/A") != normalize_url("https://example.com/a")


@pytest.mark.parametrize(
    "tracking",
    [
        "utm_source=x",
        "utm_medium=social",
        "UTM_Campaign=y",
        "fbclid=1",
        "gclid=2",
        "ref=tw",
        "source=feed",
        "_ga=3",
    ],
)
def test_tracking_parameters_are_dropped(tracking: str) -> None:
    assert normalize_url(f"https://example.com/a?id=7&{tracking}") == "https://example.com/a?id=7"


def test_remaining_query_parameters_are_sorted() -> None:
    assert normalize_url("https://example.com/a?b=2&a=1&utm_source=x") == (
        "https://example.com/a?a=1&b=2"
    )
    assert normalize_url("https://example.com/a?b=2&a=1") == normalize_url(
        "https://www.example.com/a/?a=1&b=2&fbclid=z#top"
    )


def test_blank_values_and_repeated_names_survive() -> None:
    assert normalize_url("https://example.com/?q=&tag=b&tag=a") == (
        "https://example.com?q=&tag=a&tag=b"
    )


def test_a_url_of_only_tracking_parameters_loses_its_query() -> None:
    assert normalize_url("https://example.com/a?utm_source=x&ref=y") == "https://example.com/a"


def test_different_pages_stay_different() -> None:
    assert normalize_url("https://example.com/a?id=1") != normalize_url(
        "https://example.com/a?id=2"
    )
    assert normalize_url("https://example.com/a") != normalize_url("https://example.org/a")
    assert normalize_url("https://blog.example.com/a") != normalize_url("https://example.com/a")


@pytest.mark.parametrize("given", [None, "", "   ", "https://", "https://example.com:notaport/a"])
def test_empty_or_unparseable_urls_have_no_key(given: str | None) -> None:
    assert normalize_url(given) is None


def test_other_schemes_are_returned_as_given() -> None:
    assert normalize_url(" mailto:someone@example.com ") == "mailto:someone@example.com"


def test_plain_queries_normalise_exactly_as_decoding_and_re_encoding_would() -> None:
    """The shortcut for plain queries gives what parse_qsl + urlencode give."""
    import random
    from urllib.parse import parse_qsl, urlencode

    rng = random.Random(7)
    alphabet = "ab_.~-=&Z09%+/"
    for _ in range(20_000):
        query = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 14)))
        kept = [(n, v) for n, v in parse_qsl(query, keep_blank_values=True) if n != "ref"]
        expected = "https://example.com/a" + (f"?{urlencode(sorted(kept))}" if kept else "")
        assert normalize_url(f"https://example.com/a?{query}") == expected, query


def _url_corpus() -> list[str]:
    """URLs plain and not: schemes, hosts, ports, www, paths, queries (with
    tracking parameters, escapes, repeats), fragments, odd characters."""
    import itertools
    import random

    rng = random.Random(20261206)
    schemes = ["https://", "http://", "HTTP://", "ftp://", "", "//"]
    hosts = [
        "Example.COM",
        "www.example.org",
        "www.",
        "a.b-c.io",
        "example.com.",
        "x:8080",
        "user@host.net",
        "[::1]",
        "ex_ample.com",
        "www",
        "WWW.Example.com",
    ]
    paths = ["", "/", "/a/b/", "/A%20B", "/caf\u00e9", "/p ath", "//x//", "/a?b"]
    queries = [
        "",
        "?",
        "?b=2&a=1",
        "?utm_source=x&id=3",
        "?a=1&a=0",
        "?q=a+b",
        "?x=%2F",
        "?fbclid=1",
        "?k",
        "?a==b",
        "?Ref=1&z=2",
    ]
    fragments = ["", "#top", "#"]
    corpus = [
        "".join(parts) for parts in itertools.product(schemes, hosts, paths, queries, fragments)
    ]
    rng.shuffle(corpus)
    return [*corpus[:3000], " https://example.com/a ", "https://example.com\t", "http://\u00e9.fr/"]


def test_the_plain_fast_path_normalises_exactly_as_parsing_does():
    """normalize_url takes plain http(s) URLs by one regular expression: for
    every URL it vouches for, the answer is the parser's."""
    from server.urls import parsed_normalized_url, plain_normalized_url

    vouched = 0
    for url in _url_corpus():
        plain = plain_normalized_url(url)
        if plain is not None:
            vouched += 1
            assert plain == parsed_normalized_url(url), url
        assert normalize_url(url) == parsed_normalized_url(url), url
    assert vouched > 300  # the fast path is taken for the common case
