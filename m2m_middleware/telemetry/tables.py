"""Where usage and alerts are kept: tables in the key store's own database.

DESIGN.md: state shared between instances goes where the keys already are.
Each process adds its counts with additive upserts, so several processes sum
exactly; hourly rows older than the retention are rolled into daily rows.
"""

# ruff: noqa: S608  (table and column names are module constants; every value is a parameter)
from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from ..errors import ConfigError, KeyStoreError, StoreUnavailable
from ..stores.base import KeyStore
from ..stores.memory import MemoryKeyStore
from ..stores.sqlite import SQLiteKeyStore
from .records import GRANULARITIES, Alert, UsageRow

if TYPE_CHECKING:
    from ..stores.postgres import PostgresKeyStore

#: Alerts kept for the dashboard, newest first; older ones are dropped on insert.
ALERTS_KEPT = 1000


class UsageTable(Protocol):
    def add(self, rows: Sequence[UsageRow]) -> None:
        """Add each row's counts to its hour's (one transaction; rows are hourly)."""

    def rows(
        self,
        *,
        client_id: str | None,
        key_id: str | None,
        since: datetime | None,
        until: datetime | None,
        granularity: str,
    ) -> list[UsageRow]:
        """Totals per client, key and period, oldest first (``since <= period_start < until``)."""

    def roll_up(self, before: datetime) -> None:
        """Fold the hourly rows that start before ``before`` into daily rows."""

    def add_alerts(self, alerts: Sequence[Alert]) -> None: ...

    def alerts(self, *, since: datetime | None, limit: int) -> list[Alert]:
        """The newest ``limit`` alerts fired at or after ``since``, newest first."""


def period_of(moment: datetime, granularity: str) -> datetime:
    """The start of the hour, day or month ``moment`` (aware, UTC) lies in."""
    moment = moment.astimezone(timezone.utc)
    if granularity == "hour":
        return moment.replace(minute=0, second=0, microsecond=0)
    if granularity == "day":
        return moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if granularity == "month":
        return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    raise ValueError(
        f"granularity: expected one of {', '.join(GRANULARITIES)}, got {granularity!r}"
    )


def summed(rows: Sequence[UsageRow], granularity: str) -> list[UsageRow]:
    """Rows added up per client, key and period of ``granularity``, oldest first."""
    totals: dict[tuple[str, str | None, datetime], UsageRow] = {}
    for row in rows:
        start = period_of(row.period_start, granularity)
        key = (row.client_id, row.key_id, start)
        found = totals.get(key)
        if found is None:
            totals[key] = replace(row, period_start=start)
        else:
            totals[key] = replace(
                found,
                allowed=found.allowed + row.allowed,
                denied=found.denied + row.denied,
                rate_limited=found.rate_limited + row.rate_limited,
                units=found.units + row.units,
            )
    return sorted(totals.values(), key=lambda r: (r.period_start, r.client_id, r.key_id or ""))


def _filters(
    placeholder: str,
    stored: Callable[[datetime], object],
    client_id: str | None,
    key_id: str | None,
    since: datetime | None,
    until: datetime | None,
    granularity: str,
) -> tuple[str, list[object]]:
    """The WHERE clause of a ``rows`` query and its parameters, in a driver's
    placeholder style, with times as ``stored`` spells them in its table."""
    where: list[str] = []
    params: list[object] = []
    if client_id is not None:
        where.append(f"client_id = {placeholder}")
        params.append(client_id)
    if key_id is not None:
        where.append(f"key_id = {placeholder}")
        params.append(key_id)
    if since is not None:
        where.append(f"period_start >= {placeholder}")
        params.append(stored(period_of(since, granularity)))
    if until is not None:
        where.append(f"period_start < {placeholder}")
        params.append(stored(upper_bound(until, granularity)))
    return " AND ".join(where) or "1 = 1", params


