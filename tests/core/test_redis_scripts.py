"""The limiter's Lua scripts on redis-py's own connections (``m2m_middleware.redis_scripts``).

What a user depends on now that a charge no longer goes through redis-py's
``Script``: a charge survives Redis forgetting its scripts (``SCRIPT FLUSH``) or
closing an idle connection, and is counted once; a timeout is never sent again;
and an answer never reaches another request: not after a timeout, not after a
cancellation, not inside a pipeline, not after an error answer, not in a forked
child.

Against a ``redis-server`` of the test's own where the test flushes scripts, kills
connections or counts what is sent; the machine's Redis elsewhere (each test its
own client ids, their keys deleted afterwards); and :class:`FakeRedis`, a few lines
of RESP on 127.0.0.1, where an answer must come late (``DEBUG SLEEP`` or a busy
script would stall every other test sharing the server).
"""

from __future__ import annotations

import asyncio
import gc
import os
import queue
import re
import select
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
import redis.asyncio
import servers
from core_support import count_round_trips, header, make_engine
from redis.exceptions import ResponseError

from m2m_middleware import Allowed, Denied, Engine, KeyStore
from m2m_middleware.redis_scripts import AsyncScripts, SyncScripts, _sha
from m2m_middleware.stores import MemoryKeyStore

pytestmark = pytest.mark.redis

Check = Callable[..., "Allowed | Denied"]

STRATEGIES = ["fixed-window", "moving-window", "sliding-window-counter"]


#: The engines of the test under way, closed after it (see close_engines).
_engines: list[Engine] = []


def redis_engine(store: KeyStore, url: str, **fields: Any) -> Engine:
    fields.setdefault("default_limits", "5/minute")
    fields.setdefault("invalidation_url", "")  # no bus: its connection is not the subject
    engine = make_engine(store, rate_limit_storage=url, **fields)
    _engines.append(engine)
    return engine


@pytest.fixture(autouse=True)
def close_engines() -> Iterator[None]:
    """Closes the sync connections of the test's engines: left to the garbage
    collector, a connection in a reference cycle may have its socket finalized
    before it closes it (a ResourceWarning, an error here, in some later test)."""
    yield
    while _engines:
        _engines.pop().limiter.close()


def remaining(outcome: Allowed | Denied) -> int:
    """What the one default limit has left, from the ``RateLimit`` header."""
    assert isinstance(outcome, Allowed), outcome
    found = re.fullmatch(r'"default-60s";r=(\d+);t=\d+', header(outcome, "RateLimit") or "")
    assert found, header(outcome, "RateLimit")
    return int(found.group(1))


def unavailable(outcome: Allowed | Denied) -> bool:
    """Whether the engine answered that Redis failed (``on_storage_error="deny"``)."""
    return isinstance(outcome, Denied) and outcome.status == 503


# -- reaching into the scripts' connections ----------------------------------------------


def sync_scripts(engine: Engine) -> SyncScripts:
    scripts = engine.limiter._scripts
    assert isinstance(scripts, SyncScripts)
    return scripts


def idle_connection(engine: Engine) -> Any:
    """The one sync connection the engine's scripts hold between charges."""
    (connection,) = sync_scripts(engine)._free
    return connection


def loop_scripts(engine: Engine) -> AsyncScripts:
    """This event loop's pipeline of the engine's scripts (after a charge on it)."""
    scripts = engine.limiter._aio[asyncio.get_running_loop()][3]
    assert isinstance(scripts, AsyncScripts)
    return scripts


def connection_id(connection: Any) -> int:
    """The id Redis gave a sync connection (asked on it: nothing else is using it)."""
    connection.send_command("CLIENT", "ID")
    return int(connection.read_response())


async def aconnection_id(connection: Any) -> int:
    await connection.send_command("CLIENT", "ID")
    return int(await connection.read_response())


def connected_ids(url: str) -> set[int]:
    with redis.Redis.from_url(url) as admin:
        return {int(c["id"]) for c in admin.client_list()}


def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Whether ``condition`` holds within ``timeout``: for what only the server's own
    event loop does (it notices a closed socket when it next polls), with no event
    to wait for here."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture
