"""Alerts on unusual activity (issue 14 part 3), through the engine, with an injected clock.

Each rule fires exactly once per window per subject, again in the next window,
never below its threshold, with the thresholds configured; ``""`` turns a rule
off, ``alerts=False`` builds none. The engine's alerts are rebuilt on a
:class:`Clock` the test moves (fixed windows: where the window starts matters,
so the clock starts on a boundary of every window the tests use).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from core_support import make_engine

import m2m_middleware.telemetry.alerts as alerts_module
from m2m_middleware import Alert, Allowed, Client, Denied, Engine, KeyStore
from m2m_middleware.errors import InvalidToken, RateLimited
from m2m_middleware.keys import generate_key
from m2m_middleware.outcome import deny
from m2m_middleware.request_view import RequestView
from m2m_middleware.settings import Settings
from m2m_middleware.stores import MemoryKeyStore
from m2m_middleware.telemetry.alerts import Alerts

ADDRESS = "203.0.113.7"
#: A multiple of every window below (a minute, an hour, 10 s), so each test starts a window.
START = 3600.0 * 1000


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Fired(list[Alert]):
    """The alerts given to ``on_alert``, in order."""

    def kinds(self) -> list[str]:
        return [alert.kind for alert in self]

    def of(self, kind: str) -> list[Alert]:
        return [alert for alert in self if alert.kind == kind]


@pytest.fixture
def store() -> Iterator[KeyStore]:
    the_store = MemoryKeyStore()
    yield the_store
    the_store.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


Build = Callable[..., tuple[Engine, Fired]]


@pytest.fixture
def build(store: KeyStore, clock: Clock) -> Iterator[Build]:
    """``build(**settings) -> (engine, fired)``: an engine whose alerts run on ``clock``
    and report to ``fired`` (its ``on_alert``)."""
    engines: list[Engine] = []

    def make(**fields: Any) -> tuple[Engine, Fired]:
        fired = Fired()
        fields.setdefault("on_alert", fired.append)
        fields.setdefault("default_limits", "100000/minute")
        engine = make_engine(store, **fields)
        engines.append(engine)
        telemetry = engine.telemetry
        assert telemetry is not None
        telemetry.alerts = Alerts(engine.settings, telemetry.fire, clock=clock)
        return engine, fired

    yield make
    for engine in engines:
        engine.close()


def get(engine: Engine, key: str | None, peer: str | None = ADDRESS, path: str = "/") -> Any:
    if engine.needs_view:  # source_limits reads the request's address from its view
        headers = {"x-api-key": key} if key is not None else {}
        view = RequestView("GET", path, headers=headers, client_address=peer)
        return engine.check("GET", path, None, key, view=view)
    return engine.check("GET", path, None, key, peer)


def unknown_key(store: KeyStore) -> str:
    """A well-formed key (its checksum holds) that the store has never seen."""
    return generate_key()


# -- auth_failures: per source address ------------------------------------------------


def test_failed_authentications_from_one_address_fire_once_per_window(
    build: Build, store: KeyStore, clock: Clock
) -> None:
    engine, fired = build()
    for _ in range(19):
        assert get(engine, unknown_key(store)).status == 401
    assert fired == []  # below the default 20/minute
    get(engine, unknown_key(store))
    assert fired == [
        Alert(
            "auth_failures",
            ADDRESS,
            20,
            60,
            f"20 failed authentications from {ADDRESS} within 60s",
        )
    ]
    for _ in range(50):
        get(engine, unknown_key(store))
    assert len(fired) == 1  # once per window, however many more
    clock.advance(60)  # the next window
    for _ in range(19):
        get(engine, unknown_key(store))
    assert len(fired) == 1
    get(engine, unknown_key(store))
    assert fired.kinds() == ["auth_failures", "auth_failures"]


def test_each_address_is_its_own_subject_and_no_address_is_unknown(
    build: Build, store: KeyStore
) -> None:
    engine, fired = build(alert_auth_failures="3/minute")
    for peer in ["198.51.100.1", "198.51.100.2", None] * 3:
        get(engine, unknown_key(store), peer)
    assert sorted(alert.subject for alert in fired) == ["198.51.100.1", "198.51.100.2", "unknown"]


def test_missing_credentials_are_not_failed_authentications(build: Build) -> None:
    engine, fired = build(alert_auth_failures="3/minute")
    for _ in range(10):
        assert get(engine, None).error == "missing_credentials"
    assert fired == []


def test_a_bad_checksum_counts_as_a_failed_authentication(build: Build, store: KeyStore) -> None:
    engine, fired = build(alert_auth_failures="2/minute")
    key = store.create_key("acme").key
    forged = key[:-1] + ("A" if key[-1] != "A" else "B")
    get(engine, forged)
    get(engine, forged)
    assert fired.kinds() == ["auth_failures"]


def test_an_address_shut_out_by_source_limits_keeps_counting(build: Build, store: KeyStore) -> None:
    """source_limits tighter than the alert: the address's 429s are its failed attempts too,
    else a guesser would show as the few 401s it gets before its budget is spent."""
    engine, fired = build(alert_auth_failures="10/minute", source_limits="3/minute")
    replies = [get(engine, unknown_key(store)) for _ in range(10)]
    assert [r.status for r in replies] == [401] * 3 + [429] * 7
    assert fired.kinds() == ["auth_failures"]


def test_successful_requests_do_not_count(build: Build, store: KeyStore) -> None:
    engine, fired = build(alert_auth_failures="3/minute")
    key = store.create_key("acme").key
    for _ in range(10):
        assert get(engine, key).allowed
    assert fired == []


# -- rate_limited: per client ----------------------------------------------------------


def test_a_clients_429s_fire_rate_limited_once_per_window(
    build: Build, store: KeyStore, clock: Clock
) -> None:
    engine, fired = build(default_limits="2/minute", alert_rate_limited="5/minute")
    key = store.create_key("acme").key
    replies = [get(engine, key) for _ in range(2 + 4)]
    assert [r.allowed for r in replies] == [True, True] + [False] * 4
    assert fired == []
    get(engine, key)
    assert fired == [
        Alert("rate_limited", "acme", 5, 60, "client acme was rate limited 5 times within 60s")
    ]
    for _ in range(20):
        get(engine, key)
    assert len(fired) == 1
    clock.advance(60)  # the alert's next window; the limit's (real time) still refuses
    for _ in range(5):
        get(engine, key)
    assert fired.kinds() == ["rate_limited", "rate_limited"]


def test_rate_limited_is_not_a_client_failure(build: Build, store: KeyStore) -> None:
    engine, fired = build(
        default_limits="1/minute", alert_client_failures="2/minute", alert_rate_limited=""
    )
    key = store.create_key("acme").key
    for _ in range(10):
        get(engine, key)
    assert fired == []


# -- client_failures: per client -------------------------------------------------------


def test_refusals_of_a_known_client_fire_client_failures(build: Build, store: KeyStore) -> None:
    engine, fired = build(
        alert_client_failures="3/minute",
        routes=[{"path": "/orders", "scopes": ["orders:read"]}],
    )
    key = store.create_key("acme", scopes=["other"]).key
    for _ in range(3):
        assert get(engine, key, path="/orders").error == "insufficient_scope"
    (alert,) = fired
    assert (alert.kind, alert.subject, alert.count, alert.window_seconds) == (
        "client_failures",
        "acme",
        3,
        60,
    )
    assert "insufficient_scope" in alert.detail
    assert key not in alert.detail


def test_client_failures_fire_once_per_window_and_again_in_the_next(
    build: Build, store: KeyStore, clock: Clock
) -> None:
    engine, fired = build(
        alert_client_failures="2/minute", routes=[{"path": "/orders", "scopes": ["orders:read"]}]
    )
    key = store.create_key("acme").key
    other = store.create_key("other").key
    get(engine, key, path="/orders")
    get(engine, other, path="/orders")
    assert fired == []  # one each: below the threshold
    for _ in range(6):
        get(engine, key, path="/orders")
    assert [a.subject for a in fired] == ["acme"]
    clock.advance(60)
    get(engine, key, path="/orders")
    assert len(fired) == 1
    get(engine, key, path="/orders")
    assert [a.subject for a in fired] == ["acme", "acme"]


def test_a_require_scopes_refusal_counts_for_client_failures(build: Build, store: KeyStore) -> None:
    engine, fired = build(alert_client_failures="2/minute")
    key = store.create_key("acme").key
    outcome = get(engine, key)
    assert isinstance(outcome, Allowed)
    assert outcome.client is not None
    refusal = Denied(403, "insufficient_scope", [], b"", "needs a scope", outcome.client)
    engine.app_refused(refusal)
    assert fired == []
    engine.app_refused(refusal)
    assert fired.kinds() == ["client_failures"]
    assert fired[0].subject == "acme"


def test_quota_exceeded_counts_for_client_failures(build: Build, store: KeyStore) -> None:
    """No waiting cures it: a client still calling with a used-up key is broken or runaway."""
    engine, fired = build(alert_client_failures="2/minute")
    key = store.create_key("acme", max_uses=1).key
    assert get(engine, key).allowed
    assert get(engine, key).error == "quota_exceeded"
    assert fired == []
    get(engine, key)
    assert fired.kinds() == ["client_failures"]


def test_a_store_outage_is_no_client_failure(build: Build, store: KeyStore) -> None:
    engine, fired = build(alert_client_failures="1/minute")
    client = Client("acme", "api_key", key_id="k1")
    outage = Denied(503, "temporarily_unavailable", [], b"", "the store is down", client)
    telemetry = engine.telemetry
    assert telemetry is not None and telemetry.alerts is not None
    for _ in range(5):
        telemetry.alerts.observe(outage, ADDRESS)
    assert fired == []


def test_a_dead_key_counts_for_its_client_and_its_address(build: Build, store: KeyStore) -> None:
    engine, fired = build(
        alert_client_failures="2/minute", alert_auth_failures="2/minute", alert_ended_keys=""
    )
    issued = store.create_key("acme")
    store.revoke_key(issued.key_id)
    get(engine, issued.key)
    get(engine, issued.key)
    assert sorted(fired.kinds()) == ["auth_failures", "client_failures"]
    assert fired.of("client_failures")[0].subject == "acme"


# -- ended_keys: per key ---------------------------------------------------------------


def test_a_revoked_key_tried_fires_ended_keys_once_an_hour(
    build: Build, store: KeyStore, clock: Clock
) -> None:
    engine, fired = build()
    issued = store.create_key("acme")
    assert get(engine, issued.key).allowed
    store.revoke_key(issued.key_id)
    assert get(engine, issued.key).error == "invalid_token"
    (alert,) = fired.of("ended_keys")
    assert alert.subject == issued.key_id
    assert (alert.count, alert.window_seconds) == (1, 3600)
    assert alert.detail == (
        "a key of client acme tried 1 time(s) within 3600s after it ended: the API key was revoked"
    )
    assert issued.key not in alert.detail and issued.key[-16:] not in alert.detail
    for _ in range(30):
        get(engine, issued.key)
    assert len(fired.of("ended_keys")) == 1
    clock.advance(3600)
    get(engine, issued.key)
    assert len(fired.of("ended_keys")) == 2


def test_an_expired_key_tried_fires_ended_keys(build: Build, store: KeyStore) -> None:
    engine, fired = build()
    past = datetime.now(timezone.utc) - timedelta(minutes=1)
    issued = store.create_key("acme", expires_at=past)
    assert get(engine, issued.key).error == "invalid_token"
    assert [(a.kind, a.subject) for a in fired] == [("ended_keys", issued.key_id)]
    assert fired[0].detail.endswith(": the API key has expired")


def test_an_unknown_key_is_no_ended_key(build: Build, store: KeyStore) -> None:
    engine, fired = build()
    for _ in range(5):
        get(engine, unknown_key(store))
    assert fired.of("ended_keys") == []


def test_a_denial_marks_a_dead_key_and_only_a_dead_key(store: KeyStore) -> None:
    """What the rule reads: ``Denied.key_ended``, set for a revoked or expired key only."""
    engine = make_engine(store, alerts=False, usage=False)
    try:
        live = store.create_key("acme", scopes=["a"])
        dead = store.create_key("acme")
        store.revoke_key(dead.key_id)
        refused = engine.check("GET", "/", None, dead.key)
        assert isinstance(refused, Denied) and refused.key_ended
        assert refused.tried is not None and refused.tried.key_id == dead.key_id
        assert refused.client is None  # never an identity
        guess = engine.check("GET", "/", None, unknown_key(store))
        assert isinstance(guess, Denied) and not guess.key_ended and guess.tried is None
        assert engine.check("GET", "/", None, live.key).allowed
    finally:
        engine.close()


def test_a_token_from_a_revoked_key_fires_ended_keys_a_stale_token_does_not(
    store: KeyStore, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token past its own ``exp`` is routine (clients renew late); a token whose API
    key was revoked is a dead key still in use."""
    import time as time_module

    import m2m_middleware.engine as engine_module
    import m2m_middleware.tokens as tokens_module

    wall = [time_module.time()]
    monkeypatch.setattr(engine_module, "time", lambda: wall[0])
    monkeypatch.setattr(tokens_module, "time", lambda: wall[0])
    fired = Fired()
    engine = make_engine(
        store,
        schemes=("api_key", "jwt"),
        token_endpoint="/oauth/token",
        token_issuer="https://api.example.test",
        signing_key_secret="alerts: a signing secret for tests",
        token_ttl=300,
        invalidation_url="",
        on_alert=fired.append,
    )
    try:
        telemetry = engine.telemetry
        assert telemetry is not None and engine.signing_keys is not None
        telemetry.alerts = Alerts(engine.settings, telemetry.fire, clock=clock)

        def token(record: Any) -> str:
            now = int(wall[0])
            assert engine.signing_keys is not None
            return engine.signing_keys.current_signing_key().sign(
                {
                    "iss": "https://api.example.test",
                    "sub": record.client_id,
                    "client_id": record.client_id,
                    "aud": "https://api.example.test",
                    "exp": now + 300,
                    "iat": now,
                    "jti": f"jti-{record.key_id}",
                    "scope": "",
                    "key_id": record.key_id,
                }
            )

        stale = store.create_key("stale").record
        stale_token = token(stale)
        assert engine.check("GET", "/", f"Bearer {stale_token}", None, ADDRESS).allowed
        wall[0] += 301
        expired = engine.check("GET", "/", f"Bearer {stale_token}", None, ADDRESS)
        assert isinstance(expired, Denied) and expired.error == "invalid_token"
        assert not expired.key_ended
        assert fired.of("ended_keys") == []

        revoked = store.create_key("revoked").record
        revoked_token = token(revoked)
        assert engine.check("GET", "/", f"Bearer {revoked_token}", None, ADDRESS).allowed
        store.revoke_key(revoked.key_id)
        refused = engine.check("GET", "/", f"Bearer {revoked_token}", None, ADDRESS)
        assert isinstance(refused, Denied) and refused.key_ended
        assert [(a.subject, "revoked" in a.detail) for a in fired.of("ended_keys")] == [
            (revoked.key_id, True)
        ]
    finally:
        engine.close()


