"""JWT bearer tokens in the core: keys, algorithms, claims, hostile input, cache, limits.

Hand-made tokens (:func:`raw_token`) are validly signed, so each rejection below
is due to the property named in the test, not to a broken signature; most
tests also show the same token passing once that one property is fixed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import jwt as pyjwt
import pytest
from core_support import FakeClock, header, make_engine
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from joserfc.jwk import ECKey, OctKey, OKPKey, RSAKey
from joserfc.jws import JWSRegistry
from jwt_support import (
    RFC_A1_JWK,
    RFC_A1_TOKEN,
    RFC_A2_JWK,
    RFC_A2_TOKEN,
    RFC_A3_JWK,
    RFC_A3_PRIVATE_JWK,
    RFC_A3_TOKEN,
    RFC_EXP,
    SECRET,
    b64url,
    bearer,
    claims,
    denied,
    hs256,
    jwt_engine,
    private_pem,
    public_jwk,
    public_pem,
    raw_token,
)

import m2m_middleware.tokens as tokens_module
from m2m_middleware import Allowed, Client, ConfigError, Denied, Engine, KeyStore, Settings
from m2m_middleware.errors import InvalidToken
from m2m_middleware.jwtkeys import DEFAULT_ALGORITHMS, SUPPORTED_ALGORITHMS, key_fits, load_keys
from m2m_middleware.tokens import TokenVerifier

Check = Any  # the conftest ``check`` fixture: check(engine, method, path, authorization, api_key)

#: A fixed "now" for claim checks that call the verifier directly.
NOW = 1_700_000_000.0


# -- keys, made once per module -------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def weak_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def verifier(**fields: Any) -> TokenVerifier:
    fields.setdefault("schemes", ("jwt",))
    fields.setdefault("jwt_keys", SECRET)
    return TokenVerifier(Settings(**fields))


def send(engine: Engine, token: str) -> Allowed | Denied:
    return engine.check("GET", "/x", bearer(token), None)


def rejects(v: TokenVerifier, token: str, match: str | None = None) -> None:
    with pytest.raises(InvalidToken, match=match):
        v.verify(token)


# -- configuration: keys ----------------------------------------------------------------


def test_an_hmac_secret_of_32_bytes_is_enough_and_gives_hs256_only() -> None:
    for secret in ("s" * 32, b"\x00" * 32, SECRET):
        settings = Settings(schemes=("jwt",), jwt_keys=secret)
        assert settings.jwt_algorithms == ("HS256",)


@pytest.mark.parametrize("secret", ["s" * 31, b"b" * 31, "é" * 15, "", "short"])
def test_a_shorter_hmac_secret_is_refused_naming_jwt_keys(secret: str | bytes) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings(schemes=("jwt",), jwt_keys=secret)
    assert raised.value.field == "jwt_keys"
    if isinstance(secret, str) and secret:
        assert secret not in str(raised.value)  # the secret is never echoed


def test_a_short_oct_jwk_is_refused() -> None:
    jwk = {"kty": "oct", "k": b64url(b"k" * 31)}
    with pytest.raises(ConfigError, match="32 bytes") as raised:
        Settings(schemes=("jwt",), jwt_keys={"keys": [jwk]})
    assert raised.value.field.startswith("jwt_keys")
    assert Settings(schemes=("jwt",), jwt_keys={"keys": [{"kty": "oct", "k": b64url(b"k" * 32)}]})


@pytest.mark.parametrize(
    "make",
    [
        lambda k: private_pem(k, "pkcs8"),
        lambda k: private_pem(k, "traditional"),
        lambda k: private_pem(k, "pkcs8").encode(),
        lambda k: {"keys": [RSAKey.import_key(private_pem(k)).as_dict(private=True)]},
        lambda k: RSAKey.import_key(private_pem(k)).as_dict(private=True),
        lambda k: RSAKey.import_key(private_pem(k)),
    ],
    ids=["pem-pkcs8", "pem-traditional", "pem-bytes", "jwks", "jwk", "joserfc-key"],
)
def test_private_rsa_keys_are_refused(make: Any, rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(ConfigError, match="private key") as raised:
        Settings(schemes=("jwt",), jwt_keys=make(rsa_key))
    assert raised.value.field.startswith("jwt_keys")


def test_private_ec_and_okp_keys_are_refused(
    ec_key: ec.EllipticCurvePrivateKey, ed_key: ed25519.Ed25519PrivateKey
) -> None:
    for value in (
        private_pem(ec_key, "traditional"),
        private_pem(ec_key),
        private_pem(ed_key),
        RFC_A3_PRIVATE_JWK,
        {"keys": [RFC_A3_JWK, RFC_A3_PRIVATE_JWK]},
        OKPKey.import_key(private_pem(ed_key)),
    ):
        with pytest.raises(ConfigError, match="private key"):
            Settings(schemes=("jwt",), jwt_keys=value)
    # Their public halves are fine.
    for value in (public_pem(ec_key), public_pem(ed_key), RFC_A3_JWK, {"keys": [RFC_A3_JWK]}):
        assert Settings(schemes=("jwt",), jwt_keys=value).jwt_key_ring is not None


# Checked before joserfc sees the key: no SecurityWarning (an error under pytest) escapes.
def test_rsa_keys_below_2048_bits_are_refused(weak_rsa_key: rsa.RSAPrivateKey) -> None:
    for value in (
        public_pem(weak_rsa_key),
        public_jwk(weak_rsa_key),
        {"keys": [public_jwk(weak_rsa_key, kid="weak")]},
    ):
        with pytest.raises(ConfigError, match="2048") as raised:
            Settings(schemes=("jwt",), jwt_keys=value)
        assert raised.value.field.startswith("jwt_keys")


@pytest.mark.parametrize(
    "value",
    [12345, 3.5, object(), {"keys": "not a list"}, {"keys": {"kty": "oct"}}, {"kty": "nope"}],
    ids=["int", "float", "object", "keys-str", "keys-mapping", "bad-jwk"],
)
def test_unusable_jwt_keys_are_a_config_error(value: object) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings(schemes=("jwt",), jwt_keys=value)
    assert raised.value.field.startswith("jwt_keys")


def test_a_pem_that_is_no_key_is_refused() -> None:
    garbage = "-----BEGIN PUBLIC KEY-----\nbm90IGEga2V5\n-----END PUBLIC KEY-----\n"
    with pytest.raises(ConfigError, match="PEM") as raised:
        Settings(schemes=("jwt",), jwt_keys=garbage)
    assert raised.value.field == "jwt_keys"


def test_jwt_without_keys_or_url_is_refused() -> None:
    with pytest.raises(ConfigError) as raised:
        Settings(schemes=("jwt",))
    assert raised.value.field == "jwt_keys"


# -- configuration: algorithms ------------------------------------------------------


@pytest.mark.parametrize(
    "algorithms", ["none", "NONE", "None", ["HS256", "none"], ("nOnE",), ["RS256", "NoNe"]]
)
def test_none_is_refused_with_any_keys(algorithms: Any) -> None:
    with pytest.raises(ConfigError, match="none") as raised:
        Settings(schemes=("jwt",), jwt_keys=SECRET, jwt_algorithms=algorithms)
    assert raised.value.field == "jwt_algorithms"


def test_an_empty_algorithm_list_is_refused() -> None:
    for empty in ([], ()):
        with pytest.raises(ConfigError) as raised:
            Settings(schemes=("jwt",), jwt_keys=SECRET, jwt_algorithms=empty)
        assert raised.value.field == "jwt_algorithms"


@pytest.mark.parametrize("alg", ["hs256", "HS1", "RSA-OAEP", "A128KW", "dir", ""])
def test_unknown_algorithms_are_refused(alg: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings(schemes=("jwt",), jwt_keys=SECRET, jwt_algorithms=[alg])
    assert raised.value.field == "jwt_algorithms"


def test_none_is_never_a_supported_algorithm() -> None:
    assert "none" not in SUPPORTED_ALGORITHMS
    assert "none" not in DEFAULT_ALGORITHMS
    assert set(DEFAULT_ALGORITHMS) <= set(SUPPORTED_ALGORITHMS)


def test_algorithms_nobody_can_verify_are_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings(schemes=("jwt",), jwt_keys=SECRET, jwt_algorithms=["RS256"])
    assert raised.value.field == "jwt_algorithms"
    with pytest.raises(ConfigError):
        Settings(schemes=("jwt",), jwt_keys=public_pem(rsa_key), jwt_algorithms=["HS256"])


def test_default_algorithms_follow_the_keys(
    rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
    ed_key: ed25519.Ed25519PrivateKey,
) -> None:
    def derived(value: object) -> tuple[str, ...]:
        algorithms = Settings(schemes=("jwt",), jwt_keys=value).jwt_algorithms
        assert algorithms is not None
        return algorithms

    assert derived(SECRET) == ("HS256",)
    assert derived(public_pem(rsa_key)) == ("RS256", "PS256")
    assert derived(public_pem(ec_key)) == ("ES256",)
    assert derived(public_pem(ec.generate_private_key(ec.SECP384R1()))) == ("ES384",)
    assert derived(public_pem(ec.generate_private_key(ec.SECP521R1()))) == ("ES512",)
    assert derived(public_pem(ed_key)) == ("EdDSA",)
    assert derived(RFC_A3_JWK) == ("ES256",)
    assert derived({"keys": [RFC_A1_JWK, public_jwk(rsa_key, kid="r")]}) == (
        "HS256",
        "RS256",
        "PS256",
    )
    # A JWK that pins its algorithm narrows the default to it.
    assert derived({"keys": [public_jwk(rsa_key, alg="PS256")]}) == ("PS256",)
    # Explicit algorithms are kept as given.
    explicit = Settings(schemes=("jwt",), jwt_keys=public_pem(rsa_key), jwt_algorithms="RS256")
    assert explicit.jwt_algorithms == ("RS256",)


# -- algorithm confusion: each key only with algorithms of its own type ---------------


def test_key_fits_only_its_own_type_curve_alg_and_use(
    rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
    ed_key: ed25519.Ed25519PrivateKey,
) -> None:
    rsa_pub = RSAKey.import_key(public_jwk(rsa_key))
    ec_pub = ECKey.import_key(public_jwk(ec_key))
    ed_pub = OKPKey.import_key(public_jwk(ed_key))
    oct_key = OctKey.import_key(SECRET)
    fits = {
        (name, alg)
        for name, key in (("rsa", rsa_pub), ("ec", ec_pub), ("ed", ed_pub), ("oct", oct_key))
        for alg in SUPPORTED_ALGORITHMS
        if key_fits(key, alg)
    }
    assert fits == {
        ("rsa", "RS256"),
        ("rsa", "RS384"),
        ("rsa", "RS512"),
        ("rsa", "PS256"),
        ("rsa", "PS384"),
        ("rsa", "PS512"),
        ("ec", "ES256"),
        ("ed", "EdDSA"),
        ("ed", "Ed25519"),
        ("oct", "HS256"),
        ("oct", "HS384"),
        ("oct", "HS512"),
    }
    # What a JWK states narrows it further.
    assert not key_fits(RSAKey.import_key(public_jwk(rsa_key, alg="RS256")), "PS256")
    assert key_fits(RSAKey.import_key(public_jwk(rsa_key, alg="RS256")), "RS256")
    assert not key_fits(RSAKey.import_key(public_jwk(rsa_key, use="enc")), "RS256")
    assert key_fits(RSAKey.import_key(public_jwk(rsa_key, use="sig")), "RS256")
    assert not key_fits(RSAKey.import_key(public_jwk(rsa_key, key_ops=["encrypt"])), "RS256")
    assert key_fits(RSAKey.import_key(public_jwk(rsa_key, key_ops=["verify"])), "RS256")


@pytest.mark.parametrize("form", ["pem", "jwk-json"])
def test_an_rsa_public_key_never_verifies_an_hs256_token_made_with_it(
    rsa_key: rsa.RSAPrivateKey, form: str
) -> None:
    pem = public_pem(rsa_key)
    jwk = public_jwk(rsa_key)
    jwt_keys: Any = pem if form == "pem" else jwk
    engine = jwt_engine(jwt_keys=jwt_keys, jwt_algorithms=["RS256", "HS256"])
    # The attacker knows the public key and HMACs with its text (the classic confusion).
    for secret in (pem, pem.encode(), json.dumps(jwk), jwk["n"]):
        forged = raw_token({"alg": "HS256", "typ": "JWT"}, claims(sub="admin"), secret)
        assert denied(send(engine, forged), 401, "invalid_token")
    # Control: the same engine takes a real RS256 token from that key.
    good = pyjwt.encode(claims(), rsa_key, algorithm="RS256")
    assert isinstance(send(engine, good), Allowed)


def test_an_hmac_secret_never_verifies_an_asymmetric_token(rsa_key: rsa.RSAPrivateKey) -> None:
    engine = jwt_engine(jwt_keys=[SECRET, public_pem(rsa_key)])
    assert isinstance(send(engine, hs256()), Allowed)
    assert isinstance(send(engine, pyjwt.encode(claims(), rsa_key, algorithm="RS256")), Allowed)
    # An "RS256" token whose signature is an HMAC with the configured secret.
    forged = raw_token({"alg": "RS256"}, claims(sub="admin"), SECRET, alg="HS256")
    assert denied(send(engine, forged), 401, "invalid_token")


def test_a_token_alg_outside_the_allow_list_is_refused_even_if_a_key_could_verify() -> None:
    engine = jwt_engine(jwt_algorithms=["HS256"])
    token = pyjwt.encode(claims(), SECRET, algorithm="HS512")
    outcome = send(engine, token)
    assert denied(outcome, 401, "invalid_token")
    assert "algorithm" in outcome.detail
    assert isinstance(send(jwt_engine(jwt_algorithms=["HS512"]), token), Allowed)


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_unsecured_tokens_are_refused(alg: str) -> None:
    engine = jwt_engine()
    head = b64url(f'{{"alg":"{alg}","typ":"JWT"}}')
    body = b64url('{"sub":"admin","exp":9999999999}')
    for token in (f"{head}.{body}.", f"{head}.{body}.{b64url('x')}", f"{head}.{body}"):
        assert denied(send(engine, token), 401, "invalid_token")


def test_a_tampered_token_is_refused() -> None:
    engine = jwt_engine()
    payload = claims(sub="svc")
    token = raw_token({"alg": "HS256"}, payload)
    head, _, signature = token.split(".")
    other_body = b64url(json.dumps({**payload, "sub": "admin"}, separators=(",", ":")))
    assert denied(send(engine, f"{head}.{other_body}.{signature}"), 401, "invalid_token")
    assert denied(send(engine, hs256(secret=SECRET[::-1])), 401, "invalid_token")
    assert isinstance(send(engine, token), Allowed)


def test_kid_is_an_exact_lookup(rsa_key: rsa.RSAPrivateKey) -> None:
    engine = jwt_engine(jwt_keys={"keys": [public_jwk(rsa_key, kid="k1")]})
    for kid in ("K1", "k1 ", " k1", "k", "k1k1", "../k1", "k1/../k1"):
        token = pyjwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": kid})
        assert denied(send(engine, token), 401, "invalid_token"), kid
    for head in (None, {"kid": "k1"}):
        token = pyjwt.encode(claims(), rsa_key, algorithm="RS256", headers=head)
        assert isinstance(send(engine, token), Allowed), head


def test_a_kid_that_is_not_a_string_is_refused() -> None:
    v = verifier()
    for kid in (1, ["k"], {"k": 1}, True):
        rejects(v, raw_token({"alg": "HS256", "kid": kid}, claims()), "kid")
    v.verify(raw_token({"alg": "HS256", "kid": "any"}, claims()))  # an unnamed key still fits


# -- claims ---------------------------------------------------------------------------


def client_of(v: TokenVerifier, now: float = NOW, **claim_set: Any) -> Client:
    claim_set.setdefault("sub", "svc")
    claim_set.setdefault("exp", now + 60)
    return v.check_claims({k: c for k, c in claim_set.items() if c is not ...}, now).client


def test_exp_is_required() -> None:
    with pytest.raises(InvalidToken, match=r"\(exp\)"):
        client_of(verifier(), exp=...)


def test_exp_equal_to_now_is_expired() -> None:
    v = verifier()
    assert client_of(v, exp=NOW + 1).client_id == "svc"
    assert client_of(v, exp=NOW + 0.001).client_id == "svc"
    for exp in (NOW, NOW - 1, 0, -1):
        with pytest.raises(InvalidToken, match="expired"):
            client_of(v, exp=exp)


def test_nbf_and_iat_may_not_be_in_the_future() -> None:
    v = verifier()
    for name in ("nbf", "iat"):
        assert client_of(v, **{name: NOW}).client_id == "svc"
        assert client_of(v, **{name: NOW - 100}).client_id == "svc"
        with pytest.raises(InvalidToken, match=name):
            client_of(v, **{name: NOW + 1})


def test_leeway_applies_to_exp_nbf_and_iat() -> None:
    v = verifier(jwt_leeway=30)
    assert client_of(v, exp=NOW - 29).client_id == "svc"
    with pytest.raises(InvalidToken, match="expired"):
        client_of(v, exp=NOW - 30)
    for name in ("nbf", "iat"):
        assert client_of(v, **{name: NOW + 30}).client_id == "svc"
        with pytest.raises(InvalidToken, match=name):
            client_of(v, **{name: NOW + 31})
    verified = v.check_claims({"sub": "svc", "exp": NOW + 5}, NOW)
    assert verified.dead_at == NOW + 35


@pytest.mark.parametrize("name", ["exp", "nbf", "iat"])
@pytest.mark.parametrize(
    "value",
    ["1700000000", "", True, False, None, 10**400, -(10**400), [NOW], {"t": NOW}],
    ids=["str", "empty", "true", "false", "null", "huge", "-huge", "list", "object"],
)
def test_time_claims_must_be_numbers(name: str, value: object) -> None:
    with pytest.raises(InvalidToken, match=f"{name} claim is not a number"):
        client_of(verifier(), **{name: value})


@pytest.mark.parametrize("name", ["exp", "nbf", "iat"])
def test_time_claims_may_be_floats(name: str) -> None:
    assert client_of(verifier(), **{name: (NOW + 60.5) if name == "exp" else NOW - 0.5}).client_id


@pytest.mark.parametrize(
    "literal", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" + "0" * 400, "9" * 5000]
)
def test_non_finite_or_huge_json_times_are_a_401(literal: str) -> None:
    engine = jwt_engine(max_credential_length=20_000)
    for name in ("exp", "nbf", "iat"):
        if name == "exp":
            payload = f'{{"sub":"svc","exp":{literal}}}'
        else:
            payload = f'{{"sub":"svc","exp":9999999999,"{name}":{literal}}}'
        token = raw_token({"alg": "HS256"}, payload)
        assert denied(send(engine, token), 401, "invalid_token"), (name, literal)
    control = raw_token({"alg": "HS256"}, '{"sub":"svc","exp":9999999999,"nbf":1,"iat":1}')
    assert isinstance(send(engine, control), Allowed)


@pytest.mark.parametrize(
    "iss",
    [
        "https://idp.example/",
        "https://IDP.example",
        "HTTPS://idp.example",
        "https://idp.example.evil",
        "https://idp.exampl",
        "idp.example",
        "",
        None,
        ["https://idp.example"],
        ...,
    ],
    ids=repr,
)
def test_iss_must_match_exactly(iss: object) -> None:
    v = verifier(jwt_issuer="https://idp.example")
    assert client_of(v, iss="https://idp.example").client_id == "svc"
    with pytest.raises(InvalidToken, match="issuer"):
        client_of(v, iss=iss)


def test_without_jwt_issuer_any_iss_passes() -> None:
    assert client_of(verifier(), iss="https://anyone.example").client_id == "svc"


@pytest.mark.parametrize("aud", ["api", ["api"], ["other", "api"], ["api", "api"]], ids=repr)
def test_aud_may_be_a_string_or_a_list_naming_us(aud: object) -> None:
    assert client_of(verifier(jwt_audience="api"), aud=aud).client_id == "svc"


@pytest.mark.parametrize(
    "aud",
    [
        "api2",
        "ap",
        "https://api",
        "API",
        " api",
        "api ",
        "api,other",
        "other api",
        "",
        ["api2", "ap"],
        ["API"],
        [],
        ["api", 5],
        [["api"]],
        5,
        None,
        {"api": True},
        ...,
    ],
    ids=repr,
)
def test_aud_never_matches_by_substring_or_loosely(aud: object) -> None:
    with pytest.raises(InvalidToken, match="aud"):
        client_of(verifier(jwt_audience="api"), aud=aud)


def test_several_configured_audiences_accept_any_one() -> None:
    v = verifier(jwt_audience=["api", "https://api.example"])
    assert client_of(v, aud="https://api.example").client_id == "svc"
    assert client_of(v, aud=["x", "api"]).client_id == "svc"
    with pytest.raises(InvalidToken):
        client_of(v, aud="https://api.example/")


def test_a_token_with_aud_is_refused_when_no_audience_is_configured() -> None:
    v = verifier()
    assert client_of(v).client_id == "svc"  # no aud, no jwt_audience: fine
    for aud in ("api", ["api"], []):
        with pytest.raises(InvalidToken, match="aud"):
            client_of(v, aud=aud)


def test_typ_is_checked_only_when_configured() -> None:
    v = verifier(jwt_typ="at+jwt")
    for typ in ("at+jwt", "at+JWT", "AT+JWT", "application/at+jwt", "Application/AT+JWT"):
        v.verify(raw_token({"alg": "HS256", "typ": typ}, claims()))
    for typ in ("JWT", "jwt", "at+jwt2", "at", "application/jwt", "", 1, None, ["at+jwt"]):
        head = {"alg": "HS256", "typ": typ}
        rejects(v, raw_token(head, claims()), "typ")
    rejects(v, raw_token({"alg": "HS256"}, claims()), "typ")  # missing
    # Configured with the long form, the short one matches too.
    long_form = verifier(jwt_typ="application/at+jwt")
    long_form.verify(raw_token({"alg": "HS256", "typ": "at+jwt"}, claims()))
    # Not configured: any typ, or none, passes.
    for head in ({"alg": "HS256", "typ": "JWT"}, {"alg": "HS256", "typ": "x"}, {"alg": "HS256"}):
        verifier().verify(raw_token(head, claims()))


def test_client_id_comes_from_client_id_then_sub() -> None:
    v = verifier()
    assert client_of(v, client_id="cid", sub="user").client_id == "cid"
    assert client_of(v, sub="user").client_id == "user"
    assert client_of(v, client_id=None, sub="user").client_id == "user"  # null: not named
    with pytest.raises(InvalidToken, match="names no client"):
        client_of(v, sub=...)
    for bad in ("", 5, ["cid"], {"id": "cid"}, True):
        with pytest.raises(InvalidToken, match="client_id"):
            client_of(v, client_id=bad, sub="user")


def test_client_id_claims_are_configurable() -> None:
    v = verifier(jwt_client_id_claims=("azp",))
    assert client_of(v, azp="app", client_id="cid", sub="user").client_id == "app"
    with pytest.raises(InvalidToken, match="names no client"):
        client_of(v, client_id="cid", sub="user")
    v2 = verifier(jwt_client_id_claims=["appid", "sub"])
    assert client_of(v2, appid="a1", sub="user").client_id == "a1"
    assert client_of(v2, sub="user").client_id == "user"
    with pytest.raises(ConfigError) as raised:
        Settings(schemes=("jwt",), jwt_keys=SECRET, jwt_client_id_claims=[])
    assert raised.value.field == "jwt_client_id_claims"


@pytest.mark.parametrize(
    ("claim_set", "scopes"),
    [
        ({"scope": "orders:read orders:write"}, ["orders:read", "orders:write"]),
        ({"scope": "  a   b\tc "}, ["a", "b", "c"]),
        ({"scope": ""}, []),
        ({"scp": ["a", "b"]}, ["a", "b"]),
        ({"scp": "a b"}, ["a", "b"]),
        ({"scp": []}, []),
        ({"scope": "a", "scp": ["b"]}, ["a"]),  # scope wins
        ({}, []),
    ],
    ids=repr,
)
def test_scopes_come_from_scope_or_scp(claim_set: dict[str, Any], scopes: list[str]) -> None:
    assert client_of(verifier(), **claim_set).scopes == frozenset(scopes)


@pytest.mark.parametrize(
    "claim_set", [{"scope": 5}, {"scp": [1]}, {"scp": {"a": 1}}, {"scope": None}]
)
def test_malformed_scopes_are_refused(claim_set: dict[str, Any]) -> None:
    with pytest.raises(InvalidToken, match=r"scope|scp"):
        client_of(verifier(), **claim_set)


def test_the_tier_claim_is_read_only_when_configured() -> None:
    assert client_of(verifier(), tier="gold").tier is None
    v = verifier(jwt_tier_claim="tier")
    assert client_of(v, tier="gold").tier == "gold"
    assert client_of(v).tier is None
    for bad in (5, ["gold"], True):
        with pytest.raises(InvalidToken, match="tier"):
            client_of(v, tier=bad)


def test_the_client_carries_scheme_and_read_only_claims() -> None:
    token = hs256(claims(client_id="cid", scope="a b", custom={"x": 1}))
    verified = verifier().verify(token)
    client = verified.client
    assert client.scheme == "jwt"
    assert client.key_id is None
    assert client.client_id == "cid"
    assert client.scopes == frozenset({"a", "b"})
    assert dict(client.claims) == pyjwt.decode(token, SECRET, algorithms=["HS256"])
    assert verified.dead_at == client.claims["exp"]
    with pytest.raises(TypeError):
        client.claims["sub"] = "admin"  # type: ignore[index]


# -- hostile input --------------------------------------------------------------------


def test_the_size_cap_applies_before_any_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = jwt_engine(max_credential_length=512)
    assert engine.tokens is not None
    parsed: list[str] = []
    real_parse = engine.tokens.parse
    monkeypatch.setattr(engine.tokens, "parse", lambda t: parsed.append(t) or real_parse(t))
    big = hs256(claims(pad="x" * 600))
    assert len(big) > 512
    for outcome in (
        send(engine, big),
        engine.check("GET", "/x", None, big),
        asyncio.run(engine.acheck("GET", "/x", bearer(big), None)),
    ):
        assert denied(outcome, 401, "invalid_token")
        assert "longer than 512" in outcome.detail
    assert parsed == []
    small = hs256(claims(pad="x" * 100))
    assert isinstance(send(engine, small), Allowed)
    assert parsed == [small]


def test_the_default_size_cap_is_4096() -> None:
    engine = jwt_engine()
    token = hs256(claims(pad="x" * 4000))
    assert 4096 < len(token) < 6000
    assert denied(send(engine, token), 401, "invalid_token")
    assert isinstance(send(jwt_engine(max_credential_length=6000), token), Allowed)


def test_a_huge_header_is_refused_even_under_the_size_cap() -> None:
    engine = jwt_engine(max_credential_length=100_000)
    token = raw_token({"alg": "HS256", "pad": "x" * 3000}, claims())
    assert denied(send(engine, token), 401, "invalid_token")
    assert isinstance(
        send(engine, raw_token({"alg": "HS256", "pad": "x" * 500}, claims())), Allowed
    )


@pytest.mark.parametrize("crit", [["exp"], [], ["b64"], "exp", ["http://example.com/x"]], ids=repr)
def test_any_crit_header_is_refused(crit: object) -> None:
    v = verifier()
    rejects(v, raw_token({"alg": "HS256", "crit": crit, "exp": 1}, claims()), "crit")
    v.verify(raw_token({"alg": "HS256", "exp": 1}, claims()))  # the same without crit


def test_unencoded_payload_option_is_refused() -> None:
    rejects(verifier(), raw_token({"alg": "HS256", "b64": False}, claims()), "b64")


def test_jwe_and_other_segment_counts_are_refused() -> None:
    v = verifier()
    jwe = "eyJhbGciOiJSU0EtT0FFUCIsImVuYyI6IkEyNTZHQ00ifQ.a2V5.aXY.Y2lwaGVy.dGFn"
    rejects(v, jwe, "JWE")
    token = hs256()
    for bad in (token + ".", "." + token, token + ".x.y.z", "a.b", "a.b.c.d", "a"):
        rejects(v, bad)
    engine = jwt_engine()
    assert denied(send(engine, jwe), 401, "invalid_token")


def test_json_serialization_is_refused() -> None:
    token = hs256()
    head, body, signature = token.split(".")
    flattened = f'{{"payload":"{body}","protected":"{head}","signature":"{signature}"}}'
    rejects(verifier(), flattened)
    rejects(verifier(), "{" + token)
    engine = jwt_engine()
    for credential in ("{" + token, '{"payload":"x.y.z"}'):
        assert denied(send(engine, credential), 401, "invalid_token")
    # The real flattened form has commas, which look like two joined headers:
    # refused (400 invalid_request) before it is even parsed. Never allowed.
    outcome = send(engine, flattened)
    assert isinstance(outcome, Denied)
    assert outcome.status in (400, 401)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda t: t + " x",
        lambda t: t.replace(".", " .", 1),
        lambda t: t + "=",
        lambda t: t.split(".")[0] + "==." + ".".join(t.split(".")[1:]),
        lambda t: t.replace("-", "+").replace("_", "/") + "+/",
        lambda t: t + "é",
        lambda t: t[:5] + "\x00" + t[5:],
        lambda t: t[:5] + "\u202e" + t[5:],
        lambda t: t.replace(".", "..", 1),
        lambda t: t[:-1] + "!",
        lambda t: t[:5] + "\n" + t[5:],
        lambda t: "\ud800" + t,
    ],
    ids=[
        "space",
        "space-in",
        "padding",
        "header-padding",
        "std-alphabet",
        "non-ascii",
        "nul",
        "bidi",
        "empty-part",
        "bang",
        "newline",
        "surrogate",
    ],
)
def test_junk_characters_are_refused(mutate: Any) -> None:
    token = raw_token({"alg": "HS256"}, claims(scope="a-b_c"))
    bad = mutate(token)
    assert bad != token
    rejects(verifier(), bad)
    engine = jwt_engine()
    assert denied(engine.check("GET", "/x", None, bad), 401, "invalid_token")


@pytest.mark.parametrize(
    "head",
    [
        '{"alg":"HS256","alg":"HS256"}',
        '{"alg":"none","alg":"HS256"}',
        '{"alg":"HS256","kid":"a","kid":"b"}',
        '{"alg":"HS256","x":{"y":1,"y":2}}',
    ],
)
def test_duplicate_header_members_are_refused(head: str) -> None:
    rejects(verifier(), raw_token(head, claims(), alg="HS256"), "header")


@pytest.mark.parametrize(
    "payload",
    [
        '{"sub":"svc","sub":"admin","exp":9999999999}',
        '{"sub":"svc","exp":1,"exp":9999999999}',
        '{"sub":"svc","exp":9999999999,"scope":"a","scope":"admin"}',
        '{"sub":"svc","exp":9999999999,"x":{"y":1,"y":2}}',
    ],
)
def test_duplicate_payload_members_are_refused(payload: str) -> None:
    engine = jwt_engine()
    assert denied(send(engine, raw_token({"alg": "HS256"}, payload)), 401, "invalid_token")
    rejects(verifier(), raw_token({"alg": "HS256"}, payload), "payload")


@pytest.mark.parametrize(
    ("head", "payload"),
    [
        ("[]", '{"sub":"svc","exp":9999999999}'),
        ('"HS256"', '{"sub":"svc","exp":9999999999}'),
        (b"\xff\xfe", '{"sub":"svc","exp":9999999999}'),
        ('{"alg":"HS256"', '{"sub":"svc","exp":9999999999}'),
        ('{"alg":"HS256"}', "[1,2]"),
        ('{"alg":"HS256"}', "null"),
        ('{"alg":"HS256"}', b"\xc3\x28"),
        ('{"alg":"HS256"}', ""),
        ('{"alg":"HS256"}', '{"sub":"svc","exp":9999999999} trailing'),
        ('{"alg":HS256}', '{"sub":"svc","exp":9999999999}'),
        ('{"alg":["HS256"]}', '{"sub":"svc","exp":9999999999}'),
        ('{"alg":null}', '{"sub":"svc","exp":9999999999}'),
        ('{"typ":"JWT"}', '{"sub":"svc","exp":9999999999}'),
    ],
    ids=repr,
)
def test_malformed_json_is_a_401(head: str | bytes, payload: str | bytes) -> None:
    token = raw_token(head, payload, alg="HS256")
    rejects(verifier(), token)
    assert denied(send(jwt_engine(), token), 401, "invalid_token")


def test_deeply_nested_json_is_a_401_not_a_crash() -> None:
    v = verifier()
    deep = '{"sub":"svc","exp":9999999999,"x":' + "[" * 100_000 + "]" * 100_000 + "}"
    rejects(v, raw_token({"alg": "HS256"}, deep))
    engine = jwt_engine(max_credential_length=1_000_000)
    assert denied(send(engine, raw_token({"alg": "HS256"}, deep)), 401, "invalid_token")


def test_every_truncation_of_a_token_is_a_401() -> None:
    engine = jwt_engine()
    token = hs256()
    for n in range(1, len(token)):
        outcome = engine.check("GET", "/x", bearer(token[:n]), None)
        assert denied(outcome, 401, "invalid_token"), n


def test_library_errors_are_a_401_and_never_escape(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    token = hs256()
    engine = jwt_engine()

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"library exploded on {token}")

    # In the signature check: a failed check.
    monkeypatch.setattr(JWSRegistry.algorithms["HS256"], "verify", boom)
    assert denied(send(engine, token), 401, "invalid_token")
    monkeypatch.undo()
    # Anywhere else: a 401 too, logged without the token.
    caplog.set_level(logging.WARNING, logger="m2m_middleware")
    for name in ("parse", "check_claims", "finish"):
        with monkeypatch.context() as patch:
            patch.setattr(TokenVerifier, name, boom)
            fresh = jwt_engine()
            assert denied(send(fresh, token), 401, "invalid_token"), name
            outcome = asyncio.run(fresh.acheck("GET", "/x", bearer(token), None))
            assert denied(outcome, 401, "invalid_token"), name
            assert token not in outcome.detail
            assert token not in outcome.body.decode()
    assert caplog.records, "an unexpected error is logged"
    for record in caplog.records:
        assert token not in record.getMessage()
        assert token.split(".")[2] not in record.getMessage()
    assert isinstance(send(jwt_engine(), token), Allowed)


# -- interop: PyJWT tokens and the RFC 7515 examples -----------------------------------


@pytest.mark.parametrize("alg", ["HS256", "RS256", "PS256", "ES256", "EdDSA"])
def test_pyjwt_tokens_verify_through_the_engine(
    alg: str,
    rsa_key: rsa.RSAPrivateKey,
    other_rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
    ed_key: ed25519.Ed25519PrivateKey,
    check: Check,
) -> None:
    signing, wrong = {
        "HS256": (SECRET, SECRET[::-1]),
        "RS256": (rsa_key, other_rsa_key),
        "PS256": (rsa_key, other_rsa_key),
        "ES256": (ec_key, ec.generate_private_key(ec.SECP256R1())),
        "EdDSA": (ed_key, ed25519.Ed25519PrivateKey.generate()),
    }[alg]
    jwt_keys = signing if alg == "HS256" else public_pem(signing)
    engine = jwt_engine(jwt_keys=jwt_keys, jwt_issuer="https://idp.example", jwt_audience="api")
    assert engine.settings.jwt_algorithms is not None
    assert alg in engine.settings.jwt_algorithms
    payload = claims(
        iss="https://idp.example", aud="api", client_id="svc-a", scope="a b", nbf=int(time.time())
    )
    token = pyjwt.encode(payload, signing, algorithm=alg, headers={"typ": "at+jwt"})
    outcome = check(engine, "GET", "/x", bearer(token), None)
    assert isinstance(outcome, Allowed), getattr(outcome, "detail", None)
    assert outcome.client is not None
    assert (outcome.client.client_id, outcome.client.scheme) == ("svc-a", "jwt")
    assert outcome.client.scopes == frozenset({"a", "b"})
    assert outcome.client.claims["aud"] == "api"
    forged = pyjwt.encode(payload, wrong, algorithm=alg)
    assert denied(check(engine, "GET", "/x", bearer(forged), None), 401, "invalid_token")


def test_pyjwt_tokens_verify_against_a_jwks_mapping_by_kid(
    rsa_key: rsa.RSAPrivateKey,
    other_rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
) -> None:
    jwks = {
        "keys": [
            public_jwk(rsa_key, kid="r1", use="sig", alg="RS256"),
            public_jwk(other_rsa_key, kid="r2"),
            public_jwk(ec_key, kid="e1"),
        ]
    }
    engine = jwt_engine(jwt_keys=jwks)
    for key, kid, alg in (
        (rsa_key, "r1", "RS256"),
        (other_rsa_key, "r2", "PS256"),
        (ec_key, "e1", "ES256"),
    ):
        good = pyjwt.encode(claims(), key, algorithm=alg, headers={"kid": kid})
        assert isinstance(send(engine, good), Allowed), kid
    # The right key under another key's kid: only the named key is tried.
    swapped = pyjwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "r2"})
    assert denied(send(engine, swapped), 401, "invalid_token")
    # r1 pins RS256: a PS256 token from its private key is refused.
    pinned = pyjwt.encode(claims(), rsa_key, algorithm="PS256", headers={"kid": "r1"})
    assert denied(send(engine, pinned), 401, "invalid_token")


@pytest.mark.parametrize(
    ("token", "jwk"),
    [(RFC_A1_TOKEN, RFC_A1_JWK), (RFC_A2_TOKEN, RFC_A2_JWK), (RFC_A3_TOKEN, RFC_A3_JWK)],
    ids=["A.1-HS256", "A.2-RS256", "A.3-ES256"],
)
def test_rfc7515_examples_verify_at_the_signature_level(token: str, jwk: dict[str, str]) -> None:
    by_iss = verifier(jwt_keys={"keys": [jwk]}, jwt_client_id_claims=("iss",))
    verified = by_iss.finish(by_iss.parse(token), now=RFC_EXP - 1)
    assert verified.client.client_id == "joe"
    assert verified.client.claims["http://example.com/is_root"] is True
    assert verified.dead_at == RFC_EXP
    # At exp exactly: expired.
    with pytest.raises(InvalidToken, match="expired"):
        by_iss.finish(by_iss.parse(token), now=RFC_EXP)
    # With the default client-id claims the examples name no client.
    default = verifier(jwt_keys=jwk)
    with pytest.raises(InvalidToken, match="names no client"):
        default.finish(default.parse(token), now=RFC_EXP - 1)
    # One changed character of the signature and it no longer verifies.
    head, body, signature = token.split(".")
    middle = len(signature) // 2
    flipped = (
        signature[:middle] + ("A" if signature[middle] != "A" else "B") + signature[middle + 1 :]
    )
    with pytest.raises(InvalidToken, match="signature"):
        by_iss.finish(by_iss.parse(f"{head}.{body}.{flipped}"), now=RFC_EXP - 1)
    # Through the engine, at the real time: expired.
    engine = jwt_engine(jwt_keys={"keys": [jwk]}, jwt_client_id_claims=("iss",))
    outcome = send(engine, token)
    assert denied(outcome, 401, "invalid_token")
    assert "expired" in outcome.detail


def test_rfc7515_a3_key_verifies_fresh_randomized_signatures() -> None:
    signer = pyjwt.PyJWK(RFC_A3_PRIVATE_JWK).key
    v = verifier(jwt_keys=RFC_A3_JWK)
    tokens = {pyjwt.encode(claims(), signer, algorithm="ES256") for _ in range(3)}
    assert len(tokens) == 3  # ECDSA signatures differ every time
    for token in tokens:
        assert v.verify(token).client.client_id == "svc"


def test_rfc7515_keys_only_fit_their_own_algorithm() -> None:
    # The A.1 HMAC key cannot check the A.2 RS256 example, and the other way round.
    both = verifier(jwt_keys={"keys": [RFC_A1_JWK, RFC_A3_JWK]}, jwt_client_id_claims=("iss",))
    with pytest.raises(InvalidToken):
        both.parse(RFC_A2_TOKEN)  # RS256 is not among HS256/ES256
    assert both.finish(both.parse(RFC_A3_TOKEN), now=RFC_EXP - 1).client.client_id == "joe"
    assert both.finish(both.parse(RFC_A1_TOKEN), now=RFC_EXP - 1).client.client_id == "joe"


def test_load_keys_names_the_faulty_entry() -> None:
    with pytest.raises(ConfigError) as raised:
        load_keys({"keys": [RFC_A1_JWK, {"kty": "oct", "k": b64url(b"x" * 20)}]})
    assert raised.value.field == "jwt_keys.keys[1]"


# -- the token cache ------------------------------------------------------------------


@pytest.fixture
def token_clock(clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """The ``clock`` fixture, also driving the verifier's claim checks."""
    monkeypatch.setattr(tokens_module, "time", clock.time)
    return clock


