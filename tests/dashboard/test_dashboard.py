"""The dashboard without a browser: the page, its charts, the WSGI app's answers, the command.

The store is made in process and its usage and alerts added straight to its
usage table, then the app is called as a WSGI server would (or served on a
free port for the command's tests).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from wsgiref.util import setup_testing_defaults

import pytest

from m2m_middleware import cli
from m2m_middleware.dashboard import charts, page
from m2m_middleware.dashboard.server import (
    CONTENT_SECURITY_POLICY,
    DashboardApp,
    DashboardError,
    make_dashboard_server,
    run,
)
from m2m_middleware.errors import StoreUnavailable
from m2m_middleware.stores import KeyStore, open_key_store
from m2m_middleware.telemetry.records import UsageRow

from .sample import HOSTILE_CLIENT, HOSTILE_NAME, Sample, sample_store

Answer = tuple[str, dict[str, str], str]

#: Every element the page itself writes.
PAGE_ELEMENTS = set(
    [
        "html",
        "head",
        "meta",
        "title",
        "style",
        "body",
        "header",
        "h1",
        "span",
        "main",
        "form",
        "label",
        "select",
        "option",
        "button",
        "a",
        "div",
        "b",
        "section",
        "h2",
        "p",
        "svg",
        "desc",
        "text",
        "rect",
        "line",
        "g",
        "table",
        "thead",
        "tbody",
        "tr",
        "th",
        "td",
        "code",
    ]
)


class Tags(HTMLParser):
    """The elements of a page and its text, as a browser's parser would see them."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parsed(html: str) -> Tags:
    tags = Tags()
    tags.feed(html)
    tags.close()
    return tags


@pytest.fixture
def sample() -> Iterator[Sample]:
    made = sample_store()
    yield made
    made.store.close()


def call(
    app: DashboardApp,
    path: str = "/",
    *,
    query: str = "",
    method: str = "GET",
    host: str = "127.0.0.1:8300",
) -> Answer:
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "HTTP_HOST": host,
    }
    setup_testing_defaults(environ)
    found: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        found["status"], found["headers"] = status, dict(headers)

    body = b"".join(app(environ, start_response))
    return found["status"], found["headers"], body.decode()


#: "Now" for the tests that make their own store.
NOW = datetime(2026, 6, 1, 12, 30, tzinfo=timezone.utc)


def app_for(source: Sample | KeyStore) -> DashboardApp:
    if isinstance(source, Sample):
        sample = source
        return DashboardApp(sample.store, clock=lambda: sample.now)
    return DashboardApp(source, clock=lambda: NOW)


# -- the page --------------------------------------------------------------------------


def test_the_page_shows_clients_keys_charts_and_alerts(sample: Sample) -> None:
    status, headers, html = call(app_for(sample))
    assert status == "200 OK"
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    text = " ".join(parsed(html).text)
    for client in ("billing", "reports", "partner-acme", "legacy-sync", HOSTILE_CLIENT):
        assert client in text
    for key_id in sample.key_ids.values():
        assert key_id in text
    for shown in ("billing worker", "orders:read", "gold", "revoked", "unlimited", "5000"):
        assert shown in text
    keys = html[html.index('id="keys"') : html.index('id="alerts"')]
    revoked_row = keys[keys.index(sample.key_ids["revoked"]) :].split("</tr>")[0]
    assert "status-revoked" in revoked_row
    # One chart for all clients and one per client that had requests.
    svgs = [attrs for tag, attrs in parsed(html).tags if tag == "svg"]
    assert len(svgs) == 1 + 4
    assert all(a.get("role") == "img" and a.get("aria-labelledby") for a in svgs)
    for series in ("allowed", "denied", "rate_limited"):
        assert f'data-series="{series}"' in html
    # Alerts, newest first.
    alerts = html[html.index('id="alerts"') :]
    assert alerts.index("partner-acme") < alerts.index("203.0.113.7")
    assert "rate_limited" in alerts and "ended_keys" in alerts


def test_no_key_and_no_hash_is_ever_on_the_page(sample: Sample) -> None:
    for query in ("", "days=1", "days=90", "client=billing"):
        html = call(app_for(sample), query=query)[2]
        for secret in sample.secrets:
            assert secret not in html
        assert re.search(r"\bm2m_[0-9A-Za-z]{30,}", html) is None


