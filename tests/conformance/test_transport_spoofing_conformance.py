"""Proxy-header spoofing that got past the trusted-proxy walk, in all three frameworks.

Each case failed on the commit it was found on (an attacker's review of issue
13's transport work) and is fixed since; the docstrings keep the attack. The
setting throughout: one trusted proxy (10.0.0.5) that appends its hop to
whatever ``Forwarded`` / ``X-Forwarded-For`` the client sent, as RFC 7239
section 4 and nginx's ``$proxy_add_x_forwarded_for`` do, and a key that may be
used only from the client network 203.0.113.0/24 (or, below, from the internal
network the proxy sits in). The attacker's real address is outside both.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import pytest

from m2m_middleware import KeyStore, open_key_store

if TYPE_CHECKING:  # this folder's conftest; only a type here
    from conftest import Caller

PROXY = "10.0.0.5"
CLIENT_NET = "203.0.113.0/24"
#: What the trusted proxy appends for the attacker: an IPv6 address, which
#: RFC 7239 makes it quote (so does any hop with a port).
PROXY_HOP = 'for="[2001:db8:bad::1]:4711";proto=http'
Make = Callable[[Mapping[str, Any]], "Caller"]


@pytest.fixture
def store() -> KeyStore:
    return open_key_store("memory://")


def config(store: KeyStore, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "key_store": store,
        "rate_limit_storage": "memory://",
        "default_limits": "100/minute",
        "routes": [{"path": "/orders", "scopes": ["orders:read"]}],
        "trusted_proxies": ["10.0.0.0/8"],
    }
    values.update(overrides)
    return values


def key_from(store: KeyStore, *cidrs: str) -> dict[str, str]:
    issued = store.create_key("svc", scopes=["orders:read"], allowed_cidrs=list(cidrs))
    return {"X-API-Key": issued.key}


@pytest.mark.parametrize("joined", [True, False], ids=["one-line", "two-lines"])
def test_an_unclosed_quote_cannot_swallow_the_proxys_hop(
    make_app: Make, store: KeyStore, joined: bool
) -> None:
    """The client sends ``Forwarded: for=203.0.113.9;x="`` (a quote it never
    closes). The proxy appends ``, for="[2001:db8:bad::1]:4711"``; the client's
    open quote and the proxy's first quote then read as one quoted string, the
    proxy's address is left over as garbage, which the parser skipped, and the
    rightmost hop was the client's own: any address it liked."""
    app = make_app(config(store))
    headers = key_from(store, CLIENT_NET)
    forged = 'for=203.0.113.9;x="'
    sent: Any
    if joined:
        sent = {**headers, "Forwarded": f"{forged}, {PROXY_HOP}"}
    else:  # the proxy adds its own field line; the server joins them with ", "
        sent = [*headers.items(), ("Forwarded", forged), ("Forwarded", PROXY_HOP)]
    reply = app("GET", "/orders", sent, peer=PROXY)
    assert reply.status == 403, reply.body
    assert reply.json()["error"] == "address_not_allowed"


def test_an_unclosed_quote_cannot_claim_https(make_app: Make, store: KeyStore) -> None:
    """The same desync, carrying ``proto=https`` in the client's element: a plain-HTTP
    client got past ``require_https`` (and its key past its networks)."""
    app = make_app(config(store, require_https=True))
    headers = key_from(store, CLIENT_NET)
    forged = 'for=203.0.113.9;proto=https;x="'
    reply = app("GET", "/orders", {**headers, "Forwarded": f"{forged}, {PROXY_HOP}"}, peer=PROXY)
    assert reply.status == 403, reply.body
    assert reply.json()["error"] == "https_required"


def test_both_header_kinds_do_not_make_the_request_the_proxys_own(
    make_app: Make, store: KeyStore
) -> None:
    """With ``Forwarded`` and ``X-Forwarded-For`` both present ("auto"), neither was
    believed and the request was taken as the proxy's own: the client address
    was the proxy's, 10.0.0.5. A key kept to the internal network (where its
    callers and the proxy both live) then worked for anyone on the internet who
    added a ``Forwarded`` header of their own to the proxy's ``X-Forwarded-For``."""
    app = make_app(config(store))
    headers = key_from(store, "10.0.0.0/8")
    internal = {**headers, "X-Forwarded-For": "10.0.0.7"}  # an internal caller, via the proxy
    assert app("GET", "/orders", internal, peer=PROXY).status == 200
    outsider = {**headers, "X-Forwarded-For": "198.51.100.66", "Forwarded": "for=10.0.0.7"}
    reply = app("GET", "/orders", outsider, peer=PROXY)
    assert reply.status == 403, reply.body
    assert reply.json()["error"] == "address_not_allowed"


def test_both_header_kinds_do_not_take_the_proxys_tls_for_the_clients(
    make_app: Make, store: KeyStore
) -> None:
    """The same request over a proxy that speaks HTTPS to the app: the scheme was the
    proxy's socket's, so a plain-HTTP client passed ``require_https`` by adding a
    ``Forwarded`` header to the proxy's ``X-Forwarded-Proto: http``."""
    app = make_app(config(store, require_https=True))
    headers = key_from(store)
    sent = {
        **headers,
        "X-Forwarded-For": "203.0.113.9",
        "X-Forwarded-Proto": "http",
        "Forwarded": "for=203.0.113.9;proto=https",
    }
    reply = app("GET", "/orders", sent, peer=PROXY, https=True)
    assert reply.status == 403, reply.body
    assert reply.json()["error"] == "https_required"


def test_a_token_of_a_key_kept_to_its_networks_is_kept_to_them_too(
    make_app: Make, store: KeyStore
) -> None:
    """The token endpoint refuses a key from outside its ``allowed_cidrs``, but a token
    it issued from inside them worked from anywhere: one leaked token (a log line,
    a proxy's cache, a compromised internal host passing it on) undid the key's
    address restriction for the token's lifetime. The token is the key's
    credential in another form: the key's networks bind it too."""
    issued = store.create_key("svc", scopes=["orders:read"], allowed_cidrs=[CLIENT_NET])
    app = make_app(
        config(
            store,
            trusted_proxies=[],
            schemes=["api_key", "jwt"],
            token_endpoint="/oauth/token",
            token_issuer="https://issuer.example",
            signing_key_secret="spoofing tests' signing secret",
        )
    )
    basic = base64.b64encode(f"{issued.key_id}:{issued.key}".encode()).decode()
    form = {"Authorization": f"Basic {basic}", "Content-Type": "application/x-www-form-urlencoded"}
    got = app(
        "POST", "/oauth/token", form, body=b"grant_type=client_credentials", peer="203.0.113.9"
    )
    assert got.status == 200, got.body
    bearer = {"Authorization": f"Bearer {got.json()['access_token']}"}
    assert app("GET", "/orders", bearer, peer="203.0.113.9").status == 200
    for _ in range(2):  # the second from the cache: the check is still made
        reply = app("GET", "/orders", bearer, peer="198.51.100.66")
        assert reply.status == 403, reply.body
        assert reply.json()["error"] == "address_not_allowed"
