"""The token service's answers, identical in Starlette, Flask and Django (issue 12).

``POST <token_endpoint>`` (RFC 6749 4.4, errors per 5.2), the JWKS and the RFC
8414 metadata, each case run through every adapter by ``make_app`` (see
conftest.py). The tokens it issues are checked with PyJWT given only the
published JWKS, against RFC 9068, for each signing algorithm.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import jwt as pyjwt
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from m2m_middleware import KeyStore, Settings, StoreUnavailable, open_key_store
from m2m_middleware import keys as keyformat
from m2m_middleware.keys import DEFAULT_PREFIX
from m2m_middleware.starlette import M2MMiddleware
from m2m_middleware.stores import MemoryKeyStore
from m2m_middleware.stores.base import IssuedKey

TOKEN_PATH = "/oauth/token"
JWKS_PATH = "/.well-known/jwks.json"
METADATA_PATH = "/.well-known/oauth-authorization-server"
ISSUER = "https://issuer.example"
AUDIENCE = "https://api.example"
SECRET = "conformance tests' signing secret"
TTL = 240
MAX_AGE = 90
KEY_SCOPES = ("orders:read", "reports:read")
ROUTES = [
    {"path": "/orders", "scopes": ["orders:read"]},
    {"path": "/reports/*", "scopes": ["reports:read"]},
    {"path": "/admin/*", "scopes": ["admin"]},
]
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
GRANT = {"grant_type": "client_credentials"}
PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}
ALGORITHMS = ("ES256", "EdDSA", "RS256")

App = Callable[[Mapping[str, Any]], Any]


def config(store: KeyStore, **overrides: Any) -> dict[str, Any]:
    """Fresh settings with the token service on: its own store, its own counters."""
    values: dict[str, Any] = {
        "key_store": store,
        "rate_limit_storage": "memory://",
        "default_limits": "100/minute",
        "tiers": {"gold": "200/minute"},
        "public_paths": ["/health"],
        "routes": ROUTES,
        "key_cache_ttl": 30,
        "token_endpoint": TOKEN_PATH,
        "token_issuer": ISSUER,
        "token_audience": AUDIENCE,
        "token_limits": "100/minute",
        "token_ttl": TTL,
        "jwks_max_age": MAX_AGE,
        "signing_key_secret": SECRET,
    }
    values.update(overrides)
    return values


@pytest.fixture
def store() -> KeyStore:
    return open_key_store("memory://")


@pytest.fixture
def issued(store: KeyStore) -> IssuedKey:
    return store.create_key("svc-orders", scopes=KEY_SCOPES, tier="gold")


def basic(client_id: str, secret: str) -> dict[str, str]:
    pair = f"{quote(client_id, safe='')}:{quote(secret, safe='')}".encode()
    return {"Authorization": "Basic " + base64.b64encode(pair).decode("ascii")}


def form(**fields: str) -> bytes:
    return urlencode(fields).encode("ascii")


def with_basic(issued: IssuedKey, **fields: str) -> tuple[bytes, dict[str, str]]:
    return form(**GRANT, **fields), {**FORM, **basic(issued.record.key_id, issued.key)}


def with_post(issued: IssuedKey, **fields: str) -> tuple[bytes, dict[str, str]]:
    credentials = {"client_id": issued.record.key_id, "client_secret": issued.key}
    return form(**GRANT, **credentials, **fields), dict(FORM)


def fetch(app: Any, issued: IssuedKey, *, how: str = "basic", **fields: str) -> Any:
    body, headers = (with_basic if how == "basic" else with_post)(issued, **fields)
    return app.post(TOKEN_PATH, body, headers)


def never_a_crash(reply: Any) -> None:
    assert reply.status < 500, (reply.status, reply.body[:300])
    assert b"Traceback" not in reply.body


def assert_oauth_error(reply: Any, status: int, error: str) -> dict[str, Any]:
    """An RFC 6749 5.2 error: its status, JSON ``error`` + ``error_description``, no-store."""
    assert reply.status == status, (reply.status, reply.body)
    assert reply.headers["Content-Type"].startswith("application/json")
    assert reply.headers["Cache-Control"] == "no-store"
    body = reply.json()
    assert body["error"] == error, body
    assert isinstance(body.get("error_description"), str)
    assert set(body) <= {"error", "error_description", "error_uri"}
    return dict(body)


def assert_invalid_client(reply: Any) -> None:
    assert_oauth_error(reply, 401, "invalid_client")
    assert reply.headers["WWW-Authenticate"].startswith("Basic ")


def public_jwks(app: Any) -> dict[str, Any]:
    reply = app.get(JWKS_PATH)
    assert reply.status == 200, reply.body
    return dict(reply.json())


def verified(token: str, jwks: dict[str, Any]) -> dict[str, Any]:
    """PyJWT's verdict on ``token`` given nothing but the published JWKS."""
    header = pyjwt.get_unverified_header(token)
    keys = {key.key_id: key for key in pyjwt.PyJWKSet.from_dict(jwks).keys}
    assert header["kid"] in keys, "the token's kid names no published key"
    key = keys[header["kid"]]
    claims: dict[str, Any] = pyjwt.decode(
        token,
        key=key,
        algorithms=[header["alg"]],
        audience=AUDIENCE,
        issuer=ISSUER,
        options={"require": ["iss", "sub", "aud", "exp", "iat", "jti", "client_id"]},
    )
    return claims


