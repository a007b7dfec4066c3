"""Usage tables of every key store (memory, SQLite, PostgreSQL, Django on both):
additive counts, hour/day/month sums, filters, roll-up, alerts, damaged rows (issue 14)."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from conftest import make_store
from core_support import make_engine, sqlite_url

from m2m_middleware import ConfigError, KeyStore, StoreUnavailable, open_key_store
from m2m_middleware.errors import KeyStoreError
from m2m_middleware.stores import MemoryKeyStore, SQLiteKeyStore
from m2m_middleware.telemetry.records import Alert, UsageRow
from m2m_middleware.telemetry.tables import ALERTS_KEPT, usage_table_for

UTC = timezone.utc
#: A Monday in March, 05:00 UTC: the hours below stay inside one day, the days inside March.
T = datetime(2027, 3, 15, 5, tzinfo=UTC)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)


def row(
    client: str = "client-a",
    key: str | None = "key_a",
    at: datetime = T,
    allowed: int = 0,
    denied: int = 0,
    rate_limited: int = 0,
    units: int = 0,
) -> UsageRow:
    return UsageRow(client, key, at, allowed, denied, rate_limited, units)


def counts(rows: list[UsageRow]) -> list[tuple[Any, ...]]:
    return [
        (r.client_id, r.key_id, r.period_start, r.allowed, r.denied, r.rate_limited, r.units)
        for r in rows
    ]


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
        "django",
        pytest.param("django-postgres", marks=pytest.mark.postgres),
    ]
)
def database_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KeyStore]:
    """Each store kind whose rows live in a database someone could damage by hand."""
    the_store = make_store(request.param, tmp_path, request)
    yield the_store
    the_store.close()


@pytest.fixture(params=["django", pytest.param("django-postgres", marks=pytest.mark.postgres)])
def django_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KeyStore]:
    the_store = make_store(request.param, tmp_path, request)
    yield the_store
    the_store.close()


def kind_of(store: KeyStore) -> str:
    if isinstance(store, MemoryKeyStore):
        return "memory"
    if isinstance(store, SQLiteKeyStore):
        return "sqlite"
    if type(store).__module__.endswith("django.store"):
        from django.db import connections

        return "django-" + connections[store.using].vendor  # type: ignore[attr-defined]
    return "postgres"


def execute(store: KeyStore, sql: str) -> None:
    """Raw SQL on the store's own database (``{usage}``/``{alerts}``: its table names)."""
    kind = kind_of(store)
    if kind.startswith("django"):
        from django.db import connections

        from m2m_middleware.django.models import AlertRecord, UsageCount

        sql = sql.format(usage=UsageCount._meta.db_table, alerts=AlertRecord._meta.db_table)
        with connections[store.using].cursor() as cursor:  # type: ignore[attr-defined]
            cursor.execute(sql)
    elif kind == "sqlite":
        sql = sql.format(usage="m2m_usage", alerts="m2m_alerts")
        with closing(sqlite3.connect(store.path)) as conn, conn:  # type: ignore[attr-defined]
            conn.execute(sql)
    else:
        sql = sql.format(usage="m2m_usage", alerts="m2m_alerts")
        store._run(lambda conn: conn.execute(sql))  # type: ignore[attr-defined]


# -- adding ---------------------------------------------------------------------------


def test_adding_the_same_hour_twice_sums_it(store: KeyStore) -> None:
    table = usage_table_for(store)
    table.add([row(allowed=2, denied=1, rate_limited=3, units=7)])
    table.add([row(allowed=1, units=1), row(at=T + timedelta(minutes=30), denied=4)])
    assert counts(store.usage()) == [("client-a", "key_a", T, 3, 5, 3, 8)]


def test_keys_clients_and_no_key_are_rows_of_their_own(store: KeyStore) -> None:
    table = usage_table_for(store)
    table.add(
        [
            row(allowed=1),
            row(key="key_b", allowed=2),
            row(client="client-b", key=None, allowed=3),  # a token from an outside IdP
        ]
    )
    assert counts(store.usage()) == [
        ("client-a", "key_a", T, 1, 0, 0, 0),
        ("client-a", "key_b", T, 2, 0, 0, 0),
        ("client-b", None, T, 3, 0, 0, 0),
    ]
    for found in store.usage():
        assert found.period_start.tzinfo is not None
        assert found.period_start.utcoffset() == timedelta(0)


