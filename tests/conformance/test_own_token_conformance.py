"""Tokens of our own issuer through all three adapters (issue 12 item 4).

The apps are configured as a deployment with the token service is
(``token_endpoint``, ``token_issuer``, ``signing_key_secret``); tokens are signed
here the way the endpoint signs them, with the signing keys in the same key
store (``signing_keys_for(settings, store=store)``), so these cases do not need
the endpoint itself. What they pin: the token is the key's client (scopes,
tier, key id), every RFC 9068 / 8725 rule refuses with 401 ``invalid_token``
in each framework, revoking the key refuses its tokens at once, and a token
takes no use from a usage-limited key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from base64 import urlsafe_b64encode
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from joserfc import jwt as jose_jwt
from joserfc.jwk import ECKey
from test_http_conformance import assert_problem

from m2m_middleware import KeyRecord, KeyStore, Settings, open_key_store
from m2m_middleware.issuer import SigningKeys, signing_keys_for

Maker = Callable[[Mapping[str, Any]], Any]

ISSUER = "https://api.example.test"
SIGNING_SECRET = "own-token conformance signing secret"
ORDERS_RULE = {"path": "/orders", "scopes": ["orders:read"]}


@dataclass
class OwnIssuer:
    """A key store holding API keys and signing keys, and the app built on it."""

    store: KeyStore
    keys: SigningKeys
    app: Any

    def key(self, *scopes: str, **options: Any) -> KeyRecord:
        return self.store.create_key("billing", scopes=scopes, **options).record

    def token(self, record: KeyRecord, **changes: Any) -> str:
        """What the endpoint would issue for ``record``; ``changes`` override (``...`` drops)."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "sub": record.client_id,
            "client_id": record.client_id,
            "aud": ISSUER,
            "exp": now + 300,
            "iat": now,
            "jti": secrets.token_urlsafe(12),
            "scope": " ".join(sorted(record.scopes)),
            "key_id": record.key_id,
        }
        if record.tier is not None:
            claims["tier"] = record.tier
        claims.update(changes)
        claims = {name: value for name, value in claims.items() if value is not ...}
        return self.keys.current_signing_key().sign(claims)


def own_config(store: KeyStore, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "key_store": store,
        "schemes": ["api_key", "jwt"],
        "token_endpoint": "/oauth/token",
        "token_issuer": ISSUER,
        "signing_key_secret": SIGNING_SECRET,
        "rate_limit_storage": "memory://",
        "default_limits": "100/minute",
        "tiers": {"gold": "50/minute"},
        "routes": [ORDERS_RULE],
        "key_cache_ttl": 3600,  # only the revocation itself may end a cached token
    }
    values.update(overrides)
    return values


@pytest.fixture
def make_own(make_app: Maker) -> Callable[..., OwnIssuer]:
    """``make_own(**settings)``: an app trusting our own issuer, and a way to sign its tokens."""

    def build(**overrides: Any) -> OwnIssuer:
        store = open_key_store("memory://")
        config = own_config(store, **overrides)
        keys = signing_keys_for(Settings(**config), store=store)  # as the endpoint has them
        return OwnIssuer(store, keys, make_app(config))

    return build


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_invalid_token(reply: Any, token: str, detail: str = "") -> None:
    problem = assert_problem(reply, 401, "invalid_token", secrets=(token,))
    assert reply.headers["WWW-Authenticate"].startswith("Bearer ")
    assert 'error="invalid_token"' in reply.headers["WWW-Authenticate"]
    assert detail in problem["detail"], problem


