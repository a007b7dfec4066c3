"""The embedded default: one SQLite file, safe across threads and processes.

WAL lets readers run beside the one writer, and a busy timeout makes a
writer wait for the lock instead of failing, so several worker processes can
share one file. Each thread gets its own connection (sqlite3 connections are
not meant to be shared between threads); the store remembers every connection
it opens so that ``close()`` can release them all, whichever thread opened them.

Revocations made by other processes are noticed without a bus: every revoke
or rotate also appends a row to a change log (``m2m_key_events``) in the
same transaction, and :meth:`SQLiteKeyStore.poll_changes` (called by the
engine at most every ``change_poll_interval`` seconds) reads the new rows,
but only when ``PRAGMA data_version`` says another connection has committed
since the last look: the common case costs one pragma. Only the keys named
in the log are dropped from the caches (other writes, ``take_use`` and
``last_used_at`` in other processes, move ``data_version`` too).
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from typing import Any

from ..errors import KeyStoreError, StoreUnavailable, UnreadableRow
from .base import (
    KeyRecord,
    KeyStore,
    checked_record,
    each_record,
    encode_cidrs,
    encode_metadata,
    notify_local,
    read_metadata,
)

SCHEMA_VERSION = 1

#: Seconds a change-log row is kept. Longer than the longest ``key_cache_ttl``
#: (a day): a cache entry older than its TTL is read again anyway, so a poller
#: away longer than this misses nothing it still holds.
CHANGE_LOG_RETENTION = 2 * 86400.0
#: The longest the poll may wait for a lock (it runs on the request path, also
#: on an event loop). WAL readers never wait for a writer; this bounds the rare
#: cases that do (a file system without WAL support, a crash recovery). A poll
#: that meets a lock is simply tried again at the next interval.
_POLL_BUSY_TIMEOUT = 0.01
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY = 5, 6, 8

_SCHEMA = """
CREATE TABLE IF NOT EXISTS m2m_api_keys (
    key_id TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL UNIQUE,
    client_id TEXT NOT NULL,
    name TEXT,
    scopes TEXT NOT NULL DEFAULT '',
    tier TEXT,
    created_at REAL NOT NULL,
    expires_at REAL,
    revoked_at REAL,
    remaining_uses INTEGER,
    metadata TEXT NOT NULL DEFAULT '{}',
    last_used_at REAL
);
CREATE INDEX IF NOT EXISTS m2m_api_keys_client ON m2m_api_keys (client_id);
"""

# Tables added after schema version 1 was released: created when missing,
# without a version bump, because an older release reading the file is not
# disturbed by them. AUTOINCREMENT: a sequence number is never used twice,
# even after pruning emptied the log, so a poller's "after seq N" stays true.
_CHANGE_LOG_SCHEMA = """
CREATE TABLE IF NOT EXISTS m2m_store_meta (
    singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
    store_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS m2m_key_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key_id TEXT NOT NULL,
    at REAL NOT NULL
);
"""

_COLUMNS = (
    "key_id, client_id, name, scopes, tier, created_at, expires_at, revoked_at, "
    "remaining_uses, metadata, last_used_at, allowed_cidrs, signing_public_key"
)
#: Columns added after schema version 1 was released, with their types: added to
#: a file that lacks them when it is opened (an older release ignores them).
_ADDED_COLUMNS = (("allowed_cidrs", "TEXT"), ("signing_public_key", "TEXT"))


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    present = {row[1] for row in conn.execute("PRAGMA table_info(m2m_api_keys)")}
    for name, kind in _ADDED_COLUMNS:
        if name not in present:
            conn.execute(f"ALTER TABLE m2m_api_keys ADD COLUMN {name} {kind}")


def _ts(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def _time(key_id: str, column: str, value: object) -> datetime | None:
    """An epoch-seconds column as a datetime; UnreadableRow for a text, NaN or a year past 9999.

    SQLite keeps whatever was written: a REAL column may hold any text.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UnreadableRow(key_id, f"{column} is not a time")
    try:
        return datetime.fromtimestamp(value, timezone.utc)
    except (ValueError, OverflowError, OSError):
        raise UnreadableRow(key_id, f"{column} is not a time") from None


