"""Usage counting as users see it (CONTRACT.md "Usage", issue 14 item 1).

Every decision of the engine about a known client is counted per client, key
and hour in process and reaches ``store.usage()`` with a flush: allowed,
denied and rate-limited requests and the cost units charged. Public paths and
requests without a credential that holds are not anybody's usage. The clock
is injected (``Engine(telemetry_clock=...)``), so hours pass without sleeping.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from core_support import sqlite_url
from jwt_support import SECRET, claims, hs256

import m2m_middleware.telemetry.usage as usage_module
from m2m_middleware import (
    Allowed,
    ConfigError,
    Denied,
    Engine,
    KeyStore,
    Settings,
    UsageRow,
    open_key_store,
)
from m2m_middleware.errors import KeyStoreError, StoreUnavailable
from m2m_middleware.stores import MemoryKeyStore

#: 2026-03-14 09:26:40 UTC: well inside an hour, a day and a month.
START = datetime(2026, 3, 14, 9, 26, 40, tzinfo=timezone.utc).timestamp()
HOUR = datetime(2026, 3, 14, 9, tzinfo=timezone.utc)
REPORTS_RULE = {"path": "/reports/*", "cost": 5}


class WallClock:
    """Unix seconds, frozen until advanced."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> WallClock:
    return WallClock()


@pytest.fixture
def store() -> Iterator[KeyStore]:
    the_store = MemoryKeyStore()
    yield the_store
    the_store.close()


def engine_for(store: KeyStore, clock: WallClock, **fields: Any) -> Engine:
    fields.setdefault("rate_limit_storage", "memory://")
    fields.setdefault("default_limits", "1000/minute")
    fields.setdefault("public_paths", ["/health"])
    return Engine(Settings(key_store=store, **fields), telemetry_clock=clock)


def get(engine: Engine, key: str | None, path: str = "/orders") -> Allowed | Denied:
    return engine.check("GET", path, None, key)


def counts(row: UsageRow) -> tuple[int, int, int, int]:
    return (row.allowed, row.denied, row.rate_limited, row.units)


def by_key(rows: list[UsageRow]) -> dict[tuple[str, str | None], tuple[int, int, int, int]]:
    return {(row.client_id, row.key_id): counts(row) for row in rows}


# -- what is counted ------------------------------------------------------------------


def test_allowed_requests_are_counted_per_client_key_and_hour(
    store: KeyStore, clock: WallClock
) -> None:
    acme = store.create_key("acme")
    acme_other = store.create_key("acme")
    globex = store.create_key("globex")
    engine = engine_for(store, clock)
    for _ in range(3):
        assert get(engine, acme.key).allowed
    assert get(engine, acme_other.key).allowed
    assert get(engine, globex.key).allowed
    engine.flush()
    rows = store.usage()
    assert by_key(rows) == {
        ("acme", acme.record.key_id): (3, 0, 0, 3),
        ("acme", acme_other.record.key_id): (1, 0, 0, 1),
        ("globex", globex.record.key_id): (1, 0, 0, 1),
    }
    assert {row.period_start for row in rows} == {HOUR}
    assert all(row.period_start.tzinfo is not None for row in rows)
    # Filters are the store's: one client, one key.
    assert [r.client_id for r in store.usage(client_id="globex")] == ["globex"]
    assert [r.key_id for r in store.usage(key_id=acme.record.key_id)] == [acme.record.key_id]


def test_each_hour_is_a_row_of_its_own_and_days_and_months_add_them_up(
    store: KeyStore, clock: WallClock
) -> None:
    issued = store.create_key("acme")
    engine = engine_for(store, clock)
    get(engine, issued.key)
    clock.advance(3600)  # 10:26
    get(engine, issued.key)
    get(engine, issued.key)
    engine.flush()
    hours = store.usage()
    assert [(r.period_start, r.allowed) for r in hours] == [
        (HOUR, 1),
        (HOUR + timedelta(hours=1), 2),
    ]
    (day,) = store.usage(granularity="day")
    assert (day.period_start, day.allowed) == (datetime(2026, 3, 14, tzinfo=timezone.utc), 3)
    (month,) = store.usage(granularity="month")
    assert (month.period_start, month.allowed) == (datetime(2026, 3, 1, tzinfo=timezone.utc), 3)
    # since rounds down to its period; until is exclusive.
    later = store.usage(since=HOUR + timedelta(minutes=90))
    assert [r.allowed for r in later] == [2]
    assert [r.allowed for r in store.usage(until=HOUR + timedelta(hours=1))] == [1]


