"""Fixtures for the framework-free core: stores, engines, a controllable clock."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from core_support import FakeClock, sqlite_url

import m2m_middleware.engine as engine_module
from m2m_middleware import Allowed, Denied, Engine, KeyStore, open_key_store
from m2m_middleware.stores import MemoryKeyStore


def make_store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> KeyStore:
    if kind == "memory":
        return MemoryKeyStore()
    if kind == "postgres":
        # Asked for only here, so the other kinds never need a server.
        return open_key_store(request.getfixturevalue("postgres_url"))
    if kind.startswith("django"):
        # django:// on Django's test database (tests/conftest.py), emptied after
        # each test, or on PostgreSQL in a fresh schema.
        fixture = "django_postgres_key_store" if kind == "django-postgres" else "django_key_store"
        store: KeyStore = request.getfixturevalue(fixture)
        return store
    return open_key_store(sqlite_url(tmp_path / "k.db"))


@pytest.fixture(
    params=[
        "memory",
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
        "django",
        pytest.param("django-postgres", marks=pytest.mark.postgres),
    ]
)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KeyStore]:
    """Each store kind in turn; the SQLite one in a fresh file, the PostgreSQL one
    in a fresh schema, the Django ones in the emptied test database or a fresh
    PostgreSQL schema."""
    the_store = make_store(request.param, tmp_path, request)
    yield the_store
    the_store.close()


@pytest.fixture
def memory_store() -> Iterator[MemoryKeyStore]:
    the_store = MemoryKeyStore()
    yield the_store
    the_store.close()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[KeyStore]:
    the_store = open_key_store(sqlite_url(tmp_path / "k.db"))
    yield the_store
    the_store.close()


Check = Callable[..., "Allowed | Denied"]


@pytest.fixture(params=["sync", "async"])
def check(request: pytest.FixtureRequest) -> Check:
    """``check(engine, method, path, authorization, api_key)`` through either front door."""
    if request.param == "sync":

        def run(engine: Engine, *args: Any) -> Allowed | Denied:
            return engine.check(*args)

    else:

        def run(engine: Engine, *args: Any) -> Allowed | Denied:
            return asyncio.run(engine.acheck(*args))

    return run


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """Replaces the engine's view of time; advance it instead of sleeping."""
    fake = FakeClock()
    monkeypatch.setattr(engine_module, "time", fake.time)
    monkeypatch.setattr(engine_module, "monotonic", fake.monotonic)
    return fake
