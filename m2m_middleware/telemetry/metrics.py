"""Prometheus metrics (extra ``metrics``): counters, a histogram and health gauges.

Everything is prometheus_client's, the library Prometheus users already run:
its counters and histogram, its text exposition, and its multiprocess mode
under a pre-forking server. What is ours:

- One :class:`~prometheus_client.CollectorRegistry` per engine, so that a
  process with several engines (a test suite, two apps) reports each apart.
  With ``PROMETHEUS_MULTIPROC_DIR`` set (gunicorn's workers), values live in
  that directory's files instead, summed over every worker by
  :class:`~prometheus_client.multiprocess.MultiProcessCollector`; the
  instruments are then shared by the engines of one process, because two
  instruments of one name in one process would overwrite each other's file
  entries rather than add up.
- The request path pays one dict lookup and two increments: each label
  combination's child is bound once and kept (``.labels()`` per request costs
  a lock, a tuple of str() and a dict lookup of its own; see :meth:`Metrics.observe`).
- Health is read at scrape time from the engine's own outage bookkeeping, by a
  collector, so it costs nothing per request.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from ..errors import ConfigError
from ..outcome import Allowed, Denied, Served
from ..request_view import RequestView
from ..transport import address_in, parse_networks

if TYPE_CHECKING:
    from ..engine import Engine

logger = logging.getLogger("m2m_middleware")

#: The engine decides an API-key request in microseconds and a JWT, a store
#: lookup or a Redis round trip in a millisecond or a few; prometheus_client's
#: default buckets start at 5 ms and would put nearly every request in the first.
DECISION_BUCKETS = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)
#: The ``client`` label of every client beyond ``metrics_client_label_limit``.
OTHER_CLIENTS = "other"
_HEADERS = [("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff")]
_TEXT = "text/plain; charset=utf-8"


class _Instruments:
    """The counters and the histogram of one engine (of one process, multiprocess), in
    no registry yet: an engine registers the ones it uses."""

    def __init__(self, by_client: bool) -> None:
        registry = None
        client = ("client",) if by_client else ()
        self.requests = Counter(
            "m2m_requests",
            "Requests the middleware decided, by outcome, error code and credential scheme "
            "(public paths and the metrics endpoint are not counted).",
            ("outcome", "error", "scheme", *client),
            registry=registry,
        )
        self.app_refusals = Counter(
            "m2m_app_refusals",
            "Requests the middleware admitted (counted as allowed in m2m_requests_total) "
            "that the application then refused with require_scopes.",
            ("error", "scheme", *client),
            registry=registry,
        )
        self.decision_seconds = Histogram(
            "m2m_decision_seconds",
            "The middleware's own time deciding each counted request, in seconds.",
            buckets=DECISION_BUCKETS,
            registry=registry,
        )
        self.jwks_fetches = Counter(
            "m2m_jwks_fetches",
            "Fetches of jwt_jwks_url by result: ok, or error (unreachable, not a key set).",
            ("result",),
            registry=registry,
        )
        self.token_requests = Counter(
            "m2m_token_requests",
            "Answers of the token endpoint: outcome issued, or refused with its OAuth 2 error.",
            ("outcome", "error"),
            registry=registry,
        )


#: Multiprocess mode: the instruments of this process, by whether they label clients.
_shared: dict[bool, _Instruments] = {}
_shared_lock = threading.Lock()


def _shared_instruments(by_client: bool) -> _Instruments:
    with _shared_lock:
        instruments = _shared.get(by_client)
        if instruments is None:
            instruments = _shared[by_client] = _Instruments(by_client)
        return instruments


def multiprocess_directory() -> str | None:
    """``PROMETHEUS_MULTIPROC_DIR`` when prometheus_client counts in files, else None.

    prometheus_client chooses its mode once, when it is first imported, from
    that variable; what it chose is what decides where the counts go.
    """
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if values.ValueClass is values.MutexValue:
        if directory:
            logger.warning(
                "PROMETHEUS_MULTIPROC_DIR is set, but prometheus_client was imported before "
                "it was: metrics_path reports this process only. Set it in the environment "
                "the server starts with."
            )
        return None
    if not directory or not os.path.isdir(directory):
        raise ConfigError(
            "metrics_path",
            "prometheus_client counts in PROMETHEUS_MULTIPROC_DIR, which is not a directory now",
        )
    return directory


class _Health:
    """``m2m_key_store_up`` and ``m2m_rate_limit_storage_up`` (and ``m2m_jwks_up``), read
    from the engine when scraped: 1 unless its last attempt found the storage down."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def collect(self) -> Iterable[Metric]:
        engine = self._engine
        store = GaugeMetricFamily(
            "m2m_key_store_up",
            "1 while the key store answers, 0 from a failed lookup until one succeeds.",
        )
        store.add_metric([], 0.0 if engine._store_down else 1.0)
        yield store
        limits = GaugeMetricFamily(
            "m2m_rate_limit_storage_up",
            "1 while the rate-limit storage answers, 0 from a failed charge until one succeeds.",
        )
        limits.add_metric([], 0.0 if engine.limiter._down else 1.0)
        yield limits
        jwks = engine.tokens.jwks if engine.tokens is not None else None
        if jwks is not None:
            fetched = GaugeMetricFamily(
                "m2m_jwks_up",
                "1 unless the last fetch of jwt_jwks_url failed.",
            )
            fetched.add_metric([], 0.0 if jwks._failing else 1.0)
            yield fetched


