"""``manage.py m2m_keys ...``: the ``m2m keys`` actions on the project's key store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.test import override_settings

from m2m_middleware import open_key_store


def m2m_keys(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        call_command("m2m_keys", *args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def store_url(tmp_path: Path) -> Any:
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    with override_settings(M2M_AUTH={"key_store": url, "key_prefix": "proj"}):
        yield url


def test_create_list_rotate_revoke_on_the_configured_store(
    store_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = m2m_keys(capsys, "create", "--client", "billing", "--scope", "a b", "--json")
    assert code == 0
    created = json.loads(out)
    assert created["key"].startswith("proj_")  # the project's key_prefix
    record = open_key_store(store_url).get_key(created["key_id"])
    assert record.client_id == "billing" and record.scopes == {"a", "b"}

    code, out, _ = m2m_keys(capsys, "list")
    assert code == 0 and created["key_id"] in out and created["key"] not in out

    code, out, _ = m2m_keys(capsys, "rotate", created["key_id"], "--grace", "1h", "--json")
    assert code == 0
    rotated = json.loads(out)
    assert open_key_store(store_url).get_key(created["key_id"]).expires_at is not None

    code, _, _ = m2m_keys(capsys, "revoke", rotated["key_id"])
    assert code == 0
    assert open_key_store(store_url).get_key(rotated["key_id"]).revoked_at is not None


def test_failures_are_one_line_with_a_status(
    store_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    m2m_keys(capsys, "create", "--client", "x")  # the store file exists from here on
    code, _, err = m2m_keys(capsys, "revoke", "key_doesnotexist")
    assert code == 1
    assert err.strip() == "manage.py m2m_keys: error: no key with id 'key_doesnotexist'"
    code, _, err = m2m_keys(capsys, "create", "--client", "x", "--max-uses", "0")
    assert code == 2 and "--max-uses" in err and "Traceback" not in err


def test_an_invalid_m2m_auth_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    from django.core.management.base import CommandError

    with (
        override_settings(M2M_AUTH={"key_store": "ftp://nowhere"}),
        pytest.raises(CommandError, match="key_store"),
    ):
        call_command("m2m_keys", "list")


def test_a_tier_the_project_does_not_configure_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    with override_settings(M2M_AUTH={"key_store": url, "tiers": {"pro": "100/second"}}):
        code, out, err = m2m_keys(capsys, "create", "--client", "billing", "--tier", "gold")
        assert (code, out) == (2, "")
        assert err == (
            "manage.py m2m_keys: error: --tier: unknown tier 'gold': the app's tiers are pro"
            "; without --tier a key gets default_limits\n"
        )
        code, out, _ = m2m_keys(capsys, "create", "--client", "billing", "--tier", "pro", "--json")
        assert code == 0
        assert json.loads(out)["tier"] == "pro"
        stray = open_key_store(url).create_key("x", tier="gold")
        code, _, err = m2m_keys(capsys, "rotate", stray.key_id)
        assert code == 0
        assert "warning: key" in err and "'gold'" in err
    with override_settings(M2M_AUTH={"key_store": url}):
        code, _, err = m2m_keys(capsys, "create", "--client", "billing", "--tier", "pro")
        assert code == 2
        assert "the app configures no tiers" in err


@pytest.mark.parametrize("given", [["--expires-in", "-1d"], ["--expires-in=-1d"]])
def test_a_negative_expiry_says_it_must_be_in_the_future(
    store_url: str, capsys: pytest.CaptureFixture[str], given: list[str]
) -> None:
    code, out, err = m2m_keys(capsys, "create", "--client", "x", *given)
    assert (code, out) == (2, "")
    assert err == (
        "manage.py m2m_keys: error: --expires-in: the expiry must be in the future: give a "
        "positive duration such as 30d, got '-1d'\n"
    )


def test_create_passes_networks_through(store_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = m2m_keys(
        capsys, "create", "--client", "billing", "--allow-cidr", "2001:db8::/32", "--json"
    )
    assert code == 0
    created = json.loads(out)
    assert open_key_store(store_url).get_key(created["key_id"]).allowed_cidrs == ("2001:db8::/32",)
    code, _, err = m2m_keys(capsys, "create", "--client", "b", "--allow-cidr", "10.0.0.1/8")
    assert code == 2 and "--allow-cidr" in err
