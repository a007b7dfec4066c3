"""The dashboard's one page: what the key store knows, for a person to read.

Clients and their keys, requests over time per client, keys about to run out
of uses or to expire, and the recent alerts. Only what ``KeyStore`` offers to
any reader is shown: key ids and records, usage rows, alerts. Never a key or
a hash (a ``KeyRecord`` holds neither). All stored text is escaped.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from urllib.parse import parse_qs, quote

from ..stores.base import KeyRecord, KeyStore
from ..syntax import check_client_id
from ..telemetry.records import Alert, UsageRow
from ..telemetry.tables import period_of
from .charts import SERIES, escape, usage_chart

DEFAULT_DAYS = 7
#: Hourly rows are kept ``usage_retention_days`` (90 by default), daily rows after that.
MAX_DAYS = 366
#: Up to this many days, one bar per hour; beyond, one per day.
HOURLY_UP_TO_DAYS = 2
DAYS_CHOICES = (1, 2, 7, 30, 90)
#: A key expiring within this is listed under "needs attention".
EXPIRY_SOON = timedelta(days=7)
#: A key with this few uses left is listed under "needs attention" whatever its pace.
LOW_USES = 100
#: One chart per client up to this many (busiest first); the rest are a filter away.
MAX_CLIENT_CHARTS = 12
ALERTS_SHOWN = 50
_MAX_CLIENT_LENGTH = 1000
_DAYS_RE = re.compile(r"[0-9]{1,4}")


class QueryError(ValueError):
    """A bad ``?client=`` or ``?days=``: the message says which and why."""


@dataclass(frozen=True, slots=True)
class Query:
    client: str | None = None
    days: int = DEFAULT_DAYS

    @property
    def granularity(self) -> str:
        return "hour" if self.days <= HOURLY_UP_TO_DAYS else "day"


def parse_query(query_string: str) -> Query:
    """``client`` (a client id) and ``days`` (1 to 366); anything else is refused by name."""
    try:
        fields = parse_qs(query_string, keep_blank_values=True, max_num_fields=10)
    except ValueError:
        raise QueryError("too many query parameters: only client and days are known") from None
    unknown = sorted(set(fields) - {"client", "days"})
    if unknown:
        shown = ", ".join(repr(name[:40]) for name in unknown[:3])
        raise QueryError(f"unknown query parameter {shown}: only client and days are known")
    for name, values in fields.items():
        if len(values) > 1:
            raise QueryError(f"{name}: give it once, not {len(values)} times")
    client = fields.get("client", [""])[0] or None
    if client is not None:
        if len(client) > _MAX_CLIENT_LENGTH:
            raise QueryError(f"client: at most {_MAX_CLIENT_LENGTH} characters")
        try:
            check_client_id(client)
        except ValueError as exc:
            raise QueryError(f"client: {exc}") from None
    days = DEFAULT_DAYS
    text = fields.get("days", [""])[0].strip()
    if text:
        if not _DAYS_RE.fullmatch(text) or not 1 <= int(text) <= MAX_DAYS:
            raise QueryError(
                f"days: expected a whole number of days from 1 to {MAX_DAYS}, got {text[:40]!r}"
            )
        days = int(text)
    return Query(client=client, days=days)


@dataclass(frozen=True, slots=True)
class ClientSummary:
    client_id: str
    keys: int = 0
    active_keys: int = 0
    allowed: int = 0
    denied: int = 0
    rate_limited: int = 0
    units: int = 0
    last_used_at: datetime | None = None

    @property
    def requests(self) -> int:
        return self.allowed + self.denied + self.rate_limited


@dataclass(frozen=True, slots=True)
class Attention:
    record: KeyRecord
    reason: str


@dataclass(frozen=True)
class DashboardData:
    query: Query
    now: datetime
    start: datetime
    keys: Sequence[KeyRecord]
    usage: Sequence[UsageRow]
    alerts: Sequence[Alert]
    #: Every client id known to the store, for the filter's choices.
    all_clients: Sequence[str] = field(default_factory=tuple)


def gather(store: KeyStore, query: Query, now: datetime) -> DashboardData:
    """Everything the page shows, read from ``store`` (its errors propagate)."""
    start = _window_start(query, now)
    every_key = store.list_keys()
    keys = [k for k in every_key if query.client is None or k.client_id == query.client]
    usage = store.usage(client_id=query.client, since=start, granularity=query.granularity)
    alerts = store.alerts(since=now - timedelta(days=query.days), limit=ALERTS_SHOWN)
    if query.client is not None:
        alerts = [a for a in alerts if a.subject == query.client or _alert_key_of(a, keys)]
    clients = sorted({k.client_id for k in every_key} | {r.client_id for r in usage})
    return DashboardData(query, now, start, keys, usage, alerts, clients)


def _alert_key_of(alert: Alert, keys: Sequence[KeyRecord]) -> bool:
    """An ``ended_keys`` alert names a key id: it belongs to that key's client."""
    return any(alert.subject == k.key_id for k in keys)


