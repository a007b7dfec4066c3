"""Private signing keys sealed at rest: AES-GCM under a key made from ``signing_key_secret``.

Why scrypt and not HKDF: HKDF is right when the input is already a random
key, but ``signing_key_secret`` is whatever an operator put in an environment
variable, often a passphrase. Whoever copies the database may guess it
offline, and scrypt makes every guess cost ~16 MiB and tens of milliseconds
where HKDF would cost a microsecond. The price is paid once per key per
process (a key is unsealed when first needed, then kept in memory), never per
request. Each sealed key has its own salt and nonce; the key id and algorithm
are the AES-GCM associated data, so a sealed key moved to another row (or
relabelled with another algorithm) fails to open instead of signing under a
name that is not its own.
"""

from __future__ import annotations

import base64
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from ..errors import ConfigError

#: The sealed format's tag; a later format gets another one, old rows stay readable.
FORMAT = "m2m-seal-1"
#: scrypt's cost (RFC 7914 section 2's interactive-login figures: N=2**14, r=8, p=1).
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
#: Shorter secrets are refused: a guessable one would make the sealing decoration.
MIN_SECRET_LENGTH = 16


def check_secret(secret: str | None) -> str:
    """The secret, or a ConfigError naming ``signing_key_secret`` (never quoting it)."""
    if secret is None or secret == "":
        raise ConfigError(
            "signing_key_secret",
            "the token issuer needs a secret to encrypt its private signing keys at rest: "
            "set signing_key_secret or the environment variable M2M_SIGNING_SECRET "
            '(for instance to the output of python -c "import secrets; '
            'print(secrets.token_urlsafe(32))")',
        )
    if len(secret) < MIN_SECRET_LENGTH:
        raise ConfigError(
            "signing_key_secret",
            f"too short ({len(secret)} characters): use at least {MIN_SECRET_LENGTH}, "
            "for instance secrets.token_urlsafe(32)",
        )
    return secret


def _key(secret: str, salt: bytes) -> bytes:
    kdf = Scrypt(salt=salt, length=32, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
    return kdf.derive(secret.encode("utf-8"))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _associated(kid: str, algorithm: str) -> bytes:
    return f"{FORMAT}|{kid}|{algorithm}".encode()


def seal(secret: str, private_pem: bytes, *, kid: str, algorithm: str) -> str:
    """``private_pem`` encrypted, as one ASCII text for a database column."""
    salt, nonce = os.urandom(16), os.urandom(12)
    sealed = AESGCM(_key(secret, salt)).encrypt(nonce, private_pem, _associated(kid, algorithm))
    return "$".join((FORMAT, _b64(salt), _b64(nonce), _b64(sealed)))


def unseal(secret: str, sealed: str, *, kid: str, algorithm: str) -> bytes:
    """The private key that :func:`seal` sealed, or a ConfigError saying the secret is wrong."""
    try:
        tag, salt, nonce, body = sealed.split("$")
        if tag != FORMAT:
            raise ValueError(tag)
        salt_bytes, nonce_bytes, body_bytes = _unb64(salt), _unb64(nonce), _unb64(body)
    except (ValueError, AttributeError):
        raise ConfigError(
            "signing_key_secret",
            f"the stored private key of signing key {kid!r} is not in a format this "
            "release reads (damaged, or written by a newer m2m-middleware)",
        ) from None
    try:
        return AESGCM(_key(secret, salt_bytes)).decrypt(
            nonce_bytes, body_bytes, _associated(kid, algorithm)
        )
    except (InvalidTag, ValueError):
        raise ConfigError(
            "signing_key_secret",
            f"cannot decrypt signing key {kid!r} from the key store: signing_key_secret "
            "(or M2M_SIGNING_SECRET) is not the secret the key was encrypted with, or the "
            "row was altered",
        ) from None
