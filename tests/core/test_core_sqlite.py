"""The SQLite store specifically, and opening stores by URL."""

from __future__ import annotations

import gc
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import pytest
from core_support import make_engine, run_one_request_then_exit, sqlite_url

from m2m_middleware import ConfigError, KeyStore, StoreUnavailable, open_key_store
from m2m_middleware.keys import hash_key
from m2m_middleware.stores import MemoryKeyStore, SQLiteKeyStore


def test_wal_mode_is_on(tmp_path: Path) -> None:
    store = open_key_store(sqlite_url(tmp_path / "k.db"))
    try:
        store.create_key("client-a")
        with closing(sqlite3.connect(tmp_path / "k.db")) as raw:
            (mode,) = raw.execute("PRAGMA journal_mode").fetchone()
        assert mode == "wal"
    finally:
        store.close()


def test_threads_opening_a_new_file_at_once_all_get_in(tmp_path: Path) -> None:
    # Switching to WAL takes its lock without SQLite's busy handler: before the
    # retry, about one round in ten had a thread fail with "database is locked".
    for round_ in range(30):
        store = SQLiteKeyStore(str(tmp_path / f"k{round_}.db"))
        start = threading.Barrier(6)

        def open_and_read() -> None:
            start.wait()
            store.list_keys()

        try:
            with ThreadPoolExecutor(6) as pool:
                for done in [pool.submit(open_and_read) for _ in range(6)]:
                    done.result()  # raises StoreUnavailable if an open failed
        finally:
            store.close()


def test_two_store_objects_on_one_file_see_each_others_keys(tmp_path: Path) -> None:
    first = open_key_store(sqlite_url(tmp_path / "k.db"))
    second = open_key_store(sqlite_url(tmp_path / "k.db"))
    try:
        a = first.create_key("client-a", scopes=["s"])
        b = second.create_key("client-b")
        assert second.get_key(a.key_id).scopes == frozenset({"s"})
        found = second.find_by_hash(hash_key(a.key))
        assert found is not None and found.key_id == a.key_id
        assert first.get_key(b.key_id).client_id == "client-b"
        assert {r.key_id for r in first.list_keys()} == {a.key_id, b.key_id}
        second.revoke_key(a.key_id)
        assert not first.get_key(a.key_id).is_active()
    finally:
        first.close()
        second.close()


def test_relative_and_absolute_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = open_key_store("sqlite:///rel.db")
    absolute = open_key_store("sqlite:///" + str(tmp_path / "rel.db"))
    try:
        assert isinstance(relative, SQLiteKeyStore)
        issued = relative.create_key("client-a")
        assert (tmp_path / "rel.db").is_file()
        assert absolute.get_key(issued.key_id).client_id == "client-a"
        assert relative.location == absolute.location
    finally:
        relative.close()
        absolute.close()


def test_a_path_in_a_missing_directory_is_store_unavailable(tmp_path: Path) -> None:
    store = open_key_store(sqlite_url(tmp_path / "no" / "such" / "dir" / "k.db"))
    try:
        with pytest.raises(StoreUnavailable) as caught:
            store.create_key("client-a")
        assert not isinstance(caught.value, sqlite3.Error)
        with pytest.raises(StoreUnavailable):
            store.find_by_hash("0" * 64)
        with pytest.raises(StoreUnavailable):
            store.list_keys()
    finally:
        store.close()
    assert not (tmp_path / "no").exists()


def test_a_newer_schema_is_store_unavailable(tmp_path: Path) -> None:
    with closing(sqlite3.connect(tmp_path / "k.db")) as raw:
        raw.execute("PRAGMA user_version = 99")
    store = open_key_store(sqlite_url(tmp_path / "k.db"))
    try:
        with pytest.raises(StoreUnavailable, match="schema version 99"):
            store.create_key("client-a")
    finally:
        store.close()


@pytest.mark.parametrize(
    "url", ["mysql://x", "sqlite://", "sqlite:/k.db", "k.db", "", "redis://u:secret@h/0", 42, None]
)
def test_bad_store_urls_are_config_errors_naming_key_store(url: object) -> None:
    with pytest.raises(ConfigError) as caught:
        open_key_store(url)  # type: ignore[arg-type]
    assert caught.value.field == "key_store"
    assert "secret" not in str(caught.value)  # no password echoed from a URL