def test_a_moved_request_is_written_though_it_adds_no_requests(store: KeyStore) -> None:
    table = usage_table_for(store)
    table.add([row(allowed=1)])
    table.add([row(allowed=-1, denied=1)])  # admitted, then refused by require_scopes
    assert counts(store.usage()) == [("client-a", "key_a", T, 0, 1, 0, 0)]


def in_threads(store: KeyStore, work: Any, count: int) -> list[BaseException]:
    """``work()`` in ``count`` threads started at once; the errors they met."""
    start = threading.Barrier(count)
    errors: list[BaseException] = []

    def run() -> None:
        start.wait()
        try:
            work()
        except BaseException as exc:
            errors.append(exc)
        finally:
            if kind_of(store).startswith("django"):
                from django.db import connections

                connections.close_all()  # this thread's own connections only

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return errors


def test_threads_adding_at_once_sum_exactly(store: KeyStore) -> None:
    table = usage_table_for(store)

    def flush() -> None:
        for _ in range(10):
            table.add([row(allowed=1, units=2), row(client="client-b", rate_limited=1)])

    assert in_threads(store, flush, 4) == []
    assert counts(store.usage()) == [
        ("client-a", "key_a", T, 40, 0, 0, 80),
        ("client-b", "key_a", T, 0, 0, 40, 0),
    ]


def test_the_engine_flush_writes_what_it_counted(store: KeyStore) -> None:
    issued = store.create_key("client-a")
    engine = make_engine(store)
    for _ in range(3):
        assert engine.check("GET", "/x", None, issued.key).allowed
    engine.flush()
    (found,) = store.usage()
    assert (found.client_id, found.key_id, found.allowed) == ("client-a", issued.key_id, 3)
    engine.flush()  # nothing pending: nothing added twice
    assert store.usage()[0].allowed == 3


# -- reading: granularities and filters -----------------------------------------------


def fill(store: KeyStore) -> None:
    usage_table_for(store).add(
        [
            row(at=T, allowed=1),
            row(at=T + HOUR, allowed=2, units=5),
            row(at=T + DAY, denied=3),
            row(at=T + 20 * DAY, rate_limited=4),  # April 4th
            row(client="client-b", at=T + HOUR, allowed=10),
            row(key="key_b", at=T, allowed=100),
        ]
    )


def test_hour_day_and_month_sums(store: KeyStore) -> None:
    fill(store)
    day = T.replace(hour=0)
    assert counts(store.usage(client_id="client-a", key_id="key_a")) == [
        ("client-a", "key_a", T, 1, 0, 0, 0),
        ("client-a", "key_a", T + HOUR, 2, 0, 0, 5),
        ("client-a", "key_a", T + DAY, 0, 3, 0, 0),
        ("client-a", "key_a", T + 20 * DAY, 0, 0, 4, 0),
    ]
    assert counts(store.usage(client_id="client-a", key_id="key_a", granularity="day")) == [
        ("client-a", "key_a", day, 3, 0, 0, 5),
        ("client-a", "key_a", day + DAY, 0, 3, 0, 0),
        ("client-a", "key_a", day + 20 * DAY, 0, 0, 4, 0),
    ]
    march, april = datetime(2027, 3, 1, tzinfo=UTC), datetime(2027, 4, 1, tzinfo=UTC)
    assert counts(store.usage(granularity="month")) == [
        ("client-a", "key_a", march, 3, 3, 0, 5),
        ("client-a", "key_b", march, 100, 0, 0, 0),
        ("client-b", "key_a", march, 10, 0, 0, 0),
        ("client-a", "key_a", april, 0, 0, 4, 0),
    ]


