"""The limiter's Lua scripts, run straight on redis-py's connections.

A charge is one ``EVALSHA`` per request, so what redis-py spends around that
one command is most of what a request pays for counting in Redis. Measured on
one machine (Python 3.11, redis-py 8.1, Redis 7 over loopback, one
``EVALSHA`` of a one-line script; ``/work`` ``benchmarks/redis_overhead.py``
times the whole request):

- sync, ``Script.__call__`` (``execute_command``: the pool's lock, a
  ``can_read`` poll and two ``settimeout`` calls per command, the retry
  wrapper, observability hooks): 130 us wall, 53 us of it user CPU; the same
  command written and read on a connection held by the caller: 69 us wall, 8 us
  user CPU, as fast as a bare socket (70 us, 6 us).
- async, 16 requests at once on one event loop, ``Script.__call__`` on
  ``redis.asyncio``: 56 us of CPU a request (a task for ``wait_for`` around
  every write, a timeout context around every read); the same requests
  written together in one write and read back in order on one connection
  (pipelined): 23 us, 14 us with ``hiredis``'s parser (the ``redis`` extra
  installs it).

So both paths here take a connection of the client's own class and settings
(its pool's ``make_connection``: TLS, Unix sockets and Sentinel's master
lookup as configured) and run the script on it themselves:

- :class:`SyncScripts` lends one connection per call from a free list of its
  own, with none of the pool's per-command bookkeeping, and waits for a near
  Redis's answer polling for it before it blocks (``storage_poll``, see
  :func:`_spin`: a worker that lets its CPU go idle for a loopback round trip
  pays more for waking than for the wait);
- :class:`AsyncScripts` (one per event loop) queues the calls made while the
  loop runs other requests and sends each queue in one write on one
  connection, reading the answers back in order: a pipeline, so under load
  one round trip serves many requests, each still its own atomic script.

What they keep from ``Script.__call__``: a script Redis no longer knows
(``NOSCRIPT``, after a restart or ``SCRIPT FLUSH``) is loaded and run again;
a lost connection (``ConnectionError``, say a pooled one Redis closed while
idle) is replaced and the call is made once more, at once, as the limiter's
``Retry`` did; a timeout is never retried (see
``limiting._redis_options``). What they add: a connection whose answer was not
read to the end (a timeout, a cancellation) is closed, never lent again, so
an answer can never reach another request. A cluster client
(``redis+cluster://``) routes by slot: it keeps redis-py's ``Script``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
import select
import weakref
from collections.abc import Callable, Sequence
from time import perf_counter
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

Call = Callable[[Sequence[Any], Sequence[Any]], Any]


def _sha(source: str) -> str:
    # The name Redis gives a script (EVALSHA), not a security measure.
    return hashlib.sha1(source.encode("utf-8"), usedforsecurity=False).hexdigest()


def _pool(client: Any) -> Any:
    """The client's connection pool when it is a single-server client, else None.

    The scripts' connections are the pool's ``make_connection``'s: a sync pool counts
    each against its ``max_connections`` (``?max_connections=`` in the URL), one per
    thread charging at once, made once and kept; an async pool does not count the one
    connection per event loop.
    """
    pool = getattr(client, "connection_pool", None)
    if pool is None or not hasattr(pool, "make_connection"):
        return None  # RedisCluster: routes each command by slot
    return pool


class SyncScripts:
    """The scripts of one sync redis-py client, each call on a connection lent for it.

    The connections come from the client's pool's ``make_connection`` and are
    lent from a free list of this object's own (``list.pop`` and ``append`` are
    atomic: no lock between threads), so a call pays none of the pool's
    per-command bookkeeping.
    """

    def __init__(self, client: Any, poll: float = 200e-6) -> None:
        self.client = client
        self._pool = _pool(client)
        #: Seconds a call polls for its answer before it blocks (``storage_poll``; see
        #: :func:`_spin`); 0, and always where ``poll`` or ``sched_yield`` is missing
        #: (Windows): it blocks at once.
        self.poll = poll if _sched_yield is not None and _new_poll is not None else 0.0
        self._free: list[Any] = []
        #: How many times :meth:`close` ran: a call that sees it change while it holds
        #: a connection closes that connection when it gives it back.
        self._closings = 0
        # A forked child must not share its parent's sockets: it connects for itself.
        _LIVE.add(self)
        # Dropped without close() (an engine a test or a reload let go): its sockets are
        # closed then, not left to warn "unclosed socket" at exit. ``_holder`` is what
        # the finalizer sees of it: close() swaps the free list, the holder stays.
        self._holder = [self._free]
        weakref.finalize(self, _disconnect_free, self._holder)
        #: The recent round trips' length (seconds, a moving average): a call polls for
        #: its answer only while this is under half of :attr:`poll` (a near Redis).
        self.round_trip = 0.0

    def script(self, source: str) -> Call:
        """A callable ``(keys, args) -> answer`` that runs ``source``."""
        if self._pool is None:
            return self.client.register_script(source)  # type: ignore[no-any-return]
        return _SyncScript(self, source)

    def _get(self) -> Any:
        try:
            return self._free.pop()
        except IndexError:
            return self._pool.make_connection()

    def _put(self, connection: Any) -> None:
        self._free.append(connection)

    def close(self) -> None:
        """Close the connections not lent out (a lent one is closed when it comes back).

        They stay on the free list, closed, and connect again if lent: made anew, each
        would count once more against the pool's ``max_connections``.
        """
        free, self._free = self._free, []
        self._holder[0] = self._free
        self._closings += 1  # after the swap: whatever was lent from ``free`` sees it
        for connection in free:
            connection.disconnect()
        self._free.extend(free)


#: Every SyncScripts alive, for the one fork hook (one hook per object would pile up).
_LIVE: weakref.WeakSet[SyncScripts] = weakref.WeakSet()


def _close_in_child() -> None:
    """In a forked child: close this process's copies of the parents' sockets.

    redis-py shuts a socket down only in the process that made the connection, so
    the parent's keeps working; the child's connections connect afresh when lent.
    The same objects, not new ones: the child's pool inherits the parent's count of
    connections made, and new ones would count against its ``max_connections``.
    """
    for scripts in list(_LIVE):
        _disconnect_free([scripts._free])


def _disconnect_free(holder: list[list[Any]]) -> None:
    for connection in holder[0]:
        with contextlib.suppress(Exception):  # each one, whatever another does
            connection.disconnect()


os.register_at_fork(after_in_child=_close_in_child)


class _Script:
    """A script's source and the name Redis knows it by (``EVALSHA``)."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = _sha(source)


