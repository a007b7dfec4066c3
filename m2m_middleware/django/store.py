"""``key_store="django://"``: keys in the project's own database, through the ORM.

Every primitive keeps the semantics of the SQLite store: one conditional
``UPDATE`` takes a use, so ``max_uses`` is exact however many threads and
processes race; a revocation keeps the earliest time; ``last_used_at`` only
moves forward. The models are imported on first use, never at import time,
because this module is imported by ``open_key_store`` and the middleware, which
may run before the app registry is ready.

Revocations made in other processes reach this one's caches as they do for
the ``sqlite://`` and ``postgresql://`` stores: on SQLite, each revoke or
rotate writes a :class:`~m2m_middleware.django.models.KeyChange` row in its
transaction, which the engine polls (``PRAGMA data_version``, through a
connection of the store's own); on PostgreSQL, the write sends a ``NOTIFY``
in its transaction, heard by a listener thread with a connection of its own.
Other databases need the Redis bus (``invalidation_url``).

Django owns the connections. Async callers reach the store on the request's
sync thread (``sync_to_async(thread_sensitive=True)``, as Django asks of any
ORM call from async code), so Django opens and closes them as for the views.
A connection that failed is closed, outside a transaction, so the next call
opens a fresh one instead of failing until the process restarts.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import (
    DatabaseError,
    DataError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    connections,
    transaction,
)
from django.db.models import BooleanField, DateTimeField, ExpressionWrapper, F, Q, Value
from django.db.models.functions import Coalesce, Greatest, Least
from django.utils import timezone

from .. import keys as keyformat
from ..errors import ConfigError, KeyStoreError, StoreUnavailable, UnreadableRow
from ..invalidation import NOTIFY_CHANNEL, PostgresListener, postgres_listener
from ..redaction import redact_url
from ..stores.base import KeyRecord, KeyStore, notify_local, utcnow
from ..stores.sqlite import CHANGE_LOG_RETENTION, ChangeLogWatch, SQLiteKeyStore

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper
    from django.db.models import QuerySet

    from .models import APIKey, KeyChange, StoreMeta

logger = logging.getLogger("m2m_middleware")

#: Seconds before a store id that could not be read (database down, not
#: migrated yet) is tried again; meanwhile the store goes by its location.
_STORE_ID_RETRY = 10.0

_P = ParamSpec("_P")
_T = TypeVar("_T")

SCHEME = "django"
APP_NAME = "m2m_middleware.django"
_INSTALL_HINT = f'add "{APP_NAME}" to INSTALLED_APPS and run "manage.py migrate"'


def _model() -> type[APIKey]:
    from .models import APIKey

    return APIKey


def _changes() -> type[KeyChange]:
    from .models import KeyChange

    return KeyChange


def _meta() -> type[StoreMeta]:
    from .models import StoreMeta

    return StoreMeta


def _app_installed() -> bool:
    from django.apps import apps

    if apps.apps_ready:
        return apps.is_installed(APP_NAME)
    # Before django.setup() finishes: read the setting as the registry will.
    return any(
        entry == APP_NAME or entry.startswith(APP_NAME + ".")
        for entry in getattr(settings, "INSTALLED_APPS", ())
    )


def check_usable(using: str) -> None:
    """Raise ConfigError unless Django is configured, the app installed and ``using`` defined."""
    if not settings.configured:
        raise ConfigError(
            "key_store",
            f"{SCHEME}:// needs a configured Django project (DJANGO_SETTINGS_MODULE); "
            f"then {_INSTALL_HINT}",
        )
    if not _app_installed():
        raise ConfigError(
            "key_store", f"{SCHEME}:// keeps keys in the APIKey model: {_INSTALL_HINT}"
        )
    if using not in connections.settings:
        known = ", ".join(sorted(connections.settings)) or "none"
        raise ConfigError("key_store", f"no database {using!r} in DATABASES (defined: {known})")


def store_from_url(url: str, *, prefix: str = keyformat.DEFAULT_PREFIX) -> DjangoKeyStore:
    """``django://`` (the ``default`` database) or ``django://<alias>``."""
    alias = url[len(SCHEME) + 3 :]
    if alias.endswith("/"):
        alias = alias[:-1]
    if "/" in alias or "?" in alias or "#" in alias:
        raise ConfigError(
            "key_store", f"{redact_url(url)!r}: write django:// or django://<database alias>"
        )
    alias = alias or "default"
    check_usable(alias)
    return DjangoKeyStore(alias, prefix=prefix)