def test_names_chosen_by_key_creators_render_as_text(sample: Sample) -> None:
    html = call(app_for(sample))[2]
    tags = parsed(html)
    names = {tag for tag, _ in tags.tags}
    assert names <= PAGE_ELEMENTS  # no <script>, <img> or <u> from the stored text
    assert not any(name.startswith("on") for _, attrs in tags.tags for name in attrs)
    text = "".join(tags.text)
    assert HOSTILE_CLIENT in text
    assert HOSTILE_NAME in text
    assert "x:<u>u</u>" in text
    # Also as a filter link and an option value: quoted, not markup.
    assert "client=%3Cimg%20src%3Dx" in html
    assert f'value="{charts.escape(HOSTILE_CLIENT)}"' in html


def test_an_empty_store_has_a_page_too() -> None:
    store = open_key_store("memory://")
    status, _, html = call(app_for(store))
    assert status == "200 OK"
    assert "No keys." in html
    assert "No clients yet." in html
    assert "No alerts in the last 7 days." in html
    assert "No requests in this period" in html  # the all-clients chart, empty
    assert html.count("<svg") == 1


def test_keys_close_to_their_quota_or_expiry_are_listed(sample: Sample) -> None:
    html = call(app_for(sample))[2]
    attention = html[html.index('id="attention"') : html.index('id="keys"')]
    assert sample.key_ids["partner"] in attention  # 40 uses left
    assert "40 uses left" in attention
    assert sample.key_ids["billing-old"] in attention  # expires in 3 days
    assert "expires in 3d" in attention
    assert sample.key_ids["reports"] not in attention  # 5000 left, ~3300 used a week
    assert sample.key_ids["billing"] not in attention
    assert sample.key_ids["revoked"] not in attention  # ended keys need no warning


def test_a_key_is_close_to_its_quota_at_its_own_pace() -> None:
    store = open_key_store("memory://")
    issued = store.create_key("busy", max_uses=900)
    rows = [UsageRow("busy", issued.key_id, NOW - timedelta(hours=h), allowed=100) for h in (1, 2)]
    data = page.DashboardData(page.Query(), NOW, NOW - timedelta(days=7), [issued.record], rows, [])
    assert page.needing_attention(data) == []
    rows.append(UsageRow("busy", issued.key_id, NOW - timedelta(hours=3), allowed=700))
    data = page.DashboardData(page.Query(), NOW, NOW - timedelta(days=7), [issued.record], rows, [])
    (found,) = page.needing_attention(data)
    assert found.reason == "900 uses left (900 used in the last 7 days)"


def test_the_client_filter_shows_one_client(sample: Sample) -> None:
    status, _, html = call(app_for(sample), query="client=partner-acme")
    assert status == "200 OK"
    keys = html[html.index('id="keys"') : html.index('id="alerts"')]
    assert sample.key_ids["partner"] in keys
    assert sample.key_ids["billing"] not in keys
    assert html.count("<svg") == 1  # that client's chart, no all-clients one
    alerts = html[html.index('id="alerts"') :]
    assert "partner-acme" in alerts and "203.0.113.7" not in alerts
    assert '<option value="partner-acme" selected>' in html


def test_an_unknown_client_is_an_empty_page_not_an_error(sample: Sample) -> None:
    status, _, html = call(app_for(sample), query="client=nobody")
    assert status == "200 OK"
    assert "No keys." in html
    assert "No requests in this period" in html


def test_days_choose_the_window_and_the_bars(sample: Sample) -> None:
    hourly = call(app_for(sample), query="days=1")[2]
    assert "per hour" in hourly
    assert "No alerts in the last day." not in hourly  # two alerts fired today
    assert "ended_keys" not in hourly  # a day ago and a bit: outside
    daily = call(app_for(sample), query="days=30")[2]
    assert "per day" in daily and "last 30 days" in daily


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("days=0", "days: expected a whole number of days from 1 to 366, got '0'"),
        ("days=367", "got '367'"),
        ("days=-1", "got '-1'"),
        ("days=1.5", "got '1.5'"),
        ("days=abc", "got 'abc'"),
        ("days=99999999999999999999", "days: expected a whole number"),
        ("days=1&days=2", "days: give it once, not 2 times"),
        ("client=a%00b", "client: invalid client id"),
        ("client=a%0Ab", "client: invalid client id"),
        ("client=" + "x" * 1001, "client: at most 1000 characters"),
        ("sort=name", "unknown query parameter 'sort': only client and days are known"),
        ("&".join(f"p{i}=1" for i in range(20)), "too many query parameters"),
    ],
)
def test_bad_filters_are_400_naming_the_problem(sample: Sample, query: str, message: str) -> None:
    status, headers, html = call(app_for(sample), query=query)
    assert status == "400 Bad Request"
    assert charts.escape(message) in html
    assert headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert "Traceback" not in html


