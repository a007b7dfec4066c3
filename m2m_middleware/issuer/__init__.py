"""Our own token issuer (CONTRACT.md "Token service"). So far: its signing keys.

Needs the ``issuer`` extra (``pip install "m2m-middleware[issuer]"``).
"""

from __future__ import annotations

from .signing_keys import (
    DEFAULT_JWKS_MAX_AGE,
    SigningKey,
    SigningKeyInfo,
    SigningKeys,
    signing_keys_for,
)

__all__ = [
    "DEFAULT_JWKS_MAX_AGE",
    "SigningKey",
    "SigningKeyInfo",
    "SigningKeys",
    "signing_keys_for",
]