def _sqlite_file(connection: BaseDatabaseWrapper) -> str | None:
    """The database file, or None for an in-memory database (no other process shares it)."""
    name = str(connection.settings_dict.get("NAME") or "")
    if not name or name == ":memory:" or "mode=memory" in name:
        return None
    return name


def _listener_conninfo(connection: BaseDatabaseWrapper, timeout: float) -> tuple[str, str] | None:
    """What a listener connects with (libpq's own parameters out of Django's), and the
    password to keep out of its messages; None without psycopg 3."""
    try:
        from psycopg import pq
        from psycopg.conninfo import make_conninfo

        from ..stores.postgres import _with_timeouts
    except ImportError:
        return None
    known = {option.keyword.decode() for option in pq.Conninfo.get_defaults()}
    params: dict[str, Any] = connection.get_connection_params()
    kept = {
        key: str(value)
        for key, value in params.items()
        if key in known and isinstance(value, (str, int)) and not isinstance(value, bool)
    }
    return make_conninfo("", **_with_timeouts(kept, timeout)), kept.get("password", "")


#: The time columns. Django reads a text it cannot parse there as None, which
#: would make a garbled revoked_at or expires_at read "never": each is loaded
#: with a flag from the database saying whether it is NULL, to tell them apart
#: (``APIKey.to_record`` reads the flags).
TIME_COLUMNS = ("created_at", "expires_at", "revoked_at", "last_used_at")
NULL_FLAG = "m2m_stored_"
#: What Django's field converters raise for a value its column should not hold
#: (an impossible date on SQLite; on PostgreSQL, psycopg's DataError for
#: 'infinity', which Django wraps).
_UNCONVERTIBLE = (ValueError, TypeError, AttributeError, OverflowError, DataError)


def with_null_flags(rows: QuerySet[APIKey]) -> QuerySet[APIKey]:
    """``rows`` loaded with the database's word on which time columns are NULL."""
    return rows.annotate(
        **{
            NULL_FLAG + column: ExpressionWrapper(
                Q(**{f"{column}__isnull": False}), output_field=BooleanField()
            )
            for column in TIME_COLUMNS
        }
    )


def _to_db(value: datetime | None) -> datetime | None:
    # With USE_TZ = False the database holds naive datetimes in TIME_ZONE.
    if value is None or settings.USE_TZ:
        return value
    return timezone.make_naive(value)


