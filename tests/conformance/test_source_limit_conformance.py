"""``source_limits`` through all three adapters (issue 13 item 4).

A budget of failed authentications per client address: once an address has
spent it, its requests get 429 ``rate_limited`` with ``Retry-After`` before any
key lookup (the store is not asked), JWT verification or signature check. What
counts is a credential (or signature) that did not hold: a request with no
credential at all is not counted. Another address is not affected; the block
ends with its window; instances sharing Redis share the budget; the token
endpoint's ``invalid_client`` answers count too.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import pytest
from test_http_conformance import assert_problem

from m2m_middleware import KeyStore, open_key_store

if TYPE_CHECKING:  # this folder's conftest; only a type here
    from conftest import Caller

Make = Callable[[Mapping[str, Any]], "Caller"]
ORDERS_RULE = {"path": "/orders", "scopes": ["orders:read"]}
ATTACKER = "203.0.113.66"
OTHER = "198.51.100.7"
#: Well formed (the checksum holds), so each one is a store lookup, then unknown.
GUESS = "m2m_live_" + "A" * 32


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
        "source_limits": "3/minute",
    }
    values.update(overrides)
    return values


def good_key(store: KeyStore) -> dict[str, str]:
    return {"X-API-Key": store.create_key("svc", scopes=["orders:read"]).key}


def fail(app: Caller, peer: str, times: int) -> None:
    for n in range(times):
        reply = app("GET", "/orders", {"X-API-Key": f"m2m_not_a_key_{n}"}, peer=peer)
        assert_problem(reply, 401, "invalid_token")


def assert_source_limited(reply: Any) -> None:
    problem = assert_problem(reply, 429, "rate_limited")
    assert "failed authentications from this address" in problem["detail"]
    assert 1 <= int(reply.headers["Retry-After"]) <= 60


def test_after_its_budget_an_address_is_refused_before_any_lookup(
    make_app: Make, store: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app(config(store))
    key = good_key(store)
    fail(app, ATTACKER, 3)
    asked: list[str] = []
    monkeypatch.setattr(store, "find_by_hash", lambda key_hash: asked.append(key_hash))
    assert_source_limited(app("GET", "/orders", key, peer=ATTACKER))  # even a good key
    assert_source_limited(app("GET", "/orders", {"X-API-Key": "m2m_x"}, peer=ATTACKER))
    assert asked == []  # the store was not asked
    assert app("GET", "/health", peer=ATTACKER).status == 200  # public paths stay open


def test_a_good_key_from_another_address_is_unaffected(make_app: Make, store: KeyStore) -> None:
    app = make_app(config(store))
    key = good_key(store)
    fail(app, ATTACKER, 3)
    assert app("GET", "/orders", key, peer=OTHER).status == 200
    assert_source_limited(app("GET", "/orders", key, peer=ATTACKER))


def test_missing_credentials_and_good_keys_are_not_counted(make_app: Make, store: KeyStore) -> None:
    app = make_app(config(store))
    key = good_key(store)
    for _ in range(5):
        assert_problem(app("GET", "/orders", peer=ATTACKER), 401, "missing_credentials")
        assert app("GET", "/orders", key, peer=ATTACKER).status == 200
    fail(app, ATTACKER, 2)
    assert app("GET", "/orders", key, peer=ATTACKER).status == 200  # 2 of 3 spent
    fail(app, ATTACKER, 1)
    assert_source_limited(app("GET", "/orders", key, peer=ATTACKER))


def test_the_block_ends_with_its_window(make_app: Make, store: KeyStore) -> None:
    app = make_app(config(store))
    key = good_key(store)
    limits = app.engine().source_limits
    assert limits is not None
    now = [1_000_000.0]
    limits._clock = lambda: now[0]  # type: ignore[method-assign]
    fail(app, ATTACKER, 3)
    assert_source_limited(app("GET", "/orders", key, peer=ATTACKER))
    now[0] += 61
    assert app("GET", "/orders", key, peer=ATTACKER).status == 200
    fail(app, ATTACKER, 2)  # a new window: its budget is whole again
    assert app("GET", "/orders", key, peer=ATTACKER).status == 200


def test_a_bad_signature_counts_as_a_failure(make_app: Make, store: KeyStore) -> None:
    from test_signature_conformance import SIGNED_PING, Signer

    app = make_app(config(store, routes=[ORDERS_RULE, SIGNED_PING]))
    signer = Signer(store)
    for _ in range(3):
        reply = app("GET", "/ping", {"X-API-Key": signer.api_key}, peer=ATTACKER)
        assert_problem(reply, 401, "invalid_signature")
    assert_source_limited(app("GET", "/ping", signer.headers("GET", "/ping"), peer=ATTACKER))


def test_the_token_endpoint_s_invalid_client_counts(make_app: Make) -> None:
    from test_own_token_conformance import own_config

    store = open_key_store("memory://")
    app = make_app(own_config(store, source_limits="2/minute"))
    issued = store.create_key("billing", scopes=["orders:read"])
    form = b"grant_type=client_credentials"
    ctype = ("Content-Type", "application/x-www-form-urlencoded")

    def token_request(secret: str) -> Any:
        import base64

        basic = base64.b64encode(f"{issued.record.key_id}:{secret}".encode()).decode()
        headers = [ctype, ("Authorization", f"Basic {basic}")]
        return app("POST", "/oauth/token", headers, body=form, peer=ATTACKER)

    for _ in range(2):
        assert token_request("m2m_wrong").status == 401
    reply = token_request(issued.key)
    assert_source_limited(reply)
    assert app("GET", "/.well-known/jwks.json", peer=ATTACKER).status == 200  # public


@pytest.mark.redis
def test_two_engines_on_one_redis_share_the_budget(
    every_framework: dict[str, Make], redis_url: str, store: KeyStore
) -> None:
    shared = config(store, rate_limit_storage=redis_url)
    first, *others = (make(shared) for make in every_framework.values())
    key = good_key(store)
    # An address of its own: the counts live in the one Redis every run shares.
    peer = f"2001:db8::{random.randrange(1 << 16):x}:{random.randrange(1 << 16):x}"
    fail(first, peer, 3)
    assert_source_limited(first("GET", "/orders", key, peer=peer))
    for other in others:  # Starlette's on the async path (limits.aio over redis.asyncio)
        assert other("GET", "/orders", key, peer=peer).status == 200  # not told yet...
        fail(other, peer, 1)  # ...until its own next failure from there reads the count
        assert_source_limited(other("GET", "/orders", key, peer=peer))


def test_a_client_that_makes_its_address_unknown_still_has_a_budget(
    make_app: Make, store: KeyStore
) -> None:
    """Through a trusted proxy that writes X-Forwarded-For, a client that adds a
    Forwarded header of its own is an unknown address (no one can tell which
    header is the proxy's). Unknown addresses share one budget: before, they had
    none, and guessing keys that way was never limited."""
    app = make_app(config(store, trusted_proxies=["10.0.0.0/8"]))
    proxy = "10.0.0.5"
    for n in range(3):
        headers = {
            "X-API-Key": f"m2m_not_a_key_{n}",
            "X-Forwarded-For": f"203.0.113.{n + 10}",
            "Forwarded": f"for=198.51.100.{n + 10}",
        }
        assert_problem(app("GET", "/orders", headers, peer=proxy), 401, "invalid_token")
    unknown = {"X-API-Key": GUESS, "X-Forwarded-For": "203.0.113.99", "Forwarded": "for=x"}
    assert_source_limited(app("GET", "/orders", unknown, peer=proxy))
    # A client the proxy reports plainly keeps its own budget.
    key = good_key(store)
    assert app("GET", "/orders", {**key, "X-Forwarded-For": OTHER}, peer=proxy).status == 200