class Counter:
    def __init__(self, wrapped: Any) -> None:
        self.wrapped = wrapped
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.wrapped(*args, **kwargs)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter]:
    """Counts signature-and-claims verifications (``TokenVerifier.finish``) in every engine."""
    counter = Counter(TokenVerifier.finish)

    def finish(self: TokenVerifier, parsed: Any, now: float | None = None) -> Any:
        return counter(self, parsed, now)

    monkeypatch.setattr(TokenVerifier, "finish", finish)
    yield counter


def test_a_verified_token_is_answered_from_the_cache(
    counted: Counter, token_clock: FakeClock, check: Check
) -> None:
    engine = jwt_engine(key_cache_ttl=60)
    token = hs256(claims(iat=None, exp=int(token_clock.wall) + 600))
    for _ in range(5):
        outcome = check(engine, "GET", "/x", bearer(token), None)
        assert isinstance(outcome, Allowed)
        assert outcome.client is not None
        assert outcome.client.client_id == "svc"
    assert counted.calls == 1
    other = hs256(claims(iat=None, sub="other", exp=int(token_clock.wall) + 600))
    assert isinstance(check(engine, "GET", "/x", bearer(other), None), Allowed)
    assert counted.calls == 2


def test_a_cached_token_is_never_accepted_at_or_after_exp(
    counted: Counter, token_clock: FakeClock, check: Check
) -> None:
    engine = jwt_engine(key_cache_ttl=3600)
    exp = token_clock.wall + 10
    token = hs256(claims(exp=exp, iat=int(token_clock.wall)))
    assert isinstance(check(engine, "GET", "/x", bearer(token), None), Allowed)
    token_clock.advance(9.5)
    assert isinstance(check(engine, "GET", "/x", bearer(token), None), Allowed)
    assert counted.calls == 1  # still from the cache
    token_clock.advance(0.5)  # now == exp
    outcome = check(engine, "GET", "/x", bearer(token), None)
    assert denied(outcome, 401, "invalid_token")
    assert "expired" in outcome.detail
    token_clock.advance(1000)
    assert denied(check(engine, "GET", "/x", bearer(token), None), 401, "invalid_token")


