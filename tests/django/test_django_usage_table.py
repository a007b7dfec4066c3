"""Usage and alerts in the Django ORM: what is Django's own (time zones, the migration).

The behaviour every store shares (sums, granularities, filters, roll-up,
alerts, damaged rows) is in tests/core/test_usage_tables.py, on the
``django`` and ``django-postgres`` kinds of its ``store`` fixture.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest
from django.core.management import call_command
from django.test import override_settings

from m2m_middleware import KeyStoreError, open_key_store
from m2m_middleware.django.models import UsageCount
from m2m_middleware.django.store import DjangoKeyStore
from m2m_middleware.telemetry.records import Alert, UsageRow
from m2m_middleware.telemetry.tables import usage_table_for

pytestmark = pytest.mark.usefixtures("django_db")

UTC = timezone.utc
#: 23:00 UTC on March 15th: already March 16th in Paris, still the 15th in UTC.
LATE = datetime(2027, 3, 15, 23, tzinfo=UTC)


@pytest.fixture
def store() -> Iterator[DjangoKeyStore]:
    the_store = open_key_store("django://")
    assert isinstance(the_store, DjangoKeyStore)
    yield the_store
    the_store.close()


def test_periods_are_utc_when_use_tz_is_off(store: DjangoKeyStore) -> None:
    table = usage_table_for(store)
    with override_settings(USE_TZ=False, TIME_ZONE="Europe/Paris"):
        table.add([UsageRow("acme", "key_a", LATE, allowed=1)])
        table.add([UsageRow("acme", "key_a", LATE, allowed=2)])
        table.add([UsageRow("acme", "key_a", LATE + timedelta(hours=1), allowed=4)])
        hours = store.usage()
        days = store.usage(granularity="day")
        since = store.usage(since=LATE + timedelta(minutes=90))
        until = store.usage(until=LATE + timedelta(minutes=30))
        naive = UsageCount.objects.order_by("period_start").values_list("period_start", flat=True)
        stored = list(naive)
        table.roll_up(datetime(2027, 3, 17, tzinfo=UTC))
        rolled = store.usage(granularity="day")
        table.add_alerts([Alert("rate_limited", "acme", 5, 60, "five 429s", fired_at=LATE)])
        alerts = store.alerts(since=LATE)
    assert [(r.period_start, r.allowed) for r in hours] == [
        (LATE, 3),
        (LATE + timedelta(hours=1), 4),
    ]
    for found in (*hours, *days, *rolled):
        assert found.period_start.utcoffset() == timedelta(0)
    # Days are UTC days, whatever TIME_ZONE says: one bill, wherever it is read.
    assert [(r.period_start, r.allowed) for r in days] == [
        (datetime(2027, 3, 15, tzinfo=UTC), 3),
        (datetime(2027, 3, 16, tzinfo=UTC), 4),
    ]
    assert rolled == days
    assert [r.period_start for r in since] == [LATE + timedelta(hours=1)]
    assert [r.period_start for r in until] == [LATE]
    # Stored as Django stores naive times: in TIME_ZONE (Paris is an hour ahead in March).
    assert stored[0].tzinfo is None and stored[0] == datetime(2027, 3, 16, 0, 0)
    assert [a.fired_at for a in alerts] == [LATE]


def test_the_same_rows_read_alike_with_use_tz_on_and_off(store: DjangoKeyStore) -> None:
    table = usage_table_for(store)
    table.add([UsageRow("acme", None, LATE, allowed=1, units=3)])
    aware = store.usage(granularity="month")
    with override_settings(USE_TZ=False, TIME_ZONE="UTC"):
        table.add([UsageRow("acme", None, LATE, allowed=1, units=3)])
        naive = store.usage(granularity="month")
    assert [(r.key_id, r.allowed, r.units) for r in aware] == [(None, 1, 3)]
    assert [(r.period_start, r.key_id, r.allowed, r.units) for r in naive] == [
        (datetime(2027, 3, 1, tzinfo=UTC), None, 2, 6)
    ]


def test_the_tables_come_with_the_migration(store: DjangoKeyStore) -> None:
    try:
        call_command("migrate", "m2m_middleware", "0004", verbosity=0)
        with pytest.raises(KeyStoreError, match=r"manage\.py migrate"):
            store.usage()
        with pytest.raises(KeyStoreError, match=r"manage\.py migrate"):
            usage_table_for(store).add([UsageRow("acme", "key_a", LATE, allowed=1)])
    finally:
        call_command("migrate", "m2m_middleware", verbosity=0)
    usage_table_for(store).add([UsageRow("acme", "key_a", LATE, allowed=1)])
    assert [r.allowed for r in store.usage()] == [1]
