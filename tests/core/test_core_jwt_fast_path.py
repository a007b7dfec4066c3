"""The cold-token fast path of the JWT verifier still enforces every RFC 8725 rule.

A verified token's header is remembered by its text (``TokenVerifier._headers``),
and joserfc's ``check_key`` runs once per key and algorithm in
``KeyRing.candidates`` instead of once per token. Each test below first lets a
good token through, so the header under test is the remembered one, then shows
the rule still refusing a token that carries that very header text.
"""

from __future__ import annotations

import json
from base64 import urlsafe_b64decode
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, OctKey, OKPKey, RSAKey
from joserfc.jws import JWSRegistry
from jwt_support import SECRET, b64url, claims, public_jwk, public_pem, raw_token

import m2m_middleware.tokens as tokens_module
from m2m_middleware import Settings
from m2m_middleware.errors import InvalidToken
from m2m_middleware.jwtkeys import SUPPORTED_ALGORITHMS, KeyRing, load_keys
from m2m_middleware.tokens import MAX_KNOWN_HEADERS, TokenVerifier

HEADER = {"alg": "HS256", "typ": "JWT"}
OTHER_SECRET = "another-secret-of-the-tests-" + "x" * 40
_B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def verifier(**fields: Any) -> TokenVerifier:
    fields.setdefault("schemes", ("jwt",))
    fields.setdefault("jwt_keys", SECRET)
    return TokenVerifier(Settings(**fields))


def warmed(header: dict[str, Any] = HEADER, **fields: Any) -> TokenVerifier:
    """A verifier that has verified one good token with ``header``: its text is remembered."""
    v = verifier(**fields)
    v.verify(raw_token(header, claims()))
    assert raw_token(header, claims()).split(".")[0] in v._headers
    return v


def with_header_of(token: str, other: str) -> str:
    """``other``'s payload and signature under ``token``'s header text."""
    return ".".join([token.split(".")[0], *other.split(".")[1:]])


def test_a_remembered_header_still_needs_its_signature() -> None:
    v = warmed()
    good = raw_token(HEADER, claims())
    head, payload, signature = good.split(".")
    for forged in (
        raw_token(HEADER, claims(), key=OTHER_SECRET),  # signed with another key
        f"{head}.{b64url(json.dumps(claims(sub='evil')))}.{signature}",  # payload swapped
        f"{head}.{payload}.{b64url(bytes(32))}",  # a signature of zeros
    ):
        with pytest.raises(InvalidToken, match="signature"):
            v.verify(forged)
    v.verify(good)


def test_a_remembered_header_still_needs_a_canonical_signature() -> None:
    v = warmed()
    head, payload, signature = raw_token(HEADER, claims()).split(".")
    last = _B64URL[_B64URL.index(signature[-1]) | 1]  # the same bytes, another spelling
    respelled = f"{head}.{payload}.{signature[:-1]}{last}"
    assert respelled.split(".")[2] != signature
    with pytest.raises(InvalidToken, match="canonical"):
        v.verify(respelled)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"exp": None}, r"\(exp\)"),
        ({"exp": 1}, "expired"),
        ({"nbf": 4_000_000_000}, "nbf"),
        ({"iat": 4_000_000_000}, "iat"),
        ({"exp": "soon"}, "not a number"),
        ({"iss": "https://elsewhere.example"}, "issuer"),
        ({"aud": "another-api"}, "audience"),
        ({"aud": None}, "audience"),
        ({"sub": None}, "names no client"),
        ({"sub": "\ud800"}, "Unicode"),
        ({"scope": 1}, "scope"),
    ],
)
def test_a_remembered_header_still_checks_every_claim(changes: dict[str, Any], match: str) -> None:
    v = verifier(jwt_issuer="https://idp.example", jwt_audience="api")
    good = claims(iss="https://idp.example", aud="api")
    v.verify(raw_token(HEADER, good))
    assert raw_token(HEADER, good).split(".")[0] in v._headers
    bad = {name: c for name, c in {**good, **changes}.items() if c is not None}
    with pytest.raises(InvalidToken, match=match):
        v.verify(raw_token(HEADER, bad))


