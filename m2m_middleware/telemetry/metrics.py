"""Prometheus metrics (extra ``metrics``): counters, a histogram and health gauges.

(Skeleton: filled in by the metrics work; the interface is fixed.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..outcome import Allowed, Denied, Served
from ..request_view import RequestView

if TYPE_CHECKING:
    from ..engine import Engine


class Metrics:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        assert engine.settings.metrics_path is not None
        self.path: str = engine.settings.metrics_path

    def observe(self, outcome: Allowed | Denied, seconds: float) -> None:
        """One decision; ``seconds`` the engine's own time on it."""

    def refused(self, denied: Denied) -> None:
        """An admitted request that the application refused (``require_scopes``)."""

    def serve(self, view: RequestView) -> Served:
        """The answer at ``metrics_path``."""
        return Served(404, [], b"")