# -- traffic_spike: per client, against its own baseline -------------------------------


def spike_engine(build: Build, **fields: Any) -> tuple[Engine, Fired]:
    fields.setdefault("alert_traffic_spike", 10)
    fields.setdefault("alert_traffic_window", 60)
    fields.setdefault("alert_traffic_minimum", 100)
    return build(**fields)


def traffic(engine: Engine, key: str, clock: Clock, *per_window: int) -> None:
    """``per_window[i]`` requests in the i-th window from now, then the clock at the next."""
    for count in per_window:
        for _ in range(count):
            assert get(engine, key).allowed
        clock.advance(60)


def test_traffic_over_the_baseline_fires_once_per_window(
    build: Build, store: KeyStore, clock: Clock
) -> None:
    engine, fired = spike_engine(build)
    key = store.create_key("acme").key
    # The first window is no baseline (seen part way), the second is: 5 a minute.
    traffic(engine, key, clock, 5, 5)
    for _ in range(99):
        get(engine, key)
    assert fired == []  # over 10 x 5, but the window holds fewer than the minimum
    get(engine, key)
    (alert,) = fired
    assert (alert.kind, alert.subject, alert.count, alert.window_seconds) == (
        "traffic_spike",
        "acme",
        100,
        60,
    )
    assert "acme" in alert.detail and "5.0" in alert.detail
    for _ in range(400):
        get(engine, key)
    assert len(fired) == 1


