"""Knowing what clients do: usage for billing, Prometheus metrics, alerts.

The engine hands every decision to :meth:`Telemetry.observe`, built once
from the settings to do only what is on: with usage and alerts on (the
defaults), a request costs one count under a lock and the alert rules' O(1)
bookkeeping; metrics add their counters and the engine's timing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from ..outcome import Allowed, Denied
from ..syntax import log_safe
from .records import Alert, UsageRow
from .tables import keeps_usage
from .usage import ALLOWED, DENIED, RATE_LIMITED, UsageCounter

if TYPE_CHECKING:
    from ..engine import Engine
    from .alerts import Alerts
    from .metrics import Metrics

#: One WARNING record per alert (CONTRACT.md "Metrics and alerts").
alerts_logger = logging.getLogger("m2m_middleware.alerts")
logger = logging.getLogger("m2m_middleware")


class Telemetry:
    def __init__(
        self,
        engine: Engine,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        settings = engine.settings
        self._clock = clock
        self._callbacks = settings.alert_callbacks
        #: Counts usage and writes it, and the alerts fired, to the key store's database.
        self.usage: UsageCounter | None = None
        self.alerts: Alerts | None = None
        self.metrics: Metrics | None = None
        self._count_usage = settings.usage
        if (settings.usage or settings.alerts) and keeps_usage(engine.store):
            self.usage = UsageCounter(
                engine.store,
                flush_interval=settings.usage_flush_interval,
                retention_days=settings.usage_retention_days,
                clock=clock,
            )
        elif settings.usage:
            # A key store of the user's own: usage is on by default, and an app that
            # ran on such a store before must keep starting. Said once, at start.
            logger.warning(
                "key_store: %s keeps no usage counts (they are kept by memory://, sqlite://, "
                "postgresql:// and django:// stores), so none are counted and alerts are not "
                "kept for the dashboard; set usage=False to say that is meant",
                type(engine.store).__name__,
            )
        if settings.alerts:
            from .alerts import Alerts

            self.alerts = Alerts(settings, self.fire, clock=monotonic)
        if settings.metrics_path is not None:
            from .metrics import Metrics

            self.metrics = Metrics(engine)

    @property
    def timed(self) -> bool:
        """Whether :meth:`observe` wants the engine's time (a perf_counter() start)."""
        return self.metrics is not None

    def observe(self, outcome: Allowed | Denied, address: str | None, seconds: float) -> None:
        """One decision of the engine. Never raises."""
        client = outcome.client
        usage = self.usage
        if client is not None and usage is not None and self._count_usage:
            if outcome.allowed:
                usage.count(client, ALLOWED, outcome.cost)  # type: ignore[union-attr]
            elif outcome.error == "rate_limited":  # type: ignore[union-attr]
                usage.count(client, RATE_LIMITED)
            else:
                usage.count(client, DENIED)
        alerts = self.alerts
        if alerts is not None:
            alerts.observe(outcome, address)
        metrics = self.metrics
        if metrics is not None:
            metrics.observe(outcome, seconds)

    def refused(self, denied: Denied) -> None:
        """An admitted request that the application then refused (``require_scopes``):
        counted as denied, not allowed."""
        client = denied.client
        if client is not None and self.usage is not None and self._count_usage:
            self.usage.move(client, ALLOWED, DENIED)
        if self.alerts is not None:
            self.alerts.refused(denied)
        if self.metrics is not None:
            self.metrics.refused(denied)

    def fire(self, alert: Alert) -> None:
        """Report an alert: a WARNING on ``m2m_middleware.alerts``, each ``on_alert``
        callable, and the store (for the dashboard). Never raises."""
        if alert.fired_at is None:
            from dataclasses import replace

            alert = replace(alert, fired_at=datetime.fromtimestamp(self._clock(), timezone.utc))
        subject = log_safe(alert.subject)
        # The detail is the line's free text after the fields: it must stay on one
        # line, and its spaces may stay spaces (each word escaped as a field would be).
        detail = " ".join(log_safe(word) for word in alert.detail.split(" "))
        alerts_logger.warning(
            "alert %s subject=%s count=%d window=%ds: %s",
            alert.kind,
            subject,
            alert.count,
            alert.window_seconds,
            detail,
            extra={
                "m2m_alert": alert.kind,
                "m2m_subject": subject,
                "m2m_count": alert.count,
                "m2m_window_seconds": alert.window_seconds,
                "m2m_detail": detail,
            },
        )
        for callback in self._callbacks:
            try:
                callback(alert)
            except Exception:
                logger.exception("on_alert callable %r raised; the request goes on", callback)
        if self.usage is not None:
            self.usage.queue_alert(alert)

    def flush(self) -> None:
        if self.usage is not None:
            self.usage.flush()

    def close(self) -> None:
        if self.usage is not None:
            self.usage.close()


__all__ = ["Alert", "Telemetry", "UsageRow"]