def test_a_route_cost_is_charged_in_units(store: KeyStore, clock: WallClock) -> None:
    issued = store.create_key("acme")
    engine = engine_for(store, clock, routes=[REPORTS_RULE])
    assert get(engine, issued.key, "/reports/monthly").allowed
    assert get(engine, issued.key, "/orders").allowed
    engine.flush()
    (row,) = store.usage()
    assert counts(row) == (2, 0, 0, 6)
    assert row.requests == 2


def test_rate_limited_requests_are_counted_apart_from_other_refusals(
    store: KeyStore, clock: WallClock
) -> None:
    issued = store.create_key("acme", scopes=["orders:read"])
    engine = engine_for(
        store,
        clock,
        default_limits="2/minute",
        routes=[{"path": "/admin", "scopes": ["admin"]}],
    )
    assert get(engine, issued.key).allowed
    refused = get(engine, issued.key, "/admin")
    assert isinstance(refused, Denied) and refused.error == "insufficient_scope"
    assert get(engine, issued.key).allowed
    limited = get(engine, issued.key)
    assert isinstance(limited, Denied) and limited.error == "rate_limited"
    engine.flush()
    (row,) = store.usage()
    # No units for what was refused: only admitted requests are charged.
    assert counts(row) == (2, 1, 1, 2)


def test_a_key_with_no_uses_left_is_counted_denied(store: KeyStore, clock: WallClock) -> None:
    issued = store.create_key("acme", max_uses=1)
    engine = engine_for(store, clock)
    assert get(engine, issued.key).allowed
    quota = get(engine, issued.key)
    assert isinstance(quota, Denied) and quota.error == "quota_exceeded"
    engine.flush()
    (row,) = store.usage()
    assert counts(row) == (1, 1, 0, 1)


def test_the_async_front_door_counts_the_same(store: KeyStore, clock: WallClock) -> None:
    issued = store.create_key("acme")
    engine = engine_for(store, clock, default_limits="1/minute")

    async def twice() -> None:
        await engine.acheck("GET", "/orders", None, issued.key)
        await engine.acheck("GET", "/orders", None, issued.key)

    asyncio.run(twice())
    engine.flush()
    (row,) = store.usage()
    assert counts(row) == (1, 0, 1, 1)


def test_public_paths_and_unusable_credentials_are_nobody_s_usage(
    store: KeyStore, clock: WallClock
) -> None:
    issued = store.create_key("acme")
    revoked = store.create_key("acme")
    store.revoke_key(revoked.record.key_id)
    engine = engine_for(store, clock)
    assert get(engine, None, "/health").allowed
    assert get(engine, issued.key, "/health").allowed  # a key on a public path: not checked
    missing = get(engine, None)
    assert isinstance(missing, Denied) and missing.error == "missing_credentials"
    for bad in (issued.key[:-1] + "x", "m2m_" + "A" * 40, revoked.key):
        outcome = get(engine, bad)
        assert isinstance(outcome, Denied) and outcome.error == "invalid_token", bad
    engine.flush()
    assert store.usage() == []


# -- JWT clients --------------------------------------------------------------------------


def test_an_identity_provider_s_token_is_counted_with_no_key(clock: WallClock) -> None:
    engine = Engine(
        Settings(
            schemes=("jwt",),
            jwt_keys=SECRET,
            rate_limit_storage="memory://",
            default_limits="1000/minute",
        ),
        telemetry_clock=clock,
    )
    token = hs256(claims(sub="svc-a"))
    for _ in range(2):
        assert engine.check("GET", "/orders", f"Bearer {token}", None).allowed
    bad = hs256(claims(sub="svc-a"), secret=SECRET[::-1])
    assert not engine.check("GET", "/orders", f"Bearer {bad}", None).allowed
    engine.flush()
    (row,) = engine.store.usage()
    assert (row.client_id, row.key_id, counts(row)) == ("svc-a", None, (2, 0, 0, 2))


