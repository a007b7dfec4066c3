"""JWTs through all three adapters: the happy path, an attack catalogue, a live JWKS endpoint.

Every case runs against Starlette, Flask and Django (``make_app``, see conftest.py).
Tokens are minted two ways: with PyJWT (what a real issuer sends) for the happy
path, and by hand (:func:`hs256`, :func:`es256`, :func:`unsigned`) for the
attacks, so a header or payload can be any *text* (duplicate members, ``NaN``,
``crit``...) and still carry a valid signature: a rejection is then due to the
property under test, not to a broken signature. ``test_hand_minted_controls_pass``
proves the hand-made tokens are accepted when nothing is wrong with them.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import re
import threading
import time
from base64 import b64encode, urlsafe_b64decode, urlsafe_b64encode
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt as pyjwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.x509.oid import NameOID
from jwks_server import SlowJWKS
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from m2m_middleware import ConfigError, Engine, KeyStore, Settings, open_key_store
from m2m_middleware import tokens as tokens_module
from m2m_middleware.starlette import M2MMiddleware

Maker = Callable[[Mapping[str, Any]], Any]

ISSUER = "https://idp.example"
AUDIENCE = "api"
#: 64 ASCII bytes: an HMAC secret well above the 32-byte minimum.
SECRET = hashlib.sha512(b"m2m-middleware jwt conformance").hexdigest()[:64].encode()
ORDERS_RULE = {"path": "/orders", "scopes": ["orders:read"]}
PROBLEM_FIELDS = {"type", "title", "status", "detail", "error"}
#: The order of the P-256 group.
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_jti = itertools.count()


# -- keys -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    idp: ec.EllipticCurvePrivateKey  # the identity provider's key, kid "ec-1"
    idp_next: ec.EllipticCurvePrivateKey  # its next key (rotation), kid "ec-2"
    attacker: ec.EllipticCurvePrivateKey
    rsa_key: rsa.RSAPrivateKey  # for the algorithm-confusion cases

    @staticmethod
    def jwk(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, kid: str | None) -> dict[str, Any]:
        """The public JWK of ``key``."""
        public = key.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            value: dict[str, Any] = RSAAlgorithm.to_jwk(public, as_dict=True)
        else:
            value = ECAlgorithm.to_jwk(public, as_dict=True)
        if kid is not None:
            value["kid"] = kid
        return value

    @staticmethod
    def pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
        public: Any = key.public_key()
        pem: bytes = public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return pem

    @staticmethod
    def der(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
        public: Any = key.public_key()
        der: bytes = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return der

    def server_jwks(self) -> dict[str, Any]:
        """What the catalogue's server trusts: an HMAC secret and an EC key, each with a kid."""
        oct_jwk = {"kty": "oct", "k": b64url(SECRET), "kid": "hmac-1", "alg": "HS256"}
        return {"keys": [oct_jwk, self.jwk(self.idp, "ec-1")]}


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        idp=ec.generate_private_key(ec.SECP256R1()),
        idp_next=ec.generate_private_key(ec.SECP256R1()),
        attacker=ec.generate_private_key(ec.SECP256R1()),
        rsa_key=rsa.generate_private_key(public_exponent=65537, key_size=2048),
    )


@pytest.fixture
def store() -> KeyStore:
    return open_key_store("memory://")


# -- hand-made tokens --------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _text(value: Mapping[str, Any] | str | bytes) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def unsigned(
    header: Mapping[str, Any] | str | bytes, payload: Mapping[str, Any] | str | bytes
) -> str:
    """``header.payload``, each exactly as given (a mapping is dumped as compact JSON)."""
    return f"{b64url(_text(header))}.{b64url(_text(payload))}"


def hmac_signature(signing_input: str, secret: bytes) -> bytes:
    return hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()


def es_signature(signing_input: str, key: ec.EllipticCurvePrivateKey) -> bytes:
    """The JWS form of an ES256 signature: r || s, 32 bytes each."""
    der = key.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


HS_HEADER = {"alg": "HS256", "typ": "JWT"}
ES_HEADER = {"alg": "ES256", "kid": "ec-1"}


def hs256(
    payload: Mapping[str, Any] | str | bytes,
    header: Mapping[str, Any] | str | bytes = HS_HEADER,
    secret: bytes = SECRET,
) -> str:
    signing_input = unsigned(header, payload)
    return f"{signing_input}.{b64url(hmac_signature(signing_input, secret))}"


def es256(
    payload: Mapping[str, Any] | str | bytes,
    key: ec.EllipticCurvePrivateKey,
    header: Mapping[str, Any] | str | bytes = ES_HEADER,
) -> str:
    signing_input = unsigned(header, payload)
    return f"{signing_input}.{b64url(es_signature(signing_input, key))}"


_DROP: Any = object()


def claims(**changes: Any) -> dict[str, Any]:
    """Good claims for the catalogue's server; ``name=_DROP`` leaves a claim out."""
    now = int(time.time())
    values: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "acme",
        "scope": "orders:read",
        "iat": now - 5,
        "exp": now + 300,
        "jti": f"t{next(_jti)}",  # every token differs, so none is answered from the cache
    }
    values.update(changes)
    return {name: value for name, value in values.items() if value is not _DROP}


def with_raw(payload: Mapping[str, Any], name: str, literal: str) -> str:
    """``payload`` as JSON text with one more member ``"name": literal`` (any text) at the end."""
    text = json.dumps(payload, separators=(",", ":"))
    return f'{text[:-1]},"{name}":{literal}}}'


def replace_signature(token: str, signature: bytes | str) -> str:
    head, payload, _ = token.split(".")
    tail = signature if isinstance(signature, str) else b64url(signature)
    return f"{head}.{payload}.{tail}"


def insert(token: str, at: int, junk: str) -> str:
    return token[:at] + junk + token[at:]


# -- answers -----------------------------------------------------------------------------


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _assert_not_echoed(reply: Any, token: str) -> None:
    text = reply.body.decode("utf-8", "replace")
    fragments = {token, token[-16:]} if len(token) >= 16 else {token}
    fragments.update(part for part in re.split(r"[.\s]", token) if len(part) >= 16)
    for fragment in fragments:
        assert fragment not in text, f"the answer echoes a piece of the token: {fragment[:40]}"
        for _, value in reply.headers.items:
            assert fragment not in value