def _window_start(query: Query, now: datetime) -> datetime:
    if query.granularity == "hour":
        return period_of(now - timedelta(days=query.days), "hour")
    return period_of(now - timedelta(days=query.days - 1), "day")


def summarize(data: DashboardData) -> list[ClientSummary]:
    """One line per client: its keys and its requests in the window, busiest first."""
    found: dict[str, ClientSummary] = {}
    for record in data.keys:
        one = found.get(record.client_id) or ClientSummary(record.client_id)
        last = one.last_used_at
        if record.last_used_at is not None and (last is None or record.last_used_at > last):
            last = record.last_used_at
        found[record.client_id] = replace(
            one,
            keys=one.keys + 1,
            active_keys=one.active_keys + record.is_active(data.now),
            last_used_at=last,
        )
    for row in data.usage:
        one = found.get(row.client_id) or ClientSummary(row.client_id)
        found[row.client_id] = replace(
            one,
            allowed=one.allowed + row.allowed,
            denied=one.denied + row.denied,
            rate_limited=one.rate_limited + row.rate_limited,
            units=one.units + row.units,
        )
    return sorted(found.values(), key=lambda s: (-s.requests, s.client_id))


def needing_attention(data: DashboardData) -> list[Attention]:
    """Active keys about to stop: few uses left, or an expiry within :data:`EXPIRY_SOON`.

    "Few" is :data:`LOW_USES`, or fewer uses than the key was allowed in the
    window shown: at that pace it runs out within another such window.
    """
    used: dict[str, int] = {}
    for row in data.usage:
        if row.key_id is not None:
            used[row.key_id] = used.get(row.key_id, 0) + row.allowed
    found = []
    for record in data.keys:
        if not record.is_active(data.now):
            continue
        reasons = []
        left = record.remaining_uses
        if left is not None and (left <= LOW_USES or left <= used.get(record.key_id, 0)):
            pace = used.get(record.key_id, 0)
            reasons.append(
                f"{left} use{'s' if left != 1 else ''} left"
                + (f" ({pace} used in the last {_days(data.query.days)})" if pace else "")
            )
        if record.expires_at is not None and record.expires_at - data.now <= EXPIRY_SOON:
            reasons.append(f"expires in {_duration(record.expires_at - data.now)}")
        if reasons:
            found.append(Attention(record, "; ".join(reasons)))
    return sorted(found, key=lambda a: (a.record.expires_at or data.now + EXPIRY_SOON * 2,))


# -- HTML ------------------------------------------------------------------------

STYLE = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: #1f2933; background: #f5f7fa; }
header { background: #1f2933; color: #f5f7fa; padding: 14px 28px; display: flex;
         align-items: baseline; gap: 18px; flex-wrap: wrap; }
