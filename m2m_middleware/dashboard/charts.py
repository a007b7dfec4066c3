"""Requests over time as inline SVG, drawn on the server.

Hand-written rather than a plotting library: the chart is a few dozen
rectangles and lines, and an SVG string needs no dependency, no JavaScript and
no CDN, so the page works under ``default-src 'none'`` and inside the Django
admin alike. Colours are presentation attributes, not a stylesheet, so a chart
looks the same wherever it is pasted. Every piece of text goes through
:func:`escape`: client ids and names are chosen by whoever created a key.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from ..telemetry.records import UsageRow
from ..telemetry.tables import period_of

#: (field of UsageRow, label, colour): the Okabe-Ito palette, told apart also by
#: people with the common colour-vision deficiencies; stacked bottom to top.
SERIES = (
    ("allowed", "allowed", "#0072B2"),
    ("denied", "denied", "#E69F00"),
    ("rate_limited", "rate-limited (429)", "#D55E00"),
)

WIDTH = 760
HEIGHT = 230
_LEFT, _RIGHT, _TOP, _BOTTOM = 60, 16, 36, 46
_STEPS = {"hour": timedelta(hours=1), "day": timedelta(days=1)}
#: Characters of a chart's heading that fit left of the legend.
_TITLE_ROOM = 34
#: More x-axis labels than this collide.
_MAX_LABELS = 8


def escape(text: object) -> str:
    """Text for HTML and SVG content and attribute values alike."""
    return html.escape(str(text), quote=True)


@dataclass(frozen=True, slots=True)
class Bucket:
    start: datetime
    allowed: int = 0
    denied: int = 0
    rate_limited: int = 0

    @property
    def total(self) -> int:
        return self.allowed + self.denied + self.rate_limited


def buckets(
    rows: Iterable[UsageRow], *, start: datetime, end: datetime, granularity: str
) -> list[Bucket]:
    """One bucket per period from ``start``'s up to and including ``end``'s, empty ones too:
    a gap in traffic must show as a gap, not be closed up."""
    step = _STEPS[granularity]
    first, last = period_of(start, granularity), period_of(end, granularity)
    totals: dict[datetime, list[int]] = {}
    moment = first
    while moment <= last:
        totals[moment] = [0, 0, 0]
        moment += step
    for row in rows:
        counts = totals.get(period_of(row.period_start, granularity))
        if counts is not None:
            counts[0] += row.allowed
            counts[1] += row.denied
            counts[2] += row.rate_limited
    return [Bucket(moment, *counts) for moment, counts in totals.items()]


def nice_step(value: int, ticks: int = 4) -> int:
    """A whole grid step of 1, 2, 2.5 or 5 times a power of ten, so that ``ticks``
    steps reach ``value`` (a step of 2.5 only from 25 up: counts are whole)."""
    scale = 1
    while True:
        for factor in (1, 2, 2.5, 5):
            step = factor * scale
            if step == int(step) and step * ticks >= value:
                return int(step)
        scale *= 10


def _label(moment: datetime, granularity: str) -> str:
    """The date for a day; for an hour the time, with the date at midnight."""
    if granularity == "hour":
        return moment.strftime("%d %b %H:00") if moment.hour == 0 else moment.strftime("%H:00")
    return moment.strftime("%d %b")


def _describe(bucket: Bucket, granularity: str) -> str:
    when = bucket.start.strftime("%Y-%m-%d %H:00 UTC" if granularity == "hour" else "%Y-%m-%d")
    return (
        f"{when}: {bucket.allowed} allowed, {bucket.denied} denied, "
        f"{bucket.rate_limited} rate-limited"
    )


def usage_chart(
    rows: Sequence[UsageRow],
    *,
    start: datetime,
    end: datetime,
    granularity: str,
    title: str,
    chart_id: str,
) -> str:
    """A stacked bar chart of allowed, denied and rate-limited requests per period.

    ``chart_id`` makes the ids that tie the accessible title and description to
    the ``<svg>``; it must be unique on the page and is never taken from stored text.
    """
    data = buckets(rows, start=start, end=end, granularity=granularity)
    step = nice_step(max((b.total for b in data), default=0))
    top = step * 4
    plot_w, plot_h = WIDTH - _LEFT - _RIGHT, HEIGHT - _TOP - _BOTTOM
    slot = plot_w / max(len(data), 1)
    bar_w = max(slot * 0.8, 1.0)
    base_y = _TOP + plot_h
    totals = {name: sum(getattr(b, name) for b in data) for name, _, _ in SERIES}
    summary = ", ".join(f"{totals[name]} {label}" for name, label, _ in SERIES)
    unit = "hour" if granularity == "hour" else "day"
    description = (
        f"Requests per {unit} from {_describe_span(data, granularity)}, stacked: {summary}."
    )

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="usage-chart" role="img" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" preserveAspectRatio="xMidYMid meet" '
        f'aria-labelledby="{chart_id}-title {chart_id}-desc" '
        f'font-family="system-ui, -apple-system, Segoe UI, Roboto, sans-serif" font-size="13">',
        f'<title id="{chart_id}-title">{escape(title)}</title>',
        f'<desc id="{chart_id}-desc">{escape(description)}</desc>',
        f'<text x="{_LEFT}" y="16" font-size="15" font-weight="600" fill="#1f2933">'
        f"{escape(_shortened(title))}</text>",
    ]
    parts.extend(_legend())
    # Grid lines and the y axis: 0, a quarter, ..., the top.
    for i in range(5):
        y = base_y - plot_h * i / 4
        shown = str(step * i)
        parts.append(
            f'<line x1="{_LEFT}" y1="{y:.1f}" x2="{WIDTH - _RIGHT}" y2="{y:.1f}" '
            f'stroke="{"#9aa5b1" if i == 0 else "#e4e7eb"}" stroke-width="1"/>'
        )
        parts.append(
            f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#52606d">'
            f"{escape(shown)}</text>"
        )
    parts.append(
        f'<text x="15" y="{_TOP + plot_h / 2:.1f}" text-anchor="middle" fill="#52606d" '
        f'transform="rotate(-90 15 {_TOP + plot_h / 2:.1f})">requests</text>'
    )
    # One group per series, so a reader (or a test) finds each one whole.
    for name, label, colour in SERIES:
        parts.append(
            f'<g class="series series-{name}" data-series="{name}" fill="{colour}">'
            f"<title>{escape(label)}: {totals[name]}</title>"
        )
        for index, bucket in enumerate(data):
            value = getattr(bucket, name)
            if not value:
                continue
            below = sum(getattr(bucket, lower) for lower, _, _ in SERIES[: _index(name)])
            y_top = base_y - plot_h * (below + value) / top
            height = plot_h * value / top
            x = _LEFT + index * slot + (slot - bar_w) / 2
            parts.append(
                f'<rect x="{x:.1f}" y="{y_top:.1f}" width="{bar_w:.1f}" '
                f'height="{max(height, 0.5):.1f}">'
                f"<title>{escape(_describe(bucket, granularity))}</title></rect>"
            )
        parts.append("</g>")
    # x labels, evenly thinned.
    every = max(1, -(-len(data) // _MAX_LABELS))
    for index in range(0, len(data), every):
        x = _LEFT + index * slot + slot / 2
        parts.append(
            f'<text x="{x:.1f}" y="{base_y + 18}" text-anchor="middle" fill="#52606d">'
            f"{escape(_label(data[index].start, granularity))}</text>"
        )
    parts.append(
        f'<text x="{_LEFT + plot_w / 2:.1f}" y="{HEIGHT - 6}" text-anchor="middle" '
        f'fill="#52606d">time (UTC, per {unit})</text>'
    )
    if not any(b.total for b in data):
        parts.append(
            f'<text x="{_LEFT + plot_w / 2:.1f}" y="{_TOP + plot_h / 2:.1f}" '
            f'text-anchor="middle" fill="#7b8794" font-size="13">'
            "No requests in this period</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _shortened(title: str) -> str:
    """The heading drawn beside the legend: a long client id would run into it.
    The whole title stays in ``<title>``, which screen readers and tooltips use."""
    return title if len(title) <= _TITLE_ROOM else title[: _TITLE_ROOM - 1] + "\u2026"


def _index(name: str) -> int:
    return [n for n, _, _ in SERIES].index(name)


def _describe_span(data: Sequence[Bucket], granularity: str) -> str:
    if not data:
        return "no period"
    pattern = "%Y-%m-%d %H:00 UTC" if granularity == "hour" else "%Y-%m-%d"
    return f"{data[0].start.strftime(pattern)} to {data[-1].start.strftime(pattern)}"


def _legend() -> list[str]:
    parts = []
    x = WIDTH - _RIGHT - 340
    for _name, label, colour in SERIES:
        parts.append(
            f'<rect x="{x}" y="6" width="12" height="12" rx="2" fill="{colour}"/>'
            f'<text x="{x + 16}" y="16" fill="#323f4b">{escape(label)}</text>'
        )
        x += 16 + 7 * len(label) + 14
    return parts


__all__ = ["SERIES", "Bucket", "buckets", "escape", "nice_step", "usage_chart"]