def assert_problem(reply: Any, status: int, error: str, token: str = "") -> dict[str, Any]:
    assert reply.status == status, (reply.status, reply.body[:300])
    assert reply.headers["Content-Type"] == "application/problem+json"
    problem: dict[str, Any] = json.loads(reply.body)
    assert problem.keys() >= PROBLEM_FIELDS, problem
    assert problem["status"] == status
    assert problem["error"] == error
    for name in ("type", "title", "detail"):
        assert isinstance(problem[name], str) and problem[name]
    if token:
        _assert_not_echoed(reply, token)
    return problem


def assert_invalid_token(reply: Any, token: str) -> None:
    """The contract's row: 401, ``invalid_token``, ``Bearer error="invalid_token"``, no echo."""
    assert_problem(reply, 401, "invalid_token", token)
    challenge = reply.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert 'error="invalid_token"' in challenge


def remaining(reply: Any) -> int:
    found = re.search(r";r=(\d+)", reply.headers["RateLimit"])
    assert found, reply.headers["RateLimit"]
    return int(found.group(1))


# -- settings ----------------------------------------------------------------------------


def config(store: KeyStore, **overrides: Any) -> dict[str, Any]:
    """Fresh settings for one test (its own store and counters), accepting JWTs only."""
    values: dict[str, Any] = {
        "schemes": ("jwt",),
        "key_store": store,
        "rate_limit_storage": "memory://",
        "default_limits": "100/minute",
        "public_paths": ["/health"],
        "routes": [ORDERS_RULE],
        "key_cache_ttl": 30,
        "jwt_issuer": ISSUER,
        "jwt_audience": AUDIENCE,
    }
    values.update(overrides)
    return values


def catalogue_config(store: KeyStore, keys: Keys, **overrides: Any) -> dict[str, Any]:
    """An HMAC secret ("hmac-1") and an EC key ("ec-1"): HS256 and ES256 both allowed."""
    return config(store, jwt_keys=keys.server_jwks(), **overrides)


# == 1. the happy path ====================================================================


def _issuer_key(keys: Keys, alg: str) -> tuple[Any, Any, dict[str, str]]:
    """(what the server is configured with, what the issuer signs with, extra headers)."""
    if alg == "HS256":
        return SECRET.decode(), SECRET, {}
    return Keys.pem(keys.idp).decode(), keys.idp, {"kid": "ec-1"}


@pytest.mark.parametrize("alg", ["HS256", "ES256"])
def test_a_jwt_identifies_its_client(
    make_app: Maker, store: KeyStore, keys: Keys, alg: str
) -> None:
    configured, signing_key, headers = _issuer_key(keys, alg)
    payload = claims(client_id="acme", sub="service-account-7", scope="orders:read orders:write")
    token = pyjwt.encode(payload, signing_key, algorithm=alg, headers=headers)
    app = make_app(config(store, jwt_keys=configured))
    reply = app.get("/whoami", bearer(token))
    assert reply.status == 200, reply.body
    body = reply.json()
    assert body["client"] == {
        "is_client": True,
        "client_id": "acme",  # client_id wins over sub
        "scheme": "jwt",
        "scopes": ["orders:read", "orders:write"],
        "tier": None,
        "key_id": None,
        "claims": payload,
    }
    assert body["authenticated"] is True
    assert body["same"] is True
    assert body["framework_scopes"] == ["orders:read", "orders:write"]
    assert "RateLimit-Policy" in reply.headers
    assert remaining(reply) == 99


@pytest.mark.parametrize("alg", ["HS256", "ES256"])
def test_client_id_falls_back_to_sub_and_scp_gives_scopes(
    make_app: Maker, store: KeyStore, keys: Keys, alg: str
) -> None:
    configured, signing_key, headers = _issuer_key(keys, alg)
    payload = claims(sub="svc-billing", scope=_DROP, scp=["orders:read", "invoices:read"])
    token = pyjwt.encode(payload, signing_key, algorithm=alg, headers=headers)
    app = make_app(config(store, jwt_keys=configured))
    client = app.get("/whoami", bearer(token)).json()["client"]
    assert client["client_id"] == "svc-billing"
    assert client["scheme"] == "jwt"
    assert client["scopes"] == ["invoices:read", "orders:read"]
    assert app.get("/orders", bearer(token)).status == 200


@pytest.mark.parametrize("alg", ["HS256", "ES256"])
def test_a_route_scope_is_enforced_for_jwts(
    make_app: Maker, store: KeyStore, keys: Keys, alg: str
) -> None:
    configured, signing_key, headers = _issuer_key(keys, alg)
    app = make_app(config(store, jwt_keys=configured))
    without = pyjwt.encode(
        claims(scope="orders:write"), signing_key, algorithm=alg, headers=headers
    )
    reply = app.get("/orders", bearer(without))
    assert_problem(reply, 403, "insufficient_scope", without)
    challenge = reply.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert 'error="insufficient_scope"' in challenge
    assert 'scope="orders:read"' in challenge
    with_scope = pyjwt.encode(claims(), signing_key, algorithm=alg, headers=headers)
    reply = app.get("/orders", bearer(with_scope))
    assert reply.status == 200, reply.body
    assert reply.json() == {"orders": []}
    assert "RateLimit" in reply.headers and "RateLimit-Policy" in reply.headers


def test_an_api_key_and_a_jwt_of_one_client_share_one_budget(
    make_app: Maker, store: KeyStore
) -> None:
    key = store.create_key("acme", scopes=["orders:read"])
    token = pyjwt.encode(claims(sub="acme"), SECRET, algorithm="HS256")
    app = make_app(
        config(
            store, schemes=("api_key", "jwt"), jwt_keys=SECRET.decode(), default_limits="3/minute"
        )
    )
    first = app.get("/whoami", {"X-API-Key": key.key})
    assert first.status == 200, first.body
    assert first.json()["client"]["scheme"] == "api_key"
    assert first.json()["client"]["key_id"] == key.key_id
    second = app.get("/orders", bearer(key.key))
    assert second.status == 200, second.body
    third = app.get("/whoami", bearer(token))
    assert third.status == 200, third.body
    assert third.json()["client"]["scheme"] == "jwt"
    assert third.json()["client"]["client_id"] == "acme"
    assert [remaining(r) for r in (first, second, third)] == [2, 1, 0]
    for headers in (bearer(token), {"X-API-Key": key.key}):
        denied = app.get("/ping", headers)
        assert_problem(denied, 429, "rate_limited")
        assert re.fullmatch(r"[0-9]+", denied.headers["Retry-After"])


def test_a_tier_claim_picks_the_tier_limits(make_app: Maker, store: KeyStore) -> None:
    app = make_app(
        config(
            store,
            jwt_keys=SECRET.decode(),
            jwt_tier_claim="plan",
            tiers={"gold": "2/minute"},
        )
    )
    token = hs256(claims(plan="gold"))
    client = app.get("/whoami", bearer(token)).json()["client"]
    assert client["tier"] == "gold"
    assert app.get("/ping", bearer(token)).status == 200
    assert_problem(app.get("/ping", bearer(token)), 429, "rate_limited")


