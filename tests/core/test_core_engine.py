"""The engine: credential -> Client -> scopes -> limits -> Allowed | Denied.

Most tests run through both front doors (``check`` and ``acheck``) via the
``check`` fixture, so the async twin is held to the same answers.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from core_support import FakeClock, header, make_engine, sqlite_url

import m2m_middleware.limiting as limiting_module
from m2m_middleware import (
    Allowed,
    Client,
    ConfigError,
    Denied,
    Engine,
    KeyRecord,
    KeyStore,
    Settings,
    StoreUnavailable,
    open_key_store,
)
from m2m_middleware.keys import generate_key, hash_key
from m2m_middleware.stores import MemoryKeyStore

Check = Any  # the conftest ``check`` fixture: check(engine, method, path, authorization, api_key)


def flip_last(key: str) -> str:
    return key[:-1] + ("A" if key[-1] != "A" else "B")


def get(
    check: Check, engine: Engine, key: str | None, path: str = "/x", method: str = "GET"
) -> Allowed | Denied:
    """One request carrying ``key`` in the API-key header."""
    result: Allowed | Denied = check(engine, method, path, None, key)
    return result


def denied(outcome: Allowed | Denied, status: int, error: str) -> bool:
    return isinstance(outcome, Denied) and (outcome.status, outcome.error) == (status, error)


class Spy:
    def __init__(self, wrapped: Any) -> None:
        self.wrapped = wrapped
        self.calls: list[tuple[Any, ...]] = []

    def __call__(self, *args: Any) -> Any:
        self.calls.append(args)
        return self.wrapped(*args)


class FlakyStore(MemoryKeyStore):
    """A memory store that can be switched off, as a database server can."""

    down = False

    def _fetch_by_hash(self, key_hash: str) -> tuple[KeyRecord, str] | None:
        if self.down:
            raise StoreUnavailable("connection refused")
        return super()._fetch_by_hash(key_hash)

    def _take_use(self, key_id: str) -> int | None:
        if self.down:
            raise StoreUnavailable("connection refused")
        return super()._take_use(key_id)


# -- public paths and credentials -------------------------------------------------


def test_public_paths_need_no_credentials(memory_store: KeyStore, check: Check) -> None:
    engine = make_engine(memory_store, public_paths=("/health", "/docs/*"), default_limits="1/hour")
    for path in ("/health", "/docs/", "/docs/index.html", "/docs/a/b"):
        for _ in range(2):  # not rate limited either
            outcome = check(engine, "GET", path, None, None)
            assert isinstance(outcome, Allowed), path
            assert outcome.client is None
    for path in ("/docs", "/healthz", "/health/x", "/api/docs/x", "/"):
        assert denied(check(engine, "GET", path, None, None), 401, "missing_credentials"), path


def test_missing_credentials(memory_store: KeyStore, check: Check) -> None:
    engine = make_engine(memory_store)
    for authorization in (None, "Basic dXNlcjpwYXNz"):
        outcome = check(engine, "GET", "/x", authorization, None)
        assert denied(outcome, 401, "missing_credentials")
        assert header(outcome, "WWW-Authenticate") == 'Bearer realm="api"'


def test_a_valid_key_in_either_header_gives_its_client(store: KeyStore, check: Check) -> None:
    issued = store.create_key("client-a", scopes=["orders:read", "orders:write"], tier="gold")
    engine = make_engine(store)
    for authorization, api_key in ((None, issued.key), (f"Bearer {issued.key}", None)):
        outcome = check(engine, "GET", "/x", authorization, api_key)
        assert isinstance(outcome, Allowed)
        assert outcome.client == Client(
            client_id="client-a",
            scheme="api_key",
            scopes=frozenset({"orders:read", "orders:write"}),
            tier="gold",
            key_id=issued.key_id,
        )
        assert dict(outcome.client.claims) == {}


def test_unknown_key_is_invalid_token(store: KeyStore, check: Check) -> None:
    engine = make_engine(store)
    assert denied(get(check, engine, generate_key()), 401, "invalid_token")


@pytest.mark.parametrize(
    "credential",
    [
        "flipped-checksum",
        "m2m_short",
        "not-a-key-at-all",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl",
        "m2m_" + "é" * 38,
    ],
)
def test_malformed_keys_are_rejected_without_a_store_lookup(
    memory_store: KeyStore, check: Check, monkeypatch: pytest.MonkeyPatch, credential: str
) -> None:
    good = memory_store.create_key("client-a").key
    if credential == "flipped-checksum":
        credential = flip_last(good)
    engine = make_engine(memory_store)
    spy = Spy(memory_store.find_by_hash)
    monkeypatch.setattr(memory_store, "find_by_hash", spy)
    assert denied(get(check, engine, credential), 401, "invalid_token")
    assert spy.calls == []
    # Control: a well-formed key does reach the store.
    assert denied(get(check, engine, generate_key()), 401, "invalid_token")
    assert len(spy.calls) == 1


def test_expired_key_is_rejected(store: KeyStore, check: Check) -> None:
    issued = store.create_key("client-a", expires_at=datetime.now(timezone.utc) - timedelta(1))
    engine = make_engine(store)
    assert denied(get(check, engine, issued.key), 401, "invalid_token")


def test_a_cached_key_stops_at_its_expiry(
    memory_store: KeyStore, check: Check, clock: FakeClock
) -> None:
    expires = datetime.now(timezone.utc) + timedelta(seconds=60)
    issued = memory_store.create_key("client-a", expires_at=expires)
    engine = make_engine(memory_store, key_cache_ttl=3600)
    assert isinstance(get(check, engine, issued.key), Allowed)
    clock.advance(120)
    assert denied(get(check, engine, issued.key), 401, "invalid_token")


# -- revocation and the verified-key cache ---------------------------------------


def test_revocation_through_the_same_store_is_immediate(
    store: KeyStore, check: Check, monkeypatch: pytest.MonkeyPatch
) -> None:
    issued = store.create_key("client-a")
    other = store.create_key("client-a")
    engine = make_engine(store, key_cache_ttl=3600)
    # Twice: a change notice for the keys just created (PostgreSQL's NOTIFY comes a
    # moment later) can arrive during the first lookup, which then rightly leaves
    # the record uncached; the second lookup caches it.
    for _ in range(2):
        assert isinstance(get(check, engine, issued.key), Allowed)
        assert isinstance(get(check, engine, other.key), Allowed)
    spy = Spy(store.find_by_hash)
    monkeypatch.setattr(store, "find_by_hash", spy)
    generation = engine.keys.generation
    assert isinstance(get(check, engine, issued.key), Allowed)
    # Answered from the cache, unless a change notice from elsewhere emptied it
    # meanwhile: on PostgreSQL the suite's other workers share the database and
    # its NOTIFY channel, and a notice that any key may have changed clears all.
    assert spy.calls == [] or engine.keys.generation != generation
    store.revoke_key(issued.key_id)
    assert denied(get(check, engine, issued.key), 401, "invalid_token")
    assert isinstance(get(check, engine, other.key), Allowed)  # only that key was dropped


def test_revocation_through_another_store_object_for_the_same_file(
    tmp_path: Path, check: Check, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    serving = open_key_store(sqlite_url(tmp_path / "k.db"))
    admin = open_key_store("sqlite:///k.db")  # the same file, spelled relatively
    try:
        issued = serving.create_key("client-a")
        rotated = serving.create_key("client-a")
        engine = make_engine(serving, key_cache_ttl=3600)
        assert isinstance(get(check, engine, issued.key), Allowed)
        assert isinstance(get(check, engine, rotated.key), Allowed)
        admin.revoke_key(issued.key_id)
        assert denied(get(check, engine, issued.key), 401, "invalid_token")
        successor = admin.rotate_key(rotated.key_id, grace_seconds=0)
        assert denied(get(check, engine, rotated.key), 401, "invalid_token")
        assert isinstance(get(check, engine, successor.key), Allowed)
    finally:
        admin.close()
        serving.close()


def raw_revoke(path: Path, key_id: str) -> None:
    """Revoke as another process would: straight to the file, no in-process notification."""
    with closing(sqlite3.connect(path)) as raw:
        raw.execute(
            "UPDATE m2m_api_keys SET revoked_at = ? WHERE key_id = ?", (time.time() - 3600, key_id)
        )
        raw.commit()


def test_revocation_elsewhere_is_seen_within_the_cache_ttl(
    sqlite_store: KeyStore, tmp_path: Path, check: Check, clock: FakeClock
) -> None:
    issued = sqlite_store.create_key("client-a")
    engine = make_engine(sqlite_store, key_cache_ttl=0.2)
    assert isinstance(get(check, engine, issued.key), Allowed)  # cached from now on
    raw_revoke(tmp_path / "k.db", issued.key_id)
    assert isinstance(get(check, engine, issued.key), Allowed)  # still cached
    clock.advance(0.1)
    assert isinstance(get(check, engine, issued.key), Allowed)
    clock.advance(0.15)
    assert denied(get(check, engine, issued.key), 401, "invalid_token")


def test_no_cache_sees_revocation_elsewhere_at_once(
    sqlite_store: KeyStore, tmp_path: Path, check: Check
) -> None:
    issued = sqlite_store.create_key("client-a")
    engine = make_engine(sqlite_store, key_cache_ttl=0)
    assert isinstance(get(check, engine, issued.key), Allowed)
    raw_revoke(tmp_path / "k.db", issued.key_id)
    assert denied(get(check, engine, issued.key), 401, "invalid_token")


def test_rotation_grace_in_the_engine(
    memory_store: KeyStore, check: Check, clock: FakeClock
) -> None:
    old = memory_store.create_key("client-a", scopes=["s"])
    engine = make_engine(memory_store, key_cache_ttl=3600)
    assert isinstance(get(check, engine, old.key), Allowed)
    new = memory_store.rotate_key(old.key_id, grace_seconds=60)
    assert isinstance(get(check, engine, old.key), Allowed)
    outcome = get(check, engine, new.key)
    assert isinstance(outcome, Allowed)
    assert outcome.client is not None and outcome.client.scopes == frozenset({"s"})
    clock.advance(120)
    assert denied(get(check, engine, old.key), 401, "invalid_token")
    assert isinstance(get(check, engine, new.key), Allowed)


def test_rotation_hands_a_usage_limit_over_instead_of_multiplying_it(
    store: KeyStore, check: Check
) -> None:
    old = store.create_key("client-a", max_uses=3)
    engine = make_engine(store, key_cache_ttl=3600)
    assert isinstance(get(check, engine, old.key), Allowed)  # 2 uses left, and cached
    new = store.rotate_key(old.key_id, grace_seconds=3600)
    assert store.get_key(new.key_id).remaining_uses == 2
    outcomes = [get(check, engine, key) for _ in range(3) for key in (old.key, new.key)]
    assert sum(isinstance(o, Allowed) for o in outcomes) == 2
    assert all(denied(o, 429, "quota_exceeded") for o in outcomes[0::2])  # the old key
    with pytest.raises(ValueError):
        store.rotate_key(new.key_id, grace_seconds=60)  # nothing left to hand over


# -- scopes -------------------------------------------------------------------------


def test_route_scopes(memory_store: KeyStore, check: Check) -> None:
    routes = [
        {"path": "/orders/*", "scopes": ["orders:read"]},
        {"path": "/orders/*", "methods": ["POST", "DELETE"], "scopes": ["orders:write"]},
    ]
    engine = make_engine(memory_store, routes=routes)
    reader = memory_store.create_key("r", scopes=["orders:read"]).key
    writer = memory_store.create_key("w", scopes=["orders:read", "orders:write"]).key
    nobody = memory_store.create_key("n").key
    assert isinstance(get(check, engine, reader, "/orders/1"), Allowed)
    assert denied(get(check, engine, reader, "/orders/1", "POST"), 403, "insufficient_scope")
    assert isinstance(get(check, engine, writer, "/orders/1", "POST"), Allowed)
    assert denied(get(check, engine, nobody, "/orders/1"), 403, "insufficient_scope")
    assert isinstance(get(check, engine, nobody, "/invoices/1"), Allowed)


# -- limits -------------------------------------------------------------------------


def statuses(outcomes: list[Allowed | Denied]) -> list[int]:
    return [200 if isinstance(o, Allowed) else o.status for o in outcomes]


def test_tier_limits_replace_the_default(memory_store: KeyStore, check: Check) -> None:
    engine = make_engine(
        memory_store,
        default_limits="5/minute",
        tiers={"gold": "2/minute", "bulk": "8/minute"},
    )
    gold = memory_store.create_key("g", tier="gold").key
    bulk = memory_store.create_key("b", tier="bulk").key
    plain = memory_store.create_key("p").key
    unknown_tier = memory_store.create_key("u", tier="silver").key
    gold_outcomes = [get(check, engine, gold) for _ in range(3)]
    assert statuses(gold_outcomes) == [200, 200, 429]
    policy = header(gold_outcomes[0], "RateLimit-Policy")
    assert policy is not None and "q=2;w=60" in policy and "q=5" not in policy
    assert statuses([get(check, engine, bulk) for _ in range(9)]) == [200] * 8 + [429]
    assert statuses([get(check, engine, plain) for _ in range(6)]) == [200] * 5 + [429]
    assert statuses([get(check, engine, unknown_tier) for _ in range(6)]) == [200] * 5 + [429]


def test_route_limits_add_to_the_client_limits(memory_store: KeyStore, check: Check) -> None:
    engine = make_engine(
        memory_store,
        default_limits="3/minute",
        routes=[{"path": "/r", "limits": "10/minute"}, {"path": "/tight", "limits": "1/minute"}],
    )
    key = memory_store.create_key("client-a").key
    first = get(check, engine, key, "/r")
    policy = header(first, "RateLimit-Policy")
    assert policy is not None and "q=3;w=60" in policy and "q=10;w=60" in policy
    assert statuses([first] + [get(check, engine, key, "/r") for _ in range(3)]) == [
        200, 200, 200, 429
    ]  # fmt: skip
    other = memory_store.create_key("client-b").key
    assert statuses([get(check, engine, other, "/tight") for _ in range(2)]) == [200, 429]
    assert isinstance(get(check, engine, other, "/x"), Allowed)


STRATEGIES = ["fixed-window", "moving-window", "sliding-window-counter"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_limits_are_charged_all_or_nothing(
    memory_store: KeyStore, check: Check, strategy: str
) -> None:
    engine = make_engine(
        memory_store,
        default_limits="5/minute",
        routes=[{"path": "/r", "limits": "2/minute"}],
        rate_limit_strategy=strategy,
    )
    key = memory_store.create_key("client-a").key
    route = [get(check, engine, key, "/r") for _ in range(3)]
    assert statuses(route) == [200, 200, 429]
    retry = header(route[2], "Retry-After")
    assert retry is not None and 1 <= int(retry) <= 60
    # The rejected /r request did not spend the default budget: 5 - 2 = 3 left.
    assert statuses([get(check, engine, key, "/other") for _ in range(4)]) == [200, 200, 200, 429]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_route_cost(memory_store: KeyStore, check: Check, strategy: str) -> None:
    engine = make_engine(
        memory_store,
        default_limits="5/minute",
        routes=[{"path": "/expensive", "cost": 3}],
        rate_limit_strategy=strategy,
    )
    key = memory_store.create_key("client-a").key
    first = get(check, engine, key, "/expensive")
    assert isinstance(first, Allowed)
    rate = header(first, "RateLimit")
    assert rate is not None and ";r=2;" in rate
    assert denied(get(check, engine, key, "/expensive"), 429, "rate_limited")
    # The refused cost-3 request was not charged: two cheap ones still fit.
    assert statuses([get(check, engine, key, "/cheap") for _ in range(3)]) == [200, 200, 429]


def test_limits_count_per_client_not_per_key(memory_store: KeyStore, check: Check) -> None:
    engine = make_engine(memory_store, default_limits="3/minute")
    k1 = memory_store.create_key("client-a").key
    k2 = memory_store.create_key("client-a").key
    k3 = memory_store.create_key("client-b").key
    assert statuses([get(check, engine, k) for k in (k1, k2, k1, k2, k1)]) == [
        200, 200, 200, 429, 429
    ]  # fmt: skip
    assert statuses([get(check, engine, k3) for _ in range(3)]) == [200, 200, 200]


@pytest.mark.parametrize(
    "strategy",
    [
        "fixed-window",
        "moving-window",
        "sliding-window-counter",
    ],
)
def test_quota_rejection_refunds_the_rate_limit(
    memory_store: KeyStore, check: Check, strategy: str
) -> None:
    engine = make_engine(memory_store, default_limits="3/minute", rate_limit_strategy=strategy)
    limited = memory_store.create_key("client-a", max_uses=2).key
    sibling = memory_store.create_key("client-a").key
    outcomes = [get(check, engine, limited) for _ in range(3)]
    assert statuses(outcomes) == [200, 200, 429]
    assert denied(outcomes[2], 429, "quota_exceeded")
    assert statuses([get(check, engine, sibling) for _ in range(2)]) == [200, 429]


POLICY_ITEM = r'"[^"\\]+";q=\d+;w=\d+'
RATE_ITEM = r'"[^"\\]+";r=\d+;t=\d+'


def test_rate_limit_headers(memory_store: KeyStore, check: Check) -> None:
    engine = make_engine(memory_store, default_limits="5/minute;100/hour")
    key = memory_store.create_key("client-a").key
    first = get(check, engine, key)
    assert isinstance(first, Allowed)
    policy = header(first, "RateLimit-Policy")
    rate = header(first, "RateLimit")
    assert policy is not None and re.fullmatch(f"{POLICY_ITEM}(, {POLICY_ITEM})*", policy)
    assert rate is not None and re.fullmatch(f"{RATE_ITEM}(, {RATE_ITEM})*", rate)
    policies = dict(re.findall(r'"([^"]+)";q=(\d+;w=\d+)', policy))
    remaining = {
        name: (int(r), int(t)) for name, r, t in re.findall(r'"([^"]+)";r=(\d+);t=(\d+)', rate)
    }
    assert sorted(policies.values()) == ["100;w=3600", "5;w=60"]
    assert set(remaining) == set(policies)
    by_quota = {policies[name]: value for name, value in remaining.items()}
    assert by_quota["5;w=60"][0] == 4
    assert 55 <= by_quota["5;w=60"][1] <= 60
    assert by_quota["100;w=3600"][0] == 99
    for _ in range(4):
        assert isinstance(get(check, engine, key), Allowed)
    refused = get(check, engine, key)
    assert denied(refused, 429, "rate_limited")
    retry = header(refused, "Retry-After")
    assert retry is not None and retry.isdigit() and 1 <= int(retry) <= 60


def test_rate_limit_headers_can_be_turned_off(memory_store: KeyStore, check: Check) -> None:
    engine = make_engine(memory_store, default_limits="1/minute", rate_limit_headers=False)
    key = memory_store.create_key("client-a").key
    allowed = get(check, engine, key)
    assert isinstance(allowed, Allowed) and allowed.headers == []
    refused = get(check, engine, key)
    assert denied(refused, 429, "rate_limited")
    assert header(refused, "Retry-After") is not None


def test_no_limits_configured_means_no_rate_limit(memory_store: KeyStore, check: Check) -> None:
    engine = make_engine(memory_store)
    key = memory_store.create_key("client-a").key
    assert statuses([get(check, engine, key) for _ in range(50)]) == [200] * 50


def test_unknown_limit_storage_is_a_config_error(memory_store: KeyStore) -> None:
    with pytest.raises(ConfigError) as caught:
        make_engine(memory_store, rate_limit_storage="nosuchbackend://x")
    assert caught.value.field == "rate_limit_storage"


# -- outages --------------------------------------------------------------------------


def assert_unavailable(outcome: Allowed | Denied) -> None:
    assert denied(outcome, 503, "temporarily_unavailable")
    retry = header(outcome, "Retry-After")
    assert retry is not None and retry.isdigit() and int(retry) >= 1
    assert header(outcome, "WWW-Authenticate") is None


def outage_records(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "m2m_middleware" and r.levelno >= logging.ERROR and text in r.getMessage()
    ]


@pytest.mark.parametrize("policy", ["allow", "deny"])
def test_key_store_down_never_admits_an_unseen_key(check: Check, policy: str) -> None:
    store = FlakyStore()
    issued = store.create_key("client-a")
    engine = make_engine(store, on_storage_error=policy)
    store.down = True
    assert_unavailable(get(check, engine, issued.key))


@pytest.mark.parametrize("policy", ["allow", "deny"])
def test_key_store_down_with_a_previously_verified_key(
    check: Check, clock: FakeClock, policy: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="m2m_middleware")
    store = FlakyStore()
    issued = store.create_key("client-a")
    engine = make_engine(store, on_storage_error=policy, key_cache_ttl=1)
    assert isinstance(get(check, engine, issued.key), Allowed)
    store.down = True
    clock.advance(2)  # the cache entry is stale: the engine must ask the store
    outcomes = [get(check, engine, issued.key) for _ in range(5)]
    if policy == "allow":
        assert all(isinstance(o, Allowed) for o in outcomes)
        assert outcomes[0].client is not None and outcomes[0].client.client_id == "client-a"
    else:
        for outcome in outcomes:
            assert_unavailable(outcome)
    assert len(outage_records(caplog, "key store")) == 1  # once per outage, not per request
    store.down = False
    assert isinstance(get(check, engine, issued.key), Allowed)
    store.down = True
    clock.advance(2)
    get(check, engine, issued.key)
    assert len(outage_records(caplog, "key store")) == 2  # a new outage is logged again


@pytest.mark.parametrize("policy", ["allow", "deny"])
def test_key_store_down_when_taking_a_use(check: Check, policy: str) -> None:
    store = FlakyStore()
    issued = store.create_key("client-a", max_uses=10)
    engine = make_engine(store, on_storage_error=policy, key_cache_ttl=3600)
    assert isinstance(get(check, engine, issued.key), Allowed)  # cached from now on
    store.down = True
    outcome = get(check, engine, issued.key)
    if policy == "allow":
        assert isinstance(outcome, Allowed)
    else:
        assert_unavailable(outcome)


@pytest.mark.parametrize("policy", ["allow", "deny"])
def test_limit_storage_down(
    memory_store: KeyStore,
    check: Check,
    policy: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    break_limit_storage: Any,
) -> None:
    caplog.set_level(logging.DEBUG, logger="m2m_middleware")
    engine = make_engine(memory_store, on_storage_error=policy, default_limits="100/minute")
    key = memory_store.create_key("client-a").key
    assert isinstance(get(check, engine, key), Allowed)
    break_limit_storage(engine.limiter, ConnectionError("redis went away"))
    outcomes = [get(check, engine, key) for _ in range(5)]
    if policy == "allow":
        assert all(isinstance(o, Allowed) for o in outcomes)
    else:
        for outcome in outcomes:
            assert_unavailable(outcome)
    assert len(outage_records(caplog, "rate-limit storage")) == 1
    monkeypatch.undo()
    assert isinstance(get(check, engine, key), Allowed)


# -- last_used_at -----------------------------------------------------------------------


def test_last_used_is_written_back_in_batches(tmp_path: Path, check: Check) -> None:
    url = sqlite_url(tmp_path / "k.db")
    store = open_key_store(url)
    observer = open_key_store(url)  # sees only what reached the file
    try:
        first = store.create_key("client-a")
        second = store.create_key("client-a")
        engine = make_engine(store)
        for _ in range(3):
            assert isinstance(get(check, engine, first.key), Allowed)
        assert observer.get_key(first.key_id).last_used_at is None  # not written per request
        store.flush_last_used()
        used = observer.get_key(first.key_id).last_used_at
        assert used is not None
        assert abs((used - datetime.now(timezone.utc)).total_seconds()) < 5
        assert isinstance(get(check, engine, second.key), Allowed)
        assert observer.get_key(second.key_id).last_used_at is None
        engine.close()
        assert observer.get_key(second.key_id).last_used_at is not None  # close flushes
    finally:
        observer.close()
        store.close()


# -- denial bodies and challenges ------------------------------------------------------

_PARAM = re.compile(r'([a-z_]+)="((?:[^"\\]|\\.)*)"')


def parse_challenge(value: str) -> dict[str, str]:
    """RFC 6750 section 3: ``Bearer`` then comma-separated quoted auth-params."""
    assert value.startswith("Bearer ")
    rest = value[len("Bearer ") :]
    params: dict[str, str] = {}
    while rest:
        match = _PARAM.match(rest)
        assert match, f"not an auth-param: {rest!r}"
        name, raw = match.groups()
        assert name not in params, f"{name} sent twice"
        params[name] = raw
        rest = rest[match.end() :]
        if rest:
            assert rest.startswith(", "), rest
            rest = rest[2:]
    # error, error_description and scope values are limited to visible ASCII sans '"' and '\'.
    for name in ("error", "error_description", "scope"):
        if name in params:
            assert all(0x20 <= ord(c) <= 0x7E and c not in '"\\' for c in params[name]), name
    return params


def make_denials(check: Check) -> dict[str, Denied]:
    store = FlakyStore()
    engine = make_engine(
        store,
        default_limits="2/minute",
        routes=[{"path": "/orders", "scopes": ["orders:write", "orders:read"]}],
        realm="orders-api",
    )
    plain = store.create_key("client-a").key
    quota = store.create_key("client-b", max_uses=1).key
    out: dict[str, Any] = {
        "missing_credentials": check(engine, "GET", "/x", None, None),
        "invalid_token": get(check, engine, generate_key()),
        "invalid_request": check(engine, "GET", "/x", f"Bearer {plain}", generate_key()),
        "insufficient_scope": get(check, engine, plain, "/orders"),
    }
    get(check, engine, plain)
    get(check, engine, plain)
    out["rate_limited"] = get(check, engine, plain)
    get(check, engine, quota)
    out["quota_exceeded"] = get(check, engine, quota)
    store.down = True
    out["temporarily_unavailable"] = get(check, engine, generate_key())
    return out


EXPECTED_STATUS = {
    "missing_credentials": 401,
    "invalid_token": 401,
    "invalid_request": 400,
    "insufficient_scope": 403,
    "rate_limited": 429,
    "quota_exceeded": 429,
    "temporarily_unavailable": 503,
}


def test_denials_are_problem_json(check: Check) -> None:
    denials = make_denials(check)
    for error, outcome in denials.items():
        assert denied(outcome, EXPECTED_STATUS[error], error), (error, outcome)
        assert outcome.content_type == "application/problem+json"
        body = json.loads(outcome.body)
        assert {"type", "title", "status", "detail", "error"} <= set(body), error
        assert body["status"] == outcome.status
        assert body["error"] == error
        assert isinstance(body["type"], str) and body["type"]
        assert isinstance(body["title"], str) and body["title"]
        assert isinstance(body["detail"], str) and body["detail"]
        assert body["detail"] == outcome.detail
    assert len({json.loads(d.body)["type"] for d in denials.values()}) == len(denials)


def test_www_authenticate_follows_rfc_6750(check: Check) -> None:
    denials = make_denials(check)
    missing = header(denials["missing_credentials"], "WWW-Authenticate")
    assert missing is not None
    assert parse_challenge(missing) == {"realm": "orders-api"}  # no error code

    invalid = header(denials["invalid_token"], "WWW-Authenticate")
    assert invalid is not None
    params = parse_challenge(invalid)
    assert params["realm"] == "orders-api"
    assert params["error"] == "invalid_token"
    assert "scope" not in params

    scope = header(denials["insufficient_scope"], "WWW-Authenticate")
    assert scope is not None
    params = parse_challenge(scope)
    assert params["error"] == "insufficient_scope"
    assert sorted(params["scope"].split(" ")) == ["orders:read", "orders:write"]
    assert json.loads(denials["insufficient_scope"].body)["error"] == "insufficient_scope"

    for error in ("invalid_request", "rate_limited", "quota_exceeded", "temporarily_unavailable"):
        assert header(denials[error], "WWW-Authenticate") is None, error


def test_settings_object_shortcut(memory_store: KeyStore) -> None:
    engine = Engine(Settings(key_store=memory_store))
    assert engine.store is memory_store


# -- races and edge cases ---------------------------------------------------------------


class RevokedMidLookupStore(MemoryKeyStore):
    """Another thread revokes the key while this lookup is in flight."""

    revoke_during_lookup = False

    def _fetch_by_hash(self, key_hash: str) -> tuple[KeyRecord, str] | None:
        found = super()._fetch_by_hash(key_hash)
        if found is not None and self.revoke_during_lookup:
            self.revoke_during_lookup = False
            self.revoke_key(found[0].key_id)  # notifies caches: nothing cached yet to drop
        return found  # the record as read before the revocation


def test_revocation_during_a_lookup_is_not_lost(check: Check) -> None:
    store = RevokedMidLookupStore()
    issued = store.create_key("client-a")
    engine = make_engine(store, key_cache_ttl=3600)
    store.revoke_during_lookup = True
    get(check, engine, issued.key)  # raced with the revocation: either answer is fine
    assert not store.get_key(issued.key_id).is_active()
    assert denied(get(check, engine, issued.key), 401, "invalid_token")


def test_key_prefix_setting_reaches_the_store() -> None:
    engine = Engine(Settings(key_store="memory://", key_prefix="acme"))
    assert engine.store.create_key("client-a").key.startswith("acme_")


def test_a_used_up_key_during_a_limit_outage_is_answered_not_raised(
    memory_store: KeyStore, check: Check, break_limit_storage: Any
) -> None:
    issued = memory_store.create_key("client-a", max_uses=1)
    engine = make_engine(memory_store, default_limits="10/minute", on_storage_error="allow")
    assert isinstance(get(check, engine, issued.key), Allowed)  # the last use
    break_limit_storage(engine.limiter, ConnectionError("redis went away"))
    assert denied(get(check, engine, issued.key), 429, "quota_exceeded")


def rate_limit_left(outcome: Allowed | Denied) -> dict[str, int]:
    """``{"<quota>;w=<window>": remaining}`` from an outcome's RateLimit headers."""
    policy, rate = header(outcome, "RateLimit-Policy"), header(outcome, "RateLimit")
    assert policy is not None and rate is not None
    quotas = dict(re.findall(r'"([^"]+)";q=(\d+;w=\d+)', policy))
    return {quotas[name]: int(r) for name, r in re.findall(r'"([^"]+)";r=(\d+);t=\d+', rate)}


