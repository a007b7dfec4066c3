"""What telemetry keeps: usage rows and alerts, as the stores write and read them."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

GRANULARITIES = ("hour", "day", "month")


@dataclass(frozen=True, slots=True)
class UsageRow:
    """Requests of one client with one key in one period (CONTRACT.md "Usage").

    ``key_id`` is None for a token from an outside identity provider (it names
    no key of ours). ``period_start`` is an aware UTC datetime: the start of
    the hour, day or month the row counts. ``denied`` counts the refusals of a
    known client other than its rate limits (scopes, uses, addresses,
    signatures), ``rate_limited`` its 429 ``rate_limited`` answers, ``units``
    the cost units its admitted requests were charged.
    """

    client_id: str
    key_id: str | None
    period_start: datetime
    allowed: int = 0
    denied: int = 0
    rate_limited: int = 0
    units: int = 0

    @property
    def requests(self) -> int:
        return self.allowed + self.denied + self.rate_limited

    def to_dict(self) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            "key_id": self.key_id,
            "period_start": self.period_start.isoformat(),
            "allowed": self.allowed,
            "denied": self.denied,
            "rate_limited": self.rate_limited,
            "units": self.units,
        }


@dataclass(frozen=True, slots=True)
class Alert:
    """Unusual activity, reported once per window per subject (CONTRACT.md "Metrics and alerts").

    ``kind``: ``auth_failures`` (``subject`` a source address), ``client_failures``,
    ``rate_limited`` and ``traffic_spike`` (a client id), ``ended_keys`` (a key id:
    a revoked or expired key still tried). ``count`` is what was seen in
    ``window_seconds``; ``detail`` one line for a person. Nothing in it is a secret.
    """

    kind: str
    subject: str
    count: int
    window_seconds: int
    detail: str
    fired_at: datetime | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "subject": self.subject,
            "count": self.count,
            "window_seconds": self.window_seconds,
            "detail": self.detail,
            "fired_at": None if self.fired_at is None else self.fired_at.isoformat(),
        }
