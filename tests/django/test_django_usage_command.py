"""``manage.py m2m_usage``: ``m2m usage`` on the project's key store."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.http import HttpRequest, HttpResponse
from django.test import Client as DjangoTestClient
from django.test import override_settings
from django.urls import path

from m2m_middleware.django import current_engine, require_scopes


def _orders(request: HttpRequest) -> HttpResponse:
    return HttpResponse("[]")


@require_scopes("admin")
def _admin(request: HttpRequest) -> HttpResponse:
    return HttpResponse("admin")


urlpatterns = [path("orders", _orders), path("admin", _admin)]


def m2m_usage(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        call_command("m2m_usage", *args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def project(tmp_path: Path) -> Iterator[dict[str, Any]]:
    config = {"key_store": f"sqlite:///{tmp_path / 'keys.db'}", "rate_limit_storage": "memory://"}
    with override_settings(M2M_AUTH=config, ROOT_URLCONF=__name__):
        yield config


def test_the_project_s_counts_after_a_flush(
    project: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    engine = current_engine()
    issued = engine.store.create_key("billing")
    client = DjangoTestClient()
    assert client.get("/orders", headers={"X-API-Key": issued.key}).status_code == 200
    assert client.get("/admin", headers={"X-API-Key": issued.key}).status_code == 403
    engine.flush()
    code, out, err = m2m_usage(capsys, "--json")
    assert (code, err) == (0, "")
    (row,) = json.loads(out)
    assert (row["client_id"], row["key_id"]) == ("billing", issued.record.key_id)
    assert (row["allowed"], row["denied"]) == (1, 1)
    assert issued.key not in out

    code, out, _ = m2m_usage(capsys, "--by", "month", "--per", "client", "--csv")
    assert code == 0
    assert out.splitlines()[0] == "period_start,client_id,allowed,denied,rate_limited,units"
    # Two units: the refused request was charged against the limits before the view ran.
    assert out.splitlines()[1].endswith(",billing,1,1,0,2")


def test_with_no_arguments_it_prints_the_table(
    project: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = m2m_usage(capsys)
    assert code == 0 and out.startswith("No usage recorded")


def test_failures_are_one_line_with_a_status(
    project: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = m2m_usage(capsys, "--since", "soon")
    assert code == 2
    assert err.startswith("manage.py m2m_usage: error: --since")
    assert "Traceback" not in err


def test_options_can_be_given_as_call_command_keywords(
    project: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    call_command("m2m_usage", by="month", csv=True)
    assert capsys.readouterr().out.startswith("period_start,client_id,key_id,")


def test_an_option_django_s_parser_refuses_is_named(project: dict[str, Any]) -> None:
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="--by"):
        call_command("m2m_usage", "--by", "week")


def test_an_invalid_m2m_auth_is_named() -> None:
    from django.core.management.base import CommandError

    with (
        override_settings(M2M_AUTH={"key_store": "ftp://nowhere"}),
        pytest.raises(CommandError, match="key_store"),
    ):
        call_command("m2m_usage")