def test_the_cache_honours_the_leeway(token_clock: FakeClock, check: Check) -> None:
    engine = jwt_engine(key_cache_ttl=3600, jwt_leeway=5)
    token = hs256(claims(iat=None, exp=token_clock.wall + 10))
    assert isinstance(check(engine, "GET", "/x", bearer(token), None), Allowed)
    token_clock.advance(14.5)
    assert isinstance(check(engine, "GET", "/x", bearer(token), None), Allowed)
    token_clock.advance(0.5)
    assert denied(check(engine, "GET", "/x", bearer(token), None), 401, "invalid_token")


def test_key_cache_ttl_bounds_how_long_a_token_is_trusted_unverified(
    counted: Counter, token_clock: FakeClock, check: Check
) -> None:
    engine = jwt_engine(key_cache_ttl=30)
    token = hs256(claims(iat=None, exp=token_clock.wall + 3600))
    assert isinstance(check(engine, "GET", "/x", bearer(token), None), Allowed)
    token_clock.advance(29)
    assert isinstance(check(engine, "GET", "/x", bearer(token), None), Allowed)
    assert counted.calls == 1
    token_clock.advance(2)
    assert isinstance(check(engine, "GET", "/x", bearer(token), None), Allowed)
    assert counted.calls == 2
    no_cache = jwt_engine(key_cache_ttl=0)
    for _ in range(3):
        assert isinstance(check(no_cache, "GET", "/x", bearer(token), None), Allowed)
    assert counted.calls == 5