class DjangoKeyStore(KeyStore):
    """Keys in the ``APIKey`` table of the database ``using`` (a DATABASES alias)."""

    blocking = True

    #: Seconds the listener's connection may take to connect (PostgreSQL).
    listen_timeout: float = 2.0

    def __init__(self, using: str = "default", *, prefix: str = keyformat.DEFAULT_PREFIX) -> None:
        super().__init__(prefix=prefix)
        self.using = using
        self._location: str | None = None
        self._needs_bus: bool | None = None
        self._listener: PostgresListener | None = None
        self._watch: ChangeLogWatch | None = None
        self._watch_lock = threading.Lock()
        self._store_id_due = 0.0  # monotonic time of the next try; inf once read
        self._change_log_failed = False

    # Computed once, on first use (when the engine subscribes its cache), not
    # in __init__: a store object may be made in settings.py, before Django is
    # configured. Fixed from then on, so notices and subscriptions always agree.
    @property
    def location(self) -> str:
        if self._location is None:
            check_usable(self.using)
            name = connections[self.using].settings_dict.get("NAME") or ""
            self._location = f"{SCHEME}://{self.using}/{name}"
        return self._location

    @location.setter
    def location(self, value: str) -> None:
        self._location = value

    def __repr__(self) -> str:
        return f"DjangoKeyStore(using={self.using!r})"

    # -- hearing other processes ---------------------------------------------------

    @property
    def needs_bus(self) -> bool:
        """Only on a database other than SQLite and PostgreSQL (or without psycopg 3)."""
        if self._needs_bus is not None:
            return self._needs_bus
        check_usable(self.using)
        vendor = connections[self.using].vendor
        if vendor == "postgresql":
            try:
                import psycopg  # noqa: F401  (the listener's client)
            except ImportError:
                return True
        return vendor not in ("sqlite", "postgresql")

    @needs_bus.setter
    def needs_bus(self, value: bool) -> None:
        self._needs_bus = value

    def watch_changes(self) -> None:
        check_usable(self.using)
        connection = connections[self.using]
        if connection.vendor == "sqlite" and _sqlite_file(connection) is not None:
            self.change_poll_interval = SQLiteKeyStore.change_poll_interval
        elif connection.vendor == "postgresql" and self._listener is None:
            found = _listener_conninfo(connection, self.listen_timeout)
            if found is not None:
                conninfo, password = found

                def redact(text: str) -> str:
                    return text.replace(password, "***") if password else text

                self._listener = postgres_listener(self.location, conninfo, redact)

    def poll_changes(self) -> None:
        with self._watch_lock:
            watch = self._watch
            try:
                if watch is None or watch.pid != os.getpid():
                    path = _sqlite_file(connections[self.using])
                    if path is None:
                        return
                    # The first look starts from the newest row: the engine
                    # polls before its first lookup, so nothing older is cached.
                    watch = self._watch = ChangeLogWatch(
                        path, _changes()._meta.db_table, watch.seq if watch else None
                    )
                changed = watch.new_key_ids()
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"Django key store {self.using!r}: {exc}") from exc
        for key_id in changed:
            notify_local(self.identity, key_id)

    def _read_store_id(self) -> None:
        """The id kept in the database (made on first use), once it can be read.

        Read before the first lookup, so that caches are linked to it before
        they hold anything, and before the first notice, which carries it.
        """
        if time.monotonic() < self._store_id_due:
            return
        try:
            with transaction.atomic(using=self.using):  # a savepoint in a caller's transaction
                rows = _meta().objects.using(self.using).order_by("store_id")
                row = rows.first()
                if row is None:
                    rows.create(store_id=secrets.token_hex(16))
                    row = rows.first()  # the lowest, should another process race
        except DatabaseError:  # down, or not migrated: the location until then
            self._store_id_due = time.monotonic() + _STORE_ID_RETRY
            return
        self._store_id_due = float("inf")
        if row is not None:
            self._learned_store_id(row.store_id)

    def _log_change(self, key_id: str) -> None:
        """Tell other processes, from inside the transaction that changed ``key_id``.

        Never fails the revocation: without the change log (a database not
        migrated yet) other processes see it within ``key_cache_ttl``.
        """
        self._read_store_id()
        connection = connections[self.using]
        try:
            with transaction.atomic(using=self.using):  # a savepoint: a failure here stays here
                if connection.vendor == "sqlite":
                    now = utcnow()
                    changes = _changes().objects.using(self.using)
                    changes.create(key_id=key_id, at=_to_db(now))
                    expired = _to_db(now - timedelta(seconds=CHANGE_LOG_RETENTION))
                    changes.filter(at__lt=expired).delete()
                elif connection.vendor == "postgresql":
                    payload = json.dumps({"store_id": self.identity, "key_id": key_id})
                    with connection.cursor() as cursor:  # delivered on commit, and only then
                        cursor.execute("SELECT pg_notify(%s, %s)", [NOTIFY_CHANNEL, payload])
        except DatabaseError as exc:
            if not self._change_log_failed:
                self._change_log_failed = True
                logger.warning(
                    "Django key store %r cannot tell other processes of key changes (%s); "
                    'they see them within key_cache_ttl. Has "manage.py migrate" run?',
                    self.using,
                    exc,
                )

    def close(self) -> None:
        try:
            super().close()
        finally:
            listener, self._listener = self._listener, None
            if listener is not None:
                listener.release()
            with self._watch_lock:
                watch, self._watch = self._watch, None
            if watch is not None and watch.pid == os.getpid():
                with suppress(sqlite3.Error):
                    watch.conn.close()

    async def run_blocking(
        self, function: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs
    ) -> _T:
        # Django's way to reach the ORM from async code: on the request's own
        # sync thread, whose connections Django closes when the request ends
        # (CONN_MAX_AGE, health checks), never in a pool thread it never sees.
        return await sync_to_async(function, thread_sensitive=True)(*args, **kwargs)

    def _invalidated(self, key_id: str) -> None:
        # Inside an atomic block (the admin's views, ATOMIC_REQUESTS) the
        # revocation is not visible yet: a cache told now could reload the old
        # row and keep it for its TTL. Tell them on commit (at once outside one).
        notify = super()._invalidated
        transaction.on_commit(lambda: notify(key_id), using=self.using)

    @contextmanager
    def _db(self) -> Iterator[None]:
        try:
            yield
        except IntegrityError as exc:
            raise KeyStoreError(f"Django key store {self.using!r}: {exc}") from exc
        except (OperationalError, InterfaceError) as exc:
            self._drop_broken_connection()
            raise StoreUnavailable(f"Django key store {self.using!r}: {exc}") from exc
        except DatabaseError as exc:  # ProgrammingError, DataError, ...
            hint = ""
            if "m2m_middleware_apikey" in str(exc):
                hint = ' (has "manage.py migrate" run?)'
            raise KeyStoreError(f"Django key store {self.using!r}: {exc}{hint}") from exc

    def _drop_broken_connection(self) -> None:
        # A connection the server dropped stays broken; close it so the next
        # call reconnects. Inside a transaction that is the caller's to end.
        connection = connections[self.using]
        if not connection.in_atomic_block:
            with suppress(DatabaseError):
                connection.close()

    def _rows(self) -> QuerySet[APIKey]:
        return _model().objects.using(self.using)

    def _read_one(self, rows: QuerySet[APIKey]) -> tuple[KeyRecord, str] | None:
        """The record and hash of the one row in ``rows``; UnreadableRow if it is bad."""
        try:
            row = with_null_flags(rows).first()
        except _UNCONVERTIBLE:
            raise self._diagnose(rows) from None
        return None if row is None else (row.to_record(), row.key_hash)

    def _diagnose(self, rows: QuerySet[APIKey]) -> UnreadableRow:
        """Which column of the row in ``rows`` Django cannot convert (the bad path only)."""
        try:
            key_id = str(rows.values_list("key_id", flat=True).first())
        except _UNCONVERTIBLE:
            key_id = "?"
        for column in ("client_id", "name", "scopes", "tier", *TIME_COLUMNS, "remaining_uses"):
            try:
                rows.values_list(column, flat=True).first()
            except _UNCONVERTIBLE:
                what = "a time" if column in TIME_COLUMNS else "what the column holds"
                return UnreadableRow(key_id, f"{column} is not {what}")
        return UnreadableRow(key_id, "a column does not hold what it should")

    # -- storage primitives --------------------------------------------------

    def _insert(self, record: KeyRecord, key_hash: str) -> None:
        with self._db():
            self._rows().create(
                key_id=record.key_id,
                key_hash=key_hash,
                client_id=record.client_id,
                name=record.name,
                scopes=" ".join(sorted(record.scopes)),
                tier=record.tier,
                created_at=_to_db(record.created_at),
                expires_at=_to_db(record.expires_at),
                revoked_at=_to_db(record.revoked_at),
                remaining_uses=record.remaining_uses,
                metadata=dict(record.metadata),
                last_used_at=_to_db(record.last_used_at),
                allowed_cidrs="\n".join(record.allowed_cidrs),
                signing_public_key=record.signing_public_key,
            )

    def _fetch(self, key_id: str) -> KeyRecord | None:
        with self._db():
            found = self._read_one(self._rows().filter(key_id=key_id))
        return found[0] if found is not None else None

    def _fetch_by_hash(self, key_hash: str) -> tuple[KeyRecord, str] | None:
        self._read_store_id()
        listener = self._listener
        if listener is not None and not listener.settled.is_set():
            listener.wait_settled(self.listen_timeout)  # what this reads is then cached safely
        with self._db():
            return self._read_one(self._rows().filter(key_hash=key_hash))

    def _fetch_all(self, client_id: str | None) -> list[KeyRecord | UnreadableRow]:
        found: list[KeyRecord | UnreadableRow] = []
        with self._db():
            rows = self._rows().all()
            if client_id is not None:
                rows = rows.filter(client_id=client_id)
            try:
                loaded = list(with_null_flags(rows))
            except _UNCONVERTIBLE:
                # One row Django cannot convert fails the whole query: read
                # them one by one (the bad path only) so the others are listed.
                for key_id in rows.values_list("key_id", flat=True):
                    try:
                        one = self._read_one(self._rows().filter(key_id=key_id))
                    except UnreadableRow as bad:
                        found.append(bad)
                    else:
                        if one is not None:
                            found.append(one[0])
                return found
        for row in loaded:
            try:
                found.append(row.to_record())
            except UnreadableRow as bad:
                found.append(bad)
        return found

    def _set_revoked(self, key_id: str, when: datetime) -> bool:
        at = Value(_to_db(when), output_field=DateTimeField())
        # The earliest revocation wins. LEAST ignores NULL on PostgreSQL but
        # is NULL with any NULL argument on SQLite (MIN) and MySQL; COALESCE
        # makes both read "when" for a key never revoked.
        with self._db(), transaction.atomic(using=self.using):
            changed = (
                self._rows()
                .filter(key_id=key_id)
                .update(revoked_at=Coalesce(Least(F("revoked_at"), at), at))
            )
            if changed == 1:
                self._log_change(key_id)
        return changed == 1

    def _set_expiry(self, key_id: str, when: datetime) -> bool:
        with self._db(), transaction.atomic(using=self.using):
            changed = self._rows().filter(key_id=key_id).update(expires_at=_to_db(when))
            if changed == 1:
                self._log_change(key_id)
        return changed == 1

    def _take_use(self, key_id: str) -> int | None:
        # One conditional UPDATE: the check and the decrement are one atomic
        # step, so racing threads or processes can never overspend. The read
        # after it sits in the same transaction, so it sees this decrement
        # (the UPDATE holds the row, or SQLite's write lock, until commit).
        with self._db(), transaction.atomic(using=self.using):
            rows = self._rows().filter(key_id=key_id)
            if (
                rows.filter(remaining_uses__gt=0).update(remaining_uses=F("remaining_uses") - 1)
                != 1
            ):
                return None
            left = rows.values_list("remaining_uses", flat=True).first()
        return int(left) if left is not None else 0

    def _return_use(self, key_id: str) -> None:
        with self._db():
            self._rows().filter(key_id=key_id, remaining_uses__isnull=False).update(
                remaining_uses=F("remaining_uses") + 1
            )

    def _drain_uses(self, key_id: str) -> int | None:
        with self._db(), transaction.atomic(using=self.using):
            rows = self._rows().filter(key_id=key_id)
            if not connections[self.using].features.has_select_for_update:
                # SQLite: a read first would hold a shared lock that cannot be
                # upgraded while a racing take_use holds the write lock (it
                # fails at once, "database is locked"). Take the write lock
                # first with a no-op write, then read and reset under it.
                rows.update(remaining_uses=F("remaining_uses"))
            else:
                rows = rows.select_for_update()
            found = rows.values_list("remaining_uses", flat=True)[:1]
            uses = list(found)
            if not uses or uses[0] is None:
                return None
            self._rows().filter(key_id=key_id).update(remaining_uses=0)
        return int(uses[0])

    def _write_last_used(self, touches: Mapping[str, datetime]) -> None:
        rows = self._rows()
        with self._db(), transaction.atomic(using=self.using):
            for key_id, when in sorted(touches.items()):  # one lock order for every writer
                at = Value(_to_db(when), output_field=DateTimeField())
                rows.filter(key_id=key_id).update(
                    last_used_at=Coalesce(Greatest(F("last_used_at"), at), at)
                )
