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
import math
import os
import threading
import time
import weakref
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from ..client import Client
from ..errors import KeyStoreError, StoreUnavailable
from ..redaction import redact
from ..stores.base import KeyStore
from ..syntax import log_safe
from .records import Alert, UsageRow
from .tables import ALERTS_KEPT, usage_table_for

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
        #: The process's flushing thread once this counter has something to write.
        self._thread: threading.Thread | None = None
        self._closed = False
        self._failing = False
        self._last_roll_up = -1  # the hour of the last roll-up of old hourly rows
        self._next_flush = math.inf  # monotonic; set when the flushing thread takes it on
        with _live_lock:
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
        hour = int(self._clock()) // 3600
        bucket = (client.client_id, client.key_id, hour)
        with self._lock:
            pending = self._pending
            row = pending.get(bucket)
            if row is None or row[source] <= 0:
                # Admitted in the hour before (the view ran just after the hour
                # changed): move it there, or the period it was admitted in bills it
                # as allowed and the next one shows a negative count. Only while
                # that count is pending: a flush empties both hours at once.
                before = pending.get((client.client_id, client.key_id, hour - 1))
                if before is not None and before[source] > 0:
                    row = before
            if row is None:
                row = pending[bucket] = [0, 0, 0, 0]
            row[source] -= 1
            row[target] += 1

    def queue_alert(self, alert: Alert) -> None:
        """Keep an alert for the store (the dashboard's "recent alerts"), written
        with the next flush."""
        with self._lock:
            alerts = self._alerts
            alerts.append(alert)
            # The table keeps only the newest ALERTS_KEPT: while it cannot be
            # written, an attacker rotating addresses must not grow this list.
            if len(alerts) > ALERTS_KEPT:
                del alerts[: len(alerts) - ALERTS_KEPT]
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
                        del self._alerts[: max(len(self._alerts) - ALERTS_KEPT, 0)]
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
                if rows:
                    try:
                        self.table.add(rows)
                    except StoreUnavailable:
                        self._keep(pending)
                        raise
                    except KeyStoreError:
                        # The database refused the rows themselves, not the connection:
                        # kept, they would fail every flush from now on, and every
                        # client's counts with them. Each row alone, then.
                        self._add_each(rows)
                    except BaseException:
                        self._keep(pending)
                        raise
                    # Only after a write: a process that counted nothing (a
                    # command, a worker that served nothing) touches no table,
                    # not even at exit.
                    self._roll_up()

    def _add_each(self, rows: list[UsageRow]) -> None:
        """Write ``rows`` one by one after the database refused them together: a row it
        refuses alone is dropped and logged (its client id escaped), the others are
        written; an outage on the way keeps what is not written yet, as a flush does."""
        for index, row in enumerate(rows):
            try:
                self.table.add([row])
            except KeyStoreError as exc:
                if isinstance(exc, StoreUnavailable):
                    self._keep({_bucket(r): _counts(r) for r in rows[index:]})
                    raise
                logger.error(
                    "usage of client %s (key %s) for %s was refused by the database and is "
                    "lost: %s",
                    log_safe(row.client_id[:200]),
                    log_safe(row.key_id or "-"),
                    row.period_start.isoformat(),
                    redact(str(exc))[:300],
                )
            except BaseException:
                self._keep({_bucket(r): _counts(r) for r in rows[index:]})
                raise

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
        self.flush_quietly()

    # -- the thread ----------------------------------------------------------

    def _start(self) -> None:
        """Enrol this counter with the process's one flushing thread (started on first use)."""
        self._thread = _flusher()
        self._next_flush = _monotonic() + self.flush_interval

    def _forked(self) -> None:
        """In a forked child: the parent's counts are the parent's to write."""
        self._lock = threading.Lock()
        self._flushing = threading.Lock()
        self._pending = {}
        self._alerts = []
        self._thread = None


def _bucket(row: UsageRow) -> _Bucket:
    return (row.client_id, row.key_id, int(row.period_start.timestamp()) // 3600)


def _counts(row: UsageRow) -> list[int]:
    return [row.allowed, row.denied, row.rate_limited, row.units]


#: One thread per process flushes every counter when its interval is due: a
#: thread per engine would leave hundreds of sleepers in a process that builds
#: many engines (a test suite), each waking on its own.
_FLUSHER_TICK = 0.5
_flusher_thread: threading.Thread | None = None
_flusher_lock = threading.Lock()


def _flusher() -> threading.Thread:
    global _flusher_thread
    with _flusher_lock:
        if _flusher_thread is None or not _flusher_thread.is_alive():
            _flusher_thread = threading.Thread(target=_flush_loop, name="m2m-usage", daemon=True)
            _flusher_thread.start()
        return _flusher_thread


def _monotonic() -> float:
    return time.monotonic()  # looked up per call: a test may replace it


def _flush_loop() -> None:
    while True:
        time.sleep(_FLUSHER_TICK)
        flush_due(_monotonic())


def flush_due(now: float) -> None:
    """Flush every counter whose interval has passed at ``now`` (monotonic seconds):
    the flushing thread's work on each tick."""
    for counter in _live_counters():  # held weakly: a dropped engine's counter goes
        if counter._thread is not None and not counter._closed and counter._next_flush <= now:
            counter._next_flush = now + counter.flush_interval
            counter.flush_quietly()


_live: weakref.WeakSet[UsageCounter] = weakref.WeakSet()
#: Guards _live: a WeakSet copied while another thread adds to it raises
#: "Set changed size during iteration" (seen in the suite: the flushing thread's
#: copy against a request thread's new engine).
_live_lock = threading.Lock()


def _live_counters() -> list[UsageCounter]:
    with _live_lock:
        return list(_live)


def close_counters_of(store: KeyStore) -> None:
    """``store`` is closing: its counters write what they hold now, and nothing after
    (a store is not used once closed; at exit its file may be gone, as the demo's is)."""
    for counter in _live_counters():
        if counter.store is store and not counter._closed:
            counter.close()


def _flush_at_exit() -> None:
    for counter in _live_counters():
        if not counter._closed:
            counter.flush_quietly()


def _after_fork() -> None:
    global _flusher_thread, _flusher_lock, _live_lock
    _flusher_thread = None  # not running in the child: the next count starts one
    _flusher_lock = threading.Lock()  # the parent's may have been held at the fork
    _live_lock = threading.Lock()
    for counter in _live_counters():
        counter._forked()


# Registered after the stores' own exit hook (imported above), so it runs before
# it: atexit runs last-registered first, and the store must still be open.
atexit.register(_flush_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)

__all__ = ["ALLOWED", "DENIED", "RATE_LIMITED", "UNITS", "UsageCounter"]