@pytest.mark.parametrize(
    ("route", "admitted"),
    [
        pytest.param({"path": "/bulk", "cost": 2}, 2, id="the-minute-limit-refuses"),
        pytest.param(
            {"path": "/bulk", "cost": 2, "limits": "3/minute"}, 1, id="the-route-limit-refuses"
        ),
    ],
)
def test_racing_requests_admit_exactly_the_budget_and_never_charge_part_of_it(
    memory_store: KeyStore, check: Check, route: dict[str, Any], admitted: int
) -> None:
    engine = make_engine(memory_store, default_limits="5/minute;8/hour", routes=[route])
    assert engine.limiter.windows is not None  # counted by MemoryWindows
    key = memory_store.create_key("client-a").key
    threads = 40
    start = threading.Barrier(threads)

    def one(_: int) -> Allowed | Denied:
        start.wait(timeout=5)
        return get(check, engine, key, "/bulk")

    with ThreadPoolExecutor(max_workers=threads) as pool:
        outcomes = list(pool.map(one, range(threads)))
    assert sum(isinstance(o, Allowed) for o in outcomes) == admitted
    assert all(denied(o, 429, "rate_limited") for o in outcomes if not isinstance(o, Allowed))
    # A cost-1 request on a route without rules: each default limit was charged
    # admitted * cost by the race, and nothing by the refused requests.
    fresh = get(check, engine, key, "/cheap")
    assert isinstance(fresh, Allowed)
    assert rate_limit_left(fresh) == {
        "5;w=60": 5 - admitted * 2 - 1,
        "8;w=3600": 8 - admitted * 2 - 1,
    }


