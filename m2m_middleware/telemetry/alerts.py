"""Alerts on unusual activity: each rule O(1) per request, once per window per subject.

(Skeleton: the rules are filled in by the alerts work; the interface is fixed.)
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..outcome import Allowed, Denied
from ..settings import Settings
from .records import Alert


class Alerts:
    def __init__(
        self,
        settings: Settings,
        fire: Callable[[Alert], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fire = fire
        self._clock = clock
        self._thresholds = settings.alert_thresholds

    def observe(self, outcome: Allowed | Denied, address: str | None) -> None:
        """One decision of the middleware: ``address`` is the client's, as the trusted
        proxies report it (None when unknown)."""

    def refused(self, denied: Denied) -> None:
        """An admitted request that the application refused (``require_scopes``)."""