class _SyncScript(_Script):
    """One script, run with ``EVALSHA`` on a connection lent for the call."""

    __slots__ = ("_scripts",)

    def __init__(self, scripts: SyncScripts, source: str) -> None:
        super().__init__(source)
        self._scripts = scripts

    def __call__(self, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        scripts = self._scripts
        closings = scripts._closings
        connection = scripts._get()
        in_step = False
        try:
            try:
                answer = self._run(connection, keys, args)
            except RedisConnectionError:  # not connected: nothing was sent
                connection.disconnect()
                answer = self._run(connection, keys, args)
            in_step = True
            return answer
        except Exception as exc:
            # An error answer (ResponseError) was read to its end: the connection is
            # still in step. Anything else (a timeout, OSError) left it out of step.
            in_step = isinstance(exc, ResponseError)
            raise
        finally:
            if not in_step or closings != scripts._closings:
                # Never lend a connection with an unread answer; and one lent before
                # close() is closed as the idle ones were (it reconnects if used again).
                connection.disconnect()
            scripts._put(connection)

    def _run(self, connection: Any, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """One ``EVALSHA`` (and ``SCRIPT LOAD`` if Redis lost the script).

        Only a failure before anything is written is a ConnectionError (which
        :meth:`__call__` retries): once the command may have reached Redis, a lost
        connection is a RedisError of another kind, so a charge is never run twice.
        """
        packed = connection.pack_command("EVALSHA", self.sha, len(keys), *keys, *args)
        _ready(connection)
        scripts = self._scripts
        try:
            start = perf_counter()
            connection.send_packed_command(packed, check_health=False)
            if scripts.round_trip * 2 < scripts.poll:
                _spin(connection._sock, scripts.poll)
            try:
                answer = connection.read_response()
                # An average over about the last eight calls: a Redis that moved
                # farther away stops the polling within a few calls.
                scripts.round_trip += (perf_counter() - start - scripts.round_trip) / 8
                return answer
            except NoScriptError:
                load = connection.pack_command("SCRIPT", "LOAD", self.source)
                connection.send_packed_command(load, check_health=False)
                connection.read_response()
                connection.send_packed_command(packed, check_health=False)
                return connection.read_response()
        except RedisConnectionError as exc:
            raise RedisError(f"connection lost after the command was sent: {exc}") from exc


def _spin(sock: Any, budget: float) -> None:
    """Wait up to ``budget`` seconds for ``sock`` to have something to read, polling
    without blocking and giving the CPU to any other thread or process that can run
    (``sched_yield``) between polls; the caller reads (and blocks, if need be) after.

    Why (``storage_poll``, default 200 us): a sync worker (gunicorn's, a thread) that
    blocks for a loopback round trip lets its CPU go idle, and waking it again costs
    more than the wait. Measured on a 2-vCPU Firecracker VM (idle is a HLT exit there,
    no guest halt polling), one gunicorn sync worker on one CPU, ours with Redis in
    exact mode, wrk over 127.0.0.1 (``benchmarks/server_load.py``): blocking at once,
    Flask 2,296 and Django 2,293 req/s and 300 us of the worker's user CPU a request;
    polling first, 2,804 and 2,930 req/s (+22%, +28%) and 250 us of user CPU a request
    *including* the polling, since the code after the wait no longer runs on a CPU
    cold from idle. Django with budgets of 100, 200 and 400 us: 2,950, 3,000 and 2,990
    req/s. Round trips averaged 60 us polling, 92 us blocking. Three workers on the one
    CPU: the same req/s either way (the CPU is never idle, and each poll yields it to a
    worker that can run). In process, ``Engine.check`` one call at a time (no server,
    nothing else to run): 97.6 us wall and 52.6 us CPU a call blocking, 62.2 us wall and
    61.7 us CPU polling; so where nothing else would run, the polling costs about 9 us
    of CPU a call.

    The caller polls only while the recent round trips average under half the budget,
    so a Redis 100 us away or more (another host, a loaded one) is waited for blocking,
    at no CPU cost; a call waits at most ``storage_timeout`` plus the budget.

    Only on the standard library's own sockets (``socket.socket``, ``ssl.SSLSocket``,
    ``_socket.socket``): a green socket (gevent's, eventlet's, which subclasses
    ``ssl.SSLSocket`` for TLS) waits in its hub, where a busy loop would stall every
    other greenlet (nor is ``None``, a connection that lost its socket). Never called
    where ``poll`` or ``sched_yield`` is missing: :attr:`SyncScripts.poll` is 0 there.
    """
    if type(sock).__module__ not in _NATIVE or (fd := sock.fileno()) < 0:
        return
    assert _new_poll is not None and _sched_yield is not None  # SyncScripts.poll is 0 else
    poller = _new_poll()
    poller.register(fd, _POLL_IN)
    poll = poller.poll
    deadline = perf_counter() + budget
    while not poll(0):
        _sched_yield()
        if perf_counter() >= deadline:
            return


#: The modules of the socket classes :func:`_spin` polls (``type(sock).__module__``):
#: the standard library's own. eventlet's and gevent's classes live in theirs, even
#: where they subclass these, and under monkey-patching ``socket.socket`` itself is
#: theirs, so the check is by module, not by class.
_NATIVE = frozenset({"socket", "ssl", "_socket"})
_POLL_IN = getattr(select, "POLLIN", 1)
_sched_yield: Callable[[], None] | None = getattr(os, "sched_yield", None)
_new_poll: Callable[[], Any] | None = getattr(select, "poll", None)


def _ready(connection: Any) -> None:
    """Connect ``connection``, or connect it again if Redis closed it while it was idle
    (it then reads as ready with nothing but EOF: one poll, no data read)."""
    if connection._sock is not None:
        try:
            stale = connection.can_read()  # anything unread is out of step too
        except RedisConnectionError:
            stale = True
        if not stale:
            return
        connection.disconnect()
    # connect(), not send's own connect_check_health: Sentinel's connection class
    # looks its master up in connect() only.
    connection.connect()


class AsyncScripts:
    """The scripts of one ``redis.asyncio`` client, pipelined on one connection.

    Bound to the event loop that made it (as the client is). :meth:`script`
    gives a callable for one script; each call queues an ``EVALSHA`` and waits
    for its answer. One flusher task at a time writes everything queued in one
    write and reads the answers in order, then the next queue, so a call waits
    at most for the round trip under way plus its own.
    """

    def __init__(self, client: Any) -> None:
        self.client = client
        self._pool = _pool(client)
        self._queue: list[tuple[list[bytes], asyncio.Future[Any], float]] = []
        #: Seconds a call may wait for its answer, queued or sent (the client's socket_timeout).
        self._timeout: float | None = (
            None if self._pool is None else (self._pool.connection_kwargs.get("socket_timeout"))
        )
        self._flusher: asyncio.Task[None] | None = None
        self._connection: Any = None
        self._scripts: dict[str, Call] = {}
        #: Source -> the SCRIPT LOAD under way: the calls a batch got NOSCRIPT for (after
        #: a restart or SCRIPT FLUSH) wait for one load, not one each.
        self._loads: dict[str, asyncio.Task[Any]] = {}

    def script(self, source: str) -> Call:
        """A callable ``(keys, args) -> awaitable answer`` for ``source`` (made once)."""
        found = self._scripts.get(source)
        if found is None:
            if self._pool is None:
                found = self.client.register_script(source)
            else:
                found = _AsyncScript(self, source)
            self._scripts[source] = found
        return found

    def _send(self, command: Sequence[Any]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        connection = self._connection
        if connection is None:
            connection = self._connection = self._pool.make_connection()
        deadline = loop.time() + self._timeout if self._timeout else math.inf
        self._queue.append((connection.pack_command(*command), future, deadline))
        flusher = self._flusher
        # done(): with an eager task factory (3.12+) a flusher that fails at once (a
        # refused Unix socket) finishes inside create_task, before it is stored here.
        if flusher is None or flusher.done():
            self._flusher = loop.create_task(self._flush())
        return future

    async def _flush(self) -> None:
        batch: list[tuple[list[bytes], asyncio.Future[Any], float]] = []
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                await self._exchange(batch)
                batch = []
        except BaseException as exc:  # cancelled with the loop: nobody may wait forever
            for _, future, _ in [*batch, *self._queue]:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else _stopped())
            self._queue = []
            if not isinstance(exc, Exception):
                raise
        finally:
            self._flusher = None

    async def _exchange(self, batch: list[tuple[list[bytes], asyncio.Future[Any], float]]) -> None:
        """Write ``batch`` in one write, then read its answers, in order.

        Only a call that never reached Redis is failed with a ConnectionError (which its
        caller retries): one refused while connecting. Once any byte of the batch is
        written, a failure is a RedisError of another kind, so nothing that Redis may
        have run is run again. Every call waits at most its own deadline.
        """
        loop = asyncio.get_running_loop()
        now = loop.time()
        live = []
        for item in batch:  # a caller gone, or out of time while queued: never sent
            if item[1].done():
                continue
            if item[2] <= now:
                item[1].set_exception(RedisTimeoutError("no answer in time (queued)"))
                continue
            live.append(item)
        if not live:
            return
        batch = live
        connection = self._connection
        # redis-py's StreamReader: EOF already seen means Redis closed it while idle.
        reader = getattr(connection, "_reader", None)
        if reader is not None and (reader.at_eof() or reader.exception() is not None):
            await _disconnect(connection)  # closed by Redis while idle: connect afresh
        answered = 0
        written = False
        try:
            if not connection.is_connected:
                # connect(), not send's own connect_check_health: Sentinel's connection
                # class looks its master up in connect() only.
                await connection.connect()  # a failure here: nothing was sent
            written = True
            connection.socket_timeout = max(0.001, batch[0][2] - loop.time())
            await connection.send_packed_command(
                [part for packed, _, _ in batch for part in packed], check_health=False
            )
            for _, future, deadline in batch:
                # The connection's own timeout, not read_response(timeout=): redis-py
                # treats an explicit one as a poll that may end with nothing read, and a
                # timed-out answer then reached the next call (a test pins it).
                connection.socket_timeout = max(0.001, deadline - loop.time())
                failed: ResponseError | None = None
                try:
                    answer = await connection.read_response()
                except ResponseError as exc:  # an error answer, read whole: still in step
                    answer, failed = None, exc
                answered += 1
                if not future.done():  # a caller cancelled meanwhile drops its answer
                    if failed is None:
                        future.set_result(answer)
                    else:
                        future.set_exception(failed)
        except BaseException as exc:
            # The stream is out of step: close it; the next call connects afresh.
            await _disconnect(connection)
            problem: BaseException = exc if isinstance(exc, Exception) else _stopped()
            if written and isinstance(problem, RedisConnectionError):
                # Redis may have run these: not a lost connection to retry.
                problem = RedisError(f"connection lost after the commands were sent: {problem}")
            for _, future, _ in batch[answered:]:
                if not future.done():
                    future.set_exception(problem)
            if not isinstance(exc, Exception):
                raise
        finally:
            connection.socket_timeout = self._timeout

    async def load(self, source: str) -> None:
        """Load ``source`` into Redis once for every call waiting on it right now."""
        task = self._loads.get(source)
        if task is None or task.done():
            task = self._loads[source] = asyncio.get_running_loop().create_task(
                self.client.script_load(source)
            )
            # Its failure reaches every waiter; none left (all cancelled): not logged
            # as "never retrieved" either.
            task.add_done_callback(_retrieve)
        # shield: a caller cancelled while it waits does not cancel the others' load.
        await asyncio.shield(task)

    async def aclose(self) -> None:
        """Close the connection (a later call opens it again)."""
        if self._connection is not None:
            await _disconnect(self._connection)


async def _disconnect(connection: Any) -> None:
    with contextlib.suppress(Exception):  # closing a broken socket: nothing is left to tell
        await connection.disconnect(nowait=True)


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _stopped() -> RedisConnectionError:
    return RedisConnectionError("the event loop stopped before Redis answered")


class _AsyncScript(_Script):
    """One script, its calls queued on the event loop's pipelined connection."""

    __slots__ = ("_scripts",)

    def __init__(self, scripts: AsyncScripts, source: str) -> None:
        super().__init__(source)
        self._scripts = scripts

    async def __call__(self, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        command = ("EVALSHA", self.sha, len(keys), *keys, *args)
        send = self._scripts._send
        try:
            try:
                return await send(command)
            except RedisConnectionError:
                return await send(command)  # once, at once, on a new connection
        except NoScriptError:
            await self._scripts.load(self.source)
            return await send(command)