def test_memory_url_and_store_objects() -> None:
    store = open_key_store("memory://")
    assert isinstance(store, MemoryKeyStore)
    assert open_key_store(store) is store
    assert open_key_store("memory://") is not store


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_close_releases_connections_opened_in_other_threads(tmp_path: Path) -> None:
    path = tmp_path / "k.db"

    def open_fds() -> int:
        count = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{fd}").startswith(str(path)):
                    count += 1
            except OSError:
                pass
        return count

    store: KeyStore = open_key_store(sqlite_url(path))
    issued = store.create_key("client-a")
    with ThreadPoolExecutor(max_workers=1) as pool:  # a long-lived worker, like to_thread's
        assert pool.submit(store.get_key, issued.key_id).result().key_id == issued.key_id
        assert threading.active_count() >= 2
        store.close()
        assert open_fds() == 0


def test_revocation_through_a_symlinked_path_reaches_the_cache(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    serving = open_key_store(sqlite_url(tmp_path / "real" / "k.db"))
    admin = open_key_store(sqlite_url(tmp_path / "link" / "k.db"))
    try:
        issued = serving.create_key("client-a")
        engine = make_engine(serving, key_cache_ttl=3600)
        assert engine.check("GET", "/x", None, issued.key).allowed
        admin.revoke_key(issued.key_id)
        assert not serving.get_key(issued.key_id).is_active()  # the same file
        assert not engine.check("GET", "/x", None, issued.key).allowed
    finally:
        admin.close()
        serving.close()


def test_close_then_reuse_reopens_in_every_thread(tmp_path: Path) -> None:
    store = open_key_store(sqlite_url(tmp_path / "k.db"))
    issued = store.create_key("client-a")
    with ThreadPoolExecutor(max_workers=1) as pool:
        assert pool.submit(store.get_key, issued.key_id).result().key_id == issued.key_id
        store.close()
        # The worker's thread-local connection was closed; it must not be reused.
        assert pool.submit(store.get_key, issued.key_id).result().key_id == issued.key_id
        assert store.get_key(issued.key_id).key_id == issued.key_id
        store.close()


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_open_key_store_passes_the_prefix(kind: str, tmp_path: Path) -> None:
    url = "memory://" if kind == "memory" else sqlite_url(tmp_path / "k.db")
    store = open_key_store(url, prefix="acme")
    try:
        assert store.prefix == "acme"
        issued = store.create_key("client-a")
        assert issued.key.startswith("acme_")
        assert store.find_by_hash(hash_key(issued.key)) is not None
    finally:
        store.close()
    default = open_key_store(url)
    try:
        assert default.create_key("client-b").key.startswith("m2m_")
    finally:
        default.close()


# -- file modes: the client list and the key hashes are for the owner only -------------


@pytest.fixture
def common_umask() -> Iterator[None]:
    """The usual 022, under which sqlite3 alone makes world-readable files."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def modes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mode & 0o777 for p in directory.iterdir()}


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.usefixtures("common_umask")
def test_a_new_key_file_and_its_wal_and_shm_are_owner_only(tmp_path: Path) -> None:
    store = open_key_store(sqlite_url(tmp_path / "keys.db"))
    try:
        issued = store.create_key("client-a")
        engine = make_engine(store)
        assert engine.check("GET", "/x", None, issued.key).allowed
        # While connections are open, WAL mode keeps the -wal and -shm files.
        assert modes(tmp_path) == {"keys.db": 0o600, "keys.db-wal": 0o600, "keys.db-shm": 0o600}
    finally:
        store.close()


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.usefixtures("common_umask")
def test_the_cli_makes_an_owner_only_key_file(tmp_path: Path) -> None:
    from m2m_middleware.cli import main

    assert main(["keys", "create", "--client", "c", "--store", sqlite_url(tmp_path / "k.db")]) == 0
    assert modes(tmp_path)["k.db"] == 0o600


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.usefixtures("common_umask")
def test_an_existing_key_file_keeps_the_mode_its_owner_gave_it(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    sqlite3.connect(path).close()
    path.chmod(0o640)  # say, readable by a backup group on purpose
    store = open_key_store(sqlite_url(path))
    try:
        store.create_key("client-a")
        assert modes(tmp_path)["shared.db"] == 0o640
    finally:
        store.close()


def test_last_used_is_written_back_when_a_short_run_exits(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "k.db")
    store = open_key_store(url)
    issued = store.create_key("client-a")
    before = time.time()
    output = run_one_request_then_exit(url, issued.key)
    assert output == "True\n"  # nothing on stderr either
    used = store.get_key(issued.key_id).last_used_at
    assert used is not None and before - 1 <= used.timestamp() <= time.time()
    store.close()


def test_a_store_dropped_is_not_kept_alive_for_the_exit_write_back(tmp_path: Path) -> None:
    store = open_key_store(sqlite_url(tmp_path / "k.db"))
    store.mark_used("key_x")
    dropped = weakref.ref(store)
    del store
    gc.collect()
    assert dropped() is None
