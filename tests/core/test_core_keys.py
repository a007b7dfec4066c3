"""The API-key format: shape, entropy, checksum, hashing."""

from __future__ import annotations

import hashlib
import math
import re
import zlib

import pytest

from m2m_middleware import keys
from m2m_middleware.stores import MemoryKeyStore

KEY_RE = re.compile(r"^m2m_[0-9A-Za-z]{32}[0-9A-Za-z]{6}$")


def with_checksum(body: str) -> str:
    """``body`` plus a correct CRC32 checksum, so only the property under test is wrong."""
    return body + keys.encode_base62(zlib.crc32(body.encode("utf-8")), 6)


def other_char(ch: str) -> str:
    return "A" if ch != "A" else "B"


def test_generated_keys_have_the_documented_shape() -> None:
    for _ in range(200):
        key = keys.generate_key()
        assert KEY_RE.fullmatch(key), key
        assert keys.is_well_formed(key)


def test_secret_carries_at_least_128_bits() -> None:
    key = keys.generate_key()
    secret = key[len("m2m_") : -6]
    assert len(secret) * math.log2(62) >= 128
    # Every base62 symbol is used: a hex-only or letters-only secret would not be.
    seen = set()
    for _ in range(100):
        seen.update(keys.generate_key()[4:-6])
    assert seen == set(keys.BASE62)


def test_generated_keys_are_unique() -> None:
    generated = {keys.generate_key() for _ in range(2000)}
    assert len(generated) == 2000
    assert len({k[4:-6] for k in generated}) == 2000


def test_checksum_is_crc32_of_everything_before_it() -> None:
    key = keys.generate_key()
    body, check = key[:-6], key[-6:]
    number = 0
    for ch in check:
        number = number * 62 + keys.BASE62.index(ch)
    assert number == zlib.crc32(body.encode("ascii"))


@pytest.mark.parametrize("position", range(1, 7))
def test_a_flipped_checksum_character_is_rejected(position: int) -> None:
    key = keys.generate_key()
    i = len(key) - position
    assert not keys.is_well_formed(key[:i] + other_char(key[i]) + key[i + 1 :])


@pytest.mark.parametrize("position", range(4, 4 + 32))
def test_a_flipped_secret_character_is_rejected(position: int) -> None:
    key = keys.generate_key()
    assert not keys.is_well_formed(key[:position] + other_char(key[position]) + key[position + 1 :])


@pytest.mark.parametrize("secret_length", [0, 1, 31, 33, 64])
def test_wrong_length_is_rejected_even_with_a_valid_checksum(secret_length: int) -> None:
    key = with_checksum("m2m_" + "a" * secret_length)
    assert not keys.is_well_formed(key)


def test_truncated_and_extended_keys_are_rejected() -> None:
    key = keys.generate_key()
    assert not keys.is_well_formed(key[:-1])
    assert not keys.is_well_formed(key + "A")
    assert not keys.is_well_formed(key + key)
    assert not keys.is_well_formed("")


def test_far_too_long_input_is_rejected() -> None:
    key = keys.generate_key()
    assert not keys.is_well_formed(key + "a" * 100_000)
    assert not keys.is_well_formed("m2m_" + "a" * 1000)


@pytest.mark.parametrize("bad", ["-", "_", "+", "/", "=", " ", ".", "\x00"])
def test_non_base62_characters_are_rejected(bad: str) -> None:
    secret = keys.random_base62(31) + bad
    assert not keys.is_well_formed(with_checksum("m2m_" + secret))


@pytest.mark.parametrize("bad", ["é", "\u0660", "\uff10", "ß"])
def test_non_ascii_characters_are_rejected(bad: str) -> None:
    secret = keys.random_base62(31) + bad
    assert not keys.is_well_formed(with_checksum("m2m_" + secret))


def test_missing_prefix_is_rejected() -> None:
    key = keys.generate_key()
    rest = key[len("m2m_") :]
    assert not keys.is_well_formed(rest)
    assert not keys.is_well_formed("_" + rest)
    assert not keys.is_well_formed(with_checksum("_" + rest[:-6]))


def test_a_fresh_key_from_a_store_is_well_formed() -> None:
    store = MemoryKeyStore()
    issued = store.create_key("client-a")
    assert KEY_RE.fullmatch(issued.key)
    assert keys.is_well_formed(issued.key)


def test_custom_prefix_via_the_store() -> None:
    store = MemoryKeyStore(prefix="acme")
    key = store.create_key("client-a").key
    assert re.fullmatch(r"acme_[0-9A-Za-z]{38}", key)
    assert keys.is_well_formed(key)
    assert not keys.is_well_formed("m2m" + key[len("acme") :])  # checksum covers the prefix


@pytest.mark.parametrize("prefix", ["", "Acme", "1abc", "ac_me", "a" * 17, "ac-me"])
def test_invalid_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(ValueError):
        MemoryKeyStore(prefix=prefix)


def test_hash_key_is_sha256_hex() -> None:
    key = keys.generate_key()
    digest = keys.hash_key(key)
    assert digest == hashlib.sha256(key.encode()).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert keys.hash_key(keys.generate_key()) != digest