def _record(row: tuple[Any, ...]) -> KeyRecord:
    """A row as a record; UnreadableRow if a column does not hold what it should."""
    key_id = row[0] if isinstance(row[0], str) else repr(row[0])
    scopes = row[3]
    if not isinstance(scopes, str):
        raise UnreadableRow(key_id, "scopes is not text")
    return checked_record(
        key_id=row[0],
        client_id=row[1],
        name=row[2],
        scopes=scopes.split(),
        tier=row[4],
        created_at=_time(key_id, "created_at", row[5]),
        expires_at=_time(key_id, "expires_at", row[6]),
        revoked_at=_time(key_id, "revoked_at", row[7]),
        remaining_uses=row[8],
        metadata=read_metadata(key_id, row[9]),
        last_used_at=_time(key_id, "last_used_at", row[10]),
        allowed_cidrs=row[11],
        signing_public_key=row[12],
    )


def _create_private(path: str) -> None:
    """Create the key file readable and writable by its owner only, unless it exists.

    sqlite3 would create it under the process umask, often 0644: every local
    user could read the client list and the key hashes. SQLite gives the
    ``-wal`` and ``-shm`` files it makes later the mode of the database file,
    so they are 0600 too. An existing file's mode is the operator's choice
    and is left alone.
    """
    if path in ("", ":memory:"):
        return
    try:
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600
        )
    except FileExistsError:
        return
    try:
        if hasattr(os, "fchmod"):  # not on Windows before 3.13, whose ACLs differ anyway
            os.fchmod(fd, 0o600)  # a umask such as 0o277 would leave it unwritable
    finally:
        os.close(fd)


class _Connection:
    """One thread's connection, with the lock that ``close()`` takes to close it.

    The owning thread holds ``lock`` while it uses ``conn``, so a ``close()``
    from another thread waits for the statement in flight instead of closing
    the connection under it; ``closed`` tells the owner to open a new one.
    """

    __slots__ = ("closed", "conn", "lock")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.lock = threading.RLock()
        self.closed = False


class ChangeLogWatch:
    """Reads new rows of a change log (``seq``, ``key_id``) through a connection of its own.

    ``PRAGMA data_version`` is per connection and moves whenever another
    connection (in this process too) committed, so the common case, nothing
    new, is that one pragma. Used by :class:`SQLiteKeyStore` and by the
    Django store on SQLite. ``after``: the last row already accounted for;
    None for the newest row now.
    """

    def __init__(self, path: str, table: str, after: int | None = None) -> None:
        self.conn = sqlite3.connect(
            path, timeout=_POLL_BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
        )
        # A watch dropped with its store (a Django store replaced when its
        # settings change, say) still closes its connection, rather than
        # leaving it to warn in __del__ (a ResourceWarning from Python 3.13 on).
        weakref.finalize(self, self.conn.close)
        self.pid = os.getpid()
        self._select = f"SELECT seq, key_id FROM {table} WHERE seq > ? ORDER BY seq"
        self.version = -1  # none seen: the first look reads
        if after is None:
            # The version first: a commit between the two reads is then both in
            # the starting point and, once more, in the next look (harmless).
            (self.version,) = self.conn.execute("PRAGMA data_version").fetchone()
            (after,) = self.conn.execute(f"SELECT coalesce(max(seq), 0) FROM {table}").fetchone()
        self.seq: int = after

    def new_key_ids(self) -> list[str]:
        """The keys changed since the last look, in order, each once; [] when busy."""
        try:
            (version,) = self.conn.execute("PRAGMA data_version").fetchone()
            if version == self.version:
                return []
            rows = self.conn.execute(self._select, (self.seq,)).fetchall()
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorcode", 0) & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED):
                return []  # nothing read: the next look reads it
            raise
        self.version = version
        if rows:
            self.seq = rows[-1][0]
        return list(dict.fromkeys(row[1] for row in rows))


