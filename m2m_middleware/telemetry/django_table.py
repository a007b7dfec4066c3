"""Usage and alerts in the Django ORM: the ``UsageCount`` and ``AlertRecord`` models.

Additive through ``F()`` updates on any database Django supports: no
``INSERT ... ON CONFLICT`` per vendor. ``update_or_create`` would not do: it
reads, adds in Python and writes back, so two processes flushing the same
hour at once would lose one's counts.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from datetime import timezone as dt_timezone
from typing import TypeVar

from django.db import (
    DatabaseError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    connections,
    transaction,
)
from django.db.models import F, QuerySet
from django.utils import timezone

from ..django.models import AlertRecord, UsageCount
from ..django.store import _UNCONVERTIBLE, DjangoKeyStore, _to_db
from ..errors import KeyStoreError
from ..stores.base import utcnow
from .records import Alert, UsageRow
from .tables import (
    _STATUS_TRIES,
    ALERTS_KEPT,
    _hours,
    alert_of,
    bad_row,
    held,
    period_of,
    summed,
    upper_bound,
    usage_row,
)

_COUNTS = ("allowed", "denied", "rate_limited", "units")
T = TypeVar("T")


def _aware(table: str) -> Callable[[object], datetime]:
    def read(value: object) -> datetime:
        # With USE_TZ = False the database holds naive datetimes in TIME_ZONE, as
        # the store writes them (its _to_db); made aware the same way back.
        if not isinstance(value, datetime):
            raise bad_row(table, "a time that is not one")
        aware = value if timezone.is_aware(value) else timezone.make_aware(value)
        return aware.astimezone(dt_timezone.utc)

    return read


_USAGE = UsageCount._meta.db_table
_usage_time = _aware(_USAGE)
_alert_time = _aware(AlertRecord._meta.db_table)


def _read(table: str, query: Callable[[], list[T]]) -> list[T]:
    """``query()``, a value Django cannot convert (a text in a time column on SQLite,
    ``'infinity'`` on PostgreSQL) made a KeyStoreError naming the table. Inside the
    store's ``_db()``, which would call a DataError an error of the store."""
    try:
        return query()
    except _UNCONVERTIBLE:
        raise bad_row(table, "a column holds what Django cannot read") from None