def test_traffic_below_the_multiple_does_not_fire(
    build: Build, store: KeyStore, clock: Clock
) -> None:
    engine, fired = spike_engine(build, alert_traffic_minimum=10)
    key = store.create_key("acme").key
    traffic(engine, key, clock, 20, 20, 200)  # exactly 10 x: not above it
    assert fired == []
    traffic(engine, key, clock, 5000)  # the baseline moved up (0.2 x 200 + 0.8 x 20 = 56)
    assert fired.kinds() == ["traffic_spike"]
    assert fired[0].count == 561


def test_no_spike_without_a_full_earlier_window(
    build: Build, store: KeyStore, clock: Clock
) -> None:
    """After a restart every busy client is seen part way through a window: that count
    is no baseline, or each would alert in its next window."""
    engine, fired = spike_engine(build)
    key = store.create_key("acme").key
    traffic(engine, key, clock, 3, 1000)
    assert fired == []
    traffic(engine, key, clock, 10_001)
    assert fired.kinds() == ["traffic_spike"]


def test_idle_windows_do_not_lower_the_baseline(
    build: Build, store: KeyStore, clock: Clock
) -> None:
    """A job that runs once an hour is compared with its earlier runs, not the idle minutes."""
    engine, fired = spike_engine(build)
    key = store.create_key("batch").key
    traffic(engine, key, clock, 1, 500)
    for _ in range(3):
        clock.advance(59 * 60)
        traffic(engine, key, clock, 500)
    assert fired == []