class MemoryUsageTable:
    """For ``memory://``: the rows live beside the store object, as its keys do."""

    def __init__(self) -> None:
        self._hourly: dict[tuple[str, str | None, datetime], UsageRow] = {}
        self._daily: dict[tuple[str, str | None, datetime], UsageRow] = {}
        self._alerts: list[Alert] = []
        self._lock = threading.Lock()

    def add(self, rows: Sequence[UsageRow]) -> None:
        with self._lock:
            _add_into(self._hourly, rows, "hour")

    def rows(
        self,
        *,
        client_id: str | None,
        key_id: str | None,
        since: datetime | None,
        until: datetime | None,
        granularity: str,
    ) -> list[UsageRow]:
        with self._lock:
            found = [*self._hourly.values(), *self._daily.values()]
        picked = [
            row
            for row in found
            if (client_id is None or row.client_id == client_id)
            and (key_id is None or row.key_id == key_id)
        ]
        rows = summed(picked, granularity)
        return [
            row
            for row in rows
            if (since is None or row.period_start >= period_of(since, granularity))
            and (until is None or row.period_start < until)
        ]

    def roll_up(self, before: datetime) -> None:
        with self._lock:
            old = [k for k in self._hourly if k[2] < before]
            _add_into(self._daily, [self._hourly.pop(k) for k in old], "day")

    def add_alerts(self, alerts: Sequence[Alert]) -> None:
        with self._lock:
            # Sorted as a whole: another engine's flush may bring older alerts later.
            self._alerts = sorted([*alerts, *self._alerts], key=_fired, reverse=True)
            del self._alerts[ALERTS_KEPT:]

    def alerts(self, *, since: datetime | None, limit: int) -> list[Alert]:
        with self._lock:
            found = list(self._alerts)
        return [a for a in found if since is None or _fired(a) >= since][:limit]


def _fired(alert: Alert) -> datetime:
    return alert.fired_at or datetime.min.replace(tzinfo=timezone.utc)


def _add_into(
    table: dict[tuple[str, str | None, datetime], UsageRow],
    rows: Sequence[UsageRow],
    granularity: str,
) -> None:
    for row in summed(rows, granularity):
        key = (row.client_id, row.key_id, row.period_start)
        found = table.get(key)
        table[key] = row if found is None else summed([found, row], granularity)[0]


USAGE_TABLE = "m2m_usage"
ALERTS_TABLE = "m2m_alerts"
#: The PostgreSQL advisory locks: one its tables are created under, one every
#: roll-up holds (so two processes rolling up at once never count a row twice).
_SCHEMA_LOCK = int.from_bytes(b"m2mUSAGE", "big")
_ROLL_UP_LOCK = int.from_bytes(b"m2mROLLU", "big")

_COUNTS = ("allowed", "denied", "rate_limited", "units")
_ADD_COUNTS = ", ".join(f"{c} = {USAGE_TABLE}.{c} + excluded.{c}" for c in _COUNTS)
_SUM_COUNTS = ", ".join(f"SUM({c})" for c in _COUNTS)
_ALERT_COLUMNS = "fired_at, kind, subject, count, window_seconds, detail"


def upper_bound(until: datetime, granularity: str) -> datetime:
    """The first period start at or after ``until``: a stored row starts before
    it exactly when its period of ``granularity`` starts before ``until``."""
    start = period_of(until, granularity)
    if start == until:
        return until
    if granularity == "hour":
        return start + timedelta(hours=1)
    if granularity == "day":
        return start + timedelta(days=1)
    if start.month == 12:
        return start.replace(year=start.year + 1, month=1)
    return start.replace(month=start.month + 1)


def bad_row(table: str, what: str) -> KeyStoreError:
    """A row damaged or written by hand: a KeyStoreError naming the table, never a
    TypeError from deep in a billing export."""
    return KeyStoreError(f"unreadable row in {table}: {what}")


