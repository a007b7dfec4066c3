"""Where signing keys are kept: a table in the key store's own database.

DESIGN.md: state shared between instances goes where the keys already are, so
every instance that opens the key store signs with the same keys and no new
server kind is needed. One small table per backend, reached through the
store's own connection handling (its locks, pool, timeouts and error
translation), created on first use so that a store never used by an issuer
never gets it.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import ConfigError, KeyStoreError
from ..stores.base import KeyStore
from ..stores.memory import MemoryKeyStore
from ..stores.sqlite import SQLiteKeyStore

if TYPE_CHECKING:
    from ..stores.postgres import PostgresKeyStore

TABLE = "m2m_signing_keys"
#: The PostgreSQL advisory lock its table is created under (the API keys' is another).
_SCHEMA_LOCK = 0x6D326D5349474E  # "m2mSIGN"


@dataclass(frozen=True, slots=True)
class StoredSigningKey:
    """One row: a signing key's public half in the clear, its private half sealed."""

    kid: str
    algorithm: str
    public_jwk: dict[str, Any]
    sealed_private_key: str = field(repr=False)  # encrypted, still nothing for a log
    created_at: datetime
    publish_from: datetime
    signs_from: datetime
    retire_after: datetime | None = None


class SigningKeyTable(Protocol):
    def insert(self, row: StoredSigningKey) -> None: ...

    def rows(self) -> list[StoredSigningKey]: ...

    def retire_before(self, signs_from: datetime, retire_after: datetime) -> None:
        """Set ``retire_after`` on every key not yet given one that signs before ``signs_from``."""


def _utc(value: float) -> datetime:
    return datetime.fromtimestamp(value, timezone.utc)


def _row(values: tuple[Any, ...], *, times: Callable[[Any], datetime]) -> StoredSigningKey:
    """One row, checked: a row damaged or written by hand is a KeyStoreError naming
    the key, never a TypeError from deep in a JWKS answer."""
    kid, algorithm, public_jwk, sealed, created, publish, signs, retire = values
    try:
        jwk = json.loads(public_jwk) if isinstance(public_jwk, str) else public_jwk
        if not isinstance(jwk, dict) or not isinstance(kid, str) or not isinstance(sealed, str):
            raise ValueError("not a signing key")
        return StoredSigningKey(
            kid=kid,
            algorithm=str(algorithm),
            public_jwk=jwk,
            sealed_private_key=sealed,
            created_at=times(created),
            publish_from=times(publish),
            signs_from=times(signs),
            retire_after=None if retire is None else times(retire),
        )
    except (ValueError, TypeError, OverflowError, OSError, RecursionError):
        raise KeyStoreError(f"signing key {kid!r}: unreadable row in {TABLE}") from None


_COLUMNS = (
    "kid, algorithm, public_jwk, private_key, created_at, publish_from, signs_from, retire_after"
)


class MemoryTable:
    """For ``memory://``: the rows live beside the store object, shared by whoever holds it."""

    def __init__(self) -> None:
        self._rows: dict[str, StoredSigningKey] = {}
        self._lock = threading.Lock()

    def insert(self, row: StoredSigningKey) -> None:
        with self._lock:
            if row.kid in self._rows:
                raise KeyStoreError(f"signing key {row.kid!r} exists")
            self._rows[row.kid] = row

    def rows(self) -> list[StoredSigningKey]:
        with self._lock:
            return list(self._rows.values())

    def retire_before(self, signs_from: datetime, retire_after: datetime) -> None:
        with self._lock:
            for kid, row in self._rows.items():
                if row.retire_after is None and row.signs_from < signs_from:
                    self._rows[kid] = replace(row, retire_after=retire_after)


_MEMORY_TABLES: weakref.WeakKeyDictionary[KeyStore, MemoryTable] = weakref.WeakKeyDictionary()
_MEMORY_LOCK = threading.Lock()


