"""The plaintext of a key is in no file, no log record and no response."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from core_support import make_engine, sqlite_url

from m2m_middleware import Allowed, Denied, StoreUnavailable, open_key_store
from m2m_middleware.keys import generate_key, hash_key
from m2m_middleware.stores import MemoryKeyStore


def files_blob(directory: Path) -> bytes:
    return b"\n".join(p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file())


def test_no_plaintext_on_disk_only_hashes(tmp_path: Path) -> None:
    store = open_key_store(sqlite_url(tmp_path / "k.db"))
    engine = make_engine(store, default_limits="100/minute")
    issued = [
        store.create_key("client-a", scopes=["orders:read"], name="first"),
        store.create_key("client-a", max_uses=5, metadata={"team": "billing"}),
        store.create_key(
            "client-b", tier="gold", expires_at=datetime.now(timezone.utc) + timedelta(days=1)
        ),
    ]
    for item in issued:
        assert isinstance(engine.check("GET", "/x", None, item.key), Allowed)
        assert isinstance(engine.check("GET", "/x", f"Bearer {item.key}", None), Allowed)
    rotated = store.rotate_key(issued[0].key_id, grace_seconds=60)
    assert isinstance(engine.check("GET", "/x", None, rotated.key), Allowed)
    store.revoke_key(issued[2].key_id)
    plaintexts = [i.key for i in issued] + [rotated.key]

    with_wal = files_blob(tmp_path)  # while the connection is open, the WAL holds the writes
    engine.close()  # flushes last_used_at and closes the connection
    after_close = files_blob(tmp_path)
    assert store.get_key(issued[0].key_id).last_used_at is not None  # the flush happened

    for blob in (with_wal, after_close):
        for key in plaintexts:
            assert key.encode() not in blob
            assert key[4:-6].encode() not in blob  # nor the bare secret
        for key in plaintexts:
            assert hash_key(key).encode() in blob  # hashed at rest
    store.close()


def test_no_plaintext_in_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="m2m_middleware")

    class FlakyStore(MemoryKeyStore):
        down = False

        def _fetch_by_hash(self, key_hash: str):  # type: ignore[no-untyped-def]
            if self.down:
                raise StoreUnavailable("connection refused")
            return super()._fetch_by_hash(key_hash)

    store = FlakyStore()
    engine = make_engine(store, default_limits="2/minute", key_cache_ttl=0)
    good = store.create_key("client-a").key
    limited = store.create_key("client-b", max_uses=1).key
    revoked = store.create_key("client-c")
    store.revoke_key(revoked.key_id)
    unknown = generate_key()
    malformed = good[:-1] + ("A" if good[-1] != "A" else "B")
    outcomes: list[Allowed | Denied] = [
        engine.check("GET", "/x", None, good),
        engine.check("GET", "/x", f"Bearer {good}", None),
        engine.check("GET", "/x", None, good),  # rate limited
        engine.check("GET", "/x", None, limited),
        engine.check("GET", "/x", None, limited),  # quota exceeded
        engine.check("GET", "/x", None, revoked.key),
        engine.check("GET", "/x", None, unknown),
        engine.check("GET", "/x", None, malformed),
        engine.check("GET", "/x", f"Bearer {good}", unknown),  # two credentials
    ]
    store.down = True
    outcomes.append(engine.check("GET", "/x", None, unknown))  # store unreachable
    store.down = False
    engine.close()

    assert [o.allowed for o in outcomes[:2]] == [True, True]
    assert [getattr(o, "error", None) for o in outcomes[2:]] == [
        "rate_limited",
        None,
        "quota_exceeded",
        "invalid_token",
        "invalid_token",
        "invalid_token",
        "invalid_request",
        "temporarily_unavailable",
    ]
    assert caplog.records, "the rate-limit and outage paths log; nothing was captured"
    secrets = [good, limited, revoked.key, unknown, malformed]
    for record in caplog.records:
        text = record.getMessage() + repr(record.args) + repr(record.__dict__)
        for key in secrets:
            assert key not in text
            assert key[4:-6] not in text
    for outcome in outcomes:
        if isinstance(outcome, Denied):
            sent = outcome.body.decode() + repr(outcome.headers) + outcome.detail
            for key in secrets:
                assert key[4:-6] not in sent