def clients(redis_url: str) -> Iterator[Callable[[KeyStore], tuple[str, str]]]:
    """``new(store) -> (client id, api key)`` of a fresh client; its counters in the
    machine's Redis are deleted after the test."""
    made: list[str] = []

    def new(store: KeyStore) -> tuple[str, str]:
        client_id = servers.unique("scripts")
        made.append(client_id)
        return client_id, store.create_key(client_id).key

    yield new
    with redis.Redis.from_url(redis_url) as admin:
        for client_id in made:
            for key in admin.scan_iter(match=f"m2m:{{{client_id}}}:*", count=10_000):
                admin.delete(key)


def new_key(store: KeyStore, client_id: str | None = None) -> str:
    """A key of a client of its own (for the test's own servers, which die with it)."""
    return store.create_key(client_id or servers.unique("scripts")).key


# -- a Redis whose answers the test holds back -----------------------------------------------


@dataclass
class Held:
    """The answer to one EVALSHA, written when ``release`` is set; ``written`` once it was."""

    release: threading.Event = field(default_factory=threading.Event)
    written: threading.Event = field(default_factory=threading.Event)


def _parse(buffer: bytes) -> tuple[list[bytes], bytes] | None:
    """One command (an array of bulk strings) off the front of ``buffer``, or None
    while it is incomplete."""
    if not buffer:
        return None
    assert buffer[:1] == b"*", buffer[:40]
    end = buffer.find(b"\r\n")
    if end < 0:
        return None
    parts, pos = [], end + 2
    for _ in range(int(buffer[1:end])):
        end = buffer.find(b"\r\n", pos)
        if end < 0:
            return None
        start = end + 2
        stop = start + int(buffer[pos + 1 : end])
        if len(buffer) < stop + 2:
            return None
        parts.append(buffer[start:stop])
        pos = stop + 2
    return parts, buffer[pos:]


class FakeRedis:
    """A RESP3 server on 127.0.0.1 that counts as the fixed-window script does.

    Each EVALSHA adds its cost to its client's count when it is read (Redis runs a
    script when it reads it, whoever waits for the answer) and answers ``{0,
    count, 60000}``: allowed, a minute left. ``counts`` may be preset, so that
    each client's answers differ from every other's. The answer to the n-th
    EVALSHA (``hold(n)``) is written only once the test releases it, and the
    answers after it on that connection wait behind it, in order, as Redis's do.
    Everything else is answered ``+OK``.
    """

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        #: client id (the keys' hash tag) -> its count.
        self.counts: dict[str, int] = {}
        #: EVALSHAs read, and the client of each, in order.
        self.evalshas: list[str] = []
        self.connections = 0
        #: Seconds every answer waits before it is written: a Redis on another host.
        self.delay = 0.0
        self._held: dict[int, Held] = {}
        self._changed = threading.Condition()
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def hold(self, n: int) -> Held:
        """Hold back the answer to the ``n``-th EVALSHA (counted from 1)."""
        held = self._held[n] = Held()
        return held

    def wait_for_evalshas(self, n: int, timeout: float = 5.0) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.evalshas) >= n, timeout), self.evalshas

    def close(self) -> None:
        for held in self._held.values():
            held.release.set()
        with suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        self._listener.close()
        with self._changed:
            sockets = list(self._sockets)
        for sock in sockets:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(5)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            answers: queue.SimpleQueue[tuple[bytes, Held | None] | None] = queue.SimpleQueue()
            with self._changed:
                self._sockets.append(sock)
                self.connections += 1
                for target in (self._read, self._write):
                    thread = threading.Thread(target=target, args=(sock, answers), daemon=True)
                    self._threads.append(thread)
                    thread.start()

    def _read(self, sock: socket.socket, answers: queue.SimpleQueue[Any]) -> None:
        buffer = b""
        try:
            while chunk := sock.recv(65536):
                buffer += chunk
                while (parsed := _parse(buffer)) is not None:
                    command, buffer = parsed
                    answers.put(self._answer(command))
        except OSError:
            pass
        finally:
            answers.put(None)

    def _write(self, sock: socket.socket, answers: queue.SimpleQueue[Any]) -> None:
        while (item := answers.get()) is not None:
            data, held = item
            if held is not None:
                held.release.wait(10)
            if self.delay:
                time.sleep(self.delay)
            with suppress(OSError):  # the client may have closed it meanwhile
                sock.sendall(data)
            if held is not None:
                held.written.set()
        sock.close()

    def _answer(self, command: list[bytes]) -> tuple[bytes, Held | None]:
        name = command[0].upper()
        if name == b"EVALSHA":
            keys = command[3 : 3 + int(command[2])]
            cost = int(command[3 + len(keys)])
            with self._changed:
                (client,) = {key.decode().split("{", 1)[1].split("}", 1)[0] for key in keys}
                count = self.counts[client] = self.counts.get(client, 0) + cost
                self.evalshas.append(client)
                held = self._held.get(len(self.evalshas))
                self._changed.notify_all()
            parts = [b":0\r\n"] + [b":%d\r\n:60000\r\n" % count] * len(keys)
            return b"*%d\r\n" % (1 + 2 * len(keys)) + b"".join(parts), held
        if name == b"HELLO":  # redis-py speaks RESP3: a map of what the server is
            return b"%3\r\n+server\r\n+redis\r\n+version\r\n+7.0.0\r\n+proto\r\n:3\r\n", None
        if name == b"PING":
            return b"+PONG\r\n", None
        if name == b"SCRIPT":  # LOAD: its name, as Redis answers
            sha = _sha(command[2].decode()).encode()
            return b"$%d\r\n%s\r\n" % (len(sha), sha), None
        return b"+OK\r\n", None


