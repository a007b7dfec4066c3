"""Helpers for the JWT core tests: keys, hand-made tokens, a fake identity provider.

Tokens are minted two ways: with PyJWT (what a real issuer sends) and with
:func:`raw_token`, which signs any header and payload *text* exactly as given,
so a test can send duplicate members, ``NaN`` or a ``crit`` header that no
library would produce, and still have a valid signature: the rejection is then
due to the property under test, not to a broken signature.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from base64 import urlsafe_b64encode
from collections.abc import Callable, Mapping
from typing import Any

import jwt as pyjwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from m2m_middleware import Allowed, Denied, Engine, Settings

#: 64 bytes: long enough for HS512 without PyJWT's short-key warning.
SECRET = "jwt-core-tests-secret-" + "0123456789abcdefghij" * 2 + "AB"
assert len(SECRET) == 64

_HASHES = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}

# -- RFC 7515 Appendix A, typed from the RFC text --------------------------------------

#: A.1 (HS256): header {"typ":"JWT",\r\n "alg":"HS256"}; payload {"iss":"joe",\r\n
#: "exp":1300819380,\r\n "http://example.com/is_root":true}.
RFC_A1_TOKEN = (
    "eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9"
    ".eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ"
    ".dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
)
RFC_A1_JWK = {
    "kty": "oct",
    "k": "AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcgUuTwjAzZr1Z9CAow",
}

#: A.2 (RS256): header {"alg":"RS256"}, the same payload.
RFC_A2_TOKEN = (
    "eyJhbGciOiJSUzI1NiJ9"
    ".eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ"
    ".cC4hiUPoj9Eetdgtv3hF80EGrhuB__dzERat0XF9g2VtQgr9PJbu3XOiZj5RZmh7"
    "AAuHIm4Bh-0Qc_lF5YKt_O8W2Fp5jujGbds9uJdbF9CUAr7t1dnZcAcQjbKBYNX4"
    "BAynRFdiuB--f_nZLgrnbyTyWzO75vRK5h6xBArLIARNPvkSjtQBMHlb1L07Qe7K"
    "0GarZRmB_eSN9383LcOLn6_dO--xi12jzDwusC-eOkHWEsqtFZESc6BfI7noOPqv"
    "hJ1phCnvWh6IeYI2w9QOYEUipUTI8np6LbgGY9Fs98rqVt5AXLIhWkWywlVmtVrB"
    "p0igcN_IoypGlUPQGe77Rw"
)
RFC_A2_JWK = {
    "kty": "RSA",
    "n": "ofgWCuLjybRlzo0tZWJjNiuSfb4p4fAkd_wWJcyQoTbji9k0l8W26mPddx"
    "HmfHQp-Vaw-4qPCJrcS2mJPMEzP1Pt0Bm4d4QlL-yRT-SFd2lZS-pCgNMs"
    "D1W_YpRPEwOWvG6b32690r2jZ47soMZo9wGzjb_7OMg0LOL-bSf63kpaSH"
    "SXndS5z5rexMdbBYUsLA9e-KXBdQOS-UTo7WTBEMa2R2CapHg665xsmtdV"
    "MTBQY4uDZlxvb3qCo5ZwKh9kG4LT6_I5IhlJH7aGhyxXFvUK-DWNmoudF8"
    "NAco9_h9iaGNj8q2ethFkMLs91kzk2PAcDTW9gb54h4FRWyuXpoQ",
    "e": "AQAB",
}

#: A.3 (ES256): header {"alg":"ES256"}, the same payload; the RFC's (randomized) signature.
RFC_A3_TOKEN = (
    "eyJhbGciOiJFUzI1NiJ9"
    ".eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ"
    ".DtEhU3ljbEg8L38VWAfUAqOyKAM6-Xx-F4GawxaepmXFCgfTjDxw5djxLa8ISlSApmWQxfKTUJqPP3-Kg6NU1Q"
)
RFC_A3_JWK = {
    "kty": "EC",
    "crv": "P-256",
    "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
    "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0",
}
RFC_A3_PRIVATE_JWK = {**RFC_A3_JWK, "d": "jpsQnnGQmL-YBIffH1136cspYG6-0iY7X1fCE9-E9LI"}
#: The examples' ``exp``: 2011-03-22T18:43:00Z.
RFC_EXP = 1300819380


# -- encoding and signing -----------------------------------------------------------


def b64url(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode()
    return urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _text(value: Mapping[str, Any] | str | bytes) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return json.dumps(dict(value), separators=(",", ":")).encode()


def raw_token(
    header: Mapping[str, Any] | str | bytes,
    payload: Mapping[str, Any] | str | bytes,
    key: Any = SECRET,
    alg: str | None = None,
) -> str:
    """A compact JWS over exactly this header and payload text, validly signed.

    ``key`` is an HMAC secret (str or bytes) or a ``cryptography`` private key;
    ``alg`` defaults to the header's ``alg`` member.
    """
    if alg is None:
        assert isinstance(header, Mapping), "give alg when the header is raw text"
        alg = header["alg"]
    signing_input = f"{b64url(_text(header))}.{b64url(_text(payload))}".encode("ascii")
    if alg in _HASHES:
        secret = key.encode() if isinstance(key, str) else key
        signature = hmac.new(secret, signing_input, _HASHES[alg]).digest()
    else:
        algorithm = pyjwt.get_algorithm_by_name(alg)
        signature = algorithm.sign(signing_input, key)
    return f"{signing_input.decode('ascii')}.{b64url(signature)}"


def claims(**extra: Any) -> dict[str, Any]:
    """A valid claim set: ``sub`` "svc", an hour to live; ``extra`` overrides (None drops)."""
    now = int(time.time())
    base: dict[str, Any] = {"sub": "svc", "iat": now, "exp": now + 3600}
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def hs256(
    payload: Mapping[str, Any] | None = None, secret: str | bytes = SECRET, **head: Any
) -> str:
    """A PyJWT HS256 token (``payload`` defaults to :func:`claims`)."""
    return pyjwt.encode(
        dict(payload if payload is not None else claims()),
        secret,
        algorithm="HS256",
        headers=head or None,
    )


# -- keys ---------------------------------------------------------------------------


def public_pem(private_key: Any) -> str:
    return (
        private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def private_pem(private_key: Any, fmt: str = "pkcs8") -> str:
    formats = {
        "pkcs8": serialization.PrivateFormat.PKCS8,
        "traditional": serialization.PrivateFormat.TraditionalOpenSSL,
    }
    return private_key.private_bytes(
        serialization.Encoding.PEM, formats[fmt], serialization.NoEncryption()
    ).decode()


def public_jwk(private_key: Any, **members: Any) -> dict[str, Any]:
    """The public JWK of a ``cryptography`` private key, with extra members (kid, use, alg)."""
    public = private_key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
    jwk.pop("key_ops", None)  # PyJWT adds ["verify"]; IdPs usually state "use" instead
    jwk.update(members)
    return jwk


# -- the engine ---------------------------------------------------------------------


def jwt_engine(**fields: Any) -> Engine:
    """A JWT-only engine on in-memory stores; ``jwt_keys`` defaults to :data:`SECRET`."""
    fields.setdefault("schemes", ("jwt",))
    if "jwt_jwks_url" not in fields:
        fields.setdefault("jwt_keys", SECRET)
    fields.setdefault("rate_limit_storage", "memory://")
    return Engine(Settings(**fields))


def bearer(token: str) -> str:
    return f"Bearer {token}"


def denied(outcome: Allowed | Denied, status: int, error: str) -> bool:
    return isinstance(outcome, Denied) and (outcome.status, outcome.error) == (status, error)


# -- a fake identity provider and a monotonic clock for JWKSClient --------------------


class FakeIdP:
    """Stands in for ``http_fetch``: serves ``keys`` as a JWKS, or fails when ``down``."""

    def __init__(self, keys: list[dict[str, Any]], cache_control: str | None = None) -> None:
        self.keys = list(keys)
        self.cache_control = cache_control
        self.down: BaseException | None = None
        self.body: bytes | None = None  # served as is instead of ``keys`` when set
        self.urls: list[str] = []

    def __call__(self, url: str, timeout: float) -> tuple[bytes, str | None]:
        self.urls.append(url)
        if self.down is not None:
            raise self.down
        body = self.body if self.body is not None else json.dumps({"keys": self.keys}).encode()
        return body, self.cache_control


class Mono:
    """A monotonic clock that only moves when told."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def finish_in_a_thread(work: Callable[[], None]) -> None:
    """A :class:`JWKSClient` spawner for tests on a :class:`Mono` clock: the fetch runs
    in a thread of its own (never the caller's, never an event loop's) and is over
    when the call returns, so a refresh behind a request has landed before the
    test moves the clock on."""
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(10)
