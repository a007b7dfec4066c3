"""Red-team checks of m2m_middleware.redis_scripts' pipelined async path, on a fake Redis.

The fake runs ``EVALSHA`` by counting it per key and answering ``[key, arg]``, so a test
sees how often Redis ran each call and whether an answer reached its own caller.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("redis")

import redis
import redis.asyncio as aredis
from redis.exceptions import RedisError

from m2m_middleware.limiting import _redis_options
from m2m_middleware.redis_scripts import AsyncScripts, SyncScripts

SOURCE = "return {KEYS[1], ARGV[1]}"


def _commands(buf: bytes) -> tuple[list[list[bytes]], bytes]:
    """The complete commands (arrays of bulk strings) at the start of ``buf``, and the rest."""
    out = []
    while buf.startswith(b"*"):
        end = buf.find(b"\r\n")
        if end < 0:
            break
        count, at, args = int(buf[1:end]), end + 2, []
        for _ in range(count):
            line = buf.find(b"\r\n", at)
            if line < 0:
                return out, buf
            size = int(buf[at + 1 : line])
            if len(buf) < line + 2 + size + 2:
                return out, buf
            args.append(buf[line + 2 : line + 2 + size])
            at = line + 2 + size + 2
        else:
            out.append(args)
            buf = buf[at:]
            continue
        break
    return out, buf


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


class FakeRedis:
    def __init__(self) -> None:
        self.runs: Counter[bytes] = Counter()
        #: Seconds Redis takes to run each EVALSHA (one at a time, as Redis does).
        self.delay = 0.0
        #: Run every command of the next read, answer the first, then close (a lost connection).
        self.lose_after_first = False
        #: Run every command of the next read, answer none, then close.
        self.lose_all = False

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = b""
        try:
            while data := await reader.read(65536):
                commands, buf = _commands(buf + data)
                losing, answered = self.lose_after_first, False
                if self.lose_all and any(c[0].upper() == b"EVALSHA" for c in commands):
                    self.lose_all = False
                    for command in commands:
                        self.runs[command[3]] += command[0].upper() == b"EVALSHA"
                    return  # run, and closed before any answer was written
                for command in commands:
                    name = command[0].upper()
                    if name == b"HELLO":
                        writer.write(b"%1\r\n$5\r\nproto\r\n:3\r\n")
                        continue
                    if name != b"EVALSHA":
                        writer.write(b"+OK\r\n")
                        continue
                    if self.delay:
                        await asyncio.sleep(self.delay)
                    key, arg = command[3], command[4]
                    self.runs[key] += 1
                    if losing and answered:
                        continue  # run, its answer lost with the connection
                    writer.write(b"*2\r\n" + _bulk(key) + _bulk(arg))
                    answered = True
                await writer.drain()
                if losing and answered:
                    self.lose_after_first = False
                    return
        except asyncio.CancelledError:
            pass  # the test's loop ends: nothing is left to answer
        finally:
            writer.close()


@asynccontextmanager
async def fake_redis() -> AsyncIterator[tuple[FakeRedis, int]]:
    fake = FakeRedis()
    server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    try:
        yield fake, server.sockets[0].getsockname()[1]
    finally:
        server.close()


def scripts_on(port: int, timeout: float) -> tuple[Any, AsyncScripts]:
    client = aredis.Redis(host="127.0.0.1", port=port, **_redis_options(timeout, True))
    return client, AsyncScripts(client)


def test_a_connection_lost_after_redis_ran_a_batch_runs_no_call_twice() -> None:
    async def main() -> None:
        async with fake_redis() as (fake, port):
            client, scripts = scripts_on(port, 1.0)
            run = scripts.script(SOURCE)
            assert await run([b"warm"], [b"0"]) == [b"warm", b"0"]
            fake.lose_after_first = True
            keys = [b"k%d" % i for i in range(10)]
            answers = await asyncio.gather(
                *(run([k], [b"1"]) for k in keys), return_exceptions=True
            )
            # The first answer arrived; Redis ran the other nine too, but their answers were
            # lost with the connection: each fails (the engine's on_storage_error decides),
            # none is run a second time (a double charge, or a genuine nonce taken for a replay).
            assert answers[0] == [b"k0", b"1"]
            assert all(isinstance(a, RedisError) for a in answers[1:])
            assert [fake.runs[k] for k in keys] == [1] * 10
            assert await run([b"after"], [b"2"]) == [b"after", b"2"]  # connects afresh
            await scripts.aclose()
            await client.aclose()

    asyncio.run(main())


@contextmanager
def fake_redis_thread() -> Iterator[tuple[FakeRedis, int]]:
    """The fake on an event loop of its own (asyncio.run in a thread), for a sync client."""
    started: list[tuple[FakeRedis, int]] = []
    ready = threading.Event()
    stop: list[asyncio.Event] = []

    async def serve() -> None:
        fake = FakeRedis()
        stop.append(asyncio.Event())
        async with await asyncio.start_server(fake.handle, "127.0.0.1", 0) as server:
            started.append((fake, server.sockets[0].getsockname()[1]))
            ready.set()
            await stop[0].wait()
        # The handlers' tasks end with the loop (asyncio.run cancels them: they close).

    loops: list[asyncio.AbstractEventLoop] = []

    def run() -> None:
        async def main() -> None:
            loops.append(asyncio.get_running_loop())
            await serve()

        asyncio.run(main())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(5)
    try:
        yield started[0]
    finally:
        loops[0].call_soon_threadsafe(stop[0].set)
        thread.join(5)


def test_a_sync_call_lost_after_redis_ran_it_is_not_run_again() -> None:
    with fake_redis_thread() as (fake, port):
        client = redis.Redis(host="127.0.0.1", port=port, **_redis_options(1.0, False))
        run = SyncScripts(client).script(SOURCE)
        assert run([b"warm"], [b"0"]) == [b"warm", b"0"]
        fake.lose_all = True
        # Redis ran it, then the connection went before the answer: the call fails (the
        # engine's on_storage_error decides) rather than charging the request twice.
        with pytest.raises(RedisError):
            run([b"k"], [b"1"])
        assert fake.runs[b"k"] == 1
        assert run([b"after"], [b"2"]) == [b"after", b"2"]  # connects afresh
        client.close()


def test_a_call_waits_for_its_answer_at_most_the_timeout_however_long_the_queue() -> None:
    timeout = 0.3

    async def main() -> None:
        async with fake_redis() as (fake, port):
            client, scripts = scripts_on(port, timeout)
            run = scripts.script(SOURCE)
            await run([b"warm"], [b"0"])
            fake.delay = 0.1  # each answer well within the timeout, ten of them not

            async def timed(i: int) -> tuple[bool, float]:
                started = time.perf_counter()
                try:
                    await run([b"k%d" % i], [b"1"])
                except RedisError:
                    return False, time.perf_counter() - started
                return True, time.perf_counter() - started

            results = await asyncio.gather(*(timed(i) for i in range(10)))
            assert any(ok for ok, _ in results)
            assert max(waited for _, waited in results) < 2 * timeout
            await scripts.aclose()
            await client.aclose()

    asyncio.run(main())


@pytest.mark.skipif(sys.version_info < (3, 12), reason="asyncio.eager_task_factory: 3.12+")
def test_calls_go_on_after_a_flusher_that_failed_inside_create_task(tmp_path: Path) -> None:
    path = str(tmp_path / "redis.sock")  # no server yet: connect fails before any await

    async def main() -> None:
        asyncio.get_running_loop().set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined]
        client = aredis.Redis(unix_socket_path=path, **_redis_options(0.5, True))
        scripts = AsyncScripts(client)
        run = scripts.script(SOURCE)
        with pytest.raises(RedisError):
            await run([b"k"], [b"1"])
        fake = FakeRedis()
        server = await asyncio.start_unix_server(fake.handle, path)
        try:
            assert await asyncio.wait_for(run([b"k"], [b"1"]), 2) == [b"k", b"1"]
        finally:
            server.close()
            await scripts.aclose()
            await client.aclose()

    asyncio.run(main())


def test_a_flusher_that_finished_before_it_was_stored_does_not_stop_the_calls() -> None:
    # What an eager task factory (3.12+) leaves behind when the flusher fails at once.
    async def main() -> None:
        async with fake_redis() as (_, port):
            client, scripts = scripts_on(port, 1.0)
            run = scripts.script(SOURCE)

            async def nothing() -> None:
                return None

            finished = asyncio.get_running_loop().create_task(nothing())
            await finished
            scripts._flusher = finished
            assert await asyncio.wait_for(run([b"k"], [b"1"]), 2) == [b"k", b"1"]
            await scripts.aclose()
            await client.aclose()

    asyncio.run(main())


class _Sentinels:
    """Stands for redis-py's Sentinel: its master is the machine's Redis."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address

    def discover_master(self, service_name: str) -> tuple[str, int]:
        return self.address


