"""What is particular to the PostgreSQL key store (the common behaviour is in
test_core_stores.py, which runs against it too).

Against the machine's PostgreSQL, each test in a schema of its own. Tests that
kill connections give the store a distinctive ``application_name`` and kill only
those, so parallel workers never lose theirs.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from datetime import timezone
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import psycopg
import pytest
import servers
from core_support import TAKE_ALL_USES, run_one_request_then_exit

from m2m_middleware import (
    Allowed,
    ConfigError,
    Denied,
    Engine,
    KeyStoreError,
    Settings,
    StoreUnavailable,
    open_key_store,
)
from m2m_middleware.keys import hash_key
from m2m_middleware.stores import KeyStore, MemoryKeyStore, PostgresKeyStore
from m2m_middleware.stores.postgres import SCHEMA_VERSION

pytestmark = pytest.mark.postgres


def with_app_name(url: str, app: str) -> str:
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}application_name={app}"


def connections_of(admin: psycopg.Connection[Any], app: str) -> set[int]:
    rows = admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid() AND application_name = %s",
        (app,),
    ).fetchall()
    return {row[0] for row in rows}


def kill_connections(base_url: str, app: str) -> set[int]:
    """Terminate every connection named ``app``, as a failover or an admin would,
    and wait until the server has let them all go."""
    with psycopg.connect(base_url, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND application_name = %s",
            (app,),
        ).fetchall()
        killed = {pid for pid, _ in rows}
        deadline = time.monotonic() + 10
        while connections_of(admin, app) & killed:
            assert time.monotonic() < deadline, "terminated backends did not exit"
            time.sleep(0.01)
    return killed


def table_exists(url: str, name: str) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT to_regclass(%s)", (name,)).fetchone()
    return row is not None and row[0] is not None


@pytest.fixture
def app_name() -> str:
    return servers.unique("m2m_store")


@pytest.fixture
def pg_store(postgres_url: str, app_name: str) -> Iterator[KeyStore]:
    """A store whose connections carry ``app_name``, so a test can find and kill them."""
    store = open_key_store(with_app_name(postgres_url, app_name))
    yield store
    store.close()


def grow_pool(store: KeyStore, key_hash: str, threads: int = 6) -> None:
    """Make the pool hold several connections, as it would under traffic."""
    with ThreadPoolExecutor(threads) as pool:
        assert all(pool.map(lambda _: store.find_by_hash(key_hash), range(threads * 5)))


# -- opening and the schema -----------------------------------------------------------


def test_opening_connects_to_nothing(
    postgres_url: str, postgres_base_url: str, app_name: str
) -> None:
    store = open_key_store(with_app_name(postgres_url, app_name))
    try:
        assert isinstance(store, PostgresKeyStore)
        assert store.blocking
        with psycopg.connect(postgres_base_url, autocommit=True) as admin:
            assert connections_of(admin, app_name) == set()
        assert not table_exists(postgres_url, "m2m_api_keys")
    finally:
        store.close()  # never used: nothing to flush, no pool to close


def test_postgres_scheme_is_an_alias(postgres_url: str) -> None:
    alias = "postgres://" + postgres_url.partition("://")[2]
    first, second = open_key_store(postgres_url), open_key_store(alias)
    try:
        issued = first.create_key("client-a")
        assert second.get_key(issued.key_id) == issued.record
        assert first.location == second.location
    finally:
        first.close()
        second.close()


def test_the_schema_is_made_on_first_use_with_proper_types(postgres_url: str) -> None:
    store = open_key_store(postgres_url)
    try:
        assert not table_exists(postgres_url, "m2m_api_keys")
        store.list_keys()
        assert table_exists(postgres_url, "m2m_api_keys")
    finally:
        store.close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        types = dict(
            conn.execute(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = 'm2m_api_keys'"
            ).fetchall()
        )
        indexes = [
            row[0]
            for row in conn.execute(
                "SELECT indexdef FROM pg_indexes "
                "WHERE schemaname = current_schema() AND tablename = 'm2m_api_keys'"
            )
        ]
        versions = conn.execute("SELECT version FROM m2m_schema_version").fetchall()
    assert types["created_at"] == types["expires_at"] == "timestamp with time zone"
    assert types["revoked_at"] == types["last_used_at"] == "timestamp with time zone"
    assert types["scopes"] == "ARRAY"
    assert types["metadata"] == "jsonb"
    assert types["remaining_uses"] == "integer"
    assert any("UNIQUE INDEX" in d and "(key_hash)" in d for d in indexes), indexes
    assert any("(client_id)" in d for d in indexes), indexes
    assert versions == [(SCHEMA_VERSION,)]


def test_a_second_store_uses_the_existing_schema(postgres_url: str) -> None:
    first = open_key_store(postgres_url)
    issued = first.create_key("client-a", scopes=["x"], metadata={"k": [1, 2]}, max_uses=3)
    first.close()
    second = open_key_store(postgres_url)
    try:
        assert second.get_key(issued.key_id) == issued.record
        assert second.take_use(issued.key_id) == 2
    finally:
        second.close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        assert conn.execute("SELECT version FROM m2m_schema_version").fetchall() == [
            (SCHEMA_VERSION,)
        ]


def test_stores_starting_together_make_the_schema_once(postgres_url: str) -> None:
    stores = [open_key_store(postgres_url) for _ in range(8)]
    barrier = threading.Barrier(len(stores))

    def first_use(store: KeyStore) -> str:
        barrier.wait()
        return store.create_key("client-a").key_id

    try:
        with ThreadPoolExecutor(len(stores)) as pool:
            key_ids = list(pool.map(first_use, stores))
        assert {r.key_id for r in stores[0].list_keys()} == set(key_ids)
    finally:
        for store in stores:
            store.close()


def test_a_newer_schema_is_refused_with_a_clear_error(postgres_url: str) -> None:
    store = open_key_store(postgres_url)
    issued = store.create_key("client-a")
    store.close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("UPDATE m2m_schema_version SET version = %s", (SCHEMA_VERSION + 1,))
    newer = open_key_store(postgres_url)
    try:
        for call in (
            lambda: newer.get_key(issued.key_id),
            lambda: newer.find_by_hash(hash_key(issued.key)),
            lambda: newer.create_key("client-b"),
        ):
            with pytest.raises(StoreUnavailable, match="upgrade m2m-middleware") as caught:
                call()
            assert f"schema version {SCHEMA_VERSION + 1}" in str(caught.value)
            assert newer.location in str(caught.value)
    finally:
        newer.close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:  # nothing was touched
        assert conn.execute("SELECT count(*) FROM m2m_api_keys").fetchone() == (1,)


# -- values ------------------------------------------------------------------------------


def test_times_come_back_in_utc_whatever_the_session_time_zone(postgres_url: str) -> None:
    tokyo = postgres_url + "%20-cTimeZone%3DAsia%2FTokyo"
    store = open_key_store(tokyo)
    try:
        issued = store.create_key("client-a")
        store.revoke_key(issued.key_id)
        record = store.get_key(issued.key_id)
        assert record.created_at == issued.record.created_at
        for value in (record.created_at, record.revoked_at):
            assert value is not None
            assert value.tzinfo == timezone.utc
        assert record.to_dict()["created_at"].endswith("+00:00")
    finally:
        store.close()


def test_what_the_columns_cannot_hold_is_refused_not_an_outage(pg_store: KeyStore) -> None:
    with pytest.raises(ValueError):
        pg_store.create_key("client-a", metadata={"ratio": float("nan")})
    with pytest.raises(ValueError, match="max_uses"):
        pg_store.create_key("client-a", max_uses=2**31)
    with pytest.raises(ValueError, match="client id"):  # refused before the database
        pg_store.create_key("client\x00a")
    with pytest.raises(KeyStoreError) as caught:
        pg_store.create_key("client-a", name="name\x00a")
    assert not isinstance(caught.value, StoreUnavailable)
    assert pg_store.list_keys() == []
    assert pg_store.create_key("client-a", max_uses=2**31 - 1).record.remaining_uses == 2**31 - 1


# -- usage limits across pools and processes ---------------------------------------------


def test_two_pools_racing_take_use_admit_exactly_max_uses(postgres_url: str) -> None:
    max_uses, threads_per_store = 50, 8
    stores = [open_key_store(postgres_url), open_key_store(postgres_url)]
    issued = stores[0].create_key("client-a", max_uses=max_uses)
    barrier = threading.Barrier(threads_per_store * len(stores))

    def take_all(store: KeyStore) -> int:
        barrier.wait()
        taken = 0
        while store.take_use(issued.key_id) is not None:
            taken += 1
        return taken

    try:
        with ThreadPoolExecutor(threads_per_store * len(stores)) as pool:
            counts = list(pool.map(take_all, stores * threads_per_store))
        assert sum(counts) == max_uses
        assert all(store.get_key(issued.key_id).remaining_uses == 0 for store in stores)
    finally:
        for store in stores:
            store.close()


@pytest.mark.slow
def test_take_use_stays_exact_with_other_processes_racing(postgres_url: str) -> None:
    max_uses, threads = 300, 4
    store = open_key_store(postgres_url)
    issued = store.create_key("client-a", max_uses=max_uses)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", TAKE_ALL_USES, postgres_url, issued.key_id],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    start = threading.Event()

    def take_all() -> int:
        start.wait()
        taken = 0
        while store.take_use(issued.key_id) is not None:
            taken += 1
        return taken

    try:
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
        with ThreadPoolExecutor(threads) as pool:
            here = [pool.submit(take_all) for _ in range(threads)]
            for proc in procs:  # everyone connected: race
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            start.set()
            counts = [future.result(timeout=60) for future in here]
        elsewhere = []
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            elsewhere.append(int(out.strip()))
        assert sum(counts) + sum(elsewhere) == max_uses, (counts, elsewhere)
        assert store.get_key(issued.key_id).remaining_uses == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        store.close()


# -- connections the server killed -------------------------------------------------------


def test_a_lookup_right_after_the_server_killed_every_connection_succeeds(
    pg_store: KeyStore, postgres_base_url: str, app_name: str
) -> None:
    issued = pg_store.create_key("client-a")
    key_hash = hash_key(issued.key)
    grow_pool(pg_store, key_hash)
    killed = kill_connections(postgres_base_url, app_name)
    assert killed  # the pool had connections, all now dead in its hands

    found = pg_store.find_by_hash(key_hash)  # no error, no restart
    assert found is not None and found.key_id == issued.key_id
    with ThreadPoolExecutor(6) as pool:
        assert all(pool.map(lambda _: pg_store.find_by_hash(key_hash), range(30)))
    # An idempotent write is retried the same way.
    assert pg_store.revoke_key(issued.key_id).revoked_at is not None
    with psycopg.connect(postgres_base_url, autocommit=True) as admin:
        live = connections_of(admin, app_name)
    assert live and not (live & killed)


def test_lookups_mid_traffic_survive_the_server_killing_every_connection(
    pg_store: KeyStore, postgres_base_url: str, app_name: str
) -> None:
    issued = pg_store.create_key("client-a")
    key_hash = hash_key(issued.key)
    stop = threading.Event()
    lookups: list[int] = []
    failed_at: list[float] = []  # when each failed lookup started
    unexpected: list[BaseException] = []

    def traffic() -> None:
        done = 0
        while not stop.is_set():
            started = time.monotonic()
            try:
                assert pg_store.find_by_hash(key_hash) is not None
            except StoreUnavailable:
                failed_at.append(started)
            except BaseException as exc:
                unexpected.append(exc)
            done += 1
        lookups.append(done)

    threads = [threading.Thread(target=traffic) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.2)
        assert kill_connections(postgres_base_url, app_name)
        all_gone = time.monotonic()
        time.sleep(0.3)  # traffic goes on through the kill
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert unexpected == []
    assert sum(lookups) > 100
    # A lookup racing the kill may fail (its retry can meet a connection whose
    # termination is still on its way); one started once the dead are gone must not.
    assert [t for t in failed_at if t > all_gone + 0.05] == []

    assert pg_store.find_by_hash(key_hash) is not None
    with ThreadPoolExecutor(6) as pool:
        assert all(pool.map(lambda _: pg_store.find_by_hash(key_hash), range(30)))


def test_a_write_on_a_killed_connection_is_not_repeated_and_the_next_works(
    pg_store: KeyStore, postgres_base_url: str, app_name: str
) -> None:
    issued = pg_store.create_key("client-a", max_uses=10)
    assert pg_store.take_use(issued.key_id) == 9
    grow_pool(pg_store, hash_key(issued.key))  # several connections, all to die
    assert len(kill_connections(postgres_base_url, app_name)) > 1
    # Whether a write on a dead connection was applied is unknown in general,
    # so it is reported, not retried (a retry could spend the use twice).
    with pytest.raises(StoreUnavailable):
        pg_store.take_use(issued.key_id)
    assert pg_store.take_use(issued.key_id) == 8  # the dead connection is gone
    assert pg_store.get_key(issued.key_id).remaining_uses == 8


# -- a server that is not there ----------------------------------------------------------

PASSWORD = "s3cret-Pa55word"


def test_an_unreachable_server_fails_fast_and_never_shows_the_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    port = servers.free_port()  # nothing listens there
    url = f"postgresql://m2m_user:{PASSWORD}@127.0.0.1:{port}/test"
    started = time.monotonic()
    store = open_key_store(url, timeout=1.0)
    assert time.monotonic() - started < 0.5  # opening does not connect
    assert isinstance(store, PostgresKeyStore)
    assert store.timeout == 1.0
    assert PASSWORD not in store.location and PASSWORD not in repr(store)
    calls: list[Callable[[], object]] = [
        lambda: store.find_by_hash("0" * 64),
        lambda: store.take_use("key_x"),
    ]
    try:
        for call in calls:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as caught:
                call()
            assert time.monotonic() - started < store.timeout + 1.5
            message = str(caught.value)
            assert f"postgresql://127.0.0.1:{port}/test" in message
            assert "refused" in message.lower()  # the cause, not just "timed out"
            assert PASSWORD not in message
            assert PASSWORD not in str(caught.value.__cause__)
    finally:
        started = time.monotonic()
        store.close()
        assert time.monotonic() - started < 5
    assert PASSWORD not in caplog.text


class Proxy:
    """A TCP forwarder to the real server on a port of its own: "the database"
    that a test can bring up after the application started."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = servers.free_port()
        self.listener: socket.socket | None = None
        self.sockets: list[socket.socket] = []

    def start(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        assert self.listener is not None
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # stopped
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def stop(self) -> None:
        """Down, as a server that died: the listener and every open connection."""
        for sock in [self.listener, *self.sockets]:
            if sock is not None:
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # close() alone leaves a recv() blocked
                sock.close()
        self.sockets.clear()


def test_a_store_opened_while_the_server_is_down_works_once_it_is_up(
    postgres_url: str,
) -> None:
    parts = urlsplit(postgres_url)
    proxy = Proxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    netloc = f"{parts.username or 'postgres'}@127.0.0.1:{proxy.port}"
    store = open_key_store(postgres_url.replace(parts.netloc, netloc, 1), timeout=1.0)
    try:
        with pytest.raises(StoreUnavailable):  # down: an outage, not a crash or a hang
            store.list_keys()
        proxy.start()
        up = time.monotonic()
        while True:
            try:
                issued = store.create_key("client-a")
                break
            except StoreUnavailable:
                # The pool retries with backoff; it must not have given up for good.
                assert time.monotonic() - up < 15, "the store never recovered"
        assert store.find_by_hash(hash_key(issued.key)) is not None
    finally:
        store.close()
        proxy.stop()


def test_a_bad_url_is_a_config_error_that_hides_the_password() -> None:
    with pytest.raises(ConfigError) as caught:
        open_key_store(f"postgresql://m2m_user:{PASSWORD}%zz@db.internal/keys")
    assert caught.value.field == "key_store"
    assert PASSWORD not in str(caught.value)
    with pytest.raises(ConfigError, match="nosuchoption"):
        open_key_store("postgresql://db.internal/keys?nosuchoption=1")


def test_the_location_names_the_data_not_the_credentials(postgres_url: str) -> None:
    parts = urlsplit(postgres_url)
    user = parts.username or "postgres"  # trust auth: the password is not checked
    netloc = f"{user}:{PASSWORD}@{parts.hostname}:{parts.port or 5432}"
    store = open_key_store(postgres_url.replace(parts.netloc, netloc, 1))
    plain = open_key_store(postgres_url)
    try:
        assert store.location == plain.location
        assert store.location == (
            f"postgresql://{parts.hostname}:{parts.port or 5432}{parts.path}"
            f"?options={quote(unquote(parse_qs(parts.query)['options'][0]), safe='')}"
        )
        assert PASSWORD not in store.location
        store.create_key("client-a")  # and the password still reaches libpq
    finally:
        store.close()
        plain.close()


def test_a_closed_store_says_so(postgres_url: str) -> None:
    store = open_key_store(postgres_url)
    store.create_key("client-a")
    store.close()
    store.close()  # twice is fine
    with pytest.raises(StoreUnavailable, match="closed"):
        store.list_keys()


# -- through the engine ---------------------------------------------------------------------


def test_an_engine_authenticates_keys_kept_in_postgres(postgres_url: str) -> None:
    store = open_key_store(postgres_url)
    issued = store.create_key("billing", scopes=["orders:read"])
    store.close()
    stranger = MemoryKeyStore().create_key("billing").key  # well formed, not in the database
    engine = Engine(Settings(key_store=postgres_url, default_limits="100/second"))
    try:
        for outcome in (
            engine.check("GET", "/", None, issued.key),
            asyncio.run(engine.acheck("GET", "/", None, issued.key)),
        ):
            assert isinstance(outcome, Allowed), outcome
            assert outcome.client is not None
            assert outcome.client.client_id == "billing"
            assert outcome.client.key_id == issued.key_id
            assert outcome.client.scopes == frozenset({"orders:read"})
        for outcome in (
            engine.check("GET", "/", None, stranger),
            asyncio.run(engine.acheck("GET", "/", None, stranger)),
        ):
            assert isinstance(outcome, Denied)
            assert outcome.status == 401
    finally:
        engine.close()


def test_an_outage_logs_one_record_and_a_recovery_one_not_one_per_reconnect(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """psycopg_pool logs a WARNING per connection attempt; ours say it once."""
    caplog.set_level(logging.INFO)
    parts = urlsplit(postgres_url)
    setup = open_key_store(postgres_url)
    issued = setup.create_key("billing")
    setup.close()
    proxy = Proxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    netloc = f"{parts.username or 'postgres'}:{PASSWORD}@127.0.0.1:{proxy.port}"
    engine = Engine(
        Settings(
            key_store=postgres_url.replace(parts.netloc, netloc, 1),
            storage_timeout=0.3,
            key_cache_ttl=0,  # every request asks the store
            default_limits="1000/second",
        )
    )

    def requests_for(seconds: float) -> list[int]:
        statuses = []
        ends = time.monotonic() + seconds
        while time.monotonic() < ends:
            outcome = engine.check("GET", "/", None, issued.key)
            statuses.append(200 if isinstance(outcome, Allowed) else outcome.status)
            time.sleep(0.05)
        return statuses

    def until_allowed() -> None:
        up = time.monotonic()
        while not engine.check("GET", "/", None, issued.key).allowed:
            assert time.monotonic() - up < 20, "the store never recovered"
            time.sleep(0.05)

    try:
        down = requests_for(3.0)  # the database is not there yet: the pool keeps retrying
        assert set(down) == {503} and len(down) >= 5
        proxy.start()
        until_allowed()
        assert set(requests_for(0.5)) == {200}
        proxy.stop()  # a second outage: every pooled connection dies with the server
        assert set(requests_for(2.0)) == {503}
        proxy.start()
        until_allowed()
    finally:
        engine.close()
        proxy.stop()
    loud = [
        (r.name, r.levelname, r.getMessage())
        for r in caplog.records
        if r.levelno >= logging.WARNING
    ]
    # Two things are down in an outage, each said once: lookups (the key
    # store) and the channel revocations arrive on (the NOTIFY listener).
    # Nothing comes from psycopg_pool's attempt-by-attempt warnings.
    store = [(level, text) for name, level, text in loud if "key store" in text]
    channel = [
        (level, text)
        for name, level, text in loud
        if "key invalidations" in text or "key-invalidation channel" in text
    ]
    assert len(store) + len(channel) == len(loud), loud
    assert {name for name, _, _ in loud} == {"m2m_middleware"}, loud
    assert [level for level, _ in store] == ["ERROR", "WARNING", "ERROR", "WARNING"], loud
    assert "key store unreachable" in store[0][1] and "refused" in store[0][1].lower()
    assert "reachable again" in store[1][1]
    levels = [level for level, _ in channel]
    # At most once each per outage (the listener may still be reconnecting
    # when the test ends, so the last recovery can be missing).
    assert 1 <= len(levels) <= 4, loud
    assert levels == ["ERROR", "WARNING", "ERROR", "WARNING"][: len(levels)], loud
    assert not any(PASSWORD in text for _, _, text in loud)


def test_other_pools_keep_their_warnings(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    from psycopg_pool import ConnectionPool

    # On the logger itself: the CLI, run in-process by other tests of this
    # worker, turns psycopg.pool down to ERROR for its own output.
    caplog.set_level(logging.WARNING, logger="psycopg.pool")
    pool = ConnectionPool(
        f"postgresql://postgres@127.0.0.1:{servers.free_port()}/test",
        min_size=1,
        open=False,
        name="the app's own pool",
        reconnect_timeout=1,
    )
    pool.open(wait=False)
    try:
        deadline = time.monotonic() + 5
        while not any(r.name == "psycopg.pool" for r in caplog.records):
            assert time.monotonic() < deadline, "psycopg_pool logged nothing"
            time.sleep(0.05)
    finally:
        pool.close()


def test_last_used_is_written_back_when_a_short_run_exits(postgres_url: str) -> None:
    store = open_key_store(postgres_url)
    issued = store.create_key("billing")
    assert run_one_request_then_exit(postgres_url, issued.key) == "True\n"
    assert store.get_key(issued.key_id).last_used_at is not None
    store.close()