def test_filters_by_client_and_key(store: KeyStore) -> None:
    fill(store)
    assert {r.client_id for r in store.usage(client_id="client-b")} == {"client-b"}
    assert [r.allowed for r in store.usage(key_id="key_b")] == [100]
    assert store.usage(client_id="client-b", key_id="key_b") == []
    assert store.usage(client_id="nobody") == []


def test_since_rounds_down_to_its_period(store: KeyStore) -> None:
    fill(store)
    mid = T + timedelta(minutes=59)
    by_hour = store.usage(key_id="key_a", client_id="client-a", since=mid)
    assert by_hour[0].period_start == T
    by_day = store.usage(client_id="client-a", key_id="key_a", since=T, granularity="day")
    assert by_day[0].period_start == T.replace(hour=0)
    assert by_day[0].allowed == 3  # the whole day, not the hours after 05:00
    by_month = store.usage(since=T + 20 * DAY, granularity="month")
    assert [r.period_start.month for r in by_month] == [4]


def test_until_is_exclusive(store: KeyStore) -> None:
    fill(store)
    kept = store.usage(client_id="client-a", key_id="key_a", until=T + HOUR)
    assert [r.period_start for r in kept] == [T]
    assert store.usage(client_id="client-a", key_id="key_a", since=T, until=T) == []
    # A period that starts before ``until`` is counted whole.
    by_month = store.usage(until=datetime(2027, 3, 2, tzinfo=UTC), granularity="month")
    assert sum(r.requests for r in by_month) == 3 + 3 + 100 + 10
    by_day = store.usage(client_id="client-a", key_id="key_a", until=T, granularity="day")
    assert [(r.period_start, r.allowed) for r in by_day] == [(T.replace(hour=0), 3)]


def test_an_empty_table_reads_as_no_rows(store: KeyStore) -> None:
    for granularity in ("hour", "day", "month"):
        assert store.usage(granularity=granularity) == []
    assert store.alerts() == []


# -- rolling up -----------------------------------------------------------------------


def test_roll_up_turns_old_hours_into_days(store: KeyStore) -> None:
    fill(store)
    table = usage_table_for(store)
    day = T.replace(hour=0)
    table.roll_up(day + DAY)  # the hours of March 15th, not the 16th's
    by_hour = store.usage(client_id="client-a", key_id="key_a")
    assert counts(by_hour) == [
        ("client-a", "key_a", day, 3, 0, 0, 5),  # one daily row where two hours were
        ("client-a", "key_a", T + DAY, 0, 3, 0, 0),
        ("client-a", "key_a", T + 20 * DAY, 0, 0, 4, 0),
    ]
    before = counts(store.usage(granularity="month"))
    table.roll_up(day + DAY)  # again: nothing left to move, nothing counted twice
    table.roll_up(day + 30 * DAY)
    assert counts(store.usage(granularity="month")) == before
    assert [r.period_start for r in store.usage(client_id="client-b")] == [day]


def test_roll_up_adds_into_a_day_already_rolled(store: KeyStore) -> None:
    table = usage_table_for(store)
    day = T.replace(hour=0)
    table.add([row(at=T, allowed=1)])
    table.roll_up(day + DAY)
    table.add([row(at=T + 2 * HOUR, allowed=2)])  # a late flush into a rolled-up day
    assert [r.allowed for r in store.usage(granularity="day")] == [3]
    table.roll_up(day + DAY)
    assert counts(store.usage()) == [("client-a", "key_a", day, 3, 0, 0, 0)]


def test_two_roll_ups_at_once_count_each_hour_once(store: KeyStore) -> None:
    table = usage_table_for(store)
    table.add([row(at=T + n * HOUR, allowed=1) for n in range(6)])
    assert in_threads(store, lambda: table.roll_up(T + DAY), 3) == []
    assert counts(store.usage()) == [("client-a", "key_a", T.replace(hour=0), 6, 0, 0, 0)]


# -- alerts ---------------------------------------------------------------------------


def alert(n: int, at: datetime) -> Alert:
    return Alert("auth_failures", f"192.0.2.{n % 250}", n, 60, f"alert {n}", fired_at=at)


