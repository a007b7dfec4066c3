"""A key's allowed_cidrs and signing_public_key: validated, stored, read back by every store,
and added to key tables made by an earlier release."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import psycopg
import pytest
from core_support import sqlite_url
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from m2m_middleware import Engine, KeyStore, Settings, open_key_store
from m2m_middleware.keys import hash_key


def public_pem(private: object) -> str:
    key = private.public_key()  # type: ignore[attr-defined]
    return str(
        key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()
    )


def private_pem(private: object) -> str:
    return str(
        private.private_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
    )


ED25519 = ed25519.Ed25519PrivateKey.generate()
P256 = ec.generate_private_key(ec.SECP256R1())


def test_both_fields_round_trip_in_every_store(store: KeyStore) -> None:
    pem = public_pem(ED25519)
    issued = store.create_key(
        "svc",
        allowed_cidrs=["10.1.2.0/24", "2001:DB8::/32", "192.0.2.7"],
        signing_public_key=pem,
    )
    expected = ("10.1.2.0/24", "2001:db8::/32", "192.0.2.7/32")  # canonical form
    assert issued.record.allowed_cidrs == expected
    assert issued.record.signing_public_key == pem
    for record in (store.get_key(issued.key_id), store.list_keys("svc")[0]):
        assert record.allowed_cidrs == expected
        assert record.signing_public_key == pem
    found = store.find_by_hash(hash_key(issued.key))
    assert found is not None and found.allowed_cidrs == expected
    as_dict = store.get_key(issued.key_id).to_dict()
    assert as_dict["allowed_cidrs"] == list(expected)
    assert as_dict["signing_public_key"] == pem


def test_a_key_without_them_has_none(store: KeyStore) -> None:
    record = store.get_key(store.create_key("svc").key_id)
    assert record.allowed_cidrs == ()
    assert record.signing_public_key is None


def test_rotation_keeps_both(store: KeyStore) -> None:
    old = store.create_key("svc", allowed_cidrs=["10.0.0.0/8"], signing_public_key=public_pem(P256))
    new = store.rotate_key(old.key_id)
    assert new.record.allowed_cidrs == ("10.0.0.0/8",)
    assert new.record.signing_public_key == public_pem(P256)


@pytest.mark.parametrize(
    "cidrs",
    [["10.0.0.1/8"], ["10.0.0.0/33"], ["not a network"], ["2001:db8::/129"], [""], [7]],
)
def test_bad_networks_are_refused(memory_store: KeyStore, cidrs: list[object]) -> None:
    with pytest.raises(ValueError, match="allowed_cidrs"):
        memory_store.create_key("svc", allowed_cidrs=cidrs)  # type: ignore[arg-type]
    assert memory_store.list_keys() == []


def test_repeated_and_mapped_networks_are_stored_once_canonically(
    memory_store: KeyStore,
) -> None:
    issued = memory_store.create_key(
        "svc", allowed_cidrs=["10.0.0.0/8", " 10.0.0.0/8", "::ffff:192.0.2.0/120"]
    )
    assert issued.record.allowed_cidrs == ("10.0.0.0/8", "192.0.2.0/24")


@pytest.mark.parametrize("kind", ["ed25519", "p256"])
def test_the_two_kinds_of_public_key_are_taken(memory_store: KeyStore, kind: str) -> None:
    private = ED25519 if kind == "ed25519" else P256
    issued = memory_store.create_key("svc", signing_public_key=public_pem(private).encode())
    assert issued.record.signing_public_key == public_pem(private)


def test_a_private_key_is_refused_without_being_echoed(memory_store: KeyStore) -> None:
    secret = private_pem(ED25519)
    with pytest.raises(ValueError, match="private key") as raised:
        memory_store.create_key("svc", signing_public_key=secret)
    body = secret.splitlines()[1]
    assert body not in str(raised.value)
    assert memory_store.list_keys() == []


@pytest.mark.parametrize(
    ("pem", "problem"),
    [
        (public_pem(rsa.generate_private_key(65537, 2048)), "only Ed25519 or P-256"),
        (public_pem(ec.generate_private_key(ec.SECP384R1())), "P-256"),
        ("-----BEGIN PUBLIC KEY-----\nnonsense\n-----END PUBLIC KEY-----\n", "not a PEM"),
        ("hello", "not a PEM"),
        ("x" * 10_000, "too long"),
    ],
)
def test_other_keys_are_refused(memory_store: KeyStore, pem: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        memory_store.create_key("svc", signing_public_key=pem)


def test_a_hand_edited_network_is_no_network(sqlite_store: KeyStore, tmp_path: Path) -> None:
    """A row whose allowed_cidrs cannot be read is no key (401), never a 500."""
    issued = sqlite_store.create_key("svc", allowed_cidrs=["10.0.0.0/8"])
    with sqlite3.connect(tmp_path / "k.db") as db:
        db.execute("UPDATE m2m_api_keys SET allowed_cidrs = '[\"nonsense\"]'")
    engine = Engine(Settings(key_store=sqlite_store))
    outcome = engine.check("GET", "/", None, issued.key, "10.1.1.1")
    assert (outcome.allowed, getattr(outcome, "status", None)) == (False, 401)


# -- tables made by an earlier release ----------------------------------------------------

OLD_SQLITE_SCHEMA = """
CREATE TABLE m2m_api_keys (
    key_id TEXT PRIMARY KEY, key_hash TEXT NOT NULL UNIQUE, client_id TEXT NOT NULL,
    name TEXT, scopes TEXT NOT NULL DEFAULT '', tier TEXT, created_at REAL NOT NULL,
    expires_at REAL, revoked_at REAL, remaining_uses INTEGER,
    metadata TEXT NOT NULL DEFAULT '{}', last_used_at REAL
);
PRAGMA user_version = 1;
"""


def test_an_older_sqlite_file_gets_the_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.executescript(OLD_SQLITE_SCHEMA)
        db.execute(
            "INSERT INTO m2m_api_keys (key_id, key_hash, client_id, created_at) "
            "VALUES ('old', 'h', 'svc', 0)"
        )
    store = open_key_store(sqlite_url(path))
    try:
        assert store.get_key("old").allowed_cidrs == ()
        issued = store.create_key("svc", allowed_cidrs=["10.0.0.0/8"])
        assert store.get_key(issued.key_id).allowed_cidrs == ("10.0.0.0/8",)
    finally:
        store.close()


@pytest.mark.postgres
def test_an_older_postgres_table_gets_the_columns(postgres_url: str) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        first = open_key_store(postgres_url)
        first.list_keys()  # makes the schema
        first.close()
        conn.execute("ALTER TABLE m2m_api_keys DROP COLUMN allowed_cidrs")
        conn.execute("ALTER TABLE m2m_api_keys DROP COLUMN signing_public_key")
    store = open_key_store(postgres_url)
    try:
        issued = store.create_key(
            "svc", allowed_cidrs=["2001:db8::/32"], signing_public_key=public_pem(ED25519)
        )
        record = store.get_key(issued.key_id)
        assert record.allowed_cidrs == ("2001:db8::/32",)
        assert record.signing_public_key == public_pem(ED25519)
    finally:
        store.close()
