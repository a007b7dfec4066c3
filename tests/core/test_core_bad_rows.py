"""A row the store cannot read is no key (401), logged once; never a 500.

Rows edited by hand, restored from a bad backup or written by other software
can hold a text where a time belongs, a NULL where a value must be, metadata
that is not a JSON object or scopes that are no scopes. Each store kind gets
the corruptions its column types allow.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import psycopg
import pytest
from core_support import make_engine, sqlite_url

from m2m_middleware import Allowed, Denied, KeyStore, KeyStoreError, open_key_store
from m2m_middleware.errors import UnreadableRow
from m2m_middleware.keys import hash_key

Check = Any

#: kind -> case -> the statements that spoil the row ``%(key_id)s`` names.
SQLITE_CASES = {
    "metadata-not-json": ["UPDATE m2m_api_keys SET metadata = '{bad' WHERE key_id = ?"],
    "metadata-a-list": ["UPDATE m2m_api_keys SET metadata = '[1, 2]' WHERE key_id = ?"],
    "metadata-too-deep": [
        f"UPDATE m2m_api_keys SET metadata = '{'[' * 50_000}{']' * 50_000}' WHERE key_id = ?"
    ],
    "created_at-a-text": ["UPDATE m2m_api_keys SET created_at = 'yesterday' WHERE key_id = ?"],
    "expires_at-a-text": ["UPDATE m2m_api_keys SET expires_at = 'next week' WHERE key_id = ?"],
    "revoked_at-a-text": ["UPDATE m2m_api_keys SET revoked_at = 'x' WHERE key_id = ?"],
    "expires_at-past-9999": ["UPDATE m2m_api_keys SET expires_at = 1e300 WHERE key_id = ?"],
    "remaining_uses-a-text": ["UPDATE m2m_api_keys SET remaining_uses = 'many' WHERE key_id = ?"],
    "scopes-a-control-char": [
        "UPDATE m2m_api_keys SET scopes = 'orders:read ' || char(7) WHERE key_id = ?"
    ],
    "scopes-a-blob": ["UPDATE m2m_api_keys SET scopes = x'00ff' WHERE key_id = ?"],
    "name-a-blob": ["UPDATE m2m_api_keys SET name = x'00ff' WHERE key_id = ?"],
    "client_id-a-blob": ["UPDATE m2m_api_keys SET client_id = x'ff' WHERE key_id = ?"],
}
POSTGRES_CASES = {
    "metadata-a-list": ["UPDATE m2m_api_keys SET metadata = '[1]' WHERE key_id = %s"],
    "metadata-a-string": ["UPDATE m2m_api_keys SET metadata = '\"x\"' WHERE key_id = %s"],
    "created_at-infinity": ["UPDATE m2m_api_keys SET created_at = 'infinity' WHERE key_id = %s"],
    "revoked_at-minus-infinity": [
        "UPDATE m2m_api_keys SET revoked_at = '-infinity' WHERE key_id = %s"
    ],
    "expires_at-past-9999": [
        "UPDATE m2m_api_keys SET expires_at = '10000-01-01' WHERE key_id = %s"
    ],
    "scopes-a-null-element": [
        "UPDATE m2m_api_keys SET scopes = ARRAY[NULL]::text[] WHERE key_id = %s"
    ],
    "scopes-with-a-space": ["UPDATE m2m_api_keys SET scopes = ARRAY['a b'] WHERE key_id = %s"],
    "scopes-null": [
        "ALTER TABLE m2m_api_keys ALTER COLUMN scopes DROP NOT NULL",
        "UPDATE m2m_api_keys SET scopes = NULL WHERE key_id = %s",
    ],
    "client_id-null": [
        "ALTER TABLE m2m_api_keys ALTER COLUMN client_id DROP NOT NULL",
        "UPDATE m2m_api_keys SET client_id = NULL WHERE key_id = %s",
    ],
}
DJANGO_TABLE = "m2m_middleware_apikey"
DJANGO_CASES = {
    "created_at-a-text": [f"UPDATE {DJANGO_TABLE} SET created_at = 'yesterday' WHERE key_id = %s"],
    "created_at-no-such-date": [
        f"UPDATE {DJANGO_TABLE} SET created_at = '2024-13-45 10:00:00' WHERE key_id = %s"
    ],
    # Django reads a number here as None: without the NULL flag, "never revoked".
    "revoked_at-a-number": [f"UPDATE {DJANGO_TABLE} SET revoked_at = 12345 WHERE key_id = %s"],
    "expires_at-a-text": [f"UPDATE {DJANGO_TABLE} SET expires_at = 'soon' WHERE key_id = %s"],
    "metadata-not-json": [  # as a table made before Django's JSON CHECK would hold
        "PRAGMA ignore_check_constraints = 1",
        f"UPDATE {DJANGO_TABLE} SET metadata = '{{bad' WHERE key_id = %s",
        "PRAGMA ignore_check_constraints = 0",
    ],
    "metadata-a-list": [f"UPDATE {DJANGO_TABLE} SET metadata = '[1]' WHERE key_id = %s"],
    "remaining_uses-a-text": [
        f"UPDATE {DJANGO_TABLE} SET remaining_uses = 'abc' WHERE key_id = %s"
    ],
    "scopes-a-nul": [f"UPDATE {DJANGO_TABLE} SET scopes = 'a' || char(0) || 'b' WHERE key_id = %s"],
}
DJANGO_POSTGRES_CASES = {
    "created_at-infinity": [f"UPDATE {DJANGO_TABLE} SET created_at = 'infinity' WHERE key_id = %s"],
    "revoked_at-minus-infinity": [
        f"UPDATE {DJANGO_TABLE} SET revoked_at = '-infinity' WHERE key_id = %s"
    ],
    "metadata-a-list": [f"UPDATE {DJANGO_TABLE} SET metadata = '[1]' WHERE key_id = %s"],
}

CASES = [
    *[pytest.param("sqlite", c, id=f"sqlite-{c}") for c in SQLITE_CASES],
    *[
        pytest.param("postgres", c, id=f"postgres-{c}", marks=pytest.mark.postgres)
        for c in POSTGRES_CASES
    ],
    *[pytest.param("django", c, id=f"django-{c}") for c in DJANGO_CASES],
    *[
        pytest.param("django-postgres", c, id=f"django-postgres-{c}", marks=pytest.mark.postgres)
        for c in DJANGO_POSTGRES_CASES
    ],
]

Spoil = Callable[[str, list[str]], None]


@pytest.fixture
def kind_and_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[KeyStore, Spoil]]:
    kind: str = request.param
    if kind == "sqlite":
        path = tmp_path / "k.db"
        store = open_key_store(sqlite_url(path))

        def spoil(key_id: str, statements: list[str]) -> None:
            with closing(sqlite3.connect(path)) as raw, raw:
                for statement in statements:
                    raw.execute(statement, (key_id,))

    elif kind == "postgres":
        url = request.getfixturevalue("postgres_url")
        store = open_key_store(url)

        def spoil(key_id: str, statements: list[str]) -> None:
            with psycopg.connect(url, autocommit=True) as raw:
                for statement in statements:
                    raw.execute(statement, (key_id,) if "%s" in statement else ())

    else:
        fixture = "django_postgres_key_store" if kind == "django-postgres" else "django_key_store"
        store = request.getfixturevalue(fixture)
        from django.db import connections

        def spoil(key_id: str, statements: list[str]) -> None:
            with connections[store.using].cursor() as cursor:  # type: ignore[attr-defined]
                for statement in statements:
                    cursor.execute(statement, (key_id,) if "%s" in statement else None)

    yield store, spoil
    store.close()


def cases_of(kind: str) -> dict[str, list[str]]:
    return {
        "sqlite": SQLITE_CASES,
        "postgres": POSTGRES_CASES,
        "django": DJANGO_CASES,
        "django-postgres": DJANGO_POSTGRES_CASES,
    }[kind]


def row_records(caplog: pytest.LogCaptureFixture, key_id: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if key_id in r.getMessage()]


@pytest.mark.parametrize(("kind_and_store", "case"), CASES, indirect=["kind_and_store"])
def test_an_unreadable_row_is_no_key_logged_once_and_skipped_in_listings(
    kind_and_store: tuple[KeyStore, Spoil],
    case: str,
    request: pytest.FixtureRequest,
    check: Check,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store, spoil = kind_and_store
    caplog.set_level(logging.DEBUG)
    good = store.create_key("client-good", scopes=["orders:read"])
    bad = store.create_key("client-bad", scopes=["orders:read"], metadata={"team": "x"})
    kind = request.node.callspec.params["kind_and_store"]
    spoil(bad.key_id, cases_of(kind)[case])
    engine = make_engine(store, key_cache_ttl=0)  # every request asks the store

    for _ in range(3):
        outcome = check(engine, "GET", "/x", None, bad.key)
        assert isinstance(outcome, Denied), outcome
        assert (outcome.status, outcome.error) == (401, "invalid_token")
    assert isinstance(check(engine, "GET", "/x", None, good.key), Allowed)

    listed = store.list_keys()
    assert [r.key_id for r in listed] == [good.key_id]  # the others are still listed
    with pytest.raises(UnreadableRow, match=bad.key_id) as caught:
        store.get_key(bad.key_id)
    assert isinstance(caught.value, KeyStoreError)

    logged = row_records(caplog, bad.key_id)
    assert len(logged) == 1, [r.getMessage() for r in logged]  # once, not per request
    assert logged[0].levelno == logging.WARNING
    secrets = (bad.key, hash_key(bad.key), bad.key[4:-6])
    for record in caplog.records:
        text = record.getMessage() + repr(record.args)
        assert not any(secret in text for secret in secrets)
    engine.close()


@pytest.mark.parametrize("kind_and_store", ["sqlite"], indirect=True)
def test_the_unreadable_rows_logged_are_bounded(
    kind_and_store: tuple[KeyStore, Spoil],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store, spoil = kind_and_store
    monkeypatch.setattr("m2m_middleware.stores.base._REPORTED_ROWS", 4)
    issued = [store.create_key(f"client-{i}") for i in range(10)]
    for item in issued:
        spoil(item.key_id, SQLITE_CASES["metadata-not-json"])
    caplog.set_level(logging.WARNING)
    for _ in range(3):
        assert store.list_keys() == []
    assert len(store._reported_rows) <= 4
    assert all(row_records(caplog, item.key_id) for item in issued)  # each one seen
