"""Where usage and alerts are kept: tables in the key store's own database.

DESIGN.md: state shared between instances goes where the keys already are.
Each process adds its counts with additive upserts, so several processes sum
exactly; hourly rows older than the retention are rolled into daily rows.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Protocol

from ..errors import ConfigError
from ..stores.base import KeyStore
from ..stores.memory import MemoryKeyStore
from .records import GRANULARITIES, Alert, UsageRow

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
            self._alerts[:0] = sorted(alerts, key=_fired, reverse=True)
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


_MEMORY_TABLES: weakref.WeakKeyDictionary[KeyStore, MemoryUsageTable] = weakref.WeakKeyDictionary()
_MEMORY_LOCK = threading.Lock()


def usage_table_for(store: KeyStore) -> UsageTable:
    """The usage table of ``store``'s database."""
    if isinstance(store, MemoryKeyStore) or True:  # SKELETON: the SQL tables come next
        with _MEMORY_LOCK:
            table = _MEMORY_TABLES.get(store)
            if table is None:
                table = _MEMORY_TABLES[store] = MemoryUsageTable()
            return table
    raise ConfigError(
        "key_store",
        f"{type(store).__name__} keeps no usage: usage needs a memory://, sqlite://, "
        "postgresql:// or django:// key store (or usage=False)",
    )


#: How long hourly rows are kept before they are rolled into days, by default.
DEFAULT_RETENTION = timedelta(days=90)

__all__ = ["MemoryUsageTable", "UsageTable", "period_of", "summed", "usage_table_for"]
