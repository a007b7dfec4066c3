"""Batched counting in Redis (``rate_limit_sync="batched"``), and the round trips a
request makes to Redis in either mode.

The bound under test (see :class:`m2m_middleware.limiting.Leases`): whatever the
number of instances, at most the limit is admitted per window; with one instance,
exactly the limit. Against the machine's Redis (each test its own client id), and
a ``redis-server`` of the test's own where the test stops it.
"""

from __future__ import annotations

import asyncio
import datetime
import secrets
import threading
from typing import Any

import httpx
import pytest
import redis
import servers
from core_support import count_round_trips, header, make_engine
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from http_message_signatures import HTTPMessageSigner, MappingKeyResolver, algorithms

from m2m_middleware import Allowed, ConfigError, Denied, Engine, KeyStore, Settings
from m2m_middleware.keys import hash_key
from m2m_middleware.limiting import Leases, Limiter, LimitPlan, _lease_keys
from m2m_middleware.request_view import RequestView
from m2m_middleware.stores import MemoryKeyStore

pytestmark = pytest.mark.redis


class Clock:
    """The leases' clock (monotonic seconds), frozen until advanced."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def batched_engine(store: KeyStore, url: str, **fields: Any) -> Engine:
    fields.setdefault("default_limits", "10/minute")
    fields.setdefault("rate_limit_sync", "batched")
    fields.setdefault("invalidation_url", "")  # no bus: its connection is not the subject
    engine = make_engine(store, rate_limit_storage=url, **fields)
    engine.limiter.return_leases_in_background = False  # the tests give back themselves
    return engine


def new_key(store: KeyStore, **fields: Any) -> str:
    return store.create_key(servers.unique("client"), **fields).key


def remaining(outcome: Allowed | Denied) -> list[int]:
    value = header(outcome, "RateLimit")
    assert value is not None
    return [int(item.split(";r=")[1].split(";")[0]) for item in value.split(", ")]


# -- settings ----------------------------------------------------------------------------


REDIS = "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"rate_limit_sync": "lazy"}, "rate_limit_sync"),
        ({"rate_limit_sync": None}, "rate_limit_sync"),
        ({"rate_limit_lease": 0}, "rate_limit_lease"),
        ({"rate_limit_lease": -0.5}, "rate_limit_lease"),
        ({"rate_limit_lease": 1.5}, "rate_limit_lease"),
        ({"rate_limit_lease": True}, "rate_limit_lease"),
        ({"rate_limit_lease": "10%"}, "rate_limit_lease"),
        ({"rate_limit_lease": float("nan")}, "rate_limit_lease"),
        ({"rate_limit_lease_idle": 0}, "rate_limit_lease_idle"),
        ({"rate_limit_lease_idle": "1s"}, "rate_limit_lease_idle"),
    ],
)
def test_a_bad_batching_value_is_a_config_error_naming_its_field(
    fields: dict[str, Any], named: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings(rate_limit_storage=REDIS, **fields)
    assert caught.value.field == named


@pytest.mark.parametrize("strategy", ["moving-window", "sliding-window-counter"])
def test_batched_takes_fixed_windows_only_and_says_so(strategy: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings(rate_limit_storage=REDIS, rate_limit_sync="batched", rate_limit_strategy=strategy)
    assert caught.value.field == "rate_limit_sync"
    assert "'fixed-window'" in str(caught.value) and strategy in str(caught.value)


def test_batched_on_a_storage_without_scripts_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings(rate_limit_storage="memcached://127.0.0.1:1", rate_limit_sync="batched")
    assert caught.value.field == "rate_limit_sync" and "memcached://" in str(caught.value)


def test_batched_on_memory_is_accepted_and_stays_exact() -> None:
    # memory:// makes no round trip to save: one setting serves development and production.
    store = MemoryKeyStore()
    engine = make_engine(store, default_limits="3/minute", rate_limit_sync="batched")
    assert engine.limiter.leases is None
    key = new_key(store)
    outcomes = [engine.check("GET", "/", None, key) for _ in range(4)]
    assert [o.allowed for o in outcomes] == [True, True, True, False]
    assert [remaining(o) for o in outcomes[:3]] == [[2], [1], [0]]


def test_a_lease_is_a_fraction_or_a_count_and_never_more_than_the_limit() -> None:
    def sizes(lease: float) -> list[int]:
        settings = Settings(
            key_store="memory://",
            rate_limit_storage=REDIS,
            rate_limit_sync="batched",
            rate_limit_lease=lease,
            default_limits="5/minute;1000/hour",
        )
        limiter = Limiter(settings)
        assert limiter.leases is not None
        return [limiter.leases.size(lim) for lim in limiter.plan(None, ()).limits]

    assert sizes(0.1) == [1, 100]  # at least one
    assert sizes(0.5) == [2, 500]
    assert sizes(20) == [5, 20]
    assert sizes(20.0) == [5, 20]


# -- one instance: exact ---------------------------------------------------------------


def test_one_instance_admits_exactly_the_limit_and_counts_down_exactly(redis_url: str) -> None:
    store = MemoryKeyStore()
    engine = batched_engine(store, redis_url, rate_limit_lease=3)
    key = new_key(store)
    outcomes = [engine.check("GET", "/", None, key) for _ in range(12)]
    assert [o.allowed for o in outcomes] == [True] * 10 + [False] * 2
    assert [remaining(o) for o in outcomes[:10]] == [[n] for n in range(9, -1, -1)]
    refused = outcomes[10]
    assert isinstance(refused, Denied) and refused.error == "rate_limited"
    assert 55 <= int(header(refused, "Retry-After") or 0) <= 60


def test_most_requests_make_no_round_trip(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = MemoryKeyStore()
    engine = batched_engine(store, redis_url, default_limits="1000/minute", rate_limit_lease=10)
    key, other = new_key(store), new_key(store)
    engine.check("GET", "/", None, new_key(store))  # connects, loads the script
    sent = count_round_trips(monkeypatch)
    # Each round trip leases the request's cost plus ten: eleven requests per trip.
    assert all(engine.check("GET", "/", None, key).allowed for _ in range(110))
    assert sent[0] == 10

    async def on_the_loop() -> list[Allowed | Denied]:
        await engine.acheck("GET", "/", None, new_key(store))  # this loop's client
        sent[0] = 0
        return [await engine.acheck("GET", "/", None, other) for _ in range(110)]

    assert all(o.allowed for o in asyncio.run(on_the_loop()))
    assert sent[0] == 10


def test_a_lease_never_outlives_its_window(redis_url: str) -> None:
    store = MemoryKeyStore()
    engine = batched_engine(store, redis_url, default_limits="100/minute", rate_limit_lease=10)
    leases = engine.limiter.leases
    assert leases is not None
    clock = leases.clock = Clock()
    key = new_key(store)
    assert remaining(engine.check("GET", "/", None, key)) == [99]
    (lease,) = leases._held.values()
    # Its end is counted from before the request was sent: Redis's window outlasts it.
    assert clock.now + 59 < lease.deadline <= clock.now + 60
    clock.now = lease.deadline - 0.001
    assert remaining(engine.check("GET", "/", None, key)) == [98]  # still spent here
    assert lease.unused == 9
    clock.now = lease.deadline
    # Past its end the lease is dropped, never spent: this request goes to Redis
    # (whose window, in real time, is still open and still counts the nine), and
    # leases 1 + 10 more: 100 - 22 leased, 10 of them here.
    assert remaining(engine.check("GET", "/", None, key)) == [100 - 22 + 10]
    assert leases._held[next(iter(leases._held))] is not lease


def one_clients_leases(redis_url: str, **fields: Any) -> tuple[Leases, Clock, LimitPlan, list[str]]:
    """A batched engine's leases on a frozen clock, its default plan (100/minute, a
    lease of 10) and the lease keys of a client "client"."""
    engine = batched_engine(MemoryKeyStore(), redis_url, default_limits="100/minute", **fields)
    leases = engine.limiter.leases
    assert leases is not None
    clock = leases.clock = Clock()
    plan = engine.limiter.plan(None, ())
    return leases, clock, plan, _lease_keys(plan, "client")


def test_a_lease_from_a_window_near_its_end_is_that_fraction_of_a_lease(redis_url: str) -> None:
    # In a window's last milliseconds a whole lease died unspent, and under load each
    # request of each instance took another (gunicorn, three workers, 1,000,000/second:
    # 429s at 3,000 requests a second). Now a lease scales with the time left.
    store = MemoryKeyStore()
    engine = batched_engine(store, redis_url, default_limits="1000/minute", rate_limit_lease=100)
    plan = engine.limiter.plan(None, ())
    fresh, late = new_key(store), new_key(store)
    late_client = store.find_by_hash(hash_key(late))
    assert late_client is not None
    (late_key,) = _lease_keys(plan, late_client.client_id)
    client = redis.Redis.from_url(redis_url)
    try:
        # Another instance opened this window 59 s ago: one second of sixty is left.
        client.hset(late_key, mapping={"c": 0, "w": "another-instance"})
        client.pexpire(late_key, 1000)
        assert engine.check("GET", "/", None, fresh).allowed
        assert engine.check("GET", "/", None, late).allowed
        (fresh_key,) = _lease_keys(plan, store.find_by_hash(hash_key(fresh)).client_id)  # type: ignore[union-attr]
        assert int(client.hget(fresh_key, "c")) == 1 + 100  # a new window: a whole lease
        assert int(client.hget(late_key, "c")) <= 1 + 2  # 1/60 of a lease, rounded up
    finally:
        client.delete(late_key)
        client.close()
        engine.limiter.close()


def test_a_fetch_that_brought_no_usable_lease_lets_the_next_miss_fetch_one(
    redis_url: str,
) -> None:
    """A lease fetched as its window ends is dead on arrival. The misses that overlapped
    its fetch leased their cost only; the next miss must fetch a whole lease again.
    (It waited until no miss overlapped another: under 16 connections that was
    hundreds of milliseconds of one round trip per request at every window's end.)"""
    leases, clock, plan, keys = one_clients_leases(redis_url)

    def miss() -> tuple[list[Any], float, list[int]]:
        taken, covered, sent_at = leases.take(keys, 1)
        assert not covered
        return taken, sent_at, leases.wants(plan.limits, keys, taken, 1)

    taken_a, sent_a, args_a = miss()
    assert args_a[3] == 1 + 10  # [cost, amount, window, wanted]: the cost and a lease
    _, _, args_c = miss()
    assert args_c[3] == 1  # a lease is on its way: the cost only
    # The fetch lands with 1 ms of its window left: its lease ends before it is spent.
    leases.settle("client", keys, taken_a, 1, [0, 11, 12, 1, b"w1"], sent_a, args_a)
    clock.now += 0.01
    taken_b, sent_b, args_b = miss()
    assert args_b[3] == 1 + 10  # C is still in flight, and still B fetches a lease
    leases.settle("client", keys, taken_b, 1, [0, 11, 11, 60_000, b"w2"], sent_b, args_b)
    assert leases.take(keys, 1)[1]  # covered: no round trip


def test_a_fetch_that_never_ended_stops_holding_back_the_others(redis_url: str) -> None:
    """A fetch whose end was never seen (a bug, a thread killed) is forgotten after
    longer than any round trip may last, or every miss would lease its cost alone."""
    leases, clock, plan, keys = one_clients_leases(redis_url, storage_timeout=0.5)
    taken, _, _ = leases.take(keys, 1)
    assert leases.wants(plan.limits, keys, taken, 1)[3] == 11
    clock.now += 1.0  # two storage timeouts
    taken, _, _ = leases.take(keys, 1)
    assert leases.wants(plan.limits, keys, taken, 1)[3] == 1
    clock.now += 0.2
    taken, _, _ = leases.take(keys, 1)
    assert leases.wants(plan.limits, keys, taken, 1)[3] == 11


def test_an_idle_lease_is_given_back_for_another_instance(redis_url: str) -> None:
    store = MemoryKeyStore()
    first = batched_engine(store, redis_url, rate_limit_lease=5)
    second = batched_engine(store, redis_url, rate_limit_lease=5)
    leases = first.limiter.leases
    assert leases is not None
    clock = leases.clock = Clock()
    key = new_key(store)
    assert first.check("GET", "/", None, key).allowed  # leases 1 + 5
    # The second instance gets the four left, then is refused: five sit in the first's lease.
    assert [second.check("GET", "/", None, key).allowed for _ in range(5)] == [True] * 4 + [False]
    assert first.limiter.return_idle() == 0  # not idle yet
    clock.now += 1.0  # rate_limit_lease_idle
    assert first.limiter.return_idle() == 1
    assert len(leases) == 0
    assert [second.check("GET", "/", None, key).allowed for _ in range(6)] == [True] * 5 + [False]


def test_close_gives_back_every_lease(redis_url: str) -> None:
    store = MemoryKeyStore()
    first = batched_engine(store, redis_url, rate_limit_lease=5)
    second = batched_engine(store, redis_url, rate_limit_lease=5)
    key = new_key(store)
    assert first.check("GET", "/", None, key).allowed
    first.limiter.close()
    assert sum(second.check("GET", "/", None, key).allowed for _ in range(12)) == 9


# -- several instances: never more than the limit --------------------------------------


@pytest.mark.parametrize(("sync", "instances"), [("exact", 3), ("batched", 1), ("batched", 3)])
def test_instances_hammering_one_client_admit_at_most_the_limit(
    redis_url: str, sync: str, instances: int
) -> None:
    store = MemoryKeyStore()
    key = new_key(store)
    limit = 150
    engines = [
        batched_engine(store, redis_url, default_limits=f"{limit}/minute", rate_limit_sync=sync)
        for _ in range(instances)
    ]
    threads_per_instance = 4
    start = threading.Barrier(instances * threads_per_instance)
    admitted = [0] * instances
    lock = threading.Lock()

    def hammer(n: int) -> None:
        engine = engines[n % instances]
        start.wait(timeout=10)
        mine = sum(engine.check("GET", "/", None, key).allowed for _ in range(60))
        with lock:
            admitted[n % instances] += mine

    threads = [
        threading.Thread(target=hammer, args=(n,)) for n in range(instances * threads_per_instance)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    # 240 attempts per instance, and every instance has been refused: within the window
    # at most the limit was admitted, in any mode and with any number of instances.
    assert not any(thread.is_alive() for thread in threads)  # every attempt was made
    assert sum(admitted) <= limit
    # (Not that every instance admitted some: under load one instance's threads can
    # spend the whole window before another's run; CI saw it in exact mode.)
    # Each instance spends what its lease still holds; then nothing is left anywhere.
    drained = [sum(e.check("GET", "/", None, key).allowed for _ in range(20)) for e in engines]
    assert sum(admitted) + sum(drained) == limit
    if sync == "exact" or instances == 1:
        assert sum(drained) == 0  # nothing was held back: exactly the limit under load
    for engine in engines:
        assert not engine.check("GET", "/", None, key).allowed


def test_tasks_on_three_event_loops_admit_at_most_the_limit(redis_url: str) -> None:
    store = MemoryKeyStore()
    key = new_key(store)
    engines = [batched_engine(store, redis_url, default_limits="90/minute") for _ in range(3)]

    def one_loop(engine: Engine, admitted: list[int]) -> None:
        async def burst() -> int:
            outcomes = await asyncio.gather(
                *(engine.acheck("GET", "/", None, key) for _ in range(60))
            )
            return sum(o.allowed for o in outcomes)

        admitted.append(asyncio.run(burst()))

    admitted: list[int] = []
    threads = [threading.Thread(target=one_loop, args=(e, admitted)) for e in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(admitted) == 3 and sum(admitted) <= 90

    async def drain(engine: Engine) -> int:
        return sum([(await engine.acheck("GET", "/", None, key)).allowed for _ in range(20)])

    assert sum(admitted) + sum(asyncio.run(drain(e)) for e in engines) == 90


def test_headers_of_several_instances_stay_within_their_leases(redis_url: str) -> None:
    # Requests spread evenly (a load balancer): each instance's r is what Redis had
    # not leased at its last round trip plus what its own lease holds, so it is off
    # the truth by at most what the other instances hold: (N - 1) x lease.
    store = MemoryKeyStore()
    key = new_key(store)
    lease, limit = 4, 60
    engines = [
        batched_engine(store, redis_url, default_limits=f"{limit}/minute", rate_limit_lease=lease)
        for _ in range(3)
    ]
    for spent in range(1, limit + 1):
        outcome = engines[spent % 3].check("GET", "/", None, key)
        assert outcome.allowed
        (r,) = remaining(outcome)
        assert abs(r - (limit - spent)) <= 2 * lease, (spent, r)
    assert not any(e.check("GET", "/", None, key).allowed for e in engines)


# -- all or nothing ----------------------------------------------------------------------


def test_a_refusal_by_one_limit_takes_from_no_lease(redis_url: str) -> None:
    store = MemoryKeyStore()
    key = new_key(store)
    engine = batched_engine(
        store,
        redis_url,
        default_limits="10/minute",
        rate_limit_lease=3,
        routes=[{"path": "/export", "limits": "2/minute"}],
    )
    assert remaining(engine.check("GET", "/other", None, key)) == [9]  # a default lease of 3
    for _ in range(2):
        assert engine.check("GET", "/export", None, key).allowed
    refused = engine.check("GET", "/export", None, key)  # covered by the default lease,
    assert isinstance(refused, Denied) and refused.status == 429  # not by the route's Redis
    assert remaining(refused) == [0]
    # The refused request put back what the default lease had set aside for it.
    assert remaining(engine.check("GET", "/other", None, key)) == [6]
    engine.limiter.close()
    client = redis.Redis.from_url(redis_url)
    try:
        pattern = f"m2m:{{{store.list_keys()[0].client_id}}}:batched/*"
        counts = sorted(int(client.hget(k, "c") or 0) for k in client.keys(pattern))
    finally:
        client.close()
    assert counts == [2, 4]  # route: two; default: four admitted, none held


def test_costs_are_taken_from_every_lease(redis_url: str) -> None:
    store = MemoryKeyStore()
    key = new_key(store)
    engine = batched_engine(
        store,
        redis_url,
        default_limits="10/minute;100/hour",
        rate_limit_lease=2,
        routes=[{"path": "/bulk", "cost": 4}],
    )
    assert remaining(engine.check("POST", "/bulk", None, key)) == [6, 96]
    assert remaining(engine.check("POST", "/bulk", None, key)) == [2, 92]
    assert not engine.check("POST", "/bulk", None, key).allowed  # 8 + 4 > 10
    assert remaining(engine.check("GET", "/", None, key)) == [1, 91]


# -- outages -----------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["deny", "allow"])
def test_a_lease_held_is_spent_while_redis_is_down_then_the_policy_decides(
    redis_server: servers.RedisServer, policy: str
) -> None:
    store = MemoryKeyStore()
    key = new_key(store)
    engine = batched_engine(
        store,
        redis_server.url,
        default_limits="100/minute",
        rate_limit_lease=5,
        on_storage_error=policy,
    )
    assert remaining(engine.check("GET", "/", None, key)) == [99]
    redis_server.stop()
    # Its units were counted in Redis before it went down: the bound holds.
    during = [engine.check("GET", "/", None, key) for _ in range(5)]
    assert [remaining(o) for o in during] == [[n] for n in range(98, 93, -1)]
    after = [engine.check("GET", "/", None, key) for _ in range(3)]
    if policy == "deny":
        assert all(isinstance(o, Denied) and o.status == 503 for o in after)
    else:
        assert all(isinstance(o, Allowed) and header(o, "RateLimit") is None for o in after)
    redis_server.start()  # an empty Redis: the window starts again
    assert remaining(engine.check("GET", "/", None, key)) == [99]


def test_the_async_path_spends_its_lease_during_an_outage(
    redis_server: servers.RedisServer,
) -> None:
    store = MemoryKeyStore()
    key = new_key(store)
    engine = batched_engine(
        store, redis_server.url, default_limits="100/minute", rate_limit_lease=2
    )

    async def scenario() -> list[int]:
        statuses = [await engine.acheck("GET", "/", None, key)]
        redis_server.stop()
        statuses += [await engine.acheck("GET", "/", None, key) for _ in range(3)]
        return [200 if o.allowed else o.status for o in statuses]  # type: ignore[union-attr]

    assert asyncio.run(scenario()) == [200, 200, 200, 503]


# -- round trips per request, either mode ------------------------------------------------


class RemoteStore(MemoryKeyStore):
    """A store other processes change: revocations reach this one over the Redis bus."""

    needs_bus = True


def _signer(private: ed25519.Ed25519PrivateKey, key_id: str) -> HTTPMessageSigner:
    return HTTPMessageSigner(
        signature_algorithm=algorithms.ED25519,
        key_resolver=MappingKeyResolver(public_keys={}, private_keys={key_id: private}),
    )


def signed_view(
    private: ed25519.Ed25519PrivateKey,
    key_id: str,
    key: str,
    nonce: str | None = None,
    address: str = "10.0.0.1",
) -> RequestView:
    request = httpx.Request("GET", "http://testserver/orders", headers={"X-API-Key": key})
    _signer(private, key_id).sign(
        request,
        key_id=key_id,
        created=datetime.datetime.now(datetime.timezone.utc),
        nonce=nonce or secrets.token_urlsafe(16),
        covered_component_ids=("@method", "@target-uri"),
    )
    headers = {k.lower(): v for k, v in request.headers.multi_items()}
    return RequestView("GET", "/orders", headers=headers, scheme="http", client_address=address)


@pytest.mark.parametrize("sync", ["exact", "batched"])
def test_round_trips_per_request(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, sync: str
) -> None:
    """What each kind of request costs in round trips to Redis, pinned: the API-key
    path one (exact) or none (batched, within a lease); a key with max_uses the
    same (its uses are the key store's, not Redis's); a failure counted by
    source_limits one, and no limit charge; a signed request one, its nonce
    remembered by the limit's own script (or alone, when a lease covers the
    limits); the revocation bus none per request."""
    private = ed25519.Ed25519PrivateKey.generate()
    pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    store = RemoteStore()
    engine = batched_engine(
        store,
        redis_url,
        default_limits="1000/minute",
        rate_limit_sync=sync,
        rate_limit_lease=100,
        source_limits="100/minute",
        invalidation_url=None,  # the bus on the limit storage's Redis
        routes=[{"path": "/orders", "signed": True}],
    )
    assert engine.bus is not None and engine.bus.ready.wait(10)  # listening all along
    plain = new_key(store)
    limited = new_key(store, max_uses=50)
    signer = store.create_key(servers.unique("client"), signing_public_key=pem)
    # An address of this run's own: source_limits counts its failures in the shared
    # Redis for a minute, and a rerun from the same address would find it blocked.
    address = "10." + ".".join(str(secrets.randbelow(256)) for _ in range(3))
    view = RequestView("GET", "/", headers={}, client_address=address)

    writes: list[str] = []  # the last count's commands: an extra one says what it was

    def trips(request: Any, n: int = 10) -> int:
        request()  # connects, loads scripts, takes the first lease
        sent = count_round_trips(monkeypatch)
        for _ in range(n):
            request()
        monkeypatch.undo()
        writes[:] = sent.writes
        return sent[0]

    lease = 0 if sync == "batched" else 1
    assert trips(lambda: engine.check("GET", "/", None, plain, view=view)) == 10 * lease, writes
    assert trips(lambda: engine.check("GET", "/", None, limited, view=view)) == 10 * lease, writes
    assert trips(lambda: engine.check("GET", "/", None, "m2m_bogus", view=view)) == 10, writes
    assert (
        trips(
            lambda: engine.check(
                "GET",
                "/orders",
                None,
                signer.key,
                view=signed_view(private, signer.record.key_id, signer.key, address=address),
            )
        )
        == 10
    ), writes  # the nonce rides in the limit's script, or alone when a lease covers it


def public_pem(private: ed25519.Ed25519PrivateKey) -> str:
    return (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.mark.parametrize("sync", ["exact", "batched"])
@pytest.mark.parametrize("front_door", ["sync", "async"])
def test_a_replay_caught_in_the_limit_script_charges_nothing_and_returns_the_use(
    redis_url: str, sync: str, front_door: str
) -> None:
    private = ed25519.Ed25519PrivateKey.generate()
    store = MemoryKeyStore()
    engine = batched_engine(
        store,
        redis_url,
        rate_limit_sync=sync,
        rate_limit_lease=3,
        routes=[{"path": "/orders", "signed": True}],
    )
    signer = store.create_key(
        servers.unique("client"), signing_public_key=public_pem(private), max_uses=5
    )
    key_id = signer.record.key_id

    def check(view: RequestView) -> Allowed | Denied:
        if front_door == "sync":
            return engine.check("GET", "/orders", None, signer.key, view=view)
        return asyncio.run(engine.acheck("GET", "/orders", None, signer.key, view=view))

    assert remaining(check(signed_view(private, key_id, signer.key, nonce="once"))) == [9]
    replay = check(signed_view(private, key_id, signer.key, nonce="once"))
    assert isinstance(replay, Denied)
    assert (replay.status, replay.error) == (401, "invalid_signature")
    assert "used before" in replay.detail
    # Neither a limit nor a use was spent on it.
    assert remaining(check(signed_view(private, key_id, signer.key))) == [8]
    assert store.get_key(key_id).remaining_uses == 3


def test_a_nonce_remembered_by_either_path_is_a_replay_on_the_other(redis_url: str) -> None:
    # An instance without limits for a route remembers nonces alone (RedisNonces);
    # one with limits in its script: the same key, so neither lets the other's replay in.
    private = ed25519.Ed25519PrivateKey.generate()
    store = MemoryKeyStore()
    routes = [{"path": "/orders", "signed": True}]
    with_limits = batched_engine(store, redis_url, rate_limit_sync="exact", routes=routes)
    without = batched_engine(store, redis_url, default_limits=(), routes=routes)
    assert with_limits.limiter.carries_nonces(with_limits.limiter.plan(None, ()))
    assert not without.limiter.carries_nonces(without.limiter.plan(None, ()))
    signer = store.create_key(servers.unique("client"), signing_public_key=public_pem(private))
    key_id = signer.record.key_id
    for first, second in ((with_limits, without), (without, with_limits)):
        nonce = secrets.token_urlsafe(8)
        view = signed_view(private, key_id, signer.key, nonce=nonce)
        assert first.check("GET", "/orders", None, signer.key, view=view).allowed
        again = signed_view(private, key_id, signer.key, nonce=nonce)
        replay = second.check("GET", "/orders", None, signer.key, view=again)
        assert isinstance(replay, Denied) and replay.error == "invalid_signature"