def test_a_remembered_header_still_refuses_a_bad_payload() -> None:
    v = warmed()
    for payload in (
        '{"sub": "a", "sub": "b", "exp": 4000000000}',
        '{"exp": NaN, "sub": "a"}',
        "[]",
    ):
        with pytest.raises(InvalidToken):
            v.verify(raw_token(HEADER, payload))
    nested = '{"sub": "a", "exp": 4000000000, "x": ' + "[" * 100 + "]" * 100 + "}"
    with pytest.raises(InvalidToken, match="nested too deeply"):
        v.verify(raw_token(HEADER, nested))


def test_the_allow_list_and_typ_are_checked_on_every_token() -> None:
    """What depends on settings is never remembered: only what the header text alone says."""
    v = warmed(jwt_typ="JWT")
    untyped = {"alg": "HS256"}
    with pytest.raises(InvalidToken, match="typ"):
        v.verify(raw_token(untyped, claims()))
    assert raw_token(untyped, claims()).split(".")[0] not in v._headers
    # The same remembered header text sent to a verifier that allows other algorithms only.
    strict = verifier(jwt_keys=public_pem(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(InvalidToken, match="algorithm"):
        strict.verify(raw_token(HEADER, claims()))


@pytest.mark.parametrize(
    "header",
    [
        {"alg": "HS256", "crit": ["exp"]},
        {"alg": "HS256", "b64": False},
        {"alg": "HS256", "kid": 7},
        '{"alg": "HS256", "alg": "none"}',
        {"alg": "none"},
        {"alg": ["HS256"]},
    ],
)
def test_a_header_refused_by_its_own_rules_is_refused_every_time_and_never_remembered(
    header: dict[str, Any] | str,
) -> None:
    v = verifier()
    token = raw_token(header, claims(), alg="HS256")
    for _ in range(3):
        with pytest.raises(InvalidToken):
            v.verify(token)
    assert not v._headers


def test_forged_tokens_never_fill_the_remembered_headers() -> None:
    v = verifier()
    for i in range(2 * MAX_KNOWN_HEADERS):
        header = {"alg": "HS256", "kid": f"forged-{i}"}
        with pytest.raises(InvalidToken, match="signature"):
            v.verify(raw_token(header, claims(), key=OTHER_SECRET))
    assert not v._headers


def test_the_remembered_headers_are_bounded() -> None:
    v = verifier()  # a key without a kid verifies tokens naming any kid
    for i in range(3 * MAX_KNOWN_HEADERS + 5):
        v.verify(raw_token({"alg": "HS256", "kid": f"k{i}"}, claims()))
        assert len(v._headers) <= MAX_KNOWN_HEADERS


def test_a_remembered_header_is_read_only_and_the_same_as_parsed() -> None:
    v = warmed()
    token = raw_token(HEADER, claims())
    parsed = v.parse(token)
    assert dict(parsed.header) == json.loads(urlsafe_b64decode(token.split(".")[0] + "=="))
    assert (parsed.alg, parsed.kid) == ("HS256", None)
    with pytest.raises(TypeError):
        parsed.header["alg"] = "none"  # type: ignore[index]


def test_a_remembered_header_under_another_payload_verifies_only_its_own_signature() -> None:
    """Header text is a cache key for its parse only: the signature covers it every time."""
    v = warmed()
    mine = raw_token(HEADER, claims(sub="mine"))
    theirs = raw_token({"alg": "HS256"}, claims(sub="theirs"))
    with pytest.raises(InvalidToken, match="signature"):
        v.verify(with_header_of(mine, theirs))


# -- joserfc's check_key, once per key and algorithm ---------------------------------------


def _every_kind_of_key() -> list[Any]:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec256 = ec.generate_private_key(ec.SECP256R1())
    ec384 = ec.generate_private_key(ec.SECP384R1())
    ed = ed25519.Ed25519PrivateKey.generate()
    return [
        OctKey.import_key(SECRET),
        OctKey.import_key(SECRET, {"alg": "HS512"}),
        RSAKey.import_key(public_pem(rsa_key)),
        RSAKey.import_key(public_jwk(rsa_key, alg="PS256")),
        ECKey.import_key(public_pem(ec256)),
        ECKey.import_key(public_jwk(ec256, use="enc")),
        ECKey.import_key(public_pem(ec384)),
        OKPKey.import_key(public_pem(ed)),
        OKPKey.import_key(public_jwk(ed, key_ops=["encrypt"])),
    ]


def test_every_candidate_passes_joserfcs_own_check_key_and_no_other_does() -> None:
    keys = _every_kind_of_key()
    ring = KeyRing(keys)
    for alg in SUPPORTED_ALGORITHMS:
        model = JWSRegistry.algorithms[alg]
        handed_out = ring.candidates(None, alg)
        for key in keys:
            try:
                model.check_key(key)
            except JoseError:
                assert key not in handed_out, (alg, key)
            else:
                ops = key.get("key_ops")
                if ops is None or "verify" in ops:
                    assert key in handed_out, (alg, key)
        for key in handed_out:
            model.check_key(key)  # raises if a key ever slipped past it


def test_a_key_for_another_use_or_alg_never_verifies_though_the_signature_is_right() -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    token = raw_token({"alg": "ES256", "kid": "e1"}, claims(), key=private)
    v = verifier(jwt_keys={"keys": [public_jwk(private, kid="e1")]})
    v.verify(token)  # the control: this key, stated for nothing in particular, verifies it
    for members in ({"use": "enc"}, {"alg": "ES384"}, {"key_ops": ["encrypt"]}):
        # The same key, published for something else (swapped in: settings would refuse
        # a key set that can verify nothing).
        v.static = load_keys({"keys": [public_jwk(private, kid="e1", **members)]})
        with pytest.raises(InvalidToken, match="no key"):
            v.verify(token)


def test_the_module_has_no_unmapped_base64_errors() -> None:
    """The binascii decoder's errors are a 401 like the base64 module's were."""
    v = verifier()
    head, payload, signature = raw_token(HEADER, claims()).split(".")
    for bad in (
        f"{head}.{payload}A.{signature}",
        f"{head}A.{payload}.{signature}",
        f"{head}.{payload}.{signature}AB",
    ):
        with pytest.raises(InvalidToken):
            v.verify(bad)
    assert tokens_module._b64decode("YQ") == b"a"


# -- the payload's JSON and the shared scope sets ------------------------------------------


def test_payload_json_is_judged_as_before_around_the_fast_decoder() -> None:
    """The scanner takes a payload only when it consumes all of it; otherwise decode judges."""
    v = warmed()
    body = json.dumps(claims())
    for accepted in (body, f" {body}", f"{body}\r\n", f"\n\t{body} "):
        assert v.verify(raw_token(HEADER, accepted)).client.client_id == "svc"
    for refused in (f"{body} x", f"{body}{body}", f"{body},", body[:-1], f"[{body}]", " "):
        with pytest.raises(InvalidToken, match="payload"):
            v.verify(raw_token(HEADER, refused))


def test_tokens_with_one_scope_string_share_one_immutable_scope_set() -> None:
    v = warmed()
    first = v.verify(raw_token(HEADER, claims(scope="orders:read orders:write"))).client
    second = v.verify(raw_token(HEADER, claims(scope="orders:read orders:write", jti="2"))).client
    assert first.scopes == second.scopes == frozenset({"orders:read", "orders:write"})
    assert first.scopes is second.scopes  # one set, and a frozenset: nothing can change it
    other = v.verify(raw_token(HEADER, claims(scope="orders:read"))).client
    assert other.scopes == frozenset({"orders:read"})


def test_the_shared_scope_sets_are_bounded() -> None:
    v = verifier()
    for i in range(tokens_module.MAX_KNOWN_SCOPES * 2 + 3):
        assert v.verify(raw_token(HEADER, claims(scope=f"s{i} t"))).client.scopes == {f"s{i}", "t"}
        assert len(tokens_module._SCOPE_SETS) <= tokens_module.MAX_KNOWN_SCOPES