def test_a_spike_fires_again_in_the_next_window_and_then_adapts(
    build: Build, store: KeyStore, clock: Clock
) -> None:
    engine, fired = spike_engine(build, alert_traffic_minimum=10)
    key = store.create_key("acme").key
    traffic(engine, key, clock, 1, 10, 200)
    assert len(fired) == 1  # 200 > 10 x 10
    traffic(engine, key, clock, 300)  # baseline 0.2 x 200 + 0.8 x 10 = 48: not over 480
    assert len(fired) == 1
    traffic(engine, key, clock, 1000)
    assert len(fired) == 2


def test_a_spike_of_0_is_off(build: Build, store: KeyStore, clock: Clock) -> None:
    engine, fired = spike_engine(build, alert_traffic_spike=0, alert_traffic_minimum=1)
    key = store.create_key("acme").key
    traffic(engine, key, clock, 1, 1, 1000)
    assert fired == []


# -- thresholds, off, alerts=False -------------------------------------------------------


def test_thresholds_and_windows_are_configurable(
    build: Build, store: KeyStore, clock: Clock
) -> None:
    engine, fired = build(alert_auth_failures="3/10 seconds")
    get(engine, unknown_key(store))
    get(engine, unknown_key(store))
    clock.advance(10)  # a new 10-second window: the two before are forgotten
    get(engine, unknown_key(store))
    get(engine, unknown_key(store))
    assert fired == []
    get(engine, unknown_key(store))
    assert [(a.count, a.window_seconds) for a in fired] == [(3, 10)]


