"""Configuration mistakes a person can act on: the field, the fix, one ConfigError.

An unknown field names the closest known one; a positional argument says to
use keywords; a setting whose extra is not installed names the field and the
``pip install`` line, never a bare ``ModuleNotFoundError``. The Flask and
Django front doors are in tests/flask/test_flask_adapter.py and
tests/django/test_django_checks.py.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from missing_modules import WAYS, hide

from m2m_middleware import ConfigError, Engine, Settings
from m2m_middleware.starlette import M2MMiddleware


def refusal(call: Any) -> ConfigError:
    """The ConfigError ``call()`` raises, checked to be one plain line."""
    with pytest.raises(ConfigError) as caught:
        call()
    error = caught.value
    assert type(error) is ConfigError  # not a TypeError, ImportError or subclass thereof
    text = str(error)
    assert text.isprintable(), text  # one line, nothing that steers a terminal
    assert len(text) < 1200
    # Nothing chained: the error is the whole story, with no traceback beneath it.
    assert error.__cause__ is None
    assert error.__suppress_context__ or error.__context__ is None
    return error


# -- unknown fields ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("typo", "meant"),
    [
        ("defualt_limits", "default_limits"),
        ("default_limit", "default_limits"),
        ("rate_limit_store", "rate_limit_storage"),
        ("public_path", "public_paths"),
        ("tier", "tiers"),
        ("route", "routes"),
        ("jwt_audiences", "jwt_audience"),
        ("key_cache_tll", "key_cache_ttl"),
        ("scheme", "schemes"),
        ("api_key_headers", "api_key_header"),
        ("on_storage_errors", "on_storage_error"),
        # derived fields are not settings either
        ("default_limit_items", "default_limits"),
        ("route_rules", "routes"),
    ],
)
def test_an_unknown_field_names_the_one_meant(typo: str, meant: str) -> None:
    error = refusal(lambda: Settings(**{typo: "100/second"}))
    assert error.field == typo
    assert error.suggestion == meant
    assert str(error) == f"{typo}: unknown setting; did you mean `{meant}`?"


@pytest.mark.parametrize(
    ("typo", "meant"),
    [
        ("DEFUALT_LIMITS", "default_limits"),
        ("Rate_Limit_Store", "rate_limit_storage"),
        ("public_path", "public_paths"),
        ("API_KEY_HEADERS", "api_key_header"),
    ],
)
def test_from_mapping_names_the_one_meant_in_the_case_written(typo: str, meant: str) -> None:
    error = refusal(lambda: Settings.from_mapping({"key_store": "memory://", typo: "x"}))
    assert error.field == typo  # as written in app.config / settings.py, to find it there
    assert error.suggestion == meant
    assert f"did you mean `{meant}`?" in str(error)


def test_a_name_close_to_nothing_lists_the_known_ones() -> None:
    error = refusal(lambda: Settings(zebra=1))
    assert error.suggestion is None
    assert error.field == "zebra"
    assert "unknown setting" in str(error)
    for known in ("default_limits", "tiers", "rate_limit_storage", "public_paths", "routes"):
        assert known in str(error)


@pytest.mark.parametrize(
    "name",
    [
        "defualt_limits\nallowed GET /admin",  # a newline would start a line of its own
        "\x1b[2Jdefault_limits",  # a terminal escape
        "d" * 1_000_000,  # difflib on this would take minutes; nothing this long is a typo
        "default_limits\u2028x",
        "\ud800",  # a lone surrogate: no UTF-8 for it
    ],
    # ids in ASCII: a test id with a lone surrogate breaks pytest-xdist's report
    ids=["newline", "escape", "long", "line_separator", "surrogate"],
)
def test_a_hostile_name_is_shown_escaped_and_short(name: str) -> None:
    started = time.perf_counter()
    error = refusal(lambda: Settings.from_mapping({name: 1}))
    assert time.perf_counter() - started < 1.0
    assert len(error.field) < 80
    assert name not in str(error)


def test_a_name_that_is_not_a_string_is_named_too() -> None:
    error = refusal(lambda: Settings.from_mapping({42: "x"}))  # type: ignore[dict-item]
    assert error.field == "42"


@pytest.mark.parametrize(
    ("typo", "meant"),
    [
        ("scope", "scopes"),
        ("method", "methods"),
        ("limit", "limits"),
        ("costs", "cost"),
        ("paths", "path"),
        ("Scopes", "scopes"),
    ],
)
def test_an_unknown_route_field_names_the_one_meant(typo: str, meant: str) -> None:
    routes = [{"path": "/health"}, {"path": "/orders*", typo: ["orders:read"]}]
    for build in (
        lambda: Settings(routes=routes),
        lambda: Settings.from_mapping({"routes": routes}),
    ):
        error = refusal(build)
        assert error.field == f"routes[1].{typo}"
        assert error.suggestion == meant
        assert f"did you mean `{meant}`?" in str(error)


def test_a_hostile_route_field_is_shown_escaped() -> None:
    error = refusal(lambda: Settings(routes=[{"path": "/a", "scope\r\nX": "a"}]))
    assert error.field == "routes[0].'scope\\r\\nX'"


@pytest.mark.parametrize(
    "args",
    [
        ({"default_limits": "100/second"},),  # the mapping meant for from_mapping
        (("api_key",),),
        ("api_key", "memory://"),
    ],
)
def test_positional_arguments_say_to_use_keywords(args: tuple[Any, ...]) -> None:
    error = refusal(lambda: Settings(*args))
    assert "keyword arguments only" in str(error)
    assert "Settings.from_mapping" in str(error)


def test_keywords_still_build_and_replace_settings() -> None:
    settings = Settings(key_store="memory://", default_limits="5/second")
    assert settings.replace(default_limits="6/second").default_limit_items[0].amount == 6
    assert Settings.from_mapping({"DEFAULT_LIMITS": "7/second"}).default_limit_items[0].amount == 7


@pytest.mark.parametrize("given", [{"default_limits": "1/second"}, "memory://", 42])
def test_an_engine_given_something_else_than_settings_says_so(given: Any) -> None:
    error = refusal(lambda: Engine(given))
    assert error.field == "settings"
    assert "Settings(" in str(error)


def test_the_starlette_middleware_given_a_dict_says_so() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover
        pass

    error = refusal(lambda: M2MMiddleware(app, settings={"key_store": "memory://"}))  # type: ignore[arg-type]
    assert error.field == "settings"


# -- extras that are not installed --------------------------------------------------


MISSING_EXTRAS = [
    ("redis", {"rate_limit_storage": "redis://127.0.0.1:6379"}, "rate_limit_storage", "redis"),
    (
        "redis",
        {"rate_limit_storage": "rediss://:hunter2secret@cache.internal:6380/0"},
        "rate_limit_storage",
        "redis",
    ),
    (
        "redis",
        {"rate_limit_storage": "redis+cluster://127.0.0.1:7000"},
        "rate_limit_storage",
        "redis",
    ),
    (
        "redis",
        {"rate_limit_storage": "redis+sentinel://127.0.0.1:26379/m"},
        "rate_limit_storage",
        "redis",
    ),
    (
        "redis",
        {"invalidation_url": "redis://:hunter2secret@127.0.0.1:6379"},
        "invalidation_url",
        "redis",
    ),
    ("psycopg", {"key_store": "postgresql://app:hunter2secret@db/keys"}, "key_store", "postgres"),
    ("psycopg", {"key_store": "postgres://127.0.0.1/keys"}, "key_store", "postgres"),
    ("psycopg_pool", {"key_store": "postgresql://127.0.0.1/keys"}, "key_store", "postgres"),
    ("django", {"key_store": "django://"}, "key_store", "django"),
    ("django", {"key_store": "DJANGO://replica"}, "key_store", "django"),
    ("http_message_signatures", {"require_signatures": True}, "require_signatures", "signatures"),
    (
        "http_message_signatures",
        {"routes": [{"path": "/x"}, {"path": "/pay", "signed": True}]},
        "routes[1].signed",
        "signatures",
    ),
]


@pytest.mark.parametrize("how", WAYS)
@pytest.mark.parametrize(("module", "config", "field", "extra"), MISSING_EXTRAS)
def test_a_setting_whose_extra_is_missing_names_the_field_and_the_install_line(
    monkeypatch: pytest.MonkeyPatch,
    how: str,
    module: str,
    config: dict[str, Any],
    field: str,
    extra: str,
) -> None:
    config = {"key_store": "memory://", **config}
    hide(monkeypatch, module, how)
    for build in (
        lambda: Settings(**config),
        lambda: Settings.from_mapping({k.upper(): v for k, v in config.items()}),
    ):
        error = refusal(build)
        assert error.field == field
        assert str(error).endswith(f'pip install "m2m-middleware[{extra}]"')
        assert module in str(error)
        assert "hunter2secret" not in str(error)


@pytest.mark.parametrize("how", WAYS)
@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"schemes": ["jwt"], "jwt_keys": "s" * 32}, "schemes"),
        ({"schemes": ["api_key", "jwt"], "jwt_jwks_url": "https://idp.example/jwks"}, "schemes"),
        ({"jwt_keys": "s" * 32}, "jwt_keys"),  # keys loaded though JWTs are off
    ],
)
def test_jwt_settings_without_joserfc_are_one_config_error(
    monkeypatch: pytest.MonkeyPatch, how: str, config: dict[str, Any], field: str
) -> None:
    hide(monkeypatch, "joserfc", how)
    error = refusal(lambda: Settings(key_store="memory://", **config))
    assert error.field == field
    assert "joserfc" in str(error)
    assert 'pip install "m2m-middleware"' in str(error)
    assert "s" * 32 not in str(error)  # the HMAC secret


@pytest.mark.parametrize("how", WAYS)
def test_settings_that_need_no_extra_build_without_them(
    monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    for module in ("redis", "psycopg", "psycopg_pool", "joserfc", "http_message_signatures"):
        hide(monkeypatch, module, how)
    Engine(
        Settings(
            key_store="memory://",
            rate_limit_storage="memory://",
            invalidation_url="",
            default_limits="5/second",
        )
    ).close()


def test_an_empty_invalidation_url_needs_no_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    hide(monkeypatch, "redis", "sys.modules")
    assert Settings(key_store="memory://", invalidation_url="").invalidation_url == ""


def test_a_store_object_needs_no_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from m2m_middleware.stores import MemoryKeyStore

    hide(monkeypatch, "psycopg", "sys.modules")
    hide(monkeypatch, "django", "sys.modules")
    store = MemoryKeyStore()
    assert Settings(key_store=store).key_store is store
