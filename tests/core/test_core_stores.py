"""Key stores (memory, SQLite, PostgreSQL, Django): lifecycle, lookup, concurrent usage limits."""

from __future__ import annotations

import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from core_support import TAKE_ALL_USES, make_engine, sqlite_url

from m2m_middleware import (
    Allowed,
    ConfigError,
    Denied,
    IssuedKey,
    KeyNotFound,
    KeyRecord,
    KeyStore,
    open_key_store,
)
from m2m_middleware.keys import hash_key, is_well_formed
from m2m_middleware.stores import SQLiteKeyStore


def now() -> datetime:
    return datetime.now(timezone.utc)


def test_create_key_returns_an_issued_key(store: KeyStore) -> None:
    issued = store.create_key("client-a", scopes=["orders:read"], tier="gold", name="ci")
    assert isinstance(issued, IssuedKey)
    assert isinstance(issued.record, KeyRecord)
    assert is_well_formed(issued.key)
    assert issued.key_id == issued.record.key_id
    assert issued.record.client_id == "client-a"
    assert issued.record.scopes == frozenset({"orders:read"})
    assert issued.record.tier == "gold"
    assert issued.record.name == "ci"
    assert issued.record.revoked_at is None
    assert issued.record.expires_at is None
    assert issued.record.remaining_uses is None
    assert issued.record.last_used_at is None
    assert abs((issued.record.created_at - now()).total_seconds()) < 5
    assert issued.record.is_active()


def test_issued_key_repr_hides_the_plaintext(store: KeyStore) -> None:
    issued = store.create_key("client-a")
    for text in (repr(issued), str(issued), f"{issued}", repr([issued])):
        assert issued.key not in text
        assert issued.key[4:-6] not in text
        assert issued.key_id in text
    assert issued.key not in repr(issued.record)


def test_get_key_returns_the_stored_record(store: KeyStore) -> None:
    expires = (now() + timedelta(days=1)).replace(microsecond=0)
    issued = store.create_key(
        "client-a", scopes=["b", "a"], tier="t", name="n", expires_at=expires, max_uses=7
    )
    record = store.get_key(issued.key_id)
    assert record == issued.record
    assert record.expires_at == expires
    assert record.remaining_uses == 7


def test_get_key_unknown_raises_key_not_found(store: KeyStore) -> None:
    with pytest.raises(KeyNotFound) as caught:
        store.get_key("key_doesnotexist")
    assert isinstance(caught.value, LookupError)
    assert caught.value.key_id == "key_doesnotexist"


def test_list_keys_filters_by_client(store: KeyStore) -> None:
    a1 = store.create_key("client-a")
    a2 = store.create_key("client-a")
    b1 = store.create_key("client-b")
    assert {r.key_id for r in store.list_keys()} == {a1.key_id, a2.key_id, b1.key_id}
    assert {r.key_id for r in store.list_keys("client-a")} == {a1.key_id, a2.key_id}
    assert [r.key_id for r in store.list_keys(client_id="client-b")] == [b1.key_id]
    assert store.list_keys("nobody") == []


def test_revoke_key(store: KeyStore) -> None:
    issued = store.create_key("client-a")
    other = store.create_key("client-a")
    revoked = store.revoke_key(issued.key_id)
    assert revoked.key_id == issued.key_id
    assert revoked.revoked_at is not None
    assert abs((revoked.revoked_at - now()).total_seconds()) < 5
    assert not revoked.is_active()
    assert not store.get_key(issued.key_id).is_active()
    assert store.get_key(other.key_id).is_active()


def test_revoke_unknown_key_raises_key_not_found(store: KeyStore) -> None:
    with pytest.raises(KeyNotFound) as caught:
        store.revoke_key("key_nope")
    assert isinstance(caught.value, LookupError)


