"""Limits in Redis, outages of Redis, and revocations carried over Redis.

Against real servers: the machine's Redis for shared budgets (each test its
own client id, so parallel workers never meet), and a ``redis-server`` of the
test's own where the test kills it or counts its commands.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import servers
from core_support import count_round_trips, header, make_engine, sqlite_url

from m2m_middleware import Allowed, ConfigError, Denied, Engine, KeyStore, Settings, open_key_store
from m2m_middleware.settings import invalidation_url
from m2m_middleware.stores import MemoryKeyStore

pytestmark = pytest.mark.redis

Check = Callable[..., "Allowed | Denied"]

#: Each strategy runs a Lua script of its own: the guarantees below hold for all three.
STRATEGIES = ["fixed-window", "moving-window", "sliding-window-counter"]


def redis_engine(store: KeyStore, url: str, **fields: Any) -> Engine:
    fields.setdefault("default_limits", "5/minute")
    fields.setdefault("invalidation_url", "")  # no bus unless the test is about it
    return make_engine(store, rate_limit_storage=url, **fields)


def new_key(store: KeyStore, **fields: Any) -> str:
    return store.create_key(servers.unique("client"), **fields).key


def items(value: str | None) -> list[tuple[str, int]]:
    """A ``RateLimit`` header as (policy, remaining) pairs, each ``t`` checked for
    plausibility: Redis counts real seconds, so a window opened a moment ago
    may already say 59 rather than 60."""
    assert value is not None
    found = []
    for item in value.split(", "):
        match = re.fullmatch(r'"([^"]+)";r=(\d+);t=(\d+)', item)
        assert match, value
        name, remaining, reset = match.group(1), int(match.group(2)), int(match.group(3))
        window = int(name.rsplit("-", 1)[1].rstrip("s'"))
        assert window - 5 <= reset <= window, value
        found.append((name, remaining))
    return found


# -- shared budgets --------------------------------------------------------------------


def test_exactly_the_limit_is_admitted_and_headers_count_down(check: Check, redis_url: str) -> None:
    store = MemoryKeyStore()
    engine = redis_engine(store, redis_url)
    key = new_key(store)
    outcomes = [check(engine, "GET", "/", None, key) for _ in range(7)]
    assert [o.allowed for o in outcomes] == [True] * 5 + [False] * 2
    assert [items(header(o, "RateLimit")) for o in outcomes[:5]] == [
        [("default-60s", left)] for left in (4, 3, 2, 1, 0)
    ]
    refused = outcomes[5]
    assert isinstance(refused, Denied)
    assert refused.status == 429 and refused.error == "rate_limited"
    assert 55 <= int(header(refused, "Retry-After") or 0) <= 60


def test_two_engines_share_one_budget_through_both_front_doors(redis_url: str) -> None:
    store = MemoryKeyStore()
    key = new_key(store)
    first, second = redis_engine(store, redis_url), redis_engine(store, redis_url)

    async def via_async(engine: Engine) -> Allowed | Denied:
        return await engine.acheck("GET", "/", None, key)

    allowed = 0
    for i in range(10):
        engine = first if i % 2 else second
        outcome = engine.check("GET", "/", None, key) if i % 3 else asyncio.run(via_async(engine))
        allowed += outcome.allowed
    assert allowed == 5


def test_threads_racing_on_one_budget_admit_exactly_the_limit(redis_url: str) -> None:
    store = MemoryKeyStore()
    key = new_key(store)
    engines = [redis_engine(store, redis_url, default_limits="40/minute") for _ in range(4)]
    start = threading.Barrier(16)
    admitted = []

    def worker(n: int) -> None:
        engine = engines[n % len(engines)]
        start.wait(timeout=10)
        admitted.append(sum(engine.check("GET", "/", None, key).allowed for _ in range(10)))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sum(admitted) == 40


def test_tasks_racing_on_the_async_path_admit_exactly_the_limit(redis_url: str) -> None:
    store = MemoryKeyStore()
    key = new_key(store)
    engine = redis_engine(store, redis_url, default_limits="30/minute")

    async def burst() -> int:
        outcomes = await asyncio.gather(*(engine.acheck("GET", "/", None, key) for _ in range(100)))
        return sum(o.allowed for o in outcomes)

    assert asyncio.run(burst()) == 30


def test_a_refusal_by_one_limit_charges_none_of_the_others(check: Check, redis_url: str) -> None:
    store = MemoryKeyStore()
    key = new_key(store)
    engine = redis_engine(
        store,
        redis_url,
        default_limits="10/minute",
        routes=[{"path": "/export", "limits": "2/minute"}],
    )
    for _ in range(2):
        assert check(engine, "GET", "/export", None, key).allowed
    refused = check(engine, "GET", "/export", None, key)
    assert isinstance(refused, Denied) and refused.status == 429
    assert items(header(refused, "RateLimit")) == [("route.0-60s", 0)]
    # Only the two admitted requests were charged to the default limit.
    allowed = check(engine, "GET", "/other", None, key)
    assert items(header(allowed, "RateLimit")) == [("default-60s", 7)]


def test_costs_are_charged_to_every_limit(check: Check, redis_url: str) -> None:
    store = MemoryKeyStore()
    key = new_key(store)
    engine = redis_engine(
        store,
        redis_url,
        default_limits="10/minute;100/hour",
        routes=[{"path": "/bulk", "cost": 4}],
    )
    first = check(engine, "POST", "/bulk", None, key)
    assert items(header(first, "RateLimit")) == [("default-60s", 6), ("default-3600s", 96)]
    assert check(engine, "POST", "/bulk", None, key).allowed
    assert not check(engine, "POST", "/bulk", None, key).allowed  # 8 + 4 > 10
    assert check(engine, "GET", "/", None, key).allowed  # 9: a cost of one still fits


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_one_round_trip_per_request_whatever_the_number_of_limits(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, strategy: str
) -> None:
    store = MemoryKeyStore()
    key = new_key(store)
    engine = redis_engine(
        store,
        redis_url,
        default_limits="1000/minute;10000/hour;100000/day",
        routes=[{"path": "/*", "limits": "500/minute"}],
        rate_limit_strategy=strategy,
    )

    async def twenty() -> list[Allowed | Denied]:
        await engine.acheck("GET", "/", None, key)  # connects, loads the script
        sent[0] = 0
        return [await engine.acheck("GET", "/", None, key) for _ in range(20)]

    engine.check("GET", "/", None, key)  # connects, loads the script
    sent = count_round_trips(monkeypatch)
    assert all(engine.check("GET", "/", None, key).allowed for _ in range(20))
    assert sent[0] == 20  # four limits, one EVALSHA per request
    assert all(o.allowed for o in asyncio.run(twenty()))
    assert sent[0] == 20


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_counts_in_redis(check: Check, redis_url: str, strategy: str) -> None:
    store = MemoryKeyStore()
    key = new_key(store)
    engine = redis_engine(store, redis_url, default_limits="3/minute", rate_limit_strategy=strategy)
    assert [check(engine, "GET", "/", None, key).allowed for _ in range(5)] == [True] * 3 + [
        False
    ] * 2


def test_a_bad_redis_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="rate_limit_storage"):
        Settings(rate_limit_storage="redis")
    with pytest.raises(ConfigError, match="storage_timeout"):
        Settings(storage_timeout=0)
    with pytest.raises(ConfigError, match="invalidation_url"):
        Settings(invalidation_url="http://example.com")


# -- outages -----------------------------------------------------------------------------


def traffic(check: Check, engine: Engine, key: str, n: int) -> list[Allowed | Denied]:
    return [check(engine, "GET", "/", None, key) for _ in range(n)]


def remaining(outcome: Allowed | Denied) -> int:
    found = re.fullmatch(r'"default-60s";r=(\d+);t=\d+', header(outcome, "RateLimit") or "")
    assert found, header(outcome, "RateLimit")
    return int(found.group(1))


#: Keeps Redis busy for ARGV[1] microseconds: the commands sent meanwhile wait, then run.
BUSY = """local t = redis.call('TIME') local start = t[1] * 1000000 + t[2]
repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] - start > tonumber(ARGV[1]) return 0"""


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_charge_that_timed_out_is_not_sent_again(
    check: Check, redis_server: servers.RedisServer, strategy: str
) -> None:
    # A charge whose answer is late was sent, and Redis runs it once it gets to it:
    # sent again on a new connection, it would run twice, charging one request twice.
    store = MemoryKeyStore()
    key = new_key(store)
    engine = redis_engine(
        store,
        redis_server.url,
        default_limits="1000/minute",
        rate_limit_strategy=strategy,
        storage_timeout=0.2,
    )
    first = check(engine, "GET", "/", None, key)
    assert isinstance(first, Allowed)
    assert remaining(first) == 999
    import redis

    busy = redis.Redis.from_url(redis_server.url)
    # Busy until after the charge timed out once, not twice: a charge sent again
    # would be answered (and the first run late, both charging).
    blocker = threading.Thread(target=busy.eval, args=(BUSY, 0, 400_000))
    blocker.start()
    time.sleep(0.1)  # the script runs: Redis answers nothing else until it ends
    late = check(engine, "GET", "/", None, key)
    assert isinstance(late, Denied) and late.status == 503
    blocker.join()
    busy.close()
    after = check(engine, "GET", "/", None, key)
    assert isinstance(after, Allowed)
    # The late charge ran once at most (Redis got to it, or to its closed connection
    # first), this one once: 997 or 998 left, never 996.
    assert remaining(after) in (997, 998)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_deny_policy_answers_503_while_redis_is_down_and_recovers_by_itself(
    check: Check,
    redis_server: servers.RedisServer,
    caplog: pytest.LogCaptureFixture,
    strategy: str,
) -> None:
    store = MemoryKeyStore()
    key = new_key(store)
    engine = redis_engine(
        store, redis_server.url, default_limits="1000/minute", rate_limit_strategy=strategy
    )
    caplog.set_level(logging.WARNING, logger="m2m_middleware")
    assert all(o.allowed for o in traffic(check, engine, key, 3))

    redis_server.stop()
    started = time.monotonic()
    during = traffic(check, engine, key, 5)
    assert time.monotonic() - started < 5  # refused connections fail fast, no hang
    for outcome in during:
        assert isinstance(outcome, Denied)
        assert (outcome.status, outcome.error) == (503, "temporarily_unavailable")
        assert header(outcome, "Retry-After") is not None
        assert json.loads(outcome.body)["status"] == 503

    redis_server.start()  # an empty Redis, on the same port
    after = traffic(check, engine, key, 3)
    assert all(o.allowed for o in after)
    assert items(header(after[-1], "RateLimit")) == [("default-60s", 997)]
    messages = [r.getMessage() for r in caplog.records if r.name == "m2m_middleware"]
    assert len([m for m in messages if "unreachable" in m]) == 1, messages
    assert len([m for m in messages if "reachable again" in m]) == 1, messages


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_allow_policy_admits_without_counting_while_redis_is_down(
    check: Check, redis_server: servers.RedisServer, strategy: str
) -> None:
    store = MemoryKeyStore()
    key = new_key(store)
    engine = redis_engine(
        store, redis_server.url, on_storage_error="allow", rate_limit_strategy=strategy
    )
    redis_server.stop()
    during = traffic(check, engine, key, 8)  # more than the limit of 5
    assert all(isinstance(o, Allowed) for o in during)
    assert all(header(o, "RateLimit") is None for o in during)  # nothing was counted
    redis_server.start()
    assert [o.allowed for o in traffic(check, engine, key, 6)] == [True] * 5 + [False]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_server_that_never_answers_times_out_within_the_setting(
    check: Check, strategy: str
) -> None:
    import socket

    # A listening socket that is never accepted from: connects, then silence.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(100)
        port = silent.getsockname()[1]
        store = MemoryKeyStore()
        key = new_key(store)
        engine = redis_engine(
            store,
            f"redis://127.0.0.1:{port}/0",
            storage_timeout=0.2,
            rate_limit_strategy=strategy,
        )
        started = time.monotonic()
        outcome = check(engine, "GET", "/", None, key)
        elapsed = time.monotonic() - started
    assert isinstance(outcome, Denied) and outcome.status == 503
    assert elapsed < 2  # two attempts of 0.2 s, not redis-py's default retries


# -- revocation across instances ---------------------------------------------------------


CLI = (sys.executable, "-m", "m2m_middleware", "keys")


def revoke_elsewhere(store_url: str, key_id: str, *extra: str) -> None:
    """Revoke through the CLI in another process, as an operator would."""
    result = subprocess.run(
        [*CLI, "revoke", key_id, "--store", store_url, *extra],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def wait_until(condition: Callable[[], bool], timeout: float) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s")
        time.sleep(0.02)
    return time.monotonic() - started


@pytest.mark.slow
def test_a_revocation_published_on_redis_reaches_another_instance_at_once(
    tmp_path: Path, redis_server: servers.RedisServer
) -> None:
    url = sqlite_url(tmp_path / "keys.db")
    store = open_key_store(url)
    issued = store.create_key("client-a")
    # An hour of caching: without the bus this instance would go on accepting the key.
    engine = make_engine(
        store, rate_limit_storage=redis_server.url, default_limits="1000/minute", key_cache_ttl=3600
    )
    engine._next_poll = float("inf")  # no polls of the SQLite change log: only the bus can tell
    assert engine.bus is not None and engine.bus.ready.wait(10)
    assert engine.check("GET", "/", None, issued.key).allowed

    revoke_elsewhere(url, issued.key_id, "--notify", redis_server.url)
    wait_until(lambda: not engine.check("GET", "/", None, issued.key).allowed, timeout=2)
    refused = engine.check("GET", "/", None, issued.key)
    assert isinstance(refused, Denied) and refused.error == "invalid_token"
    store.close()


@pytest.mark.slow
def test_a_notice_this_process_published_is_not_delivered_here_again(
    redis_server: servers.RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The caches here heard of the new key when it was made; its echo off the
    # bus, arriving once the key is cached, would drop it again (a 503 instead
    # of the outage grace, were the store down then).
    import m2m_middleware.invalidation as invalidation

    store = RemoteStore()
    engine = make_engine(
        store, rate_limit_storage=redis_server.url, default_limits="1000/minute", key_cache_ttl=3600
    )
    assert engine.bus is not None and engine.bus.ready.wait(10)
    cached = threading.Event()
    heard: list[tuple[str, str | None]] = []
    deliver = invalidation.notify_local

    def after_caching(name: str, key_id: str | None) -> None:  # what the listener hears, held
        cached.wait(5)
        heard.append((name, key_id))
        deliver(name, key_id)

    monkeypatch.setattr(invalidation, "notify_local", after_caching)
    issued = store.create_key("client-a")
    assert engine.check("GET", "/", None, issued.key).allowed
    cached.set()
    # Another process's notice, published after the echo: once it is heard, so was the echo.
    other = {"store_id": "memory://elsewhere", "key_id": "key_m"}
    engine.bus._publisher.publish(invalidation.CHANNEL, json.dumps(other))
    wait_until(lambda: ("memory://elsewhere", "key_m") in heard, timeout=5)
    assert heard == [("memory://elsewhere", "key_m")]
    assert len(engine.keys._entries) == 1, "the echo of our own notice dropped the key"
    store.close()


@pytest.mark.slow
@pytest.mark.postgres
def test_a_notice_on_redis_names_the_store_however_its_url_is_spelled(
    postgres_url: str, redis_server: servers.RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The app says localhost, the operator's command 127.0.0.1:5432: one
    # database, so one store (by the id kept in it), and the notice is heard.
    parts = urlsplit(postgres_url)
    assert parts.hostname == "127.0.0.1", postgres_url
    spelled = postgres_url.replace(parts.netloc, f"{parts.username or 'postgres'}@localhost", 1)
    store = open_key_store(spelled)
    monkeypatch.setattr(store, "watch_changes", lambda: None)  # no NOTIFY: only Redis can tell
    try:
        issued = store.create_key("client-a")
        engine = make_engine(
            store,
            rate_limit_storage=redis_server.url,
            default_limits="1000/minute",
            key_cache_ttl=3600,
        )
        assert engine.bus is not None and engine.bus.ready.wait(10)
        assert engine.check("GET", "/", None, issued.key).allowed
        revoke_elsewhere(postgres_url, issued.key_id, "--notify", redis_server.url)
        wait_until(lambda: not engine.check("GET", "/", None, issued.key).allowed, timeout=2)
    finally:
        store.close()


@pytest.mark.slow
def test_without_the_bus_a_revocation_elsewhere_is_seen_within_the_cache_ttl(
    tmp_path: Path,
) -> None:
    url = sqlite_url(tmp_path / "keys.db")
    store = open_key_store(url)
    issued = store.create_key("client-a")
    engine = make_engine(store, default_limits="1000/minute", key_cache_ttl=0.5)
    assert engine.bus is None
    assert engine.check("GET", "/", None, issued.key).allowed
    revoke_elsewhere(url, issued.key_id)
    waited = wait_until(lambda: not engine.check("GET", "/", None, issued.key).allowed, 3)
    assert waited <= 0.5 + 0.2
    store.close()


class RemoteStore(MemoryKeyStore):
    """A store other processes change, with no way of its own to tell this one."""

    needs_bus = True


SENTINEL = "redis+sentinel://:sentinel-Pa55@127.0.0.1:1/mymaster"
CLUSTER = "redis+cluster://:cluster-Pa55@127.0.0.1:1"


@pytest.mark.parametrize("storage", [SENTINEL, CLUSTER])
def test_a_limit_storage_that_cannot_carry_the_bus_is_a_config_error(storage: str) -> None:
    # Never a silent fall-back to key_cache_ttl: the error says what to set,
    # before anything connects (nothing listens on port 1).
    with pytest.raises(ConfigError) as caught:
        Engine(Settings(key_store=RemoteStore(), rate_limit_storage=storage))
    assert caught.value.field == "invalidation_url"
    message = str(caught.value)
    assert storage.partition("://")[0] + "://" in message
    assert "redis://" in message and "''" in message and "key_cache_ttl" in message
    assert "Pa55" not in message
    settings = Settings(key_store="django://", rate_limit_storage=storage)
    with pytest.raises(ConfigError, match="invalidation_url"):
        invalidation_url(settings)  # the CLI and the Django check ask the same


@pytest.mark.parametrize("storage", [SENTINEL, CLUSTER])
def test_saying_what_to_do_about_such_a_storage_is_accepted(storage: str) -> None:
    bus = "redis://127.0.0.1:6379/2"
    store = RemoteStore()
    ttl_only = Settings(rate_limit_storage=storage, invalidation_url="")
    assert invalidation_url(ttl_only, store) is None
    chosen = Settings(rate_limit_storage=storage, invalidation_url=bus)
    assert invalidation_url(chosen, store) == bus


@pytest.mark.parametrize("key_store", ["memory://", "sqlite:///k.db", "postgresql://db/keys"])
@pytest.mark.parametrize("storage", [SENTINEL, CLUSTER])
def test_a_key_store_that_tells_other_processes_itself_needs_no_bus(
    key_store: str, storage: str
) -> None:
    settings = Settings(key_store=key_store, rate_limit_storage=storage)
    assert invalidation_url(settings) is None
    assert invalidation_url(settings, open_key_store(key_store)) is None


def test_the_cli_refuses_a_notify_url_that_is_not_redis(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "keys.db")
    store = open_key_store(url)
    issued = store.create_key("client-a")
    store.close()
    result = subprocess.run(
        [*CLI, "revoke", issued.key_id, "--store", url, "--notify", "http://example.com"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--notify" in result.stderr and "Traceback" not in result.stderr
    assert open_key_store(url).get_key(issued.key_id).revoked_at is None


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_one_event_loop_rides_out_a_redis_restart(
    redis_server: servers.RedisServer, strategy: str
) -> None:
    # As under uvicorn: one loop, one pooled async client, whose connections
    # die with the server and must be replaced without a restart of the app.
    store = MemoryKeyStore()
    key = new_key(store)
    engine = redis_engine(
        store, redis_server.url, default_limits="1000/minute", rate_limit_strategy=strategy
    )

    async def scenario() -> tuple[list[int], list[int], list[int]]:
        async def statuses(n: int) -> list[int]:
            outcomes = [await engine.acheck("GET", "/", None, key) for _ in range(n)]
            return [200 if o.allowed else o.status for o in outcomes]  # type: ignore[union-attr]

        before = await statuses(3)
        redis_server.stop()
        during = await statuses(3)
        redis_server.start()
        return before, during, await statuses(3)

    before, during, after = asyncio.run(scenario())
    assert (before, during, after) == ([200] * 3, [503] * 3, [200] * 3)


def test_an_event_loop_that_ended_is_let_go_with_its_client(redis_url: str) -> None:
    """A loop per request (asyncio.run in a test, a sync view's loop in a thread) must
    not keep every ended loop and its Redis client alive in the engine."""
    import gc
    import weakref

    store = MemoryKeyStore()
    engine = redis_engine(store, redis_url, default_limits="100/minute")
    key = new_key(store)
    loops: list[weakref.ReferenceType[asyncio.AbstractEventLoop]] = []

    async def one() -> bool:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        return (await engine.acheck("GET", "/", None, key)).allowed

    assert all(asyncio.run(one()) for _ in range(5))
    gc.collect()
    assert [ref() for ref in loops] == [None] * 5
    assert len(engine.limiter._aio) == 0