def usage_row(
    client_id: object,
    key_id: object,
    period_start: datetime,
    counts: Sequence[object],
    *,
    table: str = USAGE_TABLE,
) -> UsageRow:
    if not isinstance(client_id, str) or not isinstance(key_id, str):
        raise bad_row(table, "client_id and key_id must be text")
    for name, value in zip(_COUNTS, counts, strict=True):
        # SQLite sums anything (a text counts as 0.0): only integers were written.
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad_row(table, f"{name} of client {client_id!r} is not a whole number")
    allowed, denied, rate_limited, units = counts
    return UsageRow(
        client_id=client_id,
        key_id=key_id or None,
        period_start=period_start,
        allowed=allowed,  # type: ignore[arg-type]  # checked above
        denied=denied,  # type: ignore[arg-type]
        rate_limited=rate_limited,  # type: ignore[arg-type]
        units=units,  # type: ignore[arg-type]
    )


def alert_of(
    values: Sequence[object],
    *,
    times: Callable[[object], datetime],
    table: str = ALERTS_TABLE,
) -> Alert:
    fired_at, kind, subject, count, window, detail = values
    if not all(isinstance(v, str) for v in (kind, subject, detail)) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in (count, window)
    ):
        raise bad_row(table, "kind, subject and detail must be text, counts whole numbers")
    return Alert(
        kind=kind,  # type: ignore[arg-type]  # checked above
        subject=subject,  # type: ignore[arg-type]
        count=count,  # type: ignore[arg-type]
        window_seconds=window,  # type: ignore[arg-type]
        detail=detail,  # type: ignore[arg-type]
        fired_at=times(fired_at),
    )


def _hours(rows: Sequence[UsageRow]) -> list[UsageRow]:
    """The rows to add, one per client, key and hour, none that adds nothing."""
    # Not ``row.requests``: a moved request (allowed -1, denied +1) sums to none.
    return [
        row
        for row in summed(rows, "hour")
        if any((row.allowed, row.denied, row.rate_limited, row.units))
    ]


S = TypeVar("S", bound=KeyStore)


def held(ref: weakref.ReferenceType[S]) -> S:
    """The store a table was made for. Held weakly: the tables are kept per store
    in a WeakKeyDictionary, whose values must not keep their keys alive."""
    store = ref()
    if store is None:  # only a table kept past its store's life
        raise StoreUnavailable("the key store of this usage table is gone")
    return store


def fired_at(alert: Alert) -> datetime:
    """When ``alert`` fired; now for one that says nothing (the table needs a time)."""
    return alert.fired_at or datetime.now(timezone.utc)


# -- SQLite -------------------------------------------------------------------------