def test_only_the_page_is_served(sample: Sample) -> None:
    app = app_for(sample)
    for path in ("/favicon.ico", "/index.html", "/admin", "//", "/?"):
        assert call(app, path)[0] == "404 Not Found", path
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
        status, headers, _ = call(app, method=method)
        assert status == "405 Method Not Allowed", method
        assert headers["Allow"] == "GET, HEAD"


def test_head_answers_the_headers_of_get(sample: Sample) -> None:
    app = app_for(sample)
    status, headers, body = call(app, method="HEAD")
    assert (status, body) == ("200 OK", "")
    assert int(headers["Content-Length"]) == len(call(app)[2].encode())


def test_every_answer_carries_the_security_headers(sample: Sample) -> None:
    app = app_for(sample)
    answers = [
        call(app),
        call(app, query="days=x"),
        call(app, "/nope"),
        call(app, method="POST"),
        call(app, host="evil.example"),
    ]
    for _, headers, _ in answers:
        assert headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Cache-Control"] == "no-store"
        assert headers["X-Frame-Options"] == "DENY"
    assert CONTENT_SECURITY_POLICY.startswith("default-src 'none'; style-src 'sha256-")


def test_the_policy_allows_exactly_the_pages_stylesheet(sample: Sample) -> None:
    # Any other inline style (an attribute, another <style>) would be blocked,
    # so a change to the stylesheet that forgot the hash would show unstyled.
    html = call(app_for(sample))[2]
    assert html.count("<style>") == 1
    assert f"<style>{page.STYLE}</style>" in html
    assert " style=" not in html
    assert "<script" not in html


def test_a_page_elsewhere_cannot_reach_it_by_a_name_of_its_own(sample: Sample) -> None:
    # DNS rebinding: evil.example resolving to 127.0.0.1 would otherwise read the page.
    app = app_for(sample)
    status, _, html = call(app, host="evil.example:8300")
    assert status == "400 Bad Request"
    assert "billing" not in html
    for host in ("127.0.0.1:8300", "localhost:8300", "[::1]:8300", "LOCALHOST"):
        assert call(app, host=host)[0] == "200 OK", host
    public = DashboardApp(sample.store, allowed_hosts=None, clock=lambda: sample.now)
    assert call(public, host="dash.example.com")[0] == "200 OK"


