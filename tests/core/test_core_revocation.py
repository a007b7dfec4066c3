"""Revocations made in another process, with no Redis: never later than promised.

SQLite: a revoke or rotate writes a change-log row in its own transaction, and
the engine polls ``PRAGMA data_version`` at most every 0.1 s on the request
path. PostgreSQL: the write sends a ``NOTIFY`` that a listener thread hears.
Either way the store is named by an id kept in the database, so no spelling of
its URL (a symlink, another mount of the volume, another host name for the same
server) makes a cache miss a notice. The other process is the real ``m2m``
command.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import servers
from core_support import FakeClock, make_engine, sqlite_url

from m2m_middleware import Allowed, Denied, Engine, KeyStore, open_key_store
from m2m_middleware.stores import SQLiteKeyStore
from m2m_middleware.stores.base import notify_local, subscribe_invalidations

Check = Callable[..., "Allowed | Denied"]

CLI = (sys.executable, "-m", "m2m_middleware", "keys")
#: An hour of caching: only the store's own notices can make these tests pass.
AN_HOUR = 3600


def m2m_keys(*args: str) -> str:
    """Run ``m2m keys ...`` in another process, as an operator would; its output."""
    env = {k: v for k, v in os.environ.items() if k != "M2M_INVALIDATION_URL"}
    result = subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=60, check=False, env=env
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def wait_until(condition: Callable[[], bool], timeout: float) -> float:
    """Seconds until ``condition()`` held; fails after ``timeout``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s")
        time.sleep(0.005)
    return time.monotonic() - started


def engine_for(store: KeyStore, **fields: Any) -> Engine:
    fields.setdefault("key_cache_ttl", AN_HOUR)
    fields.setdefault("default_limits", "100000/minute")
    fields.setdefault("invalidation_url", "")  # no Redis anywhere
    return make_engine(store, **fields)


def next_poll(clock: FakeClock, seconds: float = 0.1) -> None:
    """Move the engine's frozen clocks past the poll interval, and its wall clock
    past the real time the other process stamped its revocation with."""
    clock.wall = max(clock.wall, time.time())
    clock.advance(seconds)


def refused(check: Check, engine: Engine, key: str) -> bool:
    outcome = check(engine, "GET", "/", None, key)
    return isinstance(outcome, Denied) and outcome.error == "invalid_token"


