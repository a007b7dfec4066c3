"""Helpers shared by the core tests (imported by name: tests/core is on sys.path)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from m2m_middleware import Allowed, Denied, Engine, KeyStore, Settings


def sqlite_url(path: Path) -> str:
    """``sqlite:////abs/path.db``: three slashes of scheme plus the absolute path's own."""
    return "sqlite:///" + str(path)


def make_engine(store: KeyStore, **fields: Any) -> Engine:
    fields.setdefault("rate_limit_storage", "memory://")
    return Engine(Settings(key_store=store, **fields))


def header(outcome: Allowed | Denied, name: str) -> str | None:
    """The one value of header ``name`` (case-insensitive), or None."""
    values = [v for k, v in outcome.headers if k.lower() == name.lower()]
    assert len(values) <= 1, f"{name} sent {len(values)} times: {values}"
    return values[0] if values else None


class FakeClock:
    """Stands in for the ``time`` module inside the engine: frozen until advanced.

    Frozen, so a slow machine cannot let a short TTL run out between two calls.
    """

    def __init__(self) -> None:
        self.wall = time.time()
        self.mono = time.monotonic()

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds

    def monotonic(self) -> float:
        return self.mono

    def time(self) -> float:
        return self.wall