# -- success ----------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["basic", "post"])
def test_a_key_gets_an_access_token(
    make_app: App, store: KeyStore, issued: IssuedKey, how: str
) -> None:
    app = make_app(config(store))
    reply = fetch(app, issued, how=how)
    assert reply.status == 200, reply.body
    assert reply.headers["Content-Type"].split(";")[0] == "application/json"
    assert reply.headers["Cache-Control"] == "no-store"
    body = reply.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "scope"}
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == TTL
    assert sorted(body["scope"].split(" ")) == sorted(KEY_SCOPES)
    assert issued.key not in reply.body.decode()


@pytest.mark.parametrize(
    "content_type",
    [
        "application/x-www-form-urlencoded;charset=UTF-8",  # what authlib's clients send
        "Application/X-WWW-Form-Urlencoded ; charset=utf-8",
    ],
)
def test_the_form_type_may_carry_a_charset(
    make_app: App, store: KeyStore, issued: IssuedKey, content_type: str
) -> None:
    headers = {"Content-Type": content_type, **basic(issued.record.key_id, issued.key)}
    reply = make_app(config(store)).post(TOKEN_PATH, form(**GRANT), headers)
    assert reply.status == 200, reply.body


def test_scope_narrows_the_token(make_app: App, store: KeyStore, issued: IssuedKey) -> None:
    app = make_app(config(store))
    reply = fetch(app, issued, scope="orders:read")
    assert reply.status == 200, reply.body
    assert reply.json()["scope"] == "orders:read"
    claims = verified(reply.json()["access_token"], public_jwks(app))
    assert claims["scope"] == "orders:read"


def test_a_key_without_scopes_gets_an_empty_scope(make_app: App, store: KeyStore) -> None:
    bare = store.create_key("svc-bare")
    reply = fetch(make_app(config(store)), bare)
    assert reply.status == 200, reply.body
    assert reply.json()["scope"] == ""


# -- invalid_scope -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scope",
    [
        "admin",  # not held
        "orders:read admin",  # one of them not held
        'orders:"read',  # not a scope token (RFC 6749 3.3)
        "orders:read  reports:read",  # an empty scope token between two spaces
        "orders:read\treports:read",
        "orders:réad",
    ],
    ids=["not_held", "one_not_held", "quote", "double_space", "tab", "non_ascii"],
)
def test_a_scope_the_key_lacks_or_no_scope_at_all_is_invalid_scope(
    make_app: App, store: KeyStore, issued: IssuedKey, scope: str
) -> None:
    reply = fetch(make_app(config(store)), issued, scope=scope)
    assert_oauth_error(reply, 400, "invalid_scope")


# -- invalid_request -------------------------------------------------------------------------


def _requests(issued: IssuedKey) -> dict[str, tuple[str, bytes, dict[str, str]]]:
    key_id, key = issued.record.key_id, issued.key
    auth = basic(key_id, key)
    return {
        "missing_grant_type": (TOKEN_PATH, form(scope="orders:read"), {**FORM, **auth}),
        "empty_grant_type": (TOKEN_PATH, form(grant_type=""), {**FORM, **auth}),
        "repeated_grant_type": (
            TOKEN_PATH,
            b"grant_type=client_credentials&grant_type=client_credentials",
            {**FORM, **auth},
        ),
        "repeated_scope": (
            TOKEN_PATH,
            b"grant_type=client_credentials&scope=orders:read&scope=reports:read",
            {**FORM, **auth},
        ),
        "both_auth_methods": (
            TOKEN_PATH,
            form(**GRANT, client_id=key_id, client_secret=key),
            {**FORM, **auth},
        ),
        "json_body": (
            TOKEN_PATH,
            json.dumps(GRANT).encode(),
            {"Content-Type": "application/json", **auth},
        ),
        "text_plain": (TOKEN_PATH, form(**GRANT), {"Content-Type": "text/plain", **auth}),
        "multipart": (
            TOKEN_PATH,
            b'--x\r\nContent-Disposition: form-data; name="grant_type"\r\n\r\n'
            b"client_credentials\r\n--x--\r\n",
            {"Content-Type": "multipart/form-data; boundary=x", **auth},
        ),
        "non_utf8_body": (TOKEN_PATH, b"grant_type=client_credentials&scope=\xff\xfe", FORM),
        "secret_in_query": (
            f"{TOKEN_PATH}?client_secret={key}",
            form(**GRANT, client_id=key_id),
            dict(FORM),
        ),
        "secret_in_query_with_basic": (
            f"{TOKEN_PATH}?client_secret={key}",
            form(**GRANT),
            {**FORM, **auth},
        ),
    }


