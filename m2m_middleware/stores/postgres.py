"""Keys in PostgreSQL, for several instances that share them (psycopg 3 and its pool).

Opening the store does no I/O: the pool starts on the first call, so an
application whose database is down at start-up starts anyway and its requests
get a clean :class:`StoreUnavailable` (the engine's outage policy) until the
database is back, with no restart.

No call hangs: waiting for a pooled connection is bounded by ``timeout``,
connecting by ``connect_timeout``, every statement by ``statement_timeout``,
and a server that vanishes mid-query by TCP keepalives and ``tcp_user_timeout``
(any of them may be set in the URL instead; the URL wins).

A server restart, a failover or ``pg_terminate_backend`` leaves dead
connections in the pool. The first call that meets one has the pool test all
its idle connections, so the dead ones go at once rather than one failed
request each; reads and idempotent writes then try once more on a fresh
connection. Other writes (taking a use, say) are never repeated: whether they
were applied is unknown, and applying one twice would spend a use twice.

Revocations and rotations reach the caches of other processes within a
second without a bus: the write that revokes or rotates also sends a
``NOTIFY`` (in the same transaction, so it is delivered only if the write
commits), and every engine's store listens on a connection of its own
(``invalidation.postgres_listener``). The notice names the store by the id
kept in its ``m2m_store_meta`` table, not by its URL, so every spelling of
the address hears it.

The schema lives in the connection's current schema (the first of its
``search_path``; set it with ``?options=-csearch_path%3Dname``), is created on
first use under an advisory lock so that processes starting together do not
race, and carries a version that a newer release can migrate from.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import threading
import weakref
from collections.abc import Callable, Mapping
from contextlib import suppress
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

try:
    import psycopg
    from psycopg.abc import Buffer
    from psycopg.conninfo import conninfo_to_dict, make_conninfo
    from psycopg.rows import TupleRow
    from psycopg.types.datetime import TimestamptzLoader
    from psycopg_pool import ConnectionPool, PoolTimeout
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the PostgreSQL key store needs psycopg 3 and psycopg_pool: "
        'pip install "m2m-middleware[postgres]"'
    ) from exc

from .. import keys as keyformat
from ..errors import ConfigError, KeyStoreError, StoreUnavailable, UnreadableRow
from ..invalidation import NOTIFY_CHANNEL, PostgresListener, postgres_listener
from ..redaction import redact, secrets_of
from .base import KeyRecord, KeyStore, checked_record, each_record

if TYPE_CHECKING:
    from typing_extensions import Self

SCHEMA_VERSION = 1

#: The advisory lock that serialises schema creation between processes: two
#: concurrent ``CREATE TABLE IF NOT EXISTS`` can still both try to create the
#: table and one fail. Any constant will do; this one spells "m2m_keys".
_SCHEMA_LOCK = int.from_bytes(b"m2m_keys", "big")

_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS m2m_schema_version (
        singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
        version integer NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS m2m_api_keys (
        key_id text PRIMARY KEY,
        key_hash text NOT NULL,
        client_id text NOT NULL,
        name text,
        scopes text[] NOT NULL DEFAULT '{}',
        tier text,
        created_at timestamptz NOT NULL,
        expires_at timestamptz,
        revoked_at timestamptz,
        remaining_uses integer,
        metadata jsonb NOT NULL DEFAULT '{}',
        last_used_at timestamptz
    )
    """,
    "CREATE UNIQUE INDEX IF NOT EXISTS m2m_api_keys_key_hash ON m2m_api_keys (key_hash)",
    "CREATE INDEX IF NOT EXISTS m2m_api_keys_client_id ON m2m_api_keys (client_id)",
)

#: Added after schema version 1 was released: created when missing, with no
#: version bump, because older releases sharing the database ignore it.
_META_SCHEMA = """
    CREATE TABLE IF NOT EXISTS m2m_store_meta (
        singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
        store_id text NOT NULL
    )
"""

#: Appended to an ``UPDATE ... RETURNING key_id`` in a ``changed`` CTE: one
#: notice per changed row, sent when (and only if) the statement commits.
_NOTIFY_CHANGED = (
    " SELECT c.key_id, pg_notify(%s, json_build_object("
    "'store_id', %s::text, 'key_id', c.key_id)::text) FROM changed AS c"
)