def test_our_token_is_the_key_s_client(make_own: Callable[..., OwnIssuer]) -> None:
    own = make_own()
    record = own.key("orders:read", "orders:write", tier="gold")
    token = own.token(record)
    reply = own.app.get("/whoami", bearer(token))
    assert reply.status == 200, reply.body
    client = reply.json()["client"]
    assert client["client_id"] == "billing"
    assert client["scheme"] == "jwt"
    assert client["scopes"] == ["orders:read", "orders:write"]
    assert client["tier"] == "gold"
    assert client["key_id"] == record.key_id
    assert client["claims"]["key_id"] == record.key_id and client["claims"]["iss"] == ISSUER
    assert reply.headers["RateLimit-Policy"] == '"tier.gold-60s";q=50;w=60'
    assert own.app.get("/orders", bearer(token)).status == 200


def test_a_route_rule_reads_the_token_s_scopes(make_own: Callable[..., OwnIssuer]) -> None:
    own = make_own()
    record = own.key("orders:read", "orders:write")
    narrowed = own.token(record, scope="orders:write")  # the endpoint narrows on request
    reply = own.app.get("/orders", bearer(narrowed))
    assert_problem(reply, 403, "insufficient_scope", secrets=(narrowed,))
    assert 'scope="orders:read"' in reply.headers["WWW-Authenticate"]


def test_revoking_the_key_refuses_its_tokens_at_once(make_own: Callable[..., OwnIssuer]) -> None:
    own = make_own()
    record, other = own.key("orders:read"), own.key("orders:read")
    token, kept = own.token(record), own.token(other)
    assert own.app.get("/orders", bearer(token)).status == 200  # cached from now on
    assert own.app.get("/orders", bearer(kept)).status == 200
    own.store.revoke_key(record.key_id)
    detail = "the API key this token was issued from was revoked"
    assert_invalid_token(own.app.get("/orders", bearer(token)), token, detail)
    fresh = own.token(record)
    assert_invalid_token(own.app.get("/orders", bearer(fresh)), fresh, detail)
    assert own.app.get("/orders", bearer(kept)).status == 200


def test_a_token_of_an_expired_or_unknown_key_is_refused(
    make_own: Callable[..., OwnIssuer],
) -> None:
    own = make_own()
    expired = own.key(expires_at=datetime.now(timezone.utc) - timedelta(seconds=1))
    token = own.token(expired)
    assert_invalid_token(own.app.get("/ping", bearer(token)), token, "has expired")
    ghost = KeyRecord(key_id="key_000000000000", client_id="billing")
    token = own.token(ghost)
    assert_invalid_token(own.app.get("/ping", bearer(token)), token, "does not exist")


def test_a_token_takes_no_use_of_a_usage_limited_key(make_own: Callable[..., OwnIssuer]) -> None:
    own = make_own()
    record = own.key(max_uses=1)
    for _ in range(3):
        assert own.app.get("/ping", bearer(own.token(record))).status == 200
    assert own.store.get_key(record.key_id).remaining_uses == 1


def test_a_token_and_an_api_key_of_one_client_share_its_limits(
    make_own: Callable[..., OwnIssuer],
) -> None:
    own = make_own(default_limits="3/minute")
    issued = own.store.create_key("billing")
    token = own.token(issued.record)
    assert own.app.get("/ping", {"X-API-Key": issued.key}).status == 200
    assert own.app.get("/ping", bearer(token)).status == 200
    assert own.app.get("/ping", {"X-API-Key": issued.key}).status == 200
    reply = own.app.get("/ping", bearer(token))
    assert_problem(reply, 429, "rate_limited", secrets=(token, issued.key))


def claims_of(record: KeyRecord) -> dict[str, Any]:
    return {
        "iss": ISSUER,
        "sub": record.client_id,
        "client_id": record.client_id,
        "aud": ISSUER,
        "exp": int(time.time()) + 300,
        "key_id": record.key_id,
    }


def _header_token(own: OwnIssuer, record: KeyRecord, header: dict[str, Any], key: Any) -> str:
    return jose_jwt.encode(header, claims_of(record), key)


def hmac_token(header: dict[str, Any], claims: dict[str, Any], secret: bytes) -> str:
    """HS256 by hand: joserfc will not take a PEM as an HMAC secret, an attacker would."""

    def b64(data: bytes) -> str:
        return urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