#: A key that only names the cases at collection time.
_PLACEHOLDER = open_key_store("memory://").create_key("placeholder")
REQUEST_CASES = sorted(_requests(_PLACEHOLDER))


@pytest.mark.parametrize("case", REQUEST_CASES)
def test_a_malformed_token_request_is_invalid_request(
    make_app: App, store: KeyStore, issued: IssuedKey, case: str
) -> None:
    path, body, headers = _requests(issued)[case]
    reply = make_app(config(store)).post(path, body, headers)
    body_text = assert_oauth_error(reply, 400, "invalid_request")
    assert issued.key not in json.dumps(body_text)


def test_an_oversize_token_request_is_413(
    make_app: App, store: KeyStore, issued: IssuedKey
) -> None:
    body, headers = with_basic(issued, scope="orders:read " * 2000)
    reply = make_app(config(store)).post(TOKEN_PATH, body, headers)
    assert_oauth_error(reply, 413, "invalid_request")


def test_too_many_form_fields_is_invalid_request(
    make_app: App, store: KeyStore, issued: IssuedKey
) -> None:
    fields = {f"x{i}": "1" for i in range(40)}
    body, headers = with_basic(issued, **fields)
    reply = make_app(config(store)).post(TOKEN_PATH, body, headers)
    assert_oauth_error(reply, 400, "invalid_request")


def test_unsupported_grant_type(make_app: App, store: KeyStore, issued: IssuedKey) -> None:
    app = make_app(config(store))
    for grant in ("password", "authorization_code", "refresh_token", "CLIENT_CREDENTIALS"):
        body = form(grant_type=grant)
        reply = app.post(TOKEN_PATH, body, {**FORM, **basic(issued.record.key_id, issued.key)})
        assert_oauth_error(reply, 400, "unsupported_grant_type")


# -- invalid_client -------------------------------------------------------------------------


def _a_key_nobody_issued() -> str:
    return keyformat.generate_key(DEFAULT_PREFIX)


@pytest.mark.parametrize(
    "case",
    [
        "no_credentials",
        "unknown_key_id",
        "wrong_secret",
        "secret_of_another_key",
        "key_id_of_another_key_in_form",
        "malformed_key",
        "basic_not_base64",
        "basic_no_colon",
        "basic_empty",
        "basic_no_secret",
        "bearer",
        "bearer_api_key",
        "client_id_without_secret",
        "secret_without_client_id",
        "a_token_as_secret",
    ],
)
def test_a_client_that_does_not_authenticate_is_invalid_client(
    make_app: App, store: KeyStore, issued: IssuedKey, case: str
) -> None:
    other = store.create_key("svc-other", scopes=KEY_SCOPES)
    key_id, key = issued.record.key_id, issued.key
    grant = form(**GRANT)
    app = make_app(config(store))
    token = fetch(app, other).json()["access_token"]
    headers: dict[str, str] = dict(FORM)
    body = grant
    if case == "unknown_key_id":
        headers.update(basic("k_" + "0" * 20, key))
    elif case == "wrong_secret":
        headers.update(basic(key_id, _a_key_nobody_issued()))
    elif case == "secret_of_another_key":
        headers.update(basic(key_id, other.key))
    elif case == "key_id_of_another_key_in_form":
        body = form(**GRANT, client_id=other.record.key_id, client_secret=key)
    elif case == "malformed_key":
        headers.update(basic(key_id, key[:-1] + ("A" if key[-1] != "A" else "B")))
    elif case == "basic_not_base64":
        headers["Authorization"] = "Basic %%%not-base64%%%"
    elif case == "basic_no_colon":
        headers["Authorization"] = "Basic " + base64.b64encode(key.encode()).decode()
    elif case == "basic_empty":
        headers["Authorization"] = "Basic"
    elif case == "basic_no_secret":
        headers["Authorization"] = "Basic " + base64.b64encode(f"{key_id}:".encode()).decode()
    elif case == "bearer":
        headers["Authorization"] = f"Bearer {token}"
    elif case == "bearer_api_key":
        headers["Authorization"] = f"Bearer {key}"
    elif case == "client_id_without_secret":
        body = form(**GRANT, client_id=key_id)
    elif case == "secret_without_client_id":
        body = form(**GRANT, client_secret=key)
    elif case == "a_token_as_secret":
        headers.update(basic(other.record.key_id, token))
    reply = app.post(TOKEN_PATH, body, headers)
    assert_invalid_client(reply)
    assert key not in reply.body.decode()
    assert "access_token" not in reply.json()