_COLUMNS = (
    "key_id, client_id, name, scopes, tier, created_at, expires_at, revoked_at, "
    "remaining_uses, metadata, last_used_at, allowed_cidrs, signing_public_key"
)
#: Columns added after schema version 1 was released: added, under the schema
#: lock, to a table that lacks them (older releases name their columns, so they
#: ignore these). Looked up first: ``ADD COLUMN IF NOT EXISTS`` would take an
#: ACCESS EXCLUSIVE lock on the table even when there is nothing to add.
_ADDED_COLUMNS = (("allowed_cidrs", "text[]"), ("signing_public_key", "text"))

_MAX_USES = 2**31 - 1  # remaining_uses is an integer column

#: How long the pool keeps retrying a failed connection (with backoff) before
#: giving up until the next request. Short, so that a server back after a long
#: outage is used within seconds, not after a backoff grown to minutes.
_RECONNECT_WINDOW = 10.0

T = TypeVar("T")
_Conn = psycopg.Connection[TupleRow]

#: Every pool of ours is named so; psycopg_pool passes the name (or a
#: connection or task that knows its pool) in the arguments of its records.
_POOL_PREFIX = "m2m key store "


def _of_our_pool(arg: object) -> bool:
    if isinstance(arg, str):
        return arg.startswith(_POOL_PREFIX)
    if getattr(type(arg), "m2m_key_store", False):  # one of our connections, idle or not
        return True
    pool = getattr(arg, "_pool", None) or getattr(arg, "pool", None)  # a connection, a task
    if isinstance(pool, weakref.ref):
        pool = pool()
    name = getattr(pool, "name", None)
    return isinstance(name, str) and name.startswith(_POOL_PREFIX)


