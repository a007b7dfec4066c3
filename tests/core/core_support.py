"""Helpers shared by the core tests (imported by name: tests/core is on sys.path)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

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


#: ``python -c TAKE_ALL_USES <store url> <key id>``: connects, prints "ready", waits
#: for a line on stdin, then takes uses of the key until none are left and prints
#: how many it took. Several at once race on one usage-limited key.
TAKE_ALL_USES = """
import sys
from m2m_middleware import open_key_store

store = open_key_store(sys.argv[1])
store.get_key(sys.argv[2])  # connected (schema checked) before the start signal
print("ready", flush=True)
sys.stdin.readline()
taken = 0
while store.take_use(sys.argv[2]) is not None:
    taken += 1
store.close()
print(taken, flush=True)
"""


#: ``python -c ONE_REQUEST_THEN_EXIT <store url> <key>``: one request through an
#: engine, then the process ends without closing anything, as a short job does.
ONE_REQUEST_THEN_EXIT = """
import sys
from m2m_middleware import Engine, Settings

engine = Engine(Settings(key_store=sys.argv[1], rate_limit_storage="memory://"))
print(engine.check("GET", "/", None, sys.argv[2]).allowed, flush=True)
"""


def run_one_request_then_exit(url: str, key: str) -> str:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", ONE_REQUEST_THEN_EXIT, url, key],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


class RoundTrips(list[int]):
    """``[count]``, and ``writes``: the first words of each command written (what a
    failed count shows, so that an extra round trip says what it was)."""

    def __init__(self, items: list[int]) -> None:
        super().__init__(items)
        self.writes: list[str] = []


def _first_words(packed: Any) -> str:
    chunks = packed if isinstance(packed, (list, tuple)) else [packed]
    data = b"".join(c if isinstance(c, bytes) else bytes(c) for c in chunks[:2])
    words = [w for w in data.split(b"\r\n") if w and w[:1] not in (b"*", b"$")]
    return " ".join(w.decode("latin-1") for w in words[:2])


def count_round_trips(monkeypatch: pytest.MonkeyPatch) -> RoundTrips:
    """Counts what redis-py sends to a server, sync and async: one count per write,
    so one per round trip (a pipelined batch is one, as benchmarks/redis_overhead.py
    counts). Only this thread's writes count: the background threads of engines
    other tests left behind (a lease give-back, say) would add theirs at random."""
    import redis.asyncio.connection
    import redis.connection

    sent = RoundTrips([0])
    mine = threading.get_ident()
    for cls in (redis.connection.AbstractConnection, redis.asyncio.connection.AbstractConnection):
        original = cls.send_packed_command

        def counting(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            if threading.get_ident() == mine:
                sent[0] += 1
                sent.writes.append(_first_words(args[0] if args else kwargs.get("command")))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "send_packed_command", counting)
    return sent