def test_jwt_only_refuses_api_keys(make_app: Maker, store: KeyStore) -> None:
    key = store.create_key("acme", scopes=["orders:read"]).key
    app = make_app(config(store, jwt_keys=SECRET.decode()))
    for headers in ({"X-API-Key": key}, bearer(key)):
        assert_invalid_token(app.get("/ping", headers), key)
    assert app.get("/ping", bearer(hs256(claims()))).status == 200


@pytest.mark.parametrize("with_keys", [False, True], ids=["no-jwt-keys", "jwt-keys-set"])
def test_api_keys_only_refuses_jwts(make_app: Maker, store: KeyStore, with_keys: bool) -> None:
    key = store.create_key("acme", scopes=["orders:read"]).key
    overrides: dict[str, Any] = {"schemes": ("api_key",), "jwt_issuer": None, "jwt_audience": None}
    if with_keys:
        overrides["jwt_keys"] = SECRET.decode()
    app = make_app(config(store, **overrides))
    token = pyjwt.encode(claims(aud=_DROP, iss=_DROP), SECRET, algorithm="HS256")
    assert_invalid_token(app.get("/ping", bearer(token)), token)
    assert app.get("/ping", {"X-API-Key": key}).status == 200


def test_a_cached_jwt_stops_working_at_its_exp(
    make_app: Maker, store: KeyStore, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_app(catalogue_config(store, keys, key_cache_ttl=3600))
    exp = int(time.time()) + 60
    token = hs256(claims(exp=exp))
    assert app.get("/ping", bearer(token)).status == 200
    # The verified token is cached; the cache must not outlive the token.
    monkeypatch.setattr("m2m_middleware.engine.time", lambda: exp + 0.5)
    assert_invalid_token(app.get("/ping", bearer(token)), token)


# == 2. the attack catalogue ==============================================================


def _control_near_the_limit(keys: Keys) -> str:
    """The longest valid token that still fits the default 4096 characters."""
    token = ""
    for size in range(2700, 3100):
        candidate = hs256(claims(pad="x" * size))
        if len(candidate) > 4096:
            break
        token = candidate
    assert 4090 <= len(token) <= 4096
    return token


CONTROLS: dict[str, Callable[[Keys], str]] = {
    "hs256-no-kid": lambda k: hs256(claims()),
    "hs256-kid": lambda k: hs256(claims(), {"alg": "HS256", "kid": "hmac-1"}),
    "es256-kid": lambda k: es256(claims(), k.idp),
    "es256-no-kid": lambda k: es256(claims(), k.idp, {"alg": "ES256"}),
    "aud-list-containing-ours": lambda k: hs256(claims(aud=["other", AUDIENCE])),
    "nbf-in-the-past": lambda k: hs256(claims(nbf=int(time.time()) - 10)),
    "unknown-header-members-ignored": lambda k: hs256(claims(), {"alg": "HS256", "x-y": [1]}),
    "4096-characters": _control_near_the_limit,
}


@pytest.mark.parametrize("case", sorted(CONTROLS))
def test_hand_minted_controls_pass(make_app: Maker, store: KeyStore, keys: Keys, case: str) -> None:
    token = CONTROLS[case](keys)
    app = make_app(catalogue_config(store, keys))
    reply = app.get("/whoami", bearer(token))
    assert reply.status == 200, reply.body
    assert reply.json()["client"]["client_id"] == "acme"
    assert reply.json()["client"]["scheme"] == "jwt"


def _none_token(variant: str, signature: str) -> Callable[[Keys], str]:
    return lambda k: f"{unsigned({'alg': variant, 'typ': 'JWT'}, claims())}.{signature}"


def _signature_of_another_token(k: Keys) -> str:
    mine = hs256(claims(sub="acme"))
    theirs = hs256(claims(sub="admin"))
    return replace_signature(theirs, mine.split(".")[2])


def _es_signature_of_another_token(k: Keys) -> str:
    mine = es256(claims(sub="acme"), k.idp)
    theirs = unsigned(ES_HEADER, claims(sub="admin"))
    return f"{theirs}.{mine.split('.')[2]}"


def _es_token_with_signature(signature: Callable[[bytes], bytes]) -> Callable[[Keys], str]:
    def make(k: Keys) -> str:
        token = es256(claims(), k.idp)
        real = urlsafe_b64decode_nopad(token.split(".")[2])
        return replace_signature(token, signature(real))

    return make


def urlsafe_b64decode_nopad(segment: str) -> bytes:
    return urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _self_signed_cert(key: ec.EllipticCurvePrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "attacker")])
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


