"""Where a request came from, in all three frameworks: trusted proxies, HTTPS, key networks.

The contract's "Transport and request security" rows: ``Forwarded`` /
``X-Forwarded-For`` / ``X-Forwarded-Proto`` believed only from
``trusted_proxies``, walked from the right; ``require_https`` refusing plain
HTTP with 403 ``https_required`` before the credential is looked at;
``hsts_seconds``; ``Cache-Control: no-store`` and ``nosniff`` on every problem
response; a key's ``allowed_cidrs`` (403 ``address_not_allowed``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import pytest

from m2m_middleware import KeyStore, open_key_store

if TYPE_CHECKING:  # this folder's conftest; only a type here
    from conftest import Caller

ORDERS_RULE = {"path": "/orders", "scopes": ["orders:read"]}
PROXY = "10.0.0.5"  # the trusted proxy the tests' requests come through
CLIENT_NET = "203.0.113.0/24"
Make = Callable[[Mapping[str, Any]], "Caller"]


@pytest.fixture
def store() -> KeyStore:
    return open_key_store("memory://")


def config(store: KeyStore, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "key_store": store,
        "rate_limit_storage": "memory://",
        "default_limits": "100/minute",
        "public_paths": ["/health"],
        "routes": [ORDERS_RULE],
    }
    values.update(overrides)
    return values


def key_from(store: KeyStore, *cidrs: str) -> dict[str, str]:
    issued = store.create_key("svc", scopes=["orders:read"], allowed_cidrs=list(cidrs))
    return {"X-API-Key": issued.key}


def assert_problem_headers(reply: Any) -> None:
    assert reply.headers["Cache-Control"] == "no-store"
    assert reply.headers["X-Content-Type-Options"] == "nosniff"
    assert reply.headers["Content-Type"].startswith("application/problem+json")


# -- a key's allowed_cidrs -------------------------------------------------------------


@pytest.mark.parametrize(
    ("cidr", "peer", "allowed"),
    [
        ("203.0.113.0/24", "203.0.113.9", True),
        ("203.0.113.0/24", "198.51.100.9", False),
        ("2001:db8::/32", "2001:db8:1::7", True),
        ("2001:db8::/32", "2001:db9::7", False),
        ("203.0.113.0/24", "::ffff:203.0.113.9", True),  # IPv4-mapped IPv6: its IPv4
        ("203.0.113.0/24", "2001:db8::1", False),
        ("::ffff:203.0.113.0/120", "203.0.113.9", True),  # a mapped network: its IPv4 one
    ],
)
def test_a_key_works_only_from_its_networks(
    make_app: Make, store: KeyStore, cidr: str, peer: str, allowed: bool
) -> None:
    app = make_app(config(store))
    headers = key_from(store, cidr)
    for _ in range(2):  # the second answered from the cache: the check is still made
        reply = app("GET", "/orders", headers, peer=peer)
        if allowed:
            assert reply.status == 200, reply.body
        else:
            assert reply.status == 403
            assert reply.json()["error"] == "address_not_allowed"
            assert_problem_headers(reply)


def test_a_key_without_networks_works_from_anywhere(make_app: Make, store: KeyStore) -> None:
    app = make_app(config(store))
    headers = key_from(store)
    for peer in ("203.0.113.9", "2001:db8::1", "127.0.0.1"):
        assert app("GET", "/ping", headers, peer=peer).status == 200


def test_the_networks_of_one_key_do_not_bind_another(make_app: Make, store: KeyStore) -> None:
    app = make_app(config(store))
    bound = key_from(store, CLIENT_NET)
    free = key_from(store)
    assert app("GET", "/ping", bound, peer="198.51.100.1").status == 403
    assert app("GET", "/ping", free, peer="198.51.100.1").status == 200


# -- trusted proxies ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "forwarded",
    [
        {"X-Forwarded-For": "203.0.113.9"},
        {"Forwarded": "for=203.0.113.9"},
        {"Forwarded": 'for="203.0.113.9:4711";proto=http'},
    ],
)
def test_a_trusted_proxy_reports_the_client_address(
    make_app: Make, store: KeyStore, forwarded: dict[str, str]
) -> None:
    app = make_app(config(store, trusted_proxies=["10.0.0.0/8"]))
    headers = key_from(store, CLIENT_NET)
    assert app("GET", "/orders", {**headers, **forwarded}, peer=PROXY).status == 200
    # Without the header the request is the proxy's own, outside the key's network.
    assert app("GET", "/orders", headers, peer=PROXY).status == 403


@pytest.mark.parametrize(
    "forged",
    [
        {"X-Forwarded-For": "203.0.113.9"},
        {"Forwarded": "for=203.0.113.9"},
        {"X-Forwarded-For": "203.0.113.9", "Forwarded": "for=203.0.113.9"},
    ],
)
def test_proxy_headers_from_anyone_else_are_ignored(
    make_app: Make, store: KeyStore, forged: dict[str, str]
) -> None:
    """A client outside trusted_proxies cannot claim an allowed address."""
    app = make_app(config(store, trusted_proxies=["10.0.0.0/8"]))
    headers = key_from(store, CLIENT_NET)
    reply = app("GET", "/orders", {**headers, **forged}, peer="198.51.100.66")
    assert reply.status == 403
    assert reply.json()["error"] == "address_not_allowed"


def test_proxy_headers_are_ignored_when_no_proxy_is_trusted(
    make_app: Make, store: KeyStore
) -> None:
    app = make_app(config(store))
    headers = key_from(store, CLIENT_NET)
    reply = app("GET", "/orders", {**headers, "X-Forwarded-For": "203.0.113.9"}, peer=PROXY)
    assert reply.status == 403


@pytest.mark.parametrize(
    ("chain", "allowed"),
    [
        # The client forged the left entry; the trusted proxy appended the real one.
        ("203.0.113.9, 198.51.100.66", False),
        # Two trusted proxies (10.x): walked past both, to the client.
        ("203.0.113.9, 10.0.0.7", True),
        # A forged "trusted" hop left of an untrusted one does not count: the walk stops.
        ("10.0.0.9, 198.51.100.66", False),
    ],
)
def test_the_chain_is_walked_from_the_right(
    make_app: Make, store: KeyStore, chain: str, allowed: bool
) -> None:
    app = make_app(config(store, trusted_proxies=["10.0.0.0/8"]))
    headers = key_from(store, CLIENT_NET)
    reply = app("GET", "/orders", {**headers, "X-Forwarded-For": chain}, peer=PROXY)
    assert reply.status == (200 if allowed else 403), reply.body


def test_a_forwarded_chain_is_walked_from_the_right(make_app: Make, store: KeyStore) -> None:
    app = make_app(config(store, trusted_proxies=["10.0.0.0/8", "2001:db8:ffff::/48"]))
    headers = key_from(store, CLIENT_NET, "2001:db8:1::/48")
    good = 'for=203.0.113.9;proto=https, for="[2001:db8:ffff::2]:8443"'
    assert app("GET", "/orders", {**headers, "Forwarded": good}, peer=PROXY).status == 200
    v6 = 'For="[2001:db8:1::17]:4711"'
    assert app("GET", "/orders", {**headers, "Forwarded": v6}, peer=PROXY).status == 200
    forged = "for=203.0.113.9, for=198.51.100.66"
    assert app("GET", "/orders", {**headers, "Forwarded": forged}, peer=PROXY).status == 403


def test_a_repeated_x_forwarded_for_is_one_chain(make_app: Make, store: KeyStore) -> None:
    app = make_app(config(store, trusted_proxies=["10.0.0.0/8"]))
    headers = key_from(store, CLIENT_NET)
    repeated = [
        *headers.items(),
        ("X-Forwarded-For", "198.51.100.66"),  # forged by the client
        ("X-Forwarded-For", "203.0.113.9"),  # appended by the proxy
    ]
    assert app("GET", "/orders", repeated, peer=PROXY).status == 200
    forged_last = [
        *headers.items(),
        ("X-Forwarded-For", "203.0.113.9"),
        ("X-Forwarded-For", "198.51.100.66"),
    ]
    assert app("GET", "/orders", forged_last, peer=PROXY).status == 403


@pytest.mark.parametrize(
    "value",
    [
        {"Forwarded": "for=_hidden"},
        {"Forwarded": "for=unknown"},
        {"Forwarded": 'for="[2001:db8::1'},
        {"Forwarded": ";;;,,,==="},
        {"Forwarded": 'for="\\"quoted\\"", for=""'},
        {"Forwarded": "for=" + "9" * 5000},
        {"Forwarded": "for=203.0.113.9;proto=https;by=" + "x" * 100},
        {"X-Forwarded-For": "unknown"},
        {"X-Forwarded-For": "not an address, 203.0.113.9:99999"},
        {"X-Forwarded-For": ", , ,"},
        {"X-Forwarded-For": "[::1"},
        {"X-Forwarded-For": "fe80::1%eth0"},
        {"X-Forwarded-For": "203.0.113.9\u00e9"},
        {"X-Forwarded-For": ",".join(["203.0.113.9"] * 500)},
        {"X-Forwarded-Proto": "https, , gopher"},
    ],
)
def test_malformed_proxy_headers_never_fail(
    make_app: Make, store: KeyStore, value: dict[str, str]
) -> None:
    """A malformed, obfuscated or unknown hop is an unknown address: never a 500."""
    app = make_app(config(store, trusted_proxies=["10.0.0.0/8"], require_https=True))
    headers = key_from(store, CLIENT_NET)
    reply = app("GET", "/orders", {**headers, **value}, peer=PROXY)
    assert reply.status in (200, 403), reply.body
    if reply.status == 403:
        assert reply.json()["error"] in ("address_not_allowed", "https_required")


def test_an_unknown_client_address_satisfies_no_network(make_app: Make, store: KeyStore) -> None:
    app = make_app(config(store, trusted_proxies=["10.0.0.0/8"]))
    headers = key_from(store, "0.0.0.0/0", "::/0")
    reply = app("GET", "/orders", {**headers, "Forwarded": "for=_hidden"}, peer=PROXY)
    assert reply.status == 403
    assert reply.json()["error"] == "address_not_allowed"


def test_both_header_kinds_at_once_are_believed_in_neither(make_app: Make, store: KeyStore) -> None:
    """A proxy that writes X-Forwarded-For passes a client's Forwarded on untouched
    (and the reverse): with both present, neither says who the client is."""
    app = make_app(config(store, trusted_proxies=["10.0.0.0/8"]))
    headers = key_from(store, CLIENT_NET)
    both = {**headers, "X-Forwarded-For": "203.0.113.9", "Forwarded": "for=203.0.113.9"}
    assert app("GET", "/orders", both, peer=PROXY).status == 403
    only = make_app(config(store, trusted_proxies=["10.0.0.0/8"], proxy_headers="x-forwarded"))
    assert only("GET", "/orders", both, peer=PROXY).status == 200


# -- require_https -------------------------------------------------------------------------


def test_plain_http_is_refused_before_the_credential_is_looked_at(
    make_app: Make, store: KeyStore
) -> None:
    app = make_app(config(store, require_https=True))
    for headers in ({}, {"X-API-Key": "m2m_not-even-well-formed"}, key_from(store)):
        reply = app("GET", "/orders", headers)
        assert reply.status == 403, reply.body
        body = reply.json()
        assert body["error"] == "https_required"
        assert body["status"] == 403
        assert "m2m_" not in reply.body.decode()  # nothing of the credential echoed
        assert_problem_headers(reply)
        assert "Strict-Transport-Security" not in reply.headers  # not over plain HTTP


def test_https_is_let_through(make_app: Make, store: KeyStore) -> None:
    app = make_app(config(store, require_https=True))
    assert app("GET", "/orders", key_from(store), https=True).status == 200


def test_public_paths_stay_reachable_over_plain_http(make_app: Make, store: KeyStore) -> None:
    """A load balancer's health check: no credential travels, nothing to protect."""
    app = make_app(config(store, require_https=True))
    assert app("GET", "/health").status == 200