@pytest.mark.parametrize("how", ["basic", "post"])
def test_a_revoked_key_is_invalid_client(make_app: App, store: KeyStore, how: str) -> None:
    issued = store.create_key("svc-revoked", scopes=KEY_SCOPES)
    app = make_app(config(store, key_cache_ttl=3600))
    assert fetch(app, issued, how=how).status == 200
    store.revoke_key(issued.record.key_id)
    assert_invalid_client(fetch(app, issued, how=how))


def test_a_key_revoked_before_the_app_started_is_invalid_client(
    make_app: App, store: KeyStore
) -> None:
    issued = store.create_key("svc-revoked", scopes=KEY_SCOPES)
    store.revoke_key(issued.record.key_id)
    assert_invalid_client(fetch(make_app(config(store)), issued))


@pytest.mark.parametrize("how", ["basic", "post"])
def test_an_expired_key_is_invalid_client(make_app: App, store: KeyStore, how: str) -> None:
    past = datetime.now(timezone.utc) - timedelta(seconds=5)
    issued = store.create_key("svc-expired", scopes=KEY_SCOPES, expires_at=past)
    assert_invalid_client(fetch(make_app(config(store)), issued, how=how))


def test_a_rotated_key_keeps_working_through_its_grace(make_app: App, store: KeyStore) -> None:
    old = store.create_key("svc-rotating", scopes=KEY_SCOPES)
    new = store.rotate_key(old.record.key_id, grace_seconds=3600)
    app = make_app(config(store))
    assert fetch(app, old).status == 200
    assert fetch(app, new).status == 200
    mixed = basic(new.record.key_id, old.key)  # the new id with the old secret: another key
    assert_invalid_client(app.post(TOKEN_PATH, form(**GRANT), {**FORM, **mixed}))


# -- usage-limited keys and token_limits ------------------------------------------------------


def test_a_token_request_takes_one_use_of_a_usage_limited_key(
    make_app: App, store: KeyStore
) -> None:
    limited = store.create_key("svc-limited", scopes=KEY_SCOPES, max_uses=3)
    app = make_app(config(store))
    for _ in range(3):
        assert fetch(app, limited).status == 200
    reply = fetch(app, limited)
    assert reply.status == 429, reply.body
    assert reply.json()["error"] == "quota_exceeded"
    assert reply.headers["Cache-Control"] == "no-store"
    record = store.get_key(limited.record.key_id)
    assert record is not None and record.remaining_uses == 0


def test_a_refused_token_request_takes_no_use(make_app: App, store: KeyStore) -> None:
    limited = store.create_key("svc-limited", scopes=KEY_SCOPES, max_uses=2)
    app = make_app(config(store))
    for _ in range(3):
        assert fetch(app, limited, scope="admin").status == 400  # invalid_scope
    record = store.get_key(limited.record.key_id)
    assert record is not None and record.remaining_uses == 2
    assert [fetch(app, limited).status for _ in range(3)] == [200, 200, 429]


def test_a_usage_limited_key_gets_exactly_max_uses_tokens_under_concurrency(
    make_app: App, store: KeyStore
) -> None:
    limited = store.create_key("svc-limited", scopes=KEY_SCOPES, max_uses=4)
    app = make_app(config(store))
    body, headers = with_basic(limited)
    replies = app.concurrently(TOKEN_PATH, [headers] * 12, method="POST", body=body)
    statuses = sorted(r.status for r in replies)
    assert statuses == [200] * 4 + [429] * 8, [(r.status, r.body) for r in replies]
    assert {r.json()["error"] for r in replies if r.status == 429} == {"quota_exceeded"}
    tokens = {r.json()["access_token"] for r in replies if r.status == 200}
    assert len(tokens) == 4


def test_token_limits_refuse_bulk_minting_with_retry_after(
    make_app: App, store: KeyStore, issued: IssuedKey
) -> None:
    app = make_app(config(store, token_limits="2/minute"))
    assert [fetch(app, issued).status for _ in range(2)] == [200, 200]
    reply = fetch(app, issued, how="post")
    assert_oauth_error(reply, 429, "rate_limited")
    assert 0 < int(reply.headers["Retry-After"]) <= 60
    # Another key of the same client shares the budget: limits count per client.
    sibling = store.create_key("svc-orders", scopes=KEY_SCOPES)
    assert fetch(app, sibling).status == 429
    # And the token limits are not the API's: the key still calls the API.
    assert app.get("/orders", {"X-API-Key": issued.key}).status == 200