def test_our_own_token_is_counted_under_the_key_it_came_from(clock: WallClock) -> None:
    store = MemoryKeyStore()
    record = store.create_key("billing", scopes=["orders:read"]).record
    engine = Engine(
        Settings(
            key_store=store,
            schemes=("api_key", "jwt"),
            rate_limit_storage="memory://",
            token_endpoint="/oauth/token",
            token_issuer="https://api.example.test",
            signing_key_secret="usage tests: a signing secret",
            invalidation_url="",
        ),
        telemetry_clock=clock,
    )
    assert engine.signing_keys is not None
    now = int(time.time())
    token = engine.signing_keys.current_signing_key().sign(
        {
            "iss": "https://api.example.test",
            "sub": "billing",
            "client_id": "billing",
            "aud": "https://api.example.test",
            "iat": now,
            "exp": now + 300,
            "jti": "usage-test-1",
            "scope": "orders:read",
            "key_id": record.key_id,
        }
    )
    outcome = engine.check("GET", "/orders", f"Bearer {token}", None)
    assert outcome.allowed, outcome
    engine.flush()
    (row,) = store.usage()
    assert (row.client_id, row.key_id, row.allowed) == ("billing", record.key_id, 1)
    engine.close()


# -- refused by the application -------------------------------------------------------------


def test_a_refusal_by_the_application_moves_the_request_to_denied(
    store: KeyStore, clock: WallClock
) -> None:
    from m2m_middleware.scopes import ScopeRequirement

    issued = store.create_key("acme")
    engine = engine_for(store, clock)
    admitted = get(engine, issued.key)
    assert isinstance(admitted, Allowed) and admitted.client is not None
    engine.app_refused(ScopeRequirement(["admin"]).refuse(admitted.client, engine.realm))
    engine.flush()
    (row,) = store.usage()
    assert (row.allowed, row.denied) == (0, 1)


def test_a_refusal_after_a_flush_still_sums_to_denied(store: KeyStore, clock: WallClock) -> None:
    from m2m_middleware.scopes import ScopeRequirement

    issued = store.create_key("acme")
    engine = engine_for(store, clock)
    admitted = get(engine, issued.key)
    assert admitted.client is not None
    engine.flush()  # the background thread may write between the gate and the view
    engine.app_refused(ScopeRequirement(["admin"]).refuse(admitted.client, engine.realm))
    engine.flush()
    (row,) = store.usage()
    assert (row.allowed, row.denied) == (0, 1)


# -- flushing -------------------------------------------------------------------------------


def test_nothing_is_written_before_a_flush(store: KeyStore, clock: WallClock) -> None:
    issued = store.create_key("acme")
    engine = engine_for(store, clock)
    get(engine, issued.key)
    assert store.usage() == []  # no database write per request
    engine.flush()
    assert len(store.usage()) == 1
    engine.flush()  # nothing new: nothing added twice
    assert [r.allowed for r in store.usage()] == [1]