def test_a_refused_token_is_not_remembered(token_clock: FakeClock, check: Check) -> None:
    engine = jwt_engine(key_cache_ttl=3600)
    token = hs256(claims(iat=None, nbf=token_clock.wall + 5, exp=token_clock.wall + 60))
    assert denied(check(engine, "GET", "/x", bearer(token), None), 401, "invalid_token")
    token_clock.advance(5)
    assert isinstance(check(engine, "GET", "/x", bearer(token), None), Allowed)


def test_a_cached_token_does_not_vouch_for_another_signature(counted: Counter) -> None:
    engine = jwt_engine(key_cache_ttl=3600)
    token = hs256()
    head, body, _ = token.split(".")
    assert isinstance(send(engine, token), Allowed)
    for signature in (b64url(b"\x00" * 32), b64url(b"forged"), "AAAA"):
        assert denied(send(engine, f"{head}.{body}.{signature}"), 401, "invalid_token")
    assert isinstance(send(engine, token), Allowed)
    assert counted.calls == 4  # the cached token once, each forgery on its own


#: The order of the P-256 group: with (r, s) a valid ES256 signature, so is (r, P256_N - s).
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def other_ecdsa_spelling(token: str) -> str:
    """The same token with its ES256 signature's ``s`` replaced by ``n - s``."""
    head, body, signature = token.split(".")
    raw = tokens_module._signature_bytes(signature)
    s = int.from_bytes(raw[32:], "big")
    return f"{head}.{body}.{b64url(raw[:32] + (P256_N - s).to_bytes(32, 'big'))}"