def test_alerts_newest_first_with_since_and_limit(store: KeyStore) -> None:
    table = usage_table_for(store)
    table.add_alerts([alert(1, T), alert(3, T + 2 * HOUR)])
    table.add_alerts([alert(2, T + HOUR)])  # another process's, flushed later
    assert [a.count for a in store.alerts()] == [3, 2, 1]
    assert [a.count for a in store.alerts(limit=2)] == [3, 2]
    assert [a.count for a in store.alerts(since=T + HOUR)] == [3, 2]
    newest = store.alerts()[0]
    assert newest == alert(3, T)  # every field read back (fired_at is not compared)
    assert newest.fired_at == T + 2 * HOUR


def test_the_alerts_kept_are_capped_newest_kept(store: KeyStore) -> None:
    table = usage_table_for(store)
    table.add_alerts([alert(n, T + timedelta(seconds=n)) for n in range(ALERTS_KEPT + 5)])
    table.add_alerts(
        [alert(n, T + timedelta(seconds=n)) for n in range(ALERTS_KEPT + 5, ALERTS_KEPT + 8)]
    )
    kept = store.alerts(limit=ALERTS_KEPT * 2)
    assert len(kept) == ALERTS_KEPT
    assert kept[0].count == ALERTS_KEPT + 7
    assert kept[-1].count == 8


# -- what goes wrong ------------------------------------------------------------------

BAD_USAGE = {
    "sqlite": [
        "UPDATE {usage} SET allowed = 'many'",
        "UPDATE {usage} SET units = 1.5",
        "UPDATE {usage} SET period_start = 'yesterday'",
        "UPDATE {usage} SET period_start = 1e300",
        "UPDATE {usage} SET client_id = x'ff'",
    ],
    "postgres": ["UPDATE {usage} SET period_start = 'infinity'"],
    "django-sqlite": [
        "UPDATE {usage} SET allowed = 'many'",
        "UPDATE {usage} SET period_start = 'yesterday'",
    ],
    "django-postgresql": ["UPDATE {usage} SET period_start = 'infinity'"],
}
BAD_ALERTS = {
    "sqlite": ["UPDATE {alerts} SET fired_at = 'x'", "UPDATE {alerts} SET count = 'x'"],
    "postgres": ["UPDATE {alerts} SET fired_at = 'infinity'"],
    "django-sqlite": ["UPDATE {alerts} SET count = 'x'"],
    "django-postgresql": ["UPDATE {alerts} SET fired_at = 'infinity'"],
}


def test_a_damaged_usage_row_is_a_store_error_naming_the_table(database_store: KeyStore) -> None:
    store = database_store
    kind = kind_of(store)
    for damage in BAD_USAGE[kind]:
        usage_table_for(store).add([row(allowed=1)])
        execute(store, damage)
        for granularity in ("hour", "day", "month"):
            with pytest.raises(KeyStoreError, match="usage") as caught:
                store.usage(granularity=granularity)
            assert not isinstance(caught.value, StoreUnavailable), damage
        execute(store, "DELETE FROM {usage}")


def test_a_damaged_alert_row_is_a_store_error_naming_the_table(database_store: KeyStore) -> None:
    store = database_store
    kind = kind_of(store)
    for damage in BAD_ALERTS[kind]:
        usage_table_for(store).add_alerts([alert(1, T)])
        execute(store, damage)
        with pytest.raises(KeyStoreError, match="alert") as caught:
            store.alerts()
        assert not isinstance(caught.value, StoreUnavailable), damage
        execute(store, "DELETE FROM {alerts}")


def test_an_sqlite_outage_is_store_unavailable(tmp_path: Path) -> None:
    store = open_key_store(sqlite_url(tmp_path / "no" / "such" / "dir" / "k.db"))
    table = usage_table_for(store)
    try:
        for call in (
            lambda: table.add([row(allowed=1)]),
            lambda: store.usage(),
            lambda: table.roll_up(T),
            lambda: table.add_alerts([alert(1, T)]),
            lambda: store.alerts(),
        ):
            with pytest.raises(StoreUnavailable):
                call()
    finally:
        store.close()