def test_rotate_with_grace_keeps_the_old_key_working_until_the_grace_ends(
    store: KeyStore,
) -> None:
    old = store.create_key("client-a", scopes=["x", "y"], tier="gold", name="deploy")
    new = store.rotate_key(old.key_id, grace_seconds=3600)
    assert new.key != old.key
    assert new.key_id != old.key_id
    assert is_well_formed(new.key)
    record = store.get_key(new.key_id)
    assert record.client_id == "client-a"
    assert record.scopes == frozenset({"x", "y"})
    assert record.tier == "gold"
    assert record.name == "deploy"
    assert record.is_active()
    assert record.metadata.get("rotated_from") == old.key_id
    previous = store.get_key(old.key_id)
    assert previous.is_active()
    assert previous.revoked_at is None
    assert previous.expires_at is not None
    expected = now() + timedelta(seconds=3600)
    assert abs((previous.expires_at - expected).total_seconds()) < 5
    assert not previous.is_active(expected + timedelta(seconds=5))


def test_rotate_without_grace_ends_the_old_key_at_once(store: KeyStore) -> None:
    old = store.create_key("client-a", scopes=["x"])
    new = store.rotate_key(old.key_id, grace_seconds=0)
    assert not store.get_key(old.key_id).is_active()
    assert store.get_key(new.key_id).is_active()
    assert store.get_key(new.key_id).scopes == frozenset({"x"})


def test_rotate_never_extends_an_earlier_expiry(store: KeyStore) -> None:
    expires = (now() + timedelta(seconds=60)).replace(microsecond=0)
    old = store.create_key("client-a", expires_at=expires)
    new = store.rotate_key(old.key_id, grace_seconds=3600)
    assert store.get_key(old.key_id).expires_at == expires
    assert store.get_key(new.key_id).expires_at == expires


def test_rotate_refuses_unknown_revoked_and_negative_grace(store: KeyStore) -> None:
    with pytest.raises(KeyNotFound):
        store.rotate_key("key_nope", grace_seconds=10)
    issued = store.create_key("client-a")
    with pytest.raises(ValueError):
        store.rotate_key(issued.key_id, grace_seconds=-1)
    store.revoke_key(issued.key_id)
    with pytest.raises(ValueError):
        store.rotate_key(issued.key_id, grace_seconds=10)


def test_expiry(store: KeyStore) -> None:
    past = store.create_key("client-a", expires_at=now() - timedelta(seconds=1))
    future = store.create_key("client-a", expires_at=now() + timedelta(hours=1))
    assert not store.get_key(past.key_id).is_active()
    assert store.get_key(future.key_id).is_active()
    assert not store.get_key(future.key_id).is_active(now() + timedelta(hours=2))


def test_naive_expiry_is_refused(store: KeyStore) -> None:
    with pytest.raises(ValueError):
        store.create_key("client-a", expires_at=datetime.now())


@pytest.mark.parametrize("client_id", ["", "   "])
def test_empty_client_id_is_refused(store: KeyStore, client_id: str) -> None:
    with pytest.raises(ValueError):
        store.create_key(client_id)


def test_metadata_round_trip(store: KeyStore) -> None:
    metadata = {"team": "billing", "n": 3, "ratio": 0.5, "on": True, "none": None,
                "nested": {"list": [1, "two"]}}  # fmt: skip
    issued = store.create_key("client-a", metadata=metadata)
    assert dict(store.get_key(issued.key_id).metadata) == metadata
    assert dict(store.list_keys("client-a")[0].metadata) == metadata
    assert dict(store.create_key("client-b").record.metadata) == {}
    assert dict(store.get_key(store.list_keys("client-b")[0].key_id).metadata) == {}


def test_scopes_are_a_frozenset(store: KeyStore) -> None:
    issued = store.create_key("client-a", scopes=["b", "a", "a"])
    record = store.get_key(issued.key_id)
    assert type(record.scopes) is frozenset
    assert record.scopes == frozenset({"a", "b"})
    assert store.get_key(store.create_key("c", scopes="x y").key_id).scopes == {"x", "y"}
    assert store.get_key(store.create_key("c").key_id).scopes == frozenset()


@pytest.mark.parametrize("scopes", [["a b"], [""], ["ok", "tab\there"]])
def test_invalid_scopes_are_refused(store: KeyStore, scopes: list[str]) -> None:
    with pytest.raises(ValueError):
        store.create_key("client-a", scopes=scopes)


