"""Moving windows and sliding window counters, in memory and in Redis.

Charged all-or-nothing under concurrency (threads on the sync path, asyncio
tasks on the async one), with the semantics ``limits`` gives them, and
headers that hold: after ``t`` seconds a limit has more to spend, after
``Retry-After`` seconds the refused request fits.

Time is injected, never slept on: in memory the limiter takes it from the
caller (``charge(..., now=...)``), the Redis scripts from
``Limiter.redis_clock``, so both replay one history exactly. The race tests
run on real time (Redis's own ``TIME``), and only assert what holds however
slowly the threads start.
"""

from __future__ import annotations

import asyncio
import random
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import servers
from core_support import header, make_engine
from limit_state import charged, switching_often

from m2m_middleware import Allowed, Denied, Engine, Settings
from m2m_middleware.limiting import Charge, Limiter, LimitPlan
from m2m_middleware.stores import MemoryKeyStore

STRATEGIES = ["moving-window", "sliding-window-counter"]
STORAGES = ["memory", pytest.param("redis", marks=pytest.mark.redis)]


@pytest.fixture(params=STORAGES)
def storage(request: pytest.FixtureRequest) -> str:
    if request.param == "redis":
        return str(request.getfixturevalue("redis_url"))
    return "memory://"


@pytest.fixture
def busy_switching() -> Iterator[None]:
    with switching_often():
        yield


class Clocked:
    """A limiter on ``storage`` whose every charge happens at a time the test gives."""

    def __init__(self, storage: str, strategy: str, limits: str) -> None:
        self.limiter = Limiter(
            Settings(
                key_store="memory://",
                rate_limit_storage=storage,
                rate_limit_strategy=strategy,
                default_limits=limits,
            )
        )
        self.plan = self.limiter.plan(None, ())
        self.client = servers.unique("client")

    def charge(
        self, at: float, cost: int = 1, *, plan: LimitPlan | None = None, client: str = ""
    ) -> Charge:
        self.limiter.redis_clock = lambda: at
        return self.limiter.charge(plan or self.plan, client or self.client, cost, now=at)


def seen(charge: Charge) -> tuple[bool, Any]:
    """``(True, [(remaining, t), ...])`` for an admitted charge, ``(False, Retry-After)``."""
    headers = dict(charge.headers)
    if not charge.allowed:
        return False, int(headers["Retry-After"])
    items = re.findall(r'"[^"]+";r=(\d+);t=(\d+)', headers["RateLimit"])
    return True, [(int(r), int(t)) for r, t in items]


def start_time() -> float:
    """Now, in whole seconds: the histories below add quarters, exact in binary."""
    return float(int(time.time()))


# -- semantics -----------------------------------------------------------------------


def test_a_moving_window_admits_n_in_any_rolling_window(storage: str) -> None:
    window = Clocked(storage, "moving-window", "3 per 10 seconds")
    t0 = start_time()
    steps = [
        (0, 1, (True, [(2, 10)])),  # t: the oldest charge leaves at t0 + 10
        (2, 1, (True, [(1, 8)])),
        (4, 1, (True, [(0, 6)])),
        (5, 1, (False, 5)),  # three charges in the last 10 s: until t0's leaves
        (9.75, 1, (False, 1)),
        (10, 1, (True, [(0, 2)])),  # t0's charge left at t0 + 10: t0+2, t0+4, t0+10
        (11, 1, (False, 1)),
        (12, 1, (True, [(0, 2)])),
        (14, 2, (False, 6)),  # t0+10 and t0+12 hold two: a cost of 2 waits for t0+10's
        (14, 1, (True, [(0, 6)])),  # a cost of 1 fits: t0+4's charge left at t0 + 14
        (22, 2, (True, [(0, 2)])),  # t0+10's and t0+12's left: two units free
    ]
    assert [(at, cost, seen(window.charge(t0 + at, cost))) for at, cost, _ in steps] == steps