class CountingLookups:
    """Counts ``find_by_hash`` calls: how often the cache was not enough."""

    def __init__(self, store: KeyStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        original = store.find_by_hash

        def counting(key_hash: str) -> Any:
            self.calls += 1
            return original(key_hash)

        monkeypatch.setattr(store, "find_by_hash", counting)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "keys.db"


@pytest.fixture
def sqlite_store(db: Path) -> Iterator[KeyStore]:
    store = open_key_store(sqlite_url(db))
    yield store
    store.close()


# -- SQLite, another process, no Redis ------------------------------------------------------


def test_a_cli_revocation_is_refused_within_a_poll_interval(
    sqlite_store: KeyStore, db: Path, check: Check
) -> None:
    issued = sqlite_store.create_key("billing")
    engine = engine_for(sqlite_store)
    assert engine.bus is None
    assert check(engine, "GET", "/", None, issued.key).allowed
    m2m_keys("revoke", issued.key_id, "--store", sqlite_url(db))
    # The revocation has committed: from now on, at most one poll interval
    # (0.1 s; test_the_first_request_after_the_poll_interval_is_refused pins
    # that exactly) of requests may still pass, not an hour.
    wait_until(lambda: refused(check, engine, issued.key), timeout=1.0)


def test_the_first_request_after_the_poll_interval_is_refused(
    sqlite_store: KeyStore, db: Path, check: Check, clock: FakeClock
) -> None:
    issued = sqlite_store.create_key("billing")
    engine = engine_for(sqlite_store)
    assert check(engine, "GET", "/", None, issued.key).allowed
    m2m_keys("revoke", issued.key_id, "--store", sqlite_url(db))
    next_poll(clock, sqlite_store.change_poll_interval or 0)
    assert refused(check, engine, issued.key)


def test_a_rotation_elsewhere_ends_the_old_key_on_its_new_terms(
    sqlite_store: KeyStore, db: Path, check: Check, clock: FakeClock
) -> None:
    now_ended = sqlite_store.create_key("billing")
    with_grace = sqlite_store.create_key("billing")
    engine = engine_for(sqlite_store)
    for key in (now_ended.key, with_grace.key):
        assert check(engine, "GET", "/", None, key).allowed
    m2m_keys("rotate", now_ended.key_id, "--store", sqlite_url(db))
    m2m_keys("rotate", with_grace.key_id, "--grace", "10m", "--store", sqlite_url(db))
    next_poll(clock)
    assert refused(check, engine, now_ended.key)
    assert check(engine, "GET", "/", None, with_grace.key).allowed  # its grace period
    clock.advance(601)  # past the grace period, within the hour of caching
    assert refused(check, engine, with_grace.key)


def test_other_writes_elsewhere_drop_nothing_and_a_revocation_only_its_key(
    sqlite_store: KeyStore,
    db: Path,
    check: Check,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # take_use, last_used_at and new keys in other processes move data_version
    # too: a poll that then read nothing must keep the cache as it is.
    kept = sqlite_store.create_key("billing")
    limited = sqlite_store.create_key("billing", max_uses=5)
    gone = sqlite_store.create_key("billing")
    engine = engine_for(sqlite_store)
    for key in (kept.key, gone.key):
        assert check(engine, "GET", "/", None, key).allowed
    lookups = CountingLookups(sqlite_store, monkeypatch)
    other = open_key_store(sqlite_url(db))
    try:
        assert other.take_use(limited.key_id) == 4
        other.mark_used(kept.key_id)
        other.flush_last_used()
    finally:
        other.close()
    m2m_keys("create", "--client", "someone-else", "--store", sqlite_url(db))
    next_poll(clock)
    assert check(engine, "GET", "/", None, kept.key).allowed
    assert check(engine, "GET", "/", None, gone.key).allowed
    assert lookups.calls == 0
    m2m_keys("revoke", gone.key_id, "--store", sqlite_url(db))
    next_poll(clock)
    assert refused(check, engine, gone.key)
    assert check(engine, "GET", "/", None, kept.key).allowed
    assert lookups.calls == 1  # the revoked key's, read again; the other stayed cached


def test_a_poll_with_nothing_new_is_one_pragma(sqlite_store: KeyStore, db: Path) -> None:
    issued = sqlite_store.create_key("billing")
    engine = engine_for(sqlite_store)
    assert engine.check("GET", "/", None, issued.key).allowed
    sqlite_store.poll_changes()  # the watch connection is open from here on
    assert isinstance(sqlite_store, SQLiteKeyStore) and sqlite_store._watch is not None
    statements: list[str] = []
    sqlite_store._watch.conn.set_trace_callback(statements.append)
    sqlite_store.poll_changes()
    sqlite_store.poll_changes()
    assert statements == ["PRAGMA data_version"] * 2
    m2m_keys("revoke", issued.key_id, "--store", sqlite_url(db))
    sqlite_store.poll_changes()
    assert statements[2] == "PRAGMA data_version"
    assert [s.split()[0] for s in statements[3:]] == ["SELECT"]  # the new rows, once


def test_a_key_is_polled_for_at_most_every_interval(
    sqlite_store: KeyStore, check: Check, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    issued = sqlite_store.create_key("billing")
    engine = engine_for(sqlite_store)
    polls: list[float] = []
    original = sqlite_store.poll_changes
    monkeypatch.setattr(
        sqlite_store, "poll_changes", lambda: (polls.append(clock.mono), original())[1]
    )
    for _ in range(5):
        assert check(engine, "GET", "/", None, issued.key).allowed
    assert len(polls) == 1
    clock.advance(0.05)
    assert check(engine, "GET", "/", None, issued.key).allowed
    assert len(polls) == 1
    # Past the interval (0.1 s) by a margin: 0.05 + 0.05 added to a large
    # monotonic reading can round to just under it, and fail on some machines.
    clock.advance(0.06)
    assert check(engine, "GET", "/", None, issued.key).allowed
    assert len(polls) == 2


def test_a_revocation_made_before_the_first_poll_is_not_missed(
    db: Path, check: Check, clock: FakeClock
) -> None:
    # The poll's starting point is fixed when the store first connects, before
    # it reads any key: a revocation between that read and the first poll is
    # still heard.
    serving = open_key_store(sqlite_url(db))
    try:
        issued = serving.create_key("billing")
        engine = engine_for(serving)
        assert check(engine, "GET", "/", None, issued.key).allowed
        assert isinstance(serving, SQLiteKeyStore)
        serving._watch = None  # as if the first poll had not happened yet
        m2m_keys("revoke", issued.key_id, "--store", sqlite_url(db))
        next_poll(clock)
        assert refused(check, engine, issued.key)
    finally:
        serving.close()


def test_the_change_log_is_pruned_as_it_grows(sqlite_store: KeyStore, db: Path) -> None:
    first, second = sqlite_store.create_key("a"), sqlite_store.create_key("b")
    sqlite_store.revoke_key(first.key_id)
    with closing(sqlite3.connect(db)) as raw:
        raw.execute("UPDATE m2m_key_events SET at = at - 3 * 86400")  # three days old
        raw.commit()
    sqlite_store.revoke_key(second.key_id)
    with closing(sqlite3.connect(db)) as raw:
        rows = raw.execute("SELECT key_id FROM m2m_key_events").fetchall()
    assert rows == [(second.key_id,)]


def test_a_database_of_the_previous_release_gets_its_change_log(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    with closing(sqlite3.connect(db)) as raw:  # the release-1 schema, with a key in it
        raw.executescript(
            """
            CREATE TABLE m2m_api_keys (key_id TEXT PRIMARY KEY, key_hash TEXT NOT NULL UNIQUE,
                client_id TEXT NOT NULL, name TEXT, scopes TEXT NOT NULL DEFAULT '', tier TEXT,
                created_at REAL NOT NULL, expires_at REAL, revoked_at REAL,
                remaining_uses INTEGER, metadata TEXT NOT NULL DEFAULT '{}', last_used_at REAL);
            PRAGMA user_version = 1;
            """
        )
    store = open_key_store(sqlite_url(db))
    try:
        issued = store.create_key("billing")
        engine = engine_for(store)
        assert engine.check("GET", "/", None, issued.key).allowed
        m2m_keys("revoke", issued.key_id, "--store", sqlite_url(db))
        wait_until(lambda: not engine.check("GET", "/", None, issued.key).allowed, 1.0)
    finally:
        store.close()
    with closing(sqlite3.connect(db)) as raw:
        assert raw.execute("PRAGMA user_version").fetchone() == (1,)  # older releases still read it


# -- one store, however its path is spelled ---------------------------------------------------


def test_every_path_to_one_file_is_one_store(
    tmp_path: Path, check: Check, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = tmp_path / "data" / "keys.db"
    real.parent.mkdir()
    (tmp_path / "link").symlink_to(real.parent)
    monkeypatch.chdir(tmp_path)
    serving = open_key_store(sqlite_url(real))
    issued = serving.create_key("billing")
    others = [
        open_key_store(sqlite_url(tmp_path / "link" / "keys.db")),
        open_key_store("sqlite:///data/../link/keys.db"),
        # The same volume mounted elsewhere (another container, a bind mount)
        # is a path no realpath() can relate to this one.
        open_key_store(sqlite_url(real)),
    ]
    others[2].location = "sqlite:///mnt/elsewhere/keys.db"
    try:
        keys = [serving.create_key("billing") for _ in others]
        engine = engine_for(serving)
        engine._next_poll = float("inf")  # no polls: only the in-process notice can tell
        for each in [issued, *keys]:
            assert check(engine, "GET", "/", None, each.key).allowed
        for store, each in zip(others, keys, strict=True):
            store.revoke_key(each.key_id)
            assert refused(check, engine, each.key)
        assert len({store.store_id for store in [serving, *others]} - {None}) == 1
        assert check(engine, "GET", "/", None, issued.key).allowed  # only those keys
    finally:
        for store in others:
            store.close()
        serving.close()


def test_a_notice_under_the_store_id_reaches_caches_under_any_location(
    tmp_path: Path,
) -> None:
    first = open_key_store(sqlite_url(tmp_path / "keys.db"))
    second = open_key_store(sqlite_url(tmp_path / "keys.db"))
    second.location = "sqlite:///mnt/elsewhere/keys.db"
    heard: list[str | None] = []

    def listener(key_id: str | None) -> None:  # held here: the registry keeps a weak ref
        heard.append(key_id)

    try:
        subscribe_invalidations(second.location, listener)
        first.list_keys()
        second.list_keys()  # connects: reads the store id
        assert first.store_id is not None and first.store_id == second.store_id
        notify_local(first.store_id, "key_a")
        notify_local(first.location, "key_b")  # a location reaches the id, so every spelling
        assert heard == ["key_a", "key_b"]
    finally:
        first.close()
        second.close()


# -- PostgreSQL, no Redis ------------------------------------------------------------------


def other_spelling(url: str) -> str:
    """The same server and database, spelled another way: ``localhost`` and no port."""
    parts = urlsplit(url)
    assert parts.hostname == "127.0.0.1" and (parts.port or 5432) == 5432, url
    user = f"{parts.username}@" if parts.username else ""
    return url.replace(parts.netloc, f"{user}localhost", 1)


def pg_listeners(admin_url: str, app: str) -> set[int]:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s "
            "AND query ILIKE 'LISTEN%%' AND pid <> pg_backend_pid()",
            (app,),
        ).fetchall()
    return {row[0] for row in rows}


def with_app_name(url: str, app: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}application_name={app}"


@pytest.mark.postgres
def test_two_spellings_of_one_database_are_one_store_in_one_process(
    postgres_url: str, check: Check
) -> None:
    serving = open_key_store(other_spelling(postgres_url))
    admin = open_key_store(postgres_url)
    try:
        assert serving.location != admin.location
        issued, rotated = serving.create_key("billing"), serving.create_key("billing")
        engine = engine_for(serving)
        for each in (issued, rotated):
            assert check(engine, "GET", "/", None, each.key).allowed
        admin.revoke_key(issued.key_id)
        assert refused(check, engine, issued.key)  # at once, not when NOTIFY arrives
        admin.rotate_key(rotated.key_id)
        assert refused(check, engine, rotated.key)
        assert serving.store_id is not None and serving.store_id == admin.store_id
    finally:
        admin.close()
        serving.close()


@pytest.mark.postgres
@pytest.mark.parametrize("action", ["revoke", "rotate"])
def test_a_cli_revocation_reaches_another_process_within_a_second(
    postgres_url: str, check: Check, action: str
) -> None:
    store = open_key_store(other_spelling(postgres_url))
    try:
        issued = store.create_key("billing")
        engine = engine_for(store)
        assert engine.bus is None
        assert check(engine, "GET", "/", None, issued.key).allowed
        m2m_keys(action, issued.key_id, "--store", postgres_url)  # spelled the other way
        wait_until(lambda: refused(check, engine, issued.key), timeout=1.0)
    finally:
        store.close()


@pytest.mark.postgres
@pytest.mark.slow
def test_the_listener_comes_back_after_its_backend_is_terminated(
    postgres_url: str,
    postgres_base_url: str,
    check: Check,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import psycopg

    caplog.set_level(logging.WARNING, logger="m2m_middleware")
    app = servers.unique("m2m_listener")
    store = open_key_store(with_app_name(postgres_url, app))
    try:
        issued = store.create_key("billing")
        engine = engine_for(store)
        assert check(engine, "GET", "/", None, issued.key).allowed
        killed = pg_listeners(postgres_base_url, app)
        assert len(killed) == 1
        with psycopg.connect(postgres_base_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (killed.pop(),))
        # Revoked while nobody listens: that NOTIFY is lost; the listener's
        # catch-up when it is back must make up for it.
        m2m_keys("revoke", issued.key_id, "--store", postgres_url)
        wait_until(lambda: refused(check, engine, issued.key), timeout=5.0)
        wait_until(lambda: bool(pg_listeners(postgres_base_url, app)), timeout=5.0)
        later = store.create_key("billing")
        assert check(engine, "GET", "/", None, later.key).allowed
        m2m_keys("revoke", later.key_id, "--store", postgres_url)
        wait_until(lambda: refused(check, engine, later.key), timeout=1.0)
    finally:
        store.close()
    records = [r for r in caplog.records if "key-invalidation channel" in r.getMessage()]
    assert [r.levelno for r in records] == [logging.ERROR]
    assert records[0].getMessage().startswith("lost the PostgreSQL key-invalidation channel")
    again = [r for r in caplog.records if "key invalidations on PostgreSQL" in r.getMessage()]
    assert [r.levelno for r in again] == [logging.WARNING]


@pytest.mark.postgres
@pytest.mark.slow
def test_an_engine_started_while_the_database_is_down_listens_once_it_is_up(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    from test_core_postgres import Proxy

    caplog.set_level(logging.WARNING, logger="m2m_middleware")
    parts = urlsplit(postgres_url)
    proxy = Proxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    netloc = f"{parts.username or 'postgres'}@127.0.0.1:{proxy.port}"
    store = open_key_store(postgres_url.replace(parts.netloc, netloc, 1), timeout=1.0)
    started = time.monotonic()
    engine = engine_for(store)  # the database is down: no error, no wait
    assert time.monotonic() - started < 0.5
    try:
        issued = open_key_store(postgres_url).create_key("billing")
        outcome = engine.check("GET", "/", None, issued.key)
        assert isinstance(outcome, Denied) and outcome.status == 503
        proxy.start()
        wait_until(lambda: engine.check("GET", "/", None, issued.key).allowed, timeout=15)
        m2m_keys("revoke", issued.key_id, "--store", postgres_url)  # a third spelling
        wait_until(lambda: not engine.check("GET", "/", None, issued.key).allowed, timeout=5)
    finally:
        store.close()
        proxy.stop()
    lost = [r for r in caplog.records if "key-invalidation channel" in r.getMessage()]
    assert len(lost) == 1  # one outage, however many attempts it took
    again = [r for r in caplog.records if "key invalidations on PostgreSQL" in r.getMessage()]
    assert len(again) == 1


@pytest.mark.postgres
@pytest.mark.slow
def test_closing_the_store_stops_its_listener(postgres_url: str, postgres_base_url: str) -> None:
    app = servers.unique("m2m_listener")
    store = open_key_store(with_app_name(postgres_url, app))
    engine = engine_for(store)
    issued = store.create_key("billing")
    assert engine.check("GET", "/", None, issued.key).allowed
    threads = [t for t in threading.enumerate() if t.name == "m2m-postgres-invalidation-listener"]
    assert threads and all(t.daemon for t in threads)  # never keeps the interpreter alive
    assert pg_listeners(postgres_base_url, app)
    engine.close()
    wait_until(lambda: not pg_listeners(postgres_base_url, app), timeout=5.0)


@pytest.mark.postgres
@pytest.mark.slow
def test_two_stores_share_one_listener_until_the_last_closes(
    postgres_url: str, postgres_base_url: str
) -> None:
    app = servers.unique("m2m_listener")
    url = with_app_name(postgres_url, app)
    first, second = open_key_store(url), open_key_store(url)
    issued = first.create_key("billing")
    engines = [engine_for(first), engine_for(second)]
    for engine in engines:
        assert engine.check("GET", "/", None, issued.key).allowed
    assert len(pg_listeners(postgres_base_url, app)) == 1
    first.close()
    m2m_keys("revoke", issued.key_id, "--store", postgres_url)
    wait_until(lambda: not engines[1].check("GET", "/", None, issued.key).allowed, 1.0)
    second.close()
    wait_until(lambda: not pg_listeners(postgres_base_url, app), timeout=5.0)


#: ``python -c FORKED <store url>``: an engine made before fork() (gunicorn
#: --preload); the child must hear a revocation made by the parent's process
#: tree elsewhere, through a listener of its own.
FORKED = """
import os, subprocess, sys, time
from m2m_middleware import Engine, Settings, open_key_store

url = sys.argv[1]
store = open_key_store(url)
issued = store.create_key("billing")
engine = Engine(Settings(key_store=store, key_cache_ttl=3600, invalidation_url=""))
assert engine.check("GET", "/", None, issued.key).allowed
pid = os.fork()
if pid == 0:
    assert engine.check("GET", "/", None, issued.key).allowed
    subprocess.run(
        [sys.executable, "-m", "m2m_middleware", "keys", "revoke", issued.key_id, "--store", url],
        check=True, capture_output=True,
    )
    deadline = time.monotonic() + 5
    while engine.check("GET", "/", None, issued.key).allowed:
        if time.monotonic() > deadline:
            os._exit(1)
        time.sleep(0.01)
    os._exit(0)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status), flush=True)
"""


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_worker_listens_on_its_own(postgres_url: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", FORKED, postgres_url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "child 0", result.stderr


@pytest.mark.postgres
def test_an_app_that_exits_without_closing_its_store_exits(postgres_url: str) -> None:
    script = (
        "import sys\n"
        "from m2m_middleware import Engine, Settings\n"
        "engine = Engine(Settings(key_store=sys.argv[1]))\n"
        "engine.check('GET', '/', None, engine.store.create_key('c').key)\n"
        "print('done', flush=True)\n"
    )
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", script, postgres_url],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0 and result.stdout.strip() == "done", result.stderr
    assert time.monotonic() - started < 10