@pytest.mark.parametrize(
    "error",
    [
        StoreUnavailable("key store unreachable: postgresql://app:hunter2@db/keys"),
        sqlite3.OperationalError("unable to open database file"),
        OSError(errno.ECONNREFUSED, "Connection refused"),
        RuntimeError("a driver error of its own"),
    ],
)
def test_a_store_that_is_down_is_a_503_page(
    sample: Sample,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    error: Exception,
) -> None:
    def down(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(sample.store, "list_keys", down)
    with caplog.at_level(logging.WARNING, "m2m_middleware.dashboard"):
        status, headers, html = call(app_for(sample))
    assert status == "503 Service Unavailable"
    assert headers["Retry-After"] == "5"
    assert headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert "Key store unavailable" in html
    assert "Traceback" not in html and str(error) not in html
    (record,) = caplog.records
    assert record.exc_info is None
    assert "hunter2" not in record.getMessage()


# -- the charts ------------------------------------------------------------------------


def test_empty_periods_are_buckets_too() -> None:
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    rows = [
        UsageRow("a", "k", start, allowed=3),
        UsageRow("a", "k2", start, denied=1),
        UsageRow("a", "k", start + timedelta(days=2, hours=5), rate_limited=2),
        UsageRow("a", "k", start + timedelta(days=9), allowed=99),  # after the end
    ]
    found = charts.buckets(rows, start=start, end=start + timedelta(days=3), granularity="day")
    assert [b.start.day for b in found] == [1, 2, 3, 4]
    assert [(b.allowed, b.denied, b.rate_limited) for b in found] == [
        (3, 1, 0),
        (0, 0, 0),
        (0, 0, 2),
        (0, 0, 0),
    ]


@pytest.mark.parametrize(
    ("largest", "step"),
    [(0, 1), (1, 1), (4, 1), (5, 2), (8, 2), (9, 5), (20, 5), (21, 10), (99, 25), (2400, 1000)],
)
def test_the_y_axis_has_whole_round_steps(largest: int, step: int) -> None:
    assert charts.nice_step(largest) == step
    assert step * 4 >= largest


def test_a_chart_has_its_series_axes_and_accessible_titles() -> None:
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    rows = [
        UsageRow("a", "k", start + timedelta(hours=h), allowed=10, denied=h % 2) for h in range(6)
    ]
    svg = charts.usage_chart(
        rows,
        start=start,
        end=start + timedelta(hours=5),
        granularity="hour",
        title="a & <b>",
        chart_id="c1",
    )
    tags = parsed(svg)
    assert tags.tags[0] == (
        "svg",
        {
            "xmlns": "http://www.w3.org/2000/svg",
            "class": "usage-chart",
            "role": "img",
            "viewbox": f"0 0 {charts.WIDTH} {charts.HEIGHT}",
            "width": "100%",
            "preserveaspectratio": "xMidYMid meet",
            "aria-labelledby": "c1-title c1-desc",
            "font-family": "system-ui, -apple-system, Segoe UI, Roboto, sans-serif",
            "font-size": "13",
        },
    )
    assert '<title id="c1-title">a &amp; &lt;b&gt;</title>' in svg
    assert "60 allowed, 3 denied, 0 rate-limited" in svg  # the <desc>
    groups = [a["data-series"] for t, a in tags.tags if t == "g"]
    assert groups == ["allowed", "denied", "rate_limited"]
    assert sum(1 for t, _ in tags.tags if t == "rect") == 3 + 6 + 3  # legend + bars
    assert "2026-01-01 01:00 UTC: 10 allowed, 1 denied, 0 rate-limited" in svg
    assert "01 Jan 00:00" in svg and ">01:00<" in svg  # the date at midnight only
    assert "No requests" not in svg


def test_a_long_heading_is_shortened_but_titled_whole() -> None:
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    title = "c" * 80
    svg = charts.usage_chart(
        [], start=start, end=start, granularity="day", title=title, chart_id="x"
    )
    assert f'<title id="x-title">{title}</title>' in svg
    assert "c" * 33 + "\u2026" in svg


# -- the command -----------------------------------------------------------------------


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    store = open_key_store(url)
    store.create_key("billing", name="worker")
    store.close()
    return url


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "::", "example.com"])
def test_a_public_address_needs_public(
    capsys: pytest.CaptureFixture[str], db_url: str, host: str
) -> None:
    code, out, err = run_cli(capsys, "dashboard", "--store", db_url, "--host", host)
    assert code == 2
    assert out == ""
    assert err.startswith(f"m2m: error: --host {host}: not a loopback address")
    assert "--public" in err and "no login" in err
    assert err.count("\n") == 1


def test_a_port_in_use_is_one_line(capsys: pytest.CaptureFixture[str], db_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = run_cli(capsys, "dashboard", "--store", db_url, "--port", str(port))
    assert code == 2
    assert (
        err
        == f"m2m: error: port {port} on 127.0.0.1 is already in use: choose another with --port\n"
    )


@pytest.mark.parametrize("port", ["http", "-1", "65536"])
def test_a_bad_port_is_a_usage_error(capsys: pytest.CaptureFixture[str], port: str) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["dashboard", "--store", "memory://", "--port", port])
    assert exited.value.code == 2
    assert "invalid port" in capsys.readouterr().err


def test_a_missing_store_file_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = tmp_path / "none.db"
    code, _, err = run_cli(capsys, "dashboard", "--store", f"sqlite:///{missing}")
    assert code == 1
    assert err.startswith("m2m: error: no key store at ")
    assert not missing.exists()  # not made by looking at it