class SQLiteTable:
    """Times as Unix seconds (REAL), as the API-key table keeps them."""

    _SCHEMA = (
        f"CREATE TABLE IF NOT EXISTS {TABLE} (kid TEXT PRIMARY KEY, algorithm TEXT NOT NULL, "
        "public_jwk TEXT NOT NULL, private_key TEXT NOT NULL, created_at REAL NOT NULL, "
        "publish_from REAL NOT NULL, signs_from REAL NOT NULL, retire_after REAL)"
    )

    def __init__(self, store: SQLiteKeyStore) -> None:
        self._store = store
        self._ready = False

    def _prepare(self) -> None:
        if not self._ready:
            with self._store._db() as db:
                db.execute(self._SCHEMA)
            self._ready = True

    def insert(self, row: StoredSigningKey) -> None:
        self._prepare()
        with self._store._write() as db:
            db.execute(
                f"INSERT INTO {TABLE} ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    row.kid,
                    row.algorithm,
                    json.dumps(row.public_jwk, sort_keys=True),
                    row.sealed_private_key,
                    row.created_at.timestamp(),
                    row.publish_from.timestamp(),
                    row.signs_from.timestamp(),
                    None if row.retire_after is None else row.retire_after.timestamp(),
                ),
            )

    def rows(self) -> list[StoredSigningKey]:
        self._prepare()
        with self._store._db() as db:
            found = db.execute(f"SELECT {_COLUMNS} FROM {TABLE}").fetchall()
        return [_row(values, times=_utc) for values in found]

    def retire_before(self, signs_from: datetime, retire_after: datetime) -> None:
        self._prepare()
        with self._store._write() as db:
            db.execute(
                f"UPDATE {TABLE} SET retire_after = ? "
                "WHERE retire_after IS NULL AND signs_from < ?",
                (retire_after.timestamp(), signs_from.timestamp()),
            )


class PostgresTable:
    _SCHEMA = (
        f"CREATE TABLE IF NOT EXISTS {TABLE} (kid text PRIMARY KEY, algorithm text NOT NULL, "
        "public_jwk jsonb NOT NULL, private_key text NOT NULL, "
        "created_at timestamptz NOT NULL, publish_from timestamptz NOT NULL, "
        "signs_from timestamptz NOT NULL, retire_after timestamptz)"
    )

    def __init__(self, store: PostgresKeyStore) -> None:
        self._store = store
        self._ready = False

    def _prepare(self) -> None:
        if not self._ready:

            def create(conn: Any) -> None:
                # Two processes creating the table at once can collide in
                # PostgreSQL's catalog even with IF NOT EXISTS: one at a time.
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                    conn.execute(self._SCHEMA)

            self._store._run(create, retry=True)
            self._ready = True

    def insert(self, row: StoredSigningKey) -> None:
        self._prepare()
        params = (
            row.kid,
            row.algorithm,
            json.dumps(row.public_jwk, sort_keys=True),
            row.sealed_private_key,
            row.created_at,
            row.publish_from,
            row.signs_from,
            row.retire_after,
        )
        self._store._run(
            lambda conn: conn.execute(
                f"INSERT INTO {TABLE} ({_COLUMNS}) VALUES (%s, %s, %s::jsonb, %s, %s, %s, %s, %s)",
                params,
            )
        )

    def rows(self) -> list[StoredSigningKey]:
        self._prepare()
        found = self._store._run(
            lambda conn: conn.execute(f"SELECT {_COLUMNS} FROM {TABLE}").fetchall(), retry=True
        )
        return [_row(tuple(values), times=_aware) for values in found]

    def retire_before(self, signs_from: datetime, retire_after: datetime) -> None:
        self._prepare()
        self._store._run(
            lambda conn: conn.execute(
                f"UPDATE {TABLE} SET retire_after = %s "
                "WHERE retire_after IS NULL AND signs_from < %s",
                (retire_after, signs_from),
            ),
            retry=True,  # the same update twice leaves the same rows
        )


def _aware(value: Any) -> datetime:
    if not isinstance(value, datetime):
        raise KeyStoreError(f"unreadable time in {TABLE}")
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


def table_for(store: KeyStore) -> SigningKeyTable:
    """The signing-key table of ``store``'s database."""
    if isinstance(store, SQLiteKeyStore):
        return SQLiteTable(store)
    if isinstance(store, MemoryKeyStore):
        with _MEMORY_LOCK:
            table = _MEMORY_TABLES.get(store)
            if table is None:
                table = _MEMORY_TABLES[store] = MemoryTable()
            return table
    module = type(store).__module__
    if module.endswith(".stores.postgres"):
        from ..stores.postgres import PostgresKeyStore

        if isinstance(store, PostgresKeyStore):
            return PostgresTable(store)
    if module.endswith(".django.store"):
        from ..django.store import DjangoKeyStore
        from .django_table import DjangoTable

        if isinstance(store, DjangoKeyStore):
            return DjangoTable(store)
    raise ConfigError(
        "key_store",
        f"{type(store).__name__} keeps no signing keys: the token issuer needs a memory://, "
        "sqlite://, postgresql:// or django:// key store",
    )


__all__ = ["SigningKeyTable", "StoredSigningKey", "table_for"]