@pytest.fixture
def fake_redis() -> Iterator[FakeRedis]:
    server = FakeRedis()
    yield server
    server.close()


def fake_engine(store: KeyStore, fake: FakeRedis, storage_timeout: float = 0.3) -> Engine:
    # The default: short enough for a test that waits it out, long enough that a
    # loaded machine still connects and answers in time where no answer is held.
    return redis_engine(
        store, fake.url, default_limits="100/minute", storage_timeout=storage_timeout
    )


async def wait_in_thread(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, 10)


# -- Redis forgot the scripts -------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_charge_after_script_flush_loads_the_script_and_is_counted_once(
    check: Check, redis_server: servers.RedisServer, strategy: str
) -> None:
    store = MemoryKeyStore()
    key = new_key(store)
    engine = redis_engine(store, redis_server.url, rate_limit_strategy=strategy)
    assert remaining(check(engine, "GET", "/", None, key)) == 4
    sha = engine.limiter._script.sha
    with redis.Redis.from_url(redis_server.url) as admin:
        admin.script_flush()  # as a restart of Redis does
        assert admin.script_exists(sha) == [False]
        # The EVALSHA answered NOSCRIPT ran nothing: loaded and run again, it charges once.
        assert remaining(check(engine, "GET", "/", None, key)) == 3
        assert admin.script_exists(sha) == [True]
    assert remaining(check(engine, "GET", "/", None, key)) == 2


def test_a_pipelined_batch_after_script_flush_is_counted_once_each(
    redis_server: servers.RedisServer,
) -> None:
    store = MemoryKeyStore()
    key = new_key(store)
    engine = redis_engine(store, redis_server.url, default_limits="100/minute")

    async def on_one_loop() -> list[int]:
        assert remaining(await engine.acheck("GET", "/", None, key)) == 99
        with redis.Redis.from_url(redis_server.url) as admin:
            admin.script_flush()
        # Every EVALSHA of the batch is answered NOSCRIPT; each is loaded and sent again.
        outcomes = await asyncio.gather(*(engine.acheck("GET", "/", None, key) for _ in range(8)))
        return [remaining(o) for o in outcomes]

    assert sorted(asyncio.run(on_one_loop())) == list(range(91, 99))
    assert remaining(engine.check("GET", "/", None, key)) == 90
    with redis.Redis.from_url(redis_server.url) as admin:
        loads = admin.info("commandstats").get("cmdstat_script|load", {}).get("calls")
    assert loads == 2  # at the first call, then once for the whole batch, not once each


# -- Redis closed an idle connection ---------------------------------------------------------


