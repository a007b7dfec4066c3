"""The framework-free core: credential -> Client -> scopes -> limits -> outcome.

``check`` and ``acheck`` are twins: the async one never blocks the event loop
(a thread hop for a key store without an async client, ``limits.aio`` for
network limit storages).
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from hashlib import sha256
from logging import INFO
from time import monotonic, perf_counter, time
from typing import TYPE_CHECKING

from . import keys as keyformat
from .audit import audit
from .audit import write as _audit
from .client import Client
from .credentials import extract_credential, looks_like_jwt
from .errors import (
    NONCE_REPLAYED,
    AddressNotAllowed,
    AuthError,
    BodyTooLarge,
    ConfigError,
    HttpsRequired,
    InsufficientScope,
    InvalidRequest,
    InvalidSignature,
    InvalidToken,
    KeyEnded,
    MissingCredentials,
    QuotaExceeded,
    RateLimited,
    StoreUnavailable,
    TemporarilyUnavailable,
)
from .limiting import Charge, Limiter, LimitPlan, StorageDown
from .outcome import PUBLIC, Allowed, Denied, Served, deny
from .redaction import redact
from .settings import Route, Settings, invalidation_url
from .source_limits import SourceLimits, SourceRateLimited
from .stores import KeyRecord, KeyStore, open_key_store
from .stores.base import subscribe_invalidations
from .syntax import CONTROL_CHARACTERS
from .transport import Network, Transport, address_in, parse_networks

if TYPE_CHECKING:
    from .invalidation import RedisBus
    from .issuer.endpoint import TokenService
    from .issuer.signing_keys import SigningKeys
    from .request_view import RequestView
    from .signatures import SignatureVerifier
    from .telemetry import Telemetry
    from .telemetry.metrics import Metrics
    from .tokens import TokenVerifier, VerifiedToken

logger = logging.getLogger("m2m_middleware")

OUTAGE_RETRY_AFTER = 5
_ROUTE_CACHE_SIZE = 10_000
#: A path with a control character (C0, DEL, C1) is refused before any public
#: path or route rule is looked at: the router and a rule could disagree on it
#: (Starlette's ``$`` matches ``/orders`` before a final newline, a glob does
#: not), and no client means one. ``str.isprintable`` answers first because it
#: is True for nearly every real path: 40 ns on a short path, where the regex
#: search alone takes 110 ns (python -m timeit, CPython 3.11).
CONTROL_CHARACTER_IN_PATH = "the request path holds a control character"
#: Seconds a key hash the store did not know is refused without asking it
#: again. Anyone can compute well-formed keys (the checksum is public), so a
#: guess repeated any number of times costs one lookup per this interval; and
#: a key created in another process is never refused for longer (one created
#: here through any store object is seen at once: creation invalidates).
UNKNOWN_KEY_TTL = 1.0


@dataclass(slots=True)
class _CachedKey:
    record: KeyRecord | None  # None for a verified JWT
    client: Client
    dead_at: float  # epoch seconds when the key stops working (revoked or expired)
    fresh_until: float  # monotonic seconds after which the store is asked again
    plan: LimitPlan | None = None  # the client's limits on a route without rules
    #: A token of our own issuer's: the key id of the API key it was issued from.
    token_of: str | None = None
    #: Why the entry ends at ``dead_at``, when that is its API key's end, not its ``exp``.
    ended: str | None = None
    #: The key's ``allowed_cidrs``, parsed; None when it may be used from anywhere
    #: (such a key never takes the fast lane, so only it pays for the check).
    networks: tuple[Network, ...] | None = None


@dataclass(slots=True)
class _KeyState:
    """What a token of our own issuer needs of its API key: until when the key works."""

    record: KeyRecord | None  # None: no such key (deleted, or the token is from elsewhere)
    dead_at: float  # epoch seconds: revoked or expired from then on (-inf: no key)
    fresh_until: float  # monotonic seconds after which the store is asked again
    #: The key's ``allowed_cidrs``, parsed once per read of the key: its tokens
    #: may be used from those networks only, as the key itself may.
    networks: tuple[Network, ...] | None = None


def _key_ended(record: KeyRecord | None) -> str:
    """Why a token is refused whose API key stopped working."""
    if record is None:
        return "the API key this token was issued from does not exist"
    if _epoch(record.revoked_at) <= _epoch(record.expires_at):
        return "the API key this token was issued from was revoked"
    return "the API key this token was issued from has expired"


class UnknownKeys:
    """A bounded, short-lived set of key hashes the store did not know.

    Consulted only when the verified-key cache has no entry, so a known key's
    request never pays for it. Full, it forgets the oldest entries first
    (they expire first): many distinct guesses cost memory up to ``size``
    and one lookup each, as they would anyway.
    """

    def __init__(self, ttl: float, size: int, clock: Callable[[], float] | None = None) -> None:
        self.ttl = ttl
        self.size = size
        #: Monotonic seconds; replaceable, so tests advance time instead of sleeping.
        self.clock = clock or _monotonic
        self._until: OrderedDict[str, float] = OrderedDict()

    def __contains__(self, key_hash: str) -> bool:
        until = self._until.get(key_hash)
        if until is None:
            return False
        if until > self.clock():
            return True
        self._until.pop(key_hash, None)
        return False

    def __len__(self) -> int:
        return len(self._until)

    def add(self, key_hash: str) -> None:
        if not (self.size and self.ttl):
            return
        entries = self._until
        entries.pop(key_hash, None)  # re-added last: the order stays oldest first
        while len(entries) >= self.size:
            try:
                entries.popitem(last=False)
            except KeyError:  # emptied by another thread meanwhile
                break
        entries[key_hash] = self.clock() + self.ttl

    def clear(self) -> None:
        self._until.clear()


def _monotonic() -> float:
    return monotonic()  # looked up per call: a test may replace the module's clock


def _wall() -> float:
    return time()  # the same, for wall-clock time


def _networks(record: KeyRecord) -> tuple[Network, ...] | None:
    if not record.allowed_cidrs:
        return None
    try:
        return parse_networks(record.allowed_cidrs)
    except ValueError:  # a row edited by hand: no address is in a network it cannot name
        return ()


def _epoch(value: object) -> float:
    return value.timestamp() if value is not None else math.inf  # type: ignore[attr-defined]


class KeyCache:
    """A bounded map of verified key hashes, so the hot path skips the store.

    Revocations through any store object for the same data in this process
    drop the entry at once; those made in other processes as soon as the store
    hears of them (see :meth:`Engine._poll_changes`, ``KeyStore.watch_changes``),
    or over a bus; failing all of those, the TTL bounds how stale it can be.
    A lookup that raced with a revocation is not cached: :attr:`generation`
    moves on every invalidation, and :meth:`put` only caches a record read
    in the generation it was asked for in.

    Tokens of our own issuer are kept here too, filed under the key id of the
    API key each came from, beside that key's state (:meth:`put_state`):
    invalidating the key drops them all with it.

    :attr:`unknown` remembers, briefly, the hashes the store did not know;
    a key created through any store object here invalidates its new key id,
    which empties it, so a new key is never refused from it in this process.
    """

    def __init__(self, store: KeyStore, ttl: float, size: int) -> None:
        self.ttl = ttl
        self.size = size
        self.generation = 0
        self._entries: OrderedDict[str, _CachedKey] = OrderedDict()
        self._hash_by_key_id: dict[str, str] = {}
        #: Our own issuer's tokens: the API key's id -> the hashes of its cached tokens,
        #: so that revoking the key drops them all at once.
        self._tokens_of: dict[str, set[str]] = {}
        #: The API keys those tokens came from, by key id: a cold token of a known
        #: key costs no store read.
        self._states: OrderedDict[str, _KeyState] = OrderedDict()
        self.unknown = UnknownKeys(min(ttl, UNKNOWN_KEY_TTL), size)
        subscribe_invalidations(store.location, self.invalidate)

    def get(self, key_hash: str) -> _CachedKey | None:
        return self._entries.get(key_hash)

    def entry(self, record: KeyRecord) -> _CachedKey:
        """A verified key's entry, not (yet) in the cache."""
        client = Client(
            client_id=record.client_id,
            scheme="api_key",
            scopes=record.scopes,
            tier=record.tier,
            key_id=record.key_id,
        )
        return _CachedKey(
            record,
            client,
            min(_epoch(record.revoked_at), _epoch(record.expires_at)),
            monotonic() + self.ttl,
            networks=_networks(record),
        )

    def put(self, key_hash: str, record: KeyRecord, generation: int) -> _CachedKey:
        entry = self.entry(record)
        if self.size and self.ttl and generation == self.generation:
            if len(self._entries) >= self.size:
                self._evict_oldest()
            self._entries[key_hash] = entry
            self._hash_by_key_id[record.key_id] = key_hash
        return entry

    def put_token(
        self,
        token_hash: str,
        client: Client,
        dead_at: float,
        *,
        key_id: str | None = None,
        ended: str | None = None,
        generation: int | None = None,
        fresh_until: float = math.inf,
        networks: tuple[Network, ...] | None = None,
    ) -> _CachedKey:
        """A verified JWT: kept until it expires (or the TTL ends) at the latest.

        Keyed on the token's text, which is only a cache key: one token can
        have more than one text that verifies (an ECDSA signature ``(r, s)``
        is as valid as ``(r, n - s)``, and both forms are accepted because
        identity providers emit either), so this cache may hold it twice.
        That costs a second verification, nothing else. Anything that must
        happen once per token (counting uses, revoking, replay checks) must
        key on its ``jti`` and the key that signed it, never on its text.

        ``key_id`` (a token of our own issuer's) files it under its API key,
        which :meth:`invalidate` drops it with; ``generation`` as for :meth:`put`;
        ``fresh_until`` when its key's state is due a reread, if sooner than the TTL
        (so what the entry knows of its key is never older than the TTL);
        ``networks`` its API key's ``allowed_cidrs``, which bind the token too.
        """
        fresh_until = min(monotonic() + self.ttl, fresh_until)
        entry = _CachedKey(None, client, dead_at, fresh_until, None, key_id, ended, networks)
        if self.size and self.ttl and (generation is None or generation == self.generation):
            if len(self._entries) >= self.size:
                self._evict_oldest()
            self._entries[token_hash] = entry
            if key_id is not None:
                self._tokens_of.setdefault(key_id, set()).add(token_hash)
        return entry

    def state(self, key_id: str) -> _KeyState | None:
        return self._states.get(key_id)

    def put_state(self, key_id: str, record: KeyRecord | None, generation: int) -> _KeyState:
        """The state of the API key our tokens name, kept like a verified key."""
        dead_at = (
            -math.inf
            if record is None
            else min(_epoch(record.revoked_at), _epoch(record.expires_at))
        )
        networks = _networks(record) if record is not None else None
        state = _KeyState(record, dead_at, monotonic() + self.ttl, networks)
        if self.size and self.ttl and generation == self.generation:
            states = self._states
            states.pop(key_id, None)
            while len(states) >= self.size:
                try:
                    states.popitem(last=False)
                except KeyError:  # emptied by another thread meanwhile
                    break
            states[key_id] = state
        return state

    def put_unknown(self, key_hash: str, generation: int) -> None:
        """Remember a hash the store did not know, unless a key changed meanwhile."""
        if generation == self.generation:
            self.unknown.add(key_hash)

    def invalidate(self, key_id: str | None) -> None:
        """Forget ``key_id``; None (a notice that any key may have changed): forget all."""
        if key_id is None:
            self.clear()
            return
        self.unknown.clear()  # the key may be one just created
        self.forget(key_id)
        self._states.pop(key_id, None)
        for token_hash in tuple(self._tokens_of.pop(key_id, ())):
            self._entries.pop(token_hash, None)

    def forget(self, key_id: str) -> None:
        """Drop ``key_id``'s entry (its record changed), keeping the unknown hashes.

        For changes a client can cause itself (a use given back after a 429):
        clearing the unknown hashes there would let anyone holding a
        usage-limited key send forged keys to the store again at will.
        """
        self.generation += 1
        key_hash = self._hash_by_key_id.get(key_id)
        if key_hash is not None:
            self._drop(key_hash)

    def _evict_oldest(self) -> None:
        # O(1) on an OrderedDict; next(iter(dict)) would walk the slots that
        # earlier evictions left empty, microseconds per insert once full.
        try:
            key_hash, entry = self._entries.popitem(last=False)
        except KeyError:  # emptied by another thread meanwhile
            return
        self._unfile(key_hash, entry)

    def _drop(self, key_hash: str) -> None:
        entry = self._entries.pop(key_hash, None)
        if entry is not None:
            self._unfile(key_hash, entry)

    def _unfile(self, key_hash: str, entry: _CachedKey) -> None:
        if entry.record is not None:
            self._hash_by_key_id.pop(entry.record.key_id, None)
        elif entry.token_of is not None:
            hashes = self._tokens_of.get(entry.token_of)
            if hashes is not None:
                hashes.discard(key_hash)
                if not hashes:
                    self._tokens_of.pop(entry.token_of, None)

    def clear(self) -> None:
        self.generation += 1
        self.unknown.clear()
        self._entries.clear()
        self._hash_by_key_id.clear()
        self._tokens_of.clear()
        self._states.clear()