@pytest.mark.parametrize(
    "setting", ["alert_auth_failures", "alert_client_failures", "alert_ended_keys"]
)
def test_an_empty_threshold_turns_its_rule_off(build: Build, store: KeyStore, setting: str) -> None:
    fields = {
        "alert_auth_failures": "1/minute",
        "alert_client_failures": "1/minute",
        "alert_ended_keys": "1/minute",
    }
    fields[setting] = ""
    engine, fired = build(**fields)
    issued = store.create_key("acme")
    store.revoke_key(issued.key_id)
    get(engine, issued.key)  # a dead key: all three rules see it
    expected = {"auth_failures", "client_failures", "ended_keys"} - {setting[len("alert_") :]}
    assert set(fired.kinds()) == expected


def test_an_empty_rate_limited_threshold_turns_it_off(build: Build, store: KeyStore) -> None:
    engine, fired = build(default_limits="1/minute", alert_rate_limited="")
    key = store.create_key("acme").key
    for _ in range(100):
        get(engine, key)
    assert fired == []


def test_alerts_false_builds_no_alerts(store: KeyStore) -> None:
    engine = make_engine(store, alerts=False)
    try:
        assert engine.telemetry is None or engine.telemetry.alerts is None
    finally:
        engine.close()


# -- memory and threads ------------------------------------------------------------------