def test_a_bad_store_url_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "dashboard", "--store", "ftp://nowhere")
    assert code == 2
    assert err.startswith("m2m: error: --store: ")


def test_ctrl_c_stops_it_cleanly(
    capsys: pytest.CaptureFixture[str], db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(self: object, poll_interval: float = 0.5) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("socketserver.BaseServer.serve_forever", interrupted)
    code, out, err = run_cli(capsys, "dashboard", "--store", db_url, "--port", "0")
    assert (code, err) == (0, "")
    assert re.fullmatch(
        r"Dashboard of sqlite:///\S+ on http://127\.0\.0\.1:\d+/ - press Ctrl-C to stop\.\n"
        r"Stopped\.\n",
        out,
    )


def test_the_store_url_is_shown_without_its_password(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    shown: list[str] = []

    def fake_run(store: KeyStore, **options: Any) -> int:
        shown.append(options["store_label"])
        return 0

    monkeypatch.setattr("m2m_middleware.dashboard.server.run", fake_run)
    monkeypatch.setattr(cli, "_open_store", lambda url: open_key_store("memory://"))
    code, _, _ = run_cli(capsys, "dashboard", "--store", "postgresql://app:hunter2@db/keys")
    assert code == 0
    assert shown == ["postgresql://app:***@db/keys"]


def test_run_serves_until_interrupted_on_a_free_port(sample: Sample) -> None:
    server = make_dashboard_server(sample.store, port=0, clock=lambda: sample.now)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/?days=2", timeout=10) as answer:
            assert answer.status == 200
            assert "billing" in answer.read().decode()
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/?days=nope", timeout=10)
        assert refused.value.code == 400
        refused.value.close()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_make_dashboard_server_refuses_public_addresses_itself(sample: Sample) -> None:
    with pytest.raises(DashboardError, match="not a loopback address"):
        make_dashboard_server(sample.store, host="0.0.0.0", port=0)
    server = make_dashboard_server(sample.store, host="0.0.0.0", port=0, public=True)
    server.server_close()


def test_run_prints_where_it_serves(sample: Sample, monkeypatch: pytest.MonkeyPatch) -> None:
    lines: list[str] = []
    monkeypatch.setattr(
        "socketserver.BaseServer.serve_forever",
        lambda self, poll_interval=0.5: (_ for _ in ()).throw(KeyboardInterrupt),
    )
    assert run(sample.store, port=0, store_label="memory://", out=lines.append) == 0
    assert lines[0].startswith("Dashboard of memory:// on http://127.0.0.1:")
    assert lines[1] == "Stopped."


@pytest.mark.slow
def test_the_command_serves_the_page_and_stops_on_ctrl_c(db_url: str, tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "m2m_middleware", "dashboard", "--store", db_url, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        found = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert found, line
        with urllib.request.urlopen(found.group(0), timeout=10) as answer:
            html = answer.read().decode()
        assert "billing" in html and "worker" in html
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0
    assert err == ""
    assert out == "Stopped.\n"


# -- real stores -----------------------------------------------------------------------


@pytest.mark.postgres
def test_the_page_of_a_postgresql_store(postgres_url: str) -> None:
    sample = sample_store(postgres_url)
    try:
        status, _, html = call(app_for(sample))
        assert status == "200 OK"
        for key_id in sample.key_ids.values():
            assert key_id in html
        assert html.count("<svg") == 5
        for secret in sample.secrets:
            assert secret not in html
    finally:
        sample.store.close()


@pytest.mark.slow
def test_an_unreachable_postgresql_store_is_a_503_page(caplog: pytest.LogCaptureFixture) -> None:
    store = open_key_store("postgresql://app:hunter2@127.0.0.1:1/test?connect_timeout=1")
    try:
        with caplog.at_level(logging.WARNING, "m2m_middleware.dashboard"):
            status, _, html = call(app_for(store))
    finally:
        store.close()
    assert status == "503 Service Unavailable"
    assert "hunter2" not in html and "127.0.0.1:1" not in html
    (record,) = caplog.records
    assert "no connection" in record.getMessage()
    assert "hunter2" not in record.getMessage()