def test_both_ecdsa_spellings_verify_to_one_client_and_share_one_budget(
    ec_key: ec.EllipticCurvePrivateKey, counted: Counter, check: Check
) -> None:
    """ECDSA is malleable, and high-S signatures are accepted (IdPs emit either form):
    one token has two texts. Both name the same client, each text is its own entry
    in the verified-token cache, and nothing is counted per text: the limits charge
    the client id, so a second spelling buys no extra requests."""
    engine = jwt_engine(
        jwt_keys={"keys": [public_jwk(ec_key, kid="ec")]}, default_limits="3/minute"
    )
    token = pyjwt.encode(claims(jti="t-1"), ec_key, algorithm="ES256", headers={"kid": "ec"})
    other = other_ecdsa_spelling(token)
    assert other != token and other_ecdsa_spelling(other) == token
    v = engine.tokens
    assert v is not None
    assert v.verify(token).client.claims == v.verify(other).client.claims
    counted.calls = 0
    replies = [check(engine, "GET", "/x", bearer(t), None) for t in (token, other, token, other)]
    assert [type(r) for r in replies[:3]] == [Allowed] * 3
    assert all(r.client is not None and r.client.client_id == "svc" for r in replies[:3])
    assert denied(replies[3], 429, "rate_limited")  # 3/minute for the client, across spellings
    assert counted.calls == 2  # each spelling verified once, then answered from the cache
    assert len(engine.keys._entries) == 2