header h1 { font-size: 18px; margin: 0; font-weight: 600; }
header .store { color: #cbd2d9; font-size: 13px; }
main { padding: 20px 28px 40px; max-width: 1280px; margin: 0 auto; }
section { background: #fff; border: 1px solid #e4e7eb; border-radius: 8px;
          padding: 16px 20px; margin-bottom: 18px; }
h2 { font-size: 15px; margin: 0 0 12px; }
form.filter { display: flex; gap: 14px; align-items: center; flex-wrap: wrap;
              margin-bottom: 18px; }
form.filter label { font-weight: 600; }
form.filter select, form.filter button { font: inherit; padding: 4px 8px; }
.totals { display: flex; gap: 12px; flex-wrap: wrap; margin-bottom: 18px; }
.total { background: #fff; border: 1px solid #e4e7eb; border-radius: 8px; padding: 10px 16px;
         min-width: 150px; }
.total b { display: block; font-size: 22px; }
.total span { color: #52606d; font-size: 12px; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr));
          gap: 12px; }
.chart { border: 1px solid #eef0f2; border-radius: 6px; padding: 6px; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 6px 8px; border-bottom: 1px solid #eef0f2;
         vertical-align: top; }
th { font-size: 12px; color: #52606d; font-weight: 600; white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
code { font: 12px/1.3 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.status { display: inline-block; padding: 0 8px; border-radius: 10px; font-size: 12px; }
.status-active { background: #e3f9e5; color: #05400a; }
.status-revoked, .status-expired, .status-used_up { background: #ffe3e3; color: #610404; }
.empty, .note { color: #52606d; }
a { color: #0b69a3; }
"""

#: The Content-Security-Policy allows this one stylesheet by its hash: no other
#: style, script, image, frame or connection can run, even if escaping failed.
STYLE_HASH = "sha256-" + base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()


def _when(value: datetime | None, missing: str = "never") -> str:
    if value is None:
        return missing
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _days(days: int) -> str:
    return "day" if days == 1 else f"{days} days"


def _duration(span: timedelta) -> str:
    seconds = max(int(span.total_seconds()), 0)
    if seconds >= 86400:
        return f"{seconds // 86400}d {seconds % 86400 // 3600}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60}m"
    return f"{seconds // 60}m"


def _link(query: Query, **changes: object) -> str:
    values: dict[str, object] = {"client": query.client, "days": query.days, **changes}
    parts = [f"{name}={quote(str(value), safe='')}" for name, value in values.items() if value]
    return escape("?" + "&".join(parts))


def render(data: DashboardData, *, store_label: str) -> str:
    """The page as HTML (every stored value escaped)."""
    query = data.query
    summaries = summarize(data)
    scope = f"client {query.client}" if query.client else "all clients"
    body = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="referrer" content="no-referrer">',
        f"<title>m2m dashboard: {escape(scope)}</title>",
        f"<style>{STYLE}</style></head><body>",
        "<header><h1>m2m-middleware dashboard</h1>",
        f'<span class="store">{escape(store_label)} &middot; read-only &middot; '
        f"{escape(_when(data.now))}</span></header><main>",
        _filter_form(data),
        _totals(summaries, query),
        _charts(data, summaries),
        _clients_table(summaries, query),
        _attention(data),
        _keys_table(data),
        _alerts(data),
        "</main></body></html>",
    ]
    return "\n".join(body)


def _filter_form(data: DashboardData) -> str:
    query = data.query
    clients = ['<option value="">all clients</option>']
    choices = list(data.all_clients)
    if query.client is not None and query.client not in choices:
        choices.append(query.client)
    for client in choices:
        selected = " selected" if client == query.client else ""
        clients.append(f'<option value="{escape(client)}"{selected}>{escape(client)}</option>')
    days = sorted({*DAYS_CHOICES, query.days})
    day_options = [
        f'<option value="{d}"{" selected" if d == query.days else ""}>last {_days(d)}</option>'
        for d in days
    ]
    return (
        '<form class="filter" method="get" action="/">'
        f'<label for="client">Client</label><select id="client" name="client">'
        f"{''.join(clients)}</select>"
        f'<label for="days">Period</label><select id="days" name="days">'
        f"{''.join(day_options)}</select>"
        '<button type="submit">Show</button>'
        + (' <a href="/">reset</a>' if query.client or query.days != DEFAULT_DAYS else "")
        + "</form>"
    )


def _totals(summaries: Sequence[ClientSummary], query: Query) -> str:
    sums = {
        "requests": sum(s.requests for s in summaries),
        "allowed": sum(s.allowed for s in summaries),
        "denied": sum(s.denied for s in summaries),
        "rate-limited (429)": sum(s.rate_limited for s in summaries),
        "cost units": sum(s.units for s in summaries),
    }
    cells = [
        f'<div class="total"><b>{value}</b><span>{escape(label)}, last {_days(query.days)}'
        "</span></div>"
        for label, value in sums.items()
    ]
    clients = len(summaries)
    cells.insert(0, f'<div class="total"><b>{clients}</b><span>clients</span></div>')
    return f'<div class="totals">{"".join(cells)}</div>'


def _charts(data: DashboardData, summaries: Sequence[ClientSummary]) -> str:
    query = data.query
    by_client: dict[str, list[UsageRow]] = {}
    for row in data.usage:
        by_client.setdefault(row.client_id, []).append(row)
    shown = [s.client_id for s in summaries if s.requests][:MAX_CLIENT_CHARTS]
    if query.client is not None and query.client not in shown:
        shown = [query.client]
    charts = []
    if query.client is None:
        charts.append(
            usage_chart(
                data.usage,
                start=data.start,
                end=data.now,
                granularity=query.granularity,
                title=f"All clients, last {_days(query.days)}",
                chart_id="chart-all",
            )
        )
    for index, client in enumerate(shown):
        charts.append(
            usage_chart(
                by_client.get(client, []),
                start=data.start,
                end=data.now,
                granularity=query.granularity,
                title=f"{client}, last {_days(query.days)}",
                chart_id=f"chart-{index}",
            )
        )
    busy = sum(1 for s in summaries if s.requests)
    more = ""
    if busy > len(shown) and query.client is None:
        more = (
            f'<p class="note">{busy - len(shown)} more clients had requests: '
            "choose one above to see its chart.</p>"
        )
    inner = "".join(f'<div class="chart">{chart}</div>' for chart in charts)
    legend = ", ".join(label for _, label, _ in SERIES)
    return (
        '<section id="requests"><h2>Requests over time</h2>'
        f'<p class="note">Per {"hour" if query.granularity == "hour" else "day"}, '
        f"stacked: {escape(legend)}. Counts are written every few seconds by the "
        f'running apps.</p><div class="charts">{inner}</div>{more}</section>'
    )


def _clients_table(summaries: Sequence[ClientSummary], query: Query) -> str:
    if not summaries:
        rows = '<tr><td colspan="8" class="empty">No clients yet.</td></tr>'
    else:
        rows = "".join(
            "<tr>"
            f'<td><a href="{_link(query, client=s.client_id)}">{escape(s.client_id)}</a></td>'
            f'<td class="num">{s.active_keys} / {s.keys}</td>'
            f'<td class="num">{s.requests}</td><td class="num">{s.allowed}</td>'
            f'<td class="num">{s.denied}</td><td class="num">{s.rate_limited}</td>'
            f'<td class="num">{s.units}</td><td>{escape(_when(s.last_used_at))}</td>'
            "</tr>"
            for s in summaries
        )
    return (
        f'<section id="clients"><h2>Clients (last {_days(query.days)})</h2><table><thead><tr>'
        '<th scope="col">Client</th><th scope="col" class="num">Active / keys</th>'
        '<th scope="col" class="num">Requests</th><th scope="col" class="num">Allowed</th>'
        '<th scope="col" class="num">Denied</th><th scope="col" class="num">429</th>'
        '<th scope="col" class="num">Units</th><th scope="col">Last used</th>'
        f"</tr></thead><tbody>{rows}</tbody></table></section>"
    )


def _status(record: KeyRecord, now: datetime) -> str:
    status = record.status(now)
    label = status.replace("_", " ")
    return f'<span class="status status-{escape(status)}">{escape(label)}</span>'


def _key_cells(record: KeyRecord, now: datetime) -> str:
    uses = "unlimited" if record.remaining_uses is None else str(record.remaining_uses)
    return (
        f"<td><code>{escape(record.key_id)}</code></td><td>{escape(record.client_id)}</td>"
        f"<td>{escape(record.name or '')}</td>"
        f"<td>{escape(' '.join(sorted(record.scopes)))}</td>"
        f"<td>{escape(record.tier or '')}</td><td>{_status(record, now)}</td>"
        f"<td>{escape(_when(record.expires_at))}</td>"
        f'<td class="num">{escape(uses)}</td><td>{escape(_when(record.last_used_at))}</td>'
    )


_KEY_HEADINGS = (
    '<th scope="col">Key id</th><th scope="col">Client</th><th scope="col">Name</th>'
    '<th scope="col">Scopes</th><th scope="col">Tier</th><th scope="col">Status</th>'
    '<th scope="col">Expires</th><th scope="col" class="num">Uses left</th>'
    '<th scope="col">Last used</th>'
)


def _attention(data: DashboardData) -> str:
    found = needing_attention(data)
    if not found:
        rows = (
            '<tr><td colspan="10" class="empty">No active key is close to its quota '
            "or its expiry.</td></tr>"
        )
    else:
        rows = "".join(
            f"<tr>{_key_cells(a.record, data.now)}<td>{escape(a.reason)}</td></tr>" for a in found
        )
    return (
        '<section id="attention"><h2>Keys close to their quota or expiry</h2>'
        f'<table><thead><tr>{_KEY_HEADINGS}<th scope="col">Why</th></tr></thead>'
        f"<tbody>{rows}</tbody></table></section>"
    )


def _keys_table(data: DashboardData) -> str:
    if not data.keys:
        rows = '<tr><td colspan="9" class="empty">No keys.</td></tr>'
    else:
        rows = "".join(f"<tr>{_key_cells(k, data.now)}</tr>" for k in data.keys)
    return (
        f'<section id="keys"><h2>Keys ({len(data.keys)})</h2>'
        f"<table><thead><tr>{_KEY_HEADINGS}</tr></thead><tbody>{rows}</tbody></table></section>"
    )


def _alerts(data: DashboardData) -> str:
    if not data.alerts:
        rows = (
            f'<tr><td colspan="5" class="empty">No alerts in the last '
            f"{_days(data.query.days)}.</td></tr>"
        )
    else:
        rows = "".join(
            f"<tr><td>{escape(_when(a.fired_at, 'unknown'))}</td><td>{escape(a.kind)}</td>"
            f"<td>{escape(a.subject)}</td>"
            f'<td class="num">{a.count} in {escape(_duration(timedelta(seconds=a.window_seconds)))}'
            f"</td><td>{escape(a.detail)}</td></tr>"
            for a in data.alerts
        )
    return (
        '<section id="alerts"><h2>Recent alerts</h2><table><thead><tr>'
        '<th scope="col">Fired</th><th scope="col">Kind</th><th scope="col">Subject</th>'
        '<th scope="col" class="num">Count</th><th scope="col">Detail</th></tr></thead>'
        f"<tbody>{rows}</tbody></table></section>"
    )


def message_page(title: str, message: str) -> str:
    """A small page for an error answer (400, 404, 405, 503): the same style, no data."""
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>"
        "<header><h1>m2m-middleware dashboard</h1></header><main>"
        f"<section><h2>{escape(title)}</h2><p>{escape(message)}</p>"
        '<p><a href="/">Back to the dashboard</a></p></section></main></body></html>'
    )


__all__ = [
    "DashboardData",
    "Query",
    "QueryError",
    "gather",
    "message_page",
    "needing_attention",
    "parse_query",
    "render",
    "summarize",
]
