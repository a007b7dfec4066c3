"""``flask m2m keys ...``: the ``m2m keys`` actions on the app's own key store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from m2m_middleware import open_key_store
from m2m_middleware.flask import M2MAuth


def make_app(**config: Any) -> Flask:
    app = Flask("m2m_cli_tests")
    app.config["M2M_AUTH"] = config

    @app.get("/orders")
    def orders() -> Any:
        return {"orders": []}

    M2MAuth(app)
    return app


def flask_m2m(app: Flask, *args: str) -> Any:
    return app.test_cli_runner().invoke(args=["m2m", "keys", *args])


@pytest.fixture
def app(tmp_path: Path) -> Flask:
    return make_app(key_store=f"sqlite:///{tmp_path / 'keys.db'}", key_prefix="acme")


def test_create_issues_a_key_the_app_accepts(app: Flask) -> None:
    result = flask_m2m(app, "create", "--client", "billing", "--scope", "orders:read", "--json")
    assert result.exit_code == 0, result.output
    created = json.loads(result.output)
    assert created["key"].startswith("acme_")  # the app's key_prefix
    response = app.test_client().get("/orders", headers={"X-API-Key": created["key"]})
    assert response.status_code == 200


def test_list_revoke_and_rotate_work_on_the_app_store(app: Flask) -> None:
    created = json.loads(flask_m2m(app, "create", "--client", "billing", "--json").output)
    listing = flask_m2m(app, "list", "--json")
    assert [k["key_id"] for k in json.loads(listing.output)] == [created["key_id"]]
    assert created["key"] not in listing.output

    rotated = flask_m2m(app, "rotate", created["key_id"], "--json")
    assert rotated.exit_code == 0, rotated.output
    successor = json.loads(rotated.output)["key"]
    assert app.test_client().get("/orders", headers={"X-API-Key": successor}).status_code == 200
    assert (
        app.test_client().get("/orders", headers={"X-API-Key": created["key"]}).status_code == 401
    )

    new_id = json.loads(rotated.output)["key_id"]
    assert flask_m2m(app, "revoke", new_id).exit_code == 0
    assert app.test_client().get("/orders", headers={"X-API-Key": successor}).status_code == 401


def test_store_option_still_points_elsewhere(app: Flask, tmp_path: Path) -> None:
    other = f"sqlite:///{tmp_path / 'other.db'}"
    result = flask_m2m(app, "create", "--client", "x", "--store", other, "--json")
    assert result.exit_code == 0, result.output
    assert [k.client_id for k in open_key_store(other).list_keys()] == ["x"]
    assert json.loads(flask_m2m(app, "list", "--json").output) == []


def test_bad_input_is_one_line_and_a_usage_status(app: Flask) -> None:
    flask_m2m(app, "create", "--client", "x")  # the store file exists from here on
    unknown = flask_m2m(app, "revoke", "key_doesnotexist")
    assert unknown.exit_code == 1
    assert "flask m2m keys: error: no key with id 'key_doesnotexist'" in unknown.output
    bad = flask_m2m(app, "create", "--client", "x", "--expires-in", "soon")
    assert bad.exit_code == 2
    assert "--expires-in" in bad.output and "Traceback" not in bad.output
    assert flask_m2m(app, "frobnicate").exit_code == 2


def test_help_lists_the_actions(app: Flask) -> None:
    group = app.test_cli_runner().invoke(args=["m2m", "--help"])
    assert group.exit_code == 0 and "keys" in group.output
    result = flask_m2m(app, "--help")
    assert result.exit_code == 0
    for action in ("create", "list", "revoke", "rotate"):
        assert action in result.output


def test_a_tier_the_app_does_not_configure_is_refused(tmp_path: Path) -> None:
    app = make_app(
        key_store=f"sqlite:///{tmp_path / 'keys.db'}",
        tiers={"pro": "100/second", "free": "1/second"},
    )
    refused = flask_m2m(app, "create", "--client", "billing", "--tier", "gold")
    assert refused.exit_code == 2
    assert refused.stdout == ""
    assert refused.stderr == (
        "flask m2m keys: error: --tier: unknown tier 'gold': the app's tiers are free, pro"
        "; without --tier a key gets default_limits\n"
    )
    accepted = flask_m2m(app, "create", "--client", "billing", "--tier", "pro", "--json")
    assert accepted.exit_code == 0, accepted.output
    assert json.loads(accepted.stdout)["tier"] == "pro"
    # A key made elsewhere with a tier the app lacks still rotates, with a warning.
    stray = open_key_store(f"sqlite:///{tmp_path / 'keys.db'}").create_key("x", tier="gold")
    rotated = flask_m2m(app, "rotate", stray.key_id, "--json")
    assert rotated.exit_code == 0, rotated.output
    assert "warning: key" in rotated.stderr and "'gold'" in rotated.stderr


@pytest.mark.parametrize("given", [["--expires-in", "-1d"], ["--expires-in=-1d"]])
def test_a_negative_expiry_says_it_must_be_in_the_future(app: Flask, given: list[str]) -> None:
    result = flask_m2m(app, "create", "--client", "x", *given)
    assert result.exit_code == 2
    assert result.stderr == (
        "flask m2m keys: error: --expires-in: the expiry must be in the future: give a "
        "positive duration such as 30d, got '-1d'\n"
    )


def test_create_passes_networks_through(app: Flask) -> None:
    result = flask_m2m(
        app, "create", "--client", "billing", "--allow-cidr", "203.0.113.0/24", "--json"
    )
    assert result.exit_code == 0, result.output
    created = json.loads(result.output)
    assert created["allowed_cidrs"] == ["203.0.113.0/24"]
    client = app.test_client()
    headers = {"X-API-Key": created["key"]}
    inside = client.get("/orders", headers=headers, environ_base={"REMOTE_ADDR": "203.0.113.9"})
    assert inside.status_code == 200
    outside = client.get("/orders", headers=headers, environ_base={"REMOTE_ADDR": "1.1.1.1"})
    assert outside.status_code == 403