@pytest.mark.parametrize(
    "proto",
    [
        {"X-Forwarded-Proto": "https"},
        {"Forwarded": "for=203.0.113.9;proto=https"},
        {"Forwarded": 'for="203.0.113.9";proto="https"'},
    ],
)
def test_a_trusted_proxy_reports_https(
    make_app: Make, store: KeyStore, proto: dict[str, str]
) -> None:
    app = make_app(config(store, require_https=True, trusted_proxies=["10.0.0.0/8"]))
    headers = key_from(store)
    assert app("GET", "/orders", {**headers, **proto}, peer=PROXY).status == 200
    # The same header from a client outside the trusted networks: plain HTTP.
    reply = app("GET", "/orders", {**headers, **proto}, peer="198.51.100.66")
    assert reply.status == 403
    assert reply.json()["error"] == "https_required"


def test_a_trusted_proxy_reporting_http_is_believed_too(make_app: Make, store: KeyStore) -> None:
    """TLS between the proxy and us does not make the client's own hop secure."""
    app = make_app(config(store, require_https=True, trusted_proxies=["10.0.0.0/8"]))
    headers = {**key_from(store), "X-Forwarded-Proto": "http"}
    assert app("GET", "/orders", headers, peer=PROXY, https=True).status == 403


def test_the_audit_records_a_credential_sent_in_clear(
    make_app: Make, store: KeyStore, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(config(store, require_https=True))
    headers = key_from(store)
    with caplog.at_level(logging.INFO, logger="m2m_middleware.audit"):
        app("GET", "/orders", headers)
        app("GET", "/orders")
    records = [r for r in caplog.records if r.name == "m2m_middleware.audit"]
    assert [r.__dict__.get("m2m_error") for r in records] == ["https_required"] * 2
    assert records[0].__dict__["m2m_credential_in_clear"] is True
    assert "m2m_credential_in_clear" not in records[1].__dict__  # nothing was sent
    secret = headers["X-API-Key"]
    assert all(secret not in r.getMessage() for r in records)
    assert all(secret not in repr(r.__dict__) for r in records)


# -- hsts_seconds ---------------------------------------------------------------------------


def test_hsts_on_https_responses_allowed_and_denied(make_app: Make, store: KeyStore) -> None:
    app = make_app(config(store, hsts_seconds=31536000))
    hsts = "max-age=31536000"
    headers = key_from(store)
    assert app("GET", "/orders", headers, https=True).headers["Strict-Transport-Security"] == hsts
    denied = app("GET", "/orders", https=True)
    assert denied.status == 401
    assert denied.headers["Strict-Transport-Security"] == hsts
    assert app("GET", "/health", https=True).headers["Strict-Transport-Security"] == hsts
    # A view's own refusal (require_scopes) of an admitted request gets it too.
    scoped = app("GET", "/scoped", headers, https=True)
    assert scoped.status == 403
    assert scoped.headers["Strict-Transport-Security"] == hsts
    # Never over plain HTTP (RFC 6797 section 7.2).
    assert "Strict-Transport-Security" not in app("GET", "/orders", headers).headers


# -- problem responses ----------------------------------------------------------------------


def test_every_problem_response_is_not_cached_nor_sniffed(make_app: Make, store: KeyStore) -> None:
    app = make_app(config(store, default_limits="1/minute"))
    key = key_from(store)
    no_scope = {"X-API-Key": store.create_key("other").key}
    replies = {
        "missing_credentials": app("GET", "/orders"),
        "invalid_token": app("GET", "/orders", {"X-API-Key": "m2m_nope"}),
        "invalid_request": app("GET", "/orders", {**key, "Authorization": "Bearer x.y.z"}),
        "insufficient_scope": app("GET", "/orders", no_scope),
        "scoped_view": app("GET", "/scoped", key),  # the framework's require_scopes
    }
    app("GET", "/ping", key)
    replies["rate_limited"] = app("GET", "/ping", key)
    for name, reply in replies.items():
        assert reply.status >= 400, (name, reply.status)
        assert_problem_headers(reply)


def test_success_responses_are_left_to_the_app(make_app: Make, store: KeyStore) -> None:
    app = make_app(config(store))
    reply = app("GET", "/orders", key_from(store))
    assert reply.status == 200
    assert "X-Content-Type-Options" not in reply.headers
    assert reply.headers.get("Cache-Control") != "no-store"
