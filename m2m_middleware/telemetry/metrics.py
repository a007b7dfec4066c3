"""Prometheus metrics (extra ``metrics``): counters, a histogram and health gauges.

Built on prometheus_client, the library Prometheus users already run: its
registry, metric families and text exposition, its counters for the rare
events (JWKS fetches, tokens), and its multiprocess mode under a pre-forking
server. What is ours, and why:

- One :class:`~prometheus_client.CollectorRegistry` per engine, so that a
  process with several engines (a test suite, two apps) reports each apart.
  With ``PROMETHEUS_MULTIPROC_DIR`` set (gunicorn's workers), values live in
  that directory's files instead, summed over every worker by
  :class:`~prometheus_client.multiprocess.MultiProcessCollector`; the
  instruments are then shared by the engines of one process, because two
  instruments of one name in one process would overwrite each other's file
  entries rather than add up.
- In one process, the request counters and the histogram are a tally of our
  own, under one lock, that a collector turns into prometheus_client's metric
  families when scraped: measured, a decision costs 0.37 us to tally against
  1.1 us for a bound Counter child's ``inc()`` plus ``Histogram.observe()``
  (three locks and their checks), on an API-key path of 1.8 us in all
  (``.labels()`` per request would add another 0.7 us). Multiprocess mode
  needs prometheus_client's file-backed values, so there the bound children
  are used, each label combination bound once and kept.
- Health is read at scrape time from the engine's own outage bookkeeping, by a
  collector, so it costs nothing per request.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from bisect import bisect_left
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, values
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.utils import floatToGoString

from ..errors import ConfigError
from ..outcome import Allowed, Denied, Served
from ..redaction import redact
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


REQUESTS_HELP = (
    "Requests the middleware decided, by outcome, error code and credential scheme "
    "(public paths and the metrics endpoint are not counted)."
)
REFUSALS_HELP = (
    "Requests the middleware admitted (counted as allowed in m2m_requests_total) "
    "that the application then refused with require_scopes."
)
DECISION_HELP = "The middleware's own time deciding each counted request, in seconds."
RequestKey = tuple[str, str, str, str]  # outcome, error, scheme, client ("" when unlabelled)
RefusalKey = tuple[str, str, str]  # error, scheme, client


class _Tally:
    """The request counters and the histogram of one engine in one process: plain
    counts under one lock (see the module's docstring for why), shown as
    prometheus_client metric families when scraped."""

    def __init__(self, by_client: bool) -> None:
        self._by_client = by_client
        self._client = ["client"] if by_client else []
        self._lock = threading.Lock()
        self._requests: dict[RequestKey, int] = {}
        self._refusals: dict[RefusalKey, int] = {}
        self._buckets = [0] * (len(DECISION_BUCKETS) + 1)  # not cumulative; the last is +Inf
        self._seconds = 0.0

    def forked(self) -> None:
        """In a forked child: the parent's counts are the parent's to report (each
        worker of a pre-forking server reports its own), and its lock may have
        been held at the fork."""
        self._lock = threading.Lock()
        self._requests = {}
        self._refusals = {}
        self._buckets = [0] * len(self._buckets)
        self._seconds = 0.0

    def request(self, key: RequestKey, seconds: float) -> None:
        with self._lock:
            requests = self._requests
            requests[key] = requests.get(key, 0) + 1
            # A bucket counts what is <= its bound: bisect_left finds the first such bound.
            self._buckets[bisect_left(DECISION_BUCKETS, seconds)] += 1
            self._seconds += seconds

    def refusal(self, key: RefusalKey) -> None:
        with self._lock:
            self._refusals[key] = self._refusals.get(key, 0) + 1

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            requests = dict(self._requests)
            refusals = dict(self._refusals)
            buckets = list(self._buckets)
            seconds = self._seconds
        width = 4 if self._by_client else 3
        family = CounterMetricFamily(
            "m2m_requests", REQUESTS_HELP, labels=["outcome", "error", "scheme", *self._client]
        )
        for key, value in requests.items():
            family.add_metric(list(key[:width]), value)
        yield family
        refused = CounterMetricFamily(
            "m2m_app_refusals", REFUSALS_HELP, labels=["error", "scheme", *self._client]
        )
        for refusal_key, value in refusals.items():
            refused.add_metric(list(refusal_key[: width - 1]), value)
        yield refused
        cumulative = 0
        shown: list[tuple[str, float]] = []
        for bound, count in zip((*DECISION_BUCKETS, float("inf")), buckets, strict=True):
            cumulative += count
            shown.append((floatToGoString(bound), cumulative))  # type: ignore[no-untyped-call]
        histogram = HistogramMetricFamily("m2m_decision_seconds", DECISION_HELP)
        histogram.add_metric([], shown, seconds)
        yield histogram


class _Instruments:
    """The counters and the histogram of one engine (of one process, multiprocess), in
    no registry yet: an engine registers the ones it uses."""

    def __init__(self, by_client: bool) -> None:
        registry = None
        client = ("client",) if by_client else ()
        self.requests = Counter(
            "m2m_requests",
            REQUESTS_HELP,
            ("outcome", "error", "scheme", *client),
            registry=registry,
        )
        self.app_refusals = Counter(
            "m2m_app_refusals",
            REFUSALS_HELP,
            ("error", "scheme", *client),
            registry=registry,
        )
        self.decision_seconds = Histogram(
            "m2m_decision_seconds",
            DECISION_HELP,
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
        self._tally: _Tally | None = None
        _live.add(self)
        self.multiprocess_directory = multiprocess_directory()
        #: What ``metrics_path`` serves.
        self.registry = CollectorRegistry()
        tokens = engine.tokens
        jwks = tokens.jwks if tokens is not None else None
        if self.multiprocess_directory is None:
            instruments = _Instruments(self._by_client)
            tally = self._tally = _Tally(self._by_client)
            self.registry.register(tally)
            self._record = tally.request
            self._refuse = tally.refusal
            if jwks is not None:
                self.registry.register(instruments.jwks_fetches)
            if engine.token_service is not None:
                self.registry.register(instruments.token_requests)
        else:
            # Every instrument's values are in the directory's files, which this
            # collector reads, with every other process's, when scraped.
            instruments = _shared_instruments(self._by_client)
            MultiProcessCollector(self.registry, self.multiprocess_directory)  # type: ignore[no-untyped-call]
            self._record = self._record_in_files
            self._refuse = self._refuse_in_files
        self.registry.register(_Health(engine))
        self._instruments = instruments
        self._seconds = instruments.decision_seconds.observe
        #: key -> the bound child of m2m_requests_total / m2m_app_refusals_total.
        self._children: dict[RequestKey, Any] = {}
        self._refusal_children: dict[RefusalKey, Any] = {}
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

    def _forked(self) -> None:
        self._clients_lock = threading.Lock()
        self._clients = set()
        if self._tally is not None:
            self._tally.forked()

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
        self._record(key, seconds)

    def _record_in_files(self, key: RequestKey, seconds: float) -> None:
        child = self._children.get(key)
        if child is None:
            # Two threads may bind the same key at once: labels() hands both the same child.
            requests = self._instruments.requests
            child = self._children[key] = requests.labels(*(key if self._by_client else key[:3]))
        child.inc()
        self._seconds(seconds)

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
        self._refuse((denied.error, scheme, label))

    def _refuse_in_files(self, key: RefusalKey) -> None:
        child = self._refusal_children.get(key)
        if child is None:
            refusals = self._instruments.app_refusals
            child = self._refusal_children[key] = refusals.labels(
                *(key if self._by_client else key[:2])
            )
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
            # A health gauge reads the stores: their errors may quote a DSN.
            logger.error(
                "metrics cannot be collected: %s: %s", type(exc).__name__, redact(str(exc))
            )
            return Served(503, [("Retry-After", "5"), *_HEADERS], b"Service Unavailable\n", _TEXT)
        return Served(200, list(_HEADERS), body, CONTENT_TYPE_LATEST)

    def may_read(self, view: RequestView) -> bool:
        """Whether this request's client may read the metrics."""
        if not address_in(view.client_address, self._networks):
            return False
        # A request a web page made (Fetch Metadata; "none" is a person typing the
        # URL). Prometheus sends none of it; a page on a browser in the allowed
        # networks could otherwise read the metrics through DNS rebinding.
        site = view.header("sec-fetch-site")
        if site is not None and site.strip().lower() != "none":
            return False
        if self._proxied_is_outside:
            forwarded, forwarded_for, _ = view.proxy_headers()
            if forwarded or forwarded_for or view.header("x-real-ip"):
                return False
        return True


#: Every engine's metrics in this process, for the at-fork hook.
_live: weakref.WeakSet[Metrics] = weakref.WeakSet()


def _after_fork() -> None:
    global _shared_lock
    _shared_lock = threading.Lock()
    for metrics in list(_live):
        metrics._forked()


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_after_fork)