@pytest.mark.parametrize(
    ("case", "detail"),
    [
        ("other issuer", "issuer (iss)"),
        ("other audience", "audience (aud)"),
        ("no audience", "no audience (aud)"),
        ("no key_id", "names no API key (key_id)"),
        ("no exp", "no expiry (exp)"),
        ("typ JWT", "(typ) must be at+jwt"),
        ("forged kid", "no key with the token's kid"),
        ("another key under our kid", "signature does not verify"),
        ("HS256 with our public key", "algorithm is not one of"),
    ],
)
def test_a_token_that_breaks_our_rules_is_401_in_every_framework(
    make_own: Callable[..., OwnIssuer], case: str, detail: str
) -> None:
    own = make_own()
    record = own.key("orders:read")
    signing = own.keys.current_signing_key()
    attacker = ECKey.generate_key("P-256")
    ours = {"alg": signing.algorithm, "kid": signing.kid, "typ": "at+jwt"}
    if case == "other issuer":
        token = own.token(record, iss="https://idp.example.test")
    elif case == "other audience":
        token = own.token(record, aud="https://elsewhere.example.test")
    elif case == "no audience":
        token = own.token(record, aud=...)
    elif case == "no key_id":
        token = own.token(record, key_id=...)
    elif case == "no exp":
        token = own.token(record, exp=...)
    elif case == "typ JWT":
        token = _header_token(own, record, {**ours, "typ": "JWT"}, signing._key)
    elif case == "forged kid":
        token = _header_token(own, record, {**ours, "kid": "forged"}, attacker)
    elif case == "another key under our kid":
        token = _header_token(own, record, ours, attacker)
    else:  # algorithm confusion: our public key, which anyone can fetch, as an HMAC secret
        public = ECKey.import_key(own.keys.public_jwks()["keys"][0]).as_pem(private=False)
        token = hmac_token({**ours, "alg": "HS256"}, claims_of(record), public)
    reply = own.app.get("/orders", bearer(token))
    assert_invalid_token(reply, token, detail)
    assert own.app.get("/orders", bearer(own.token(record))).status == 200  # the control


def test_a_token_of_a_key_with_networks_works_only_from_them(
    make_own: Callable[..., OwnIssuer],
) -> None:
    """The token endpoint issues to a key with ``allowed_cidrs`` only from its networks;
    the token it issues is bound to them too, or it would carry the key outside them."""
    own = make_own()
    issued = own.store.create_key(
        "billing", scopes=["orders:read"], allowed_cidrs=["203.0.113.0/24"]
    )
    inside, outside = "203.0.113.9", "198.51.100.9"
    basic = urlsafe_b64encode(f"{issued.record.key_id}:{issued.key}".encode()).decode()
    form = {
        "Content-Type": "application/x-www-form-urlencoded",
        "Authorization": f"Basic {basic}",
    }
    body = b"grant_type=client_credentials"
    assert own.app("POST", "/oauth/token", form, body=body, peer=outside).status == 401
    reply = own.app("POST", "/oauth/token", form, body=body, peer=inside)
    assert reply.status == 200, reply.body
    token = reply.json()["access_token"]
    for _ in range(2):  # the second answered from the cache: the check is still made
        assert own.app("GET", "/orders", bearer(token), peer=inside).status == 200
        refused = own.app("GET", "/orders", bearer(token), peer=outside)
        assert_problem(refused, 403, "address_not_allowed", secrets=(token, issued.key))
    # A token signed for the key (as the endpoint signs) is bound the same way, cold.
    signed = own.token(issued.record)
    refused = own.app("GET", "/orders", bearer(signed), peer=outside)
    assert_problem(refused, 403, "address_not_allowed", secrets=(signed,))
    assert own.app("GET", "/orders", bearer(signed), peer=inside).status == 200
