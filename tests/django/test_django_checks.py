"""System checks: a bad ``M2M_AUTH`` shows up in ``manage.py check``."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import Any
from unittest.mock import Mock

import pytest
from django.apps import apps
from django.core import checks
from django.test import override_settings
from missing_modules import WAYS, hide

from m2m_middleware import Settings
from m2m_middleware.django.apps import M2MMiddlewareConfig
from m2m_middleware.django.checks import MIDDLEWARE_PATH
from m2m_middleware.engine import Engine
from m2m_middleware.errors import ConfigError
from m2m_middleware.stores import KeyStore, MemoryKeyStore, SQLiteKeyStore

VALID = {"key_store": "memory://", "default_limits": "10/second", "public_paths": ["/health"]}


def ours(messages: list[checks.CheckMessage]) -> list[checks.CheckMessage]:
    return [m for m in messages if str(m.id).startswith("m2m_middleware.")]


def run_checks() -> list[checks.CheckMessage]:
    """Our messages only. The admin, installed for the admin tests, has checks of
    its own (for its middleware, absent from most MIDDLEWARE values here);
    test_django_admin.py runs them all against a complete admin project.
    Only the security tag ours are registered under: Django 6.1's model checks
    ask the database whether it supports JSONField, and these tests have none."""
    return ours(checks.run_checks(tags=[checks.Tags.security]))


def test_the_app_is_installed_under_its_label() -> None:
    config = apps.get_app_config("m2m_middleware")
    assert isinstance(config, M2MMiddlewareConfig)
    assert config.name == "m2m_middleware.django"


@pytest.mark.parametrize("value", [VALID, {}, None])
def test_a_valid_configuration_passes(value: Any) -> None:
    with override_settings(M2M_AUTH=value):
        assert run_checks() == []


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ({"default_limits": "abc"}, "default_limits"),
        ({"not_a_setting": True}, "not_a_setting"),
        ({"key_cache_ttl": -1}, "key_cache_ttl"),
        ({"routes": [{"path": "/x", "cost": 0}]}, "routes[0].cost"),
        ({"jwt_algorithms": ["none"]}, "jwt_algorithms"),
    ],
)
def test_an_invalid_value_is_e002_naming_the_field(value: dict[str, Any], field: str) -> None:
    with override_settings(M2M_AUTH=value):
        messages = run_checks()
    assert [m.id for m in messages] == ["m2m_middleware.E002"]
    [message] = messages
    assert message.level == checks.ERROR
    assert message.obj == field
    assert field in message.msg
    assert field in (message.hint or "")


@pytest.mark.parametrize(
    "value", ["default_limits=10/second", ["memory://"], [("key_store", "memory://")], 42]
)
def test_a_value_that_is_not_a_dict_is_e001(value: Any) -> None:
    with override_settings(M2M_AUTH=value):
        messages = run_checks()
    assert [m.id for m in messages] == ["m2m_middleware.E001"]
    assert messages[0].level == checks.ERROR
    assert messages[0].msg.startswith("M2M_AUTH must be a dict")


def test_the_checks_are_tagged_security() -> None:
    with override_settings(M2M_AUTH={"default_limits": "abc"}):
        tagged = checks.run_checks(tags=[checks.Tags.security])
        untagged = checks.run_checks(tags=[checks.Tags.compatibility])
    assert [m.id for m in ours(tagged)] == ["m2m_middleware.E002"]
    assert ours(untagged) == []


def test_a_missing_middleware_is_w001() -> None:
    with override_settings(M2M_AUTH=VALID, MIDDLEWARE=[]):
        messages = run_checks()
    assert [m.id for m in messages] == ["m2m_middleware.W001"]
    assert messages[0].level == checks.WARNING


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ({"key_store": "mysql://db/keys"}, "key_store"),
        ({"key_store": "sqlite://keys.db"}, "key_store"),
        ({"key_store": "postgresql://db/keys?nosuchoption=1"}, "key_store"),
        ({"key_store": "sqlite:///keys\0.db"}, "key_store"),
        ({"key_store": "memory://", "rate_limit_storage": "nosuch://host"}, "rate_limit_storage"),
    ],
    ids=["key_store", "sqlite_no_path", "postgresql", "nul_byte", "rate_limit_storage"],
)
def test_an_unusable_store_url_is_e002(value: dict[str, Any], field: str) -> None:
    with override_settings(M2M_AUTH=value):
        messages = run_checks()
    assert [(m.id, m.obj) for m in messages] == [("m2m_middleware.E002", field)]
    assert field in messages[0].msg


def test_both_unusable_store_urls_are_reported() -> None:
    value = {"key_store": "mysql://db/keys", "rate_limit_storage": "nosuch://host"}
    with override_settings(M2M_AUTH=value):
        messages = run_checks()
    assert [(m.id, m.obj) for m in messages] == [
        ("m2m_middleware.E002", "key_store"),
        ("m2m_middleware.E002", "rate_limit_storage"),
    ]


def test_the_check_agrees_with_the_engine() -> None:
    for value in ({"key_store": "mysql://db/keys"}, {"rate_limit_storage": "nosuch://host"}):
        with pytest.raises(ConfigError) as caught:
            Engine(Settings.from_mapping({"key_store": "memory://", **value}))
        with override_settings(M2M_AUTH={"key_store": "memory://", **value}):
            [message] = run_checks()
        assert message.obj == caught.value.field


def test_checking_a_sqlite_store_creates_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    absolute = tmp_path / "sub" / "keys.db"
    for value in ({}, {"key_store": f"sqlite:///{absolute}"}, {"key_store": "sqlite:///k.db"}):
        with override_settings(M2M_AUTH=value):
            assert run_checks() == []
    assert list(tmp_path.iterdir()) == []


def test_a_store_opened_from_a_url_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    closed: list[KeyStore] = []
    monkeypatch.setattr(SQLiteKeyStore, "close", lambda self: closed.append(self))
    with override_settings(M2M_AUTH={"key_store": "sqlite:///never-created.db"}):
        assert run_checks() == []
    assert len(closed) == 1


@pytest.mark.parametrize("wrap", [dict, Settings.from_mapping], ids=["dict", "settings"])
def test_a_store_object_passed_in_is_left_open(wrap: Any) -> None:
    store = MemoryKeyStore()
    store.close = Mock()  # type: ignore[method-assign]
    with override_settings(M2M_AUTH=wrap({"key_store": store})):
        assert run_checks() == []
    store.close.assert_not_called()


def test_a_network_limit_storage_is_not_contacted() -> None:
    pytest.importorskip("redis")
    # Nothing listens on port 1: building the storage must not connect.
    value = {"key_store": "memory://", "rate_limit_storage": "redis://127.0.0.1:1"}
    with override_settings(M2M_AUTH=value):
        assert run_checks() == []


def test_a_read_only_mapping_is_accepted() -> None:
    with override_settings(M2M_AUTH=MappingProxyType(VALID)):
        assert run_checks() == []


def test_a_settings_instance_is_accepted() -> None:
    with override_settings(M2M_AUTH=Settings.from_mapping(VALID)):
        assert run_checks() == []


def test_a_settings_instance_with_an_unusable_url_is_e002() -> None:
    config = Settings.from_mapping({"key_store": "memory://", "rate_limit_storage": "nosuch://x"})
    with override_settings(M2M_AUTH=config):
        messages = run_checks()
    assert [(m.id, m.obj) for m in messages] == [("m2m_middleware.E002", "rate_limit_storage")]


@pytest.mark.parametrize("middleware", [[], ()], ids=["list", "tuple"])
def test_w001_reads_a_list_or_a_tuple(middleware: Any) -> None:
    with override_settings(M2M_AUTH=VALID, MIDDLEWARE=middleware):
        assert [m.id for m in run_checks()] == ["m2m_middleware.W001"]
    with override_settings(M2M_AUTH=VALID, MIDDLEWARE=type(middleware)([MIDDLEWARE_PATH])):
        assert run_checks() == []


JWT_SECRET = "a-test-secret-that-is-long-enough-for-hs256"


def test_jwts_without_audience_or_issuer_are_w002() -> None:
    with override_settings(M2M_AUTH={"schemes": ["jwt"], "jwt_keys": JWT_SECRET}):
        messages = run_checks()
    assert [m.id for m in messages] == ["m2m_middleware.W002"]
    assert messages[0].level == checks.WARNING
    assert "jwt_audience" in messages[0].hint


@pytest.mark.parametrize("pin", [{"jwt_audience": "orders-api"}, {"jwt_issuer": "https://idp"}])
def test_jwts_pinned_to_an_audience_or_issuer_pass(pin: dict[str, str]) -> None:
    with override_settings(M2M_AUTH={"schemes": ["jwt"], "jwt_keys": JWT_SECRET, **pin}):
        assert run_checks() == []


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ({"schemes": ["jwt"]}, "jwt_keys"),
        ({"schemes": ["jwt"], "jwt_keys": "short"}, "jwt_keys"),
        ({"schemes": ["jwt"], "jwt_keys": JWT_SECRET, "jwt_algorithms": []}, "jwt_algorithms"),
        ({"schemes": ["jwt"], "jwt_jwks_url": "http://idp.example/jwks"}, "jwt_jwks_url"),
    ],
    ids=["no_keys", "short_secret", "no_algorithms", "plain_http_jwks"],
)
def test_bad_jwt_settings_are_e002(value: dict[str, Any], field: str) -> None:
    with override_settings(M2M_AUTH=value):
        messages = run_checks()
    assert [m.id for m in messages] == ["m2m_middleware.E002"]
    assert messages[0].obj == field


def test_a_strategy_the_storage_cannot_charge_all_or_nothing_is_e002() -> None:
    value = {
        "rate_limit_storage": "memcached://cache:11211",
        "rate_limit_strategy": "moving-window",
    }
    with override_settings(M2M_AUTH=value):
        messages = run_checks()
    assert [m.id for m in messages] == ["m2m_middleware.E002"]
    assert messages[0].obj == "rate_limit_strategy"
    assert "all-or-nothing" in messages[0].msg


# -- mistakes a person can act on -----------------------------------------------------


@pytest.mark.parametrize(
    ("value", "field", "meant"),
    [
        ({"defualt_limits": "10/second"}, "defualt_limits", "default_limits"),
        ({"DEFUALT_LIMITS": "10/second"}, "DEFUALT_LIMITS", "default_limits"),
        ({"rate_limit_store": "memory://"}, "rate_limit_store", "rate_limit_storage"),
        ({"routes": [{"path": "/x", "scope": ["a"]}]}, "routes[0].scope", "scopes"),
    ],
)
def test_a_misspelt_field_is_e002_suggesting_the_one_meant(
    value: dict[str, Any], field: str, meant: str
) -> None:
    with override_settings(M2M_AUTH=value):
        messages = run_checks()
    assert [(m.id, m.obj) for m in messages] == [("m2m_middleware.E002", field)]
    assert f"did you mean `{meant}`?" in messages[0].msg
    assert messages[0].hint == f"Rename '{field}' to '{meant}' in M2M_AUTH."


@pytest.mark.parametrize("how", WAYS)
@pytest.mark.parametrize(
    ("module", "value", "field", "extra"),
    [
        ("redis", {"rate_limit_storage": "redis://127.0.0.1:6379"}, "rate_limit_storage", "redis"),
        ("redis", {"invalidation_url": "redis://127.0.0.1:6379"}, "invalidation_url", "redis"),
        ("psycopg", {"key_store": "postgresql://127.0.0.1/keys"}, "key_store", "postgres"),
        ("psycopg_pool", {"key_store": "postgresql://127.0.0.1/keys"}, "key_store", "postgres"),
        ("joserfc", {"schemes": ["jwt"], "jwt_keys": "s" * 32}, "schemes", ""),
    ],
)
def test_a_missing_extra_is_e002_with_the_install_line(
    monkeypatch: pytest.MonkeyPatch,
    how: str,
    module: str,
    value: dict[str, Any],
    field: str,
    extra: str,
) -> None:
    hide(monkeypatch, module, how)
    with override_settings(M2M_AUTH={"key_store": "memory://", **value}):
        messages = run_checks()
    assert [(m.id, m.obj) for m in messages] == [("m2m_middleware.E002", field)]
    assert f'pip install "m2m-middleware{f"[{extra}]" if extra else ""}"' in messages[0].msg


@pytest.mark.parametrize("how", WAYS)
@pytest.mark.parametrize(
    ("module", "value", "field"),
    [
        ("redis", {"defualt_limits": "1/second"}, "defualt_limits"),
        ("redis", {"rate_limit_storage": "redis://127.0.0.1:6379"}, "rate_limit_storage"),
        ("psycopg", {"key_store": "postgresql://127.0.0.1/keys"}, "key_store"),
    ],
)
def test_the_middleware_refuses_to_start_with_the_same_config_error(
    monkeypatch: pytest.MonkeyPatch, how: str, module: str, value: dict[str, Any], field: str
) -> None:
    from m2m_middleware.django import M2MAuthMiddleware

    hide(monkeypatch, module, how)
    with (
        override_settings(M2M_AUTH={"key_store": "memory://", **value}),
        pytest.raises(ConfigError) as caught,
    ):
        M2MAuthMiddleware(lambda request: None)
    assert type(caught.value) is ConfigError
    assert caught.value.field == field


class RemoteStore(MemoryKeyStore):
    """A store other processes change, with no way of its own to tell this one."""

    needs_bus = True


def test_a_limit_storage_that_cannot_carry_revocations_is_e002_on_invalidation_url() -> None:
    # Nothing listens on port 1: the check must not connect to find this out.
    value = {
        "key_store": RemoteStore(),
        "rate_limit_storage": "redis+sentinel://127.0.0.1:1/mymaster",
    }
    with override_settings(M2M_AUTH=value):
        messages = run_checks()
    assert [(m.id, m.obj) for m in messages] == [("m2m_middleware.E002", "invalidation_url")]
    assert "key_cache_ttl" in messages[0].msg
    with override_settings(M2M_AUTH={**value, "invalidation_url": ""}):  # the TTL, knowingly
        assert run_checks() == []


def deploy_checks() -> list[checks.CheckMessage]:
    return ours(checks.run_checks(tags=[checks.Tags.security], include_deployment_checks=True))


def test_check_deploy_warns_while_require_https_is_off() -> None:
    with override_settings(M2M_AUTH=VALID):
        assert "m2m_middleware.W003" not in [m.id for m in run_checks()]  # deploy only
        [warning] = [m for m in deploy_checks() if m.id == "m2m_middleware.W003"]
    assert warning.level == checks.WARNING
    assert "require_https" in warning.msg
    with override_settings(M2M_AUTH={**VALID, "require_https": True}):
        assert "m2m_middleware.W003" not in [m.id for m in deploy_checks()]


def test_check_deploy_leaves_an_invalid_setting_to_e002() -> None:
    with override_settings(M2M_AUTH={"require_https": "maybe"}):
        assert [m.id for m in deploy_checks()].count("m2m_middleware.W003") == 0
        assert "m2m_middleware.E002" in [m.id for m in deploy_checks()]