def test_a_sync_connection_redis_closed_while_idle_is_replaced_and_charged_once(
    redis_server: servers.RedisServer,
) -> None:
    store = MemoryKeyStore()
    key = new_key(store)
    engine = redis_engine(store, redis_server.url)
    assert remaining(engine.check("GET", "/", None, key)) == 4
    connection = idle_connection(engine)
    before = connection_id(connection)
    with redis.Redis.from_url(redis_server.url) as admin:
        assert admin.client_kill_filter(_id=before) == 1  # this test's server, this connection
    # Sent on the dead socket, the charge fails to be read, is sent again once on a new
    # connection, and counts once.
    assert remaining(engine.check("GET", "/", None, key)) == 3
    assert idle_connection(engine) is connection
    assert connection_id(connection) != before  # it did connect afresh
    assert remaining(engine.check("GET", "/", None, key)) == 2


def test_an_async_connection_redis_closed_while_idle_is_replaced_and_charged_once(
    redis_server: servers.RedisServer,
) -> None:
    store = MemoryKeyStore()
    keys = [new_key(store) for _ in range(3)]
    engine = redis_engine(store, redis_server.url)

    async def on_one_loop() -> tuple[list[int], list[int]]:
        for key in keys:
            assert remaining(await engine.acheck("GET", "/", None, key)) == 4
        connection = loop_scripts(engine)._connection
        before = await aconnection_id(connection)
        with redis.Redis.from_url(redis_server.url) as admin:
            assert admin.client_kill_filter(_id=before) == 1
        # A batch on the dead connection: every one fails, and is sent again once.
        outcomes = await asyncio.gather(*(engine.acheck("GET", "/", None, k) for k in keys))
        assert loop_scripts(engine)._connection is connection
        assert await aconnection_id(connection) != before
        after = await asyncio.gather(*(engine.acheck("GET", "/", None, k) for k in keys))
        return [remaining(o) for o in outcomes], [remaining(o) for o in after]

    assert asyncio.run(on_one_loop()) == ([3, 3, 3], [2, 2, 2])


# -- a late answer reaches no one ---------------------------------------------------------------


def test_a_sync_charge_that_timed_out_is_not_sent_again_and_its_late_answer_is_dropped(
    fake_redis: FakeRedis,
) -> None:
    store = MemoryKeyStore()
    key = new_key(store, "alpha")
    engine = fake_engine(store, fake_redis)
    late = fake_redis.hold(1)
    assert unavailable(engine.check("GET", "/", None, key))
    assert fake_redis.evalshas == ["alpha"]  # sent once: Redis may run it yet
    late.release.set()
    assert late.written.wait(10)  # the late answer (count 1) went to the first socket
    # Had that socket been lent again, this charge would read the late answer (99 left).
    assert remaining(engine.check("GET", "/", None, key)) == 98
    assert remaining(engine.check("GET", "/", None, key)) == 97
    assert fake_redis.evalshas == ["alpha"] * 3


def test_an_async_charge_that_timed_out_is_not_sent_again_and_its_late_answer_is_dropped(
    fake_redis: FakeRedis,
) -> None:
    store = MemoryKeyStore()
    key = new_key(store, "alpha")
    engine = fake_engine(store, fake_redis)

    async def on_one_loop() -> None:
        late = fake_redis.hold(1)
        assert unavailable(await engine.acheck("GET", "/", None, key))
        assert fake_redis.evalshas == ["alpha"]
        late.release.set()
        await wait_in_thread(late.written)
        assert remaining(await engine.acheck("GET", "/", None, key)) == 98
        assert remaining(await engine.acheck("GET", "/", None, key)) == 97

    asyncio.run(on_one_loop())
    assert fake_redis.evalshas == ["alpha"] * 3


def test_a_timeout_inside_a_pipelined_batch_gives_no_request_another_ones_answer(
    fake_redis: FakeRedis,
) -> None:
    store = MemoryKeyStore()
    names = ["alpha", "beta", "gamma"]
    keys = [new_key(store, name) for name in names]
    # Counts apart, so that an answer delivered to the wrong request shows.
    fake_redis.counts.update(alpha=0, beta=10, gamma=20)
    engine = fake_engine(store, fake_redis)

    async def on_one_loop() -> list[Allowed | Denied]:
        first = await engine.acheck("GET", "/", None, keys[0])  # the loop's connection
        assert remaining(first) == 99
        late = fake_redis.hold(2)  # the first answer of the batch
        batch = await asyncio.gather(*(engine.acheck("GET", "/", None, k) for k in keys))
        late.release.set()
        await wait_in_thread(late.written)
        return [*batch, *[await engine.acheck("GET", "/", None, k) for k in keys]]

    outcomes = asyncio.run(on_one_loop())
    # Each charge of the batch was sent once and run (counted) by Redis; the answers
    # after the late one were never read: no request is told another's count.
    assert sorted(fake_redis.evalshas) == sorted(["alpha"] * 3 + ["beta"] * 2 + ["gamma"] * 2)
    assert unavailable(outcomes[0])
    for outcome, own in zip(outcomes[1:3], (89, 79), strict=True):
        assert unavailable(outcome) or remaining(outcome) == own
    assert [remaining(o) for o in outcomes[3:]] == [97, 88, 78]


