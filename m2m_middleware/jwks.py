"""A JWKS endpoint, fetched in the background and cached.

- The key set is kept for the endpoint's ``Cache-Control: max-age``, held
  within :data:`MIN_TTL` .. :data:`MAX_TTL` (:data:`DEFAULT_TTL` without one).
- A token whose ``kid`` is in the cached set is verified from it at once,
  also once the set is past its max-age: the refresh then runs behind the
  request (stale-while-revalidate) and no request waits for it.
- Only a token that cannot be verified without a fetch waits for one (no set
  was ever fetched; an unknown ``kid`` that the refetch rules let fetch), and
  at most ``timeout`` seconds.
- A token whose ``kid`` is unknown may trigger a refetch, at most one per
  ``refetch_interval``: a flood of forged ``kid`` values costs the identity
  provider one request per interval, not one per token.
- When the endpoint fails, the last good key set keeps serving; the outage
  and the recovery are each logged once.
- The URL comes from settings only, never from a token (``jku``, ``x5u``).

Fetches are single-flight: at most one runs per :class:`JWKSClient`, in a
daemon thread of its own, and every token that waits shares it. A waiter holds
no worker thread: the sync path waits on the fetch's future with the deadline,
the async path awaits it through :func:`asyncio.wrap_future`. So JWT traffic
never occupies the default thread pool (``asyncio.to_thread``) in which the
SQLite and PostgreSQL stores answer API-key requests.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import http.client
import json
import logging
import re
import socket
import ssl
import threading
import urllib.request
from collections.abc import Callable
from contextlib import suppress
from time import monotonic
from types import TracebackType
from typing import Any

from .jwtkeys import KeyRing, import_jwk
from .redaction import redact, redact_url, secrets_of
from .settings import jwks_url_allowed

logger = logging.getLogger("m2m_middleware")

DEFAULT_TTL = 600.0
MIN_TTL = 60.0
MAX_TTL = 86400.0
#: A JWKS document larger than this is refused: real ones are a few kB.
MAX_BYTES = 1 << 20
_MAX_AGE = re.compile(r"(?:^|[,\s])max-age\s*=\s*\"?(\d+)", re.IGNORECASE)

Fetcher = Callable[[str, float], tuple[bytes, str | None]]
#: Runs one fetch (a callable that never raises) somewhere other than the caller.
Spawner = Callable[[Callable[[], None]], None]


# -- one fetch, bounded as a whole ----------------------------------------------------


class _Deadline:
    """Ends a fetch at its deadline, in whatever phase it is.

    Socket timeouts (urllib's, and urllib3's and httpx's alike) bound each
    socket operation, not the response: a server that trickles one byte per
    half second keeps every read alive. At the deadline a timer shuts the
    connection down (``shutdown`` on a duplicate of its socket, which ends
    the kernel socket under any TLS layer), so a blocked read returns at once.
    What it cannot cut short is name resolution, which no socket call bounds;
    waiters are bounded all the same (:meth:`JWKSClient.prepare`).
    """

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._timer.cancel()
        with self._lock:
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()

    def watch(self, sock: socket.socket) -> None:
        """Shut ``sock`` down at the deadline (at once if it has passed)."""
        duplicate = sock.dup()
        with self._lock:
            self._sockets.append(duplicate)
            if self.expired:
                _shut(duplicate)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shut(sock)


def _shut(sock: socket.socket) -> None:
    with suppress(OSError):  # already closed by the peer or by the fetch
        sock.shutdown(socket.SHUT_RDWR)


class _WatchedHTTPConnection(http.client.HTTPConnection):
    deadline: _Deadline | None = None  # set by _watched, right after construction

    def connect(self) -> None:
        super().connect()
        if self.sock is not None and self.deadline is not None:
            self.deadline.watch(self.sock)


# HTTPSConnection.connect calls super().connect() for the TCP connection, which
# this order of bases routes through _WatchedHTTPConnection.connect: the socket
# is watched before the TLS handshake starts, so the handshake is bounded too.
class _WatchedHTTPSConnection(http.client.HTTPSConnection, _WatchedHTTPConnection):
    pass


def _watched(
    kind: type[_WatchedHTTPConnection], deadline: _Deadline
) -> Callable[..., http.client.HTTPConnection]:
    """What urllib's ``do_open`` calls to make a connection: one watched by ``deadline``."""

    def connection(host: str, **options: Any) -> http.client.HTTPConnection:
        made = kind(host, **options)
        made.deadline = deadline
        return made

    return connection


@functools.cache
def _tls() -> ssl.SSLContext:
    return ssl.create_default_context()


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self._deadline = deadline

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_watched(_WatchedHTTPConnection, self._deadline), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self._deadline = deadline

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_watched(_WatchedHTTPSConnection, self._deadline), req, context=_tls())


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only where the setting itself could point.

    urllib's own handler also follows ``ftp://``, whose fetch no deadline
    watches, and ``https://`` to plain ``http://``, which would hand the key
    set to anyone on the path.
    """

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        if not jwks_url_allowed(newurl):
            raise OSError(f"the key set endpoint redirected to a refused URL ({code})")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def http_fetch(url: str, timeout: float) -> tuple[bytes, str | None]:
    """GET ``url``: the body and its ``Cache-Control`` header. Raises OSError on failure.

    ``timeout`` bounds the whole fetch: connection, TLS, headers and body.
    urllib stays underneath (proxies from the environment, redirects,
    certificate checks), with its connections watched by a :class:`_Deadline`.
    """
    request = urllib.request.Request(  # noqa: S310 - the URL's scheme is checked in settings
        url, headers={"Accept": "application/json", "User-Agent": "m2m-middleware"}
    )
    with _Deadline(timeout) as deadline:
        opener = urllib.request.build_opener(
            _HTTPHandler(deadline), _HTTPSHandler(deadline), _RedirectHandler()
        )
        try:
            with opener.open(request, timeout=timeout) as response:
                body = response.read(MAX_BYTES + 1)
                cache_control = response.headers.get("Cache-Control")
        except Exception as exc:
            if deadline.expired:
                raise TimeoutError(f"the fetch took longer than {timeout:g} s") from None
            if isinstance(exc, http.client.HTTPException):  # not an OSError
                raise OSError(f"a broken HTTP response ({type(exc).__name__})") from None
            raise
        if deadline.expired:  # a read the shutdown cut short may look complete
            raise TimeoutError(f"the fetch took longer than {timeout:g} s")
    if len(body) > MAX_BYTES:
        raise OSError(f"the key set is larger than {MAX_BYTES} bytes")
    return body, cache_control


def cache_seconds(cache_control: str | None) -> float:
    """How long to keep a key set, from its ``Cache-Control`` header."""
    if cache_control:
        if "no-store" in cache_control.lower() or "no-cache" in cache_control.lower():
            return MIN_TTL
        found = _MAX_AGE.search(cache_control)
        if found:
            return min(max(float(found.group(1)), MIN_TTL), MAX_TTL)
    return DEFAULT_TTL


def parse_key_set(body: bytes) -> KeyRing:
    """A JWKS document -> its usable verification keys. Raises ValueError if it is not one."""
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"the key set is not JSON: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("the key set is not a JSON object with a 'keys' list")
    keys = [key for key in map(import_jwk, document["keys"]) if key is not None]
    if not keys:
        # An outage or a misconfiguration upstream, not a reason to refuse
        # every token: the last good key set keeps serving.
        raise ValueError("the key set holds no usable verification key")
    return KeyRing(keys)


# -- the cached key set ---------------------------------------------------------------


def in_daemon_thread(work: Callable[[], None]) -> None:
    """The default :data:`Spawner`: a daemon thread for each fetch.

    A fetch is single-flight, so a client never runs more than one such
    thread: this is its one-worker executor. Not a ThreadPoolExecutor: its
    workers are joined at interpreter exit, so a fetch stuck resolving a name
    would hold up shutdown; a daemon thread does not.
    """
    threading.Thread(target=work, name="m2m-jwks-fetch", daemon=True).start()


class JWKSClient:
    """The cached key set of one JWKS URL."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 3.0,
        refetch_interval: float = 30.0,
        fetch: Fetcher = http_fetch,
        clock: Callable[[], float] = monotonic,
        spawn: Spawner = in_daemon_thread,
    ) -> None:
        self.url = url
        #: The URL as logs and diagnostics show it: a token in its query masked.
        self.shown_url = redact_url(url)
        self._secrets = secrets_of(url)
        self.timeout = timeout
        self.refetch_interval = refetch_interval
        self.fetch = fetch
        self.clock = clock
        self.spawn = spawn
        #: The last good key set, or None before the first successful fetch.
        self.ring: KeyRing | None = None
        self.fetches = 0
        #: Called with "ok" or "error" as each fetch lands (the engine's metrics count
        #: them); it must not raise. None: nobody is counting.
        self.on_fetch: Callable[[str], None] | None = None
        self._fresh_until = -1.0
        # Fetches that are not the scheduled refresh (an unknown kid, a retry
        # after a failure) wait until this monotonic time.
        self._hold_until = -1.0
        self._failing = False
        #: The fetch in flight (single-flight), done when its result is in place.
        self._flight: concurrent.futures.Future[None] | None = None
        # Whether a token with an unknown kid asked for the fetch in flight
        # while the set was fresh: its success then holds the next such fetch.
        self._flight_for_unknown_kid = False
        self._lock = threading.Lock()  # never held across I/O

    def prepare(self, kid: str | None) -> None:
        """Make the key set ready for a token with this ``kid`` (waits at most ``timeout``).

        Never raises: after it, :attr:`ring` is whatever could be had.
        """
        flight = self._start(kid)
        if flight is not None:
            concurrent.futures.wait((flight,), timeout=self.timeout)

    async def aprepare(self, kid: str | None) -> None:
        """:meth:`prepare` for the event loop: awaits the shared fetch, holds no thread."""
        flight = self._start(kid)
        if flight is not None:
            # asyncio.wait, not wait_for: a waiter that gives up must not
            # cancel the fetch that the other waiters share.
            await asyncio.wait((asyncio.wrap_future(flight),), timeout=self.timeout)

    def _start(self, kid: str | None) -> concurrent.futures.Future[None] | None:
        """Start or join a fetch if a token with this ``kid`` calls for one.

        Returns the fetch to wait for, or None when the token is to be verified
        from the set at hand: its ``kid`` is known (a stale set is refreshed
        behind it), or the refetch rules allow no fetch now.
        """
        ring = self.ring
        if ring is not None and ring.knows(kid) and self.clock() < self._fresh_until:
            return None  # the common case, without the lock
        launched = None
        with self._lock:
            now = self.clock()
            ring = self.ring
            flight = self._flight
            if ring is not None and ring.knows(kid):
                if flight is None and now >= self._hold_until:
                    launched = self._launch()
                wait_for = None
            else:
                if flight is None and now >= self._hold_until:
                    flight = launched = self._launch()
                if flight is not None and now < self._fresh_until:
                    self._flight_for_unknown_kid = True
                wait_for = flight
        if launched is not None:
            self._spawn(launched)
        return wait_for

    def _launch(self) -> concurrent.futures.Future[None]:
        """A new flight, registered under the lock; :meth:`_spawn` starts it."""
        flight: concurrent.futures.Future[None] = concurrent.futures.Future()
        flight.set_running_or_notify_cancel()  # so no waiter can cancel it
        self._flight = flight
        self._flight_for_unknown_kid = False
        self.fetches += 1
        return flight

    def _spawn(self, flight: concurrent.futures.Future[None]) -> None:
        try:
            self.spawn(functools.partial(self._fly, flight))
        except Exception as exc:  # no thread to be had (the interpreter is shutting down)
            self._land(flight, None, None, exc)

    def _fly(self, flight: concurrent.futures.Future[None]) -> None:
        try:
            body, cache_control = self.fetch(self.url, self.timeout)
            ring = parse_key_set(body)
        except BaseException as exc:  # any failure (HTTP, JSON, a library): keep the last set
            self._land(flight, None, None, exc)
            if not isinstance(exc, Exception):
                raise
        else:
            self._land(flight, ring, cache_control, None)

    def _land(
        self,
        flight: concurrent.futures.Future[None],
        ring: KeyRing | None,
        cache_control: str | None,
        failure: BaseException | None,
    ) -> None:
        """Put a fetch's result in place, then wake its waiters."""
        with self._lock:
            now = self.clock()
            was_failing = self._failing
            if ring is None:
                self._hold_until = now + self.refetch_interval
                self._failing = True
            else:
                self.ring = ring
                self._fresh_until = now + cache_seconds(cache_control)
                if self._flight_for_unknown_kid:
                    self._hold_until = now + self.refetch_interval
                self._failing = False
        # Logged outside the lock, yet before the flight ends: whoever sees it
        # end (a waiter, a test) also sees the record.
        if ring is None and not was_failing:
            logger.error(
                "JWKS %s cannot be fetched: %s", self.shown_url, redact(str(failure), self._secrets)
            )
        elif ring is not None and was_failing:
            logger.warning("JWKS %s fetched again", self.shown_url)
        if self.on_fetch is not None:
            self.on_fetch("error" if ring is None else "ok")
        with self._lock:
            self._flight = None
            self._flight_for_unknown_kid = False
        flight.set_result(None)

    def snapshot(self) -> dict[str, Any]:
        """For diagnostics: how many fetches, how many keys."""
        return {
            "url": self.shown_url,
            "fetches": self.fetches,
            "keys": len(self.ring.keys) if self.ring is not None else None,
        }