def _epoch(value: object) -> datetime:
    """An epoch-seconds column as an aware UTC datetime; KeyStoreError for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_row(USAGE_TABLE, "a time that is not a number")
    try:
        return datetime.fromtimestamp(value, timezone.utc)
    except (ValueError, OverflowError, OSError):
        raise bad_row(USAGE_TABLE, f"a time out of range ({value!r})") from None


def _alert_epoch(value: object) -> datetime:
    try:
        return _epoch(value)
    except KeyStoreError:
        raise bad_row(ALERTS_TABLE, "fired_at is not a time") from None


class SQLiteUsageTable:
    """Periods as whole Unix seconds (INTEGER), so that grouping by day is arithmetic.

    Every write is one ``BEGIN IMMEDIATE`` transaction (the store's ``_write``):
    SQLite lets one writer in at a time, which is what makes the additive
    upserts and the roll-up exact across processes.
    """

    _SCHEMA = f"""
    CREATE TABLE IF NOT EXISTS {USAGE_TABLE} (
        client_id TEXT NOT NULL,
        key_id TEXT NOT NULL DEFAULT '',
        span TEXT NOT NULL CHECK (span IN ('hour', 'day')),
        period_start INTEGER NOT NULL,
        allowed INTEGER NOT NULL DEFAULT 0,
        denied INTEGER NOT NULL DEFAULT 0,
        rate_limited INTEGER NOT NULL DEFAULT 0,
        units INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (client_id, key_id, span, period_start)
    );
    CREATE INDEX IF NOT EXISTS {USAGE_TABLE}_period ON {USAGE_TABLE} (period_start);
    CREATE TABLE IF NOT EXISTS {ALERTS_TABLE} (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        fired_at REAL NOT NULL,
        kind TEXT NOT NULL,
        subject TEXT NOT NULL,
        count INTEGER NOT NULL,
        window_seconds INTEGER NOT NULL,
        detail TEXT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS {ALERTS_TABLE}_fired_at ON {ALERTS_TABLE} (fired_at);
    """

    def __init__(self, store: SQLiteKeyStore) -> None:
        self._store_ref = weakref.ref(store)
        self._ready = False

    @property
    def _store(self) -> SQLiteKeyStore:
        return held(self._store_ref)

    def _prepare(self) -> None:
        if not self._ready:
            with self._store._db() as db:
                db.executescript(self._SCHEMA)
            self._ready = True

    def add(self, rows: Sequence[UsageRow]) -> None:
        self._prepare()
        values = [
            (
                row.client_id,
                row.key_id or "",
                int(row.period_start.timestamp()),
                row.allowed,
                row.denied,
                row.rate_limited,
                row.units,
            )
            for row in _hours(rows)
        ]
        if not values:
            return
        with self._store._write() as db:
            db.executemany(
                f"INSERT INTO {USAGE_TABLE} (client_id, key_id, span, period_start, "
                f"{', '.join(_COUNTS)}) VALUES (?, ?, 'hour', ?, ?, ?, ?, ?) "
                f"ON CONFLICT (client_id, key_id, span, period_start) DO UPDATE SET {_ADD_COUNTS}",
                values,
            )

    def rows(
        self,
        *,
        client_id: str | None,
        key_id: str | None,
        since: datetime | None,
        until: datetime | None,
        granularity: str,
    ) -> list[UsageRow]:
        self._prepare()
        where, params = _filters(
            "?",
            lambda moment: int(moment.timestamp()),
            client_id,
            key_id,
            since,
            until,
            granularity,
        )
        # Months have no fixed length: those are summed from days in Python.
        period = "period_start" if granularity == "hour" else "period_start - period_start % 86400"
        # A hand-written row's text or out-of-set span, found in the same pass.
        unreadable = "MAX(typeof(period_start) != 'integer' OR span NOT IN ('hour', 'day'))"
        with self._store._db() as db:
            found = db.execute(
                f"SELECT client_id, key_id, {period} AS period, {_SUM_COUNTS}, {unreadable} "
                f"FROM {USAGE_TABLE} WHERE {where} "
                "GROUP BY client_id, key_id, period ORDER BY period, client_id, key_id",
                params,
            ).fetchall()
        rows = []
        for client, key, start, *counts, bad in found:
            if bad:
                raise bad_row(USAGE_TABLE, f"a period or span of client {client!r} is not one")
            rows.append(usage_row(client, key, _epoch(start), counts))
        return rows if granularity != "month" else summed(rows, "month")

    def roll_up(self, before: datetime) -> None:
        self._prepare()
        cutoff = int(before.timestamp())
        with self._store._write() as db:  # one writer: no other roll-up sees these rows
            db.execute(
                f"INSERT INTO {USAGE_TABLE} (client_id, key_id, span, period_start, "
                f"{', '.join(_COUNTS)}) "
                f"SELECT client_id, key_id, 'day', period_start - period_start % 86400, "
                f"{_SUM_COUNTS} FROM {USAGE_TABLE} "
                "WHERE span = 'hour' AND typeof(period_start) = 'integer' AND period_start < ? "
                "GROUP BY client_id, key_id, period_start - period_start % 86400 "
                f"ON CONFLICT (client_id, key_id, span, period_start) DO UPDATE SET {_ADD_COUNTS}",
                (cutoff,),
            )
            db.execute(
                f"DELETE FROM {USAGE_TABLE} WHERE span = 'hour' "
                "AND typeof(period_start) = 'integer' AND period_start < ?",
                (cutoff,),
            )

    def add_alerts(self, alerts: Sequence[Alert]) -> None:
        if not alerts:
            return
        self._prepare()
        with self._store._write() as db:
            db.executemany(
                f"INSERT INTO {ALERTS_TABLE} ({_ALERT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (
                        fired_at(a).timestamp(),
                        a.kind,
                        a.subject,
                        a.count,
                        a.window_seconds,
                        a.detail,
                    )
                    for a in alerts
                ],
            )
            db.execute(
                f"DELETE FROM {ALERTS_TABLE} WHERE id IN (SELECT id FROM {ALERTS_TABLE} "
                "ORDER BY fired_at DESC, id DESC LIMIT -1 OFFSET ?)",
                (ALERTS_KEPT,),
            )

    def alerts(self, *, since: datetime | None, limit: int) -> list[Alert]:
        self._prepare()
        query = f"SELECT {_ALERT_COLUMNS} FROM {ALERTS_TABLE}"
        params: list[object] = []
        if since is not None:
            query += " WHERE fired_at >= ?"
            params.append(since.timestamp())
        query += " ORDER BY fired_at DESC, id DESC LIMIT ?"
        params.append(max(limit, 0))
        with self._store._db() as db:
            found = db.execute(query, params).fetchall()
        return [alert_of(values, times=_alert_epoch) for values in found]


# -- PostgreSQL ---------------------------------------------------------------------


class _MaybeApplied(Exception):
    """A PostgreSQL error met at COMMIT: whether transaction ``txid`` committed is unknown."""

    def __init__(self, error: Exception, txid: int) -> None:
        super().__init__(str(error))
        self.error = error
        self.txid = txid


#: How long a write whose COMMIT answer was lost is looked up (its backend may
#: still be finishing it), in tries 50 ms apart.
_STATUS_TRIES = 40


class PostgresUsageTable:
    _SCHEMA = (
        f"""
        CREATE TABLE IF NOT EXISTS {USAGE_TABLE} (
            client_id text NOT NULL,
            key_id text NOT NULL DEFAULT '',
            span text NOT NULL CHECK (span IN ('hour', 'day')),
            period_start timestamptz NOT NULL,
            allowed bigint NOT NULL DEFAULT 0,
            denied bigint NOT NULL DEFAULT 0,
            rate_limited bigint NOT NULL DEFAULT 0,
            units bigint NOT NULL DEFAULT 0,
            PRIMARY KEY (client_id, key_id, span, period_start)
        )
        """,
        f"CREATE INDEX IF NOT EXISTS {USAGE_TABLE}_period ON {USAGE_TABLE} (period_start)",
        f"""
        CREATE TABLE IF NOT EXISTS {ALERTS_TABLE} (
            id bigserial PRIMARY KEY,
            fired_at timestamptz NOT NULL,
            kind text NOT NULL,
            subject text NOT NULL,
            count bigint NOT NULL,
            window_seconds bigint NOT NULL,
            detail text NOT NULL
        )
        """,
        f"CREATE INDEX IF NOT EXISTS {ALERTS_TABLE}_fired_at ON {ALERTS_TABLE} (fired_at)",
    )

    def __init__(self, store: PostgresKeyStore) -> None:
        self._store_ref = weakref.ref(store)
        self._ready = False

    @property
    def _store(self) -> PostgresKeyStore:
        return held(self._store_ref)

    def _prepare(self) -> None:
        if not self._ready:

            def create(conn: Any) -> None:
                # Concurrent CREATE ... IF NOT EXISTS can still collide in the catalog.
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                    for statement in self._SCHEMA:
                        conn.execute(statement)

            self._store._run(create, retry=True)
            self._ready = True

    def _write_once(self, work: Callable[[Any], None]) -> None:
        """``work(conn)`` in one transaction, applied once or not at all, as far as
        can be known: an additive write applied twice would count twice, and the
        usage counter adds what a failed write held to its next one.

        A connection found dead before COMMIT was sent rolled the transaction
        back, so a fresh connection may try again (``_run``'s retry). When the
        answer to COMMIT itself is lost, PostgreSQL's ``txid_status`` tells
        whether it committed (the function exists for exactly this): committed
        is success; aborted, or not to be found out, is the store's error.
        """
        import psycopg

        def run(conn: Any) -> None:
            committing = False
            txid = 0
            try:
                with conn.transaction():
                    (txid,) = conn.execute("SELECT txid_current()").fetchone()
                    work(conn)
                    committing = True
            except psycopg.Error as exc:
                if committing:
                    raise _MaybeApplied(exc, txid) from exc
                raise

        try:
            self._store._run(run, retry=True)
        except _MaybeApplied as unknown:
            error = unknown.error
            assert isinstance(error, psycopg.Error)  # only ever made from one
            if self._committed(unknown.txid):
                return
            raise self._store._translate(error) from error

    def _committed(self, txid: int) -> bool:
        """Whether transaction ``txid`` committed; False when it did not or cannot be told."""
        import time

        def status(conn: Any) -> object:
            found = conn.execute("SELECT txid_status(%s)", (txid,)).fetchone()
            return None if found is None else found[0]

        for _ in range(_STATUS_TRIES):
            try:
                found = self._store._run(status, retry=True)
            except KeyStoreError:
                return False  # the database is gone again: the error stands
            if found != "in progress":  # else its backend is still ending it: ask again
                return found == "committed"
            time.sleep(0.05)
        return False

    def add(self, rows: Sequence[UsageRow]) -> None:
        self._prepare()
        values = [
            (
                row.client_id,
                row.key_id or "",
                row.period_start,
                row.allowed,
                row.denied,
                row.rate_limited,
                row.units,
            )
            for row in _hours(rows)
        ]
        if not values:
            return

        def work(conn: Any) -> None:
            with conn.cursor() as cursor:
                cursor.executemany(
                    f"INSERT INTO {USAGE_TABLE} (client_id, key_id, span, period_start, "
                    f"{', '.join(_COUNTS)}) VALUES (%s, %s, 'hour', %s, %s, %s, %s, %s) "
                    "ON CONFLICT (client_id, key_id, span, period_start) "
                    f"DO UPDATE SET {_ADD_COUNTS}",
                    values,
                )

        self._write_once(work)

    def rows(
        self,
        *,
        client_id: str | None,
        key_id: str | None,
        since: datetime | None,
        until: datetime | None,
        granularity: str,
    ) -> list[UsageRow]:
        self._prepare()
        where, params = _filters(
            "%s", lambda moment: moment, client_id, key_id, since, until, granularity
        )
        trunc = {"hour": "hour", "day": "day", "month": "month"}[granularity]
        # Truncated in UTC whatever the session's TimeZone, then made timestamptz again.
        period = f"date_trunc('{trunc}', period_start AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'"
        query = (
            f"SELECT client_id, key_id, {period} AS period, {_SUM_COUNTS} "
            f"FROM {USAGE_TABLE} WHERE {where} "
            "GROUP BY client_id, key_id, period ORDER BY period, client_id, key_id"
        )
        found = self._store._run(lambda conn: conn.execute(query, params).fetchall(), retry=True)
        rows = []
        for client, key, start, *counts in found:
            if not isinstance(start, datetime):  # 'infinity', or a year past 9999
                raise bad_row(USAGE_TABLE, f"a period of client {client!r} is not a time")
            rows.append(usage_row(client, key, _utc_aware(start), [int(c) for c in counts]))
        return rows

    def roll_up(self, before: datetime) -> None:
        self._prepare()

        def work(conn: Any) -> None:
            # Held to the transaction's end: a second roll-up waits, then finds
            # the hourly rows gone.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_ROLL_UP_LOCK,))
            # One statement: the rows added into days are exactly the rows deleted
            # (DELETE ... RETURNING locks them), even while other processes flush
            # into those hours; two statements would each see their own snapshot.
            day = "date_trunc('day', period_start AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'"
            conn.execute(
                f"WITH moved AS (DELETE FROM {USAGE_TABLE} "
                "WHERE span = 'hour' AND period_start < %s "
                f"RETURNING client_id, key_id, period_start, {', '.join(_COUNTS)}) "
                f"INSERT INTO {USAGE_TABLE} (client_id, key_id, span, period_start, "
                f"{', '.join(_COUNTS)}) "
                f"SELECT client_id, key_id, 'day', {day}, {_SUM_COUNTS} FROM moved "
                f"GROUP BY client_id, key_id, {day} "
                f"ON CONFLICT (client_id, key_id, span, period_start) DO UPDATE SET {_ADD_COUNTS}",
                (before,),
            )

        self._write_once(work)

    def add_alerts(self, alerts: Sequence[Alert]) -> None:
        if not alerts:
            return
        self._prepare()
        values = [
            (fired_at(a), a.kind, a.subject, a.count, a.window_seconds, a.detail) for a in alerts
        ]

        def work(conn: Any) -> None:
            with conn.cursor() as cursor:
                cursor.executemany(
                    f"INSERT INTO {ALERTS_TABLE} ({_ALERT_COLUMNS}) "
                    "VALUES (%s, %s, %s, %s, %s, %s)",
                    values,
                )
            conn.execute(
                f"DELETE FROM {ALERTS_TABLE} WHERE id IN (SELECT id FROM {ALERTS_TABLE} "
                "ORDER BY fired_at DESC, id DESC OFFSET %s)",
                (ALERTS_KEPT,),
            )

        self._write_once(work)

    def alerts(self, *, since: datetime | None, limit: int) -> list[Alert]:
        self._prepare()
        query = f"SELECT {_ALERT_COLUMNS} FROM {ALERTS_TABLE}"
        params: list[object] = []
        if since is not None:
            query += " WHERE fired_at >= %s"
            params.append(since)
        query += " ORDER BY fired_at DESC, id DESC LIMIT %s"
        params.append(max(limit, 0))
        found = self._store._run(lambda conn: conn.execute(query, params).fetchall(), retry=True)
        return [alert_of(tuple(values), times=_alert_time) for values in found]


def _utc_aware(value: datetime) -> datetime:
    aware = value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)
    return aware.astimezone(timezone.utc)


def _alert_time(value: object) -> datetime:
    if not isinstance(value, datetime):
        raise bad_row(ALERTS_TABLE, "fired_at is not a time")
    return _utc_aware(value)


# -- which table --------------------------------------------------------------------

#: One table object per store, so its "created already" flag is kept: the
#: counter and every ``store.usage()`` call share it.
_TABLES: weakref.WeakKeyDictionary[KeyStore, UsageTable] = weakref.WeakKeyDictionary()
_TABLES_LOCK = threading.Lock()


def keeps_usage(store: KeyStore) -> bool:
    """Whether ``store`` is of a kind that has usage tables (a custom store is not)."""
    try:
        usage_table_for(store)
    except ConfigError:
        return False
    return True


def usage_table_for(store: KeyStore) -> UsageTable:
    """The usage table of ``store``'s database."""
    with _TABLES_LOCK:
        table = _TABLES.get(store)
        if table is None:
            table = _TABLES[store] = _new_table(store)
        return table


def _new_table(store: KeyStore) -> UsageTable:
    if isinstance(store, MemoryKeyStore):
        return MemoryUsageTable()
    if isinstance(store, SQLiteKeyStore):
        return SQLiteUsageTable(store)
    module = type(store).__module__
    if module.endswith(".stores.postgres"):
        from ..stores.postgres import PostgresKeyStore

        if isinstance(store, PostgresKeyStore):
            return PostgresUsageTable(store)
    if module.endswith(".django.store"):
        from ..django.store import DjangoKeyStore
        from .django_table import DjangoUsageTable

        if isinstance(store, DjangoKeyStore):
            return DjangoUsageTable(store)
    raise ConfigError(
        "key_store",
        f"{type(store).__name__} keeps no usage: usage needs a memory://, sqlite://, "
        "postgresql:// or django:// key store (or usage=False and alerts=False)",
    )


#: How long hourly rows are kept before they are rolled into days, by default.
DEFAULT_RETENTION = timedelta(days=90)

__all__ = [
    "ALERTS_KEPT",
    "MemoryUsageTable",
    "PostgresUsageTable",
    "SQLiteUsageTable",
    "UsageTable",
    "period_of",
    "summed",
    "usage_table_for",
]
