"""Findings of an attacker's review of issue 14 (usage, metrics, alerts, dashboard),
kept as regression tests.

Each failed on the commit it was found on and is fixed since; the docstrings
keep the reproduction. Traffic goes to 127.0.0.1 only (the machine's
PostgreSQL through the ``postgres_url`` fixture: skipped without it, failed
under CI=true).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import hmac
import json
import secrets
import string
import sys
import time
import types
from pathlib import Path

import pytest

from m2m_middleware import Settings
from m2m_middleware.engine import Engine

SECRET = "s" * 40


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _token(sub: str) -> str:
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps({"sub": sub, "exp": int(time.time()) + 600}).encode())
    sig = hmac.new(SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}"


def _jwt_engine(key_store: str, **overrides: object) -> Engine:
    values: dict[str, object] = {
        "schemes": ("api_key", "jwt"),
        "jwt_keys": SECRET,
        "jwt_algorithms": ["HS256"],
        "key_store": key_store,
        "alerts": False,
    }
    values.update(overrides)
    return Engine(Settings(**values))


@pytest.mark.postgres
@pytest.mark.parametrize(
    "poison",
    [
        pytest.param("a\x00b", id="nul"),
        # Random, so TOAST cannot compress it under the primary key's btree limit
        # (2704 bytes), yet short enough for max_credential_length (4096).
        pytest.param("".join(secrets.choice(string.ascii_letters) for _ in range(2800)), id="long"),
    ],
)
def test_one_jwt_client_id_the_database_refuses_blocks_every_usage_flush(
    poison: str, postgres_url: str
) -> None:
    """A token whose client id PostgreSQL cannot store stops all usage from being written.

    Reproduction: key_store="postgresql://...", a validly signed JWT with
    ``{"sub": "a\\u0000b"}`` (legal JSON; text_claim refuses only lone
    surrogates) or a 2,800-character random sub. The usage flush writes all
    pending rows in one transaction; PostgreSQL refuses the row ("text fields
    cannot contain NUL", "index row size exceeds btree maximum"), the counter
    keeps every pending count for the next attempt, and every later flush
    fails the same way: no client's usage (the billing data) is ever written
    again, and the pending counts grow until the process exits. The same with
    key_store="django://" on PostgreSQL and a sub over 255 characters (the
    UsageCount and AlertRecord columns are varchar(255)).
    """
    engine = _jwt_engine(postgres_url)
    try:
        assert engine.check("GET", "/x", "Bearer " + _token("billing"), None).allowed
        engine.check("GET", "/x", "Bearer " + _token(poison), None)
        engine.flush()
        rows = engine.store.usage()
        assert [(r.client_id, r.allowed) for r in rows] == [("billing", 1)]
    finally:
        engine.close()


@pytest.mark.parametrize("sub", ["a\x00b", "x" * 256], ids=["nul", "256"])
def test_a_jwt_client_id_the_usage_tables_cannot_hold_is_refused(sub: str) -> None:
    """What fixes the one above in every store: the client id of a token is written
    to the usage and alert tables, so one they cannot hold (a NUL, more than the
    Django columns' 255 characters) is refused with a 401, as a lone surrogate is.
    Other control characters are still taken, and escaped wherever shown."""
    engine = _jwt_engine("memory://")
    outcome = engine.check("GET", "/x", "Bearer " + _token(sub), None)
    assert (outcome.status, outcome.error) == (401, "invalid_token")  # type: ignore[union-attr]
    assert engine.check("GET", "/x", "Bearer " + _token("x" * 255), None).allowed
    assert engine.check("GET", "/x", "Bearer " + _token("svc\nallowed"), None).allowed


def test_alerts_queued_while_the_store_cannot_be_written_stay_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Alerts waiting for an unwritable store pile up without bound.

    Reproduction: any store whose alerts table cannot be written (the database
    down, or ``django://`` before ``manage.py migrate`` ran 0005_usage: usage
    is on by default); an attacker rotating source addresses (an IPv6 /64 has
    2**64) makes each address fail ``alert_auth_failures`` times. Every alert
    is queued for the store, and each failed flush puts the whole queue back:
    a million addresses are a million Alerts in memory, though the table keeps
    only the newest ALERTS_KEPT (1,000) of them anyway.
    """
    from m2m_middleware.errors import StoreUnavailable
    from m2m_middleware.telemetry.tables import ALERTS_KEPT

    engine = Engine(
        Settings(key_store="memory://", alert_auth_failures="1/minute", usage_flush_interval=3600)
    )
    counter = engine.telemetry.usage  # type: ignore[union-attr]
    assert counter is not None

    def down(alerts: object) -> None:
        raise StoreUnavailable("the database is down")

    monkeypatch.setattr(counter.table, "add_alerts", down)
    for number in range(ALERTS_KEPT + 500):
        address = f"2001:db8:{number:x}::1"  # a /64 each
        engine.check("GET", "/x", None, "m2m_not_a_key_" + "x" * 32, address)
        if number % 100 == 0:
            counter.flush_quietly()
    counter.flush_quietly()
    queued = counter._alerts
    assert len(queued) <= ALERTS_KEPT
    # The newest are the ones kept, as the table would keep them.
    assert queued[-1].subject == f"2001:db8:{ALERTS_KEPT + 499:x}::/64"
    monkeypatch.undo()
    engine.close()


@pytest.mark.parametrize("separator", [";", ","])
def test_a_csv_cell_holds_no_formula_after_a_list_separator(
    separator: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The billing export's formula guard is bypassed where a spreadsheet splits on ``;``.

        Reproduction: a client id ``acme;=HYPERLINK("http://evil.example","Invoice")``
        (create_key takes it; so does a token's ``sub``), ``m2m usage --csv``. The
        cell starts with ``a``, so it gets no leading ``'``, and holds no comma, so
        the csv module writes it unquoted. Excel in the locales whose list
        separator is ``;`` (most of continental Europe) opens a .csv splitting on
        ``;``: the second cell is ``=HYPERLINK(...)`` and runs. The cell must be
        neutralised for either separator: what follows a ``;`` gets the leading ``'``
    (quoting cannot help: such a spreadsheet honours a quote only at a cell's start).
    """
    from m2m_middleware import cli, open_key_store

    url = f"sqlite:///{tmp_path / 'keys.db'}"
    client = f'acme{separator}=HYPERLINK("http://evil.example","Invoice")'
    store = open_key_store(url)
    issued = store.create_key(client)
    engine = Engine(Settings(key_store=store, alerts=False))
    assert engine.check("GET", "/x", None, issued.key).allowed
    engine.flush()
    store.close()
    capsys.readouterr()
    assert cli.main(["usage", "--store", url, "--since", "all", "--csv"]) == 0
    out = capsys.readouterr().out
    line = out.splitlines()[1]
    # Split as such a spreadsheet splits, honouring only double quotes.
    cells = next(csv.reader([line], delimiter=";"))
    assert not any(cell.lstrip().startswith(("=", "+", "-", "@")) for cell in cells), cells
    # A comma-separated reader reads one cell, neutralised as a leading "=" is.
    (row,) = csv.DictReader(out.splitlines())
    assert row["client_id"] == client.replace(";=", ";'=")


@pytest.mark.django_db
def test_the_admin_key_page_reached_by_its_own_link_shows_the_keys_usage(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The admin's usage chart was empty for every key reached the way the admin links it.

    Reproduction: the change list links a key as ``.../apikey/key_5FAbc.../change/``
    (django.contrib.admin.utils.quote escapes ``_`` as ``_5F``). The admin
    unquotes that id to find the key, but the usage section read
    ``store.usage(key_id="key_5FAbc...")``, a key id that names nothing: the
    page showed "No requests in this period" for a key in heavy use (a
    runaway or abused key looks idle to whoever checks on it).
    """
    from django.contrib import admin
    from django.contrib.admin.utils import quote
    from django.contrib.auth.models import User
    from django.test import Client, override_settings
    from django.urls import path
    from django.utils import timezone

    from m2m_middleware.django.admin import APIKeyAdmin
    from m2m_middleware.django.store import DjangoKeyStore
    from m2m_middleware.telemetry.records import UsageRow
    from m2m_middleware.telemetry.tables import usage_table_for

    urlconf = types.ModuleType("m2m_redteam_admin_urls")
    urlconf.urlpatterns = [path("admin/", admin.site.urls)]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, urlconf.__name__, urlconf)
    store = DjangoKeyStore()
    monkeypatch.setattr(APIKeyAdmin, "key_store", lambda self: store)
    middleware = [
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.middleware.csrf.CsrfViewMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "django.contrib.messages.middleware.MessageMiddleware",
        "m2m_middleware.django.M2MAuthMiddleware",
    ]
    m2m_auth = {"key_store": "django://", "public_paths": ["/admin", "/admin/*"]}
    with override_settings(ROOT_URLCONF=urlconf.__name__, MIDDLEWARE=middleware, M2M_AUTH=m2m_auth):
        issued = store.create_key("acme")
        usage_table_for(store).add([UsageRow("acme", issued.key_id, timezone.now(), allowed=4321)])
        browser = Client()
        browser.force_login(User.objects.create_superuser("root", "root@example.com", "pw"))
        listing = browser.get("/admin/m2m_middleware/apikey/").content.decode()
        link = f"/admin/m2m_middleware/apikey/{quote(issued.key_id)}/change/"
        assert link in listing  # the link the admin itself gives
        page = browser.get(link).content.decode()
    store.close()
    assert "4321 requests in the last" in page


def test_a_refusal_by_the_view_just_after_the_hour_changes_counts_in_the_admitted_hour() -> None:
    """A request admitted at 23:59:59 and refused by ``require_scopes`` at 00:00:00 was
    billed as allowed in the day (or month) it was admitted, and made the next one's
    ``allowed`` negative.

    Reproduction: an engine with an injected clock; a key's request is admitted
    at 2026-03-31T23:59:59.9Z, the view's ``require_scopes`` refuses it at
    2026-04-01T00:00:00.0Z (``engine.app_refused``), then a flush. March's
    month row says allowed=1 (the billing export bills it), April's says
    allowed=-1, denied=1. The move must come off the hour the request was
    counted in while that count is still pending (it is, but for a flush in
    the milliseconds between the gate and the view).
    """
    from datetime import datetime, timezone

    from m2m_middleware.scopes import ScopeRequirement

    now = [datetime(2026, 3, 31, 23, 59, 59, 900000, tzinfo=timezone.utc).timestamp()]
    engine = Engine(
        Settings(key_store="memory://", alerts=False, usage_flush_interval=3600),
        telemetry_clock=lambda: now[0],
    )
    issued = engine.store.create_key("acme")
    admitted = engine.check("GET", "/x", None, issued.key)
    assert admitted.client is not None
    now[0] = datetime(2026, 4, 1, tzinfo=timezone.utc).timestamp()
    engine.app_refused(ScopeRequirement(["admin"]).refuse(admitted.client, engine.realm))
    engine.flush()
    months = [
        (r.period_start.month, r.allowed, r.denied) for r in engine.store.usage(granularity="month")
    ]
    engine.close()
    assert months == [(3, 0, 1)]


def _metrics_request(engine: Engine, address: str, headers: dict[str, str]) -> int:
    from m2m_middleware.request_view import AsgiView

    raw = [(name.lower().encode(), value.encode()) for name, value in headers.items()]
    view = AsgiView("GET", "/metrics", raw, "http", address)
    return engine.serve(view).status


def test_a_web_page_cannot_read_the_metrics_through_dns_rebinding() -> None:
    """Any web page a person on the private network opens can read ``/metrics``.

    Reproduction: metrics_path="/metrics", the default metrics_allowed_networks
    (loopback and every RFC 1918 network). An attacker's page at
    ``http://rebind.attacker.example:8000/`` rebinds that name to the app's
    private address (10.0.0.5, a classic DNS rebinding) and fetches
    ``/metrics``: same-origin to the browser, so the script reads the answer.
    The request comes from the browser's own private address (192.168.1.20 on
    the office network or VPN), which is allowed, carries no proxy header, and
    the endpoint does not look at Host: the page reads every counter, and the
    client ids when client labels are on. Prometheus never sends the Fetch
    Metadata headers; a browser marks a request a page made with
    ``Sec-Fetch-Site`` other than ``none`` (``none``: the person typed the URL).
    """
    engine = Engine(Settings(key_store="memory://", metrics_path="/metrics"))
    try:
        assert _metrics_request(engine, "192.168.1.20", {"Host": "10.0.0.5:8000"}) == 200
        typed = {"Host": "10.0.0.5:8000", "Sec-Fetch-Site": "none", "Sec-Fetch-Mode": "navigate"}
        assert _metrics_request(engine, "192.168.1.20", typed) == 200
        rebound = {
            "Host": "rebind.attacker.example:8000",
            "Sec-Fetch-Site": "same-origin",
            "Sec-Fetch-Mode": "cors",
            "Origin": "http://rebind.attacker.example:8000",
        }
        assert _metrics_request(engine, "192.168.1.20", rebound) == 404
        framed = {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "navigate"}
        assert _metrics_request(engine, "192.168.1.20", framed) == 404
    finally:
        engine.close()


def test_rotating_ipv6_addresses_inside_one_64_do_not_escape_auth_failures() -> None:
    """An IPv6 attacker guesses keys for ever and never fires ``auth_failures``.

    Reproduction: alert_auth_failures="20/minute" (the default), an attacker on
    any IPv6 host (a cloud VM or a home line gets a whole /64: 2**64 addresses
    that route to it) sends each guess from a new address of its /64. Each
    address fails once, no subject ever reaches 20: 10,000 guesses a minute and
    no alert. Its rotation also floods nothing it cannot repeat tomorrow: the
    /64 is the smallest network one party holds, so it is the subject.
    """
    from m2m_middleware import Alert

    fired: list[Alert] = []
    engine = Engine(
        Settings(key_store="memory://", alert_auth_failures="20/minute", on_alert=[fired.append])
    )
    try:
        for n in range(1, 201):
            engine.check("GET", "/x", None, "m2m_not_a_key_" + "x" * 32, f"2001:db8:0:7::{n:x}")
        # IPv4 stays per address, and a different /64 is a different subject.
        engine.check("GET", "/x", None, "m2m_not_a_key_" + "x" * 32, "2001:db8:0:8::1")
    finally:
        engine.close()
    assert [(a.kind, a.subject) for a in fired] == [("auth_failures", "2001:db8:0:7::/64")]
