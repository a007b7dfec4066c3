"""``flask m2m usage``: ``m2m usage`` on the app's own key store."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from m2m_middleware import open_key_store
from m2m_middleware.flask import M2MAuth, require_scopes


def make_app(**config: Any) -> Flask:
    app = Flask("m2m_usage_cli_tests")
    config.setdefault("rate_limit_storage", "memory://")
    app.config["M2M_AUTH"] = config

    @app.get("/orders")
    def orders() -> Any:
        return {"orders": []}

    @app.get("/admin")
    @require_scopes("admin")
    def admin() -> Any:
        return {"admin": True}

    M2MAuth(app)
    return app


def flask_usage(app: Flask, *args: str) -> Any:
    return app.test_cli_runner().invoke(args=["m2m", "usage", *args])


@pytest.fixture
def app(tmp_path: Path) -> Flask:
    return make_app(key_store=f"sqlite:///{tmp_path / 'keys.db'}")


def send(app: Flask, key: str, path: str = "/orders") -> int:
    return app.test_client().get(path, headers={"X-API-Key": key}).status_code


def test_the_app_s_counts_after_a_flush(app: Flask) -> None:
    store = M2MAuth.engine(app).store
    issued = store.create_key("billing")
    assert send(app, issued.key) == 200
    assert send(app, issued.key) == 200
    assert send(app, issued.key, "/admin") == 403  # require_scopes: denied, not allowed
    M2MAuth.engine(app).flush()
    result = flask_usage(app, "--json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    assert (row["client_id"], row["key_id"]) == ("billing", issued.record.key_id)
    assert (row["allowed"], row["denied"], row["rate_limited"]) == (2, 1, 0)
    assert issued.key not in result.output


def test_a_memory_store_is_read_as_the_app_holds_it() -> None:
    # memory:// opened again would be another, empty store: the app's own object is read.
    app = make_app(key_store="memory://")
    engine = M2MAuth.engine(app)
    issued = engine.store.create_key("billing")
    assert send(app, issued.key) == 200
    engine.flush()
    result = flask_usage(app, "--by", "month", "--per", "client", "--csv")
    assert result.exit_code == 0, result.output
    (row,) = csv.DictReader(io.StringIO(result.output))
    assert (row["client_id"], row["allowed"], row["units"]) == ("billing", "1", "1")


def test_the_table_and_its_totals(app: Flask) -> None:
    engine = M2MAuth.engine(app)
    for client in ("acme", "globex"):
        assert send(app, engine.store.create_key(client).key) == 200
    engine.flush()
    result = flask_usage(app)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("PERIOD")
    assert lines[-1].split() == ["TOTAL", "2", "0", "0", "2"]


def test_store_option_still_points_elsewhere(app: Flask, tmp_path: Path) -> None:
    other = f"sqlite:///{tmp_path / 'other.db'}"
    open_key_store(other).close()
    result = flask_usage(app, "--store", other, "--json")
    assert (result.exit_code, json.loads(result.output)) == (0, [])


def test_bad_input_is_one_line_and_a_usage_status(app: Flask) -> None:
    bad = flask_usage(app, "--since", "soon")
    assert bad.exit_code == 2
    assert "flask m2m usage: error: --since" in bad.output
    assert "Traceback" not in bad.output
    assert flask_usage(app, "--by", "week").exit_code == 2


def test_help_lists_the_options(app: Flask) -> None:
    group = app.test_cli_runner().invoke(args=["m2m", "--help"])
    assert group.exit_code == 0 and "usage" in group.output
    result = flask_usage(app, "--help")
    assert result.exit_code == 0
    for option in ("--client", "--key", "--since", "--until", "--by", "--per", "--json", "--csv"):
        assert option in result.output
