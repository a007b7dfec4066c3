"""Revocations that reach every instance at once, over Redis pub/sub.

Each process caches verified keys for ``key_cache_ttl`` seconds. A revoke or
rotate made through a store object in this process drops the key from every
cache here at once (``stores.base``); other processes would only notice when
their entry's TTL ran out. With a Redis bus, the revoking process also
publishes ``{"location": ..., "key_id": ...}`` on one channel, and every
process listening drops that key from its caches of the same data the moment
the message arrives. The TTL stays the bound when Redis is unreachable.

A bus is one per Redis URL per process: one publishing connection, one
listening thread. The thread reconnects by itself, logs an outage and the
recovery once each, and is started again in a child after ``fork()`` (a
pre-forking server such as gunicorn with ``--preload``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from typing import Any

from .redaction import redact, secrets_of
from .stores.base import add_publisher, notify_local, remove_publisher

logger = logging.getLogger("m2m_middleware")

CHANNEL = "m2m_middleware:invalidate"
#: Seconds between reconnection attempts of a listener that lost Redis.
RECONNECT_DELAY = 1.0

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


class RedisBus:
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
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        #: Set once the listener is subscribed: a revocation published after it is heard.
        self.ready = threading.Event()
        self._down = False
        self._publish_down = False

    # -- sending ----------------------------------------------------------------

    def publish(self, location: str, key_id: str) -> None:
        """Tell every listening process; never raises (the TTL remains the bound)."""
        message = json.dumps({"location": location, "key_id": key_id})
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

    def start(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            self.ready.clear()
            self._thread = threading.Thread(
                target=self._listen, name="m2m-invalidation-listener", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

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
                if not self._down:
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
        try:
            text = data.decode() if isinstance(data, bytes) else str(data)
            message = json.loads(text)
            location, key_id = message["location"], message["key_id"]
        except (ValueError, KeyError, TypeError):
            logger.warning("ignored a malformed key-invalidation message")
            return
        if isinstance(location, str) and isinstance(key_id, str):
            notify_local(location, key_id)


def _restart_after_fork() -> None:
    # A thread does not survive fork(): give the child buses of its own (the
    # parent's clients hold sockets the child must not share). The lock may
    # have been held by a parent thread at the fork, so the child gets a new one.
    global _buses_lock
    _buses_lock = threading.Lock()
    old = list(_buses.values())
    _buses.clear()
    for bus in old:
        remove_publisher(bus.publish)
        redis_bus(bus.url, bus.timeout, listen=bus._thread is not None)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_restart_after_fork)