def test_each_rule_tracks_a_bounded_number_of_subjects(
    build: Build, store: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An attacker rotating source addresses cannot grow memory without bound, and an
    address that keeps failing stays tracked through the rotation."""
    monkeypatch.setattr(alerts_module, "MAX_SUBJECTS", 50)
    engine, fired = build(alert_auth_failures="20/minute")
    telemetry = engine.telemetry
    assert telemetry is not None and telemetry.alerts is not None
    bad = unknown_key(store)  # a guess repeated: cheap for the engine, still a failure
    rotating = (f"10.{n // 65536}.{n // 256 % 256}.{n % 256}" for n in range(10**6))
    for _ in range(20):
        get(engine, bad, ADDRESS)
        for _ in range(40):
            get(engine, bad, next(rotating))
    assert telemetry.alerts.tracked()["auth_failures"] == 50
    assert [a.subject for a in fired] == [ADDRESS]


def test_a_thousand_addresses_over_the_cap_keep_memory_at_the_cap(
    store: KeyStore, clock: Clock
) -> None:
    fired = Fired()
    alerts = Alerts(Settings(key_store=store, alert_auth_failures="2/minute"), fired.append, clock)
    guess = deny(InvalidToken("the API key is not recognised"), "api")
    for n in range(alerts_module.MAX_SUBJECTS + 1000):
        alerts.observe(guess, f"2001:db8:{n:x}::1")  # a /64 each: one subject each
    assert alerts.tracked()["auth_failures"] == alerts_module.MAX_SUBJECTS
    assert fired == []


def test_threads_hammering_one_subject_fire_exactly_once(store: KeyStore, clock: Clock) -> None:
    fired = Fired()
    alerts = Alerts(
        Settings(key_store=store, alert_auth_failures="100/minute"), fired.append, clock
    )
    guess = deny(InvalidToken("the API key is not recognised"), "api")
    start = threading.Barrier(8)

    def hammer() -> None:
        start.wait(timeout=5)
        for _ in range(2000):
            alerts.observe(guess, ADDRESS)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert fired.kinds() == ["auth_failures"]


def test_threads_admitted_at_once_fire_one_spike_per_window(store: KeyStore, clock: Clock) -> None:
    fired = Fired()
    settings = Settings(key_store=store, alert_traffic_spike=10, alert_traffic_minimum=50)
    alerts = Alerts(settings, fired.append, clock)
    admitted = Allowed(Client("acme", "api_key", key_id="k1"))
    for count in (1, 2):  # the first window part way, then a baseline of 2
        for _ in range(count):
            alerts.observe(admitted, ADDRESS)
        clock.advance(60)
    start = threading.Barrier(8)

    def hammer() -> None:
        start.wait(timeout=5)
        for _ in range(2000):
            alerts.observe(admitted, ADDRESS)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert fired.kinds() == ["traffic_spike"]
    assert alerts.tracked()["traffic_spike"] == 1


# -- reporting: the log record, on_alert, log-safe subjects -------------------------------


def test_the_warning_record_has_structured_fields(
    build: Build, store: KeyStore, caplog: pytest.LogCaptureFixture
) -> None:
    engine, _ = build(alert_auth_failures="2/minute")
    with caplog.at_level(logging.WARNING, logger="m2m_middleware.alerts"):
        get(engine, unknown_key(store))
        get(engine, unknown_key(store))
    (record,) = [r for r in caplog.records if r.name == "m2m_middleware.alerts"]
    assert record.levelno == logging.WARNING
    fields = vars(record)
    assert fields["m2m_alert"] == "auth_failures"
    assert fields["m2m_subject"] == ADDRESS
    assert fields["m2m_count"] == 2
    assert fields["m2m_window_seconds"] == 60
    assert fields["m2m_detail"] == f"2 failed authentications from {ADDRESS} within 60s"
    assert record.getMessage().startswith(f"alert auth_failures subject={ADDRESS} count=2")


def test_an_on_alert_that_raises_is_logged_and_the_request_answers(
    build: Build, store: KeyStore, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[Alert] = []

    def broken(alert: Alert) -> None:
        calls.append(alert)
        raise RuntimeError("the pager is down")

    engine, _ = build(alert_auth_failures="1/minute", on_alert=[broken, calls.append])
    with caplog.at_level(logging.WARNING):
        outcome = get(engine, unknown_key(store))
        asynchronous = asyncio.run(engine.acheck("GET", "/", None, unknown_key(store), "192.0.2.9"))
    assert isinstance(outcome, Denied) and outcome.status == 401
    assert isinstance(asynchronous, Denied) and asynchronous.status == 401
    assert len(calls) == 4  # each callable, for each alert: the next one still called
    raised = [r for r in caplog.records if "on_alert callable" in r.getMessage()]
    assert len(raised) == 2 and raised[0].exc_info is not None


def test_a_subject_with_a_newline_cannot_forge_a_log_line(
    store: KeyStore, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    from m2m_middleware.telemetry import Telemetry

    engine = make_engine(store, alert_rate_limited="1/minute")
    try:
        telemetry = engine.telemetry
        assert isinstance(telemetry, Telemetry)
        fired = Fired()
        alerts = Alerts(engine.settings, fired.append, clock)
        client = Client("evil\nalert auth_failures subject=10.0.0.1", "jwt")
        limited = deny(RateLimited("rate limit exceeded"), "api", client=client)
        alerts.observe(limited, ADDRESS)
        (alert,) = fired
        assert alert.subject == client.client_id  # the callable gets the value as it is
        with caplog.at_level(logging.WARNING, logger="m2m_middleware.alerts"):
            telemetry.fire(alert)
        (record,) = [r for r in caplog.records if r.name == "m2m_middleware.alerts"]
        message = record.getMessage()
        subject = vars(record)["m2m_subject"]
        assert "\n" not in message and "\n" not in subject
        assert subject == "evil\\nalert\\x20auth_failures\\x20subject=10.0.0.1"
        detail = vars(record)["m2m_detail"]
        assert "\n" not in detail and "client evil\\nalert auth_failures" in detail
    finally:
        engine.close()


def test_no_alert_holds_a_secret(build: Build, store: KeyStore) -> None:
    engine, fired = build(
        alert_auth_failures="1/minute", alert_client_failures="1/minute", alert_ended_keys="1/hour"
    )
    issued = store.create_key("acme")
    store.revoke_key(issued.key_id)
    get(engine, issued.key)
    assert {"auth_failures", "client_failures", "ended_keys"} == set(fired.kinds())
    record = store.get_key(issued.key_id)
    for alert in fired:
        text = repr(alert.to_dict())
        assert issued.key not in text and issued.key[-16:] not in text
        assert issued.key[4:20] not in text
        assert record.key_id == issued.key_id


def test_a_forked_child_starts_with_its_own_windows_and_lock(store: KeyStore, clock: Clock) -> None:
    """The parent's lock may be held by one of its threads at the fork, which the
    child does not have; and the parent's counts are the parent's requests."""
    fired = Fired()
    alerts = Alerts(Settings(key_store=store, alert_auth_failures="2/minute"), fired.append, clock)
    guess = deny(InvalidToken("the API key is not recognised"), "api")
    alerts.observe(guess, ADDRESS)
    alerts.observe(Allowed(Client("acme", "api_key")), ADDRESS)
    alerts._lock.acquire()  # as a parent thread would hold it at the fork
    alerts_module._after_fork()
    assert alerts.tracked() == {
        "auth_failures": 0,
        "client_failures": 0,
        "rate_limited": 0,
        "ended_keys": 0,
        "traffic_spike": 0,
    }
    alerts.observe(guess, ADDRESS)
    assert fired == []  # the parent's one failure is not the child's
    alerts.observe(guess, ADDRESS)
    assert fired.kinds() == ["auth_failures"]
