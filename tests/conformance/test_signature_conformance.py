"""RFC 9421 request signatures through all three adapters (issue 13 item 3).

A route rule with ``"signed": True`` (or ``require_signatures``) needs a
signature by the API key's ``signing_public_key``, made here by
:mod:`m2m_middleware.signing_clients` exactly as a client would (on a prepared
``requests`` request, whose headers the framework's test client then sends).
What a user depends on: a good signature passes and the view still reads the
body; a tampered body, a stale ``created``, another ``keyid``, a replay, no
signature, a key without a public key and a token all get 401
``invalid_signature``; a body over ``max_body_size`` gets 413; nothing is
spent (no use, no rate budget) by a request whose signature fails.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from test_http_conformance import assert_problem

from m2m_middleware import KeyStore, open_key_store
from m2m_middleware.signing_clients import PrivateKey, RequestsSignatureAuth

if TYPE_CHECKING:  # this folder's conftest; only a type here
    from conftest import Caller

Make = Callable[[Mapping[str, Any]], "Caller"]
HOST = "api.example.test"
SIGNED_ECHO = {"path": "/echo", "methods": ["POST"], "signed": True}
SIGNED_PING = {"path": "/ping", "signed": True}
ORDERS_RULE = {"path": "/orders", "scopes": ["orders:read"]}
BODY = b'{"amount": 1200, "currency": "EUR"}'


def public_pem(private: PrivateKey) -> str:
    return (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )


class Signer:
    """A client key pair registered on an API key; signs requests as a client would."""

    def __init__(self, store: KeyStore, private: PrivateKey | None = None, **options: Any) -> None:
        self.private = private or ed25519.Ed25519PrivateKey.generate()
        pem = public_pem(self.private)
        issued = store.create_key(
            "payments", scopes=["orders:read"], signing_public_key=pem, **options
        )
        self.api_key = issued.key
        self.key_id = issued.record.key_id

    def headers(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        *,
        scheme: str = "http",
        key_id: str | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> list[tuple[str, str]]:
        """The headers a signing ``requests`` client sends for this request (but the
        ``Content-Length``, which each test client writes itself)."""
        prepared = requests.Request(
            method,
            f"{scheme}://{HOST}{path}",
            data=body or None,
            headers={"Host": HOST, "X-API-Key": self.api_key},
        ).prepare()
        RequestsSignatureAuth(key_id or self.key_id, self.private, clock=clock)(prepared)
        return [(n, v) for n, v in prepared.headers.items() if n.lower() != "content-length"]


@pytest.fixture
def store() -> KeyStore:
    return open_key_store("memory://")


def config(store: KeyStore, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "key_store": store,
        "rate_limit_storage": "memory://",
        "default_limits": "100/minute",
        "public_paths": ["/health"],
        "routes": [ORDERS_RULE, SIGNED_ECHO, SIGNED_PING],
    }
    values.update(overrides)
    return values


def assert_invalid_signature(reply: Any, detail: str = "") -> None:
    problem = assert_problem(reply, 401, "invalid_signature")
    assert "WWW-Authenticate" not in reply.headers  # the credential itself was good
    assert detail in problem["detail"], problem


# -- what passes ---------------------------------------------------------------------------


def test_a_signed_request_passes_and_the_view_reads_its_body(
    make_app: Make, store: KeyStore
) -> None:
    app = make_app(config(store))
    signer = Signer(store)
    headers = signer.headers("POST", "/echo", BODY)
    reply = app("POST", "/echo", headers, body=BODY)
    assert reply.status == 200, reply.body
    assert reply.body == BODY  # the middleware read it, and gave it back to the view
    assert "RateLimit" in reply.headers
    assert_invalid_signature(app("POST", "/echo", headers, body=BODY))  # it was checked


def test_a_signed_request_without_a_body_passes(make_app: Make, store: KeyStore) -> None:
    app = make_app(config(store))
    signer = Signer(store)
    headers = signer.headers("GET", "/ping?page=2&sort=asc")
    assert app("GET", "/ping?page=2&sort=asc", headers).status == 200
    assert_invalid_signature(app("GET", "/ping?page=3&sort=asc", headers))  # the query is signed


def test_a_p256_key_signs_as_well(make_app: Make, store: KeyStore) -> None:
    app = make_app(config(store))
    signer = Signer(store, ec.generate_private_key(ec.SECP256R1()))
    reply = app("POST", "/echo", signer.headers("POST", "/echo", BODY), body=BODY)
    assert reply.status == 200, reply.body
    tampered = app("POST", "/echo", signer.headers("POST", "/echo", BODY), body=b"{}")
    assert_invalid_signature(tampered)


def test_below_a_mount_prefix_the_target_uri_holds_the_prefix(
    make_app: Make, store: KeyStore
) -> None:
    app = make_app(config(store))
    signer = Signer(store)
    headers = signer.headers("POST", "/api/echo", BODY)
    reply = app("POST", "/echo", headers, prefix="/api", body=BODY)
    assert reply.status == 200, reply.body
    assert reply.body == BODY
    unprefixed = signer.headers("POST", "/echo", BODY)  # not the path the client sent
    assert_invalid_signature(app("POST", "/echo", unprefixed, prefix="/api", body=BODY))


def test_over_https_the_target_uri_is_https(make_app: Make, store: KeyStore) -> None:
    app = make_app(config(store))
    signer = Signer(store)
    reply = app("GET", "/ping", signer.headers("GET", "/ping", scheme="https"), https=True)
    assert reply.status == 200, reply.body
    plain = app("GET", "/ping", signer.headers("GET", "/ping", scheme="https"))
    assert_invalid_signature(plain)  # signed for https://, received over http://


# -- what is refused -------------------------------------------------------------------------


def test_a_tampered_body_is_refused(make_app: Make, store: KeyStore) -> None:
    app = make_app(config(store))
    signer = Signer(store)
    headers = signer.headers("POST", "/echo", BODY)
    reply = app("POST", "/echo", headers, body=BODY.replace(b"1200", b"9900"))
    assert_invalid_signature(reply)


def test_a_stale_created_is_refused(make_app: Make, store: KeyStore) -> None:
    app = make_app(config(store, signature_max_age=60))
    signer = Signer(store)

    def stale() -> datetime:
        return datetime.now(timezone.utc) - timedelta(seconds=120)

    reply = app("POST", "/echo", signer.headers("POST", "/echo", BODY, clock=stale), body=BODY)
    assert_invalid_signature(reply, "signature_max_age")


def test_another_keyid_is_refused(make_app: Make, store: KeyStore) -> None:
    app = make_app(config(store))
    signer = Signer(store)
    other = Signer(store)
    headers = signer.headers("POST", "/echo", BODY, key_id=other.key_id)
    assert_invalid_signature(app("POST", "/echo", headers, body=BODY), "keyid")


def test_a_signature_by_another_key_pair_is_refused(make_app: Make, store: KeyStore) -> None:
    app = make_app(config(store))
    signer = Signer(store)
    signer.private = ed25519.Ed25519PrivateKey.generate()  # not the registered public key
    reply = app("POST", "/echo", signer.headers("POST", "/echo", BODY), body=BODY)
    assert_invalid_signature(reply, "does not verify")


def test_a_replay_is_refused(make_app: Make, store: KeyStore) -> None:
    app = make_app(config(store))
    signer = Signer(store)
    headers = signer.headers("POST", "/echo", BODY)
    assert app("POST", "/echo", headers, body=BODY).status == 200
    assert_invalid_signature(app("POST", "/echo", headers, body=BODY), "used before")


def test_a_missing_signature_is_refused(make_app: Make, store: KeyStore) -> None:
    app = make_app(config(store))
    signer = Signer(store)
    reply = app("POST", "/echo", {"X-API-Key": signer.api_key, "Host": HOST}, body=BODY)
    assert_invalid_signature(reply, "must be signed")


def test_a_key_without_a_public_key_is_refused(make_app: Make, store: KeyStore) -> None:
    app = make_app(config(store))
    plain = store.create_key("payments", scopes=["orders:read"]).key
    reply = app("GET", "/ping", {"X-API-Key": plain})
    assert_invalid_signature(reply, "signing_public_key")
    assert app.get("/orders", {"X-API-Key": plain}).status == 200  # unsigned routes need none


def test_a_bad_signature_takes_no_use_and_no_rate_budget(make_app: Make, store: KeyStore) -> None:
    app = make_app(config(store, default_limits="2/minute"))
    signer = Signer(store, max_uses=1)
    for _ in range(3):
        assert_invalid_signature(app("GET", "/ping", {"X-API-Key": signer.api_key}))
    reply = app("GET", "/ping", signer.headers("GET", "/ping"))
    assert reply.status == 200, reply.body  # its one use, and its rate budget, were left
    assert "r=1" in reply.headers["RateLimit"]  # the second of its 2/minute


def test_a_body_over_max_body_size_is_413(make_app: Make, store: KeyStore) -> None:
    app = make_app(config(store, max_body_size=16))
    signer = Signer(store)
    reply = app("POST", "/echo", signer.headers("POST", "/echo", BODY), body=BODY)
    problem = assert_problem(reply, 413, "invalid_request")
    assert "max_body_size" in problem["detail"]
    small = b"0123456789abcdef"
    assert app("POST", "/echo", signer.headers("POST", "/echo", small), body=small).status == 200


def test_require_signatures_signs_every_authenticated_route(
    make_app: Make, store: KeyStore
) -> None:
    app = make_app(config(store, routes=[ORDERS_RULE], require_signatures=True))
    signer = Signer(store)
    assert_invalid_signature(app.get("/orders", {"X-API-Key": signer.api_key}))
    assert app("GET", "/orders", signer.headers("GET", "/orders")).status == 200
    assert app.get("/health").status == 200  # public paths need nothing


def test_a_token_on_a_signed_route_is_refused(make_app: Make) -> None:
    from test_own_token_conformance import OwnIssuer, bearer, own_config

    from m2m_middleware import Settings
    from m2m_middleware.issuer import signing_keys_for

    store = open_key_store("memory://")
    settings = own_config(store, routes=[ORDERS_RULE, SIGNED_PING])
    own = OwnIssuer(store, signing_keys_for(Settings(**settings), store=store), make_app(settings))
    record = own.key("orders:read")
    token = own.token(record)
    assert own.app.get("/orders", bearer(token)).status == 200
    assert_invalid_signature(own.app.get("/ping", bearer(token)), "token cannot sign")


# -- the nonce memory shared through Redis ----------------------------------------------------


@pytest.mark.redis
def test_a_replay_to_another_instance_sharing_redis_is_refused(
    every_framework: dict[str, Make], redis_url: str, store: KeyStore
) -> None:
    # One Redis for every run: nonces are filed per key id, and this test's key is new.
    shared = config(store, rate_limit_storage=redis_url)
    apps = [make(shared) for make in every_framework.values()]
    signer = Signer(store)
    headers = signer.headers("POST", "/echo", BODY)
    assert apps[0]("POST", "/echo", headers, body=BODY).status == 200
    for other in apps[1:]:
        assert_invalid_signature(other("POST", "/echo", headers, body=BODY), "used before")