@pytest.mark.postgres
def test_a_postgres_outage_is_store_unavailable() -> None:
    import servers

    store = open_key_store(f"postgresql://127.0.0.1:{servers.free_port()}/test", timeout=1.0)
    table = usage_table_for(store)
    try:
        for call in (
            lambda: table.add([row(allowed=1)]),
            lambda: store.usage(),
            lambda: table.roll_up(T),
            lambda: table.add_alerts([alert(1, T)]),
            lambda: store.alerts(),
        ):
            with pytest.raises(StoreUnavailable):
                call()
    finally:
        store.close()


class OwnStore(KeyStore):
    """A store of the application's own, with no usage table."""

    def _unsupported(self, *args: object) -> Any:
        raise NotImplementedError

    _insert = _fetch = _fetch_by_hash = _fetch_all = _unsupported
    _set_revoked = _set_expiry = _take_use = _return_use = _drain_uses = _unsupported
    _write_last_used = _unsupported


def test_a_store_of_another_kind_keeps_no_usage_and_its_app_still_starts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with pytest.raises(ConfigError, match="key_store") as caught:
        usage_table_for(OwnStore())
    assert "usage=False" in str(caught.value)
    # Usage is on by default: an app on a store of its own must keep starting, told once.
    with caplog.at_level(logging.WARNING, logger="m2m_middleware"):
        engine = make_engine(OwnStore())
    assert engine.telemetry is not None and engine.telemetry.usage is None
    assert engine.telemetry.alerts is not None  # alerts still fire; they are not kept
    warnings = [r for r in caplog.records if "keeps no usage" in r.getMessage()]
    assert len(warnings) == 1 and "OwnStore" in warnings[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="m2m_middleware"):
        make_engine(OwnStore(), usage=False)  # said to be meant: nothing to warn of
        make_engine(OwnStore(), usage=False, alerts=False)
    assert not [r for r in caplog.records if "keeps no usage" in r.getMessage()]


def test_every_call_shares_one_table_per_store(tmp_path: Path) -> None:
    store = open_key_store(sqlite_url(tmp_path / "k.db"))
    try:
        assert usage_table_for(store) is usage_table_for(store)
        other = open_key_store(sqlite_url(tmp_path / "k.db"))
        assert usage_table_for(other) is not usage_table_for(store)
        other.close()
    finally:
        store.close()


def test_a_store_with_a_usage_table_is_still_freed(tmp_path: Path) -> None:
    import gc
    import weakref

    store = open_key_store(sqlite_url(tmp_path / "k.db"))
    usage_table_for(store).add([row(allowed=1)])
    store.close()
    dropped = weakref.ref(store)
    del store
    gc.collect()
    assert dropped() is None  # the tables kept per store do not keep their store


def test_the_sqlite_table_holds_no_secret(tmp_path: Path) -> None:
    path = tmp_path / "k.db"
    store = open_key_store(sqlite_url(path))
    issued = store.create_key("client-a")
    engine = make_engine(store)
    engine.check("GET", "/x", None, issued.key)
    engine.check("GET", "/x", None, issued.key[:-1] + "x")
    engine.flush()
    with closing(sqlite3.connect(path)) as conn:
        dumped = "\n".join(conn.iterdump())
    store.close()
    assert "m2m_usage" in dumped
    assert issued.key not in dumped and issued.key[4:-6] not in dumped


# -- PostgreSQL: an additive write is tried again only when it cannot have committed ----


def _kill_connections(base_url: str, app: str) -> None:
    import psycopg

    with psycopg.connect(base_url, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = %s",
            (app,),
        )
        deadline = time.monotonic() + 10
        while admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app,)
        ).fetchone() != (0,):
            assert time.monotonic() < deadline, "terminated backends did not exit"
            time.sleep(0.01)


@pytest.mark.postgres
def test_a_flush_on_a_killed_connection_is_tried_again_and_counted_once(
    postgres_url: str, postgres_base_url: str
) -> None:
    import servers

    app = servers.unique("m2m_usage")
    sep = "&" if "?" in postgres_url else "?"
    store = open_key_store(f"{postgres_url}{sep}application_name={app}")
    try:
        table = usage_table_for(store)
        table.add([row(allowed=1)])
        _kill_connections(postgres_base_url, app)  # a failover between two flushes
        table.add([row(allowed=1)])  # refused before BEGIN was sent: nothing ran
        assert [r.allowed for r in store.usage()] == [2]
    finally:
        store.close()