def test_a_sliding_window_counter_weights_the_previous_window(storage: str) -> None:
    counter = Clocked(storage, "sliding-window-counter", "10/minute")
    t0 = start_time()
    # The first window opens at the first charge: ten fit in it.
    first = [seen(counter.charge(t0)) for _ in range(11)]
    assert first[:10] == [(True, [(9 - i, 61)]) for i in range(10)]
    # Nothing frees until just after the window's end, when its ten start to slide out.
    assert first[10] == (False, 61)
    assert seen(counter.charge(t0 + 30)) == (False, 31)
    # 15 s into the next window, 45 s of the previous one are still inside the last
    # minute: floor(10 * 45 / 60) = 7 of its charges count, so three more fit.
    second = [seen(counter.charge(t0 + 75)) for _ in range(4)]
    assert second[:3] == [(True, [(2, 4)]), (True, [(1, 4)]), (True, [(0, 4)])]
    # At t0 + 79 only floor(10 * 41 / 60) = 6 count: one more fits; at t0 + 78, 7 did.
    assert second[3] == (False, 4)
    assert seen(counter.charge(t0 + 78)) == (False, 1)
    assert seen(counter.charge(t0 + 79))[0]
    # A whole window with nothing charged: the count starts afresh.
    assert [seen(counter.charge(t0 + 240))[0] for _ in range(11)] == [True] * 10 + [False]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_request_refused_by_one_limit_charges_no_other(storage: str, strategy: str) -> None:
    limiter = Clocked(storage, strategy, "2/minute;5/hour")
    minute_only = LimitPlan(limiter.plan.limits[:1], "")
    hour_only = LimitPlan(limiter.plan.limits[1:], "")
    t0 = start_time()
    assert seen(limiter.charge(t0, 2, plan=minute_only))[0]  # fills the minute
    assert not limiter.charge(t0 + 1, 1).allowed  # refused by the minute...
    assert not limiter.charge(t0 + 1, 6).allowed  # ... and by both
    # ... so the hour was charged nothing: all five are left.
    allowed, [(remaining, _)] = seen(limiter.charge(t0 + 2, 5, plan=hour_only))
    assert (allowed, remaining) == (True, 0)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_headers_hold_through_a_random_history(storage: str, strategy: str) -> None:
    """After an admitted request, each limit has more to spend ``t`` seconds later (and
    not a second sooner); after a refusal, the request fits ``Retry-After`` seconds
    later (and not a second sooner), however many of its limits refused it."""
    # Windows of minutes: the keys' real-time expiry in Redis never comes into it.
    limits = "5/minute;12 per 5 minutes"
    history = Clocked(storage, strategy, limits)
    probe = Clocked(storage, strategy, limits)
    single = [LimitPlan((lim,), "") for lim in probe.plan.limits]
    rng = random.Random(f"{strategy}-10")
    t0 = start_time()
    at, admitted = t0, []

    def replay() -> str:
        """A new client of ``probe`` with the admitted history: the state just now."""
        client = servers.unique("probe")
        for when, cost in admitted:
            assert probe.charge(when, cost, client=client).allowed
        return client

    for _ in range(40):
        at += rng.choice([0, 0, 1.5, 4, 9.25, 20, 40])
        cost = rng.choice([1, 1, 1, 2, 3])
        outcome = history.charge(at, cost)
        allowed, detail = seen(outcome)
        if allowed:
            admitted.append((at, cost))
            for plan, (remaining, t) in zip(single, detail, strict=True):
                more = remaining + 1  # more than is left now
                assert probe.charge(at + t, more, plan=plan, client=replay()).allowed
                assert not probe.charge(at + t - 1, more, plan=plan, client=replay()).allowed
        else:
            assert probe.charge(at + detail, cost, client=replay()).allowed
            assert not probe.charge(at + detail - 1, cost, client=replay()).allowed
    assert 10 < len(admitted) < 40  # the history refused some and admitted more


@pytest.mark.redis
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_memory_and_redis_agree_on_every_answer(redis_url: str, strategy: str) -> None:
    """The Lua scripts and the in-process classes are two spellings of one arithmetic."""
    limits = "4 per 30 seconds;9/minute;20/hour"
    memory = Clocked("memory://", strategy, limits)
    in_redis = Clocked(redis_url, strategy, limits)
    rng = random.Random(f"{strategy}-agree")
    at = start_time()
    for _ in range(80):
        at += rng.choice([0, 0, 0.25, 0.75, 2, 4.5, 11, 35])
        cost = rng.choice([1, 1, 2, 5])
        assert memory.charge(at, cost).headers == in_redis.charge(at, cost).headers, at


# -- all-or-nothing under concurrency ------------------------------------------------

RACE_LIMITS = "1000/day;5/second"
RACERS = 40