# -- limits and scopes ----------------------------------------------------------------


def test_jwt_and_api_key_clients_with_one_id_share_one_budget(
    memory_store: KeyStore, check: Check
) -> None:
    key = memory_store.create_key("svc").key
    engine = make_engine(
        memory_store, schemes=("api_key", "jwt"), jwt_keys=SECRET, default_limits="3/day"
    )
    token = hs256(claims(sub="svc"))
    assert isinstance(check(engine, "GET", "/x", None, key), Allowed)
    assert isinstance(check(engine, "GET", "/x", bearer(token), None), Allowed)
    assert isinstance(check(engine, "GET", "/x", None, key), Allowed)
    for authorization, api_key in ((bearer(token), None), (None, key)):
        outcome = check(engine, "GET", "/x", authorization, api_key)
        assert denied(outcome, 429, "rate_limited")
        assert header(outcome, "Retry-After") is not None
    # Another client id has its own budget.
    assert isinstance(check(engine, "GET", "/x", bearer(hs256(claims(sub="b"))), None), Allowed)


def test_route_scopes_apply_to_jwt_scopes(check: Check) -> None:
    engine = jwt_engine(
        routes=[{"path": "/orders/*", "methods": ["POST"], "scopes": ["orders:write"]}]
    )
    reader = hs256(claims(scope="orders:read"))
    outcome = check(engine, "POST", "/orders/1", bearer(reader), None)
    assert denied(outcome, 403, "insufficient_scope")
    assert outcome.client is not None and outcome.client.client_id == "svc"
    challenge = header(outcome, "WWW-Authenticate")
    assert challenge is not None
    assert 'error="insufficient_scope"' in challenge
    assert 'scope="orders:write"' in challenge
    assert isinstance(check(engine, "GET", "/orders/1", bearer(reader), None), Allowed)
    for writer in (
        hs256(claims(scope="orders:read orders:write")),
        hs256(claims(scp=["orders:write"])),
        hs256(claims(scp="orders:write")),
    ):
        assert isinstance(check(engine, "POST", "/orders/1", bearer(writer), None), Allowed)


