"""The gunicorn configuration the README's Metrics section gives, as a test runs it."""

from __future__ import annotations

from typing import Any

from prometheus_client import multiprocess


def child_exit(server: Any, worker: Any) -> None:
    # A dead worker's counters stay in the sums; its live gauges must go.
    multiprocess.mark_process_dead(worker.pid)