def race_engine(storage: str, strategy: str) -> tuple[Engine, str, str]:
    store = MemoryKeyStore()
    client_id = servers.unique("client")
    key = store.create_key(client_id).key
    engine = make_engine(
        store,
        rate_limit_storage=storage,
        rate_limit_strategy=strategy,
        default_limits=RACE_LIMITS,
        invalidation_url="",
    )
    return engine, key, client_id


def assert_charged_as_admitted(
    engine: Engine, client_id: str, outcomes: list[Allowed | Denied]
) -> None:
    admitted = sum(isinstance(o, Allowed) for o in outcomes)
    refused = [o for o in outcomes if isinstance(o, Denied)]
    assert all((o.status, o.error) == (429, "rate_limited") for o in refused)
    day, second = engine.limiter.plan(None, ()).limits
    # Five a second; more only if the racers took more than a second to start.
    assert admitted >= 5
    assert charged(engine.limiter, second, client_id) <= 5
    # The day was charged by the admitted requests and by no refused one.
    assert charged(engine.limiter, day, client_id) == admitted
    # Each admitted request read back its own charge: 999, 998, ... once each.
    lefts = sorted(day_left(o) for o in outcomes if isinstance(o, Allowed))
    assert lefts == list(range(1000 - admitted, 1000))


def day_left(outcome: Allowed) -> int:
    """The remaining of the first limit (the day) in an outcome's RateLimit header."""
    return int(re.findall(r";r=(\d+)", header(outcome, "RateLimit") or "")[0])


@pytest.mark.parametrize("strategy", ["fixed-window", *STRATEGIES])
def test_racing_threads_charge_the_day_once_per_admitted_request(
    storage: str, strategy: str, busy_switching: None
) -> None:
    for _ in range(10):  # ten races: interleavings differ from one to the next
        engine, key, client_id = race_engine(storage, strategy)
        start = threading.Barrier(RACERS)
        outcomes: list[Allowed | Denied] = []

        def one() -> None:
            start.wait(timeout=10)
            outcomes.append(engine.check("GET", "/", None, key))

        threads = [threading.Thread(target=one) for _ in range(RACERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert len(outcomes) == RACERS
        assert_charged_as_admitted(engine, client_id, outcomes)


@pytest.mark.parametrize("strategy", ["fixed-window", *STRATEGIES])
def test_racing_tasks_charge_the_day_once_per_admitted_request(storage: str, strategy: str) -> None:
    for _ in range(3):
        engine, key, client_id = race_engine(storage, strategy)

        async def race() -> list[Allowed | Denied]:
            return list(
                await asyncio.gather(*(engine.acheck("GET", "/", None, key) for _ in range(RACERS)))
            )

        assert_charged_as_admitted(engine, client_id, asyncio.run(race()))


# -- Redis specifics -----------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.parametrize("strategy", ["fixed-window", *STRATEGIES])
def test_a_clients_keys_share_one_cluster_slot(redis_url: str, strategy: str) -> None:
    store = MemoryKeyStore()
    client_id = servers.unique("client")
    engine = make_engine(
        store,
        rate_limit_storage=redis_url,
        rate_limit_strategy=strategy,
        default_limits="10/second;100/hour",
        routes=[{"path": "/export", "limits": "3/minute"}],
        invalidation_url="",
    )
    assert engine.check("GET", "/export", None, store.create_key(client_id).key).allowed
    client = redis.Redis.from_url(redis_url)
    written = client.keys(f"m2m:{{{client_id}}}:*")
    client.close()
    assert len(written) == 3
    assert len({redis.crc.key_slot(key) for key in written}) == 1


@pytest.mark.redis
def test_each_strategy_has_keys_of_its_own(redis_url: str) -> None:
    """Switching strategy while counters are alive must never meet a key of another
    type (a list where a counter was): that would be an outage, not a limit."""
    client_id = servers.unique("client")
    key = ""
    store = MemoryKeyStore()
    for strategy in ["fixed-window", *STRATEGIES, "fixed-window"]:
        engine = make_engine(
            store,
            rate_limit_storage=redis_url,
            rate_limit_strategy=strategy,
            default_limits="10/minute",
            invalidation_url="",
        )
        key = key or store.create_key(client_id).key
        outcome = engine.check("GET", "/", None, key)
        assert isinstance(outcome, Allowed), outcome