def test_token_limits_do_not_take_a_use(make_app: App, store: KeyStore) -> None:
    limited = store.create_key("svc-limited", scopes=KEY_SCOPES, max_uses=5)
    app = make_app(config(store, token_limits="1/minute"))
    assert [fetch(app, limited).status for _ in range(3)] == [200, 429, 429]
    record = store.get_key(limited.record.key_id)
    assert record is not None and record.remaining_uses == 4


# -- methods -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_the_token_endpoint_takes_only_post(
    make_app: App, store: KeyStore, issued: IssuedKey, method: str
) -> None:
    reply = make_app(config(store))(method, TOKEN_PATH, basic(issued.record.key_id, issued.key))
    assert reply.status == 405, reply.body
    assert reply.headers["Allow"] == "POST"
    assert reply.headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize("path", [JWKS_PATH, METADATA_PATH])
def test_the_published_documents_take_only_get_and_head(
    make_app: App, store: KeyStore, path: str
) -> None:
    reply = make_app(config(store)).post(path, form(**GRANT), FORM)
    assert reply.status == 405, reply.body
    assert set(reply.headers["Allow"].replace(" ", "").split(",")) == {"GET", "HEAD"}


# -- the JWKS and the metadata --------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_the_jwks_publishes_public_keys_only(
    make_app: App, store: KeyStore, issued: IssuedKey, algorithm: str
) -> None:
    app = make_app(config(store, signing_algorithm=algorithm))
    token = fetch(app, issued).json()["access_token"]
    reply = app.get(JWKS_PATH)
    assert reply.status == 200
    assert reply.headers["Content-Type"].split(";")[0] in (
        "application/json",
        "application/jwk-set+json",
    )
    cache_control = [p.strip() for p in reply.headers["Cache-Control"].split(",")]
    assert f"max-age={MAX_AGE}" in cache_control
    assert "no-store" not in cache_control
    jwks = reply.json()
    assert list(jwks) == ["keys"]
    assert jwks["keys"], "no key published"
    for key in jwks["keys"]:
        assert not PRIVATE_MEMBERS & set(key), key
        assert key["alg"] == algorithm
        assert key["use"] == "sig"
        assert key["kid"]
    assert pyjwt.get_unverified_header(token)["kid"] in {k["kid"] for k in jwks["keys"]}


def test_the_jwks_answers_before_any_token_was_issued(make_app: App, store: KeyStore) -> None:
    jwks = public_jwks(make_app(config(store)))
    assert len(jwks["keys"]) == 1
    assert not PRIVATE_MEMBERS & set(jwks["keys"][0])


@pytest.mark.parametrize("path", [JWKS_PATH, METADATA_PATH])
def test_head_answers_like_get_without_a_body(make_app: App, store: KeyStore, path: str) -> None:
    app = make_app(config(store))
    got = app.get(path)
    head = app("HEAD", path)
    assert head.status == 200
    assert head.body == b""
    assert head.headers["Cache-Control"] == got.headers["Cache-Control"]
    assert head.headers["Content-Type"] == got.headers["Content-Type"]


def test_the_metadata_follows_rfc_8414(make_app: App, store: KeyStore) -> None:
    reply = make_app(config(store)).get(METADATA_PATH)
    assert reply.status == 200
    assert reply.headers["Content-Type"].split(";")[0] == "application/json"
    assert "max-age=" in reply.headers["Cache-Control"]
    metadata = reply.json()
    assert metadata["issuer"] == ISSUER
    assert metadata["token_endpoint"] == ISSUER + TOKEN_PATH
    assert metadata["jwks_uri"] == ISSUER + JWKS_PATH
    assert metadata["grant_types_supported"] == ["client_credentials"]
    assert sorted(metadata["token_endpoint_auth_methods_supported"]) == [
        "client_secret_basic",
        "client_secret_post",
    ]
    assert metadata["scopes_supported"] == ["admin", "orders:read", "reports:read"]
    # RFC 8414 section 2: no member is null, and nothing it names is private.
    assert all(value is not None for value in metadata.values())


def test_the_metadata_leaves_out_scopes_when_no_route_names_one(
    make_app: App, store: KeyStore
) -> None:
    metadata = make_app(config(store, routes=[])).get(METADATA_PATH).json()
    assert "scopes_supported" not in metadata