class _QuietPoolFilter(logging.Filter):
    """Our pools' own records are DEBUG, not WARNING.

    While the server is down, psycopg_pool logs a WARNING for every
    connection attempt (with backoff, for as long as requests keep asking)
    and for every connection it discards. The engine already logs one record
    per outage (with the cause the last attempt met) and one per recovery;
    these would bury it. Kept, at DEBUG, for whoever turns ``psycopg.pool``
    up to DEBUG; other pools' records are left as they are.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG or not isinstance(record.args, tuple):
            return True
        if not any(_of_our_pool(arg) for arg in record.args):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        # Handlers with no level of their own would still print it.
        return _pool_logger.isEnabledFor(logging.DEBUG)


_pool_logger = logging.getLogger("psycopg.pool")
_pool_logger.addFilter(_QuietPoolFilter())


class _Unreadable:
    """What :class:`_LenientTimestamptzLoader` reads for a time Python cannot hold."""


_UNREADABLE = _Unreadable()


class _LenientTimestamptzLoader(TimestamptzLoader):
    """``'infinity'`` or a year past 9999 read as a marker that the row check
    refuses, instead of a DataError that fails the whole query: a listing with
    one such row would fail, and a lookup would look like an outage."""

    def load(self, data: Buffer) -> Any:  # a datetime, or the marker
        try:
            return super().load(data)
        except psycopg.DataError:
            return _UNREADABLE


def _utc(key_id: str, column: str, value: object) -> object:
    # psycopg returns timestamptz in the session's time zone; records are UTC.
    if not isinstance(value, datetime):
        return value  # None, or a marker checked_record refuses
    try:
        return value.astimezone(timezone.utc)
    except (OverflowError, ValueError):  # within a day of year 1 or 9999
        raise UnreadableRow(key_id, f"{column} is not a time") from None


def _record(row: TupleRow) -> KeyRecord:
    """A row as a record; UnreadableRow if a column does not hold what it should."""
    key_id = row[0] if isinstance(row[0], str) else repr(row[0])
    scopes = row[3]
    if scopes is None or isinstance(scopes, str):
        raise UnreadableRow(key_id, "scopes is not a list of scopes")
    return checked_record(
        key_id=row[0],
        client_id=row[1],
        name=row[2],
        scopes=scopes,
        tier=row[4],
        created_at=_utc(key_id, "created_at", row[5]),
        expires_at=_utc(key_id, "expires_at", row[6]),
        revoked_at=_utc(key_id, "revoked_at", row[7]),
        remaining_uses=row[8],
        metadata=row[9],
        last_used_at=_utc(key_id, "last_used_at", row[10]),
        allowed_cidrs=row[11],
        signing_public_key=row[12],
    )


def _location(params: Mapping[str, Any]) -> str:
    """``postgresql://host:port/dbname[?options=...]``: where the data is, no credentials.

    Every process configured with the same URL computes the same string, so
    revocation notices (in-process and over a bus) reach all their caches.
    """
    host = str(params.get("host") or params.get("hostaddr") or os.environ.get("PGHOST", ""))
    host = host or "localhost"
    if host.startswith("/"):  # a Unix socket directory
        host = quote(host, safe="")
    elif ":" in host and "," not in host:  # IPv6
        host = f"[{host}]"
    port = params.get("port") or os.environ.get("PGPORT") or "5432"
    dbname = (
        params.get("dbname")
        or os.environ.get("PGDATABASE")
        or params.get("user")
        or os.environ.get("PGUSER", "")
    )
    location = f"postgresql://{host}:{port}/{quote(str(dbname), safe='')}"
    if params.get("options"):  # a search_path there picks other tables
        location += "?options=" + quote(str(params["options"]), safe="")
    return location


class PostgresKeyStore(KeyStore):
    """API keys in a PostgreSQL database, shared by every instance that opens it.

    ``timeout`` (seconds) bounds each step of a call: waiting for a pooled
    connection, connecting (libpq counts whole seconds, at least 2) and each
    statement. ``max_size`` caps this process's connections.
    """

    blocking = True
    needs_bus = False  # NOTIFY tells every process that listens

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 2.0,
        max_size: int = 10,
        prefix: str = keyformat.DEFAULT_PREFIX,
    ) -> None:
        super().__init__(prefix=prefix)
        if isinstance(timeout, bool) or not timeout > 0 or math.isinf(timeout):
            raise ValueError("timeout must be a positive number of seconds")
        if isinstance(max_size, bool) or max_size < 1:
            raise ValueError("max_size must be a positive integer")
        self.timeout = float(timeout)
        self.max_size = max_size
        self._secrets = secrets_of(url)
        try:
            params = conninfo_to_dict(url)
        except psycopg.Error as exc:
            # libpq quotes the offending part, which may be the password.
            detail = " ".join(str(exc).split())
            raise ConfigError(
                "key_store", self._redact(f"not a valid PostgreSQL URL: {detail}")
            ) from None
        if params.get("password"):  # as libpq decoded it: quotes and escapes undone
            self._secrets += (str(params["password"]),)
        self.location = _location(params)
        self._conninfo = make_conninfo("", **_with_timeouts(params, self.timeout))
        self._pool: ConnectionPool[_Conn] | None = None
        self._pool_lock = threading.Lock()
        self._closed = False
        self._schema_ready = False
        self._schema_lock = threading.Lock()
        self._connect_error: str | None = None
        self._listener: PostgresListener | None = None

    def __repr__(self) -> str:
        return f"PostgresKeyStore({self.location!r})"

    # -- connections -----------------------------------------------------------

    def _open_pool(self) -> ConnectionPool[_Conn]:
        pool = self._pool
        if pool is not None:
            return pool
        with self._pool_lock:
            if self._closed:
                raise StoreUnavailable(f"PostgreSQL key store {self.location} is closed")
            if self._pool is None:
                pool = ConnectionPool(
                    self._conninfo,
                    connection_class=self._connection_class(),
                    kwargs={"autocommit": True},
                    min_size=1,
                    max_size=self.max_size,
                    open=False,
                    timeout=self.timeout,
                    reconnect_timeout=_RECONNECT_WINDOW,
                    name=_POOL_PREFIX + self.location,
                )
                # Connects in the background: a database that is down now is
                # retried by the pool, not fatal to whoever opened the store.
                pool.open(wait=False)
                self._pool = pool
            return self._pool

    def _connection_class(self) -> type[_Conn]:
        """Connections that remember why connecting failed.

        The pool connects in its own threads and only logs the error; a caller
        that then times out waiting should learn the cause (refused, bad
        password, unknown host), not just that it waited.
        """
        store = self

        class RememberingConnection(psycopg.Connection[TupleRow]):
            m2m_key_store = True  # for _QuietPoolFilter: a pool forgets idle ones

            @classmethod
            def connect(cls, conninfo: str = "", **kwargs: Any) -> Self:
                try:
                    conn = super().connect(conninfo, **kwargs)
                except psycopg.Error as exc:
                    store._connect_error = " ".join(str(exc).split())  # libpq's is multi-line
                    raise
                store._connect_error = None
                conn.adapters.register_loader("timestamptz", _LenientTimestamptzLoader)
                return conn

        return RememberingConnection

    def _run(self, work: Callable[[_Conn], T], *, retry: bool = False) -> T:
        """``work(conn)`` on a pooled connection, errors made :mod:`m2m_middleware` ones.

        With ``retry`` (reads, and writes that may safely be applied twice),
        a connection found dead is followed by one more try on a fresh one.
        """
        tries_left = 2 if retry else 1
        while True:
            tries_left -= 1
            pool = self._open_pool()
            try:
                conn = pool.getconn(timeout=self.timeout)
            except PoolTimeout as exc:
                raise self._no_connection() from exc
            except psycopg.Error as exc:  # PoolClosed: close() ran meanwhile
                raise self._unavailable(exc) from exc
            broken = False
            try:
                self._ensure_schema(conn)
                return work(conn)
            except psycopg.Error as exc:
                broken = conn.closed
                if not broken or tries_left == 0:
                    raise self._translate(exc) from exc
            finally:
                pool.putconn(conn)  # a dead one is discarded and replaced by the pool
                if broken:
                    # Whatever killed this connection likely killed its idle
                    # siblings too: test them all now, so that the retry and the
                    # next callers get live ones.
                    with suppress(psycopg.Error):
                        pool.check()

    def _ensure_schema(self, conn: _Conn) -> None:
        if self._schema_ready:
            return
        with self._schema_lock:
            if self._schema_ready:
                return
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                version = None
                found = conn.execute("SELECT to_regclass('m2m_schema_version')").fetchone()
                if found is not None and found[0] is not None:
                    row = conn.execute("SELECT max(version) FROM m2m_schema_version").fetchone()
                    version = row[0] if row else None
                if version is None:
                    for statement in _SCHEMA:
                        conn.execute(statement)
                    conn.execute(
                        "INSERT INTO m2m_schema_version (version) VALUES (%s) "
                        "ON CONFLICT (singleton) DO NOTHING",
                        (SCHEMA_VERSION,),
                    )
                elif version > SCHEMA_VERSION:
                    raise StoreUnavailable(
                        f"PostgreSQL key store {self.location} has schema version {version}; "
                        f"this release reads up to {SCHEMA_VERSION}: upgrade m2m-middleware"
                    )
                self._add_missing_columns(conn)
                store_id = self._read_store_id(conn)
            # Before the first read through this store, so a notice under the
            # id can never miss a key that store put in a cache.
            if store_id is not None:
                self._learned_store_id(store_id)
            self._schema_ready = True

    @staticmethod
    def _add_missing_columns(conn: _Conn) -> None:
        present = {
            row[0]
            for row in conn.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_name = 'm2m_api_keys' AND table_schema = current_schema()"
            ).fetchall()
        }
        for name, kind in _ADDED_COLUMNS:
            if name not in present:
                conn.execute(f"ALTER TABLE m2m_api_keys ADD COLUMN IF NOT EXISTS {name} {kind}")

    @staticmethod
    def _read_store_id(conn: _Conn) -> str | None:
        """The database's store id, made once (the caller holds the advisory lock).

        None when the table is missing and this role may not create it (a
        database made by an older release, used by a role without CREATE):
        the store then goes by its location, as before.
        """
        row = None
        found = conn.execute("SELECT to_regclass('m2m_store_meta')").fetchone()
        try:
            with conn.transaction():  # a savepoint: a refusal leaves the rest intact
                if found is None or found[0] is None:
                    conn.execute(_META_SCHEMA)
                row = conn.execute("SELECT store_id FROM m2m_store_meta").fetchone()
                if row is None:
                    row = conn.execute(
                        "INSERT INTO m2m_store_meta (store_id) VALUES (%s) "
                        "ON CONFLICT (singleton) DO NOTHING RETURNING store_id",
                        (secrets.token_hex(16),),
                    ).fetchone()
        except psycopg.errors.InsufficientPrivilege:
            return None
        return str(row[0]) if row is not None else None

    # -- hearing other processes ---------------------------------------------------

    def watch_changes(self) -> None:
        if self._listener is None and not self._closed:
            self._listener = postgres_listener(self.location, self._conninfo, self._redact)

    def close(self) -> None:
        if self._closed:
            return
        try:
            super().close()
        finally:
            with self._pool_lock:
                self._closed = True
                pool, self._pool = self._pool, None
                listener, self._listener = self._listener, None
            if listener is not None:
                listener.release()
            if pool is not None:
                pool.close()

    # -- errors ------------------------------------------------------------------

    def _redact(self, text: str) -> str:
        return redact(text, self._secrets)

    def _no_connection(self) -> StoreUnavailable:
        message = f"PostgreSQL key store {self.location}: no connection within {self.timeout:g} s"
        cause = self._connect_error
        if cause:
            message += f" (last attempt: {cause})"
        return StoreUnavailable(self._redact(message))

    def _describe(self, exc: BaseException) -> str:
        detail = " ".join(str(exc).split()) or type(exc).__name__  # libpq's are multi-line
        return self._redact(f"PostgreSQL key store {self.location}: {detail}")

    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        return StoreUnavailable(self._describe(exc))

    def _translate(self, exc: psycopg.Error) -> KeyStoreError:
        # Bad data (a duplicate id, a value the column cannot hold) is the
        # caller's problem, not an outage: the engine must not treat it as one.
        if isinstance(exc, (psycopg.IntegrityError, psycopg.DataError)):
            return KeyStoreError(self._describe(exc))
        return self._unavailable(exc)

    # -- storage primitives -----------------------------------------------------

    def _insert(self, record: KeyRecord, key_hash: str) -> None:
        if record.remaining_uses is not None and record.remaining_uses > _MAX_USES:
            raise ValueError(f"max_uses must be at most {_MAX_USES}")
        # jsonb refuses NaN and infinities: say so before the database does.
        metadata = json.dumps(dict(record.metadata), allow_nan=False, sort_keys=True)
        params = (
            record.key_id,
            key_hash,
            record.client_id,
            record.name,
            sorted(record.scopes),
            record.tier,
            record.created_at,
            record.expires_at,
            record.remaining_uses,
            metadata,
            list(record.allowed_cidrs) or None,
            record.signing_public_key,
        )
        # Not retried: after a lost connection the row may be in, and a second
        # INSERT would fail on the key id as if the caller had erred.
        self._run(
            lambda conn: conn.execute(
                "INSERT INTO m2m_api_keys (key_id, key_hash, client_id, name, scopes, tier, "
                "created_at, expires_at, remaining_uses, metadata, allowed_cidrs, "
                "signing_public_key) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s, %s)",
                params,
            )
        )

    def _fetch(self, key_id: str) -> KeyRecord | None:
        row = self._run(
            lambda conn: conn.execute(
                f"SELECT {_COLUMNS} FROM m2m_api_keys WHERE key_id = %s", (key_id,)
            ).fetchone(),
            retry=True,
        )
        return _record(row) if row else None

    def _fetch_by_hash(self, key_hash: str) -> tuple[KeyRecord, str] | None:
        listener = self._listener
        if listener is not None and not listener.settled.is_set():
            listener.wait_settled(self.timeout)  # what this reads is then cached safely
        row = self._run(
            lambda conn: conn.execute(
                f"SELECT {_COLUMNS}, key_hash FROM m2m_api_keys WHERE key_hash = %s",
                (key_hash,),
            ).fetchone(),
            retry=True,
        )
        return (_record(row), row[-1]) if row else None

    def _fetch_all(self, client_id: str | None) -> list[KeyRecord | UnreadableRow]:
        query = f"SELECT {_COLUMNS} FROM m2m_api_keys"
        params: tuple[str, ...] = ()
        if client_id is not None:
            query += " WHERE client_id = %s"
            params = (client_id,)
        rows = self._run(lambda conn: conn.execute(query, params).fetchall(), retry=True)
        return each_record(rows, _record)

    def _set_revoked(self, key_id: str, when: datetime) -> bool:
        # LEAST ignores NULL: the earliest revocation stands, so a retry is
        # harmless (a second notice too).
        count = self._run(
            lambda conn: (
                conn.execute(
                    "WITH changed AS (UPDATE m2m_api_keys SET revoked_at = LEAST(revoked_at, %s) "
                    "WHERE key_id = %s RETURNING key_id)" + _NOTIFY_CHANGED,
                    (when, key_id, NOTIFY_CHANNEL, self.identity),
                ).rowcount
            ),
            retry=True,
        )
        return count == 1

    def _set_expiry(self, key_id: str, when: datetime) -> bool:
        count = self._run(
            lambda conn: (
                conn.execute(
                    "WITH changed AS (UPDATE m2m_api_keys SET expires_at = %s "
                    "WHERE key_id = %s RETURNING key_id)" + _NOTIFY_CHANGED,
                    (when, key_id, NOTIFY_CHANNEL, self.identity),
                ).rowcount
            ),
            retry=True,
        )
        return count == 1

    def _take_use(self, key_id: str) -> int | None:
        # One conditional UPDATE: the row lock makes racing callers, in any
        # process, queue and re-check remaining_uses > 0, so none overspends.
        row = self._run(
            lambda conn: conn.execute(
                "UPDATE m2m_api_keys SET remaining_uses = remaining_uses - 1 "
                "WHERE key_id = %s AND remaining_uses > 0 RETURNING remaining_uses",
                (key_id,),
            ).fetchone()
        )
        return int(row[0]) if row else None

    def _return_use(self, key_id: str) -> None:
        self._run(
            lambda conn: conn.execute(
                "UPDATE m2m_api_keys SET remaining_uses = remaining_uses + 1 "
                "WHERE key_id = %s AND remaining_uses IS NOT NULL",
                (key_id,),
            )
        )

    def _drain_uses(self, key_id: str) -> int | None:
        # The CTE locks the row and reads the uses left; the UPDATE zeroes them
        # in the same statement, so no use can be taken in between.
        row = self._run(
            lambda conn: conn.execute(
                "WITH old AS (SELECT key_id, remaining_uses FROM m2m_api_keys "
                "WHERE key_id = %s FOR UPDATE) "
                "UPDATE m2m_api_keys AS k SET remaining_uses = 0 FROM old "
                "WHERE k.key_id = old.key_id AND old.remaining_uses IS NOT NULL "
                "RETURNING old.remaining_uses",
                (key_id,),
            ).fetchone()
        )
        return int(row[0]) if row else None

    def _write_last_used(self, touches: Mapping[str, datetime]) -> None:
        key_ids = list(touches)
        times = [touches[key_id] for key_id in key_ids]
        # One statement for the batch; GREATEST keeps the latest use (and
        # ignores NULL), so an older write landing late never wins, and a
        # retry is harmless.
        self._run(
            lambda conn: conn.execute(
                "UPDATE m2m_api_keys AS k SET last_used_at = GREATEST(k.last_used_at, t.used) "
                "FROM unnest(%s::text[], %s::timestamptz[]) AS t(key_id, used) "
                "WHERE k.key_id = t.key_id",
                (key_ids, times),
            ),
            retry=True,
        )


def _with_timeouts(params: Mapping[str, Any], timeout: float) -> dict[str, Any]:
    """The URL's parameters plus the bounds that keep every call short.

    Each is a default: a value given in the URL wins.
    """
    whole = max(1, math.ceil(timeout))
    merged = dict(params)
    merged.setdefault("application_name", "m2m-middleware")
    merged.setdefault("connect_timeout", str(max(2, whole)))
    # A server that vanishes mid-query (power loss, partition) sends no error:
    # keepalives and tcp_user_timeout notice within about 2 * timeout.
    merged.setdefault("keepalives", "1")
    merged.setdefault("keepalives_idle", str(whole))
    merged.setdefault("keepalives_interval", "1")
    merged.setdefault("keepalives_count", str(whole))
    merged.setdefault("tcp_user_timeout", str(2 * whole * 1000))
    # First, so that a statement_timeout in the URL's own options overrides it.
    ours = f"-c statement_timeout={math.ceil(timeout * 1000)}"
    merged["options"] = f"{ours} {merged['options']}" if merged.get("options") else ours
    return merged