class LostAtCommit:
    """A connection whose COMMIT answer is lost (the server went away): it
    committed (``commits``) or it did not (``rolls_back``)."""

    def __init__(self, conn: Any, *, rolls_back: bool, commits: list[int]) -> None:
        self._conn = conn
        self._rolls_back = rolls_back
        self._commits = commits

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        import psycopg

        with self._conn.transaction() as tx:
            yield tx
            if self._rolls_back:
                raise psycopg.Rollback()
        self._commits.append(0 if self._rolls_back else 1)
        self._conn.close()
        raise psycopg.OperationalError("server closed the connection unexpectedly")


@pytest.mark.postgres
@pytest.mark.parametrize("rolls_back", [False, True], ids=["committed", "rolled_back"])
def test_a_flush_whose_commit_answer_is_lost_is_never_repeated(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, rolls_back: bool
) -> None:
    store = open_key_store(postgres_url)
    table = usage_table_for(store)
    table.add([row(allowed=1)])
    commits: list[int] = []
    real_run = store._run  # type: ignore[attr-defined]
    calls = iter([True])  # only the flush's own transaction loses its answer

    def run(work: Any, retry: bool = False) -> Any:
        if next(calls, False):
            return real_run(
                lambda c: work(LostAtCommit(c, rolls_back=rolls_back, commits=commits)),
                retry=retry,
            )
        return real_run(work, retry=retry)

    monkeypatch.setattr(store, "_run", run)
    try:
        if rolls_back:
            # Not applied: the store's error, and the counter keeps the counts
            # for its next flush, which adds them once.
            with pytest.raises(StoreUnavailable):
                table.add([row(allowed=1)])
        else:
            table.add([row(allowed=1)])  # applied: asked, and found committed
        assert len(commits) == 1  # never tried a second time
        assert [r.allowed for r in store.usage()] == [1 if rolls_back else 2]
    finally:
        store.close()


@pytest.mark.postgres
@pytest.mark.parametrize("rolls_back", [False, True], ids=["committed", "rolled_back"])
def test_a_django_flush_whose_commit_answer_is_lost_is_never_repeated(
    django_postgres_key_store: Any, monkeypatch: pytest.MonkeyPatch, rolls_back: bool
) -> None:
    from django.db import OperationalError, connections

    store = django_postgres_key_store
    table = usage_table_for(store)
    table.add([row(allowed=1)])
    connection = connections[store.using]
    commits: list[int] = []

    def lost() -> None:
        if rolls_back:
            connection._rollback()
        else:
            connection._commit()
        commits.append(1)
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(connection, "commit", lost)
    if rolls_back:
        with pytest.raises(StoreUnavailable):
            table.add([row(allowed=1)])
    else:
        table.add([row(allowed=1)])  # applied: asked, and found committed
    monkeypatch.undo()
    assert commits == [1]
    assert [r.allowed for r in store.usage()] == [1 if rolls_back else 2]


def test_a_django_create_that_loses_to_a_concurrent_one_adds_instead(
    django_store: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = django_store
    from django.db.models import QuerySet

    table = usage_table_for(store)
    table.add([row(allowed=1)])
    real_update = QuerySet.update
    raced: list[int] = []

    def update_after_another_process_inserted(self: Any, **changes: Any) -> int:
        # The first update ran before the other process's row was there: 0 rows,
        # so the create that follows meets that row (IntegrityError), and adds.
        if not raced:
            raced.append(1)
            return 0
        return real_update(self, **changes)

    monkeypatch.setattr(QuerySet, "update", update_after_another_process_inserted)
    table.add([row(allowed=2, units=1)])
    monkeypatch.undo()
    assert raced == [1]
    assert counts(store.usage()) == [("client-a", "key_a", T, 3, 0, 0, 1)]
