"""Hostile input through all three adapters: paths and method spellings.

Route rules see exactly what the router routes: a path with a control
character is 400 before any rule, a rule's methods match in any case, and a
rule path matches with or without one trailing slash, below a prefix too.

``make_app`` (conftest.py) builds the same app in Starlette, Flask or Django;
tests/integration/test_hostile_paths_over_uvicorn.py sends the same kind of
requests as raw bytes to a real server.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest

from m2m_middleware import KeyStore, open_key_store

Maker = Callable[[Mapping[str, Any]], Any]
ORDERS_RULE = {"path": "/orders", "scopes": ["orders:read"]}


def config(store: KeyStore, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "key_store": store,
        "rate_limit_storage": "memory://",
        "default_limits": "1000/minute",
        "public_paths": ["/health"],
        "routes": [ORDERS_RULE, {"path": "/reports", "scopes": ["reports:read"]}],
        "key_cache_ttl": 30,
    }
    values.update(overrides)
    return values


@pytest.fixture
def store() -> KeyStore:
    return open_key_store("memory://")


def api_key(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


def assert_refused(reply: Any, status: int, error: str) -> None:
    assert reply.status == status, (reply.status, reply.body)
    assert reply.headers["Content-Type"] == "application/problem+json"
    assert reply.json()["error"] == error


def assert_clean_headers(reply: Any) -> None:
    """Every response header is one line of visible ASCII (and spaces): nothing injected."""
    for name, value in reply.headers.items:
        assert name.isascii() and name.isprintable() and " " not in name, name
        assert all(0x20 <= ord(c) <= 0x7E or c == "\t" for c in value), (name, value)
    assert "x-injected" not in reply.headers


# -- control characters in the path ------------------------------------------------

#: As a client sends them; every framework percent-decodes the path it routes on.
CONTROL_PATHS = [
    "/orders%0A",
    "/orders%0D",
    "/orders%0D%0A",
    "/orders%00",
    "/orders%09",
    "/orders%0B",
    "/orders%1B",
    "/orders%1F",
    "/orders%7F",
    "/orders%C2%85",  # U+0085 NEL, UTF-8 encoded
    "/orders%C2%9F",
    "/orders%0A/x",
    "/%0Aorders",
    "/ping%00",
    "/health%0A",  # public paths are refused too: the check comes first
    "/whoami%0D%0AX-Injected:%201",
]


@pytest.mark.parametrize("path", CONTROL_PATHS)
def test_a_path_with_a_control_character_is_400(
    make_app: Maker, store: KeyStore, path: str
) -> None:
    everything = store.create_key("acme", scopes=["orders:read", "reports:read"]).key
    app = make_app(config(store))
    for headers in (api_key(everything), None):
        reply = app.get(path, headers)
        assert_refused(reply, 400, "invalid_request")
        assert "WWW-Authenticate" not in reply.headers
        assert "RateLimit" not in reply.headers
        assert_clean_headers(reply)


@pytest.mark.parametrize("path", ["/orders%0A", "/orders%00", "/health%0D"])
def test_a_control_character_below_a_prefix_is_400(
    make_app: Maker, store: KeyStore, path: str
) -> None:
    key = store.create_key("acme", scopes=["orders:read"]).key
    app = make_app(config(store))
    assert app("GET", "/orders", api_key(key), prefix="/api").status == 200
    assert_refused(app("GET", path, api_key(key), prefix="/api"), 400, "invalid_request")


# -- method spellings --------------------------------------------------------------


@pytest.mark.parametrize("method", ["post", "Post", "pOsT"])
def test_a_rule_matches_the_method_however_the_client_spells_it(
    make_app: Maker, store: KeyStore, method: str
) -> None:
    rule = {"path": "/orders", "methods": ["POST"], "scopes": ["orders:write"]}
    key = store.create_key("acme", scopes=["orders:read"]).key
    app = make_app(config(store, routes=[rule]))
    reply = app(method, "/orders", api_key(key))
    assert_refused(reply, 403, "insufficient_scope")


@pytest.mark.parametrize("method", ["get", "head", "Get", "hEAD"])
def test_a_get_rule_guards_get_and_head_in_any_spelling(
    make_app: Maker, store: KeyStore, method: str
) -> None:
    rule = {"path": "/orders", "methods": ["GET"], "scopes": ["orders:read"]}
    key = store.create_key("acme").key
    app = make_app(config(store, routes=[rule]))
    assert app(method, "/orders", api_key(key)).status == 403


# -- trailing slashes and other spellings ----------------------------------------------


@pytest.mark.parametrize("prefix", ["", "/api"])
@pytest.mark.parametrize(
    "path",
    [
        "/orders/",  # Starlette redirects it to the view, Flask can route it (strict_slashes)
        "/orders%2F",  # the path every framework decodes is "/orders/"
        "/reports/",  # the view is written with the slash, the rule without
        "/reports",
    ],
)
def test_a_rule_matches_with_or_without_one_trailing_slash(
    make_app: Maker, store: KeyStore, path: str, prefix: str
) -> None:
    key = store.create_key("acme").key
    app = make_app(config(store))
    reply = app("GET", path, api_key(key), prefix=prefix)
    assert_refused(reply, 403, "insufficient_scope")


def test_the_slash_spelling_reaches_the_view_with_the_scope(
    make_app: Maker, store: KeyStore
) -> None:
    key = store.create_key("acme", scopes=["reports:read"]).key
    app = make_app(config(store))
    reply = app.get("/reports/", api_key(key))
    assert (reply.status, reply.body) == (200, b"reports")
    # and a rule written with the slash guards the view just the same
    app = make_app(config(store, routes=[{"path": "/reports/", "scopes": ["reports:read"]}]))
    assert app.get("/reports/", api_key(store.create_key("acme").key)).status == 403


@pytest.mark.parametrize(
    "path",
    [
        "/orders/.",
        "/orders/./",
        "/ORDERS",
        "/Orders",
        "/orders;x",
        "/orders%20",
        "/orders%E2%80%A8",  # U+2028: not a control character, and no view has it
        "/orders%85",  # invalid UTF-8
        "/x/../orders",
    ],
)
def test_no_other_spelling_reaches_the_guarded_view(
    make_app: Maker, store: KeyStore, path: str
) -> None:
    key = store.create_key("acme").key
    app = make_app(config(store))
    reply = app.get(path, api_key(key))
    # Either the rule applied, or no view answered: never the orders unguarded.
    assert reply.status in (400, 403, 404, 405, 307, 308), (path, reply.status, reply.body)
    assert b"orders" not in reply.body or reply.status != 200