def _oversize(target: int) -> Callable[[Keys], str]:
    def make(k: Keys) -> str:
        token = hs256(claims(pad="y" * (target * 3 // 4)))
        assert len(token) > target
        return token

    return make


def _nested_payload(k: Keys) -> str:
    depth = 1100  # deeper than Python's default recursion limit, still under 4096 characters
    token = hs256(with_raw(claims(), "x", "[" * depth + "]" * depth))
    assert len(token) <= 4096
    return token


def _expired(k: Keys) -> str:
    now = int(time.time())
    return hs256(claims(iat=now - 600, exp=now - 60))


def _future(name: str) -> Callable[[Keys], str]:
    return lambda k: hs256(claims(**{name: int(time.time()) + 3600}))


def _raw_claim(name: str, literal: str) -> Callable[[Keys], str]:
    """A claim whose value is any JSON text (or not-quite-JSON text such as NaN)."""
    return lambda k: hs256(with_raw(claims(**{name: _DROP}), name, literal))


def _claim(**changes: Any) -> Callable[[Keys], str]:
    return lambda k: hs256(claims(**changes))


def _header(header: Mapping[str, Any] | str | bytes) -> Callable[[Keys], str]:
    """A validly HS256-signed token with this header."""
    return lambda k: hs256(claims(), header)


def _payload(payload: str | bytes) -> Callable[[Keys], str]:
    return lambda k: hs256(payload)


def _json_serialization_payload_only(k: Keys) -> str:
    return json.dumps({"payload": b64url(json.dumps(claims()).encode())}, separators=(",", ":"))


def _jwe(k: Keys) -> str:
    header = b64url(json.dumps({"alg": "RSA-OAEP", "enc": "A256GCM", "kid": "ec-1"}).encode())
    parts = [b64url(bytes([i]) * 40) for i in range(1, 5)]
    return ".".join([header, *parts])


def _jwe_dir(k: Keys) -> str:
    # "dir" with an empty encrypted key: the one JWE form with an empty segment.
    header = b64url(json.dumps({"alg": "dir", "enc": "A128CBC-HS256"}).encode())
    return f"{header}..{b64url(b'iv' * 8)}.{b64url(b'ciphertext')}.{b64url(b'tag' * 6)}"


ATTACKS: dict[str, Callable[[Keys], str]] = {
    # -- alg "none", in any spelling, with and without a signature
    **{
        f"alg-{variant}-{kind}": _none_token(variant, signature)
        for variant in ("none", "None", "NONE", "nOnE")
        for kind, signature in (("empty-signature", ""), ("with-signature", b64url(b"sig" * 11)))
    },
    "alg-none-signed-with-the-secret": _header({"alg": "none", "typ": "JWT"}),
    "alg-missing": _header({"typ": "JWT"}),
    "alg-null": _header({"alg": None}),
    "alg-list": _header({"alg": ["HS256"]}),
    "alg-lowercase": _header({"alg": "hs256"}),
    "alg-with-space": _header({"alg": "HS256 "}),
    "alg-not-allowed-hs512": _header({"alg": "HS512"}),
    # -- signatures stripped, cut, swapped
    "signature-stripped-trailing-dot": lambda k: unsigned(HS_HEADER, claims()) + ".",
    "signature-stripped-two-segments": lambda k: unsigned(HS_HEADER, claims()),
    "signature-truncated-by-one": lambda k: hs256(claims())[:-1],
    "signature-truncated-by-two": lambda k: hs256(claims())[:-2],
    "signature-truncated-to-half": lambda k: (t := hs256(claims()))[: len(t) - 22],
    "signature-es256-truncated": lambda k: es256(claims(), k.idp)[:-4],
    "signature-of-another-token": _signature_of_another_token,
    "signature-es256-of-another-token": _es_signature_of_another_token,
    "signature-one-char-changed": lambda k: (
        (t := hs256(claims()))[:-20] + ("A" if t[-20] != "A" else "B") + t[-19:]
    ),
    # -- algorithm confusion inside the server's own key set
    "hs256-signed-with-ec-public-pem-under-its-kid": lambda k: hs256(
        claims(), {"alg": "HS256", "kid": "ec-1"}, Keys.pem(k.idp)
    ),
    "hs256-signed-with-ec-public-pem-no-kid": lambda k: hs256(
        claims(), {"alg": "HS256"}, Keys.pem(k.idp)
    ),
    "hs256-signed-with-ec-public-der": lambda k: hs256(claims(), {"alg": "HS256"}, Keys.der(k.idp)),
    "hs256-signed-with-ec-jwk-json": lambda k: hs256(
        claims(), {"alg": "HS256"}, json.dumps(Keys.jwk(k.idp, "ec-1")).encode()
    ),
    # the real secret, but the kid names the EC key: a kid never lends a key to another alg
    "kid-of-ec-key-on-an-hs256-token": _header({"alg": "HS256", "kid": "ec-1"}),
    "kid-of-hmac-key-on-an-es256-token": lambda k: es256(
        claims(), k.attacker, {"alg": "ES256", "kid": "hmac-1"}
    ),
    # -- the token brings its own key
    "embedded-jwk": lambda k: es256(
        claims(), k.attacker, {"alg": "ES256", "jwk": Keys.jwk(k.attacker, None)}
    ),
    "embedded-jwk-with-a-real-kid": lambda k: es256(
        claims(), k.attacker, {"alg": "ES256", "kid": "ec-1", "jwk": Keys.jwk(k.attacker, "ec-1")}
    ),
    "embedded-oct-jwk": lambda k: hs256(
        claims(),
        {"alg": "HS256", "jwk": {"kty": "oct", "k": b64url(b"attacker-secret" * 3)}},
        b"attacker-secret" * 3,
    ),
    "embedded-x5c": lambda k: es256(
        claims(),
        k.attacker,
        {"alg": "ES256", "x5c": [b64encode(_self_signed_cert(k.attacker)).decode()]},
    ),
    # -- kid injection
    "kid-path-traversal-dev-null": lambda k: hs256(
        claims(), {"alg": "HS256", "kid": "../../../../../../dev/null"}, b""
    ),
    "kid-sql-injection": lambda k: hs256(
        claims(), {"alg": "HS256", "kid": "' OR 1=1 --"}, b"attacker-secret"
    ),
    "kid-sql-union": lambda k: hs256(
        claims(),
        {"alg": "HS256", "kid": "x' UNION SELECT 'attacker-secret' --"},
        b"attacker-secret",
    ),
    "kid-command-injection": lambda k: hs256(
        claims(), {"alg": "HS256", "kid": "hmac-1|cat /etc/passwd"}, b"attacker-secret"
    ),
    "kid-url": lambda k: es256(
        claims(), k.attacker, {"alg": "ES256", "kid": "http://127.0.0.1:9/k"}
    ),
    # the real secret: the kid must match exactly, and be a string
    "kid-wrong-case": _header({"alg": "HS256", "kid": "HMAC-1"}),
    "kid-with-nul": _header({"alg": "HS256", "kid": "hmac-1\u0000"}),
    "kid-empty": _header({"alg": "HS256", "kid": ""}),
    "kid-number": _header({"alg": "HS256", "kid": 1}),
    "kid-list": _header({"alg": "HS256", "kid": ["hmac-1"]}),
    # -- degenerate ECDSA signatures (CVE-2022-21449 and friends)
    "es256-all-zero-signature": _es_token_with_signature(lambda real: bytes(64)),
    "es256-r-s-zero-der": _es_token_with_signature(lambda real: encode_dss_signature(0, 0)),
    "es256-r-s-equal-n": _es_token_with_signature(lambda real: P256_N.to_bytes(32, "big") * 2),
    "es256-r-zero": _es_token_with_signature(lambda real: bytes(32) + real[32:]),
    "es256-s-zero": _es_token_with_signature(lambda real: real[:32] + bytes(32)),
    "es256-63-bytes": _es_token_with_signature(lambda real: real[:-1]),
    "es256-65-bytes": _es_token_with_signature(lambda real: real + b"\x00"),
    "es256-empty-signature": lambda k: unsigned(ES_HEADER, claims()) + ".",
    "es256-signed-by-attacker": lambda k: es256(claims(), k.attacker),
    # -- crit and b64
    "crit-exp": _header({"alg": "HS256", "crit": ["exp"], "exp": 9999999999}),
    "crit-b64": _header({"alg": "HS256", "crit": ["b64"], "b64": False}),
    "crit-unknown": _header({"alg": "HS256", "crit": ["x-acme"], "x-acme": True}),
    "crit-empty": _header({"alg": "HS256", "crit": []}),
    "b64-false-without-crit": _header({"alg": "HS256", "b64": False}),
    # -- size
    "oversize-4097-plus": _oversize(4096),
    "oversize-100-kb": _oversize(100_000),
    "oversize-header": _header({"alg": "HS256", "x-pad": "p" * 1600}),
    "payload-nested-deeper-than-the-recursion-limit": _nested_payload,
    # -- exp / nbf / iat
    "exp-missing": _claim(exp=_DROP),
    "exp-in-the-past": _expired,
    "exp-string": _claim(exp="9999999999"),
    "exp-true": _claim(exp=True),
    "exp-false": _claim(exp=False),
    "exp-null": _claim(exp=None),
    "exp-list": _claim(exp=[9999999999]),
    "exp-object": _claim(exp={"$numberLong": "9999999999"}),
    "exp-nan-literal": _raw_claim("exp", "NaN"),
    "exp-infinity-literal": _raw_claim("exp", "Infinity"),
    "exp-1e400": _raw_claim("exp", "1e400"),
    "exp-integer-too-large-for-a-float": _raw_claim("exp", "1" + "0" * 400),
    "nbf-in-the-future": _future("nbf"),
    "nbf-string": _claim(nbf="0"),
    "nbf-nan-literal": _raw_claim("nbf", "NaN"),
    "iat-in-the-future": _future("iat"),
    "iat-string": _claim(iat="0"),
    # -- aud (ours: "api")
    "aud-api2": _claim(aud="api2"),
    "aud-prefix": _claim(aud="ap"),
    "aud-trailing-space": _claim(aud="api "),
    "aud-other-case": _claim(aud="API"),
    "aud-list-without-ours": _claim(aud=["x", "apix"]),
    "aud-number": _claim(aud=1),
    "aud-list-with-non-strings": _claim(aud=[AUDIENCE, 1]),
    "aud-object": _claim(aud={AUDIENCE: 1}),
    "aud-null": _claim(aud=None),
    "aud-empty-string": _claim(aud=""),
    "aud-empty-list": _claim(aud=[]),
    "aud-missing": _claim(aud=_DROP),
    # -- iss (ours: "https://idp.example")
    "iss-trailing-slash": _claim(iss=ISSUER + "/"),
    "iss-prefix": _claim(iss=ISSUER[:-1]),
    "iss-suffix": _claim(iss=ISSUER + ".evil"),
    "iss-with-port": _claim(iss="https://idp.example:443"),
    "iss-http": _claim(iss="http://idp.example"),
    "iss-other-case": _claim(iss=ISSUER.upper()),
    "iss-list": _claim(iss=[ISSUER]),
    "iss-null": _claim(iss=None),
    "iss-missing": _claim(iss=_DROP),
    # -- who the client is
    "no-client-id-or-sub": _claim(sub=_DROP),
    "client-id-number": _claim(client_id=7),
    "client-id-empty": _claim(client_id=""),
    "sub-list": _claim(sub=["acme"]),
    "scope-number": _claim(scope=5),
    "scp-list-with-non-strings": _claim(scope=_DROP, scp=["orders:read", 1]),
    # -- not a compact JWS
    "jwe-five-segments": _jwe,
    "jwe-dir-five-segments": _jwe_dir,
    "four-segments": lambda k: hs256(claims()) + "." + b64url(b"more"),
    "json-serialization-payload-only": _json_serialization_payload_only,
    "only-dots": lambda k: "..",
    "empty-header-segment": lambda k: "." + hs256(claims()).split(".", 1)[1],
    # -- junk characters
    "junk-space-inside": lambda k: insert(hs256(claims()), 20, " "),
    "junk-tab-inside": lambda k: insert(hs256(claims()), 20, "\t"),
    "junk-latin1-letter": lambda k: insert(hs256(claims()), 20, "\u00e9"),
    "junk-percent": lambda k: insert(hs256(claims()), 20, "%"),
    "junk-percent-encoded-dot": lambda k: hs256(claims()).replace(".", "%2E", 1),
    "junk-base64-padding": lambda k: (
        (t := hs256(claims())) + "=" * (-len(t.split(".")[2]) % 4 or 1)
    ),
    "junk-padding-on-every-segment": lambda k: ".".join(
        part + "=" * (-len(part) % 4 or 4) for part in hs256(claims()).split(".")
    ),
    "junk-standard-base64-alphabet": lambda k: insert(hs256(claims()), 20, "+/"),
    # -- duplicate members: a last-wins parser would read a different token
    "header-duplicate-alg": _header('{"alg":"none","alg":"HS256"}'),
    "header-duplicate-alg-same-value": _header('{"alg":"HS256","alg":"HS256"}'),
    "header-duplicate-kid": _header('{"alg":"HS256","kid":"ec-1","kid":"hmac-1"}'),
    "payload-duplicate-sub": lambda k: hs256(with_raw(claims(sub="nobody"), "sub", '"acme"')),
    "payload-duplicate-exp": lambda k: hs256(
        with_raw(claims(exp=int(time.time()) - 60), "exp", str(int(time.time()) + 300))
    ),
    "payload-duplicate-aud": lambda k: hs256(with_raw(claims(aud="other"), "aud", '"api"')),
    # -- header / payload not JSON objects (each validly signed)
    "header-array": _header("[]"),
    "header-string": _header('"HS256"'),
    "header-number": _header("256"),
    "header-null": _header("null"),
    "header-not-json": _header("alg=HS256"),
    "header-not-utf8": _header(b'{"alg":"HS256","x":"\xff\xfe"}'),
    "header-nan": _header('{"alg":"HS256","x":NaN}'),
    "payload-array": _payload('[{"sub":"acme","exp":9999999999}]'),
    "payload-string": _payload('"acme"'),
    "payload-number": _payload("9999999999"),
    "payload-null": _payload("null"),
    "payload-empty": _payload(""),
    "payload-not-json": _payload("sub=acme&exp=9999999999"),
    "payload-not-utf8": lambda k: hs256(
        with_raw(claims(), "x", '"caf\xe9"').encode("latin-1"),
    ),
}


@pytest.fixture(scope="module")
def catalogue_apps() -> dict[str, Any]:
    return {}


@pytest.fixture
def catalogue_app(
    make_app: Maker, framework: str, keys: Keys, catalogue_apps: dict[str, Any]
) -> Any:
    """One catalogue app per framework, shared by the attack cases (they never get in)."""
    app = catalogue_apps.get(framework)
    if app is None:
        store = open_key_store("memory://")
        app = catalogue_apps[framework] = make_app(
            catalogue_config(store, keys, default_limits="100000/minute")
        )
    return app


@pytest.mark.parametrize("case", sorted(ATTACKS))
def test_attack_is_401_invalid_token(catalogue_app: Any, keys: Keys, case: str) -> None:
    token = ATTACKS[case](keys)
    assert_invalid_token(catalogue_app.get("/whoami", bearer(token)), token)


_B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@pytest.mark.parametrize("alg", ["HS256", "ES256"])
def test_non_canonical_base64url_signature_is_refused(
    catalogue_app: Any, keys: Keys, alg: str
) -> None:
    token = hs256(claims()) if alg == "HS256" else es256(claims(), keys.idp)
    head, payload, signature = token.split(".")
    # 43 (HS256) or 86 (ES256) characters: the last one carries 2 or 4 unused bits,
    # zero in the canonical form; setting the lowest gives the same signature bytes.
    last = _B64URL[_B64URL.index(signature[-1]) | 1]
    respelled = f"{head}.{payload}.{signature[:-1]}{last}"
    assert respelled != token
    assert urlsafe_b64decode_nopad(respelled.split(".")[2]) == urlsafe_b64decode_nopad(signature)
    assert_invalid_token(catalogue_app.get("/whoami", bearer(respelled)), respelled)


def test_both_ecdsa_spellings_of_one_token_verify_and_share_one_budget(
    make_app: Maker, store: KeyStore, keys: Keys
) -> None:
    """ECDSA is malleable: with (r, s) valid, (r, n - s) is too. Identity providers'
    signers emit either (low-S is Bitcoin's rule, not JOSE's), so both are accepted:
    refusing high-S would refuse real tokens. The two texts then name one client,
    and each spelling is its own entry in the verified-token cache; that is harmless
    because nothing is counted or revoked per token text: the limits charge the
    client, whichever spelling it sends."""
    app = make_app(catalogue_config(store, keys, default_limits="10/minute"))
    token = es256(claims(), keys.idp)
    raw = urlsafe_b64decode_nopad(token.split(".")[2])
    r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    other = replace_signature(token, r.to_bytes(32, "big") + (P256_N - s).to_bytes(32, "big"))
    assert other != token
    left = []
    for spelling in (token, other, token, other):
        reply = app.get("/whoami", bearer(spelling))
        assert reply.status == 200, reply.body
        assert reply.json()["client"]["client_id"] == "acme"
        left.append(remaining(reply))
    assert left == [9, 8, 7, 6]  # one budget, charged once per request


def _json_serialization(k: Keys) -> str:
    token = hs256(claims())
    protected, payload, signature = token.split(".")
    return json.dumps({"payload": payload, "protected": protected, "signature": signature})


def test_jws_json_serialization_is_401_invalid_token(
    make_app: Maker, store: KeyStore, keys: Keys
) -> None:
    token = _json_serialization(keys)
    app = make_app(catalogue_config(store, keys))
    assert_invalid_token(app.get("/whoami", bearer(token)), token)


# -- the clock: exp, nbf and the leeway at their boundaries ---------------------------------


@pytest.fixture
def frozen_now(monkeypatch: pytest.MonkeyPatch) -> int:
    """Freeze the verifier's clock (the adapters all reach it) at a whole second ahead."""
    now = int(time.time()) + 1000
    monkeypatch.setattr(tokens_module, "time", lambda: float(now))
    return now


def test_exp_equal_to_now_is_expired(
    make_app: Maker, store: KeyStore, keys: Keys, frozen_now: int
) -> None:
    app = make_app(catalogue_config(store, keys))
    at_now = hs256(claims(exp=frozen_now))
    assert_invalid_token(app.get("/whoami", bearer(at_now)), at_now)
    one_second_later = hs256(claims(exp=frozen_now + 1))
    assert app.get("/whoami", bearer(one_second_later)).status == 200


def test_nbf_boundary(make_app: Maker, store: KeyStore, keys: Keys, frozen_now: int) -> None:
    app = make_app(catalogue_config(store, keys))
    later = hs256(claims(nbf=frozen_now + 1, exp=frozen_now + 300))
    assert_invalid_token(app.get("/whoami", bearer(later)), later)
    at_now = hs256(claims(nbf=frozen_now, exp=frozen_now + 300))
    assert app.get("/whoami", bearer(at_now)).status == 200


def test_leeway_bounds_exp_and_nbf(
    make_app: Maker, store: KeyStore, keys: Keys, frozen_now: int
) -> None:
    app = make_app(catalogue_config(store, keys, jwt_leeway=30))
    for ok in (
        hs256(claims(exp=frozen_now - 29)),
        hs256(claims(nbf=frozen_now + 30, exp=frozen_now + 300)),
    ):
        assert app.get("/whoami", bearer(ok)).status == 200, ok
    for bad in (
        hs256(claims(exp=frozen_now - 30)),
        hs256(claims(nbf=frozen_now + 31, exp=frozen_now + 300)),
    ):
        assert_invalid_token(app.get("/whoami", bearer(bad)), bad)


# -- algorithm confusion against an RSA public key -----------------------------------------


def _rsa_jwks(keys: Keys) -> dict[str, Any]:
    return {"keys": [Keys.jwk(keys.rsa_key, "rsa-1")]}


RSA_CONFIGS: dict[str, Callable[[Keys], dict[str, Any]]] = {
    "pem-default-algorithms": lambda k: {"jwt_keys": Keys.pem(k.rsa_key).decode()},
    "pem-rs256-and-hs256": lambda k: {
        "jwt_keys": Keys.pem(k.rsa_key).decode(),
        "jwt_algorithms": ["RS256", "HS256"],
    },
    "pem-plus-an-hmac-secret": lambda k: {
        "jwt_keys": [Keys.pem(k.rsa_key).decode(), SECRET.decode()]
    },
    "jwks-rs256-and-hs256": lambda k: {
        "jwt_keys": _rsa_jwks(k),
        "jwt_algorithms": ["RS256", "HS256"],
    },
}


@pytest.mark.parametrize("setup", sorted(RSA_CONFIGS))
def test_rsa_public_key_as_hmac_secret_is_refused(
    make_app: Maker, store: KeyStore, keys: Keys, setup: str
) -> None:
    app = make_app(config(store, **RSA_CONFIGS[setup](keys)))
    # The server's own RS256 tokens pass: the configuration is live.
    genuine = pyjwt.encode(claims(), keys.rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})
    assert app.get("/whoami", bearer(genuine)).status == 200
    pem = Keys.pem(keys.rsa_key)
    secrets = {
        "pem": pem,
        "pem-without-final-newline": pem.rstrip(b"\n"),
        "der": Keys.der(keys.rsa_key),
        "jwk-json": json.dumps(Keys.jwk(keys.rsa_key, "rsa-1")).encode(),
    }
    for name, secret in secrets.items():
        for header in ({"alg": "HS256", "typ": "JWT"}, {"alg": "HS256", "kid": "rsa-1"}):
            forged = hs256(claims(sub=f"forged-{name}"), header, secret)
            assert_invalid_token(app.get("/whoami", bearer(forged)), forged)


def test_config_refuses_hs256_only_with_an_rsa_key(keys: Keys) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.from_mapping(
            {
                "schemes": ["jwt"],
                "jwt_keys": Keys.pem(keys.rsa_key).decode(),
                "jwt_algorithms": ["HS256"],
            }
        )
    assert raised.value.field == "jwt_algorithms"


@pytest.mark.parametrize("none", ["none", "None", "NONE", "nOnE"])
def test_config_refuses_alg_none(none: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.from_mapping(
            {"schemes": ["jwt"], "jwt_keys": SECRET.decode(), "jwt_algorithms": ["HS256", none]}
        )
    assert raised.value.field == "jwt_algorithms"


# == 3. a live JWKS endpoint ==============================================================


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    connections = 0

    def verify_request(self, request: Any, client_address: Any) -> bool:
        self.connections += 1  # every connection, whatever it asks for
        return True


class FakeIdP:
    """An HTTP server on 127.0.0.1: serves ``document`` as JSON (or ``status``), counts hits.

    With ``gate`` set, each request waits (up to 2 s) until the gate opens;
    ``gate_opened`` records whether it did.
    """

    def __init__(self) -> None:
        self.document: dict[str, Any] = {"keys": []}
        self.status = 200
        self.hits: list[str] = []
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        self.gate_opened: bool | None = None
        self._lock = threading.Lock()
        self.server = _Server(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def url(self) -> str:
        return self.base + "/.well-known/jwks.json"

    @property
    def connections(self) -> int:
        return self.server.connections

    def close(self) -> None:
        if self.gate is not None:
            self.gate.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with idp._lock:
                    idp.hits.append(self.path)
                gate = idp.gate
                if gate is not None:
                    idp.entered.set()
                    idp.gate_opened = gate.wait(2.0)
                if idp.status == 200:
                    body = json.dumps(idp.document).encode()
                else:
                    body = b'{"error": "down"}'
                self.send_response(idp.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_HEAD = do_GET

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


def _server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeIdP]:
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    server = FakeIdP()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def idp(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeIdP]:
    yield from _server(monkeypatch)


@pytest.fixture
def attacker(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeIdP]:
    yield from _server(monkeypatch)


def jwks_config(store: KeyStore, idp: FakeIdP, **overrides: Any) -> dict[str, Any]:
    return config(store, jwt_jwks_url=idp.url, **overrides)


def _signed(key: ec.EllipticCurvePrivateKey, kid: str, **changes: Any) -> str:
    return es256(claims(**changes), key, {"alg": "ES256", "kid": kid, "typ": "JWT"})


def test_jwks_is_fetched_once_then_cached(
    make_app: Maker, store: KeyStore, keys: Keys, idp: FakeIdP
) -> None:
    idp.document = {"keys": [Keys.jwk(keys.idp, "ec-1")]}
    app = make_app(jwks_config(store, idp))
    for _ in range(4):
        token = _signed(keys.idp, "ec-1")  # a new token each time: no answer from the cache
        reply = app.get("/whoami", bearer(token))
        assert reply.status == 200, reply.body
        assert reply.json()["client"]["client_id"] == "acme"
    assert idp.hits == ["/.well-known/jwks.json"]


def test_a_rotated_key_is_picked_up_with_one_fetch(
    make_app: Maker, store: KeyStore, keys: Keys, idp: FakeIdP
) -> None:
    idp.document = {"keys": [Keys.jwk(keys.idp, "ec-1")]}
    app = make_app(jwks_config(store, idp))
    assert app.get("/ping", bearer(_signed(keys.idp, "ec-1"))).status == 200
    assert len(idp.hits) == 1
    idp.document = {"keys": [Keys.jwk(keys.idp, "ec-1"), Keys.jwk(keys.idp_next, "ec-2")]}
    assert app.get("/ping", bearer(_signed(keys.idp, "ec-1"))).status == 200
    assert len(idp.hits) == 1  # a known kid: no fetch
    reply = app.get("/ping", bearer(_signed(keys.idp_next, "ec-2")))
    assert reply.status == 200, reply.body
    assert len(idp.hits) == 2
    for key, kid in ((keys.idp_next, "ec-2"), (keys.idp, "ec-1"), (keys.idp_next, "ec-2")):
        assert app.get("/ping", bearer(_signed(key, kid))).status == 200
    assert len(idp.hits) == 2


def test_a_flood_of_forged_kids_costs_at_most_one_fetch(
    make_app: Maker, store: KeyStore, keys: Keys, idp: FakeIdP
) -> None:
    idp.document = {"keys": [Keys.jwk(keys.idp, "ec-1")]}
    app = make_app(jwks_config(store, idp))
    assert app.get("/ping", bearer(_signed(keys.idp, "ec-1"))).status == 200
    assert len(idp.hits) == 1
    for i in range(20):
        forged = _signed(keys.attacker, f"forged-{i}")
        assert_invalid_token(app.get("/ping", bearer(forged)), forged)
    assert len(idp.hits) <= 2
    # The genuine key still works, with no further fetch.
    assert app.get("/ping", bearer(_signed(keys.idp, "ec-1"))).status == 200
    assert len(idp.hits) <= 2


def test_an_idp_outage_keeps_the_last_good_keys(
    make_app: Maker, store: KeyStore, keys: Keys, idp: FakeIdP
) -> None:
    idp.document = {"keys": [Keys.jwk(keys.idp, "ec-1")]}
    app = make_app(jwks_config(store, idp))
    assert app.get("/ping", bearer(_signed(keys.idp, "ec-1"))).status == 200
    idp.status = 500
    # An unknown kid makes it try the endpoint, which now fails.
    unknown = _signed(keys.idp_next, "ec-2")
    assert_invalid_token(app.get("/ping", bearer(unknown)), unknown)
    assert len(idp.hits) == 2
    for _ in range(3):
        reply = app.get("/ping", bearer(_signed(keys.idp, "ec-1")))
        assert reply.status == 200, reply.body
    assert len(idp.hits) == 2


def test_an_idp_down_from_the_start_is_503_and_not_hammered(
    make_app: Maker, store: KeyStore, keys: Keys, idp: FakeIdP
) -> None:
    idp.status = 500
    app = make_app(jwks_config(store, idp))
    for _ in range(3):
        token = _signed(keys.idp, "ec-1")
        reply = app.get("/ping", bearer(token))
        assert_problem(reply, 503, "temporarily_unavailable", token)
        assert re.fullmatch(r"[0-9]+", reply.headers["Retry-After"])
    assert len(idp.hits) == 1
    # Garbage is still a 401, outage or not: it never needs a key.
    assert_invalid_token(app.get("/ping", bearer("x.y.z")), "x.y.z")


@pytest.mark.parametrize("source", ["static-keys", "jwks-url"])
@pytest.mark.parametrize("member", ["jku", "x5u"])
def test_jku_and_x5u_are_never_fetched(
    make_app: Maker,
    store: KeyStore,
    keys: Keys,
    idp: FakeIdP,
    attacker: FakeIdP,
    member: str,
    source: str,
) -> None:
    attacker.document = {
        "keys": [Keys.jwk(keys.attacker, "attacker-1"), Keys.jwk(keys.attacker, "ec-1")]
    }
    idp.document = {"keys": [Keys.jwk(keys.idp, "ec-1")]}
    if source == "jwks-url":
        app = make_app(jwks_config(store, idp))
    else:
        app = make_app(catalogue_config(store, keys))
    url = attacker.url if member == "jku" else attacker.base + "/cert.pem"
    for kid in ("attacker-1", "ec-1", None):
        header: dict[str, Any] = {"alg": "ES256", member: url}
        if kid is not None:
            header["kid"] = kid
        forged = es256(claims(), keys.attacker, header)
        assert_invalid_token(app.get("/whoami", bearer(forged)), forged)
    assert attacker.connections == 0
    assert attacker.hits == []
    assert len(idp.hits) <= 2


async def _st_ping(request: Request) -> Response:
    return PlainTextResponse("pong")


def test_starlette_fetches_the_jwks_off_the_event_loop(
    store: KeyStore, keys: Keys, idp: FakeIdP
) -> None:
    """The IdP holds its answer until a coroutine on the loop opens a gate.

    That coroutine can only run while the fetch is in flight if the fetch
    does not block the loop; if it did, the gate would time out (2 s) and
    ``gate_opened`` would be False. The fetching thread is recorded as well.
    """
    idp.document = {"keys": [Keys.jwk(keys.idp, "ec-1")]}
    idp.gate = threading.Event()
    engine = Engine(Settings(**jwks_config(store, idp)))
    jwks = engine.tokens.jwks if engine.tokens is not None else None
    assert jwks is not None
    fetch_threads: list[int] = []
    real_fetch = jwks.fetch

    def recording_fetch(url: str, timeout: float) -> tuple[bytes, str | None]:
        fetch_threads.append(threading.get_ident())
        return real_fetch(url, timeout)

    jwks.fetch = recording_fetch
    app = M2MMiddleware(
        Starlette(routes=[Route("/ping", _st_ping, methods=["GET"])]), engine=engine
    )
    token = _signed(keys.idp, "ec-1")

    async def main() -> tuple[int, httpx.Response, bool]:
        loop = asyncio.get_running_loop()
        gate = idp.gate
        assert gate is not None

        async def open_gate() -> bool:
            deadline = loop.time() + 2.0
            while not idp.entered.is_set():
                if loop.time() > deadline:
                    return False
                await asyncio.sleep(0.002)
            gate.set()
            return True

        opener = asyncio.create_task(open_gate())
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            response = await client.get("/ping", headers=bearer(token))
        return threading.get_ident(), response, await opener

    loop_thread, response, opened_by_loop = asyncio.run(main())
    assert response.status_code == 200, response.text
    assert opened_by_loop
    assert idp.gate_opened is True, "the JWKS fetch blocked the event loop"
    assert len(fetch_threads) == 1
    assert fetch_threads[0] != loop_thread


# == 4. a slow JWKS endpoint cannot stall the service =====================================


class _Clock:
    """A monotonic clock the test moves, for the JWKS client's max-age."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def slow_idp(keys: Keys, monkeypatch: pytest.MonkeyPatch) -> Iterator[SlowJWKS]:
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    server = SlowJWKS({"keys": [Keys.jwk(keys.idp, "ec-1")]})
    server.byte_interval = 0.2  # each read well within the 1 s timeout
    server.limit = 6.0
    try:
        yield server
    finally:
        server.close()


#: Far below any stall here, and generous for a loaded two-core machine.
PROMPT = 0.5


def test_a_trickling_jwks_holds_a_new_token_for_the_timeout_only(
    make_app: Maker, store: KeyStore, keys: Keys, slow_idp: SlowJWKS
) -> None:
    """A byte every 0.2 s: each read beats a 1 s socket timeout; only a deadline
    over the whole fetch stops it (before, the answer took the server's 6 s)."""
    slow_idp.mode = "trickle"
    app = make_app(config(store, jwt_jwks_url=slow_idp.url, jwt_jwks_timeout=1.0))
    token = _signed(keys.idp, "ec-1")
    start = time.monotonic()
    reply = app.get("/ping", bearer(token))
    took = time.monotonic() - start
    assert_problem(reply, 503, "temporarily_unavailable", token)  # no key set to be had
    assert took < 1.0 + PROMPT


def test_a_known_kid_is_served_while_a_slow_refresh_runs(
    make_app: Maker, store: KeyStore, keys: Keys, slow_idp: SlowJWKS
) -> None:
    app = make_app(config(store, jwt_jwks_url=slow_idp.url, jwt_jwks_timeout=3.0))
    jwks = app.engine().tokens.jwks  # type: ignore[union-attr]
    assert jwks is not None
    clock = jwks.clock = _Clock()
    assert app.get("/ping", bearer(_signed(keys.idp, "ec-1"))).status == 200
    assert slow_idp.hits == 1
    slow_idp.mode = "trickle"
    clock.now += 301  # past the set's max-age (300): due for a refresh
    for _ in range(3):
        start = time.monotonic()
        reply = app.get("/ping", bearer(_signed(keys.idp, "ec-1")))  # new tokens: not cached
        assert reply.status == 200, reply.body
        assert time.monotonic() - start < PROMPT  # served from the stale set, not held
    assert slow_idp.slow_started.wait(5)  # the refresh did start, behind the requests
    assert slow_idp.hits == 2  # and only once