def _address(url: str) -> tuple[str, int]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 6379


def test_sync_calls_on_a_sentinel_client_reach_the_master_sentinel_names(redis_url: str) -> None:
    import redis
    from redis.sentinel import SentinelConnectionPool

    from m2m_middleware.redis_scripts import SyncScripts

    # The connections' own host is nowhere (port 1): only Sentinel's lookup finds Redis.
    pool = SentinelConnectionPool(
        "m2m", _Sentinels(_address(redis_url)), host="127.0.0.1", port=1, socket_timeout=1.0
    )
    scripts = SyncScripts(redis.Redis(connection_pool=pool))
    run = scripts.script(SOURCE)
    assert run([b"rteam-sentinel"], [b"1"]) == [b"rteam-sentinel", b"1"]
    scripts.close()


def test_async_calls_on_a_sentinel_client_reach_the_master_sentinel_names(redis_url: str) -> None:
    from redis.asyncio.sentinel import SentinelConnectionPool

    class Sentinels(_Sentinels):
        async def discover_master(self, service_name: str) -> tuple[str, int]:  # type: ignore[override]
            return self.address

    async def main() -> None:
        pool = SentinelConnectionPool(
            "m2m", Sentinels(_address(redis_url)), host="127.0.0.1", port=1, socket_timeout=1.0
        )
        client = aredis.Redis(connection_pool=pool)
        scripts = AsyncScripts(client)
        run = scripts.script(SOURCE)
        assert await run([b"rteam-sentinel"], [b"1"]) == [b"rteam-sentinel", b"1"]
        await scripts.aclose()
        await client.aclose()

    asyncio.run(main())
