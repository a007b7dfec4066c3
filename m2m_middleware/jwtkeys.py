"""JWT verification keys: loading them from settings, and matching one to a token.

RFC 8725 asks that each key be used with the algorithms of its own kind only:
an RSA public key never verifies an HS256 token, even when its PEM text is
offered as the HMAC secret (the "algorithm confusion" attack). So every key is
imported as exactly one joserfc key type, and :meth:`KeyRing.candidates` only
hands out keys whose type (and curve, and ``alg``/``use``/``key_ops`` where the
JWK states them) fit the token's algorithm.
"""

from __future__ import annotations

import binascii
from base64 import urlsafe_b64decode
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, JWKRegistry, OctKey, OKPKey, RSAKey
from joserfc.jws import JWSRegistry

from .errors import ConfigError

Key = OctKey | RSAKey | ECKey | OKPKey

#: The shortest HMAC secret accepted (RFC 7518 section 3.2: at least the hash size of HS256).
MIN_HMAC_BYTES = 32
#: RSA keys below this size are refused (RFC 7518 section 3.3).
MIN_RSA_BITS = 2048
#: Every JWS algorithm this package verifies; "none" is never among them.
SUPPORTED_ALGORITHMS = tuple(name for name in JWSRegistry.algorithms if name != "none")
#: Without ``jwt_algorithms``, the ones of these that the keys can verify.
DEFAULT_ALGORITHMS = ("HS256", "RS256", "PS256", "ES256", "ES384", "ES512", "EdDSA")
_EDDSA_CURVES = frozenset({"Ed25519", "Ed448"})


def _requirements(alg: str) -> tuple[str, frozenset[str] | None]:
    """The key type and curves an algorithm needs."""
    model = JWSRegistry.algorithms[alg]
    curve = getattr(model, "curve", None)
    if curve is not None:
        return model.key_type, frozenset({curve})
    if model.key_type == "OKP":
        return "OKP", _EDDSA_CURVES
    return model.key_type, None


def key_fits(key: Key, alg: str) -> bool:
    """Whether ``key`` may verify a token signed with ``alg``."""
    key_type, curves = _requirements(alg)
    if key.key_type != key_type:
        return False
    if curves is not None and key.get("crv") not in curves:
        return False
    if key.alg is not None and key.alg != alg:
        return False
    use = key.get("use")
    if use is not None and use != "sig":
        return False
    ops = key.get("key_ops")
    if ops is not None and "verify" not in ops:
        return False
    # joserfc's own check too (use, key type, alg, curve), once per key and alg
    # here rather than per token in TokenVerifier.finish: KeyRing.candidates
    # memoizes the keys that pass, and the answer depends on nothing else.
    try:
        JWSRegistry.algorithms[alg].check_key(key)
    except (JoseError, ValueError):
        return False
    return True


class KeyRing:
    """Verification keys, found by exact ``kid`` (no pattern, no path, no URL)."""

    __slots__ = ("_fitting", "by_kid", "keys", "unnamed")

    def __init__(self, keys: Iterable[Key]) -> None:
        self.keys: tuple[Key, ...] = tuple(keys)
        self.by_kid: dict[str, list[Key]] = {}
        unnamed = []
        for key in self.keys:
            kid = key.kid
            if isinstance(kid, str):
                self.by_kid.setdefault(kid, []).append(key)
            else:
                unnamed.append(key)
        self.unnamed: tuple[Key, ...] = tuple(unnamed)
        # (kid, alg) -> fitting keys, for kids the ring holds: a bounded memo.
        self._fitting: dict[tuple[str | None, str], list[Key]] = {}

    def knows(self, kid: str | None) -> bool:
        """Whether a token with this ``kid`` names a key the ring holds.

        Keys without a ``kid`` still verify such a token (see :meth:`candidates`),
        but they do not make every ``kid`` known: a new ``kid`` is how an
        identity provider announces a rotation.
        """
        return kid is None or kid in self.by_kid

    def candidates(self, kid: str | None, alg: str) -> list[Key]:
        """The keys that may verify a token with this ``kid`` and ``alg``.

        A token naming a ``kid`` gets the keys with exactly that ``kid``, else
        the keys that have none (a single PEM key, say); a token without one
        is tried against every key that fits its algorithm.
        """
        memo = (kid, alg)
        found = self._fitting.get(memo)
        if found is not None:
            return found
        if kid is None:
            pool: Sequence[Key] = self.keys
        else:
            pool = self.by_kid.get(kid) or self.unnamed
        found = [key for key in pool if key_fits(key, alg)]
        if (kid is None or kid in self.by_kid) and len(self._fitting) < 1024:
            self._fitting[memo] = found  # never for forged kids: they are unbounded
        return found

    def fits_any(self, algorithms: Iterable[str]) -> bool:
        return any(key_fits(key, alg) for key in self.keys for alg in algorithms)


