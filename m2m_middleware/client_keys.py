"""What a key may carry beyond its scopes: the networks it may be used from, and the
client's own public key for request signatures (RFC 9421).

Validated when a key is created, so a store never holds one that a request
could not use: CIDRs in canonical form, and a public key that ``cryptography``
loads as Ed25519 or P-256. A private key is refused outright: the server must
never hold a client's signing secret, and the error says so without echoing it.
"""

from __future__ import annotations

from collections.abc import Iterable

from .transport import normalised_cidrs

#: The algorithms a client's request-signing key may use (RFC 9421 section 3.3).
SIGNING_KEY_KINDS = ("Ed25519", "P-256")
#: A PEM public key of either kind is a few hundred bytes; far more is not one.
MAX_PUBLIC_KEY_PEM = 4096


def check_allowed_cidrs(cidrs: Iterable[str] | None) -> tuple[str, ...]:
    """The networks as stored: validated, canonical, without repeats (ValueError)."""
    if cidrs is None:
        return ()
    try:
        return normalised_cidrs(cidrs)
    except ValueError as exc:
        raise ValueError(f"allowed_cidrs: {exc}") from None


def check_signing_public_key(pem: str | bytes | None) -> str | None:
    """The PEM of an Ed25519 or P-256 public key, normalised (SubjectPublicKeyInfo);
    ValueError for anything else, naming the problem, never quoting the text."""
    if pem is None:
        return None
    if isinstance(pem, str):
        data = pem.encode("utf-8", "replace")
    elif isinstance(pem, bytes):
        data = pem
    else:
        raise ValueError(f"signing_public_key: expected PEM text, got {type(pem).__name__}")
    if not data.strip():
        return None
    if b"PRIVATE KEY" in data:
        raise ValueError(
            "signing_public_key: this is a private key; give the server the public key only "
            "(openssl pkey -in client.pem -pubout), and keep the private key with the client"
        )
    if len(data) > MAX_PUBLIC_KEY_PEM:
        raise ValueError("signing_public_key: too long for an Ed25519 or P-256 public key")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise ValueError("signing_public_key: not a PEM public key") from None
    except Exception:  # cryptography's UnsupportedAlgorithm and kin
        raise ValueError("signing_public_key: not a public key cryptography can read") from None
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError(
                f"signing_public_key: an EC key on {key.curve.name}; only P-256 (secp256r1) "
                "or Ed25519 keys sign requests"
            )
    elif not isinstance(key, ed25519.Ed25519PublicKey):
        raise ValueError(
            f"signing_public_key: a {type(key).__name__.removesuffix('PublicKey')} key; "
            "only Ed25519 or P-256 keys sign requests"
        )
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")
