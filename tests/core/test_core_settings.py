"""Settings: contract defaults, one ConfigError naming the field per invalid value."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

import m2m_middleware
from m2m_middleware import ConfigError, Settings


def test_defaults_follow_the_contract() -> None:
    settings = Settings()
    assert settings.schemes == ("api_key",)
    assert settings.key_store == "sqlite:///m2m_keys.db"
    assert settings.api_key_header == "X-API-Key"
    assert settings.rate_limit_storage == "memory://"
    assert settings.on_storage_error in ("allow", "deny")
    assert settings.public_paths == ()
    assert settings.routes == ()


def test_config_error_is_exported_and_a_value_error() -> None:
    assert m2m_middleware.ConfigError is ConfigError
    assert issubclass(ConfigError, ValueError)
    assert issubclass(ConfigError, m2m_middleware.M2MError)


INVALID: list[tuple[str, dict[str, Any]]] = [
    ("schemes", {"schemes": ("api_key", "oauth")}),
    ("schemes", {"schemes": "basic"}),
    ("schemes", {"schemes": 42}),
    ("api_key_header", {"api_key_header": "X API Key"}),
    ("api_key_header", {"api_key_header": "X-Key:"}),
    ("api_key_header", {"api_key_header": ""}),
    ("api_key_header", {"api_key_header": 42}),
    ("api_key_header", {"api_key_header": "Authorization"}),
    ("api_key_header", {"api_key_header": "authorization"}),
    ("jwt_algorithms", {"jwt_algorithms": ("RS256", "none")}),
    ("jwt_algorithms", {"jwt_algorithms": ("NONE",)}),
    ("jwt_algorithms", {"jwt_algorithms": ["None"]}),
    ("jwt_algorithms", {"jwt_algorithms": "nOnE"}),
    ("default_limits", {"default_limits": "lots/please"}),
    ("default_limits", {"default_limits": "100/fortnight"}),
    ("default_limits", {"default_limits": 100}),
    ("tiers", {"tiers": ["gold"]}),
    ("tiers", {"tiers": "gold=10/second"}),
    ("tiers.gold", {"tiers": {"silver": "10/second", "gold": "fast"}}),
    ("rate_limit_storage", {"rate_limit_storage": "memory"}),
    ("rate_limit_storage", {"rate_limit_storage": "localhost:6379"}),
    ("rate_limit_storage", {"rate_limit_storage": None}),
    ("public_paths", {"public_paths": ("health",)}),
    ("public_paths", {"public_paths": ("/ok", "docs/*")}),
    ("public_paths", {"public_paths": [42]}),
    ("on_storage_error", {"on_storage_error": "ignore"}),
    ("on_storage_error", {"on_storage_error": "ALLOW"}),
    ("key_cache_ttl", {"key_cache_ttl": -1}),
    ("key_cache_ttl", {"key_cache_ttl": float("nan")}),
    ("key_cache_ttl", {"key_cache_ttl": True}),
    ("key_cache_ttl", {"key_cache_ttl": "30"}),
    ("routes", {"routes": {"path": "/a"}}),
    ("routes[0]", {"routes": ["/a"]}),
    ("routes[0].path", {"routes": [{"methods": ["GET"]}]}),
    ("routes[0].path", {"routes": [{"path": "a/b"}]}),
    ("routes[0].scope", {"routes": [{"path": "/a", "scope": "x"}]}),
    ("routes[0].methods", {"routes": [{"path": "/a", "methods": ["FETCH"]}]}),
    ("routes[0].cost", {"routes": [{"path": "/a", "cost": 0}]}),
    ("routes[0].cost", {"routes": [{"path": "/a", "cost": True}]}),
    ("routes[0].cost", {"routes": [{"path": "/a", "cost": 1.5}]}),
    ("routes[1].cost", {"routes": [{"path": "/ok"}, {"path": "/b", "cost": 0}]}),
    ("routes[0].limits", {"routes": [{"path": "/a", "limits": "often"}]}),
    ("key_store", {"key_store": 42}),
]


@pytest.mark.parametrize(
    ("field", "fields"), INVALID, ids=[f"{f}-{i}" for i, (f, _) in enumerate(INVALID)]
)
def test_invalid_value_raises_config_error_naming_the_field(
    field: str, fields: dict[str, Any]
) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings(**fields)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")


@pytest.mark.parametrize(
    ("field", "fields"),
    [
        ("schemes", {"schemes": ["jwks"]}),
        ("jwt_algorithms", {"jwt_algorithms": ["none"]}),
        ("tiers.gold", {"tiers": {"gold": "fast"}}),
        ("key_cache_ttl", {"key_cache_ttl": -5}),
        ("routes[0].cost", {"routes": [{"path": "/a", "cost": 0}]}),
    ],
)
def test_from_mapping_validates_the_same_way(field: str, fields: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_mapping({k.upper(): v for k, v in fields.items()})
    assert caught.value.field == field


def test_valid_values_are_accepted_and_normalised() -> None:
    settings = Settings(
        schemes="api_key",
        api_key_header="X-Client-Key",
        jwt_algorithms=["ES256"],
        default_limits=["10/second", "1000/day"],
        tiers={"gold": "100/second"},
        public_paths="/health",
        on_storage_error="allow",
        key_cache_ttl=0,
        routes=[{"path": "/orders/*", "methods": ["get", "post"], "scopes": "orders:read"}],
    )
    assert settings.schemes == ("api_key",)
    assert settings.jwt_algorithms == ("ES256",)
    assert [str(i) for i in settings.default_limit_items] == [
        "10 per 1 second",
        "1000 per 1 day",
    ]
    assert settings.public_paths == ("/health",)
    (route,) = settings.route_rules
    assert route.methods == frozenset({"GET", "POST"})
    assert route.scopes == frozenset({"orders:read"})
    assert route.matches("GET", "/orders/42")
    assert route.matches("HEAD", "/orders/42")  # served by the GET view everywhere
    assert not route.matches("DELETE", "/orders/42")
    assert not route.matches("GET", "/invoices/42")


def test_from_mapping_rejects_an_unknown_key_by_name() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_mapping({"default_limits": "1/second", "API_KEY_HEADERS": "X-Key"})
    assert caught.value.field == "API_KEY_HEADERS"
    assert "API_KEY_HEADERS" in str(caught.value)


def test_from_mapping_rejects_derived_fields() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_mapping({"route_rules": ()})
    assert caught.value.field == "route_rules"


def test_from_mapping_accepts_upper_case_keys() -> None:
    settings = Settings.from_mapping(
        {
            "KEY_STORE": "memory://",
            "API_KEY_HEADER": "X-Client-Key",
            "Default_Limits": "5/minute",
            "on_storage_error": "allow",
        }
    )
    assert settings.key_store == "memory://"
    assert settings.api_key_header == "X-Client-Key"
    assert [str(i) for i in settings.default_limit_items] == ["5 per 1 minute"]
    assert settings.on_storage_error == "allow"
    assert Settings.from_mapping(None) == Settings()


def test_from_mapping_refuses_a_non_mapping() -> None:
    with pytest.raises(ConfigError):
        Settings.from_mapping(["key_store", "memory://"])  # type: ignore[arg-type]


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.api_key_header = "X-Other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.on_storage_error = "allow"  # type: ignore[misc]
    assert settings.api_key_header == "X-API-Key"


def test_replace_validates() -> None:
    settings = Settings(key_store="memory://")
    assert settings.replace(api_key_header="X-Key").api_key_header == "X-Key"
    with pytest.raises(ConfigError) as caught:
        settings.replace(on_storage_error="maybe")
    assert caught.value.field == "on_storage_error"


@pytest.mark.parametrize(
    ("methods", "method", "guarded"),
    [
        (["GET"], "GET", True),
        (["GET"], "HEAD", True),  # every framework answers HEAD with the GET view
        (["get"], "HEAD", True),
        (["GET"], "POST", False),
        (["GET"], "OPTIONS", False),
        (["POST"], "HEAD", False),
        (["POST"], "GET", False),
        (["POST", "DELETE"], "HEAD", False),
        (["HEAD"], "HEAD", True),
        (["HEAD"], "GET", False),  # a HEAD rule does not guard GET
        (None, "HEAD", True),
        (None, "PATCH", True),
    ],
)
def test_which_methods_a_route_rule_guards(
    methods: list[str] | None, method: str, guarded: bool
) -> None:
    rule: dict[str, Any] = {"path": "/orders/*", "scopes": ["orders:read"]}
    if methods is not None:
        rule["methods"] = methods
    (route,) = Settings(routes=(rule,)).route_rules
    assert route.matches(method, "/orders/42") is guarded
    assert not route.matches(method, "/invoices/42")


#: Storages where limits tests every limit and then hits every limit: a moving or
#: sliding window hit there cannot be taken back, so a refused request would keep
#: the charges it made before the refusal.
UNSAFE_STRATEGY_STORAGES = [
    "memcached://cache:11211",
    "mongodb://app:s3cret-pw@db:27017",
    "mongodb+srv://app:s3cret-pw@cluster.example.net",
    "valkey://:s3cret-pw@cache:6379",
    "async+redis://cache:6379",
]


@pytest.mark.parametrize("strategy", ["moving-window", "sliding-window-counter"])
@pytest.mark.parametrize("uri", UNSAFE_STRATEGY_STORAGES)
def test_a_strategy_that_cannot_be_charged_all_or_nothing_there_is_refused(
    uri: str, strategy: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings(rate_limit_storage=uri, rate_limit_strategy=strategy)
    assert caught.value.field == "rate_limit_strategy"
    message = str(caught.value)
    assert "all-or-nothing" in message
    assert "'fixed-window'" in message and "redis://" in message  # the ways out
    assert "s3cret-pw" not in message


@pytest.mark.parametrize("uri", UNSAFE_STRATEGY_STORAGES)
def test_fixed_windows_are_accepted_on_any_storage(uri: str) -> None:
    # Charged by increment and roll-back there: all-or-nothing too.
    assert Settings(rate_limit_storage=uri).rate_limit_strategy == "fixed-window"


@pytest.mark.parametrize("strategy", ["fixed-window", "moving-window", "sliding-window-counter"])
@pytest.mark.parametrize(
    "uri",
    [
        "memory://",
        "redis://cache:6379/0",
        "rediss://:pw@cache:6380",
        "redis+unix:///run/redis.sock",
        "redis+sentinel://sentinel:26379/mymaster",
        "redis+cluster://node1:7000",
        "REDIS://cache:6379",
    ],
)
def test_every_strategy_is_accepted_where_it_is_charged_all_or_nothing(
    uri: str, strategy: str
) -> None:
    assert Settings(rate_limit_storage=uri, rate_limit_strategy=strategy).rate_limit_storage == uri