def test_the_endpoints_need_no_credentials_and_ignore_bad_ones(
    make_app: App, store: KeyStore
) -> None:
    app = make_app(config(store))
    for headers in ({}, {"X-API-Key": "m2m_nonsense"}, {"Authorization": "Bearer a.b.c"}):
        assert app.get(JWKS_PATH, headers).status == 200
        assert app.get(METADATA_PATH, headers).status == 200


# -- below a mount point, and with the service off ------------------------------------------------


def test_the_endpoints_answer_below_a_prefix(
    make_app: App, store: KeyStore, issued: IssuedKey
) -> None:
    app = make_app(config(store))
    body, headers = with_basic(issued)
    reply = app("POST", TOKEN_PATH, headers, prefix="/api", body=body)
    assert reply.status == 200, reply.body
    assert app("GET", JWKS_PATH, prefix="/api").status == 200
    assert app("GET", METADATA_PATH, prefix="/api").status == 200


def test_the_endpoints_answer_inside_a_starlette_mount(store: KeyStore, issued: IssuedKey) -> None:
    inner = Starlette(routes=[Route("/ping", lambda request: PlainTextResponse("pong"))])
    inner.add_middleware(M2MMiddleware, settings=Settings(**config(store)))
    outer = Starlette(routes=[Mount("/api", app=inner)])
    body, headers = with_basic(issued)

    async def send() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=outer)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            return [
                await client.post("/api" + TOKEN_PATH, content=body, headers=headers),
                await client.get("/api" + JWKS_PATH),
                await client.post(TOKEN_PATH, content=body, headers=headers),  # outside the mount
            ]

    token, jwks, outside = asyncio.run(send())
    assert token.status_code == 200, token.text
    assert jwks.status_code == 200
    assert outside.status_code == 404
    assert verified(token.json()["access_token"], jwks.json())["client_id"] == "svc-orders"


def test_with_the_service_off_the_paths_are_the_apps_own(
    make_app: App, store: KeyStore, issued: IssuedKey
) -> None:
    plain = {k: v for k, v in config(store).items() if not k.startswith(("token_", "jwks_"))}
    app = make_app(plain)
    body, headers = with_basic(issued)
    for method, path in (("POST", TOKEN_PATH), ("GET", JWKS_PATH), ("GET", METADATA_PATH)):
        anonymous = app(method, path, FORM, body=body if method == "POST" else b"")
        assert anonymous.status == 401, anonymous.body
        assert anonymous.json()["error"] == "missing_credentials"
        # Basic is no credential of the API's: the gate refuses it as it would anywhere.
        refused = app(method, path, headers, body=body if method == "POST" else b"")
        assert refused.status == 401
        keyed = app(method, path, {"X-API-Key": issued.key})
        assert keyed.status in (404, 405), (method, path, keyed.status)


# -- hostile input -----------------------------------------------------------------------------


def _hostile(issued: IssuedKey) -> dict[str, tuple[bytes, list[tuple[str, str]]]]:
    grant = form(**GRANT)
    form_type = ("Content-Type", "application/x-www-form-urlencoded")
    huge = base64.b64encode(b"k" * 6000 + b":" + b"s" * 6000).decode()
    utf8_id = base64.b64encode("ключ:".encode() + issued.key.encode()).decode()
    return {
        "odd_bytes_in_authorization": (grant, [form_type, ("Authorization", "Basic \xff\xfe\x80")]),
        "latin1_basic": (
            grant,
            [form_type, ("Authorization", "Basic " + base64.b64encode(b"\xe9:\xe9").decode())],
        ),
        "huge_basic": (grant, [form_type, ("Authorization", "Basic " + huge)]),
        "non_ascii_client_id_basic": (grant, [form_type, ("Authorization", "Basic " + utf8_id)]),
        "non_ascii_client_id_form": (
            form(**GRANT, client_id="ключ", client_secret=issued.key),
            [form_type],
        ),
        "nul_in_form": (
            b"grant_type=client_credentials&client_id=%00&client_secret=%00",
            [form_type],
        ),
        "surrogate_in_form": (
            b"grant_type=client_credentials&client_id=%ED%A0%80&client_secret=x",
            [form_type],
        ),
        "two_authorization_headers": (
            grant,
            [form_type, *basic(issued.record.key_id, issued.key).items()] * 2,
        ),
        "form_without_equals": (b"grant_type", [form_type]),
        # Not a separator (Python 3.10's parse_qsl): the grant type is all of it.
        "semicolons": (b"grant_type=client_credentials;scope=x", [form_type]),
        "empty_body": (b"", [form_type]),
        "charset_parameter": (grant, [("Content-Type", "application/x-www-form-urlencoded; x")]),
    }


HOSTILE_CASES = sorted(_hostile(_PLACEHOLDER))


