"""API-key format: ``<prefix>_<base62 secret><6-char base62 CRC32>``.

The checksum lets a typo or a scanner's random guess be rejected before any
store lookup, and lets secret scanners recognise leaked keys offline (the
format GitHub's tokens use). Keys carry 190 bits from :mod:`secrets`, so a
single SHA-256 is the right hash at rest: a slow password hash buys nothing
against a search space this large and would cost milliseconds per request.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import zlib

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
DEFAULT_PREFIX = "m2m"
SECRET_LENGTH = 32  # 62**32 ~ 2**190
CHECKSUM_LENGTH = 6  # 62**6 > 2**32
KEY_ID_LENGTH = 12
MAX_KEY_LENGTH = 200

_PREFIX_RE = re.compile(r"[a-z][a-z0-9]{0,15}")
_BASE62_SET = frozenset(BASE62)


def encode_base62(number: int, width: int) -> str:
    digits = []
    while number:
        number, rest = divmod(number, 62)
        digits.append(BASE62[rest])
    return "".join(reversed(digits)).rjust(width, "0")


def random_base62(length: int) -> str:
    return "".join(secrets.choice(BASE62) for _ in range(length))


def checksum(body: str) -> str:
    return encode_base62(zlib.crc32(body.encode("ascii")), CHECKSUM_LENGTH)


def validate_prefix(prefix: str) -> str:
    if not _PREFIX_RE.fullmatch(prefix):
        raise ValueError(
            "a key prefix is 1-16 lower-case letters or digits, starting with a letter"
        )
    return prefix


def generate_key(prefix: str = DEFAULT_PREFIX) -> str:
    body = f"{prefix}_{random_base62(SECRET_LENGTH)}"
    return body + checksum(body)


def generate_key_id() -> str:
    return "key_" + random_base62(KEY_ID_LENGTH)


def is_well_formed(key: str) -> bool:
    """Shape and checksum only; says nothing about whether the key exists."""
    if len(key) > MAX_KEY_LENGTH or not key.isascii():
        return False
    prefix, sep, rest = key.partition("_")
    if not sep or not prefix or len(rest) != SECRET_LENGTH + CHECKSUM_LENGTH:
        return False
    if not _BASE62_SET.issuperset(rest):
        return False
    return checksum(key[:-CHECKSUM_LENGTH]) == key[-CHECKSUM_LENGTH:]


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
