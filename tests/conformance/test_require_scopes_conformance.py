"""``require_scopes`` in Starlette, Flask and Django: one answer, the contract's.

Each framework's own decorator guards ``/scoped`` (a sync view) and
``/scoped-async`` (an async one) in the apps of conftest.py. A refusal is the
problem+json 403 ``insufficient_scope`` of the contract (or 401
``missing_credentials`` where no client is attached), byte for byte the same
in the three frameworks; and a scope that could never be granted is refused
when the view is decorated, in all three.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from test_http_conformance import Maker, api_key, assert_problem, config

from m2m_middleware import ConfigError, KeyStore, open_key_store
from m2m_middleware.django import require_scopes as django_require_scopes
from m2m_middleware.flask import require_scopes as flask_require_scopes
from m2m_middleware.starlette import require_scopes as starlette_require_scopes

VIEWS = ["/scoped", "/scoped-async"]
#: The challenge a refusal of SCOPED_VIEW_SCOPES carries: every scope, sorted, as a route rule's.
INSUFFICIENT = (
    'Bearer realm="api", error="insufficient_scope", '
    'error_description="this view needs the scope(s): orders:read reports:read", '
    'scope="orders:read reports:read"'
)


@pytest.fixture
def store() -> KeyStore:
    return open_key_store("memory://")


@pytest.mark.parametrize("view", VIEWS)
def test_a_missing_scope_is_the_contracts_403(make_app: Maker, store: KeyStore, view: str) -> None:
    key = store.create_key("acme", scopes=["orders:read", "other"]).key
    app = make_app(config(store))
    reply = app.get(view, api_key(key))
    problem = assert_problem(reply, 403, "insufficient_scope", secrets=(key,))
    assert problem["scope"] == "orders:read reports:read"
    assert problem["type"].endswith("#error-insufficient_scope")
    assert reply.headers["WWW-Authenticate"] == INSUFFICIENT
    # The request was admitted and charged before the view refused it: its limits show.
    assert reply.headers["RateLimit-Policy"] == '"default-60s";q=100;w=60'


@pytest.mark.parametrize("view", VIEWS)
def test_every_scope_lets_the_client_through(make_app: Maker, store: KeyStore, view: str) -> None:
    key = store.create_key("acme", scopes=["reports:read", "orders:read", "x"]).key
    app = make_app(config(store))
    reply = app.get(view, api_key(key))
    assert reply.status == 200, reply.body
    assert reply.json()["client"]["client_id"] == "acme"


@pytest.mark.parametrize("view", VIEWS)
def test_no_client_on_a_public_path_is_401_missing_credentials(
    make_app: Maker, store: KeyStore, view: str
) -> None:
    app = make_app(config(store, public_paths=["/health", "/scoped*"]))
    reply = app.get(view)
    assert_problem(reply, 401, "missing_credentials")
    assert reply.headers["WWW-Authenticate"] == 'Bearer realm="api"'


def test_the_answer_names_the_configured_realm(make_app: Maker, store: KeyStore) -> None:
    key = store.create_key("acme").key
    app = make_app(config(store, realm="billing"))
    reply = app.get("/scoped", api_key(key))
    assert reply.headers["WWW-Authenticate"].startswith('Bearer realm="billing", ')


# -- one answer in three frameworks ---------------------------------------------------

#: Headers a framework or server may add on its own; everything else must match.
_FRAMEWORK_NOISE = {"date", "server", "content-length"}
Config = Callable[[KeyStore], Mapping[str, Any]]
Credentials = Callable[[KeyStore, tuple[str, ...]], dict[str, str]]


def _answer(reply: Any) -> dict[str, Any]:
    headers: dict[str, str] = {}
    for name, value in reply.headers.items:
        if name in _FRAMEWORK_NOISE:
            continue
        if name == "ratelimit":  # seconds left in a window each app opened a moment apart
            value = re.sub(r";t=\d+", ";t=T", value)
        assert name not in headers, f"{name} sent twice"
        headers[name] = value
    return {"status": reply.status, "headers": headers, "body": reply.body}


def _key(store: KeyStore, *scopes: str) -> dict[str, str]:
    return api_key(store.create_key("acme", scopes=list(scopes)).key)


CASES = [
    pytest.param(config, lambda s, needed: _key(s, "orders:read"), id="missing-scope"),
    pytest.param(config, lambda s, needed: _key(s), id="no-scope-at-all"),
    pytest.param(
        lambda s: config(s, public_paths=["/scoped*"]), lambda s, needed: {}, id="public-path"
    ),
    pytest.param(config, lambda s, needed: _key(s, *needed), id="admitted"),
]


@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize(("config_of", "credentials"), CASES)
def test_starlette_flask_and_django_give_the_same_answer(
    every_framework: dict[str, Maker],
    scoped_view_scopes: tuple[str, ...],
    view: str,
    config_of: Config,
    credentials: Credentials,
) -> None:
    answers = {}
    for framework, build in every_framework.items():
        store = open_key_store("memory://")  # the same keys and fresh counters for each
        headers = credentials(store, scoped_view_scopes)
        answers[framework] = _answer(build(config_of(store))("GET", view, headers))
    starlette = answers["starlette"]
    if starlette["status"] == 200:
        clients = {name: json.loads(answer["body"])["client"] for name, answer in answers.items()}
        for client in clients.values():
            assert client.pop("key_id").startswith("key_")  # each app has a key of its own
        assert clients["flask"] == clients["django"] == clients["starlette"]
        assert clients["starlette"]["client_id"] == "acme"
        return
    assert starlette["status"] in (401, 403)
    assert starlette["headers"]["content-type"] == "application/problem+json"
    assert answers["flask"] == starlette
    assert answers["django"] == starlette


# -- scopes that could never be granted are refused when the view is decorated -------

DECORATORS = {
    "starlette": starlette_require_scopes,
    "flask": flask_require_scopes,
    "django": django_require_scopes,
}

HOSTILE_SCOPES = [
    pytest.param("orders read", id="space"),
    pytest.param("", id="empty"),
    pytest.param('orders"read', id="quote"),
    pytest.param("orders\\read", id="backslash"),
    pytest.param("orders\tread", id="tab"),
    pytest.param("orders:read\r\nX-Injected: 1", id="crlf"),
    pytest.param("orders\x00", id="nul"),
    pytest.param("\x7f", id="del"),
    pytest.param("café", id="non-ascii"),
    pytest.param("orders\u2028read", id="unicode-line-separator"),
    pytest.param(" orders:read", id="leading-space"),
]


@pytest.mark.parametrize("framework", sorted(DECORATORS))
@pytest.mark.parametrize("scope", HOSTILE_SCOPES)
def test_a_scope_that_is_not_a_scope_token_is_refused_at_decoration(
    framework: str, scope: str
) -> None:
    require_scopes = DECORATORS[framework]
    with pytest.raises(ConfigError) as raised:
        require_scopes("orders:write", scope)
    message = str(raised.value)
    assert message.startswith("require_scopes: ")
    assert ascii(scope) in message  # escaped: no raw control character reaches a log
    assert "RFC 6749" in message
    assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in message)


@pytest.mark.parametrize("framework", sorted(DECORATORS))
def test_scopes_written_as_one_string_get_a_hint(framework: str) -> None:
    with pytest.raises(ConfigError, match=r'require_scopes\("orders:read", "orders:write"\)'):
        DECORATORS[framework]("orders:read orders:write")


@pytest.mark.parametrize("framework", sorted(DECORATORS))
def test_the_decorator_without_parentheses_is_refused(framework: str) -> None:
    def view() -> None:  # pragma: no cover - never called
        pass

    with pytest.raises(ConfigError, match=r"with parentheses"):
        DECORATORS[framework](view)  # type: ignore[arg-type]


@pytest.mark.parametrize("framework", sorted(DECORATORS))
def test_a_list_of_scopes_is_refused_with_the_spelling_that_works(framework: str) -> None:
    with pytest.raises(ConfigError, match=r"an argument of its own"):
        DECORATORS[framework](["orders:read", "orders:write"])  # type: ignore[arg-type]


@pytest.mark.parametrize("framework", sorted(DECORATORS))
def test_every_printable_scope_token_is_accepted(framework: str) -> None:
    every = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"\\')
    DECORATORS[framework]("orders:read", every, "https://api.example.com/orders.read")