class Metrics:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        settings = engine.settings
        assert settings.metrics_path is not None
        self.path: str = settings.metrics_path
        self._networks = parse_networks(settings.metrics_allowed_networks)
        # Without trusted proxies, a request that came through one anyway has the
        # proxy's address: often loopback, which would open the endpoint to the world.
        self._proxied_is_outside = not settings.trusted_networks
        self._by_client = settings.metrics_client_labels
        self._client_limit = settings.metrics_client_label_limit
        self._clients: set[str] = set()
        self._clients_lock = threading.Lock()
        self.multiprocess_directory = multiprocess_directory()
        #: What ``metrics_path`` serves.
        self.registry = CollectorRegistry()
        if self.multiprocess_directory is None:
            instruments = _Instruments(self._by_client)
            used = [instruments.requests, instruments.app_refusals, instruments.decision_seconds]
        else:
            instruments = _shared_instruments(self._by_client)
            used = []  # the collector below reads them, and every other process's, from files
            MultiProcessCollector(self.registry, self.multiprocess_directory)  # type: ignore[no-untyped-call]
        self.registry.register(_Health(engine))
        tokens = engine.tokens
        jwks = tokens.jwks if tokens is not None else None
        if jwks is not None:
            used.append(instruments.jwks_fetches)
        if engine.token_service is not None:
            used.append(instruments.token_requests)
        if self.multiprocess_directory is None:
            for instrument in used:
                self.registry.register(instrument)
        self._instruments = instruments
        self._requests = instruments.requests
        self._refusals = instruments.app_refusals
        self._seconds = instruments.decision_seconds.observe
        #: (outcome, error, scheme, client) -> the bound child of m2m_requests_total.
        self._children: dict[tuple[str, str, str, str], Any] = {}
        self._refusal_children: dict[tuple[str, str, str], Any] = {}
        if jwks is not None:
            fetches = instruments.jwks_fetches
            # Both results from the start: a rate() over a series that appears
            # with its first error misses that error (Prometheus' own advice).
            self._jwks = {result: fetches.labels(result) for result in ("ok", "error")}
            jwks.on_fetch = self._jwks_fetched
        if engine.token_service is not None:
            self._token_requests = instruments.token_requests
            self._token_requests.labels("issued", "")
            engine.token_service.on_token = self._token_answered

    # -- the request path ---------------------------------------------------------------

    def observe(self, outcome: Allowed | Denied, seconds: float) -> None:
        """One decision; ``seconds`` the engine's own time on it.

        A public path is not counted: no credential was decided on, and a health
        check polled every second would drown the allowed count and the timings.
        """
        client = outcome.client
        if isinstance(outcome, Denied):
            if client is None:
                # A revoked or expired key's scheme is known; its client is not an identity.
                tried = outcome.tried
                key = ("denied", outcome.error, tried.scheme if tried is not None else "", "")
            else:
                label = self._client_label(client.client_id) if self._by_client else ""
                key = ("denied", outcome.error, client.scheme, label)
        elif client is None:
            return
        else:
            label = self._client_label(client.client_id) if self._by_client else ""
            key = ("allowed", "", client.scheme, label)
        child = self._children.get(key)
        if child is None:
            child = self._bind(key)
        child.inc()
        self._seconds(seconds)

    def _bind(self, key: tuple[str, str, str, str]) -> Any:
        # Two threads may bind the same key at once: labels() hands both the same child.
        child = self._requests.labels(*(key if self._by_client else key[:3]))
        self._children[key] = child
        return child

    def _client_label(self, client_id: str) -> str:
        """The client's own label while fewer than ``metrics_client_label_limit`` have
        one, else ``other``: the number of series stays bounded whoever calls."""
        if client_id in self._clients:
            return client_id
        if len(self._clients) >= self._client_limit:
            return OTHER_CLIENTS
        with self._clients_lock:
            if len(self._clients) >= self._client_limit:
                return OTHER_CLIENTS
            self._clients.add(client_id)
        return client_id

    def refused(self, denied: Denied) -> None:
        """An admitted request that the application refused (``require_scopes``)."""
        client = denied.client
        scheme = client.scheme if client is not None else ""
        label = self._client_label(client.client_id) if client and self._by_client else ""
        key = (denied.error, scheme, label)
        child = self._refusal_children.get(key)
        if child is None:
            child = self._refusals.labels(*(key if self._by_client else key[:2]))
            self._refusal_children[key] = child
        child.inc()

    # -- hooks of the JWKS client and the token service -----------------------------------

    def _jwks_fetched(self, result: str) -> None:
        self._jwks[result].inc()

    def _token_answered(self, served: Served) -> None:
        if served.status == 200:
            self._token_requests.labels("issued", "").inc()
        else:
            self._token_requests.labels("refused", served.error or "invalid_request").inc()

    # -- the endpoint -------------------------------------------------------------------

    def serve(self, view: RequestView) -> Served:
        """The answer at ``metrics_path``: the Prometheus text format to an address in
        ``metrics_allowed_networks``, a plain 404 (as if there were nothing here) to
        any other."""
        if not self.may_read(view):
            return Served(404, list(_HEADERS), b"Not Found\n", _TEXT)
        if view.method not in ("GET", "HEAD"):
            return Served(405, [("Allow", "GET, HEAD"), *_HEADERS], b"Method Not Allowed\n", _TEXT)
        if view.method == "HEAD":
            return Served(200, list(_HEADERS), b"", CONTENT_TYPE_LATEST)
        try:
            body = generate_latest(self.registry)
        except Exception as exc:  # a multiprocess file gone or torn: an outage, not a 500
            logger.error("metrics cannot be collected: %s: %s", type(exc).__name__, exc)
            return Served(503, [("Retry-After", "5"), *_HEADERS], b"Service Unavailable\n", _TEXT)
        return Served(200, list(_HEADERS), body, CONTENT_TYPE_LATEST)

    def may_read(self, view: RequestView) -> bool:
        """Whether this request's client may read the metrics."""
        if not address_in(view.client_address, self._networks):
            return False
        if self._proxied_is_outside:
            forwarded, forwarded_for, _ = view.proxy_headers()
            if forwarded or forwarded_for or view.header("x-real-ip"):
                return False
        return True
