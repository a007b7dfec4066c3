"""Revocations that reach every instance at once: Redis pub/sub and PostgreSQL NOTIFY.

Each process caches verified keys for ``key_cache_ttl`` seconds. A revoke or
rotate made through a store object in this process drops the key from every
cache here at once (``stores.base``); other processes would only notice when
their entry's TTL ran out, unless the news reaches them:

- A SQLite store notices other processes' changes itself (its change log,
  polled by the engine); nothing here is needed.
- A PostgreSQL store's revoke or rotate sends a ``NOTIFY``, and a
  :class:`PostgresListener` per store location per process hears it.
- With a Redis bus, the revoking process also publishes ``{"store_id": ...,
  "location": ..., "key_id": ...}`` on one channel, and every process
  listening drops that key from its caches of the same data the moment the
  message arrives (any store, and ``m2m keys revoke --notify`` from a
  machine without the app).

Notices name the data by its store id (kept in the database), so every
spelling of its URL hears them. The TTL stays the bound while a channel is
down.

A bus is one per Redis URL per process: one publishing connection, one
listening thread; a PostgreSQL listener is one thread and one connection per
store location per process. Each thread reconnects by itself, logs an outage
and the recovery once each, is started again in a child after ``fork()`` (a
pre-forking server such as gunicorn with ``--preload``), and never keeps the
interpreter alive (daemon threads).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import uuid
from collections.abc import Callable
from typing import Any

from .redaction import redact, secrets_of
from .stores.base import add_publisher, notify_local, remove_publisher

logger = logging.getLogger("m2m_middleware")

CHANNEL = "m2m_middleware:invalidate"
#: The PostgreSQL channel revocation notices travel on (LISTEN is per database:
#: the payload's store id tells the schemas, and so the stores, apart).
NOTIFY_CHANNEL = "m2m_middleware_invalidate"
#: Seconds between reconnection attempts of a listener that lost its channel.
RECONNECT_DELAY = 1.0

#: This process's name on the bus: its own notices come back to its listener, and
#: were handed to the caches here already (``stores.base._notify_invalidated``).
#: A second, late delivery would drop a key cached in between (one more store
#: read, and a 503 instead of the outage grace while the store is down).
#: Renewed in a child after ``fork()``: the parent must hear the child's notices.
_origin = uuid.uuid4().hex
_buses: dict[str, RedisBus] = {}
_buses_lock = threading.Lock()


def redis_bus(url: str, timeout: float = 1.0, *, listen: bool = True) -> RedisBus:
    """The process's bus for ``url``: revocations made here are published on it
    from now on, and with ``listen`` those of other processes are heard."""
    with _buses_lock:
        bus = _buses.get(url)
        if bus is None:
            bus = _buses[url] = RedisBus(url, timeout)
            add_publisher(bus.publish)
    if listen:
        bus.start()
    return bus


class _ListenerThread:
    """A daemon thread that listens until :meth:`stop`; what it runs is :meth:`_listen`.

    ``ready`` is set while it listens (a notice sent from then on is heard);
    ``_down`` remembers an outage so that it and its end are logged once each.
    """

    thread_name = "m2m-listener"

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.ready = threading.Event()
        self._down = False

    def start(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            self.ready.clear()
            self._thread = threading.Thread(target=self._listen, name=self.thread_name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _listen(self) -> None:
        raise NotImplementedError


class RedisBus(_ListenerThread):
    thread_name = "m2m-invalidation-listener"

    def __init__(self, url: str, timeout: float = 1.0) -> None:
        try:
            import redis
        except ImportError:  # pragma: no cover - the redis extra installs it
            from .errors import ConfigError

            raise ConfigError(
                "invalidation_url", 'needs the redis package: pip install "m2m-middleware[redis]"'
            ) from None
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.url = url
        self.timeout = timeout
        self._secrets = secrets_of(url)  # redis-py may quote its URL in an error
        connect_url = "unix://" + url[len("redis+unix://") :] if url.startswith("redis+") else url
        options: dict[str, Any] = {
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 1),
        }
        self._publisher = redis.Redis.from_url(connect_url, socket_timeout=timeout, **options)
        # The listener blocks in reads for as long as no message comes: no socket_timeout.
        self._listener_client = redis.Redis.from_url(connect_url, **options)
        super().__init__()
        self._publish_down = False

    # -- sending ----------------------------------------------------------------

    def publish(self, store_id: str, location: str, key_id: str) -> None:
        """Tell every listening process; never raises (the TTL remains the bound).

        ``location`` rides along for listeners of releases that match on it;
        ``origin`` names this process, whose own listener then skips the notice.
        """
        message = json.dumps(
            {"store_id": store_id, "location": location, "key_id": key_id, "origin": _origin}
        )
        try:
            self._publisher.publish(CHANNEL, message)
        except Exception as exc:
            if not self._publish_down:
                self._publish_down = True
                logger.error(
                    "cannot publish a key invalidation to Redis (%s): %s; other instances "
                    "will see it within key_cache_ttl",
                    type(exc).__name__,
                    redact(str(exc), self._secrets),
                )
        else:
            if self._publish_down:
                self._publish_down = False
                logger.warning("publishing key invalidations to Redis again")

    # -- listening --------------------------------------------------------------

    def _listen(self) -> None:
        while not self._stop.is_set():
            pubsub = self._listener_client.pubsub(  # type: ignore[no-untyped-call]
                ignore_subscribe_messages=True
            )
            try:
                pubsub.subscribe(CHANNEL)
                pubsub.get_message(timeout=1.0)  # the subscribe confirmation
                self.ready.set()
                if self._down:
                    self._down = False
                    logger.warning("listening for key invalidations on Redis again")
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self._deliver(message.get("data"))
            except Exception as exc:
                self.ready.clear()
                if not self._down and not self._stop.is_set():  # stopping is no outage
                    self._down = True
                    logger.error(
                        "lost the Redis key-invalidation channel (%s): %s; revocations made "
                        "elsewhere are seen within key_cache_ttl until it is back",
                        type(exc).__name__,
                        redact(str(exc), self._secrets),
                    )
                self._stop.wait(RECONNECT_DELAY)
            finally:
                with contextlib.suppress(Exception):  # already failing; the loop reconnects
                    pubsub.close()

    @staticmethod
    def _deliver(data: object) -> None:
        _deliver(data, "location")


def _deliver(data: object, fallback: str) -> None:
    """Hand one notice to the caches here: by its store id, else by ``fallback``'s value.

    A notice this process sent itself is skipped: see ``_origin``.
    """
    try:
        text = data.decode() if isinstance(data, bytes) else str(data)
        message = json.loads(text)
        name, key_id = message.get("store_id") or message[fallback], message["key_id"]
        if message.get("origin") == _origin:
            return
    except (ValueError, KeyError, TypeError, AttributeError):
        logger.warning("ignored a malformed key-invalidation message")
        return
    if isinstance(name, str) and isinstance(key_id, str):
        notify_local(name, key_id)


# -- PostgreSQL: LISTEN on a connection of its own ---------------------------------------

_pg_listeners: dict[str, PostgresListener] = {}


def postgres_listener(
    location: str, conninfo: str, redact: Callable[[str], str] = str
) -> PostgresListener:
    """The listener of this process for the database at ``location``, started;
    every store that asks holds it until it calls :meth:`PostgresListener.release`.

    ``conninfo`` connects (credentials included); ``redact`` scrubs them from
    the messages it logs.
    """
    with _buses_lock:
        listener = _pg_listeners.get(location)
        if listener is None:
            listener = _pg_listeners[location] = PostgresListener(location, conninfo, redact)
        listener.users += 1
    listener.start()
    return listener


class PostgresListener(_ListenerThread):
    """``LISTEN`` for revocation notices of one database, in a thread, reconnecting.

    A notice sent while no connection listens is lost for good. So each
    time it starts listening again, after a lost connection or a failed
    first attempt, it tells the caches here that any key may have changed.
    The first attempt needs no such catch-up when it succeeds: stores wait
    for it (:meth:`wait_settled`) before their first lookup, so nothing was
    cached before it.
    """

    thread_name = "m2m-postgres-invalidation-listener"

    def __init__(self, location: str, conninfo: str, redact: Callable[[str], str] = str) -> None:
        self.location = location
        self._conninfo = conninfo
        self._redact = redact
        self.users = 0
        super().__init__()
        #: Set once the first attempt to listen has ended, either way.
        self.settled = threading.Event()
        #: True once anything may have been cached while no connection listened.
        self._may_have_missed = False

    def wait_settled(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) for the first attempt to listen to end.

        A store's first read waits for it, so keys are cached only once
        notices are heard, rather than cached and then dropped by the
        listener's catch-up when it comes up a moment later.
        """
        if not self.settled.wait(timeout):
            self._may_have_missed = True

    def release(self) -> None:
        """One store less needs this listener; the last one out stops it."""
        with _buses_lock:
            self.users -= 1
            if self.users > 0:
                return
            if _pg_listeners.get(self.location) is self:
                del _pg_listeners[self.location]
        self.stop()

    def _listen(self) -> None:
        import psycopg
        from psycopg import sql

        listen = sql.SQL("LISTEN {}").format(sql.Identifier(NOTIFY_CHANNEL))
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True) as conn:
                    conn.execute(listen)
                    if self._may_have_missed:
                        notify_local(self.location, None)  # see the class docstring
                    # Any later LISTEN (after a lost connection, or in a child
                    # after fork) follows a gap: it catches up.
                    self._may_have_missed = True
                    self.ready.set()
                    self.settled.set()
                    if self._down:
                        self._down = False
                        logger.warning(
                            "listening for key invalidations on PostgreSQL %s again",
                            self.location,
                        )
                    while not self._stop.is_set():
                        for notice in conn.notifies(timeout=1.0):
                            _deliver(notice.payload, "store_id")
            except Exception as exc:
                self.ready.clear()
                self._may_have_missed = True
                self.settled.set()
                # A connection cut while the listener is being stopped (its
                # store closed) is the end of listening, not an outage.
                if not self._down and not self._stop.is_set():
                    self._down = True
                    detail = " ".join(str(exc).split()) or type(exc).__name__
                    logger.error(
                        "lost the PostgreSQL key-invalidation channel of %s (%s): %s; "
                        "revocations made elsewhere are seen within key_cache_ttl until it "
                        "is back",
                        self.location,
                        type(exc).__name__,
                        self._redact(detail),
                    )
                self._stop.wait(RECONNECT_DELAY)
        self.ready.clear()


def _restart_after_fork() -> None:
    # A thread does not survive fork(): give the child buses of its own (the
    # parent's clients hold sockets the child must not share). The lock may
    # have been held by a parent thread at the fork, so the child gets a new one.
    global _buses_lock, _origin
    _buses_lock = threading.Lock()
    _origin = uuid.uuid4().hex
    old = list(_buses.values())
    _buses.clear()
    for bus in old:
        remove_publisher(bus.publish)
        redis_bus(bus.url, bus.timeout, listen=bus._thread is not None)
    # The parent's listener threads are gone; their connections were opened
    # inside them and are never touched here. Same objects (the stores hold
    # them), new threads.
    for listener in _pg_listeners.values():
        listener._lock = threading.Lock()
        listener._thread = None
        listener.start()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_restart_after_fork)
