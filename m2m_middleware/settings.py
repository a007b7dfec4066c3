"""One frozen, validated settings object; each framework only spells it differently."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from limits import RateLimitItem, parse_many

from .errors import ConfigError
from .extras import require_extra, require_jose
from .keys import validate_prefix
from .redaction import redact_url
from .stores.base import KeyStore
from .syntax import (
    CONTROL_CHARACTERS,
    check_realm,
    check_scope,
    check_tier,
    exact_glob_pattern,
    glob_pattern,
    slashed,
)
from .transport import PROXY_HEADER_CHOICES, Network, parse_networks

#: Who may read ``metrics_path`` unless told otherwise: loopback and the private
#: ranges a Prometheus server scrapes from (RFC 1918, RFC 4193), never the internet.
METRICS_NETWORKS = (
    "127.0.0.0/8",
    "::1/128",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "fc00::/7",
)

SCHEMES = ("api_key", "jwt")
#: Ten years: browsers cap max-age lower anyway; anything longer is a typo.
HSTS_MAX = 10 * 365 * 86400
#: What the token service signs with (CONTRACT.md "Token service"); ES256 first: the default.
SIGNING_ALGORITHMS = ("ES256", "EdDSA", "RS256")
STRATEGIES = ("fixed-window", "moving-window", "sliding-window-counter")
#: limits storage schemes served by redis-py, on which our Lua scripts charge every
#: strategy all-or-nothing in one round trip (m2m_middleware.limiting).
REDIS_SCHEMES = frozenset({"redis", "rediss", "redis+unix", "redis+sentinel", "redis+cluster"})
FAILURE_POLICIES = ("allow", "deny")
SYNC_MODES = ("exact", "batched")
#: The alert rules with a threshold in limits notation: setting ``alert_<rule>``
#: (m2m_middleware.telemetry.alerts; the traffic-spike rule has settings of its own).
ALERT_RULES = ("auth_failures", "client_failures", "rate_limited", "ended_keys")
_HEADER_RE = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)
ROUTE_FIELDS = ("path", "methods", "scopes", "limits", "cost", "signed")
#: Key-store URL schemes served by an extra: the extra, and what to call the store.
_KEY_STORE_EXTRAS = {
    "postgresql": ("postgres", "a postgresql:// key_store"),
    "postgres": ("postgres", "a postgresql:// key_store"),
    "django": ("django", "a django:// key_store"),
}


def unknown_name_error(field: str, name: object, known: Iterable[str], kind: str) -> ConfigError:
    """``field: unknown <kind>; did you mean `<closest>`?``, or the known names when none is close.

    ``field`` is where the name stands (the name itself for a setting,
    ``routes[0].scope`` for a route rule's). The closest known name is
    difflib's choice, on the lower-case name (settings are matched in lower
    case), cut to 64 characters first: matching costs the product of the
    lengths, and nothing longer is a typo of a field name.
    """
    text = str(name)
    close = difflib.get_close_matches(text[:64].lower(), list(known), n=1, cutoff=0.6)
    if close:
        problem = f"unknown {kind}; did you mean `{close[0]}`?"
    else:
        problem = f"unknown {kind}; the known ones are {', '.join(sorted(known))}"
    return ConfigError(field, problem, suggestion=close[0] if close else None)


def shown_name(name: object) -> str:
    """A name as written, fit for one line of a message: escaped and cut when it is odd."""
    text = str(name)
    if text.isprintable() and len(text) <= 64:
        return text
    return ascii(text[:64]) + ("..." if len(text) > 64 else "")


def parse_limits(field_name: str, value: object) -> tuple[RateLimitItem, ...]:
    """``"100/second;10000/day"`` (or a list of such strings) -> limit items."""
    if value is None or value == "" or value == () or value == []:
        return ()
    if isinstance(value, str):
        text = value
    elif isinstance(value, Iterable) and all(isinstance(v, str) for v in value):
        text = ";".join(value)
    else:
        raise ConfigError(field_name, f"expected a limits string like '100/second', got {value!r}")
    try:
        return tuple(parse_many(text))
    except ValueError as exc:
        raise ConfigError(
            field_name, f"{text!r} is not in limits notation (e.g. '100/second;10000/day'): {exc}"
        ) from None


def _string_tuple(field_name: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Iterable) and not isinstance(value, Mapping):
        items = tuple(value)
        if all(isinstance(v, str) and v for v in items):
            return items
    raise ConfigError(field_name, f"expected a string or a list of strings, got {value!r}")


def _check_glob(field_name: str, glob: str) -> None:
    if not glob.startswith("/"):
        raise ConfigError(field_name, f"{glob!r} must start with '/'")
    if CONTROL_CHARACTERS.search(glob):
        # Such paths are refused with 400 before any rule is looked at.
        raise ConfigError(field_name, f"{glob!r} holds a control character; no path can match it")


def _scopes(field_name: str, value: object) -> frozenset[str]:
    try:
        return frozenset(check_scope(s) for s in _string_tuple(field_name, value))
    except ValueError as exc:
        raise ConfigError(field_name, str(exc)) from None


@dataclass(frozen=True, slots=True)
class Route:
    """A per-route rule: scopes all required, extra limits, and a cost."""

    path: str
    methods: frozenset[str] | None = None
    scopes: frozenset[str] = frozenset()
    limits: tuple[RateLimitItem, ...] = ()
    cost: int = 1
    #: Whether requests on this route need an RFC 9421 signature (m2m_middleware.signatures).
    signed: bool = False
    index: int = 0
    pattern: re.Pattern[str] = field(default=re.compile(""), repr=False, compare=False)

    @classmethod
    def from_mapping(cls, index: int, value: object) -> Route:
        name = f"routes[{index}]"
        if not isinstance(value, Mapping):
            raise ConfigError(name, f"expected a mapping with 'path', got {value!r}")
        for key in value:
            if key not in ROUTE_FIELDS:
                raise unknown_name_error(
                    f"{name}.{shown_name(key)}", key, ROUTE_FIELDS, "route field"
                )
        path = value.get("path")
        if not isinstance(path, str) or not path.startswith("/"):
            raise ConfigError(
                f"{name}.path", f"expected a path glob starting with '/', got {path!r}"
            )
        _check_glob(f"{name}.path", path)
        methods = None
        if value.get("methods") is not None:
            methods = frozenset(
                m.upper() for m in _string_tuple(f"{name}.methods", value["methods"])
            )
            bad = methods - _METHODS
            if bad:
                raise ConfigError(f"{name}.methods", f"unknown HTTP method {sorted(bad)[0]!r}")
        scopes = _scopes(f"{name}.scopes", value.get("scopes", ()))
        cost = value.get("cost", 1)
        if isinstance(cost, bool) or not isinstance(cost, int) or cost < 1:
            raise ConfigError(f"{name}.cost", f"expected a positive integer, got {cost!r}")
        signed = value.get("signed", False)
        if not isinstance(signed, bool):
            raise ConfigError(f"{name}.signed", f"expected True or False, got {signed!r}")
        if signed:
            require_extra(f"{name}.signed", "a signed route", "signatures")
        return cls(
            path=path,
            methods=methods,
            scopes=scopes,
            limits=parse_limits(f"{name}.limits", value.get("limits")),
            cost=cost,
            signed=signed,
            index=index,
            pattern=glob_pattern([path]),
        )

    def matches(self, method: str, path: str) -> bool:
        """Whether this rule applies, as the framework would route the request.

        The method in any case (``post`` reaches a POST view in Django and in
        WSGI apps), and the path with or without one trailing slash (see
        :func:`~m2m_middleware.syntax.glob_pattern`). The engine caches the
        answer per method and path, so none of this is paid per request.
        """
        method = method.upper()
        methods = self.methods
        # Every framework answers HEAD with the GET view, so a rule that
        # guards GET guards HEAD too, or HEAD would slip past it.
        if (
            methods is not None
            and method not in methods
            and (method != "HEAD" or "GET" not in methods)
        ):
            return False
        return self.pattern.match(slashed(path)) is not None


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Validated configuration. Invalid values raise :class:`ConfigError` naming the field.

    Fields that hold several values take any sequence (a list, as people write
    them, or a tuple) and hold a tuple once validated.

    Fields are keyword arguments only. An unknown one is a :class:`ConfigError`
    naming it and the closest known field (``did you mean `default_limits`?``),
    here as in :meth:`from_mapping`; see :func:`_checked_keywords`.
    """

    schemes: Sequence[str] = ("api_key",)
    key_store: str | KeyStore = "sqlite:///m2m_keys.db"
    api_key_header: str = "X-API-Key"
    key_prefix: str = "m2m"
    jwt_issuer: str | None = None
    jwt_audience: str | Sequence[str] | None = None
    jwt_algorithms: Sequence[str] | None = None
    jwt_keys: Any = field(default=None, repr=False)  # may hold an HMAC secret
    jwt_jwks_url: str | None = None
    jwt_leeway: float = 0.0
    jwt_typ: str | None = None
    jwt_client_id_claims: Sequence[str] = ("client_id", "sub")
    jwt_tier_claim: str | None = None
    jwt_jwks_timeout: float = 3.0
    jwt_jwks_refetch_interval: float = 30.0
    default_limits: Any = ()
    tiers: Mapping[str, Any] = field(default_factory=dict)
    rate_limit_storage: str = "memory://"
    rate_limit_strategy: str = "fixed-window"
    rate_limit_headers: bool = True
    # Batched counting in Redis (m2m_middleware.limiting: leases); "exact" by default.
    rate_limit_sync: str = "exact"
    rate_limit_lease: float = 0.1
    rate_limit_lease_idle: float = 1.0
    public_paths: Sequence[str] = ()
    on_storage_error: str = "deny"
    storage_timeout: float = 1.0
    storage_poll: float = 0.0002
    invalidation_url: str | None = None
    key_cache_ttl: float = 30.0
    key_cache_size: int = 10_000
    routes: Sequence[Mapping[str, Any]] = ()
    realm: str = "api"
    max_credential_length: int = 4096
    # The token service's signing keys (m2m_middleware.issuer). Only validated
    # here; nothing reads them unless an issuer is asked for, so the API-key
    # path pays nothing for them.
    signing_algorithm: str = "ES256"
    signing_key_secret: str | None = field(default=None, repr=False)  # never shown
    token_ttl: int = 300
    # The token service (CONTRACT.md "Token service"): off unless token_endpoint is set.
    token_endpoint: str | None = None
    token_issuer: str | None = None
    token_audience: str | None = None  # default: token_issuer
    token_limits: Any = "30/minute"  # noqa: S105 (a limit, not a password)
    jwks_max_age: int = 300
    # Transport (CONTRACT.md "Transport and request security"); all off by default.
    trusted_proxies: Sequence[str] = ()
    proxy_headers: str = "auto"
    require_https: bool = False
    hsts_seconds: int = 0
    # Request signatures (RFC 9421; m2m_middleware.signatures), on the routes
    # marked "signed" or, with require_signatures, everywhere.
    require_signatures: bool = False
    signature_max_age: int = 300
    max_body_size: int = 1024 * 1024
    # Failed authentications per source address (m2m_middleware.source_limits).
    source_limits: Any = ()
    # Knowing what clients do (CONTRACT.md "Usage", "Metrics and alerts";
    # m2m_middleware.telemetry): usage and alerts on, metrics off by default.
    usage: bool = True
    usage_flush_interval: float = 10.0
    usage_retention_days: int = 90
    metrics_path: str | None = None
    metrics_client_labels: bool = False
    metrics_client_label_limit: int = 100
    metrics_allowed_networks: Sequence[str] = METRICS_NETWORKS
    alerts: bool = True
    on_alert: Any = ()  # a callable or a list of callables, each given an Alert
    alert_auth_failures: Any = "20/minute"
    alert_client_failures: Any = "20/minute"
    alert_rate_limited: Any = "50/minute"
    alert_ended_keys: Any = "1/hour"
    alert_traffic_spike: float = 10.0
    alert_traffic_window: int = 60
    alert_traffic_minimum: int = 100

    # -- derived, filled in by __post_init__ --------------------------------
    default_limit_items: tuple[RateLimitItem, ...] = field(init=False, repr=False, compare=False)
    tier_limit_items: Mapping[str, tuple[RateLimitItem, ...]] = field(
        init=False, repr=False, compare=False
    )
    route_rules: tuple[Route, ...] = field(init=False, repr=False, compare=False)
    public_path_pattern: re.Pattern[str] | None = field(init=False, repr=False, compare=False)
    jwt_key_ring: Any = field(init=False, repr=False, compare=False)
    token_limit_items: tuple[RateLimitItem, ...] = field(init=False, repr=False, compare=False)
    trusted_networks: tuple[Network, ...] = field(init=False, repr=False, compare=False)
    source_limit_items: tuple[RateLimitItem, ...] = field(init=False, repr=False, compare=False)
    #: ``on_alert`` as a tuple of callables.
    alert_callbacks: tuple[Callable[..., object], ...] = field(
        init=False, repr=False, compare=False
    )
    #: Each ``alert_*`` threshold as (count, window seconds), or None when that rule is off.
    alert_thresholds: Mapping[str, tuple[int, int] | None] = field(
        init=False, repr=False, compare=False
    )
    #: Whether any request may need a signature: require_signatures, or a signed route.
    signatures_needed: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        schemes = _string_tuple("schemes", self.schemes)
        for scheme in schemes:
            if scheme not in SCHEMES:
                raise ConfigError("schemes", f"unknown scheme {scheme!r}; choose from {SCHEMES}")
        set_(self, "schemes", tuple(dict.fromkeys(schemes)))
        if not isinstance(self.key_store, (str, KeyStore)):
            raise ConfigError("key_store", f"expected a URL or a KeyStore, got {self.key_store!r}")
        if isinstance(self.key_store, str):
            store_extra = _KEY_STORE_EXTRAS.get(self.key_store.partition("://")[0].lower())
            if store_extra is not None and "://" in self.key_store:
                require_extra("key_store", store_extra[1], store_extra[0])
        if not isinstance(self.api_key_header, str) or not _HEADER_RE.fullmatch(
            self.api_key_header
        ):
            raise ConfigError("api_key_header", f"not a valid header name: {self.api_key_header!r}")
        if self.api_key_header.lower() == "authorization":
            raise ConfigError(
                "api_key_header", "Authorization is always read; choose another header"
            )
        try:
            validate_prefix(self.key_prefix)
        except (TypeError, ValueError) as exc:
            raise ConfigError("key_prefix", str(exc)) from None
        self._validate_token_service()
        self._validate_jwt()
        set_(self, "default_limit_items", parse_limits("default_limits", self.default_limits))
        if not isinstance(self.tiers, Mapping):
            raise ConfigError(
                "tiers", f"expected a mapping of tier name to limits, got {self.tiers!r}"
            )
        for tier in self.tiers:
            try:
                check_tier(str(tier))
            except ValueError as exc:
                raise ConfigError("tiers", str(exc)) from None
        set_(
            self,
            "tier_limit_items",
            {str(n): parse_limits(f"tiers.{n}", v) for n, v in self.tiers.items()},
        )
        if not isinstance(self.rate_limit_storage, str) or "://" not in self.rate_limit_storage:
            shown = self.rate_limit_storage
            if isinstance(shown, str):
                shown = redact_url(shown)
            raise ConfigError(
                "rate_limit_storage",
                f"expected a limits storage URI like 'memory://', got {shown!r}",
            )
        if self.rate_limit_strategy not in STRATEGIES:
            raise ConfigError(
                "rate_limit_strategy", f"{self.rate_limit_strategy!r}; choose from {STRATEGIES}"
            )
        scheme = self.rate_limit_storage.partition("://")[0].lower()
        if scheme in REDIS_SCHEMES:
            require_extra("rate_limit_storage", f"a {scheme}:// rate_limit_storage", "redis")
        if self.rate_limit_strategy != "fixed-window" and scheme not in {"memory", *REDIS_SCHEMES}:
            # Only a scheme is shown: the URI may hold a password.
            raise ConfigError(
                "rate_limit_strategy",
                f"{self.rate_limit_strategy!r} cannot be charged all-or-nothing on a "
                f"{scheme}:// storage: limits tests and charges each limit of a request "
                "separately there, so concurrent requests would be charged more than they "
                "are admitted; use 'fixed-window' there (charged all-or-nothing by increment "
                "and roll-back), or a memory:// or redis:// storage",
            )
        self._validate_rate_limit_sync(scheme)
        if not isinstance(self.rate_limit_headers, bool):
            raise ConfigError("rate_limit_headers", "expected true or false")
        public = _string_tuple("public_paths", self.public_paths) if self.public_paths else ()
        for pattern in public:
            _check_glob("public_paths", pattern)
        set_(self, "public_paths", public)
        # Exactly as written, unlike route rules: a public path opens a path,
        # so it never opens more than its glob says (see the README).
        set_(self, "public_path_pattern", exact_glob_pattern(public) if public else None)
        if self.on_storage_error not in FAILURE_POLICIES:
            raise ConfigError(
                "on_storage_error", f"{self.on_storage_error!r}; choose 'allow' or 'deny'"
            )
        _number("storage_timeout", self.storage_timeout, minimum=0.05, maximum=60)
        _number("storage_poll", self.storage_poll, minimum=0, maximum=0.01)
        url = self.invalidation_url
        if url not in (None, "") and not (
            isinstance(url, str) and url.startswith(INVALIDATION_SCHEMES)
        ):
            shown = url.partition("://")[0] if isinstance(url, str) else url  # never a password
            raise ConfigError(
                "invalidation_url",
                f"expected a redis:// (or rediss://, redis+unix://) URL, or '' for none, "
                f"got {shown!r}",
            )
        if url:
            require_extra("invalidation_url", "a key-invalidation bus", "redis")
        _number("key_cache_ttl", self.key_cache_ttl, minimum=0, maximum=86400)
        if self.signing_algorithm not in SIGNING_ALGORITHMS:
            raise ConfigError(
                "signing_algorithm",
                f"expected one of {', '.join(SIGNING_ALGORITHMS)}, got "
                f"{str(self.signing_algorithm)[:40]!r}",
            )
        if self.signing_key_secret is not None and not isinstance(self.signing_key_secret, str):
            # The value itself is never quoted: it is a secret, whatever its type.
            raise ConfigError(
                "signing_key_secret",
                f"expected a text, got {type(self.signing_key_secret).__name__}",
            )
        _number("token_ttl", self.token_ttl, minimum=1, maximum=86400, integer=True)
        _number("key_cache_size", self.key_cache_size, minimum=0, maximum=10_000_000, integer=True)
        routes = self.routes
        if isinstance(routes, Mapping) or not isinstance(routes, Iterable):
            raise ConfigError("routes", "expected a list of route mappings")
        set_(self, "routes", tuple(routes))
        set_(self, "route_rules", tuple(Route.from_mapping(i, r) for i, r in enumerate(routes)))
        self._validate_signatures()
        set_(self, "source_limit_items", parse_limits("source_limits", self.source_limits))
        try:
            check_realm(self.realm)
        except ValueError as exc:
            raise ConfigError("realm", str(exc)) from None
        self._validate_transport()
        self._validate_telemetry()
        _number(
            "max_credential_length",
            self.max_credential_length,
            minimum=64,
            maximum=1_000_000,
            integer=True,
        )

    def _validate_rate_limit_sync(self, scheme: str) -> None:
        """``rate_limit_sync`` and its lease: see :class:`m2m_middleware.limiting.Leases`."""
        if self.rate_limit_sync not in SYNC_MODES:
            raise ConfigError(
                "rate_limit_sync", f"{self.rate_limit_sync!r}; choose 'exact' or 'batched'"
            )
        lease = self.rate_limit_lease
        if isinstance(lease, bool) or not isinstance(lease, (int, float)) or lease != lease:
            raise ConfigError(
                "rate_limit_lease",
                f"expected a fraction of each limit (0 < f < 1) or a whole number of "
                f"requests (>= 1), got {lease!r}",
            )
        if isinstance(lease, float) and lease >= 1 and not lease.is_integer():
            raise ConfigError(
                "rate_limit_lease",
                f"{lease!r}: a fraction is below 1, a count is a whole number",
            )
        if not 0 < lease <= 1_000_000:
            raise ConfigError("rate_limit_lease", f"{lease!r} is outside 0 (excluded)..1000000")
        _number("rate_limit_lease_idle", self.rate_limit_lease_idle, minimum=0.01, maximum=3600)
        if self.rate_limit_sync == "exact" or scheme == "memory":
            # memory:// counts in this process already: exact, and without a round trip
            # to save, so "batched" there is accepted and means nothing (one setting
            # can serve development on memory:// and production on Redis).
            return
        if scheme not in REDIS_SCHEMES:
            raise ConfigError(
                "rate_limit_sync",
                f"'batched' leases budgets from Redis; a {scheme}:// storage counts "
                "exactly only ('exact')",
            )
        if self.rate_limit_strategy != "fixed-window":
            raise ConfigError(
                "rate_limit_sync",
                f"'batched' takes rate_limit_strategy 'fixed-window' only, not "
                f"{self.rate_limit_strategy!r}: a lease is a share of one window, and a "
                "moving or sliding window has no window a share could be taken from and "
                "returned to without overshooting by an amount no one could state",
            )

    def _validate_signatures(self) -> None:
        if not isinstance(self.require_signatures, bool):
            raise ConfigError(
                "require_signatures", f"expected True or False, got {self.require_signatures!r}"
            )
        # Below 10 s a client whose clock is a few seconds off fails every request;
        # above a day, the nonce memory grows with a day of signed traffic.
        _number(
            "signature_max_age", self.signature_max_age, minimum=10, maximum=86400, integer=True
        )
        _number("max_body_size", self.max_body_size, minimum=0, maximum=1 << 30, integer=True)
        needed = self.require_signatures or any(r.signed for r in self.route_rules)
        object.__setattr__(self, "signatures_needed", needed)
        if self.require_signatures:
            require_extra("require_signatures", "request signatures", "signatures")

    def _validate_token_service(self) -> None:
        set_ = object.__setattr__
        endpoint = self.token_endpoint
        set_(self, "token_limit_items", parse_limits("token_limits", self.token_limits))
        _number("jwks_max_age", self.jwks_max_age, minimum=30, maximum=86400, integer=True)
        if endpoint is None:
            return
        if (
            not isinstance(endpoint, str)
            or not endpoint.startswith("/")
            or not endpoint.isprintable()
            or any(c in endpoint for c in "*?[]#% ")
            or endpoint.startswith("/.well-known/")
        ):
            raise ConfigError(
                "token_endpoint",
                f"expected a plain path such as '/oauth/token', got {str(endpoint)[:60]!r}",
            )
        for name in ("token_issuer", "token_audience"):
            value = getattr(self, name)
            if value is None:
                continue
            parts = urlsplit(value) if isinstance(value, str) else None
            if (
                parts is None
                or parts.scheme not in ("https", "http")
                or not parts.netloc
                or parts.query
                or parts.fragment
                or not value.isprintable()
            ):
                raise ConfigError(
                    name,
                    "expected an absolute https URL without query or fragment (RFC 8414 "
                    f"section 2), e.g. 'https://api.example.com', got {str(value)[:60]!r}",
                )
        if self.token_issuer is None:
            raise ConfigError(
                "token_issuer",
                "the token service needs the issuer (iss) its tokens carry, e.g. "
                "'https://api.example.com'",
            )
        if self.token_audience is None:
            set_(self, "token_audience", self.token_issuer)
        if not self.token_limit_items:
            raise ConfigError(
                "token_limits",
                "the token endpoint needs a limit per client, e.g. '30/minute', so that "
                "it cannot be used to mint tokens in bulk",
            )
        require_extra("token_endpoint", "the token service", "issuer")

    def _validate_jwt(self) -> None:
        set_ = object.__setattr__
        for name in ("jwt_issuer", "jwt_typ", "jwt_tier_claim"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(name, f"expected a non-empty string, got {value!r}")
        if self.jwt_audience is not None:
            set_(self, "jwt_audience", _string_tuple("jwt_audience", self.jwt_audience))
        set_(
            self,
            "jwt_client_id_claims",
            _string_tuple("jwt_client_id_claims", self.jwt_client_id_claims),
        )
        if not self.jwt_client_id_claims:
            raise ConfigError("jwt_client_id_claims", "name at least one claim, e.g. 'sub'")
        _number("jwt_leeway", self.jwt_leeway, minimum=0, maximum=600)
        _number("jwt_jwks_timeout", self.jwt_jwks_timeout, minimum=0.1, maximum=60)
        _number(
            "jwt_jwks_refetch_interval", self.jwt_jwks_refetch_interval, minimum=0, maximum=86400
        )
        url = self.jwt_jwks_url
        if url is not None:
            _check_jwks_url(url)
        wanted = "jwt" in self.schemes
        if self.jwt_algorithms is not None:
            algorithms = _string_tuple("jwt_algorithms", self.jwt_algorithms)
            if any(a.lower() == "none" for a in algorithms):
                raise ConfigError("jwt_algorithms", "'none' is never accepted")
            if not algorithms:
                raise ConfigError("jwt_algorithms", "name at least one algorithm, e.g. 'ES256'")
            set_(self, "jwt_algorithms", algorithms)
        ring = None
        if not wanted and self.jwt_keys is None:
            set_(self, "jwt_key_ring", None)
            return
        require_jose("schemes" if wanted else "jwt_keys")
        from .jwtkeys import (
            DEFAULT_ALGORITHMS,
            SUPPORTED_ALGORITHMS,
            load_keys,
        )  # joserfc loads only for JWT

        if self.jwt_algorithms is not None:
            for alg in self.jwt_algorithms:
                if alg not in SUPPORTED_ALGORITHMS:
                    raise ConfigError(
                        "jwt_algorithms",
                        f"unknown algorithm {alg!r}; choose from {', '.join(SUPPORTED_ALGORITHMS)}",
                    )
        if self.jwt_keys is not None:
            ring = load_keys(self.jwt_keys)
        set_(self, "jwt_key_ring", ring)
        if not wanted:
            return
        own = self.token_endpoint is not None  # our own tokens need no keys here
        if ring is None and url is None and not own:
            raise ConfigError(
                "jwt_keys", "to accept JWTs, set jwt_keys (keys or a secret) or jwt_jwks_url"
            )
        if self.jwt_algorithms is None:
            # The algorithms the keys can verify: an HMAC secret gives HS*, an
            # RSA key RS*/PS*, and so on; a JWKS URL brings asymmetric keys only.
            fitting = [
                alg
                for alg in DEFAULT_ALGORITHMS
                if (ring is not None and ring.fits_any([alg]))
                or (url is not None and not alg.startswith("HS"))
            ]
            if not fitting and not own:
                raise ConfigError("jwt_keys", "none of these keys can verify any JWS algorithm")
            set_(self, "jwt_algorithms", tuple(fitting))
        elif (
            url is None and ring is not None and not own and not ring.fits_any(self.jwt_algorithms)
        ):
            raise ConfigError(
                "jwt_algorithms",
                f"none of {', '.join(self.jwt_algorithms)} can be verified with the "
                "keys in jwt_keys (an HMAC secret needs HS256, an RSA key RS256 or PS256, "
                "an EC P-256 key ES256, an Ed25519 key EdDSA)",
            )

    def _validate_transport(self) -> None:
        set_ = object.__setattr__
        proxies = self.trusted_proxies
        if isinstance(proxies, str):
            proxies = [p for p in re.split(r"[\s,]+", proxies) if p]  # "10.0.0.0/8, ::1"
        if not isinstance(proxies, Iterable):
            raise ConfigError("trusted_proxies", f"expected a list of CIDRs, got {proxies!r}")
        try:
            networks = parse_networks(proxies)
        except ValueError as exc:
            raise ConfigError("trusted_proxies", str(exc)) from None
        set_(self, "trusted_proxies", tuple(str(n) for n in networks))
        set_(self, "trusted_networks", networks)
        if self.proxy_headers not in PROXY_HEADER_CHOICES:
            raise ConfigError(
                "proxy_headers",
                f"{str(self.proxy_headers)[:40]!r}; choose from {', '.join(PROXY_HEADER_CHOICES)}",
            )
        if not isinstance(self.require_https, bool):
            raise ConfigError("require_https", "expected true or false")
        _number("hsts_seconds", self.hsts_seconds, minimum=0, maximum=HSTS_MAX, integer=True)

    def _validate_telemetry(self) -> None:
        set_ = object.__setattr__
        for name in ("usage", "alerts", "metrics_client_labels"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"expected True or False, got {getattr(self, name)!r}")
        # Below a second the flushes are database writes per request under load;
        # above an hour a crash loses more than an hour of billing.
        _number("usage_flush_interval", self.usage_flush_interval, minimum=1, maximum=3600)
        _number(
            "usage_retention_days",
            self.usage_retention_days,
            minimum=1,
            maximum=36500,
            integer=True,
        )
        path = self.metrics_path
        if path is not None:
            if not isinstance(path, str) or not path.startswith("/"):
                raise ConfigError("metrics_path", f"expected a path like '/metrics', got {path!r}")
            if CONTROL_CHARACTERS.search(path) or not path.isprintable() or "*" in path:
                raise ConfigError("metrics_path", f"{shown_name(path)} is not a plain path")
            if path in (
                self.token_endpoint,
                "/.well-known/jwks.json",
                "/.well-known/oauth-authorization-server",
            ):
                raise ConfigError("metrics_path", f"{path!r} is already answered by the issuer")
            require_extra("metrics_path", "serving metrics", "metrics")
        _number(
            "metrics_client_label_limit",
            self.metrics_client_label_limit,
            minimum=1,
            maximum=100_000,
            integer=True,
        )
        allowed = self.metrics_allowed_networks
        if isinstance(allowed, str):
            allowed = [n for n in re.split(r"[\s,]+", allowed) if n]  # "10.0.0.0/8, ::1"
        if not isinstance(allowed, Iterable):
            raise ConfigError(
                "metrics_allowed_networks", f"expected a list of CIDRs, got {shown_name(allowed)}"
            )
        try:
            networks = parse_networks(allowed)
        except ValueError as exc:
            raise ConfigError("metrics_allowed_networks", str(exc)) from None
        set_(self, "metrics_allowed_networks", tuple(str(n) for n in networks))
        callbacks = self.on_alert
        if callable(callbacks):
            callbacks = (callbacks,)
        if isinstance(callbacks, (str, bytes, Mapping)) or not isinstance(callbacks, Iterable):
            raise ConfigError(
                "on_alert",
                f"expected a callable or a list of callables, got {shown_name(callbacks)}",
            )
        callbacks = tuple(callbacks)
        for item in callbacks:
            if not callable(item):
                raise ConfigError("on_alert", f"{shown_name(item)} is not callable")
        set_(self, "alert_callbacks", callbacks)
        thresholds: dict[str, tuple[int, int] | None] = {}
        for rule in ALERT_RULES:
            name = f"alert_{rule}"
            items = parse_limits(name, getattr(self, name))
            if len(items) > 1:
                raise ConfigError(name, "expected one threshold, like '20/minute', or '' for off")
            thresholds[rule] = (items[0].amount, items[0].get_expiry()) if items else None
        set_(self, "alert_thresholds", thresholds)
        _number("alert_traffic_spike", self.alert_traffic_spike, minimum=0, maximum=1e6)
        if 0 < self.alert_traffic_spike <= 1:
            raise ConfigError(
                "alert_traffic_spike",
                "a multiple of the client's own baseline above 1 (e.g. 10), or 0 for off",
            )
        _number(
            "alert_traffic_window",
            self.alert_traffic_window,
            minimum=1,
            maximum=86400,
            integer=True,
        )
        _number(
            "alert_traffic_minimum",
            self.alert_traffic_minimum,
            minimum=1,
            maximum=1_000_000_000,
            integer=True,
        )

    @property
    def needs_request_view(self) -> bool:
        """True when a check reads more of a request than its credential headers."""
        return bool(self.trusted_networks) or self.require_https or self.hsts_seconds > 0

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> Settings:
        """Build from Flask config or Django settings: the same field names, in lower case."""
        if mapping is None:
            return cls()
        if isinstance(mapping, Settings):
            return mapping
        if not isinstance(mapping, Mapping):
            raise ConfigError(
                "M2M_AUTH", f"expected a mapping of settings, got {type(mapping).__name__}"
            )
        values: dict[str, Any] = {}
        for name, value in mapping.items():
            field_name = str(name).lower()
            if field_name not in SETTING_FIELDS:
                raise unknown_name_error(shown_name(name), name, SETTING_FIELDS, "setting")
            values[field_name] = value
        return cls(**values)

    def __repr__(self) -> str:
        # The generated repr would show the URL fields as given, passwords and
        # all, in every log line or traceback that prints the settings.
        shown = []
        for item in dataclasses.fields(self):
            if item.repr:
                value = getattr(self, item.name)
                if item.name in _URL_FIELDS and isinstance(value, str):
                    value = redact_url(value)
                shown.append(f"{item.name}={value!r}")
        return f"Settings({', '.join(shown)})"

    def replace(self, **changes: Any) -> Settings:
        current = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        return Settings(**{**current, **changes})


#: The fields ``Settings(...)`` and ``Settings.from_mapping`` take.
SETTING_FIELDS = tuple(f.name for f in dataclasses.fields(Settings) if f.init)


def _checked_keywords(generated: Callable[..., None]) -> Callable[..., None]:
    """The dataclass's ``__init__``, behind a check of what it was given.

    The generated ``__init__`` answers an unknown field or a positional
    argument with a ``TypeError`` that says neither which fields exist nor
    which one was meant; this answers with a :class:`ConfigError` that does.
    Type checkers still see the generated signature (the dataclass), so a
    typo is caught by mypy before it runs, too.
    """

    @functools.wraps(generated)
    def __init__(self: Settings, *args: Any, **fields: Any) -> None:
        if args:
            raise ConfigError(
                "Settings",
                f"takes keyword arguments only, got {len(args)} positional argument(s): "
                "write Settings(default_limits=...), or Settings.from_mapping({...}) "
                "for a mapping",
            )
        for name in fields:
            if name not in SETTING_FIELDS:
                raise unknown_name_error(shown_name(name), name, SETTING_FIELDS, "setting")
        generated(self, **fields)

    return __init__


# Not `Settings.__init__ = ...`: mypy would (rightly) refuse assigning to a method.
setattr(Settings, "__init__", _checked_keywords(Settings.__init__))  # noqa: B010

#: Fields that hold a URL (or a DSN), and so possibly a password or a token.
_URL_FIELDS = frozenset({"key_store", "rate_limit_storage", "invalidation_url", "jwt_jwks_url"})

#: URLs a key-invalidation bus can use: Redis pub/sub on one server.
INVALIDATION_SCHEMES = ("redis://", "rediss://", "redis+unix://", "unix://")
#: Redis limit storages whose URL the bus cannot use (no pub/sub client for them here).
_NO_BUS_SCHEMES = ("redis+sentinel://", "redis+cluster://")
#: Key-store URLs whose stores carry revocations between processes themselves.
_SELF_NOTIFYING_STORES = ("memory://", "sqlite://", "postgresql://", "postgres://")


def invalidation_url(settings: Settings, store: KeyStore | None = None) -> str | None:
    """The Redis URL revocations travel on: the setting, else the limit storage's Redis.

    A sentinel or cluster limit storage cannot carry them; unless the key
    store (``store``, else ``settings.key_store``) tells other processes
    itself, that is a ConfigError until ``invalidation_url`` says what to do,
    rather than a silent fall-back to ``key_cache_ttl``.
    """
    url = settings.invalidation_url
    storage = settings.rate_limit_storage
    if url is None and storage.startswith(INVALIDATION_SCHEMES):
        url = storage
    elif url is None and storage.startswith(_NO_BUS_SCHEMES) and _needs_bus(settings, store):
        scheme = storage.partition("://")[0]  # never the rest: it may hold a password
        raise ConfigError(
            "invalidation_url",
            f"rate_limit_storage is {scheme}://, which cannot carry key revocations to "
            f"other instances, and this key store cannot either: set invalidation_url to "
            f"a redis:// URL that every instance reaches, so they drop a revoked key at "
            f"once, or to '' to accept that they see it within key_cache_ttl "
            f"({settings.key_cache_ttl:g} s)",
        )
    return url or None


def jwks_url_allowed(url: str) -> bool:
    """https://, or http:// to this machine only (a local identity provider, or a test).

    Checked on the setting and again on every redirect the endpoint answers with.
    """
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return True
    return parts.scheme == "http" and parts.hostname in ("localhost", "127.0.0.1", "::1")


def _needs_bus(settings: Settings, store: KeyStore | None) -> bool:
    known = store if store is not None else settings.key_store
    if isinstance(known, KeyStore):
        return known.needs_bus
    return not known.lower().startswith(_SELF_NOTIFYING_STORES)


def _check_jwks_url(url: object) -> None:
    if not isinstance(url, str):
        raise ConfigError("jwt_jwks_url", f"expected a URL, got {url!r}")
    if jwks_url_allowed(url):
        return
    raise ConfigError(
        "jwt_jwks_url",
        f"expected an https:// URL (http only for localhost), got {redact_url(url)!r}",
    )


def _number(
    name: str, value: object, *, minimum: float, maximum: float, integer: bool = False
) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value != value:
        raise ConfigError(name, f"expected a {'whole ' if integer else ''}number, got {value!r}")
    if not minimum <= value <= maximum:
        raise ConfigError(name, f"{value!r} is outside {minimum}..{maximum}")