def test_find_by_hash(store: KeyStore) -> None:
    issued = store.create_key("client-a", scopes=["s"])
    store.create_key("client-b")
    found = store.find_by_hash(hash_key(issued.key))
    assert found is not None
    assert found.key_id == issued.key_id
    assert found.scopes == frozenset({"s"})
    assert store.find_by_hash(hash_key(issued.key + "x")) is None
    assert store.find_by_hash("0" * 64) is None
    assert store.find_by_hash(issued.key) is None  # the plaintext is not what is indexed


def test_take_use(store: KeyStore) -> None:
    limited = store.create_key("client-a", max_uses=3)
    assert [store.take_use(limited.key_id) for _ in range(5)] == [2, 1, 0, None, None]
    assert store.get_key(limited.key_id).remaining_uses == 0
    assert not store.get_key(limited.key_id).is_active()  # used up
    unlimited = store.create_key("client-a")
    assert store.take_use(unlimited.key_id) is None
    assert store.get_key(unlimited.key_id).remaining_uses is None
    assert store.get_key(unlimited.key_id).is_active()
    assert store.take_use("key_doesnotexist") is None


@pytest.mark.parametrize("max_uses", [0, -1, True])
def test_invalid_max_uses_is_refused(store: KeyStore, max_uses: int) -> None:
    with pytest.raises(ValueError):
        store.create_key("client-a", max_uses=max_uses)


def test_max_uses_is_exact_under_thread_concurrency(store: KeyStore) -> None:
    max_uses, threads, per_thread = 25, 40, 3
    issued = store.create_key("client-a", max_uses=max_uses)
    engine = make_engine(store)
    barrier = threading.Barrier(threads)
    outcomes: list[Allowed | Denied] = []
    lock = threading.Lock()

    def worker() -> None:
        mine = []
        barrier.wait()
        for _ in range(per_thread):
            mine.append(engine.check("GET", "/x", None, issued.key))
        # Release this thread's SQLite connection before the thread ends; the
        # other stores have no per-thread connection, and closing them would
        # end the store for every thread still checking.
        if isinstance(store, SQLiteKeyStore):
            store.close()
        elif type(store).__name__ == "DjangoKeyStore":
            from django.db import connections

            connections.close_all()  # this thread's own connections only
        with lock:
            outcomes.extend(mine)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(timeout=30)
    assert len(outcomes) == threads * per_thread
    allowed = [o for o in outcomes if isinstance(o, Allowed)]
    denied = [o for o in outcomes if isinstance(o, Denied)]
    assert len(allowed) == max_uses
    assert {(d.status, d.error) for d in denied} == {(429, "quota_exceeded")}
    assert store.get_key(issued.key_id).remaining_uses == 0


@pytest.mark.slow
def test_max_uses_is_exact_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    store = open_key_store(sqlite_url(path))
    max_uses = 200
    issued = store.create_key("client-a", max_uses=max_uses)
    store.close()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", TAKE_ALL_USES, sqlite_url(path), issued.key_id],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
        for proc in procs:  # all connected: let them race
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        counts = []
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            counts.append(int(out.strip()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert sum(counts) == max_uses
    reopened = open_key_store(sqlite_url(path))
    try:
        assert reopened.get_key(issued.key_id).remaining_uses == 0
    finally:
        reopened.close()


def test_the_package_imports_no_database_driver() -> None:
    code = (
        "import sys, m2m_middleware, m2m_middleware.stores\n"
        "m2m_middleware.open_key_store('memory://')\n"
        "assert 'psycopg' not in sys.modules, 'psycopg imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_postgresql_url_without_psycopg_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "m2m_middleware.stores.postgres", raising=False)
    for url in ("postgresql://db.internal/keys", "postgres://db.internal/keys"):
        with pytest.raises(ConfigError) as caught:
            open_key_store(url)
        assert caught.value.field == "key_store"
        assert 'pip install "m2m-middleware[postgres]"' in str(caught.value)