# -- a cancelled request --------------------------------------------------------------------


@pytest.mark.parametrize("position", [0, 1, 2])
def test_a_request_cancelled_in_flight_does_not_shift_the_answers_after_it(
    fake_redis: FakeRedis, position: int
) -> None:
    store = MemoryKeyStore()
    names = ["alpha", "beta", "gamma"]
    keys = dict(zip(names, (new_key(store, name) for name in names), strict=True))
    fake_redis.counts.update(alpha=0, beta=10, gamma=20)
    engine = fake_engine(store, fake_redis, storage_timeout=10)  # released long before

    async def on_one_loop() -> tuple[str, dict[str, list[int]]]:
        seen: dict[str, list[int]] = {name: [] for name in names}
        for name in names:  # each key looked up, the loop's connection open
            seen[name].append(remaining(await engine.acheck("GET", "/", None, keys[name])))
        held = fake_redis.hold(4)  # the first answer of the batch
        tasks = {n: asyncio.create_task(engine.acheck("GET", "/", None, keys[n])) for n in names}
        # All three written in one round trip and run by Redis; their answers wait.
        await asyncio.to_thread(fake_redis.wait_for_evalshas, 6)
        cancelled = fake_redis.evalshas[3 + position]
        tasks[cancelled].cancel()
        with pytest.raises(asyncio.CancelledError):
            await tasks.pop(cancelled)
        held.release.set()
        for name, task in tasks.items():
            seen[name].append(remaining(await task))
        for name in names:
            seen[name].append(remaining(await engine.acheck("GET", "/", None, keys[name])))
        return cancelled, seen

    cancelled, seen = asyncio.run(on_one_loop())
    # Each got its own count; the cancelled charge was run (counted) by Redis, and its
    # answer, read in its turn, went to nobody.
    expected = {"alpha": [99, 98, 97], "beta": [89, 88, 87], "gamma": [79, 78, 77]}
    del expected[cancelled][1]
    assert seen == expected
    assert len(fake_redis.evalshas) == 9  # each charge sent once


# -- pipelining ---------------------------------------------------------------------------------


