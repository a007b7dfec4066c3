"""One frozen, validated settings object; each framework only spells it differently."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from limits import RateLimitItem, parse_many

from .errors import ConfigError
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

SCHEMES = ("api_key", "jwt")
STRATEGIES = ("fixed-window", "moving-window", "sliding-window-counter")
#: limits storage schemes served by redis-py, on which our Lua scripts charge every
#: strategy all-or-nothing in one round trip (m2m_middleware.limiting).
REDIS_SCHEMES = frozenset({"redis", "rediss", "redis+unix", "redis+sentinel", "redis+cluster"})
FAILURE_POLICIES = ("allow", "deny")
_HEADER_RE = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)


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
    index: int = 0
    pattern: re.Pattern[str] = field(default=re.compile(""), repr=False, compare=False)

    @classmethod
    def from_mapping(cls, index: int, value: object) -> Route:
        name = f"routes[{index}]"
        if not isinstance(value, Mapping):
            raise ConfigError(name, f"expected a mapping with 'path', got {value!r}")
        unknown = set(value) - {"path", "methods", "scopes", "limits", "cost"}
        if unknown:
            raise ConfigError(f"{name}.{sorted(unknown)[0]}", "unknown route field")
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
        return cls(
            path=path,
            methods=methods,
            scopes=scopes,
            limits=parse_limits(f"{name}.limits", value.get("limits")),
            cost=cost,
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


@dataclass(frozen=True)
class Settings:
    """Validated configuration. Invalid values raise :class:`ConfigError` naming the field.

    Fields that hold several values take any sequence (a list, as people write
    them, or a tuple) and hold a tuple once validated.
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
    public_paths: Sequence[str] = ()
    on_storage_error: str = "deny"
    storage_timeout: float = 1.0
    invalidation_url: str | None = None
    key_cache_ttl: float = 30.0
    key_cache_size: int = 10_000
    routes: Sequence[Mapping[str, Any]] = ()
    realm: str = "api"
    max_credential_length: int = 4096

    # -- derived, filled in by __post_init__ --------------------------------
    default_limit_items: tuple[RateLimitItem, ...] = field(init=False, repr=False, compare=False)
    tier_limit_items: Mapping[str, tuple[RateLimitItem, ...]] = field(
        init=False, repr=False, compare=False
    )
    route_rules: tuple[Route, ...] = field(init=False, repr=False, compare=False)
    public_path_pattern: re.Pattern[str] | None = field(init=False, repr=False, compare=False)
    jwt_key_ring: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        schemes = _string_tuple("schemes", self.schemes)
        for scheme in schemes:
            if scheme not in SCHEMES:
                raise ConfigError("schemes", f"unknown scheme {scheme!r}; choose from {SCHEMES}")
        set_(self, "schemes", tuple(dict.fromkeys(schemes)))
        if not isinstance(self.key_store, (str, KeyStore)):
            raise ConfigError("key_store", f"expected a URL or a KeyStore, got {self.key_store!r}")
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
        _number("key_cache_ttl", self.key_cache_ttl, minimum=0, maximum=86400)
        _number("key_cache_size", self.key_cache_size, minimum=0, maximum=10_000_000, integer=True)
        routes = self.routes
        if isinstance(routes, Mapping) or not isinstance(routes, Iterable):
            raise ConfigError("routes", "expected a list of route mappings")
        set_(self, "routes", tuple(routes))
        set_(self, "route_rules", tuple(Route.from_mapping(i, r) for i, r in enumerate(routes)))
        try:
            check_realm(self.realm)
        except ValueError as exc:
            raise ConfigError("realm", str(exc)) from None
        _number(
            "max_credential_length",
            self.max_credential_length,
            minimum=64,
            maximum=1_000_000,
            integer=True,
        )

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
        if ring is None and url is None:
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
            if not fitting:
                raise ConfigError("jwt_keys", "none of these keys can verify any JWS algorithm")
            set_(self, "jwt_algorithms", tuple(fitting))
        elif url is None and ring is not None and not ring.fits_any(self.jwt_algorithms):
            raise ConfigError(
                "jwt_algorithms",
                f"none of {', '.join(self.jwt_algorithms)} can be verified with the "
                "keys in jwt_keys (an HMAC secret needs HS256, an RSA key RS256 or PS256, "
                "an EC P-256 key ES256, an Ed25519 key EdDSA)",
            )

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
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        values: dict[str, Any] = {}
        for name, value in mapping.items():
            field_name = str(name).lower()
            if field_name not in known:
                raise ConfigError(str(name), "unknown setting")
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