class DjangoUsageTable:
    def __init__(self, store: DjangoKeyStore) -> None:
        self._store_ref = weakref.ref(store)

    @property
    def _store(self) -> DjangoKeyStore:
        return held(self._store_ref)

    @property
    def _using(self) -> str:
        return self._store.using

    def _usage(self) -> QuerySet[UsageCount]:
        return UsageCount.objects.using(self._using)

    def _alerts(self) -> QuerySet[AlertRecord]:
        return AlertRecord.objects.using(self._using)

    @contextmanager
    def _db(self) -> Iterator[None]:
        """The store's error translation, with the hint a missing table needs."""
        try:
            with self._store._db():
                yield
        except KeyStoreError as exc:
            text = str(exc)
            # SQLite: "no such table", PostgreSQL: "does not exist", MySQL: "doesn't exist".
            missing = any(m in text for m in ("no such table", "does not exist", "doesn't exist"))
            named = any(t in text for t in (UsageCount._meta.db_table, AlertRecord._meta.db_table))
            if missing and named and "migrate" not in text:
                raise type(exc)(f'{text} (has "manage.py migrate" run?)') from exc
            raise

    @contextmanager
    def _once(self) -> Iterator[None]:
        """``transaction.atomic()``, applied once or not at all as far as can be known.

        The usage counter adds what a failed write held to its next one, so a
        write that committed but reported an error (the answer to COMMIT lost
        with the connection) would count twice. PostgreSQL can say what became
        of the transaction (``txid_status``, as the psycopg table asks); other
        databases are local files (SQLite) or say nothing, and their error stands.
        """
        connection = connections[self._using]
        outermost = not connection.in_atomic_block  # else the caller's COMMIT decides
        txid: int | None = None
        committing = False
        try:
            with transaction.atomic(using=self._using):
                if outermost and connection.vendor == "postgresql":
                    with connection.cursor() as cursor:
                        cursor.execute("SELECT txid_current()")
                        (txid,) = cursor.fetchone()
                yield
                committing = True
        except (OperationalError, InterfaceError):
            if committing and txid is not None and self._committed(txid):
                return
            raise

    def _committed(self, txid: int) -> bool:
        """Whether transaction ``txid`` committed; False when it did not or cannot be told."""
        self._store._drop_broken_connection()  # so the question goes on a fresh one
        for _ in range(_STATUS_TRIES):
            try:
                with connections[self._using].cursor() as cursor:
                    cursor.execute("SELECT txid_status(%s)", [txid])
                    found = cursor.fetchone()
            except DatabaseError:
                self._store._drop_broken_connection()
                return False  # the database is gone again: the error stands
            status = None if found is None else found[0]
            if status != "in progress":  # else its backend is still ending it: ask again
                return bool(status == "committed")
            time.sleep(0.05)
        return False

    def _add_into(self, span: str, row: UsageRow) -> None:
        """Add ``row``'s counts to its row of ``span``, made if missing (inside a transaction).

        Update first: the common case (the hour exists) is one statement. A
        create that loses to a concurrent one (IntegrityError on the unique
        constraint) is rolled back to its savepoint and becomes the update,
        which now sees the winner's row.
        """
        rows = self._usage().filter(
            client_id=row.client_id,
            key_id=row.key_id or "",
            span=span,
            period_start=_to_db(row.period_start),
        )
        increments = {name: F(name) + getattr(row, name) for name in _COUNTS}
        if rows.update(**increments):
            return
        try:
            with transaction.atomic(using=self._using):  # a savepoint
                self._usage().create(
                    client_id=row.client_id,
                    key_id=row.key_id or "",
                    span=span,
                    period_start=_to_db(row.period_start),
                    **{name: getattr(row, name) for name in _COUNTS},
                )
        except IntegrityError:
            if not rows.update(**increments):
                raise

    def add(self, rows: Sequence[UsageRow]) -> None:
        hours = _hours(rows)  # sorted: processes take the rows' locks in one order
        if not hours:
            return
        with self._db(), self._once():
            for row in hours:
                self._add_into("hour", row)

    def rows(
        self,
        *,
        client_id: str | None,
        key_id: str | None,
        since: datetime | None,
        until: datetime | None,
        granularity: str,
    ) -> list[UsageRow]:
        found = self._usage()
        if client_id is not None:
            found = found.filter(client_id=client_id)
        if key_id is not None:
            found = found.filter(key_id=key_id)
        if since is not None:
            found = found.filter(period_start__gte=_to_db(period_of(since, granularity)))
        if until is not None:
            found = found.filter(period_start__lt=_to_db(upper_bound(until, granularity)))
        # Summed in Python: truncating to days and months in UTC is per vendor
        # (and with USE_TZ = False the column is local time).
        with self._db():
            values = _read(
                _USAGE,
                lambda: list(found.values_list("client_id", "key_id", "period_start", *_COUNTS)),
            )
        table = UsageCount._meta.db_table
        read = [
            usage_row(client, key, _usage_time(start), counts, table=table)
            for client, key, start, *counts in values
        ]
        return summed(read, granularity)

    def roll_up(self, before: datetime) -> None:
        with self._db(), self._once():
            old = self._usage().filter(span="hour", period_start__lt=_to_db(before))
            if connections[self._using].features.has_select_for_update:
                old = old.select_for_update()  # a second roll-up waits, then finds them gone
            else:
                # SQLite: a write first takes the database's write lock for the
                # whole transaction (a read first could not be upgraded).
                old.update(allowed=F("allowed"))
            moved = _read(
                _USAGE,
                lambda: list(
                    old.values_list("id", "client_id", "key_id", "period_start", *_COUNTS)
                ),
            )
            picked = [
                usage_row(client, key, _usage_time(start), counts, table=_USAGE)
                for _, client, key, start, *counts in moved
            ]
            for row in summed(picked, "day"):
                self._add_into("day", row)
            # By id: exactly the rows added into days, none flushed in meanwhile.
            self._usage().filter(id__in=[values[0] for values in moved]).delete()

    def add_alerts(self, alerts: Sequence[Alert]) -> None:
        if not alerts:
            return
        with self._db(), self._once():
            self._alerts().bulk_create(
                [
                    AlertRecord(
                        fired_at=_to_db(alert.fired_at or utcnow()),
                        kind=alert.kind,
                        subject=alert.subject,
                        count=alert.count,
                        window_seconds=alert.window_seconds,
                        detail=alert.detail,
                    )
                    for alert in alerts
                ]
            )
            # The ids first: not every database deletes through a sliced
            # subquery (MySQL refuses LIMIT in one). Few: one insert's worth.
            older = list(
                self._alerts()
                .order_by("-fired_at", "-id")
                .values_list("id", flat=True)[ALERTS_KEPT:]
            )
            if older:
                self._alerts().filter(id__in=older).delete()

    def alerts(self, *, since: datetime | None, limit: int) -> list[Alert]:
        found = self._alerts().order_by("-fired_at", "-id")
        if since is not None:
            found = found.filter(fired_at__gte=_to_db(since))
        columns = ("fired_at", "kind", "subject", "count", "window_seconds", "detail")
        with self._db():
            values = _read(
                AlertRecord._meta.db_table,
                lambda: list(found.values_list(*columns)[: max(limit, 0)]),
            )
        return [
            alert_of(row, times=_alert_time, table=AlertRecord._meta.db_table) for row in values
        ]