def test_concurrent_async_charges_share_round_trips_and_each_gets_its_own_count(
    redis_server: servers.RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = MemoryKeyStore()
    engine = redis_engine(store, redis_server.url, default_limits="100/minute")
    keys = [new_key(store) for _ in range(4)]
    for spent, key in enumerate(keys):  # client k has spent k: no two count alike
        for _ in range(spent):
            engine.check("GET", "/", None, key)
    sent = count_round_trips(monkeypatch)

    async def on_one_loop() -> list[Allowed | Denied]:
        await engine.acheck("GET", "/", None, new_key(store))  # the loop's connection
        sent[0] = 0
        return await asyncio.gather(
            *(engine.acheck("GET", "/", None, key) for key in keys for _ in range(3))
        )

    outcomes = asyncio.run(on_one_loop())
    assert sent[0] < len(outcomes)  # 12 charges, most of them in one write
    for spent, key in enumerate(keys):
        got = sorted(remaining(o) for o in outcomes[3 * spent : 3 * spent + 3])
        assert got == [97 - spent, 98 - spent, 99 - spent]
        assert remaining(engine.check("GET", "/", None, key)) == 96 - spent


# -- an error answer is that call's only ---------------------------------------------------------

#: Answers its argument, or an error when the argument is "fail".
ECHO_OR_FAIL = """if ARGV[1] == 'fail' then return redis.error_reply('ERR failed on purpose') end
return ARGV[1]"""


def test_a_sync_error_answer_fails_its_call_only_and_keeps_the_connection(redis_url: str) -> None:
    with redis.Redis.from_url(redis_url) as client:
        scripts = SyncScripts(client)
        run = scripts.script(ECHO_OR_FAIL)
        try:
            assert run([], ["a"]) == b"a"
            (connection,) = scripts._free
            sock = connection._sock
            with pytest.raises(ResponseError, match="failed on purpose"):
                run([], ["fail"])
            assert run([], ["b"]) == b"b"
            # An error answer is read whole: the connection stays in step, and open.
            assert scripts._free == [connection] and connection._sock is sock
        finally:
            scripts.close()


# -- waiting for a sync answer: polling first, blocking when Redis is far ------------------


def count_polls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many sync calls polled for their answer before reading it, so far."""
    from m2m_middleware import redis_scripts

    polls = [0]
    new_poll = select.poll

    def counted() -> Any:
        polls[0] += 1
        return new_poll()

    monkeypatch.setattr(redis_scripts, "_new_poll", counted)
    return polls


needs_polling = pytest.mark.skipif(
    not (hasattr(os, "sched_yield") and hasattr(select, "poll")),
    reason="no sched_yield or poll on this platform: sync calls always block",
)


@needs_polling
def test_a_sync_call_to_a_far_redis_stops_polling_and_blocks_for_its_answer(
    fake_redis: FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Redis a few milliseconds away costs its callers no CPU while they wait: after
    a few calls they block for the answer instead of polling for it."""
    polls = count_polls(monkeypatch)
    fake_redis.delay = 0.005  # 5 ms a round trip, longer than the polling budget
    store = MemoryKeyStore()
    key = new_key(store, "far")
    engine = redis_engine(
        store, fake_redis.url, default_limits="100/minute", storage_timeout=2.0, storage_poll=0.002
    )
    assert sync_scripts(engine).poll == 0.002
    assert remaining(engine.check("GET", "/", None, key)) == 99
    assert polls[0] == 1  # nothing known of the round trips yet: the first call polled
    for _ in range(20):
        engine.check("GET", "/", None, key)
    assert sync_scripts(engine).round_trip > 0.002
    polled = polls[0]
    for left in range(78, 68, -1):
        assert remaining(engine.check("GET", "/", None, key)) == left
    assert polls[0] == polled  # blocked at once, every one of the last ten


@needs_polling
def test_sync_calls_that_poll_for_their_answers_each_get_their_own_count(
    redis_url: str,
    clients: Callable[[KeyStore], tuple[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Against the machine's Redis (loopback), with a budget no round trip outlasts so
    that every call polls: each answer is still the call's own, the counts step down
    one by one, from four threads at once."""
    polls = count_polls(monkeypatch)
    store = MemoryKeyStore()
    _, key = clients(store)
    engine = redis_engine(store, redis_url, default_limits="200/minute", storage_poll=0.01)
    seen: list[int] = []

    def charge() -> None:
        for _ in range(40):
            seen.append(remaining(engine.check("GET", "/", None, key)))

    threads = [threading.Thread(target=charge) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    assert sorted(seen) == list(range(40, 200))
    assert polls[0] == 160  # every call polled: its round trips were well under 5 ms


@needs_polling
def test_polling_is_off_with_a_budget_of_zero_and_on_a_green_socket(
    fake_redis: FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``storage_poll=0`` turns the polling off; a socket that is not the standard
    library's own (gevent's; eventlet's, which subclasses ``ssl.SSLSocket``) is never
    polled in a busy loop, which would stall its hub."""
    from m2m_middleware import redis_scripts

    polls = count_polls(monkeypatch)
    fake_redis.delay = 0.002
    store = MemoryKeyStore()
    key = new_key(store, "off")
    engine = redis_engine(
        store, fake_redis.url, default_limits="100/minute", storage_timeout=2.0, storage_poll=0
    )
    for left in (99, 98, 97):
        assert remaining(engine.check("GET", "/", None, key)) == left
    assert polls[0] == 0

    class GreenSocket(socket.socket):  # a subclass of another module's, as eventlet's
        pass

    left, right = socket.socketpair()
    green = GreenSocket(fileno=os.dup(left.fileno()))
    try:
        redis_scripts._spin(green, 0.05)
        assert polls[0] == 0
        redis_scripts._spin(left, 0.001)  # the standard library's socket: it polls
        assert polls[0] == 1
    finally:
        for sock in (green, left, right):
            sock.close()


@pytest.mark.parametrize("value", [-0.001, 0.5, "fast", True])
def test_a_storage_poll_out_of_range_is_a_config_error(value: object) -> None:
    from m2m_middleware import ConfigError, Settings

    with pytest.raises(ConfigError, match="storage_poll"):
        Settings(storage_poll=value)  # type: ignore[arg-type]


def test_an_async_error_answer_fails_its_call_only_even_inside_a_batch(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent = count_round_trips(monkeypatch)

    async def on_one_loop() -> None:
        client = redis.asyncio.Redis.from_url(redis_url)
        scripts = AsyncScripts(client)
        try:
            run = scripts.script(ECHO_OR_FAIL)
            assert await run([], ["warm"]) == b"warm"  # connected, the script loaded
            connection = scripts._connection
            sent[0] = 0
            answers = await asyncio.gather(
                *(run([], [arg]) for arg in ("a", "fail", "b", "fail", "c")),
                return_exceptions=True,
            )
            assert sent[0] == 1  # one batch: the errors had neighbours on both sides
            assert [a if isinstance(a, bytes) else str(a) for a in answers] == [
                b"a",
                "failed on purpose",
                b"b",
                "failed on purpose",
                b"c",
            ]
            assert all(isinstance(a, ResponseError) for a in answers[1::2])
            assert await run([], ["d"]) == b"d"
            assert sent[0] == 2 and scripts._connection is connection and connection.is_connected
        finally:
            await scripts.aclose()
            await client.aclose()

    asyncio.run(on_one_loop())


def broken_counter(redis_url: str, engine: Engine, client_id: str) -> None:
    """Makes the client's counter key another type (say, written by something else
    sharing the database): the script's GET is answered WRONGTYPE."""
    (limit,) = engine.limiter._default
    with redis.Redis.from_url(redis_url) as admin:
        admin.hset(f"m2m:{{{client_id}}}:{limit.key_prefix}", "not", "a counter")


def test_a_client_whose_counter_redis_refuses_fails_alone(
    redis_url: str, clients: Callable[[KeyStore], tuple[str, str]]
) -> None:
    store = MemoryKeyStore()
    engine = redis_engine(store, redis_url)
    (broken_id, broken), (_, fine) = clients(store), clients(store)
    broken_counter(redis_url, engine, broken_id)
    assert remaining(engine.check("GET", "/", None, fine)) == 4
    assert unavailable(engine.check("GET", "/", None, broken))
    assert remaining(engine.check("GET", "/", None, fine)) == 3
    assert unavailable(engine.check("GET", "/", None, broken))


def test_a_client_whose_counter_redis_refuses_fails_alone_in_its_batch(
    redis_url: str, clients: Callable[[KeyStore], tuple[str, str]]
) -> None:
    store = MemoryKeyStore()
    engine = redis_engine(store, redis_url)
    (broken_id, broken), (_, first), (_, last) = clients(store), clients(store), clients(store)
    broken_counter(redis_url, engine, broken_id)

    async def on_one_loop() -> list[Allowed | Denied]:
        assert remaining(await engine.acheck("GET", "/", None, first)) == 4
        batch = [first, broken, last, broken, first]
        return [
            *await asyncio.gather(*(engine.acheck("GET", "/", None, k) for k in batch)),
            await engine.acheck("GET", "/", None, last),
        ]

    outcomes = asyncio.run(on_one_loop())
    assert unavailable(outcomes[1]) and unavailable(outcomes[3])
    assert sorted(remaining(o) for o in (outcomes[0], outcomes[4])) == [2, 3]
    assert [remaining(outcomes[2]), remaining(outcomes[5])] == [4, 3]


# -- a forked child --------------------------------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="os.fork as on Linux")
@pytest.mark.parametrize("options", ["", "?max_connections=1"])
def test_a_forked_child_charges_on_a_connection_of_its_own(
    redis_url: str, clients: Callable[[KeyStore], tuple[str, str]], options: str
) -> None:
    # A child sharing its parent's socket would read answers meant for the
    # parent (or the parent the child's): each must connect for itself; and the
    # child's pool, inherited with the parent's count, must still let it.
    store = MemoryKeyStore()
    if options and "?" in redis_url:
        options = "&" + options[1:]
    engine = redis_engine(store, redis_url + options)
    _, key = clients(store)
    assert remaining(engine.check("GET", "/", None, key)) == 4
    connection = idle_connection(engine)
    parent_id = connection_id(connection)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: forking with threads
        pid = os.fork()
    if pid == 0:  # the child: report through the exit status alone
        code = 1
        try:
            outcome = engine.check("GET", "/", None, key)
            code = 2
            if remaining(outcome) == 3:
                code = 3
                if connection_id(idle_connection(engine)) != parent_id:
                    code = 0
        finally:
            os._exit(code)
    pidfd = os.pidfd_open(pid)
    try:
        if not select.select([pidfd], [], [], 20)[0]:
            os.kill(pid, signal.SIGKILL)
    finally:
        os.close(pidfd)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent's connection is untouched by the child's (closed, not shut down) copy.
    assert remaining(engine.check("GET", "/", None, key)) == 2
    assert idle_connection(engine) is connection
    assert connection_id(connection) == parent_id


# -- closing ------------------------------------------------------------------------------------


def test_close_closes_the_idle_connections_and_a_later_charge_reconnects(
    redis_url: str, clients: Callable[[KeyStore], tuple[str, str]]
) -> None:
    store = MemoryKeyStore()
    engine = redis_engine(store, redis_url)
    _, key = clients(store)
    assert remaining(engine.check("GET", "/", None, key)) == 4
    connection = idle_connection(engine)
    before = connection_id(connection)
    engine.limiter.close()
    assert not connection.is_connected
    assert eventually(lambda: before not in connected_ids(redis_url))
    assert remaining(engine.check("GET", "/", None, key)) == 3
    assert connection_id(idle_connection(engine)) != before


def test_a_charge_after_close_reconnects_within_the_pools_max_connections(
    redis_server: servers.RedisServer,
) -> None:
    # The scripts' connections are the pool's (make_connection, counted against its
    # max_connections): a charge after close() must not need one more.
    store = MemoryKeyStore()
    engine = redis_engine(store, redis_server.url + "?max_connections=1")
    key = new_key(store)
    assert remaining(engine.check("GET", "/", None, key)) == 4
    engine.limiter.close()
    assert remaining(engine.check("GET", "/", None, key)) == 3
    engine.limiter.close()
    assert remaining(engine.check("GET", "/", None, key)) == 2


@pytest.mark.parametrize("closed_first", [False, True])
def test_scripts_dropped_without_close_close_their_connections(
    redis_url: str, closed_first: bool
) -> None:
    # An engine a test or a reload lets go: its sockets close when it is collected,
    # not at exit with an "unclosed socket" ResourceWarning; also after a close()
    # (which swaps the free list) and a charge that connected again.
    client = redis.Redis.from_url(redis_url)
    scripts = SyncScripts(client)
    run = scripts.script(ECHO_OR_FAIL)
    assert run([], ["one"]) == b"one"
    if closed_first:
        scripts.close()
        assert run([], ["two"]) == b"two"
    (connection,) = scripts._free
    assert connection.is_connected
    del scripts, run
    gc.collect()
    assert not connection.is_connected
    client.close()


def test_close_closes_a_connection_lent_out_meanwhile_when_it_comes_back(
    fake_redis: FakeRedis,
) -> None:
    store = MemoryKeyStore()
    key = new_key(store, "alpha")
    engine = fake_engine(store, fake_redis, storage_timeout=10)  # released long before
    held = fake_redis.hold(1)
    outcomes: list[Allowed | Denied] = []
    charging = threading.Thread(target=lambda: outcomes.append(engine.check("GET", "/", None, key)))
    charging.start()
    fake_redis.wait_for_evalshas(1)  # the charge holds its connection, waiting for the answer
    engine.limiter.close()
    held.release.set()
    charging.join(10)
    assert remaining(outcomes[0]) == 99
    assert not idle_connection(engine).is_connected
    assert remaining(engine.check("GET", "/", None, key)) == 98  # and connects again