def _read_store_id(conn: sqlite3.Connection) -> str | None:
    """The file's store id, made on first use; None for a read-only file of an older release."""
    try:
        conn.executescript(_CHANGE_LOG_SCHEMA)
        row = conn.execute("SELECT store_id FROM m2m_store_meta").fetchone()
        if row is None:
            conn.execute(
                "INSERT OR IGNORE INTO m2m_store_meta (singleton, store_id) VALUES (1, ?)",
                (secrets.token_hex(16),),
            )
            row = conn.execute("SELECT store_id FROM m2m_store_meta").fetchone()
    except sqlite3.OperationalError as exc:
        if getattr(exc, "sqlite_errorcode", 0) & 0xFF == _SQLITE_READONLY:
            return None  # keys still work; other processes' revocations wait for the TTL
        raise
    return str(row[0])


def _close_all(conns: list[_Connection]) -> None:
    for held in conns:
        with held.lock:  # wait for a statement in flight in the owning thread
            held.closed = True
            with suppress(sqlite3.Error):  # close the rest regardless
                held.conn.close()


def _enter_wal(conn: sqlite3.Connection, timeout: float) -> None:
    """Put the file in WAL mode, waiting up to ``timeout`` for other connections.

    Switching the journal mode takes an exclusive lock without calling SQLite's
    busy handler, so ``busy_timeout`` does not cover it: when several threads
    open a new file at once, about one open in ten failed at once with
    "database is locked" (six threads, 300 fresh files). Retrying with a short
    back-off until ``timeout`` passes made all 300 open.
    """
    deadline = time.monotonic() + timeout
    pause = 0.001
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            locked = "locked" in str(exc) or "busy" in str(exc)
            if not locked or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