def test_a_failed_flush_keeps_the_counts_for_the_next(
    store: KeyStore, clock: WallClock, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    issued = store.create_key("acme")
    engine = engine_for(store, clock)
    assert engine.telemetry is not None and engine.telemetry.usage is not None
    counter = engine.telemetry.usage
    table = counter.table
    real_add = table.add

    def down(rows: Any) -> None:
        raise StoreUnavailable("usage table unreachable")

    monkeypatch.setattr(table, "add", down)
    get(engine, issued.key)
    with pytest.raises(StoreUnavailable):
        engine.flush()
    get(engine, issued.key)  # counted meanwhile
    with caplog.at_level("ERROR", logger="m2m_middleware"):
        assert counter.flush_quietly() is False
        assert counter.flush_quietly() is False
    failures = [r for r in caplog.records if "could not be written" in r.getMessage()]
    assert len(failures) == 1  # once per outage, not per attempt
    monkeypatch.setattr(table, "add", real_add)
    engine.flush()
    (row,) = store.usage()
    assert counts(row) == (2, 0, 0, 2)
    assert counter.pending() == {}


def test_a_row_the_database_refuses_does_not_hold_back_every_other_clients_counts(
    store: KeyStore, clock: WallClock, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    """A row refused for what it holds (not an outage) would fail every later flush if
    kept, and every client's billing with it: it is dropped, logged, and the rest written."""
    good = store.create_key("acme")
    bad = store.create_key("refused-client")
    engine = engine_for(store, clock)
    assert engine.telemetry is not None and engine.telemetry.usage is not None
    counter = engine.telemetry.usage
    table = counter.table
    real_add = table.add

    def picky(rows: Any) -> None:
        if any(r.client_id == "refused-client" for r in rows):
            raise KeyStoreError("value too long for type character varying(255)")
        real_add(rows)

    monkeypatch.setattr(table, "add", picky)
    get(engine, good.key)
    get(engine, bad.key)
    with caplog.at_level("ERROR", logger="m2m_middleware"):
        engine.flush()
    assert [(r.client_id, r.allowed) for r in store.usage()] == [("acme", 1)]
    assert counter.pending() == {}  # not kept to fail again
    lost = [r for r in caplog.records if "refused by the database" in r.getMessage()]
    assert len(lost) == 1 and "refused-client" in lost[0].getMessage()
    get(engine, good.key)
    engine.flush()  # the next flush is not held back either
    assert [(r.client_id, r.allowed) for r in store.usage()] == [("acme", 2)]


def test_an_outage_while_writing_rows_one_by_one_keeps_the_unwritten(
    store: KeyStore, clock: WallClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = store.create_key("a-client"), store.create_key("b-client")
    engine = engine_for(store, clock)
    assert engine.telemetry is not None and engine.telemetry.usage is not None
    counter = engine.telemetry.usage
    table = counter.table
    real_add = table.add
    calls: list[int] = []

    def refuses_then_goes_down(rows: Any) -> None:
        calls.append(len(rows))
        if len(rows) > 1:
            raise KeyStoreError("refused together")
        if rows[0].client_id == "b-client":
            raise StoreUnavailable("connection lost")
        real_add(rows)

    monkeypatch.setattr(table, "add", refuses_then_goes_down)
    get(engine, first.key)
    get(engine, second.key)
    with pytest.raises(StoreUnavailable):
        engine.flush()
    assert [r.client_id for r in store.usage()] == ["a-client"]
    assert [bucket[0] for bucket in counter.pending()] == ["b-client"]  # kept, not lost
    monkeypatch.setattr(table, "add", real_add)
    engine.flush()
    assert sorted((r.client_id, r.allowed) for r in store.usage()) == [
        ("a-client", 1),
        ("b-client", 1),
    ]


def test_an_engine_closed_writes_what_it_counted(store: KeyStore, clock: WallClock) -> None:
    issued = store.create_key("acme")
    engine = Engine(
        Settings(key_store=store, rate_limit_storage="memory://"), telemetry_clock=clock
    )
    get(engine, issued.key)
    assert engine.telemetry is not None and engine.telemetry.usage is not None
    engine.telemetry.close()  # what engine.close() does first, before the store closes
    assert [r.allowed for r in store.usage()] == [1]


#: Counts two requests and exits with no flush and no close, as a short job does.
COUNT_THEN_EXIT = textwrap.dedent(
    """
    import sys
    from m2m_middleware import Engine, Settings

    engine = Engine(Settings(key_store=sys.argv[1], rate_limit_storage="memory://"))
    for _ in range(2):
        assert engine.check("GET", "/orders", None, sys.argv[2]).allowed
    engine.check("GET", "/orders", None, "m2m_" + "A" * 40)  # not counted
    """
)


def test_a_process_that_exits_without_a_flush_writes_its_counts(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "usage.db")
    store = open_key_store(url)
    issued = store.create_key("acme")
    store.close()
    done = subprocess.run(
        [sys.executable, "-c", COUNT_THEN_EXIT, url, issued.key],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    reader = open_key_store(url)
    try:
        if not _keeps_usage_in_its_file(reader):
            pytest.skip("SQLite usage table not on this branch yet (the memory fallback)")
        rows = reader.usage()
        assert [(r.client_id, r.key_id, r.allowed) for r in rows] == [
            ("acme", issued.record.key_id, 2)
        ]
    finally:
        reader.close()


def _keeps_usage_in_its_file(store: KeyStore) -> bool:
    from m2m_middleware.telemetry.tables import MemoryUsageTable, usage_table_for

    return not isinstance(usage_table_for(store), MemoryUsageTable)


#: Counts in the parent, forks; each process says what it has pending.
FORK_THEN_COUNT = textwrap.dedent(
    """
    import json, os, sys
    from m2m_middleware import Engine, Settings, open_key_store

    store = open_key_store("memory://")
    key = store.create_key("acme").key
    engine = Engine(Settings(key_store=store, rate_limit_storage="memory://"))
    for _ in range(3):
        engine.check("GET", "/", None, key)
    counter = engine.telemetry.usage
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        engine.check("GET", "/", None, key)
        pending = [counts for counts in counter.pending().values()]
        os.write(writer, json.dumps(pending).encode())
        os._exit(0)
    os.close(writer)
    child = json.loads(os.read(reader, 4096))
    os.waitpid(pid, 0)
    parent = [counts for counts in counter.pending().values()]
    print(json.dumps({"parent": parent, "child": child}))
    """
)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() on this platform")
def test_a_forked_child_starts_with_no_counts_of_its_parent() -> None:
    # In a process of its own: forking the test process would copy pytest's threads.
    done = subprocess.run(
        [sys.executable, "-c", FORK_THEN_COUNT], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["parent"] == [[3, 0, 0, 3]]  # the parent's to write, once
    assert seen["child"] == [[1, 0, 0, 1]]  # only what the child counted


def test_the_flushing_thread_writes_when_the_interval_is_due(
    store: KeyStore, clock: WallClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    issued = store.create_key("acme")
    engine = engine_for(store, clock, usage_flush_interval=30)
    assert engine.telemetry is not None and engine.telemetry.usage is not None
    counter = engine.telemetry.usage
    monotonic = [1000.0]
    monkeypatch.setattr(usage_module, "_monotonic", lambda: monotonic[0])
    get(engine, issued.key)  # enrols the counter: due 30 s from now
    assert counter._thread is not None and counter._thread.is_alive()
    monotonic[0] += 29
    usage_module.flush_due(monotonic[0])
    assert store.usage() == []
    monotonic[0] += 1
    usage_module.flush_due(monotonic[0])
    assert [r.allowed for r in store.usage()] == [1]
    get(engine, issued.key)
    usage_module.flush_due(monotonic[0] + 29)  # the next is due an interval later
    assert [r.allowed for r in store.usage()] == [1]
    usage_module.flush_due(monotonic[0] + 30)
    assert [r.allowed for r in store.usage()] == [2]


def test_the_real_thread_flushes_without_being_asked(store: KeyStore, clock: WallClock) -> None:
    issued = store.create_key("acme")
    engine = engine_for(store, clock, usage_flush_interval=1)
    get(engine, issued.key)
    deadline = time.monotonic() + 10
    while not store.usage() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [r.allowed for r in store.usage()] == [1]


def test_counts_from_many_threads_are_exact(store: KeyStore, clock: WallClock) -> None:
    from concurrent.futures import ThreadPoolExecutor

    issued = store.create_key("acme")
    engine = engine_for(store, clock, default_limits="100000/minute")
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda _: get(engine, issued.key), range(800)))
    engine.flush()
    (row,) = store.usage()
    assert row.allowed == 800


def test_two_engines_on_one_store_add_up(store: KeyStore, clock: WallClock) -> None:
    issued = store.create_key("acme")
    first, second = engine_for(store, clock), engine_for(store, clock)
    get(first, issued.key)
    get(second, issued.key)
    get(second, issued.key)
    first.flush()
    second.flush()
    assert [r.allowed for r in store.usage()] == [3]


# -- turned off, and settings -------------------------------------------------------------


def test_usage_false_counts_nothing(store: KeyStore, clock: WallClock) -> None:
    issued = store.create_key("acme")
    engine = engine_for(store, clock, usage=False, alerts=False)
    assert engine.telemetry is None  # nothing on at all: nothing on the hot path
    get(engine, issued.key)
    engine.flush()
    assert store.usage() == []
    with_alerts = engine_for(store, clock, usage=False)
    get(with_alerts, issued.key)
    with_alerts.flush()
    assert store.usage() == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("usage", "yes"),
        ("usage", 1),
        ("usage_flush_interval", 0),
        ("usage_flush_interval", 0.5),
        ("usage_flush_interval", 7200),
        ("usage_flush_interval", "10"),
        ("usage_flush_interval", True),
        ("usage_flush_interval", float("nan")),
        ("usage_retention_days", 0),
        ("usage_retention_days", 1.5),
        ("usage_retention_days", "90"),
    ],
)
def test_a_bad_usage_setting_names_its_field(field: str, value: Any) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings(**{field: value})
    assert raised.value.field == field
    assert field in str(raised.value)
    with pytest.raises(ConfigError) as mapped:
        Settings.from_mapping({field: value})
    assert mapped.value.field == field


def test_usage_settings_are_read_from_a_mapping() -> None:
    settings = Settings.from_mapping(
        {"usage": False, "usage_flush_interval": 2.5, "usage_retention_days": 7}
    )
    assert (settings.usage, settings.usage_flush_interval, settings.usage_retention_days) == (
        False,
        2.5,
        7,
    )


def test_store_usage_refuses_bad_arguments_by_name(store: KeyStore) -> None:
    with pytest.raises(ValueError, match="granularity"):
        store.usage(granularity="week")
    with pytest.raises(ValueError, match="since"):
        store.usage(since=datetime(2026, 1, 1))  # naive: which zone?
    with pytest.raises(ValueError, match="until"):
        store.usage(until="2026-01-01")  # type: ignore[arg-type]


def test_old_hours_are_rolled_into_days_after_the_retention(
    store: KeyStore, clock: WallClock
) -> None:
    issued = store.create_key("acme")
    engine = engine_for(store, clock, usage_retention_days=2)
    get(engine, issued.key)
    engine.flush()
    clock.advance(3 * 86400)
    get(engine, issued.key)
    engine.flush()
    hours = store.usage()
    # The old hour answers as its day; the new one is still an hour.
    assert [(r.period_start, r.allowed) for r in hours] == [
        (datetime(2026, 3, 14, tzinfo=timezone.utc), 1),
        (HOUR + timedelta(days=3), 1),
    ]
    assert [r.allowed for r in store.usage(granularity="month")] == [2]


def test_a_flush_with_nothing_counted_touches_no_table(
    store: KeyStore, clock: WallClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = engine_for(store, clock)
    assert engine.telemetry is not None and engine.telemetry.usage is not None
    table = engine.telemetry.usage.table
    touched: list[str] = []
    for name in ("add", "roll_up", "add_alerts"):
        monkeypatch.setattr(table, name, lambda *a, _n=name, **k: touched.append(_n))
    engine.flush()
    usage_module._flush_at_exit()  # what the process does as it ends
    assert touched == []


def test_closing_the_store_writes_its_counts_and_then_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = sqlite_url(tmp_path / "closing.db")
    store = open_key_store(url)
    issued = store.create_key("acme")
    engine = Engine(Settings(key_store=store, rate_limit_storage="memory://"))
    admitted = get(engine, issued.key)
    assert admitted.client is not None
    assert engine.telemetry is not None and engine.telemetry.usage is not None
    counter = engine.telemetry.usage
    table = counter.table
    store.close()  # the engine is left open, as an app's shutdown may leave it
    reader = open_key_store(url)
    assert [r.allowed for r in reader.usage()] == [1]
    reader.close()
    touched: list[str] = []
    monkeypatch.setattr(table, "add", lambda rows: touched.append("add"))
    counter.count(admitted.client, usage_module.ALLOWED)  # a request still in flight
    usage_module._flush_at_exit()  # a store closed is not written to again (its file may be gone)
    assert touched == []
