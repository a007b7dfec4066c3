"""Usage per client, key and hour, counted in process and added to the store's database.

A request costs one dictionary lookup and a few integer additions under a
lock (the counts must be exact under threaded servers: ``row[0] += 1`` is
not atomic across threads). A background thread writes the counts every
``usage_flush_interval`` seconds with additive upserts, so any number of
processes sum exactly, and :meth:`UsageCounter.flush` writes them at once
(at exit too). Counts that cannot be written (the database is down) are kept
and added to the next attempt, so an outage loses nothing; a crash loses at
most one interval's counts.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from ..client import Client
from ..redaction import redact
from ..stores.base import KeyStore
from .records import Alert, UsageRow
from .tables import usage_table_for

logger = logging.getLogger("m2m_middleware")

#: Index of each count in a pending row (a list, so it can be added to in place).
ALLOWED, DENIED, RATE_LIMITED, UNITS = 0, 1, 2, 3

_Bucket = tuple[str, "str | None", int]  # client id, key id, hour (Unix seconds // 3600)


class UsageCounter:
    def __init__(
        self,
        store: KeyStore,
        *,
        flush_interval: float,
        retention_days: int,
        clock: Callable[[], float] = time.time,
        background: bool = True,
    ) -> None:
        self.store = store
        self.table = usage_table_for(store)  # a ConfigError now for a store that keeps none
        self.flush_interval = flush_interval
        self.retention = timedelta(days=retention_days)
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: dict[_Bucket, list[int]] = {}
        self._alerts: list[Alert] = []
        #: Serialises flushes: the thread's, an explicit one and the one at exit.
        self._flushing = threading.Lock()
        self._background = background
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._closed = False
        self._failing = False
        self._last_roll_up = -1  # the hour of the last roll-up of old hourly rows
        _live.add(self)

    # -- the request path ----------------------------------------------------

    def count(self, client: Client, which: int, units: int = 0) -> None:
        """Add one request of ``client`` to the count ``which`` (ALLOWED, DENIED,
        RATE_LIMITED), and ``units`` cost units charged."""
        bucket = (client.client_id, client.key_id, int(self._clock()) // 3600)
        with self._lock:
            row = self._pending.get(bucket)
            if row is None:
                row = self._pending[bucket] = [0, 0, 0, 0]
                if self._thread is None and self._background and not self._closed:
                    self._start()
            row[which] += 1
            row[UNITS] += units

    def move(self, client: Client, source: int, target: int) -> None:
        """Count one request of ``client`` under ``target`` instead of ``source``: an
        admitted request the application then refused (``require_scopes``)."""
        bucket = (client.client_id, client.key_id, int(self._clock()) // 3600)
        with self._lock:
            row = self._pending.get(bucket)
            if row is None:
                row = self._pending[bucket] = [0, 0, 0, 0]
            row[source] -= 1
            row[target] += 1

    def queue_alert(self, alert: Alert) -> None:
        """Keep an alert for the store (the dashboard's "recent alerts"), written
        with the next flush."""
        with self._lock:
            self._alerts.append(alert)
            if self._thread is None and self._background and not self._closed:
                self._start()

    # -- writing -------------------------------------------------------------

    def flush(self) -> None:
        """Write the pending counts now. Raises the store's error when it cannot
        (the counts are kept for the next attempt)."""
        with self._flushing:
            with self._lock:
                pending, self._pending = self._pending, {}
                alerts, self._alerts = self._alerts, []
            if alerts:
                try:
                    self.table.add_alerts(alerts)
                except BaseException:
                    with self._lock:
                        self._alerts[:0] = alerts
                    self._keep(pending)
                    raise
            if pending:
                rows = [
                    UsageRow(
                        client_id=client_id,
                        key_id=key_id,
                        period_start=datetime.fromtimestamp(hour * 3600, timezone.utc),
                        allowed=counts[ALLOWED],
                        denied=counts[DENIED],
                        rate_limited=counts[RATE_LIMITED],
                        units=counts[UNITS],
                    )
                    for (client_id, key_id, hour), counts in pending.items()
                    if any(counts)
                ]
                try:
                    if rows:
                        self.table.add(rows)
                except BaseException:
                    self._keep(pending)
                    raise
            self._roll_up()

    def _keep(self, pending: dict[_Bucket, list[int]]) -> None:
        with self._lock:
            for bucket, counts in pending.items():
                row = self._pending.setdefault(bucket, [0, 0, 0, 0])
                for index, value in enumerate(counts):
                    row[index] += value

    def _roll_up(self) -> None:
        """Once an hour: hourly rows older than the retention become daily rows."""
        hour = int(self._clock()) // 3600
        if hour == self._last_roll_up:
            return
        self._last_roll_up = hour
        now = datetime.fromtimestamp(hour * 3600, timezone.utc)
        cutoff = (now - self.retention).replace(hour=0)
        self.table.roll_up(cutoff)

    def flush_quietly(self) -> bool:
        """:meth:`flush`, logging a failure once per outage instead of raising."""
        try:
            self.flush()
        except Exception as exc:
            if not self._failing:
                self._failing = True
                logger.error(
                    "usage counts could not be written (kept for the next attempt): %s: %s",
                    type(exc).__name__,
                    redact(str(exc)),
                )
            return False
        if self._failing:
            self._failing = False
            logger.warning("usage counts written again")
        return True

    def pending(self) -> dict[_Bucket, list[int]]:
        """A copy of the counts not yet written (for tests and the shutdown path)."""
        with self._lock:
            return {bucket: list(counts) for bucket, counts in self._pending.items()}

    def close(self) -> None:
        """Stop the thread and write what is pending (quietly: the process is ending)."""
        self._closed = True
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        self.flush_quietly()

    # -- the thread ----------------------------------------------------------

    def _start(self) -> None:
        ref = weakref.ref(self)
        thread = threading.Thread(
            target=_run, args=(ref, self._wake, self.flush_interval), name="m2m-usage", daemon=True
        )
        self._thread = thread
        thread.start()

    def _forked(self) -> None:
        """In a forked child: the parent's counts are the parent's to write."""
        self._lock = threading.Lock()
        self._flushing = threading.Lock()
        self._pending = {}
        self._alerts = []
        self._thread = None
        self._wake = threading.Event()


def _run(ref: weakref.ref[UsageCounter], wake: threading.Event, interval: float) -> None:
    # Holds the counter weakly between flushes, so an engine dropped without
    # close() is not kept alive by its thread.
    while not wake.wait(interval):
        counter = ref()
        if counter is None or counter._closed:
            return
        counter.flush_quietly()
        del counter


_live: weakref.WeakSet[UsageCounter] = weakref.WeakSet()


def _flush_at_exit() -> None:
    for counter in list(_live):
        if not counter._closed:
            counter.flush_quietly()


def _after_fork() -> None:
    for counter in list(_live):
        counter._forked()


# Registered after the stores' own exit hook (imported above), so it runs before
# it: atexit runs last-registered first, and the store must still be open.
atexit.register(_flush_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)

__all__ = ["ALLOWED", "DENIED", "RATE_LIMITED", "UNITS", "UsageCounter"]