class SQLiteKeyStore(KeyStore):
    change_poll_interval = 0.1
    needs_bus = False  # its change log tells every process that opens the file

    def __init__(self, path: str, *, timeout: float = 5.0, **kwargs: str) -> None:
        super().__init__(**kwargs)
        self.path = path
        self.timeout = timeout
        # realpath, not abspath: a store opened through a symlink must share its
        # location (and so its revocation notifications) with the real path.
        self.location = "sqlite://" + os.path.realpath(path)
        self._local = threading.local()
        # Every connection opened, in any thread, so close() can close them all.
        # A thread whose connection was closed that way opens a fresh one.
        self._conns: list[_Connection] = []
        self._conns_lock = threading.Lock()
        # A store dropped without close() (an app torn down in a test, say)
        # still closes its connections, rather than leaving each one to warn
        # in __del__ (a ResourceWarning from Python 3.13 on).
        weakref.finalize(self, _close_all, self._conns)
        self._schema_ready = False
        self._schema_lock = threading.Lock()
        #: The last change-log row before this store first connected (None: not yet).
        self._log_start: int | None = None
        self._watch: ChangeLogWatch | None = None
        self._watch_lock = threading.Lock()

    def _connect(self) -> _Connection:
        held: _Connection | None = getattr(self._local, "conn", None)
        if held is not None and not held.closed:
            return held
        try:
            _create_private(self.path)
            # check_same_thread=False only so that close() may close it from
            # another thread; each connection is still used by one thread.
            conn = sqlite3.connect(
                self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
            )
        except (sqlite3.Error, OSError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise StoreUnavailable(f"cannot open SQLite key store {self.path!r}: {reason}") from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            _enter_wal(conn, self.timeout)
            conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error as exc:
            conn.close()
            raise StoreUnavailable(f"cannot open SQLite key store {self.path!r}: {exc}") from exc
        with self._schema_lock:
            if not self._schema_ready:
                try:
                    conn.executescript(_SCHEMA)
                    _add_missing_columns(conn)
                    (version,) = conn.execute("PRAGMA user_version").fetchone()
                    if version == 0:
                        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                    elif version > SCHEMA_VERSION:
                        raise StoreUnavailable(
                            f"SQLite key store {self.path!r} has schema version {version}; "
                            f"this release reads up to {SCHEMA_VERSION}: upgrade m2m-middleware"
                        )
                    store_id = _read_store_id(conn)
                    if store_id is not None:
                        self._learned_store_id(store_id)
                        # Before any key is read through this store: the polls
                        # go on from here, so no later change escapes them.
                        (self._log_start,) = conn.execute(
                            "SELECT coalesce(max(seq), 0) FROM m2m_key_events"
                        ).fetchone()
                except sqlite3.Error as exc:
                    conn.close()
                    raise StoreUnavailable(
                        f"cannot prepare SQLite key store {self.path!r}: {exc}"
                    ) from exc
                except BaseException:
                    conn.close()
                    raise
                self._schema_ready = True
        held = _Connection(conn)
        with self._conns_lock:
            self._conns.append(held)
        self._local.conn = held
        return held

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        while True:
            held = self._connect()
            held.lock.acquire()
            if not held.closed:
                break
            held.lock.release()  # closed by close() since _connect(): open anew
        try:
            yield held.conn
        except sqlite3.IntegrityError as exc:
            raise KeyStoreError(f"SQLite key store {self.path!r}: {exc}") from exc
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite key store {self.path!r}: {exc}") from exc
        finally:
            held.lock.release()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, so that a change and its change-log row commit together."""
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                with suppress(sqlite3.Error):  # the error that got here matters more
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    @staticmethod
    def _log_change(db: sqlite3.Connection, key_id: str) -> None:
        now = time.time()
        db.execute("INSERT INTO m2m_key_events (key_id, at) VALUES (?, ?)", (key_id, now))
        db.execute("DELETE FROM m2m_key_events WHERE at < ?", (now - CHANGE_LOG_RETENTION,))

    def poll_changes(self) -> None:
        if self._log_start is None:
            return  # never connected, so nothing of it is cached (or no change log)
        with self._watch_lock:
            watch = self._watch
            try:
                if watch is None or watch.pid != os.getpid():
                    # After fork() the parent's connection is never used here
                    # (SQLite forbids it): a new one goes on from where it was.
                    watch = self._watch = self._open_watch(watch.seq if watch else self._log_start)
                changed = watch.new_key_ids()
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"SQLite key store {self.path!r}: {exc}") from exc
        for key_id in changed:
            notify_local(self.identity, key_id)

    def _open_watch(self, after: int) -> ChangeLogWatch:
        watch = ChangeLogWatch(self.path, "m2m_key_events", after)
        with self._conns_lock:  # closed with the others, by close() or the finalizer
            self._conns.append(_Connection(watch.conn))
        return watch

    def close(self) -> None:
        super().close()
        with self._watch_lock:  # a poll in flight finishes first
            self._watch = None
        with self._conns_lock:
            conns = list(self._conns)
            self._conns.clear()  # in place: the finalizer holds this list
        _close_all(conns)
        self._local.conn = None

    def _at_exit(self) -> None:
        super()._at_exit()
        # The connection finalizer may have run before this write opened one.
        with self._conns_lock:
            conns = list(self._conns)
        _close_all(conns)

    def _insert(self, record: KeyRecord, key_hash: str) -> None:
        with self._db() as db:
            db.execute(
                "INSERT INTO m2m_api_keys (key_id, key_hash, client_id, name, scopes, tier, "
                "created_at, expires_at, remaining_uses, metadata, allowed_cidrs, "
                "signing_public_key) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    record.key_id,
                    key_hash,
                    record.client_id,
                    record.name,
                    " ".join(sorted(record.scopes)),
                    record.tier,
                    _ts(record.created_at),
                    _ts(record.expires_at),
                    record.remaining_uses,
                    encode_metadata(record.metadata),
                    encode_cidrs(record.allowed_cidrs),
                    record.signing_public_key,
                ),
            )

    def _fetch(self, key_id: str) -> KeyRecord | None:
        with self._db() as db:
            row = db.execute(
                f"SELECT {_COLUMNS} FROM m2m_api_keys WHERE key_id = ?", (key_id,)
            ).fetchone()
        return _record(row) if row else None

    def _fetch_by_hash(self, key_hash: str) -> tuple[KeyRecord, str] | None:
        with self._db() as db:
            row = db.execute(
                f"SELECT {_COLUMNS}, key_hash FROM m2m_api_keys WHERE key_hash = ?", (key_hash,)
            ).fetchone()
        return (_record(row), row[-1]) if row else None

    def _fetch_all(self, client_id: str | None) -> list[KeyRecord | UnreadableRow]:
        with self._db() as db:
            if client_id is None:
                rows = db.execute(f"SELECT {_COLUMNS} FROM m2m_api_keys").fetchall()
            else:
                rows = db.execute(
                    f"SELECT {_COLUMNS} FROM m2m_api_keys WHERE client_id = ?", (client_id,)
                ).fetchall()
        return each_record(rows, _record)

    def _set_revoked(self, key_id: str, when: datetime) -> bool:
        with self._write() as db:
            cur = db.execute(
                "UPDATE m2m_api_keys SET revoked_at = COALESCE(MIN(revoked_at, ?), ?) "
                "WHERE key_id = ?",
                (_ts(when), _ts(when), key_id),
            )
            if cur.rowcount == 1:
                self._log_change(db, key_id)
        return cur.rowcount == 1

    def _set_expiry(self, key_id: str, when: datetime) -> bool:
        with self._write() as db:
            cur = db.execute(
                "UPDATE m2m_api_keys SET expires_at = ? WHERE key_id = ?", (_ts(when), key_id)
            )
            if cur.rowcount == 1:
                self._log_change(db, key_id)
        return cur.rowcount == 1

    def _take_use(self, key_id: str) -> int | None:
        # One conditional UPDATE: the check and the decrement are one atomic
        # step, so racing threads or processes can never overspend.
        with self._db() as db:
            cur = db.execute(
                "UPDATE m2m_api_keys SET remaining_uses = remaining_uses - 1 "
                "WHERE key_id = ? AND remaining_uses > 0",
                (key_id,),
            )
            if cur.rowcount != 1:
                return None
            row = db.execute(
                "SELECT remaining_uses FROM m2m_api_keys WHERE key_id = ?", (key_id,)
            ).fetchone()
        return int(row[0]) if row else 0

    def _return_use(self, key_id: str) -> None:
        with self._db() as db:
            db.execute(
                "UPDATE m2m_api_keys SET remaining_uses = remaining_uses + 1 "
                "WHERE key_id = ? AND remaining_uses IS NOT NULL",
                (key_id,),
            )

    def _drain_uses(self, key_id: str) -> int | None:
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")  # hold the write lock between read and reset
            try:
                row = db.execute(
                    "SELECT remaining_uses FROM m2m_api_keys WHERE key_id = ?", (key_id,)
                ).fetchone()
                if row is not None and row[0] is not None:
                    db.execute(
                        "UPDATE m2m_api_keys SET remaining_uses = 0 WHERE key_id = ?", (key_id,)
                    )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return None if row is None or row[0] is None else int(row[0])

    def _write_last_used(self, touches: Mapping[str, datetime]) -> None:
        with self._db() as db:
            db.executemany(
                "UPDATE m2m_api_keys SET last_used_at = MAX(COALESCE(last_used_at, 0), ?) "
                "WHERE key_id = ?",
                [(_ts(when), key_id) for key_id, when in touches.items()],
            )