@pytest.mark.parametrize("case", HOSTILE_CASES)
def test_hostile_token_requests_never_crash(
    make_app: App, store: KeyStore, issued: IssuedKey, case: str
) -> None:
    body, headers = _hostile(issued)[case]
    reply = make_app(config(store)).post(TOKEN_PATH, body, headers)
    never_a_crash(reply)
    assert reply.status in (400, 401, 413), (reply.status, reply.body)
    assert reply.headers["Cache-Control"] == "no-store"
    assert issued.key not in reply.body.decode("utf-8", "replace")
    error = reply.json()["error"]
    assert error in ("invalid_request", "invalid_client", "unsupported_grant_type"), error
    if error == "invalid_client":
        assert reply.headers["WWW-Authenticate"].startswith("Basic ")


def test_percent_encoded_basic_parts_are_decoded(
    make_app: App, store: KeyStore, issued: IssuedKey
) -> None:
    """RFC 6749 2.3.1: client id and secret are form-urlencoded before Basic encoding."""

    def every_character(text: str) -> str:
        return "".join(f"%{b:02X}" for b in text.encode())

    pair = f"{every_character(issued.record.key_id)}:{every_character(issued.key)}"
    headers = {**FORM, "Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}
    reply = make_app(config(store)).post(TOKEN_PATH, form(**GRANT), headers)
    assert reply.status == 200, reply.body


# -- the token itself (RFC 9068), checked with PyJWT ---------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_the_token_verifies_with_pyjwt_and_passes_an_rfc_9068_check(
    make_app: App, store: KeyStore, issued: IssuedKey, algorithm: str
) -> None:
    app = make_app(config(store, signing_algorithm=algorithm))
    replies = [fetch(app, issued, how=how) for how in ("basic", "post", "basic")]
    jwks = public_jwks(app)
    jtis = set()
    for reply in replies:
        assert reply.status == 200, reply.body
        token = reply.json()["access_token"]
        header = pyjwt.get_unverified_header(token)
        assert header["typ"] == "at+jwt"  # RFC 9068 section 2.1
        assert header["alg"] == algorithm
        assert header["kid"] in {key["kid"] for key in jwks["keys"]}
        assert not {"jwk", "jku", "x5u", "x5c"} & set(header)
        claims = verified(token, jwks)
        assert claims["iss"] == ISSUER
        assert claims["aud"] == AUDIENCE
        assert claims["sub"] == claims["client_id"] == "svc-orders"
        assert claims["exp"] - claims["iat"] == TTL == reply.json()["expires_in"]
        assert isinstance(claims["iat"], int)
        assert sorted(claims["scope"].split(" ")) == sorted(KEY_SCOPES)
        assert claims["tier"] == "gold"
        assert claims["key_id"] == issued.record.key_id
        jtis.add(claims["jti"])
    assert len(jtis) == len(replies)


def test_a_token_of_a_key_without_a_tier_has_no_tier_claim(make_app: App, store: KeyStore) -> None:
    plain = store.create_key("svc-plain", scopes=["orders:read"])
    app = make_app(config(store))
    claims = verified(fetch(app, plain).json()["access_token"], public_jwks(app))
    assert "tier" not in claims
    assert claims["scope"] == "orders:read"


def test_the_audience_defaults_to_the_issuer(make_app: App, store: KeyStore) -> None:
    issued = store.create_key("svc-a", scopes=["orders:read"])
    app = make_app({k: v for k, v in config(store).items() if k != "token_audience"})
    token = fetch(app, issued).json()["access_token"]
    claims = pyjwt.decode(
        token,
        key=pyjwt.PyJWKSet.from_dict(public_jwks(app)).keys[0],
        algorithms=["ES256"],
        audience=ISSUER,
        issuer=ISSUER,
    )
    assert claims["aud"] == ISSUER


def test_a_token_is_no_key_of_its_own_at_the_token_endpoint(
    make_app: App, store: KeyStore, issued: IssuedKey
) -> None:
    app = make_app(config(store))
    token = fetch(app, issued).json()["access_token"]
    reply = app.post(TOKEN_PATH, form(**GRANT), {**FORM, **basic(issued.record.key_id, token)})
    assert_invalid_client(reply)


# -- outages -----------------------------------------------------------------------------------


class UnreachableStore(MemoryKeyStore):
    """Keys can be made, but every lookup fails as a network store's would."""

    def find_by_hash(self, key_hash: str) -> Any:
        raise StoreUnavailable("connection refused")


def test_an_unreachable_key_store_is_503_not_invalid_client(make_app: App) -> None:
    down = UnreachableStore()
    issued = down.create_key("svc", scopes=KEY_SCOPES)
    app = make_app(config(down, on_storage_error="deny"))
    reply = fetch(app, issued)
    assert_oauth_error(reply, 503, "temporarily_unavailable")
    assert int(reply.headers["Retry-After"]) > 0
    assert issued.key not in reply.body.decode()


