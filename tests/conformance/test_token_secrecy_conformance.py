"""No API key, signing secret, private key or access token leaks from the token service
(issue 12 'Done when'): not into a log record at DEBUG, a repr, the store's files
(SQLite bytes, PostgreSQL rows), in any of the three frameworks."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jwt as pyjwt
import pytest

from m2m_middleware import Engine, KeyStore, Settings, open_key_store
from m2m_middleware.request_view import RequestView
from m2m_middleware.stores.base import IssuedKey

TOKEN_PATH = "/oauth/token"
SECRET = "secrecy tests' own signing secret"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
App = Callable[[Mapping[str, Any]], Any]


def config(store: Any, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "key_store": store,
        "rate_limit_storage": "memory://",
        "public_paths": ["/health"],
        "routes": [{"path": "/orders", "scopes": ["orders:read"]}],
        "token_endpoint": TOKEN_PATH,
        "token_issuer": "https://issuer.example",
        "token_limits": "3/minute",
        "signing_key_secret": SECRET,
    }
    values.update(overrides)
    return values


def basic(key_id: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key_id}:{secret}".encode()).decode()}


def private_material(engine: Engine) -> list[str]:
    """Every form a private signing key could leak in: its ``d`` and its PEM body."""
    assert engine.signing_keys is not None
    found = []
    for held in engine.signing_keys._unsealed.values():
        found.append(held._key.as_dict(private=True)["d"])
        pem = held._key.as_pem(private=True).decode()
        found.append("".join(pem.splitlines()[1:-1])[:48])
    assert found, "no signing key was unsealed: the test signed nothing"
    return found


def every_kind_of_token_request(app: Any, store: KeyStore) -> tuple[list[str], list[str]]:
    """Successes and refusals of each kind; (the API keys used, the tokens issued)."""
    good = store.create_key("svc-a", scopes=["orders:read"])
    revoked = store.create_key("svc-b", scopes=["orders:read"])
    limited = store.create_key("svc-c", scopes=["orders:read"], max_uses=1)
    other = store.create_key("svc-d")
    store.revoke_key(revoked.record.key_id)
    grant = urlencode({"grant_type": "client_credentials"}).encode()

    def post_form(issued: IssuedKey, **fields: str) -> bytes:
        values = {"client_id": issued.record.key_id, "client_secret": issued.key, **fields}
        return urlencode({"grant_type": "client_credentials", **values}).encode()

    replies = [
        app.post(TOKEN_PATH, grant, {**FORM, **basic(good.record.key_id, good.key)}),
        app.post(TOKEN_PATH, post_form(good, scope="orders:read"), FORM),
        app.post(TOKEN_PATH, post_form(good, scope="admin"), FORM),  # invalid_scope
        app.post(TOKEN_PATH, grant, {**FORM, **basic(good.record.key_id, other.key)}),
        app.post(TOKEN_PATH, grant, {**FORM, **basic(revoked.record.key_id, revoked.key)}),
        app.post(TOKEN_PATH, post_form(limited), FORM),
        app.post(TOKEN_PATH, post_form(limited), FORM),  # quota_exceeded
        app.post(TOKEN_PATH, post_form(good), {**FORM, **basic(good.record.key_id, good.key)}),
        app.post(f"{TOKEN_PATH}?client_secret={good.key}", grant, FORM),
        app.post(TOKEN_PATH, grant, {**FORM, **basic(good.record.key_id, good.key + "x")}),
        app.post(TOKEN_PATH, post_form(good), FORM),
        app.post(TOKEN_PATH, post_form(good), FORM),  # rate_limited by now
        app.get("/.well-known/jwks.json"),
        app.get("/orders", {"X-API-Key": good.key}),
    ]
    statuses = [r.status for r in replies]
    assert statuses[:2] == [200, 200] and 401 in statuses and 429 in statuses, statuses
    for reply in replies:
        assert reply.status < 500
    tokens = [r.json()["access_token"] for r in replies if b"access_token" in r.body]
    return [good.key, revoked.key, limited.key, other.key], tokens


def test_no_secret_in_any_log_record_at_debug(
    make_app: App, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("", "m2m_middleware", "m2m_middleware.audit", "authlib"):
        caplog.set_level(logging.DEBUG, logger=name)
    store = open_key_store("memory://")
    app = make_app(config(store))
    keys, tokens = every_kind_of_token_request(app, store)
    assert tokens
    # The server side's records: httpx's are the test client's own (it sent the
    # secret in a query string on purpose, and says so). Ours and authlib's are
    # read whole (every attribute, extras too); the frameworks' own for what they
    # say: Django's 4xx warning carries its request object, whose repr shows
    # the query string a client chose to put a secret in (and was refused).
    server_side = [r for r in caplog.records if not r.name.startswith("httpx")]
    logged = " ".join(
        f"{r.name} {r.getMessage()} {r.args!r} {r.exc_text or ''}"
        + (f" {vars(r)!r}" if r.name.startswith(("m2m_middleware", "authlib")) else "")
        for r in server_side
    )
    assert any(r.name.startswith("m2m_middleware") for r in caplog.records), "nothing logged"
    for secret in [*keys, SECRET, *tokens, *private_material(app.engine())]:
        assert secret not in logged
    # Not the secret halves of the tokens either: their signatures are the proof.
    for token in tokens:
        assert token.rsplit(".", 1)[1] not in logged


def test_no_secret_in_the_reprs_of_the_issuer_s_objects(make_app: App) -> None:
    store = open_key_store("memory://")
    app = make_app(config(store))
    keys, tokens = every_kind_of_token_request(app, store)
    engine = app.engine()
    assert engine.token_service is not None and engine.signing_keys is not None
    view = RequestView(
        "POST",
        TOKEN_PATH,
        headers={"authorization": basic("k", keys[0])["Authorization"]},
        body=urlencode({"grant_type": "client_credentials", "client_secret": keys[0]}).encode(),
    )
    served = engine.serve(
        RequestView(
            "POST",
            TOKEN_PATH,
            headers={"content-type": FORM["Content-Type"]},
            body=urlencode(
                {
                    "grant_type": "client_credentials",
                    "client_id": store.list_keys("svc-d")[0].key_id,
                    "client_secret": keys[3],
                }
            ).encode(),
        )
    )
    assert served.status == 200
    token = json.loads(served.body)["access_token"]
    shown = " ".join(
        repr(thing)
        for thing in (
            engine,
            engine.settings,
            Settings(**config(store)),
            engine.token_service,
            engine.signing_keys,
            engine.signing_keys.current_signing_key(),
            engine.signing_keys.list_keys(),
            served,
            view,
        )
    )
    for secret in [*keys, SECRET, token, *tokens, *private_material(engine)]:
        assert secret not in shown, secret[:8]


# -- at rest --------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    if request.param == "sqlite":
        yield "sqlite", f"sqlite:///{tmp_path / 'keys.db'}"
    else:
        yield "postgres", request.getfixturevalue("postgres_url")


def _stored_text(kind: str, url: str, tmp_path: Path) -> bytes:
    if kind == "sqlite":
        return b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("keys.db"))
    import psycopg

    with psycopg.connect(url) as conn:
        tables = [
            row[0]
            for row in conn.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = current_schema()"
            ).fetchall()
        ]
        assert "m2m_signing_keys" in tables
        dumped = []
        for table in tables:
            rows = conn.execute(f'SELECT row_to_json(t)::text FROM "{table}" t').fetchall()
            dumped.extend(row[0] for row in rows)
    return " ".join(dumped).encode()


def test_the_store_holds_no_api_key_private_key_or_token(
    make_app: App, database: tuple[str, str], tmp_path: Path
) -> None:
    kind, url = database
    store = open_key_store(url)
    app = make_app(config(store))
    keys, tokens = every_kind_of_token_request(app, store)
    material = private_material(app.engine())
    # A key of each other kind too, sealed as well (RS256 once: a 3072-bit key
    # takes seconds to make, and the store does not care which framework asked).
    others = ("EdDSA", "RS256") if app.framework == "starlette" else ("EdDSA",)
    for algorithm in others:
        engine = make_app(config(store, signing_algorithm=algorithm)).engine()
        assert engine.signing_keys is not None
        engine.signing_keys.rotate()
        material += private_material(engine)
    store.close()
    data = _stored_text(kind, url, tmp_path)
    assert b"m2m-seal-1" in data  # the signing keys are there, sealed
    for secret in [*keys, SECRET, *tokens, *material]:
        assert secret.encode() not in data, secret[:8]
    for token in tokens:  # not even a token's claims: nothing of a token is stored
        assert pyjwt.decode(token, options={"verify_signature": False})["jti"].encode() not in data
