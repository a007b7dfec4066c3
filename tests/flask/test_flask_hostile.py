"""Flask specifics of hostile input: ``strict_slashes=False`` views, ``require_scopes`` arguments.

The HTTP cases shared by every adapter are in
tests/conformance/test_hostile_input_conformance.py.
"""

from __future__ import annotations

from typing import Any

import flask
import pytest

from m2m_middleware import ConfigError, KeyStore, Settings, open_key_store
from m2m_middleware.flask import M2MAuth, require_scopes


@pytest.fixture
def store() -> KeyStore:
    return open_key_store("memory://")


def app_with(store: KeyStore, rules: list[dict[str, Any]]) -> flask.Flask:
    app = flask.Flask(__name__)
    M2MAuth(app, settings=Settings(key_store=store, routes=rules, rate_limit_storage="memory://"))

    @app.get("/orders", strict_slashes=False)
    def orders() -> Any:
        return {"view": "orders"}

    @app.get("/reports/", strict_slashes=False)
    def reports() -> Any:
        return {"view": "reports"}

    @app.route("/items/<int:item>", methods=["POST"])
    def item(item: int) -> Any:
        return {"view": "item", "method": flask.request.method}

    return app


@pytest.mark.parametrize(
    ("rule", "path"),
    [
        ("/orders", "/orders/"),  # strict_slashes=False: the view answers both
        ("/reports/", "/reports"),
        ("/reports/*", "/reports"),
    ],
)
def test_a_rule_guards_both_spellings_a_strict_slashes_false_view_answers(
    store: KeyStore, rule: str, path: str
) -> None:
    key = store.create_key("acme").key
    client = app_with(store, [{"path": rule, "scopes": ["x:read"]}]).test_client()
    response = client.get(path, headers={"X-API-Key": key})
    assert response.status_code == 403, response.get_json()
    # Control: with the scope, the same request reaches the view (no redirect).
    allowed = store.create_key("acme", scopes=["x:read"]).key
    response = client.get(path, headers={"X-API-Key": allowed})
    assert response.status_code == 200, response.status_code


@pytest.mark.parametrize("method", ["post", "Post"])
def test_a_lower_case_method_reaches_the_post_view_only_through_the_rule(
    store: KeyStore, method: str
) -> None:
    rule = {"path": "/items/*", "methods": ["POST"], "scopes": ["items:write"]}
    app = app_with(store, [rule])
    client = app.test_client()
    key = store.create_key("acme").key
    assert client.open("/items/7", method=method, headers={"X-API-Key": key}).status_code == 403
    writer = store.create_key("acme", scopes=["items:write"]).key
    response = client.open("/items/7", method=method, headers={"X-API-Key": writer})
    assert response.get_json() == {"view": "item", "method": "POST"}


@pytest.mark.parametrize(
    "scopes",
    [
        ("orders:read\r\nX-Injected: 1",),
        ("orders read",),
        ('orders"read',),
        ("orders\\read",),
        ("r\u00e9ad",),
        ("ok", ""),
        (["orders:read"],),  # a list where a string belongs
    ],
    ids=repr,
)
def test_require_scopes_refuses_a_bad_scope_when_it_decorates(scopes: tuple[Any, ...]) -> None:
    with pytest.raises(ConfigError) as caught:
        require_scopes(*scopes)
    assert caught.value.field == "require_scopes"
    assert "\n" not in str(caught.value)


def test_require_scopes_accepts_every_scope_token() -> None:
    # RFC 6749 section 3.3: every visible ASCII character but the quote and the backslash.
    every = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"\\')
    require_scopes(every, "orders:read", "https://api.example/orders#read")