# -- usage-limited keys and rate limits together -----------------------------------------


@pytest.fixture
def limits_clock(clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """The ``clock`` fixture, driving the limiter's windows as well as the engine."""
    monkeypatch.setattr(limiting_module, "time", types.SimpleNamespace(time=clock.time))
    return clock


def test_a_use_taken_by_a_request_the_rate_limit_refuses_is_given_back(
    store: KeyStore, check: Check
) -> None:
    engine = make_engine(store, default_limits="1/minute", key_cache_ttl=3600)
    limited = store.create_key("client-a", max_uses=3)
    sibling = store.create_key("client-a").key
    assert isinstance(get(check, engine, sibling), Allowed)  # spends the client's budget
    for _ in range(3):
        assert denied(get(check, engine, limited.key), 429, "rate_limited")
        assert store.get_key(limited.key_id).remaining_uses == 3


def test_a_last_use_given_back_can_be_spent_once_the_window_ends(
    store: KeyStore, check: Check, limits_clock: FakeClock
) -> None:
    engine = make_engine(store, default_limits="1/minute", key_cache_ttl=3600)
    limited = store.create_key("client-a", max_uses=1)
    sibling = store.create_key("client-a").key
    assert isinstance(get(check, engine, sibling), Allowed)
    assert denied(get(check, engine, limited.key), 429, "rate_limited")
    assert store.get_key(limited.key_id).remaining_uses == 1
    limits_clock.advance(61)
    assert isinstance(get(check, engine, limited.key), Allowed)
    assert store.get_key(limited.key_id).remaining_uses == 0
    limits_clock.advance(61)
    assert denied(get(check, engine, limited.key), 429, "quota_exceeded")


def test_a_key_used_up_elsewhere_costs_its_client_no_rate_limit(
    store: KeyStore, check: Check
) -> None:
    engine = make_engine(store, default_limits="4/minute", key_cache_ttl=3600)
    sibling = store.create_key("client-a").key
    # Used up by another instance before this engine ever saw it.
    unseen = store.create_key("client-a", max_uses=1)
    assert store.take_use(unseen.key_id) == 0
    # Seen and cached with uses left, then used up by another instance.
    cached = store.create_key("client-a", max_uses=2)
    assert isinstance(get(check, engine, cached.key), Allowed)  # the only admitted request
    assert store.take_use(cached.key_id) == 0
    for _ in range(3):
        assert denied(get(check, engine, unseen.key), 429, "quota_exceeded")
        assert denied(get(check, engine, cached.key), 429, "quota_exceeded")
    assert statuses([get(check, engine, sibling) for _ in range(4)]) == [200, 200, 200, 429]


# -- forged keys: well-formed guesses are cheap to refuse -------------------------------


def count_lookups(store: KeyStore, monkeypatch: pytest.MonkeyPatch) -> Spy:
    spy = Spy(store.find_by_hash)
    monkeypatch.setattr(store, "find_by_hash", spy)
    return spy


def test_a_repeated_forged_key_costs_one_lookup_per_second(
    store: KeyStore, check: Check, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(store)
    lookups = count_lookups(store, monkeypatch)
    forged = generate_key()  # well formed: anyone can compute the checksum
    for _ in range(50):
        assert denied(get(check, engine, forged), 401, "invalid_token")
    assert len(lookups.calls) == 1
    clock.advance(0.9)
    assert denied(get(check, engine, forged), 401, "invalid_token")
    assert len(lookups.calls) == 1
    clock.advance(0.2)  # the second has passed: the store is asked again, once
    for _ in range(50):
        assert denied(get(check, engine, forged), 401, "invalid_token")
    assert len(lookups.calls) == 2
    assert denied(get(check, engine, generate_key()), 401, "invalid_token")  # another guess
    assert len(lookups.calls) == 3


def test_a_key_created_here_after_a_refusal_works_at_once(
    tmp_path: Path, check: Check, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through any store object for the same data: creating it tells every cache."""
    store = open_key_store(sqlite_url(tmp_path / "k.db"))
    other = open_key_store(sqlite_url(tmp_path / "k.db"))
    key = generate_key()
    monkeypatch.setattr("m2m_middleware.stores.base.keyformat.generate_key", lambda prefix: key)
    engine = make_engine(store)
    try:
        assert denied(get(check, engine, key), 401, "invalid_token")  # not created yet
        other.create_key("client-a")  # another store object, same file
        outcome = get(check, engine, key)  # no clock advance: at once
        assert isinstance(outcome, Allowed) and outcome.client.client_id == "client-a"
    finally:
        engine.close()
        other.close()


def test_a_key_created_elsewhere_after_a_refusal_works_within_a_second(
    tmp_path: Path, check: Check, clock: FakeClock
) -> None:
    store = open_key_store(sqlite_url(tmp_path / "k.db"))
    engine = make_engine(store)
    key = generate_key()
    try:
        assert denied(get(check, engine, key), 401, "invalid_token")
        # Another process writes the row: no notice reaches this one.
        with closing(sqlite3.connect(tmp_path / "k.db")) as raw, raw:
            raw.execute(
                "INSERT INTO m2m_api_keys (key_id, key_hash, client_id, created_at) "
                "VALUES ('key_elsewhere', ?, 'client-b', ?)",
                (hash_key(key), time.time()),
            )
        assert denied(get(check, engine, key), 401, "invalid_token")  # still remembered
        clock.advance(1.0)
        outcome = get(check, engine, key)
        assert isinstance(outcome, Allowed) and outcome.client.key_id == "key_elsewhere"
    finally:
        engine.close()


def test_forged_keys_are_remembered_within_the_cache_size(
    memory_store: KeyStore, check: Check, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(memory_store, key_cache_size=16)
    lookups = count_lookups(memory_store, monkeypatch)
    forged = [generate_key() for _ in range(200)]
    for key in forged:
        assert denied(get(check, engine, key), 401, "invalid_token")
    assert len(lookups.calls) == 200
    assert len(engine.keys.unknown) <= 16
    assert denied(get(check, engine, forged[-1]), 401, "invalid_token")  # the newest: kept
    assert len(lookups.calls) == 200
    assert denied(get(check, engine, forged[0]), 401, "invalid_token")  # the oldest: gone
    assert len(lookups.calls) == 201


def test_a_known_key_never_consults_the_forged_key_cache(
    memory_store: KeyStore, check: Check, monkeypatch: pytest.MonkeyPatch
) -> None:
    issued = memory_store.create_key("client-a")
    engine = make_engine(memory_store)
    assert get(check, engine, issued.key).allowed
    asked = Spy(lambda key_hash: False)
    monkeypatch.setattr(type(engine.keys.unknown), "__contains__", lambda self, h: asked(h))
    for _ in range(10):
        assert get(check, engine, issued.key).allowed
    # The patch is on the class, so an engine that another test left running in a
    # thread of this process may be seen asking for its own hashes (CI met one):
    # what must never be asked for is this key's.
    assert hash_key(issued.key) not in [call[0] for call in asked.calls]


def test_no_cache_means_no_forged_key_cache_either(
    memory_store: KeyStore, check: Check, monkeypatch: pytest.MonkeyPatch
) -> None:
    """key_cache_ttl=0 asks the store on every request, as it promises."""
    engine = make_engine(memory_store, key_cache_ttl=0)
    lookups = count_lookups(memory_store, monkeypatch)
    forged = generate_key()
    for _ in range(3):
        assert denied(get(check, engine, forged), 401, "invalid_token")
    assert len(lookups.calls) == 3
