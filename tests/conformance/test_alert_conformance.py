"""Alerts on unusual activity, the same in Starlette, Flask and Django (issue 14 part 3).

Each app's engine gets its alerts rebuilt on a frozen clock (fixed windows: a
test must not straddle one), reporting to the test through ``on_alert``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import pytest
from test_http_conformance import api_key, config

from m2m_middleware import Alert, KeyStore, open_key_store
from m2m_middleware.keys import generate_key
from m2m_middleware.telemetry.alerts import Alerts

if TYPE_CHECKING:  # this folder's conftest; only a type here
    from conftest import Caller

Make = Callable[[Mapping[str, Any]], "Caller"]
#: On a window boundary of every window below.
FROZEN = 3600.0 * 1000
ATTACKER = "198.51.100.66"
PROXY = "10.0.0.5"


@pytest.fixture
def store() -> KeyStore:
    return open_key_store("memory://")


def watched(make_app: Make, store: KeyStore, **overrides: Any) -> tuple[Caller, list[Alert]]:
    """The app, and the alerts its engine fires (on a frozen clock)."""
    fired: list[Alert] = []
    overrides.setdefault("on_alert", fired.append)
    app = make_app(config(store, **overrides))
    engine = app.engine()
    telemetry = engine.telemetry
    assert telemetry is not None
    telemetry.alerts = Alerts(engine.settings, telemetry.fire, clock=lambda: FROZEN)
    return app, fired


def kinds(fired: list[Alert]) -> list[tuple[str, str]]:
    return [(alert.kind, alert.subject) for alert in fired]


def test_failed_keys_from_one_address_fire_auth_failures_once(
    make_app: Make, store: KeyStore
) -> None:
    app, fired = watched(make_app, store, alert_auth_failures="5/minute")
    for _ in range(4):
        assert app("GET", "/ping", api_key(generate_key()), peer=ATTACKER).status == 401
    assert fired == []
    for _ in range(10):
        assert app("GET", "/ping", api_key(generate_key()), peer=ATTACKER).status == 401
    assert kinds(fired) == [("auth_failures", ATTACKER)]
    assert fired[0].count == 5 and fired[0].window_seconds == 60


def test_requests_without_credentials_fire_nothing(make_app: Make, store: KeyStore) -> None:
    app, fired = watched(make_app, store, alert_auth_failures="2/minute")
    for _ in range(5):
        assert app("GET", "/ping", peer=ATTACKER).status == 401
    assert app("GET", "/health", peer=ATTACKER).status == 200
    assert fired == []


def test_a_clients_429s_fire_rate_limited_once(make_app: Make, store: KeyStore) -> None:
    app, fired = watched(make_app, store, default_limits="2/minute", alert_rate_limited="3/minute")
    key = store.create_key("acme", scopes=["orders:read"]).key
    statuses = [app.get("/ping", api_key(key)).status for _ in range(10)]
    assert statuses == [200, 200] + [429] * 8
    assert kinds(fired) == [("rate_limited", "acme")]


@pytest.mark.parametrize("view", ["/scoped", "/scoped-async"])
def test_a_require_scopes_refusal_counts_for_client_failures(
    make_app: Make, store: KeyStore, view: str
) -> None:
    app, fired = watched(make_app, store, alert_client_failures="3/minute")
    key = store.create_key("acme", scopes=["orders:read"]).key
    for _ in range(2):
        assert app.get(view, api_key(key)).status == 403
    assert fired == []
    assert app.get(view, api_key(key)).status == 403
    assert kinds(fired) == [("client_failures", "acme")]
    assert "insufficient_scope" in fired[0].detail


def test_a_route_rules_refusals_count_for_client_failures(make_app: Make, store: KeyStore) -> None:
    app, fired = watched(make_app, store, alert_client_failures="2/minute")
    key = store.create_key("acme", scopes=["other"]).key
    assert app.get("/orders", api_key(key)).status == 403
    assert app.get("/orders", api_key(key)).status == 403
    assert kinds(fired) == [("client_failures", "acme")]


def test_a_revoked_key_tried_fires_ended_keys(make_app: Make, store: KeyStore) -> None:
    app, fired = watched(make_app, store)  # the default: 1/hour
    issued = store.create_key("acme", scopes=["orders:read"])
    assert app.get("/ping", api_key(issued.key)).status == 200
    store.revoke_key(issued.key_id)
    for _ in range(3):
        assert app.get("/ping", api_key(issued.key)).status == 401
    ended = [alert for alert in fired if alert.kind == "ended_keys"]
    assert [(a.subject, a.count, a.window_seconds) for a in ended] == [(issued.key_id, 1, 3600)]
    assert "acme" in ended[0].detail
    assert issued.key not in ended[0].detail and issued.key[-16:] not in ended[0].detail


def test_an_on_alert_that_raises_never_breaks_the_request(
    make_app: Make, store: KeyStore, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(alert: Alert) -> None:
        raise RuntimeError("the pager is down")

    app, _ = watched(
        make_app,
        store,
        alert_auth_failures="1/minute",
        alert_client_failures="1/minute",
        alert_rate_limited="1/minute",
        default_limits="1/minute",
        tiers={"roomy": "100/minute"},
        on_alert=broken,
    )
    limited = store.create_key("acme", scopes=["orders:read"]).key
    roomy = store.create_key("roomy", scopes=["orders:read"], tier="roomy").key
    with caplog.at_level(logging.WARNING):
        assert app("GET", "/ping", api_key(generate_key()), peer=ATTACKER).status == 401
        assert app.get("/ping", api_key(limited)).status == 200
        assert app.get("/ping", api_key(limited)).status == 429
        reply = app.get("/scoped", api_key(roomy))  # refused by the view's require_scopes
        assert reply.status == 403 and reply.json()["error"] == "insufficient_scope"
        assert app.get("/ping", api_key(roomy)).status == 200  # and the app goes on
    raised = [r for r in caplog.records if "on_alert callable" in r.getMessage()]
    assert len(raised) == 3
    warnings = [r for r in caplog.records if r.name == "m2m_middleware.alerts"]
    assert sorted(vars(r)["m2m_alert"] for r in warnings) == [
        "auth_failures",
        "client_failures",
        "rate_limited",
    ]


def test_through_a_trusted_proxy_the_subject_is_the_forwarded_address(
    make_app: Make, store: KeyStore
) -> None:
    app, fired = watched(
        make_app, store, alert_auth_failures="3/minute", trusted_proxies=["10.0.0.0/8"]
    )
    forwarded = {"X-Forwarded-For": ATTACKER}
    for _ in range(3):
        reply = app("GET", "/ping", {**api_key(generate_key()), **forwarded}, peer=PROXY)
        assert reply.status == 401
    assert kinds(fired) == [("auth_failures", ATTACKER)]


def test_a_spoofed_forwarded_address_from_an_untrusted_peer_is_not_the_subject(
    make_app: Make, store: KeyStore
) -> None:
    """An attacker cannot frame another address, nor spread its failures over made-up ones."""
    app, fired = watched(
        make_app, store, alert_auth_failures="3/minute", trusted_proxies=["10.0.0.0/8"]
    )
    for n in range(3):
        spoofed = {"X-Forwarded-For": f"203.0.113.{n}", "Forwarded": f"for=203.0.113.{n}"}
        reply = app("GET", "/ping", {**api_key(generate_key()), **spoofed}, peer=ATTACKER)
        assert reply.status == 401
    assert kinds(fired) == [("auth_failures", ATTACKER)]


def test_guessed_secrets_at_the_token_endpoint_fire_auth_failures_once(make_app: Make) -> None:
    """A brute force against the token endpoint is a brute force too: its invalid_client
    answers count for the address, as a request's 401s do, and the alert says so once."""
    import test_token_endpoint_conformance as tokens

    store = open_key_store("memory://")
    issued = store.create_key("svc-orders", scopes=tokens.KEY_SCOPES)
    fired: list[Alert] = []
    app = make_app(tokens.config(store, on_alert=fired.append, alert_auth_failures="3/minute"))
    engine = app.engine()
    assert engine.telemetry is not None
    engine.telemetry.alerts = Alerts(engine.settings, engine.telemetry.fire, clock=lambda: FROZEN)
    guess = tokens.form(**tokens.GRANT)
    for _ in range(6):
        headers = {**tokens.FORM, **tokens.basic(issued.record.key_id, generate_key())}
        reply = app("POST", tokens.TOKEN_PATH, headers, body=guess, peer=ATTACKER)
        assert reply.status == 401
    assert kinds(fired) == [("auth_failures", ATTACKER)]
    assert tokens.fetch(app, issued).status == 200  # the key's owner is not held back
    assert kinds(fired) == [("auth_failures", ATTACKER)]
