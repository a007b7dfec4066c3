"""A key store filled the way a few days of traffic would fill it, for the
dashboard's tests and its README screenshot (tests/dashboard/screenshot.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from m2m_middleware.keys import hash_key
from m2m_middleware.stores import KeyStore, open_key_store
from m2m_middleware.telemetry.records import Alert, UsageRow
from m2m_middleware.telemetry.tables import usage_table_for


def _next_minute() -> datetime:
    """ "Now" for a sample: after every write the store stamps with the real clock
    (a revocation), so the page's clock sees them in the past."""
    return datetime.now(timezone.utc).replace(second=0, microsecond=0) + timedelta(minutes=1)


#: A client name a key creator could choose to attack the page.
HOSTILE_CLIENT = '<img src=x onerror="alert(1)">evil'
HOSTILE_NAME = "<script>alert('name')</script>"


@dataclass
class Sample:
    store: KeyStore
    #: Plaintext keys and their hashes: none may ever appear on the page.
    secrets: list[str] = field(default_factory=list)
    key_ids: dict[str, str] = field(default_factory=dict)
    #: The clock to show the sample with.
    now: datetime = field(default_factory=_next_minute)


def sample_store(url: str = "memory://", *, hostile: bool = True) -> Sample:
    """Five clients' keys, a week of hourly usage and four alerts; with ``hostile``,
    one client id, key name and scope are markup a key creator chose to attack the page."""
    store = open_key_store(url)
    sample = Sample(store)
    now = sample.now
    if hostile:
        odd_client, odd_name, odd_scope = HOSTILE_CLIENT, HOSTILE_NAME, "x:<u>u</u>"
    else:
        odd_client, odd_name, odd_scope = "inventory", "inventory sync", "stock:read"

    def create(label: str, client: str, **options: object) -> None:
        issued = store.create_key(client, **options)  # type: ignore[arg-type]
        sample.secrets += [issued.key, hash_key(issued.key)]
        sample.key_ids[label] = issued.key_id

    create(
        "billing",
        "billing",
        name="billing worker",
        scopes=["orders:read", "invoices:write"],
        tier="gold",
    )
    create(
        "billing-old",
        "billing",
        name="billing (rotated)",
        scopes=["orders:read"],
        tier="gold",
        expires_at=now + timedelta(days=3),
    )
    create("reports", "reports", name="nightly reports", scopes=["orders:read"], max_uses=5000)
    create(
        "partner",
        "partner-acme",
        name="ACME integration",
        scopes=["orders:read"],
        tier="free",
        max_uses=40,
    )
    create("hostile", odd_client, name=odd_name, scopes=[odd_scope])
    create("revoked", "legacy-sync", name="old sync job")
    store.revoke_key(sample.key_ids["revoked"])
    for label, ago in (("billing", 1), ("reports", 10 * 3600), ("partner", 300), ("hostile", 7200)):
        store.mark_used(sample.key_ids[label], (now - timedelta(seconds=ago)).timestamp())
    store.flush_last_used()

    rows = []
    start = (now - timedelta(days=6)).replace(hour=0, minute=0, second=0, microsecond=0)
    hour = start
    index = 0
    while hour <= now:
        daytime = 8 <= hour.hour <= 19
        wave = (index * 7919) % 13  # a deterministic wobble, not random: screenshots repeat
        rows.append(
            UsageRow(
                "billing",
                sample.key_ids["billing"],
                hour,
                allowed=(90 if daytime else 25) + wave * 3,
                denied=wave % 3,
                rate_limited=(6 if hour.hour == 14 else 0),
                units=(90 if daytime else 25) + wave * 3,
            )
        )
        if hour.hour == 2:
            rows.append(
                UsageRow(
                    "reports",
                    sample.key_ids["reports"],
                    hour,
                    allowed=420 + wave * 10,
                    units=840 + wave * 20,
                )
            )
        if daytime and hour.day % 2 == 0:
            rows.append(
                UsageRow(
                    "partner-acme",
                    sample.key_ids["partner"],
                    hour,
                    allowed=2,
                    denied=1 + wave % 4,
                    rate_limited=(9 if hour.hour == 10 else 0),
                    units=2,
                )
            )
        if hour.hour == 12:
            rows.append(
                UsageRow(odd_client, sample.key_ids["hostile"], hour, allowed=5, denied=2, units=5)
            )
        hour += timedelta(hours=1)
        index += 1
    table = usage_table_for(store)
    table.add(rows)
    table.add_alerts(
        [
            Alert(
                "rate_limited",
                "partner-acme",
                9,
                60,
                "client partner-acme was rate limited 9 times in 60s",
                fired_at=now - timedelta(hours=2, minutes=30),
            ),
            Alert(
                "auth_failures",
                "203.0.113.7",
                20,
                300,
                "20 failed authentications from 203.0.113.7 in 300s",
                fired_at=now - timedelta(hours=5),
            ),
            Alert(
                "ended_keys",
                sample.key_ids["revoked"],
                3,
                3600,
                f"revoked key {sample.key_ids['revoked']} was tried 3 times in 3600s",
                fired_at=now - timedelta(days=1, hours=1),
            ),
            Alert(
                "client_failures",
                odd_client,
                12,
                300,
                f"{odd_name} failed 12 times",
                fired_at=now - timedelta(days=2),
            ),
        ]
    )
    return sample