@pytest.mark.parametrize("policy", ["deny", "allow"])
def test_an_unreachable_limit_storage_follows_the_policy_at_the_token_endpoint(
    make_app: App, store: KeyStore, issued: IssuedKey, break_limit_storage: Any, policy: str
) -> None:
    app = make_app(config(store, on_storage_error=policy))
    break_limit_storage(app.engine().limiter)
    reply = fetch(app, issued)
    if policy == "deny":
        assert_oauth_error(reply, 503, "temporarily_unavailable")
        assert int(reply.headers["Retry-After"]) > 0
    else:
        assert reply.status == 200, reply.body
        verified(reply.json()["access_token"], public_jwks(app))


def test_a_use_taken_is_given_back_when_the_limit_storage_refuses(
    make_app: App, store: KeyStore, break_limit_storage: Any
) -> None:
    limited = store.create_key("svc-limited", scopes=KEY_SCOPES, max_uses=2)
    app = make_app(config(store, on_storage_error="deny"))
    break_limit_storage(app.engine().limiter)
    assert fetch(app, limited).status == 503
    record = store.get_key(limited.record.key_id)
    assert record is not None and record.remaining_uses == 2


def test_the_metadata_urls_keep_the_issuer_s_path(make_app: App, store: KeyStore) -> None:
    """An issuer with a path (the app served under a prefix) names its endpoints under it."""
    issuer = "https://api.example.com/billing"
    metadata = make_app({**config(store), "token_issuer": issuer}).get(METADATA_PATH).json()
    assert metadata["issuer"] == issuer
    assert metadata["token_endpoint"] == issuer + TOKEN_PATH
    assert metadata["jwks_uri"] == issuer + JWKS_PATH


# -- red team (issue 12): attacks that worked once, in every framework --------------------


def test_where_only_tokens_are_accepted_the_exchanged_api_key_is_still_refused(
    make_app: App, store: KeyStore, issued: IssuedKey
) -> None:
    """With ``schemes=["jwt"]`` an API key is a credential for the token endpoint only.

    The attack: post the key to the token endpoint once, then send the key
    itself as ``Authorization: Bearer <key>`` to any API route. The endpoint
    had verified the key through the engine's key cache, and the request path
    reads that cache before it asks whether API keys are accepted at all: the
    long-lived key passed as a credential for ``key_cache_ttl`` after each
    token request, on a deployment that had turned API keys off.
    """
    app = make_app(config(store, schemes=["jwt"]))
    as_key = {"Authorization": f"Bearer {issued.key}"}
    assert app.get("/ping", as_key).status == 401
    reply = fetch(app, issued)
    assert reply.status == 200, reply.body
    token = reply.json()["access_token"]
    assert app.get("/ping", {"Authorization": f"Bearer {token}"}).status == 200
    refused = app.get("/ping", as_key)
    assert refused.status == 401, refused.body
    assert refused.json()["error"] == "invalid_token"
    assert fetch(app, issued).status == 200  # and the endpoint still takes the key


@pytest.mark.parametrize("ending", ["expires", "rotated"])
def test_a_token_never_outlives_the_key_it_was_issued_for(
    make_app: App, store: KeyStore, ending: str
) -> None:
    """A key that ends in 60 s gets a token that ends with it, not ``token_ttl`` (240 s) later.

    The attack: exchange a key just before it expires (or during the grace of
    a rotation) for a token good for the whole ``token_ttl``. Our engine caps
    the token at its key's end, but a service that trusts us through the JWKS
    can only read ``exp``: there the key lived on in its token for up to
    ``token_ttl`` past the end the issuer knew when it signed.
    """
    if ending == "expires":
        ends = datetime.now(timezone.utc) + timedelta(seconds=60)
        key = store.create_key("svc-ending", scopes=KEY_SCOPES, expires_at=ends)
    else:
        old = store.create_key("svc-ending", scopes=KEY_SCOPES)
        store.rotate_key(old.record.key_id, grace_seconds=60)
        record = store.get_key(old.record.key_id)
        assert record.expires_at is not None
        key, ends = IssuedKey(old.key, record), record.expires_at
    app = make_app(config(store))
    reply = fetch(app, key)
    assert reply.status == 200, reply.body
    body = reply.json()
    claims = verified(body["access_token"], public_jwks(app))
    assert claims["exp"] <= ends.timestamp()
    assert body["expires_in"] == claims["exp"] - claims["iat"]
    assert 0 < body["expires_in"] <= 60