class Engine:
    def __init__(
        self,
        settings: Settings | None = None,
        *,
        store: KeyStore | None = None,
        telemetry_clock: Callable[[], float] | None = None,
    ) -> None:
        """``telemetry_clock``: Unix seconds for usage hours and alert times (a test's
        clock; default ``time.time``). Nothing else in the engine reads it."""
        if settings is not None and not isinstance(settings, Settings):
            # A dict here would fail later as an AttributeError deep inside.
            raise ConfigError(
                "settings",
                f"expected Settings(...), got {type(settings).__name__}: write "
                "settings=Settings(**fields), or Settings.from_mapping(mapping)",
            )
        self.settings = settings = settings or Settings()
        self.tokens: TokenVerifier | None = None
        self.bus: RedisBus | None = None
        #: Our own token issuer's signing keys, when ``token_endpoint`` is set.
        self.signing_keys: SigningKeys | None = None
        own_issuer = settings.token_endpoint is not None
        self._api_keys = "api_key" in settings.schemes
        if (
            store is None
            and not self._api_keys
            and not own_issuer  # the issuer's keys, API and signing, are in the key store
            and isinstance(settings.key_store, str)
        ):
            store = open_key_store("memory://")  # JWT only: no key file to create
        opened = store is None
        self.store = store or open_key_store(
            settings.key_store, prefix=settings.key_prefix, timeout=settings.storage_timeout
        )
        try:
            self._verifiers(settings, own_issuer)
        except BaseException:
            if opened:
                self.store.close()
            raise
        bus_url = invalidation_url(settings, self.store)  # before the limiter connects anywhere
        self.limiter = Limiter(settings)
        #: Checks RFC 9421 signatures, when a route rule or ``require_signatures`` asks
        #: for them; None otherwise (and adapters then never read a body for it).
        self.signatures: SignatureVerifier | None = None
        if settings.signatures_needed:
            from .signatures import SignatureVerifier, nonce_store

            self.signatures = SignatureVerifier(settings, nonce_store(self.limiter))
        self._sign_all = settings.require_signatures
        #: The largest body an adapter reads for a request that must be signed.
        self.max_body_size = settings.max_body_size
        #: The budget of failed authentications per address (``source_limits``), or None.
        self.source_limits: SourceLimits | None = None
        if settings.source_limit_items:
            self.source_limits = SourceLimits(settings, self.limiter)
        self.keys = KeyCache(self.store, settings.key_cache_ttl, settings.key_cache_size)
        self.store.watch_changes()
        #: When the store is next asked what other processes changed (monotonic
        #: seconds; never for a store that is not polled).
        self._next_poll = 0.0 if self.store.change_poll_interval else math.inf
        self._poll_interval = self.store.change_poll_interval or math.inf
        if bus_url is not None:
            from .invalidation import redis_bus

            #: Carries revocations to and from other instances (None: the store tells
            #: them itself, or the TTL is the bound).
            self.bus = redis_bus(bus_url, settings.storage_timeout)
        self._cached = self.keys._entries.get  # the dict itself: one call less per request
        #: Our own issuer's endpoints, when ``token_endpoint`` is set.
        self.token_service: TokenService | None = None
        #: Paths the middleware answers itself (:meth:`serve`); empty when none are on,
        #: so an adapter's one test per request is a miss on an empty set.
        self.endpoints: frozenset[str] = frozenset()
        #: True when adapters must pass a :class:`RequestView` (``view=``): a check reads
        #: more than the credential headers. False: they pass the peer address only.
        self.needs_view = (
            settings.needs_request_view
            or self.signatures is not None  # headers, the body, the target URI
            or self.source_limits is not None  # the client's address, as proxies report it
        )
        self.transport = Transport(settings.trusted_networks, settings.proxy_headers)
        self._require_https = settings.require_https
        self._hsts: tuple[str, str] | None = (
            ("Strict-Transport-Security", f"max-age={settings.hsts_seconds}")
            if settings.hsts_seconds
            else None
        )
        self._public_hsts = Allowed(None, [self._hsts] if self._hsts else [])
        self.realm = settings.realm
        self.header_name = settings.api_key_header
        self._max_length = settings.max_credential_length
        self._public = settings.public_path_pattern
        self._routes = settings.route_rules
        self._route_cache: dict[tuple[str, str], tuple[Route, ...]] = {}
        self._allow_on_outage = settings.on_storage_error == "allow"
        self._store_down = False
        #: True when neither the key store nor the limits can block: async
        #: adapters may then call :meth:`check` and skip a coroutine.
        self.never_blocks = (
            not self.store.blocking
            and self.limiter.in_memory
            and (self.tokens is None or self.tokens.jwks is None)  # a JWKS fetch blocks
        )
        if self.signing_keys is not None:
            from .issuer.endpoint import TokenService

            self.token_service = TokenService(self)
            self.endpoints = self.token_service.paths
        #: Usage, metrics and alerts (m2m_middleware.telemetry); None when all are off.
        self.telemetry: Telemetry | None = None
        self._observe: Callable[[Allowed | Denied, str | None, float], None] | None = None
        self._timed = False
        if settings.usage or settings.alerts or settings.metrics_path is not None:
            from .telemetry import Telemetry

            self.telemetry = Telemetry(self, clock=telemetry_clock or time)
            self._observe = self.telemetry.observe
            self._timed = self.telemetry.timed
            if self.telemetry.metrics is not None:
                self.endpoints = self.endpoints | {self.telemetry.metrics.path}

    def _verifiers(self, settings: Settings, own_issuer: bool) -> None:
        """The JWT verifier, and with ``token_endpoint`` our issuer's signing keys,
        whose tokens the verifier then takes with no HTTP fetch."""
        own = None
        if own_issuer:
            from .issuer.signing_keys import signing_keys_for

            # Raises the ConfigError naming signing_key_secret when there is none.
            self.signing_keys = signing_keys_for(settings, store=self.store, clock=_wall)
        if "jwt" in settings.schemes:
            from .tokens import TokenVerifier  # joserfc loads only when JWTs are on

            if self.signing_keys is not None:
                from .issuer.own_tokens import OwnTokens

                own = OwnTokens(self.signing_keys, settings, clock=_monotonic)
            self.tokens = TokenVerifier(settings, own=own)

    # -- the two front doors --------------------------------------------------

    def check(
        self,
        method: str,
        path: str,
        authorization: str | None,
        api_key: str | None,
        peer: str | None = None,
        view: RequestView | None = None,
    ) -> Allowed | Denied:
        """Decide one request and audit it. Never raises for anything the client sent.

        ``peer`` is the address of the socket's other end as the server gave it;
        ``view`` the whole request, which the caller must pass when
        :attr:`needs_view` is True (its ``client_address`` is then the peer).
        For a caller whose request ends with this answer. Adapters, which
        run the application after it, call :meth:`gate` instead.
        """
        started = perf_counter() if self._timed else 0.0
        if view is None:
            outcome = self._check(method, path, authorization, api_key, peer)
        else:
            outcome = self._check_view(method, path, authorization, api_key, view)
            peer = view.client_address
        if (outcome.client is not None or not outcome.allowed) and audit.isEnabledFor(INFO):
            _audit(outcome, method, path)
        if self._observe is not None:
            self._observe(outcome, peer, perf_counter() - started if started else 0.0)
        return outcome

    async def acheck(
        self,
        method: str,
        path: str,
        authorization: str | None,
        api_key: str | None,
        peer: str | None = None,
        view: RequestView | None = None,
    ) -> Allowed | Denied:
        """The async twin of :meth:`check`: blocking store calls run in a thread."""
        started = perf_counter() if self._timed else 0.0
        if view is None:
            outcome = await self._acheck(method, path, authorization, api_key, peer)
        else:
            outcome = await self._acheck_view(method, path, authorization, api_key, view)
            peer = view.client_address
        if (outcome.client is not None or not outcome.allowed) and audit.isEnabledFor(INFO):
            _audit(outcome, method, path)
        if self._observe is not None:
            self._observe(outcome, peer, perf_counter() - started if started else 0.0)
        return outcome

    def gate(
        self,
        method: str,
        path: str,
        authorization: str | None,
        api_key: str | None,
        peer: str | None = None,
        view: RequestView | None = None,
    ) -> Allowed | Denied:
        """:meth:`check` for an adapter, which audits an admitted request itself.

        A denial is audited here, at once: the request ends with it. An
        admitted one may still be refused by the application
        (``require_scopes``), so its adapter writes its one record when the
        application has answered (:func:`m2m_middleware.audit.ended`).
        """
        started = perf_counter() if self._timed else 0.0
        if view is None:
            outcome = self._check(method, path, authorization, api_key, peer)
        else:
            outcome = self._check_view(method, path, authorization, api_key, view)
            peer = view.client_address
        if not outcome.allowed and audit.isEnabledFor(INFO):
            _audit(outcome, method, path)
        if self._observe is not None:
            self._observe(outcome, peer, perf_counter() - started if started else 0.0)
        return outcome

    async def agate(
        self,
        method: str,
        path: str,
        authorization: str | None,
        api_key: str | None,
        peer: str | None = None,
        view: RequestView | None = None,
    ) -> Allowed | Denied:
        """The async twin of :meth:`gate`."""
        started = perf_counter() if self._timed else 0.0
        if view is None:
            outcome = await self._acheck(method, path, authorization, api_key, peer)
        else:
            outcome = await self._acheck_view(method, path, authorization, api_key, view)
            peer = view.client_address
        if not outcome.allowed and audit.isEnabledFor(INFO):
            _audit(outcome, method, path)
        if self._observe is not None:
            self._observe(outcome, peer, perf_counter() - started if started else 0.0)
        return outcome

    def serve(self, view: RequestView) -> Served | Denied:
        """Answer a request for one of :attr:`endpoints` (the adapter read its body)."""
        metrics = self.telemetry.metrics if self.telemetry is not None else None
        if metrics is not None and view.path == metrics.path:
            return self._serve_metrics(metrics, view)
        service = self.token_service
        assert service is not None, "serve() is for the paths in engine.endpoints"
        https, refused = self._endpoint_transport(view)
        if refused is not None:
            return refused
        sources = self.source_limits
        if sources is not None:
            refused = self._source_refused(view.path, view.client_address, view.method)
            if refused is not None:
                self._endpoint_refused(view.client_address)
                return refused
        served = service.serve(view)
        if served.status == 401:  # invalid_client: a key or secret that is not one
            if sources is not None:
                sources.failed(view.client_address)
            self._endpoint_refused(view.client_address)
        return self._served_hsts(served, https)

    async def aserve(self, view: RequestView) -> Served | Denied:
        """The async twin of :meth:`serve`: store reads and signing run in a thread
        unless nothing can block (an in-memory store and limits, a fast algorithm)."""
        metrics = self.telemetry.metrics if self.telemetry is not None else None
        if metrics is not None and view.path == metrics.path:
            return self._serve_metrics(metrics, view)  # collecting never blocks
        service = self.token_service
        assert service is not None, "aserve() is for the paths in engine.endpoints"
        https, refused = self._endpoint_transport(view)
        if refused is not None:
            return refused
        sources = self.source_limits
        if sources is not None:
            refused = self._source_refused(view.path, view.client_address, view.method)
            if refused is not None:
                self._endpoint_refused(view.client_address)
                return refused
        if self.never_blocks and self.settings.signing_algorithm != "RS256":
            served = service.serve(view)
        else:
            served = await self.store.run_blocking(service.serve, view)
        if served.status == 401:
            if sources is not None:
                await sources.afailed(view.client_address)
            self._endpoint_refused(view.client_address)
        return self._served_hsts(served, https)

    def _endpoint_refused(self, address: str | None) -> None:
        """A token request whose client authentication failed (or whose address spent its
        ``source_limits``): the alerts count it as a failed authentication from
        ``address``, as they count a request's. Usage and metrics do not: no client
        is known, and the token service counts its own answers."""
        telemetry = self.telemetry
        if telemetry is not None and telemetry.alerts is not None:
            telemetry.alerts.authentication_failed(address)

    def _serve_metrics(self, metrics: Metrics, view: RequestView) -> Served | Denied:
        """The Prometheus text at ``metrics_path``: over HTTPS under ``require_https``
        as every other path, and from the client's address as the proxies report it."""
        if self.needs_view:
            address, https = self.transport.resolve(view)
            view.client_address = address
            if not https and self._require_https:
                return self._deny(
                    HttpsRequired(
                        "this API is served over HTTPS only; send the request to https://"
                    )
                )
            return self._served_hsts(metrics.serve(view), https)
        return metrics.serve(view)

    # -- usage, metrics and alerts ----------------------------------------------

    def flush(self) -> None:
        """Write the usage counted so far (and the alerts fired) to the key store now.

        Raises the store's error when it cannot; the counts are then kept for
        the next attempt. A background thread does this every
        ``usage_flush_interval`` seconds, and the process at exit.
        """
        if self.telemetry is not None:
            self.telemetry.flush()

    def app_refused(self, denied: Denied) -> None:
        """An admitted request that the application refused (each framework's
        ``require_scopes``): usage, metrics and alerts count it as the refusal it is."""
        if self.telemetry is not None:
            self.telemetry.refused(denied)

    def _source_refused(self, path: str, address: str | None, method: str) -> Denied | None:
        """The 429 of an address that spent its ``source_limits``, on the token endpoint
        (the JWKS and the metadata are public); None when it may go on."""
        if path != self.settings.token_endpoint:
            return None
        assert self.source_limits is not None
        try:
            self.source_limits.check(address)
        except SourceRateLimited as exc:
            denied = deny(exc, self.realm, exc.headers)
            if audit.isEnabledFor(INFO):
                _audit(denied, method, path)
            return denied
        return None

    # -- request signatures: what an adapter reads for them -------------------

    def reads_body(self, method: str, path: str) -> bool:
        """Whether an adapter must read this request's body (up to :attr:`max_body_size`)
        into its view: the request may need a signature, whose digest covers the body.
        Adapters ask only when :attr:`signatures` is set."""
        if self.signatures is None:
            return False
        if self._sign_all:
            public = self._public
            return public is None or not (path.isprintable() and public.match(path))
        return any(route.signed for route in self._matching_routes(method, path))

    def body_too_large(self, method: str, path: str) -> Denied:
        """413 for a request to be signed whose body is over :attr:`max_body_size` (audited)."""
        denied = self._deny(
            BodyTooLarge(
                f"the request body is over max_body_size ({self.max_body_size} bytes); "
                "a request that must be signed is read whole to check its digest"
            )
        )
        if audit.isEnabledFor(INFO):
            _audit(denied, method, path)
        return denied

    def _endpoint_transport(self, view: RequestView) -> tuple[bool, Denied | None]:
        """An endpoint's request as the transport settings see it: whether it came over
        HTTPS, and the refusal of a plain-HTTP token request under ``require_https``
        (the JWKS and the metadata are public, as public paths are). The view's
        ``client_address`` becomes the client's, as trusted proxies report it, which
        the token endpoint checks a key's ``allowed_cidrs`` against."""
        if not self.needs_view:
            return False, None
        address, https = self.transport.resolve(view)
        view.client_address = address
        if not https and self._require_https and view.path == self.settings.token_endpoint:
            body = view.body or b""
            denied = self._deny(
                HttpsRequired("this API is served over HTTPS only; send the request to https://")
            )
            if view.header("authorization") or b"client_secret" in body:
                denied = replace(denied, credential_in_clear=True)
            if audit.isEnabledFor(INFO):
                _audit(denied, view.method, view.path)
            return https, denied
        return https, None

    def _served_hsts(self, served: Served, https: bool) -> Served:
        if https and self._hsts is not None:
            return replace(served, headers=[*served.headers, self._hsts])
        return served

    def key_entry(self, credential: str) -> _CachedKey:
        """An API key verified as a request's is (checksum, cache, store), for the token
        endpoint, which may take keys even where ``schemes`` does not. Blocking."""
        if len(credential) > self._max_length or not keyformat.is_well_formed(credential):
            raise InvalidToken("the API key is malformed or its checksum does not match")
        key_hash = sha256(credential.encode("utf-8", "surrogatepass")).hexdigest()
        clock = monotonic()
        if clock >= self._next_poll:
            self._poll_changes(clock)
        if not self._api_keys:
            # From the store, never cached: the request path reads the verified-key
            # cache before it asks whether API keys are accepted (that question costs
            # nothing only there), so a key cached here would pass as a Bearer
            # credential on every route for key_cache_ttl (tests/conformance, "only
            # tokens"). Token requests are few and rate-limited: one read each.
            return self._find_key(key_hash, None, cache=False)
        entry = self._cached(key_hash)
        if entry is not None and entry.record is None:  # a JWT's entry: not a key
            raise InvalidToken("the API key is not recognised")
        if entry is None or entry.fresh_until < clock:
            entry = self._find_key(key_hash, entry)
        return entry

    def _check_view(
        self,
        method: str,
        path: str,
        authorization: str | None,
        api_key: str | None,
        view: RequestView,
    ) -> Allowed | Denied:
        """:meth:`_check` for a request whose transport matters (see :attr:`needs_view`)."""
        address, https = self.transport.resolve(view)
        view.client_address = address  # the client's, as the trusted proxies report it
        if not https and self._require_https:
            refused = self._plain_http(path, authorization, api_key)
            if refused is not None:
                return refused
        signed = self._signed_view(view, https) if self.signatures is not None else None
        sources = self.source_limits
        if sources is None:
            outcome = self._check(method, path, authorization, api_key, address, signed)
        else:
            limited = self._source_limited(path, address)
            if limited is not None:
                outcome = limited
            else:
                outcome = self._check(method, path, authorization, api_key, address, signed)
                if _counts_as_failure(outcome):
                    sources.failed(address)
        return self._with_hsts(outcome) if https and self._hsts is not None else outcome

    async def _acheck_view(
        self,
        method: str,
        path: str,
        authorization: str | None,
        api_key: str | None,
        view: RequestView,
    ) -> Allowed | Denied:
        """The async twin of :meth:`_check_view`."""
        address, https = self.transport.resolve(view)
        view.client_address = address  # the client's, as the trusted proxies report it
        if not https and self._require_https:
            refused = self._plain_http(path, authorization, api_key)
            if refused is not None:
                return refused
        signed = self._signed_view(view, https) if self.signatures is not None else None
        sources = self.source_limits
        if sources is None:
            outcome = await self._acheck(method, path, authorization, api_key, address, signed)
        else:
            limited = self._source_limited(path, address)
            if limited is not None:
                outcome = limited
            else:
                outcome = await self._acheck(method, path, authorization, api_key, address, signed)
                if _counts_as_failure(outcome):
                    await sources.afailed(address)
        return self._with_hsts(outcome) if https and self._hsts is not None else outcome

    def _source_limited(self, path: str, address: str | None) -> Denied | None:
        """429 for an address over its ``source_limits``, before its credential is looked
        at; None when it may go on (always on a public path: it needs no credential)."""
        assert self.source_limits is not None
        public = self._public
        if public is not None and path.isprintable() and public.match(path):
            return None
        try:
            self.source_limits.check(address)
        except SourceRateLimited as exc:
            return deny(exc, self.realm, exc.headers)
        return None

    @staticmethod
    def _signed_view(view: RequestView, https: bool) -> RequestView:
        """The view a signature is checked on: its scheme the one the trusted proxies
        report, which the client's ``@target-uri`` names."""
        if view.scheme in ("http", "https"):
            view.scheme = "https" if https else "http"
        return view

    def _plain_http(
        self, path: str, authorization: str | None, api_key: str | None
    ) -> Denied | None:
        """The refusal of a plain-HTTP request under ``require_https``, before its
        credential is looked at; None on a public path (it needs no credential, and
        a load balancer's health check may well come in plain)."""
        public = self._public
        if public is not None and path.isprintable() and public.match(path):
            return None
        denied = self._deny(
            HttpsRequired("this API is served over HTTPS only; send the request to https://")
        )
        if authorization or api_key:
            denied = replace(denied, credential_in_clear=True)
        return denied

    def _with_hsts(self, outcome: Allowed | Denied) -> Allowed | Denied:
        assert self._hsts is not None
        if isinstance(outcome, Denied):
            return replace(outcome, headers=[*outcome.headers, self._hsts])
        if outcome.client is None:
            return self._public_hsts
        return Allowed(outcome.client, [*outcome.headers, self._hsts], outcome.cost)

    def _check(
        self,
        method: str,
        path: str,
        authorization: str | None,
        api_key: str | None,
        address: str | None = None,
        signed: RequestView | None = None,
    ) -> Allowed | Denied:
        entry = None
        try:
            # Before anything looks at the path: see CONTROL_CHARACTER_IN_PATH.
            if not path.isprintable() and CONTROL_CHARACTERS.search(path):
                raise InvalidRequest(CONTROL_CHARACTER_IN_PATH)
            public = self._public
            if public is not None and public.match(path):
                return PUBLIC
            credential = self._credential(authorization, api_key)
            key_hash = sha256(credential.encode("utf-8", "surrogatepass")).hexdigest()  # hash_key
            clock = monotonic()
            if clock >= self._next_poll:  # see _poll_changes for what this costs
                self._poll_changes(clock)
            entry = self._cached(key_hash)
            if entry is None or entry.fresh_until < clock:
                entry = self._lookup(credential, key_hash, entry)
            now = time()
            plan = entry.plan
            if plan is None or entry.dead_at <= now:
                return self._decide(entry, method, path, address, signed)
            # The fast lane: a live key without usage limit, no route rules.
            try:
                charge = self.limiter.charge(plan, entry.client.client_id, 1, now)
            except StorageDown:
                charge = self._limits_down()
            if not charge.allowed:
                return self._rate_limited(charge, entry.client)
            record = entry.record
            if record is not None and self.store.mark_used(record.key_id, now):
                self._flush_last_used()
            return Allowed(entry.client, charge.headers)
        except AuthError as error:
            return self._refuse(error, entry)

    def _decide(
        self,
        entry: _CachedKey,
        method: str,
        path: str,
        address: str | None,
        signed: RequestView | None = None,
    ) -> Allowed | Denied:
        """Every case the fast lane of :meth:`check` leaves: rules, uses, expiry, networks,
        signatures."""
        plan, cost = self._authorize(entry, method, path, address)
        signatures = self.signatures
        nonce = None
        if signatures is not None and self._must_sign(method, path):
            if self.limiter.carries_nonces(plan):  # remembered with the limits: one round trip
                nonce = signatures.check(*self._signature_target(entry, signed))
            else:
                # The key is known, nothing is spent yet: no use taken, no limit charged.
                signatures.verify(*self._signature_target(entry, signed))
        store = self.store
        record = entry.record
        key_id = record.key_id if record is not None else ""
        took_use = False
        if record is not None and record.remaining_uses is not None:
            # Take the use before charging the limits: a request refused
            # for quota never holds (or spends) the client's rate budget.
            try:
                left = store.take_use(key_id)
            except StoreUnavailable as exc:
                left = self._use_fallback(exc)
            else:
                took_use = left is not None
            self._note_uses(entry, left)
        try:
            charge = self.limiter.charge(plan, entry.client.client_id, cost, nonce=nonce)
            if not charge.allowed:
                if took_use:
                    self._return_use(key_id)
                if charge.replayed:
                    raise InvalidSignature(NONCE_REPLAYED)
                return self._rate_limited(charge, entry.client)
        except StorageDown:
            if took_use and not self._allow_on_outage:
                self._return_use(key_id)
            charge = self._limits_down()
        if record is not None and store.mark_used(key_id):
            self._flush_last_used()
        return Allowed(entry.client, charge.headers, cost)

    async def _acheck(
        self,
        method: str,
        path: str,
        authorization: str | None,
        api_key: str | None,
        address: str | None = None,
        signed: RequestView | None = None,
    ) -> Allowed | Denied:
        entry = None
        try:
            # Before anything looks at the path: see CONTROL_CHARACTER_IN_PATH.
            if not path.isprintable() and CONTROL_CHARACTERS.search(path):
                raise InvalidRequest(CONTROL_CHARACTER_IN_PATH)
            public = self._public
            if public is not None and public.match(path):
                return PUBLIC
            credential = self._credential(authorization, api_key)
            key_hash = sha256(credential.encode("utf-8", "surrogatepass")).hexdigest()  # hash_key
            clock = monotonic()
            if clock >= self._next_poll:  # on the loop: see _poll_changes
                self._poll_changes(clock)
            entry = self._cached(key_hash)
            if entry is None or entry.fresh_until < clock:
                entry = await self._alookup(credential, key_hash, entry)
            now = time()
            plan = entry.plan
            if plan is None or entry.dead_at <= now:
                return await self._adecide(entry, method, path, address, signed)
            limiter = self.limiter
            if limiter.in_memory:
                try:
                    charge = limiter.charge(plan, entry.client.client_id, 1, now)
                except StorageDown:
                    charge = self._limits_down()
            elif limiter.leases is None or not plan.limits:
                return await self._adecide(entry, method, path, address, signed)
            else:  # batched counting: most requests are covered by a lease held here
                held = limiter.charge_held(plan, entry.client.client_id, 1)
                if held is None:
                    return await self._adecide(entry, method, path, address, signed)
                charge = held
            if not charge.allowed:
                return self._rate_limited(charge, entry.client)
            store = self.store
            record = entry.record
            if record is not None and store.mark_used(record.key_id, now):
                if store.blocking:
                    await store.run_blocking(self._flush_last_used)
                else:
                    self._flush_last_used()
            return Allowed(entry.client, charge.headers)
        except AuthError as error:
            return self._refuse(error, entry)

    async def _adecide(
        self,
        entry: _CachedKey,
        method: str,
        path: str,
        address: str | None,
        signed: RequestView | None = None,
    ) -> Allowed | Denied:
        plan, cost = self._authorize(entry, method, path, address)
        signatures = self.signatures
        nonce = None
        if signatures is not None and self._must_sign(method, path):
            if self.limiter.carries_nonces(plan):  # remembered with the limits: one round trip
                nonce = signatures.check(*self._signature_target(entry, signed))
            else:
                await signatures.averify(*self._signature_target(entry, signed))
        store = self.store
        record = entry.record
        key_id = record.key_id if record is not None else ""
        took_use = False
        if record is not None and record.remaining_uses is not None:
            try:
                if store.blocking:
                    left = await store.run_blocking(store.take_use, key_id)
                else:
                    left = store.take_use(key_id)
            except StoreUnavailable as exc:
                left = self._use_fallback(exc)
            else:
                took_use = left is not None
            self._note_uses(entry, left)
        limiter = self.limiter
        try:
            if limiter.in_memory:  # never blocks: no coroutine needed
                charge = limiter.charge(plan, entry.client.client_id, cost)
            else:
                charge = await limiter.acharge(plan, entry.client.client_id, cost, nonce)
            if not charge.allowed:
                if took_use:
                    await self._areturn_use(key_id)
                if charge.replayed:
                    raise InvalidSignature(NONCE_REPLAYED)
                return self._rate_limited(charge, entry.client)
        except StorageDown:
            if took_use and not self._allow_on_outage:
                await self._areturn_use(key_id)
            charge = self._limits_down()
        if record is not None and store.mark_used(key_id):
            if store.blocking:
                await store.run_blocking(self._flush_last_used)
            else:
                self._flush_last_used()
        return Allowed(entry.client, charge.headers, cost)

    def _lookup(self, credential: str, key_hash: str, stale: _CachedKey | None) -> _CachedKey:
        tokens = self.tokens
        if tokens is not None and looks_like_jwt(credential):
            verified = tokens.verify(credential)
            key_id = verified.client.key_id
            if key_id is None:  # an identity provider's token
                return self.keys.put_token(key_hash, verified.client, verified.dead_at)
            generation = self.keys.generation
            state = self.keys.state(key_id)
            if state is None or state.fresh_until < monotonic():
                try:
                    record = self.store.find_by_id(key_id)
                except StoreUnavailable as exc:
                    state = self._state_fallback(exc, state)
                else:
                    self._store_ok()
                    state = self.keys.put_state(key_id, record, generation)
            return self._own_token(key_hash, verified, state, generation)
        self._precheck(credential, stale)
        return self._find_key(key_hash, stale)

    def _find_key(
        self, key_hash: str, stale: _CachedKey | None, *, cache: bool = True
    ) -> _CachedKey:
        keys = self.keys
        if key_hash in keys.unknown:  # a guess repeated: the store was asked already
            raise InvalidToken("the API key is not recognised")
        generation = keys.generation
        try:
            record = self.store.find_by_hash(key_hash)
        except StoreUnavailable as exc:
            return self._fallback(exc, stale)
        return self._accept(key_hash, record, stale, generation, cache=cache)

    async def _alookup(
        self, credential: str, key_hash: str, stale: _CachedKey | None
    ) -> _CachedKey:
        tokens = self.tokens
        if tokens is not None and looks_like_jwt(credential):
            verified = await tokens.averify(credential)
            key_id = verified.client.key_id
            if key_id is None:  # an identity provider's token
                return self.keys.put_token(key_hash, verified.client, verified.dead_at)
            generation = self.keys.generation
            state = self.keys.state(key_id)
            if state is None or state.fresh_until < monotonic():
                store = self.store
                try:
                    if store.blocking:
                        record = await store.run_blocking(store.find_by_id, key_id)
                    else:
                        record = store.find_by_id(key_id)
                except StoreUnavailable as exc:
                    state = self._state_fallback(exc, state)
                else:
                    self._store_ok()
                    state = self.keys.put_state(key_id, record, generation)
            return self._own_token(key_hash, verified, state, generation)
        self._precheck(credential, stale)
        keys = self.keys
        if key_hash in keys.unknown:
            raise InvalidToken("the API key is not recognised")
        generation = keys.generation
        store = self.store
        try:
            if store.blocking:
                record = await store.run_blocking(store.find_by_hash, key_hash)
            else:
                record = store.find_by_hash(key_hash)
        except StoreUnavailable as exc:
            return self._fallback(exc, stale)
        return self._accept(key_hash, record, stale, generation)

    # -- steps shared by both -------------------------------------------------

    def _poll_changes(self, clock: float) -> None:
        """Hear, from the store, of keys that other processes revoked or rotated.

        For SQLite that is one ``PRAGMA data_version`` (it moves only when
        another connection committed), plus a read of the new change-log
        rows when it moved: 2.7 us measured, at most once per
        ``change_poll_interval`` (0.1 s). So it runs in place, on the event
        loop too: WAL readers never wait for a writer, and the poll's own
        busy timeout (10 ms) bounds the rare cases that do.

        Per request, all this adds is one float comparison with
        ``_next_poll`` (``monotonic()`` was read anyway). Measured: a cached
        key through ``check`` and ``acheck``, memory and SQLite stores, this
        commit against the one before, interleaved rounds, CPU time: 2.8-3.1 us
        per request both, differences within +-1% (noise); a microbenchmark
        of the comparison alone, about 20 ns.
        """
        self._next_poll = clock + self._poll_interval
        try:
            self.store.poll_changes()
        except StoreUnavailable as exc:
            self._store_failed(exc)

    def _credential(self, authorization: str | None, api_key: str | None) -> str:
        # The two usual cases, one header in its plain form, without the full
        # parse; anything unusual (a comma, both headers, odd spacing, an
        # oversize or empty value) takes the general path below.
        if authorization is None:
            if api_key:
                credential = api_key.strip()
                if credential and "," not in credential and len(credential) <= self._max_length:
                    return credential
        elif api_key is None and authorization.startswith("Bearer ") and "," not in authorization:
            credential = authorization[7:].strip()
            if credential and len(credential) <= self._max_length:
                return credential
        found = extract_credential(
            authorization, api_key, header_name=self.header_name, max_length=self._max_length
        )
        if found is None:
            raise MissingCredentials(
                f"send a credential in the Authorization header (Bearer) or in {self.header_name}"
            )
        return found

    def _precheck(self, credential: str, stale: _CachedKey | None) -> None:
        if not self._api_keys:
            raise InvalidToken("API keys are not accepted here; send a JWT")
        # Only keys that were never verified get here without a cache entry;
        # the checksum turns typos and guesses away before the store sees them.
        if stale is None and not keyformat.is_well_formed(credential):
            raise InvalidToken("the API key is malformed or its checksum does not match")

    def _accept(
        self,
        key_hash: str,
        record: KeyRecord | None,
        stale: _CachedKey | None,
        generation: int,
        *,
        cache: bool = True,
    ) -> _CachedKey:
        self._store_ok()
        if record is None:
            if stale is not None and stale.record is not None:
                self.keys.invalidate(stale.record.key_id)
            else:
                self.keys.put_unknown(key_hash, generation)
            raise InvalidToken("the API key is not recognised")
        if not cache:
            return self.keys.entry(record)
        return self.keys.put(key_hash, record, generation)

    def _own_token(
        self, key_hash: str, verified: VerifiedToken, state: _KeyState, generation: int
    ) -> _CachedKey:
        """A token of our own issuer's, verified: good while its API key is.

        It takes no use of a usage-limited key (the token request took one),
        and it ends when its ``exp`` does or its key does, whichever is first.
        It is taken only from the key's ``allowed_cidrs``, as the key is.
        """
        client = verified.client
        record = state.record
        if record is None or state.dead_at <= time():
            if record is None:
                raise InvalidToken(_key_ended(record))
            raise KeyEnded(_key_ended(record), client)
        if record.client_id != client.client_id:
            raise InvalidToken("the token's client is not the client of its API key")
        dead_at, ended = verified.dead_at, None
        if state.dead_at < dead_at:
            dead_at, ended = state.dead_at, _key_ended(record)
        return self.keys.put_token(
            key_hash,
            client,
            dead_at,
            key_id=record.key_id,
            ended=ended,
            generation=generation,
            fresh_until=state.fresh_until,
            networks=state.networks,  # else a token would carry its key outside them
        )

    def _state_fallback(self, exc: StoreUnavailable, stale: _KeyState | None) -> _KeyState:
        """The store is down: a key whose state was read before may pass, if the policy allows."""
        self._store_failed(exc)
        if stale is not None and self._allow_on_outage:
            return stale
        raise TemporarilyUnavailable("the key store cannot be reached; try again shortly")

    def _fallback(self, exc: StoreUnavailable, stale: _CachedKey | None) -> _CachedKey:
        """The store is down: a key verified before may still pass, if the policy allows."""
        self._store_failed(exc)
        if stale is not None and self._allow_on_outage:
            return stale
        raise TemporarilyUnavailable("the key store cannot be reached; try again shortly")

    def _use_fallback(self, exc: StoreUnavailable) -> int:
        """The store is down while taking a use: -1 (unknown) if the policy allows."""
        self._store_failed(exc)
        if self._allow_on_outage:
            return -1
        raise TemporarilyUnavailable("the key store cannot be reached; try again shortly")

    @staticmethod
    def _note_uses(entry: _CachedKey, left: int | None) -> None:
        """Remember a key that is used up, so the next request is refused from the cache."""
        if entry.record is not None and (left is None or left == 0):
            entry.record = replace(entry.record, remaining_uses=0)
        if left is None:
            raise QuotaExceeded("this key has no uses left")

    def _return_use(self, key_id: str) -> None:
        """Give back a use taken by a request the limits then refused (best effort)."""
        try:
            self.store.return_use(key_id)
        except StoreUnavailable as exc:
            self._store_failed(exc)
        else:
            self.keys.forget(key_id)  # its cached count may say "used up"

    async def _areturn_use(self, key_id: str) -> None:
        if self.store.blocking:
            await self.store.run_blocking(self._return_use, key_id)
        else:
            self._return_use(key_id)

    def _authorize(
        self, entry: _CachedKey, method: str, path: str, address: str | None
    ) -> tuple[LimitPlan, int]:
        """Expiry, networks, scopes and uses left: the plan and cost to charge, or an AuthError."""
        record = entry.record
        if entry.dead_at <= time():
            if record is None:
                if entry.ended is not None:
                    raise KeyEnded(entry.ended)
                raise InvalidToken("the token has expired")
            reason = "was revoked" if record.revoked_at is not None else "has expired"
            raise KeyEnded(f"the API key {reason}")
        networks = entry.networks
        if networks is not None and not address_in(address, networks):
            raise AddressNotAllowed("this key may not be used from this address")
        client = entry.client
        remaining = record.remaining_uses if record is not None else None
        if not self._routes:
            if remaining is not None and remaining <= 0:
                raise QuotaExceeded("this key has no uses left")
            plan = self.limiter.plan(client.tier, ())
            if remaining is None and networks is None and not self._sign_all:
                entry.plan = plan  # opens the fast lane for this key
            return plan, 1
        routes = self._matching_routes(method, path)
        cost = 1
        if routes:
            required: set[str] = set()
            for route in routes:
                required.update(route.scopes)
                cost = max(cost, route.cost)
            if not client.scopes.issuperset(required):
                raise InsufficientScope(
                    f"this route needs the scope(s): {' '.join(sorted(required))}",
                    scopes=tuple(sorted(required)),
                )
        if remaining is not None and remaining <= 0:
            raise QuotaExceeded("this key has no uses left")
        return self.limiter.plan(client.tier, routes), cost

    def _must_sign(self, method: str, path: str) -> bool:
        return self._sign_all or any(route.signed for route in self._matching_routes(method, path))

    @staticmethod
    def _signature_target(
        entry: _CachedKey, view: RequestView | None
    ) -> tuple[RequestView, str, str, str]:
        """(the view, key_id, its public key, the request's @target-uri) for a request that must be
        signed, or InvalidSignature when it cannot be (a token, a key without a public key)."""
        from .signatures import target_uri

        record = entry.record
        if record is None:
            raise InvalidSignature(
                "this request must be signed with an API key's signing key; a token cannot sign it"
            )
        if not record.signing_public_key:
            raise InvalidSignature(
                "this request must be signed, and this API key has no signing_public_key"
            )
        if view is None:
            raise InvalidSignature(
                "the request was checked without its RequestView, so its signature cannot be"
            )
        uri = target_uri(view, path=view.raw_path)
        return view, record.key_id, record.signing_public_key, uri

    def _matching_routes(self, method: str, path: str) -> tuple[Route, ...]:
        if not self._routes:
            return ()
        key = (method, path)
        found = self._route_cache.get(key)
        if found is None:
            found = tuple(r for r in self._routes if r.matches(method, path))
            if len(self._route_cache) >= _ROUTE_CACHE_SIZE:
                self._route_cache.clear()
            self._route_cache[key] = found
        return found

    def _flush_last_used(self) -> None:
        try:
            self.store.flush_last_used()
        except StoreUnavailable as exc:
            self._store_failed(exc)  # bookkeeping only: never fails the request

    def _limits_down(self) -> Charge:
        if self._allow_on_outage:
            return Charge(True, [])
        raise TemporarilyUnavailable("the rate-limit storage cannot be reached; try again shortly")

    def _rate_limited(self, charge: Charge, client: Client) -> Denied:
        return deny(
            RateLimited(f"rate limit exceeded; retry in {charge.retry_after} second(s)"),
            self.realm,
            charge.headers,
            client,
        )

    def _refuse(self, error: AuthError, entry: _CachedKey | None) -> Denied:
        """The answer to an AuthError: naming the client when its credential held
        (scopes, limits, uses, addresses), and, for telemetry only, the known
        client of a credential that did not (a revoked or expired key)."""
        if isinstance(error, KeyEnded):
            tried = error.client or (entry.client if entry is not None else None)
            return replace(self._deny(error), tried=tried, key_ended=True)
        if entry is None:
            return self._deny(error)
        if error.status != 401:
            return self._deny(error, entry.client)
        return replace(self._deny(error), tried=entry.client)

    def _deny(self, error: AuthError, client: Client | None = None) -> Denied:
        extra = None
        if isinstance(error, TemporarilyUnavailable):
            extra = [("Retry-After", str(OUTAGE_RETRY_AFTER))]
        return deny(error, self.realm, extra, client)

    # -- outage bookkeeping: logged once per outage, not per request ---------

    def _store_failed(self, exc: Exception) -> None:
        if not self._store_down:
            self._store_down = True
            logger.error("key store unreachable: %s", redact(str(exc)))

    def _store_ok(self) -> None:
        if self._store_down:
            self._store_down = False
            logger.warning("key store reachable again")

    def close(self) -> None:
        if self.telemetry is not None:
            self.telemetry.close()  # writes the last counts while the store is open
        self.store.close()


def _counts_as_failure(outcome: Allowed | Denied) -> bool:
    """Whether ``source_limits`` counts this answer: a 401 for a credential (or signature)
    that did not hold. A request with no credential at all is not counted: it tried
    nothing, and a browser or a health check sends many such."""
    return (
        isinstance(outcome, Denied)
        and outcome.status == 401
        and outcome.error != "missing_credentials"
    )