def load_keys(value: object, field: str = "jwt_keys") -> KeyRing:
    """``jwt_keys`` as given in settings -> a :class:`KeyRing`, or ``ConfigError``.

    Accepts a JWKS mapping ``{"keys": [...]}``, one JWK mapping, a PEM public
    key, an HMAC secret (str or bytes, at least 32 bytes), a joserfc key, or a
    list of any of these.
    """
    if isinstance(value, Mapping) and "keys" in value:
        items = value["keys"]
        if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Iterable):
            raise ConfigError(field, "'keys' must be a list of JWKs")
        return KeyRing(_load_one(item, f"{field}.keys[{i}]") for i, item in enumerate(items))
    if isinstance(value, (list, tuple)):
        return KeyRing(_load_one(item, f"{field}[{i}]") for i, item in enumerate(value))
    return KeyRing([_load_one(value, field)])


def _load_one(value: object, field: str) -> Key:
    if isinstance(value, (OctKey, RSAKey, ECKey, OKPKey)):
        key = value
    elif isinstance(value, Mapping):
        weak = _weakness(value)
        if weak is not None:
            raise ConfigError(field, weak)
        try:
            key = JWKRegistry.import_key(dict(value))
        except (JoseError, ValueError, TypeError, KeyError) as exc:
            raise ConfigError(field, f"not a usable JWK: {exc}") from None
    elif isinstance(value, (str, bytes)):
        data = value.encode() if isinstance(value, str) else value
        if b"-----BEGIN" in data or data.startswith((b"ssh-", b"ecdsa-")):
            key = _import_pem(data, field)
        else:
            if len(data) < MIN_HMAC_BYTES:
                raise ConfigError(
                    field,
                    f"an HMAC secret must be at least {MIN_HMAC_BYTES} bytes "
                    f"(this one has {len(data)}); generate one with "
                    "python -c 'import secrets; print(secrets.token_urlsafe(48))'",
                )
            key = OctKey.import_key(data)
    else:
        raise ConfigError(
            field,
            "expected a JWKS mapping, a JWK, a PEM public key or an HMAC secret, "
            f"got {type(value).__name__}",
        )
    return _checked(key, field)


def _import_pem(data: bytes, field: str) -> Key:
    if b"PRIVATE KEY" in data:
        raise ConfigError(field, "this is a private key; give the verifier the public key only")
    try:
        public = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        public = None
    if isinstance(public, rsa.RSAPublicKey) and public.key_size < MIN_RSA_BITS:
        # Checked before joserfc sees it, which would only warn.
        raise ConfigError(field, _RSA_TOO_SHORT)
    for key_type in ("RSA", "EC", "OKP"):
        try:
            return JWKRegistry.import_key(data, key_type)
        except (JoseError, ValueError, TypeError):
            continue
    raise ConfigError(field, "not a PEM public key this package can use (RSA, EC or OKP)")


def _checked(key: Key, field: str) -> Key:
    if isinstance(key, OctKey):
        if len(key.raw_value) < MIN_HMAC_BYTES:
            raise ConfigError(field, f"an HMAC secret must be at least {MIN_HMAC_BYTES} bytes")
    elif key.is_private and not isinstance(key, OctKey):
        raise ConfigError(field, "this is a private key; give the verifier the public key only")
    if isinstance(key, RSAKey) and key.public_key.key_size < MIN_RSA_BITS:
        raise ConfigError(field, _RSA_TOO_SHORT)
    return key


_RSA_TOO_SHORT = f"RSA keys must have at least {MIN_RSA_BITS} bits"


def _weakness(jwk: Mapping[Any, Any]) -> str | None:
    """Why a JWK is too weak to use, checked before importing it (joserfc only warns)."""
    kty = jwk.get("kty")
    member = "k" if kty == "oct" else "n" if kty == "RSA" else None
    if member is None or not isinstance(jwk.get(member), str):
        return None  # nothing to measure here; the import judges the rest
    try:
        size = len(urlsafe_b64decode(jwk[member] + "=" * (-len(jwk[member]) % 4)))
    except (ValueError, binascii.Error):
        return None
    if kty == "oct" and size < MIN_HMAC_BYTES:
        return f"an HMAC secret must be at least {MIN_HMAC_BYTES} bytes"
    if kty == "RSA" and size * 8 < MIN_RSA_BITS:
        return _RSA_TOO_SHORT
    return None


#: Key types a published key set may contribute. Never ``oct``: a symmetric key
#: in a public document is a secret anyone can read, and would let them sign.
PUBLISHED_KEY_TYPES = frozenset({"RSA", "EC", "OKP"})


def import_jwk(value: Any) -> Key | None:
    """One JWK from a fetched key set, or None when it is unusable for verifying."""
    if not isinstance(value, Mapping) or value.get("use", "sig") != "sig":
        return None
    if value.get("kty") not in PUBLISHED_KEY_TYPES or _weakness(value) is not None:
        return None
    try:
        key = JWKRegistry.import_key(dict(value))
        return _checked(key, "jwks")
    except Exception:  # an unusable key is skipped, whatever the library raised
        return None