def test_the_tier_claim_picks_the_tier_limits(check: Check) -> None:
    engine = jwt_engine(jwt_tier_claim="tier", default_limits="1/day", tiers={"gold": "3/day"})
    gold = hs256(claims(sub="g", tier="gold"))
    plain = hs256(claims(sub="p"))
    outcomes = [check(engine, "GET", "/x", bearer(gold), None) for _ in range(4)]
    assert [o.allowed for o in outcomes] == [True, True, True, False]
    assert outcomes[0].client is not None and outcomes[0].client.tier == "gold"
    outcomes = [check(engine, "GET", "/x", bearer(plain), None) for _ in range(2)]
    assert [o.allowed for o in outcomes] == [True, False]


def test_a_jwt_only_engine_refuses_api_keys(memory_store: KeyStore, check: Check) -> None:
    key = memory_store.create_key("svc").key
    engine = make_engine(memory_store, schemes=("jwt",), jwt_keys=SECRET)
    assert denied(check(engine, "GET", "/x", None, key), 401, "invalid_token")
    assert denied(check(engine, "GET", "/x", bearer(key), None), 401, "invalid_token")
    assert isinstance(check(engine, "GET", "/x", bearer(hs256()), None), Allowed)


def test_an_api_key_only_engine_never_verifies_jwts(memory_store: KeyStore, check: Check) -> None:
    engine = make_engine(memory_store, jwt_keys=SECRET)  # keys given, scheme off
    assert engine.tokens is None
    assert denied(check(engine, "GET", "/x", bearer(hs256()), None), 401, "invalid_token")


def _nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):  # the claim set itself is one level
        value = [value]
    return value


def test_claims_nested_past_the_limit_are_refused_on_every_python() -> None:
    # Python's JSON parser stops near 1000 levels up to 3.12 and goes far
    # deeper from 3.13: the limit is ours, so every version answers alike.
    from m2m_middleware.tokens import MAX_JSON_DEPTH

    engine = jwt_engine()
    fits = hs256(claims(x=_nested(MAX_JSON_DEPTH - 1)))
    assert engine.check("GET", "/", bearer(fits), None).allowed
    too_deep = hs256(claims(x=_nested(MAX_JSON_DEPTH)))
    assert denied(engine.check("GET", "/", bearer(too_deep), None), 401, "invalid_token")
    # Brackets inside strings are text, not nesting.
    brackets = hs256(claims(note="[" * 500 + "{" * 500))
    assert engine.check("GET", "/", bearer(brackets), None).allowed
