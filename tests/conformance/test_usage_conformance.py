"""Usage in Starlette, Flask and Django: the same requests, the same rows (CONTRACT.md "Usage").

Each adapter exposes its engine (``M2MMiddleware.engine``, ``M2MAuth.engine(app)``,
``m2m_middleware.django.current_engine()``: the callers' ``engine()``), whose
``flush()`` writes the counts to the store at once. A view's own
``require_scopes`` refusal is counted denied, not allowed, in all three.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

import pytest
from test_http_conformance import Maker, api_key, bearer, config

from m2m_middleware import Engine, KeyStore, UsageRow, open_key_store
from m2m_middleware.django import current_engine
from m2m_middleware.flask import M2MAuth
from m2m_middleware.starlette import M2MMiddleware

REPORTS_RULE = {"path": "/reports/*", "cost": 3}


@pytest.fixture
def store() -> KeyStore:
    return open_key_store("memory://")


def this_hour() -> datetime:
    return datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)


def counts(rows: list[UsageRow], names: Mapping[str | None, str]) -> list[tuple[Any, ...]]:
    """The rows with each key id replaced by the test's name for it (ids differ per store)."""
    return sorted(
        (r.client_id, names.get(r.key_id, r.key_id), r.allowed, r.denied, r.rate_limited, r.units)
        for r in rows
    )


def send_the_same_requests(app: Any, store: KeyStore) -> dict[str | None, str]:
    reader = store.create_key("acme", scopes=["orders:read"])
    writer = store.create_key("acme", scopes=["orders:read", "reports:read"])
    other = store.create_key("globex", scopes=["orders:read", "reports:read"], tier="small")
    revoked = store.create_key("acme", scopes=["orders:read"])
    store.revoke_key(revoked.record.key_id)
    assert app.get("/orders", api_key(reader.key)).status == 200
    assert app.get("/orders", bearer(reader.key)).status == 200
    assert app.get("/ping", api_key(writer.key)).status == 200
    assert app.get("/reports/", api_key(writer.key)).status == 200  # cost 3
    assert app.get("/scoped", api_key(reader.key)).status == 403  # the view refuses
    assert app.get("/scoped", api_key(other.key)).status == 200
    assert app.get("/scoped-async", api_key(reader.key)).status == 403
    for _ in range(3):  # globex has 2 a minute, one taken by /scoped: two 429s
        app.get("/ping", api_key(other.key))
    # Nobody's usage: a public path, no credential, a key that does not hold.
    assert app.get("/health").status == 200
    assert app.get("/orders").status == 401
    assert app.get("/orders", api_key(revoked.key)).status == 401
    assert app.get("/orders", api_key(reader.key[:-2] + "zz")).status == 401
    return {
        reader.record.key_id: "reader",
        writer.record.key_id: "writer",
        other.record.key_id: "other",
    }


#: What send_the_same_requests leaves in the store, in every framework.
EXPECTED = [
    ("acme", "reader", 2, 2, 0, 4),  # the refused views were charged their unit
    ("acme", "writer", 2, 0, 0, 4),
    ("globex", "other", 2, 0, 2, 2),
]


def usage_config(store: KeyStore) -> dict[str, Any]:
    values = config(store, tiers={"small": "2/minute"})
    values["routes"] = [*values["routes"], REPORTS_RULE]
    return values


def test_the_same_requests_give_the_same_rows(make_app: Maker, store: KeyStore) -> None:
    before = this_hour()
    app = make_app(usage_config(store))
    names = send_the_same_requests(app, store)
    engine = app.engine()
    assert store.usage() == []  # counted in process, not written per request
    engine.flush()
    rows = store.usage()
    assert counts(rows, names) == EXPECTED
    assert {r.period_start for r in rows} <= {before, this_hour()}


def test_a_require_scopes_refusal_is_denied_not_allowed(make_app: Maker, store: KeyStore) -> None:
    issued = store.create_key("acme", scopes=["orders:read"])
    app = make_app(config(store))
    for view in ("/scoped", "/scoped-async"):
        assert app.get(view, api_key(issued.key)).status == 403
    app.engine().flush()
    (row,) = store.usage()
    assert (row.allowed, row.denied, row.rate_limited) == (0, 2, 0)


def test_every_framework_counts_alike(
    every_framework: dict[str, Callable[[Mapping[str, Any]], Any]],
) -> None:
    seen = {}
    for name, make in every_framework.items():
        store = open_key_store("memory://")
        app = make(usage_config(store))
        names = send_the_same_requests(app, store)
        app.engine().flush()
        seen[name] = counts(store.usage(), names)
    assert seen["flask"] == seen["starlette"] == seen["django"] == EXPECTED


def test_each_adapter_exposes_its_engine(make_app: Maker, store: KeyStore, framework: str) -> None:
    issued = store.create_key("acme")
    app = make_app(config(store))
    assert app.get("/ping", api_key(issued.key)).status == 200
    engine = app.engine()
    assert isinstance(engine, Engine)
    # The callers reach it the documented way: check it is the same object.
    if framework == "starlette":
        stack: Any = app.app.middleware_stack
        while not isinstance(stack, M2MMiddleware):
            stack = stack.app
        assert stack.engine is engine
    elif framework == "flask":
        assert M2MAuth.engine(app.app) is engine
        with app.app.app_context():
            assert M2MAuth.engine() is engine
    else:
        with app._settings():
            assert current_engine() is engine
    engine.flush()
    assert [r.allowed for r in store.usage()] == [1]


def test_usage_off_counts_nothing_in_any_framework(make_app: Maker, store: KeyStore) -> None:
    issued = store.create_key("acme")
    app = make_app(config(store, usage=False))
    assert app.get("/ping", api_key(issued.key)).status == 200
    app.engine().flush()  # harmless with nothing to write
    assert store.usage() == []
