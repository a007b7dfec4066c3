"""Hostile input through all three adapters: paths, method spellings, audit lines, headers.

- Route rules see exactly what the router routes: a path with a control
  character is 400 before any rule, a rule's methods match in any case, and a
  rule path matches with or without one trailing slash, below a prefix too.
- Audit lines cannot be forged by a path or a token's claims.
- No configuration that passes validation, and no request, can put a CR/LF
  or a non-latin-1 character into a response header.

``make_app`` (conftest.py) builds the same app in Starlette, Flask or Django;
tests/integration/test_hostile_paths_over_uvicorn.py sends the same kind of
requests as raw bytes to a real server.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import jwt as pyjwt
import pytest

from m2m_middleware import ConfigError, KeyStore, open_key_store

Maker = Callable[[Mapping[str, Any]], Any]
AUDIT = "m2m_middleware.audit"
#: 64 ASCII bytes: an HMAC secret well above the 32-byte minimum.
SECRET = "hostile-input-conformance-" + "0123456789abcdef" * 2 + "ABCDEF"
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


# -- audit lines ---------------------------------------------------------------------


FORGED = " allowed GET /admin client=billing-service key=key_AAAAAAAAAAAA"
#: Path spellings that would start a line of their own in a plain log file.
LINE_BREAKERS = {
    "lf": "%0A",
    "cr": "%0D",
    "crlf": "%0D%0A",
    "nel": "%C2%85",
    "line-separator": "%E2%80%A8",
    "paragraph-separator": "%E2%80%A9",
    "vertical-tab": "%0B",
    "form-feed": "%0C",
    "file-separator": "%1C",
}


def audit_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == AUDIT]


def assert_one_line_each(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    records = [r for r in caplog.records if r.name == AUDIT]
    assert records
    for record in records:
        message = record.getMessage()
        fields = {k: v for k, v in vars(record).items() if k.startswith("m2m_")}
        for text in [message, *(v for v in fields.values() if isinstance(v, str))]:
            assert text.isprintable(), text  # no control character or line separator
            assert len(text.splitlines()) == 1, text
        # One record, one line: a plain handler writes exactly one.
        assert not message.startswith("allowed GET /admin")
    return records


@pytest.mark.parametrize("breaker", sorted(LINE_BREAKERS))
def test_a_path_cannot_forge_an_audit_line(
    make_app: Maker, store: KeyStore, caplog: pytest.LogCaptureFixture, breaker: str
) -> None:
    key = store.create_key("nobody").key
    app = make_app(config(store))
    caplog.set_level(logging.INFO, logger=AUDIT)
    encoded = LINE_BREAKERS[breaker] + FORGED.replace(" ", "%20")
    reply = app.get("/x" + encoded, api_key(key))
    assert reply.status in (400, 404)
    [record] = assert_one_line_each(caplog)
    # The path is there, escaped, on the one line of the record that names its outcome.
    message = record.getMessage()
    assert message.startswith(("denied GET /x\\", "allowed GET /x\\"))
    assert "\\x20allowed\\x20GET\\x20/admin\\x20client=billing-service" in message
    assert record.m2m_path == message.split(" ")[2]  # type: ignore[attr-defined]


def test_a_backslash_cannot_forge_an_escape(
    make_app: Maker, store: KeyStore, caplog: pytest.LogCaptureFixture
) -> None:
    # "\n" typed as two characters must not read like an escaped newline.
    key = store.create_key("nobody").key
    app = make_app(config(store))
    caplog.set_level(logging.INFO, logger=AUDIT)
    app.get("/x%5Cnadmin", api_key(key))  # backslash, n
    app.get("/x%0Aadmin", api_key(key))  # a real newline
    paths = [line.split(" ")[2] for line in audit_lines(caplog)]
    assert paths == ["/x\\\\nadmin", "/x\\nadmin"]


def hs256(**claims: Any) -> str:
    now = int(time.time())
    return pyjwt.encode({"iat": now, "exp": now + 600, **claims}, SECRET, algorithm="HS256")


def jwt_config(store: KeyStore, **overrides: Any) -> dict[str, Any]:
    return config(
        store, schemes=["api_key", "jwt"], jwt_keys=SECRET, jwt_algorithms=["HS256"], **overrides
    )


# Not a NUL: a client id holding one is refused (PostgreSQL text cannot hold it, and
# one such row failed every usage flush: tests/redteam/test_telemetry_findings.py).
CLAIM_BREAKERS = ["\n", "\r\n", "\x85", "\u2028", "\u2029", "\x1b[2J"]


@pytest.mark.parametrize("breaker", CLAIM_BREAKERS, ids=lambda b: f"U+{ord(b[0]):04X}")
@pytest.mark.parametrize("claim", ["sub", "client_id"])
def test_a_token_claim_cannot_forge_an_audit_line(
    make_app: Maker, store: KeyStore, caplog: pytest.LogCaptureFixture, breaker: str, claim: str
) -> None:
    app = make_app(jwt_config(store))
    caplog.set_level(logging.INFO, logger=AUDIT)
    forged = "svc" + breaker + FORGED.lstrip()
    token = hs256(**{claim: forged})
    reply = app.get("/whoami", {"Authorization": f"Bearer {token}"})
    assert reply.status == 200, reply.body
    assert reply.json()["client"]["client_id"] == forged  # the app sees the real value
    # and a denial of the same client names it escaped too
    app.get("/orders", {"Authorization": f"Bearer {token}"})
    allowed, denied = assert_one_line_each(caplog)
    assert allowed.getMessage().startswith("allowed GET /whoami client=svc\\")
    assert denied.getMessage().startswith("denied GET /orders status=403")
    assert allowed.m2m_client_id == denied.m2m_client_id != forged  # type: ignore[attr-defined]
    assert allowed.m2m_client_id.endswith(  # type: ignore[attr-defined]
        "allowed\\x20GET\\x20/admin\\x20client=billing-service\\x20key=key_AAAAAAAAAAAA"
    )


# -- headers: configuration ----------------------------------------------------------------


def build(make_app: Maker, values: Mapping[str, Any]) -> Any:
    """Build the app and send it one request: Django reads its settings on the first."""
    app = make_app(values)
    return app.get("/health")


BAD_CONFIG: dict[str, tuple[str, dict[str, Any]]] = {
    "realm-crlf": ("realm", {"realm": "api\r\nX-Injected: 1"}),
    "realm-lf": ("realm", {"realm": "api\n"}),
    "realm-non-latin-1": ("realm", {"realm": "\u0430pi"}),
    "realm-latin-1": ("realm", {"realm": "caf\u00e9"}),
    "realm-nul": ("realm", {"realm": "api\x00"}),
    "tier-crlf": ("tiers", {"tiers": {"gold\r\nX-Injected: 1": "5/minute"}}),
    "tier-non-latin-1": ("tiers", {"tiers": {"gold\u2603": "5/minute"}}),
    "tier-quote": ("tiers", {"tiers": {'gold"': "5/minute"}}),
    "tier-backslash": ("tiers", {"tiers": {"gold\\": "5/minute"}}),
    "tier-empty": ("tiers", {"tiers": {"": "5/minute"}}),
    "scope-crlf": (
        "routes[0].scopes",
        {"routes": [{"path": "/orders", "scopes": ["orders:read\r\nX-Injected: 1"]}]},
    ),
    "scope-non-latin-1": (
        "routes[1].scopes",
        {"routes": [ORDERS_RULE, {"path": "/x", "scopes": ["r\u00e9ad"]}]},
    ),
    "scope-space": ("routes[0].scopes", {"routes": [{"path": "/x", "scopes": "a b"}]}),
    "scope-quote": ("routes[0].scopes", {"routes": [{"path": "/x", "scopes": ['a"']}]}),
    "scope-backslash": ("routes[0].scopes", {"routes": [{"path": "/x", "scopes": ["a\\"]}]}),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIG))
def test_configuration_that_would_break_a_header_is_refused(
    make_app: Maker, store: KeyStore, case: str
) -> None:
    field, overrides = BAD_CONFIG[case]
    with pytest.raises(ConfigError) as caught:
        build(make_app, config(store, **overrides))
    assert caught.value.field == field
    assert "\n" not in str(caught.value) and "\r" not in str(caught.value)


GOOD_CONFIG: dict[str, dict[str, Any]] = {
    "realm": {"realm": "orders api (v2) <prod>"},
    "tier": {"tiers": {"gold plus/v2 {eu}": "5/minute"}},
    "scope": {"routes": [{"path": "/orders", "scopes": ["orders:read", "https://x.example/a#b"]}]},
}


@pytest.mark.parametrize("case", sorted(GOOD_CONFIG))
def test_the_widest_accepted_values_give_well_formed_headers(
    make_app: Maker, store: KeyStore, case: str
) -> None:
    app = make_app(config(store, **GOOD_CONFIG[case]))
    tier = next(iter(GOOD_CONFIG[case].get("tiers", {None: None})))
    key = store.create_key("acme", tier=tier).key
    replies = [app.get("/orders"), app.get("/orders", api_key(key)), app.get("/ping", api_key(key))]
    assert [r.status for r in replies] == [401, 403, 200]
    for reply in replies:
        assert_clean_headers(reply)
    if tier is not None:
        assert f'"tier.{tier}-60s";q=5;w=60' == replies[2].headers["RateLimit-Policy"]


# -- headers: requests -------------------------------------------------------------------


def test_no_request_can_put_anything_into_a_response_header(
    make_app: Maker, store: KeyStore
) -> None:
    """Claims, paths and credentials an attacker controls never reach a header raw."""
    app = make_app(jwt_config(store, jwt_tier_claim="tier", tiers={"gold": "5/minute"}))
    hostile = "x\r\nX-Injected: 1\u2028\u00e9\u2603\x00"
    tokens = [
        hs256(sub=hostile),
        hs256(sub="svc", tier=hostile),
        hs256(sub="svc", tier="gold", scope=hostile),
        hs256(sub="svc", scp=[hostile]),
        hs256(sub="svc", tier=["gold"]),  # not a string: 401
    ]
    replies = [app.get("/ping", {"Authorization": f"Bearer {t}"}) for t in tokens]
    replies += [app.get("/orders", {"Authorization": f"Bearer {t}"}) for t in tokens]
    replies += [app.get(p) for p in ("/orders%0D%0AX-Injected:%201", "/%E2%98%83", "/x%C3%A9")]
    replies += [app.get("/orders", api_key("m2m_\u00e9\u00ff"))]
    statuses = sorted({r.status for r in replies})
    assert statuses == [200, 400, 401, 403], statuses
    for reply in replies:
        assert_clean_headers(reply)
