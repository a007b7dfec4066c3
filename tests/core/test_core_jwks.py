"""The JWKS URL client: caching, refetch pacing, rotation, outages, and what it never trusts.

A :class:`FakeIdP` stands in for the HTTP fetch and a :class:`Mono` clock for
``monotonic``, both injected into :class:`JWKSClient`; one test at the end
talks to a real local HTTP server through ``http_fetch``.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import logging
import ssl
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import jwt as pyjwt
import pytest
from core_support import header
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from joserfc.jwk import RSAKey
from jwks_server import SlowJWKS
from jwt_support import (
    SECRET,
    FakeIdP,
    Mono,
    b64url,
    bearer,
    claims,
    denied,
    finish_in_a_thread,
    hs256,
    jwt_engine,
    private_pem,
    public_jwk,
    public_pem,
)

import m2m_middleware.jwks as jwks_module
from m2m_middleware import Allowed, ConfigError, Engine, Settings
from m2m_middleware.errors import InvalidToken, TemporarilyUnavailable
from m2m_middleware.jwks import (
    DEFAULT_TTL,
    MAX_BYTES,
    MAX_TTL,
    MIN_TTL,
    JWKSClient,
    cache_seconds,
    http_fetch,
    parse_key_set,
)
from m2m_middleware.tokens import TokenVerifier

Check = Any  # the conftest ``check`` fixture: check(engine, method, path, authorization, api_key)

URL = "https://idp.example/.well-known/jwks.json"
LOGGER = "m2m_middleware"


# -- keys, made once per module -------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def k1() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def k2() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def attacker() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def es256(key: Any, kid: str | None, **head: Any) -> str:
    if kid is not None:
        head["kid"] = kid
    return pyjwt.encode(claims(), key, algorithm="ES256", headers=head or None)


@pytest.fixture
def mono() -> Mono:
    return Mono()


@pytest.fixture
def idp(k1: ec.EllipticCurvePrivateKey) -> FakeIdP:
    """An identity provider that publishes ``k1`` under kid "k1"."""
    return FakeIdP([public_jwk(k1, kid="k1", use="sig", alg="ES256")])


def client_for(idp: FakeIdP, mono: Mono, **options: Any) -> JWKSClient:
    options.setdefault("spawn", finish_in_a_thread)
    return JWKSClient(URL, fetch=idp, clock=mono, **options)


def verifier_for(jwks: JWKSClient, **fields: Any) -> TokenVerifier:
    fields.setdefault("schemes", ("jwt",))
    fields.setdefault("jwt_jwks_url", URL)
    return TokenVerifier(Settings(**fields), jwks=jwks)


def idp_engine(idp: FakeIdP, mono: Mono, **fields: Any) -> Engine:
    """An engine on :data:`URL` whose JWKS client fetches from ``idp`` on ``mono`` time."""
    engine = jwt_engine(jwt_jwks_url=URL, **fields)
    assert engine.tokens is not None and engine.tokens.jwks is not None
    engine.tokens.jwks.fetch = idp
    engine.tokens.jwks.clock = mono
    engine.tokens.jwks.spawn = finish_in_a_thread
    return engine


def jwks_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.ERROR]


def jwks_recoveries(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == LOGGER and r.levelno == logging.WARNING and "fetched again" in r.getMessage()
    ]


# -- settings: the URL ------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        URL,
        "https://login.example.com/tenant/discovery/v2.0/keys",
        "https://idp.example:8443/jwks",
        "http://localhost/jwks",
        "http://localhost:8080/jwks",
        "http://127.0.0.1:9000/jwks",
        "http://[::1]:9000/jwks",
    ],
)
def test_jwks_url_may_be_https_or_local_http(url: str) -> None:
    settings = Settings(schemes=("jwt",), jwt_jwks_url=url)
    assert settings.jwt_jwks_url == url
    # The URL brings asymmetric keys: HMAC algorithms are not derived from it.
    assert settings.jwt_algorithms is not None
    assert not any(alg.startswith("HS") for alg in settings.jwt_algorithms)
    assert "RS256" in settings.jwt_algorithms and "ES256" in settings.jwt_algorithms


@pytest.mark.parametrize(
    "url",
    [
        "http://idp.example/jwks",
        "http://localhost.evil.example/jwks",
        "http://localhost@evil.example/jwks",
        "http://127.0.0.1.evil.example/jwks",
        "http://10.0.0.1/jwks",
        "ftp://idp.example/jwks",
        "file:///etc/jwks.json",
        "https://",
        "https:///jwks",
        "idp.example/jwks",
        "",
        42,
    ],
    ids=repr,
)
def test_other_jwks_urls_are_refused(url: object) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings(schemes=("jwt",), jwt_jwks_url=url)
    assert raised.value.field == "jwt_jwks_url"


def test_a_jwks_url_keeps_async_adapters_off_the_blocking_path() -> None:
    assert jwt_engine().never_blocks is True  # static keys only
    assert jwt_engine(jwt_jwks_url=URL).never_blocks is False


# -- cache lifetimes and the key-set document ------------------------------------------


@pytest.mark.parametrize(
    ("cache_control", "seconds"),
    [
        (None, DEFAULT_TTL),
        ("", DEFAULT_TTL),
        ("private", DEFAULT_TTL),
        ("max-age=120", 120),
        ("public, max-age=3600", 3600),
        ("public,max-age=3600,must-revalidate", 3600),
        ("MAX-AGE=300", 300),
        ('max-age="300"', 300),
        ("max-age=0", MIN_TTL),
        ("max-age=59", MIN_TTL),
        ("max-age=60", 60),
        ("max-age=86400", 86400),
        ("max-age=86401", MAX_TTL),
        ("max-age=" + "9" * 60, MAX_TTL),
        ("no-store", MIN_TTL),
        ("no-cache, max-age=3600", MIN_TTL),
        ("s-maxage=100", DEFAULT_TTL),
        ("s-maxage=100, max-age=200", 200),
        ("x-max-age=5000", DEFAULT_TTL),
        ("max-age=abc", DEFAULT_TTL),
        ("max-age=-5", DEFAULT_TTL),
    ],
)
def test_cache_seconds_follows_max_age_within_bounds(
    cache_control: str | None, seconds: float
) -> None:
    assert (MIN_TTL, DEFAULT_TTL, MAX_TTL) == (60, 600, 86400)
    assert cache_seconds(cache_control) == seconds


def test_parse_key_set_keeps_only_usable_verification_keys(
    k1: ec.EllipticCurvePrivateKey, k2: ec.EllipticCurvePrivateKey, rsa_key: rsa.RSAPrivateKey
) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    document = {
        "keys": [
            public_jwk(k1, kid="sig", use="sig"),
            public_jwk(k2, kid="plain"),
            public_jwk(rsa_key, kid="rsa", alg="RS256"),
            public_jwk(k1, kid="enc", use="enc"),
            public_jwk(k2, kid="null-use", use=None),
            {**public_jwk(k1, kid="private"), "d": b64url(b"\x01" * 32)},
            public_jwk(weak, kid="weak"),
            {"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "AAAA", "kid": "bad-point"},
            {"kty": "nope", "kid": "unknown-kty"},
            {"kid": "no-kty"},
            "a string",
            42,
            None,
            [],
        ]
    }
    ring = parse_key_set(json.dumps(document).encode())
    assert sorted(ring.by_kid) == ["plain", "rsa", "sig"]
    assert ring.unnamed == ()


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b"\xff\xfe", b"[]", b"null", b'{"keys": {}}', b'{"nokeys": []}', b'"keys"'],
)
def test_parse_key_set_refuses_what_is_no_key_set(body: bytes) -> None:
    with pytest.raises(ValueError):
        parse_key_set(body)


# -- fetched once, cached for max-age -----------------------------------------------------


def test_the_key_set_is_fetched_once_and_cached(
    idp: FakeIdP, mono: Mono, k1: ec.EllipticCurvePrivateKey
) -> None:
    jwks = client_for(idp, mono)
    v = verifier_for(jwks)
    assert jwks.ring is None
    for _ in range(5):
        assert v.verify(es256(k1, "k1")).client.client_id == "svc"
        assert v.verify(es256(k1, None)).client.client_id == "svc"
        mono.advance(60)
    assert idp.urls == [URL]
    assert jwks.fetches == 1
    assert jwks.snapshot() == {"url": URL, "fetches": 1, "keys": 1}


@pytest.mark.parametrize(
    ("cache_control", "ttl"),
    [(None, 600), ("max-age=120", 120), ("max-age=5", 60), ("max-age=10000000", 86400)],
)
def test_the_key_set_is_refetched_when_max_age_runs_out(
    idp: FakeIdP, mono: Mono, k1: ec.EllipticCurvePrivateKey, cache_control: str | None, ttl: int
) -> None:
    idp.cache_control = cache_control
    jwks = client_for(idp, mono)
    v = verifier_for(jwks)
    token = es256(k1, "k1")
    v.verify(token)
    mono.advance(ttl - 1)
    v.verify(token)
    assert jwks.fetches == 1
    mono.advance(1)
    v.verify(token)
    assert jwks.fetches == 2
    mono.advance(ttl - 1)
    v.verify(token)
    assert jwks.fetches == 2


# -- unknown kids and rotation -----------------------------------------------------------


def test_a_flood_of_forged_kids_costs_one_fetch_per_interval(
    idp: FakeIdP, mono: Mono, k1: ec.EllipticCurvePrivateKey, attacker: ec.EllipticCurvePrivateKey
) -> None:
    jwks = client_for(idp, mono, refetch_interval=30)
    v = verifier_for(jwks)
    v.verify(es256(k1, "k1"))
    assert jwks.fetches == 1
    for i in range(200):
        with pytest.raises(InvalidToken):
            v.verify(es256(attacker, f"forged-{i}"))
    assert jwks.fetches == 2  # the first unknown kid may be a rotation; the rest wait
    mono.advance(29.9)
    with pytest.raises(InvalidToken):
        v.verify(es256(attacker, "forged-late"))
    assert jwks.fetches == 2
    mono.advance(0.1)
    for i in range(50):
        with pytest.raises(InvalidToken):
            v.verify(es256(attacker, f"again-{i}"))
    assert jwks.fetches == 3
    # Meanwhile the real key never stopped working, and costs no fetch.
    v.verify(es256(k1, "k1"))
    assert jwks.fetches == 3
    assert set(idp.urls) == {URL}


def test_a_forged_kid_flood_through_the_engine_costs_one_fetch(
    idp: FakeIdP, mono: Mono, k1: ec.EllipticCurvePrivateKey, attacker: ec.EllipticCurvePrivateKey
) -> None:
    engine = idp_engine(idp, mono)
    assert isinstance(engine.check("GET", "/x", bearer(es256(k1, "k1")), None), Allowed)
    for i in range(100):
        outcome = engine.check("GET", "/x", bearer(es256(attacker, f"f{i}")), None)
        assert denied(outcome, 401, "invalid_token")
    assert len(idp.urls) == 2


def test_a_rotation_is_picked_up_right_after_the_initial_fetch(
    idp: FakeIdP,
    mono: Mono,
    k1: ec.EllipticCurvePrivateKey,
    k2: ec.EllipticCurvePrivateKey,
    check: Check,
) -> None:
    engine = idp_engine(idp, mono)
    assert isinstance(check(engine, "GET", "/x", bearer(es256(k1, "k1")), None), Allowed)
    assert len(idp.urls) == 1
    idp.keys.append(public_jwk(k2, kid="k2", use="sig"))  # the IdP rotates at once
    outcome = check(engine, "GET", "/x", bearer(es256(k2, "k2")), None)
    assert isinstance(outcome, Allowed)
    assert len(idp.urls) == 2
    # Both keys now verify, with no more fetches.
    for key, kid in ((k1, "k1"), (k2, "k2"), (k2, "k2"), (k1, "k1")):
        assert isinstance(check(engine, "GET", "/x", bearer(es256(key, kid)), None), Allowed)
    assert len(idp.urls) == 2


def test_a_retired_key_stops_working_once_the_set_is_refetched(
    idp: FakeIdP, mono: Mono, k1: ec.EllipticCurvePrivateKey, k2: ec.EllipticCurvePrivateKey
) -> None:
    jwks = client_for(idp, mono)
    v = verifier_for(jwks)
    v.verify(es256(k1, "k1"))
    idp.keys = [public_jwk(k2, kid="k2")]
    v.verify(es256(k2, "k2"))  # the unknown kid refetches; k1 is gone from the new set
    with pytest.raises(InvalidToken):
        v.verify(es256(k1, "k1"))


def test_concurrent_tokens_with_a_new_kid_fetch_once(
    idp: FakeIdP, mono: Mono, k1: ec.EllipticCurvePrivateKey, k2: ec.EllipticCurvePrivateKey
) -> None:
    jwks = client_for(idp, mono)
    v = verifier_for(jwks)
    v.verify(es256(k1, "k1"))
    idp.keys.append(public_jwk(k2, kid="k2"))
    slow = threading.Event()
    real_fetch = idp.__call__

    def slow_fetch(url: str, timeout: float) -> tuple[bytes, str | None]:
        slow.wait(0.05)
        return real_fetch(url, timeout)

    jwks.fetch = slow_fetch
    token = es256(k2, "k2")
    barrier = threading.Barrier(8)
    results: list[str] = []

    def worker() -> None:
        barrier.wait()
        results.append(v.verify(token).client.client_id)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert results == ["svc"] * 8
    assert jwks.fetches == 2


# -- outages ------------------------------------------------------------------------------


def test_the_last_good_key_set_keeps_serving_through_an_outage(
    idp: FakeIdP,
    mono: Mono,
    k1: ec.EllipticCurvePrivateKey,
    k2: ec.EllipticCurvePrivateKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    jwks = client_for(idp, mono, refetch_interval=30)
    v = verifier_for(jwks)
    token = es256(k1, "k1")
    v.verify(token)
    idp.down = OSError("connection refused")
    mono.advance(600)  # stale: due for a refresh, which fails
    for _ in range(3):
        assert v.verify(token).client.client_id == "svc"
    assert jwks.fetches == 2  # one attempt, then retries wait for the interval
    for _ in range(4):
        mono.advance(30)
        assert v.verify(token).client.client_id == "svc"
    assert jwks.fetches == 6  # one retry per interval while it is down
    errors = jwks_errors(caplog)
    assert len(errors) == 1  # the outage is logged once
    assert URL in errors[0].getMessage()
    # A key the old set does not have still fails (401), and no 503 while a set is held.
    with pytest.raises(InvalidToken):
        v.verify(es256(k2, "k2"))
    # Recovery: logged once.
    idp.down = None
    mono.advance(30)
    v.verify(token)
    assert jwks.fetches == 7
    for _ in range(3):
        mono.advance(600)
        v.verify(token)
    assert len(jwks_recoveries(caplog)) == 1
    assert len(jwks_errors(caplog)) == 1
    # A second outage is logged again, once.
    idp.down = TimeoutError("timed out")
    for _ in range(3):
        mono.advance(600)
        v.verify(token)
    assert len(jwks_errors(caplog)) == 2


@pytest.mark.parametrize(
    "published",
    [[], [{"kty": "oct", "kid": "k1", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA"}]],
    ids=["empty", "only-unusable"],
)
def test_a_key_set_with_no_usable_key_is_an_outage_not_a_lockout(
    idp: FakeIdP,
    mono: Mono,
    k1: ec.EllipticCurvePrivateKey,
    published: list[dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    jwks = client_for(idp, mono)
    v = verifier_for(jwks)
    token = es256(k1, "k1")
    v.verify(token)
    idp.keys = published
    mono.advance(600)  # stale: the refresh gets a set with nothing to verify with
    assert v.verify(token).client.client_id == "svc"
    assert jwks.fetches == 2
    assert jwks.ring is not None and "k1" in jwks.ring.by_kid
    assert len(jwks_errors(caplog)) == 1


@pytest.mark.parametrize(
    "failure",
    [
        OSError("refused"),
        TimeoutError("slow"),
        ValueError("weird"),
        RuntimeError("library bug"),
        KeyError("x"),
        b"<html>502 Bad Gateway</html>",
        b"[]",
        b'{"keys": "none"}',
    ],
    ids=repr,
)
def test_a_bad_response_never_escapes_and_never_replaces_the_key_set(
    idp: FakeIdP, mono: Mono, k1: ec.EllipticCurvePrivateKey, failure: object, check: Check
) -> None:
    def fail() -> None:
        if isinstance(failure, bytes):
            idp.body = failure
        else:
            assert isinstance(failure, BaseException)
            idp.down = failure

    # Before any good fetch: 503 from the engine, never an exception.
    fail()
    engine = idp_engine(idp, mono)
    outcome = check(engine, "GET", "/x", bearer(es256(k1, "k1")), None)
    assert denied(outcome, 503, "temporarily_unavailable")
    # After a good fetch: the set is kept.
    idp.down, idp.body = None, None
    engine = idp_engine(idp, mono)
    assert isinstance(check(engine, "GET", "/x", bearer(es256(k1, "k1")), None), Allowed)
    fail()
    mono.advance(600)
    assert isinstance(check(engine, "GET", "/x", bearer(es256(k1, "k1")), None), Allowed)
    assert len(idp.urls) == 3


def test_no_key_set_and_a_failing_endpoint_is_a_503(
    idp: FakeIdP, mono: Mono, k1: ec.EllipticCurvePrivateKey, check: Check
) -> None:
    idp.down = OSError("connection refused")
    engine = idp_engine(idp, mono, jwt_jwks_refetch_interval=30)
    token = bearer(es256(k1, "k1"))
    for _ in range(3):
        outcome = check(engine, "GET", "/x", token, None)
        assert denied(outcome, 503, "temporarily_unavailable")
        assert header(outcome, "Retry-After") is not None
        assert outcome.client is None
    assert len(idp.urls) == 1  # retried only after the interval
    mono.advance(30)
    idp.down = None
    assert isinstance(check(engine, "GET", "/x", token, None), Allowed)
    assert len(idp.urls) == 2


def test_the_verifier_raises_temporarily_unavailable_without_any_key_set(
    idp: FakeIdP, mono: Mono, k1: ec.EllipticCurvePrivateKey
) -> None:
    idp.down = OSError("down")
    v = verifier_for(client_for(idp, mono))
    with pytest.raises(TemporarilyUnavailable):
        v.verify(es256(k1, "k1"))
    with pytest.raises(TemporarilyUnavailable):
        asyncio.run(v.averify(es256(k1, "k1")))


def test_static_keys_with_their_own_kids_keep_working_while_the_idp_is_down(
    idp: FakeIdP, mono: Mono, k1: ec.EllipticCurvePrivateKey, k2: ec.EllipticCurvePrivateKey
) -> None:
    idp.down = OSError("down")
    engine = idp_engine(idp, mono, jwt_keys={"keys": [public_jwk(k2, kid="local")]})
    for _ in range(3):
        assert isinstance(engine.check("GET", "/x", bearer(es256(k2, "local")), None), Allowed)
    assert idp.urls == []  # a kid the static keys hold needs no fetch
    outcome = engine.check("GET", "/x", bearer(es256(k1, "k1")), None)
    assert denied(outcome, 503, "temporarily_unavailable")


# -- what the client never trusts ------------------------------------------------------


def test_keys_for_encryption_are_skipped(
    mono: Mono, k1: ec.EllipticCurvePrivateKey, k2: ec.EllipticCurvePrivateKey
) -> None:
    idp = FakeIdP(
        [
            public_jwk(k1, kid="enc", use="enc"),
            public_jwk(k1, kid="ops", key_ops=["encrypt"]),
            public_jwk(k1, kid="pinned", alg="ES384"),
            public_jwk(k2, kid="sig", use="sig"),
        ]
    )
    v = verifier_for(client_for(idp, mono))
    assert v.verify(es256(k2, "sig")).client.client_id == "svc"
    for kid in ("enc", "ops", "pinned"):
        with pytest.raises(InvalidToken):
            v.verify(es256(k1, kid))


def test_no_url_or_key_is_taken_from_the_token_header(
    idp: FakeIdP, mono: Mono, k1: ec.EllipticCurvePrivateKey, attacker: ec.EllipticCurvePrivateKey
) -> None:
    jwks = client_for(idp, mono)
    v = verifier_for(jwks)
    evil = {
        "jku": "https://evil.example/jwks.json",
        "x5u": "https://evil.example/cert.pem",
        "jwk": public_jwk(attacker),
    }
    for kid in ("k1", "evil", None):
        token = es256(attacker, kid, **evil)
        with pytest.raises(InvalidToken):
            v.verify(token)
        mono.advance(31)
    assert idp.urls and set(idp.urls) == {URL}
    # The real key still works with those header members present: they are ignored.
    assert v.verify(es256(k1, "k1", **evil)).client.client_id == "svc"


def test_a_jwks_url_brings_no_hmac_algorithm(idp: FakeIdP, mono: Mono) -> None:
    idp.keys.append({"kty": "oct", "kid": "pub", "k": b64url(b"p" * 64)})
    v = verifier_for(client_for(idp, mono))
    forged = pyjwt.encode(claims(sub="admin"), b"p" * 64, algorithm="HS256", headers={"kid": "pub"})
    with pytest.raises(InvalidToken, match="algorithm"):
        v.verify(forged)


def test_a_published_symmetric_key_never_verifies_tokens(
    idp: FakeIdP, mono: Mono, k1: ec.EllipticCurvePrivateKey
) -> None:
    published = b"p" * 64
    idp.keys.append({"kty": "oct", "kid": "pub", "k": b64url(published)})
    engine = idp_engine(idp, mono, jwt_keys=SECRET)  # HS256 for the static secret
    assert engine.settings.jwt_algorithms is not None
    assert "HS256" in engine.settings.jwt_algorithms
    # Ordinary traffic fetches the key set.
    assert isinstance(engine.check("GET", "/x", bearer(es256(k1, "k1")), None), Allowed)
    assert isinstance(engine.check("GET", "/x", bearer(hs256()), None), Allowed)
    forged = pyjwt.encode(claims(sub="admin"), published, algorithm="HS256", headers={"kid": "pub"})
    assert denied(engine.check("GET", "/x", bearer(forged), None), 401, "invalid_token")


def test_a_static_pem_does_not_hide_the_jwks_keys(
    mono: Mono, rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    idp = FakeIdP([public_jwk(other_rsa_key, kid="idp-1", use="sig")])
    engine = idp_engine(idp, mono, jwt_keys=public_pem(rsa_key))
    local = pyjwt.encode(claims(), rsa_key, algorithm="RS256")
    assert isinstance(engine.check("GET", "/x", bearer(local), None), Allowed)
    from_idp = pyjwt.encode(claims(), other_rsa_key, algorithm="RS256", headers={"kid": "idp-1"})
    outcome = engine.check("GET", "/x", bearer(from_idp), None)
    assert isinstance(outcome, Allowed), getattr(outcome, "detail", None)
    assert idp.urls == [URL]


def test_a_rotation_away_from_a_kidless_key_is_picked_up(
    mono: Mono, k1: ec.EllipticCurvePrivateKey, k2: ec.EllipticCurvePrivateKey
) -> None:
    idp = FakeIdP([public_jwk(k1)])  # one key, no kid
    v = verifier_for(client_for(idp, mono))
    v.verify(es256(k1, None))
    idp.keys = [public_jwk(k1), public_jwk(k2, kid="k2")]
    assert v.verify(es256(k2, "k2")).client.client_id == "svc"
    assert len(idp.urls) == 2


def test_private_keys_in_a_fetched_set_are_not_used_as_given(
    mono: Mono, rsa_key: rsa.RSAPrivateKey, k1: ec.EllipticCurvePrivateKey
) -> None:
    private = dict(RSAKey.import_key(private_pem(rsa_key)).as_dict(private=True), kid="leak")
    idp = FakeIdP([private, public_jwk(k1, kid="k1")])
    v = verifier_for(client_for(idp, mono))
    with pytest.raises(InvalidToken):
        v.verify(pyjwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "leak"}))
    assert len(idp.urls) == 1
    # With nothing else published, the set has no usable key at all: unavailable, not 401.
    alone = FakeIdP([private])
    with pytest.raises(TemporarilyUnavailable):
        verifier_for(client_for(alone, mono)).verify(
            pyjwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "leak"})
        )


# -- the async path -------------------------------------------------------------------


def test_the_async_path_fetches_off_the_event_loop(
    idp: FakeIdP, mono: Mono, k1: ec.EllipticCurvePrivateKey
) -> None:
    engine = idp_engine(idp, mono)
    threads: list[int] = []
    real = engine.tokens.jwks.fetch  # type: ignore[union-attr]

    def fetch(url: str, timeout: float) -> tuple[bytes, str | None]:
        threads.append(threading.get_ident())
        return real(url, timeout)

    engine.tokens.jwks.fetch = fetch  # type: ignore[union-attr]

    async def main() -> tuple[int, Any]:
        outcome = await engine.acheck("GET", "/x", bearer(es256(k1, "k1")), None)
        return threading.get_ident(), outcome

    loop_thread, outcome = asyncio.run(main())
    assert isinstance(outcome, Allowed)
    assert len(threads) == 1
    assert threads[0] != loop_thread


# -- a slow endpoint cannot stall the service ---------------------------------------------
#
# These use the default spawner (a daemon thread per fetch) and a fetch that
# holds until its gate opens: the real timing of waits, with no network.

#: What "promptly" means on a loaded two-core machine: far below any fetch here.
PROMPT = 0.5


class GatedIdP(FakeIdP):
    """A :class:`FakeIdP` whose fetches hold until ``gate`` opens (at most ``cap`` s)."""

    def __init__(self, keys: list[dict[str, Any]], cap: float = 5.0) -> None:
        super().__init__(keys)
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.cap = cap
        self.threads: list[threading.Thread] = []

    def __call__(self, url: str, timeout: float) -> tuple[bytes, str | None]:
        self.threads.append(threading.current_thread())
        self.entered.set()
        self.gate.wait(self.cap)
        return super().__call__(url, timeout)


@pytest.fixture
def gated(k1: ec.EllipticCurvePrivateKey) -> Iterator[GatedIdP]:
    idp = GatedIdP([public_jwk(k1, kid="k1")])
    idp.gate.set()  # open until a test closes it
    yield idp
    idp.gate.set()  # never leave a fetch thread waiting


def settle(jwks: JWKSClient) -> None:
    """Wait (bounded) for the fetch in flight, if any, to land."""
    flight = jwks._flight
    if flight is not None:
        flight.result(timeout=10)


def elapsed(since: float) -> float:
    return time.monotonic() - since


@pytest.mark.parametrize("front", ["sync", "async"])
def test_a_known_kid_is_served_from_a_stale_set_while_the_refresh_runs(
    gated: GatedIdP,
    mono: Mono,
    k1: ec.EllipticCurvePrivateKey,
    k2: ec.EllipticCurvePrivateKey,
    front: str,
) -> None:
    jwks = JWKSClient(URL, fetch=gated, clock=mono, timeout=3.0)
    v = verifier_for(jwks)
    v.verify(es256(k1, "k1"))
    assert jwks.fetches == 1
    gated.gate.clear()
    gated.entered.clear()
    gated.keys.append(public_jwk(k2, kid="k2"))  # what the refresh will bring
    mono.advance(600)  # past max-age: due for a refresh
    for _ in range(5):
        start = time.monotonic()
        if front == "sync":
            client = v.verify(es256(k1, "k1")).client
        else:
            client = asyncio.run(v.averify(es256(k1, "k1"))).client
        assert client.client_id == "svc"
        assert elapsed(start) < PROMPT  # never waited for the refresh
    assert gated.entered.wait(5)  # the refresh did start, behind the requests
    assert jwks.fetches == 2  # one refresh for all five (single-flight)
    gated.gate.set()
    settle(jwks)
    assert jwks.ring is not None and "k2" in jwks.ring.by_kid
    assert v.verify(es256(k2, "k2")).client.client_id == "svc"
    assert jwks.fetches == 2


@pytest.mark.parametrize("front", ["sync", "async"])
@pytest.mark.parametrize("fetched_before", [False, True], ids=["never-fetched", "new-kid"])
def test_a_token_that_needs_a_fetch_waits_at_most_the_timeout(
    gated: GatedIdP,
    mono: Mono,
    k1: ec.EllipticCurvePrivateKey,
    k2: ec.EllipticCurvePrivateKey,
    front: str,
    fetched_before: bool,
) -> None:
    jwks = JWKSClient(URL, fetch=gated, clock=mono, timeout=0.3)
    v = verifier_for(jwks)
    if fetched_before:
        v.verify(es256(k1, "k1"))
    gated.gate.clear()  # the endpoint now holds every answer (5 s)
    token = es256(k2, "k2")
    start = time.monotonic()
    with pytest.raises(TemporarilyUnavailable if not fetched_before else InvalidToken):
        if front == "sync":
            v.verify(token)
        else:
            asyncio.run(v.averify(token))
    assert 0.25 < elapsed(start) < 0.3 + PROMPT
    # Known kids are not held up by the fetch still in flight.
    if fetched_before:
        start = time.monotonic()
        assert v.verify(es256(k1, "k1")).client.client_id == "svc"
        assert elapsed(start) < PROMPT


def test_waiters_in_threads_and_on_a_loop_share_one_fetch(
    gated: GatedIdP, mono: Mono, k1: ec.EllipticCurvePrivateKey, k2: ec.EllipticCurvePrivateKey
) -> None:
    jwks = JWKSClient(URL, fetch=gated, clock=mono, timeout=3.0)
    v = verifier_for(jwks)
    v.verify(es256(k1, "k1"))
    gated.gate.clear()
    gated.keys.append(public_jwk(k2, kid="k2"))
    token = es256(k2, "k2")
    results: list[str] = []

    def in_thread() -> None:
        results.append(v.verify(token).client.client_id)

    async def on_loop() -> list[str]:
        async def one() -> str:
            return (await v.averify(token)).client.client_id

        tasks = [asyncio.create_task(one()) for _ in range(10)]
        await asyncio.sleep(0.05)
        gated.gate.set()  # every waiter is in by now
        return list(await asyncio.gather(*tasks))

    threads = [threading.Thread(target=in_thread) for _ in range(10)]
    for thread in threads:
        thread.start()
    assert gated.entered.wait(5)
    from_loop = asyncio.run(on_loop())
    for thread in threads:
        thread.join(5)
    assert results == ["svc"] * 10
    assert from_loop == ["svc"] * 10
    assert jwks.fetches == 2


def test_async_waiters_hold_no_thread_of_the_default_pool(
    gated: GatedIdP, mono: Mono, k2: ec.EllipticCurvePrivateKey
) -> None:
    """The bug: each waiting token took a thread of asyncio.to_thread's pool,
    where the SQLite and PostgreSQL stores answer API-key requests."""
    jwks = JWKSClient(URL, fetch=gated, clock=mono, timeout=2.0)
    v = verifier_for(jwks)
    gated.gate.clear()
    token = es256(k2, "k2")

    async def main() -> float:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(max_workers=2))
        waiting = [asyncio.create_task(v.averify(token)) for _ in range(12)]
        await asyncio.sleep(0.05)
        assert gated.entered.is_set()
        start = time.monotonic()
        await asyncio.to_thread(time.monotonic)  # what a store lookup does
        took = elapsed(start)
        gated.gate.set()
        await asyncio.gather(*waiting, return_exceptions=True)
        return took

    assert asyncio.run(main()) < PROMPT
    assert jwks.fetches == 1


def test_fetches_run_in_daemon_threads_of_their_own(
    gated: GatedIdP, mono: Mono, k1: ec.EllipticCurvePrivateKey
) -> None:
    jwks = JWKSClient(URL, fetch=gated, clock=mono)
    v = verifier_for(jwks)
    v.verify(es256(k1, "k1"))
    asyncio.run(v.averify(es256(k1, "k1")))
    mono.advance(600)
    v.verify(es256(k1, "k1"))
    settle(jwks)
    assert len(gated.threads) == 2
    for thread in gated.threads:
        assert thread.daemon  # never holds up interpreter exit
        assert thread is not threading.main_thread()
        assert thread.name == "m2m-jwks-fetch"


def test_no_thread_for_a_fetch_is_an_outage_not_a_hang(
    idp: FakeIdP, mono: Mono, k1: ec.EllipticCurvePrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)

    def no_threads(work: Any) -> None:
        raise RuntimeError("can't start new thread")

    jwks = JWKSClient(URL, fetch=idp, clock=mono, spawn=no_threads, refetch_interval=30)
    v = verifier_for(jwks)
    start = time.monotonic()
    with pytest.raises(TemporarilyUnavailable):
        v.verify(es256(k1, "k1"))
    assert elapsed(start) < PROMPT
    assert len(jwks_errors(caplog)) == 1
    jwks.spawn = finish_in_a_thread
    mono.advance(30)
    assert v.verify(es256(k1, "k1")).client.client_id == "svc"
    assert len(jwks_recoveries(caplog)) == 1


def test_a_refresh_behind_a_request_that_fails_keeps_the_set_and_logs_once(
    gated: GatedIdP, mono: Mono, k1: ec.EllipticCurvePrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    jwks = JWKSClient(URL, fetch=gated, clock=mono, refetch_interval=30)
    v = verifier_for(jwks)
    v.verify(es256(k1, "k1"))
    gated.down = OSError("connection refused")
    for _ in range(3):
        mono.advance(600)
        assert v.verify(es256(k1, "k1")).client.client_id == "svc"
        settle(jwks)
    assert jwks.fetches == 4
    assert len(jwks_errors(caplog)) == 1
    gated.down = None
    mono.advance(600)
    v.verify(es256(k1, "k1"))
    settle(jwks)
    assert len(jwks_recoveries(caplog)) == 1


# -- the real fetch against a local server ------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, tuple[int, bytes, str | None]]] = {}
    hits: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.hits.append(self.path)
        status, body, cache_control = self.routes.get(self.path, (404, b"not found", None))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if cache_control:
            self.send_header("Cache-Control", cache_control)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, type[_Handler]]]:
    handler = type("Handler", (_Handler,), {"routes": {}, "hits": []})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def test_http_fetch_returns_the_body_and_cache_control(
    server: tuple[str, type[_Handler]], k1: ec.EllipticCurvePrivateKey
) -> None:
    base, handler = server
    document = json.dumps({"keys": [public_jwk(k1, kid="k1")]}).encode()
    handler.routes["/jwks"] = (200, document, "public, max-age=1234")
    handler.routes["/huge"] = (200, b" " * (MAX_BYTES + 1), None)
    assert http_fetch(f"{base}/jwks", 2.0) == (document, "public, max-age=1234")
    with pytest.raises(OSError):
        http_fetch(f"{base}/huge", 2.0)
    with pytest.raises(OSError):
        http_fetch(f"{base}/missing", 2.0)


def test_an_engine_verifies_against_a_real_local_jwks_endpoint(
    server: tuple[str, type[_Handler]],
    k1: ec.EllipticCurvePrivateKey,
    attacker: ec.EllipticCurvePrivateKey,
) -> None:
    base, handler = server
    document = json.dumps({"keys": [public_jwk(k1, kid="k1")]}).encode()
    handler.routes["/jwks"] = (200, document, "max-age=300")
    engine = jwt_engine(jwt_jwks_url=f"{base}/jwks", jwt_jwks_timeout=2.0)
    for _ in range(3):
        outcome = engine.check("GET", "/x", bearer(es256(k1, "k1")), None)
        assert isinstance(outcome, Allowed), getattr(outcome, "detail", None)
    assert handler.hits == ["/jwks"]
    assert denied(
        engine.check("GET", "/x", bearer(es256(attacker, "k1")), None), 401, "invalid_token"
    )
    # A token's jku pointing at another path of the same server is never followed.
    handler.routes["/evil"] = (
        200,
        json.dumps({"keys": [public_jwk(attacker, kid="x")]}).encode(),
        None,
    )
    evil = es256(attacker, "x", jku=f"{base}/evil")
    assert denied(engine.check("GET", "/x", bearer(evil), None), 401, "invalid_token")
    assert "/evil" not in handler.hits


@pytest.fixture
def slow_jwks(k1: ec.EllipticCurvePrivateKey) -> Iterator[SlowJWKS]:
    server = SlowJWKS({"keys": [public_jwk(k1, kid="k1")]})
    server.byte_interval = 0.2
    server.limit = 6.0
    try:
        yield server
    finally:
        server.close()


@pytest.mark.parametrize("mode", ["trickle", "trickle-body", "stall"])
def test_http_fetch_bounds_the_whole_fetch_not_each_read(slow_jwks: SlowJWKS, mode: str) -> None:
    """A byte every 0.2 s keeps every socket read short of a 1 s timeout: only a
    deadline over the whole fetch ends it (urllib alone took the server's 6 s)."""
    slow_jwks.mode = mode
    start = time.monotonic()
    with pytest.raises(OSError):
        http_fetch(slow_jwks.url, 1.0)
    assert 0.9 < elapsed(start) < 1.0 + PROMPT
    slow_jwks.mode = "fast"  # the same client fetches normally once the endpoint recovers
    body, cache_control = http_fetch(slow_jwks.url, 1.0)
    assert json.loads(body)["keys"][0]["kid"] == "k1"
    assert cache_control == "max-age=300"


def test_a_trickling_endpoint_holds_a_new_token_for_the_timeout_only(
    slow_jwks: SlowJWKS, k1: ec.EllipticCurvePrivateKey
) -> None:
    slow_jwks.mode = "trickle"
    engine = jwt_engine(jwt_jwks_url=slow_jwks.url, jwt_jwks_timeout=1.0)
    for front in ("sync", "async"):
        start = time.monotonic()
        authorization = bearer(es256(k1, "k1"))
        if front == "sync":
            outcome = engine.check("GET", "/x", authorization, None)
        else:
            outcome = asyncio.run(engine.acheck("GET", "/x", authorization, None))
        assert denied(outcome, 503, "temporarily_unavailable")
        assert elapsed(start) < 1.0 + PROMPT
    assert slow_jwks.hits == 1  # the second token waited for the retry interval, not the IdP


@pytest.fixture
def tls_jwks(
    k1: ec.EllipticCurvePrivateKey, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[SlowJWKS]:
    """:class:`SlowJWKS` over HTTPS, with a certificate for 127.0.0.1 that ``http_fetch``
    is made to trust (in place of the system's CAs)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(private_pem(key).encode())
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    client_side = ssl.create_default_context(cadata=cert_pem.decode())
    monkeypatch.setattr(jwks_module, "_tls", lambda: client_side)
    server = SlowJWKS({"keys": [public_jwk(k1, kid="k1")]}, tls=server_side)
    server.byte_interval = 0.2
    server.limit = 6.0
    try:
        yield server
    finally:
        server.close()


@pytest.mark.parametrize("mode", ["trickle", "trickle-body"])
def test_http_fetch_bounds_the_whole_fetch_over_https_too(tls_jwks: SlowJWKS, mode: str) -> None:
    assert tls_jwks.url.startswith("https://")
    body, _ = http_fetch(tls_jwks.url, 2.0)  # the certificate is checked, and trusted
    assert json.loads(body)["keys"][0]["kid"] == "k1"
    tls_jwks.mode = mode
    start = time.monotonic()
    with pytest.raises(OSError):
        http_fetch(tls_jwks.url, 1.0)
    assert 0.9 < elapsed(start) < 1.0 + PROMPT


def test_http_fetch_checks_the_certificate(
    tls_jwks: SlowJWKS, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jwks_module, "_tls", ssl.create_default_context)  # the system's CAs
    with pytest.raises(OSError, match="CERTIFICATE_VERIFY_FAILED"):
        http_fetch(tls_jwks.url, 2.0)


class _Redirecting(BaseHTTPRequestHandler):
    """/to?<url> answers 302 to <url>; /keys answers a key set."""

    document = b'{"keys": []}'

    def do_GET(self) -> None:
        if self.path.startswith("/to?"):
            self.send_response(302)
            self.send_header("Location", self.path[len("/to?") :])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.document)))
        self.end_headers()
        self.wfile.write(self.document)

    def log_message(self, format: str, *args: object) -> None:
        pass


def _serve(host: str) -> tuple[ThreadingHTTPServer, threading.Thread]:
    server = ThreadingHTTPServer((host, 0), _Redirecting)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01})
    thread.start()
    return server, thread


@pytest.fixture
def redirecting() -> Iterator[tuple[str, str]]:
    """A server on 127.0.0.1 and one on 127.0.0.2: both answer, but the setting
    accepts plain http only for localhost, 127.0.0.1 and ::1."""
    served = [_serve("127.0.0.1"), _serve("127.0.0.2")]
    try:
        (low, _), (high, _) = served
        yield (
            f"http://127.0.0.1:{low.server_address[1]}",
            f"http://127.0.0.2:{high.server_address[1]}",
        )
    finally:
        for server, thread in served:
            server.shutdown()
            server.server_close()
            thread.join(5)


def test_http_fetch_follows_no_redirect_the_setting_itself_would_refuse(
    redirecting: tuple[str, str],
) -> None:
    """urllib alone follows any http, https or ftp redirect, also https -> http."""
    local, elsewhere = redirecting
    assert json.loads(http_fetch(f"{elsewhere}/keys", 1.0)[0]) == {"keys": []}  # it answers
    with pytest.raises(ConfigError):
        Settings(schemes=("jwt",), jwt_jwks_url=f"{elsewhere}/keys")
    with pytest.raises(OSError, match="redirected to a refused URL"):
        http_fetch(f"{local}/to?{elsewhere}/keys", 1.0)
    with pytest.raises(OSError, match="redirected to a refused URL"):
        http_fetch(f"{local}/to?ftp://127.0.0.1/keys", 1.0)


def test_http_fetch_follows_a_redirect_the_setting_would_allow(
    redirecting: tuple[str, str],
) -> None:
    local, _ = redirecting
    body, _ = http_fetch(f"{local}/to?{local}/keys", 1.0)
    assert json.loads(body) == {"keys": []}
