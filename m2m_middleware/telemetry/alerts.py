"""Alerts on unusual activity: each rule O(1) per request, once per window per subject.

Five rules, each with its own threshold (``settings.alert_thresholds``, from
the ``alert_*`` settings in limits notation; None turns a rule off):

- ``auth_failures``, per source address (an IPv6 one per /64; ``"unknown"`` when none):
  401s other than ``missing_credentials`` (a key or token that is not one, a
  bad request signature), and the 429s of an address that ``source_limits``
  already shut out. Those count too: with ``source_limits`` tighter than the
  alert, an address guessing a thousand keys a minute would otherwise show as
  the few 401s it gets before its budget is spent, and never alert.
- ``client_failures``, per client id: refusals of a known client (scopes,
  addresses, a body too large to sign, ``quota_exceeded``), the 401s of a
  known credential (a revoked or expired key, a bad signature by a known key)
  and each framework's ``require_scopes`` refusals. ``quota_exceeded`` counts:
  unlike a rate limit, no waiting cures it, so a client that keeps calling with
  a used-up key is broken or runaway. Neither ``rate_limited`` (its own rule)
  nor ``temporarily_unavailable`` counts (an outage is ours, not the client's).
- ``rate_limited``, per client id: its 429 ``rate_limited`` answers.
- ``ended_keys``, per key id: a revoked or expired key (or a token issued from
  one) still being tried (``Denied.key_ended``). A token past its own ``exp``
  is not an ended key: clients renew tokens late all the time.
- ``traffic_spike``, per client id: its requests in the current
  ``alert_traffic_window`` over ``alert_traffic_spike`` times its baseline,
  once the window holds ``alert_traffic_minimum`` of them (see :class:`_Traffic`).

Fixed windows, not sliding ones: a subject's state is its window's number and
a count, so a request costs a dictionary lookup and an addition, and the
threshold is crossed exactly once per window: the request whose count *equals*
it fires. The four refusal rules update under one lock: unlocked, a lost
``count += 1`` would be harmless, but two threads could both see the count
equal the threshold and fire twice. The traffic rule, on every admitted
request, takes its lock only to start a window or to fire (see
:meth:`_Traffic.hit`). Alerts fire after the locks are let go, so a slow or
re-entrant ``on_alert`` callable holds up no other request.

Memory is bounded: each rule tracks at most :data:`MAX_SUBJECTS` subjects.
The refusal rules drop the least recently seen first, so an attacker rotating
source addresses keeps only its own short-lived entries cycling, and an
address that keeps failing stays tracked; the traffic rule drops the client
whose window began longest ago. A subject dropped and seen again in the same
window starts from zero: only when more than that many subjects are active in
one window can one fire twice in it.

Hand-written rather than on the ``limits`` counters the rate limits use:
their memory storage keeps every key until its window expires (no cap on the
subjects one window can hold), reads the time itself (no clock to inject), and
answers only whether a limit is exhausted, not which request crossed it.
"""

from __future__ import annotations

import math
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from ipaddress import IPv6Address, IPv6Network, ip_address

from ..outcome import Allowed, Denied
from ..settings import Settings
from .records import Alert

#: Subjects each rule tracks at most (see the module docstring).
MAX_SUBJECTS = 10_000

#: Weight of the window just ended in a client's traffic baseline: its
#: exponentially weighted mean then mostly remembers the last dozen windows or
#: so, and a sustained new level stops alerting after the window it began in.
BASELINE_WEIGHT = 0.2

#: The subject of ``auth_failures`` when the server reported no address.
UNKNOWN_ADDRESS = "unknown"

#: Refusals of a known client that are not ``client_failures``: ``rate_limited``
#: has a rule of its own, and an outage is the service's, not the client's doing.
_NOT_CLIENT_FAILURES = frozenset({"rate_limited", "temporarily_unavailable"})


def source_of(address: str | None) -> str:
    """The subject of ``auth_failures`` for ``address``: an IPv4 address itself, an
    IPv6 one as its /64 (the smallest network one party is given: a host or a home
    line holds all 2**64 of its addresses, so per address one guess each would
    never reach a threshold), ``"unknown"`` for none."""
    if not address:
        return UNKNOWN_ADDRESS
    if ":" not in address:
        return address
    try:
        parsed = ip_address(address)
    except ValueError:
        return address
    if not isinstance(parsed, IPv6Address):
        return address
    if parsed.ipv4_mapped is not None:  # a dual-stack socket's IPv4 client
        return str(parsed.ipv4_mapped)
    return str(IPv6Network((int(parsed) >> 64 << 64, 64)))


class _Rule:
    """One threshold over fixed windows, per subject. Called under the lock."""

    __slots__ = ("cap", "kind", "limit", "seen", "window")

    def __init__(self, kind: str, limit: int, window: int, cap: int) -> None:
        self.kind = kind
        self.limit = limit
        self.window = window
        self.cap = cap
        #: subject -> [window number, count], least recently seen first.
        self.seen: OrderedDict[str, list[int]] = OrderedDict()

    def hit(self, subject: str, now: float) -> bool:
        """Count one for ``subject``; True exactly when its count reaches the limit."""
        number = int(now // self.window)
        seen = self.seen
        state = seen.get(subject)
        if state is None:
            if len(seen) >= self.cap:
                seen.popitem(last=False)
            seen[subject] = state = [number, 0]
        else:
            seen.move_to_end(subject)
            if state[0] != number:
                state[0], state[1] = number, 0
        state[1] += 1
        return state[1] == self.limit


class _Usual:
    """One client's traffic: its current window, and its baseline so far."""

    __slots__ = ("baseline", "count", "ended", "fires_at", "number")

    def __init__(self, number: float) -> None:
        self.number = number
        self.count = 0
        #: Windows of the client's that have ended (counted up to 2: all that matters).
        self.ended = 0
        self.baseline = 0.0
        #: The count at which this window fires; infinite with no baseline, or fired.
        self.fires_at = math.inf


class _Traffic:
    """A client's requests per window against its own baseline.

    The baseline is an exponentially weighted mean of the counts of the
    earlier windows in which the client made requests. Windows with none do
    not pull it down: a job that runs once an hour is compared with its own
    earlier runs, not with the idle minutes between them. The first window a
    client is seen in is no baseline: it was seen from some point in it, so
    that count falls short of the client's rate (and every busy client would
    alert in its second window after each restart). So a client can spike
    from its third window on, once one full window is behind it.
    """

    __slots__ = ("cap", "lock", "minimum", "seen", "spike", "window")

    def __init__(self, spike: float, minimum: int, window: int, cap: int) -> None:
        self.spike = spike
        self.minimum = minimum
        self.window = window
        self.cap = cap
        #: client id -> its traffic, the client whose window began longest ago first.
        self.seen: OrderedDict[str, _Usual] = OrderedDict()
        #: Taken only to add a client, start its new window, or fire: every admitted
        #: request passes here, and most of them just add one to their window's count.
        self.lock = threading.Lock()

    def hit(self, subject: str, now: float) -> tuple[int, float] | None:
        """Count one request; (count, baseline) when this one crosses the spike.

        Unlocked, two threads' additions can lose one (harmless for a heuristic);
        the window's start and its firing are under the lock, so no window fires twice.
        """
        number = now // self.window  # a float: int() would cost every request a call
        usual = self.seen.get(subject)
        if usual is None or usual.number != number:
            with self.lock:
                usual = self._window(subject, number)
        usual.count += 1
        if usual.count < usual.fires_at:
            return None
        with self.lock:
            if usual.count < usual.fires_at:
                return None  # another thread fired this window
            usual.fires_at = math.inf  # once per window
            return usual.count, usual.baseline

    def _window(self, subject: str, number: float) -> _Usual:
        """``subject``'s traffic in window ``number``, started if it is new. Under the lock."""
        seen = self.seen
        usual = seen.get(subject)
        if usual is None:
            if len(seen) >= self.cap:
                seen.popitem(last=False)
            seen[subject] = usual = _Usual(number)
        elif number > usual.number:  # never back: a thread late with an older clock reading
            self._roll(usual, number)
            seen.move_to_end(subject)
        return usual

    def _roll(self, usual: _Usual, number: float) -> None:
        """A new window: the one that ended becomes part of the baseline."""
        if usual.ended == 1:
            usual.baseline = float(usual.count)
        elif usual.ended > 1:
            usual.baseline += BASELINE_WEIGHT * (usual.count - usual.baseline)
        usual.ended = min(usual.ended + 1, 2)
        usual.number, usual.count = number, 0
        if usual.ended == 2:
            usual.fires_at = max(self.minimum, math.floor(self.spike * usual.baseline) + 1)


class Alerts:
    def __init__(
        self,
        settings: Settings,
        fire: Callable[[Alert], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fire = fire
        self._clock = clock
        self._lock = threading.Lock()
        self._rules: dict[str, _Rule] = {}
        cap = MAX_SUBJECTS  # read at construction, so a test can lower it
        for kind, threshold in settings.alert_thresholds.items():
            if threshold is not None:
                count, window = threshold
                self._rules[kind] = _Rule(kind, count, window, cap)
        self._auth = self._rules.get("auth_failures")
        self._client = self._rules.get("client_failures")
        self._limited = self._rules.get("rate_limited")
        self._ended = self._rules.get("ended_keys")
        self._traffic: _Traffic | None = None
        if settings.alert_traffic_spike:
            self._traffic = _Traffic(
                float(settings.alert_traffic_spike),
                settings.alert_traffic_minimum,
                settings.alert_traffic_window,
                cap,
            )
        _live.add(self)

    def observe(self, outcome: Allowed | Denied, address: str | None) -> None:
        """One decision of the middleware: ``address`` is the client's, as the trusted
        proxies report it (None when unknown)."""
        client = outcome.client
        traffic = self._traffic
        if client is not None and traffic is not None:
            crossed = traffic.hit(client.client_id, self._clock())
            if crossed is not None:
                self._fire(self._spike_alert(client.client_id, *crossed))
        if outcome.allowed:  # the hot path: only the traffic rule looks at it
            return
        denied: Denied = outcome  # type: ignore[assignment]
        fired: list[Alert] = []
        with self._lock:
            now = self._clock()
            if client is not None:
                error = denied.error
                if error == "rate_limited":
                    rule = self._limited
                    if rule is not None and rule.hit(client.client_id, now):
                        fired.append(self._rate_limited_alert(client.client_id))
                elif error not in _NOT_CLIENT_FAILURES:
                    self._client_failed(client.client_id, error, now, fired)
            elif denied.status == 401:
                if denied.error != "missing_credentials":
                    self._auth_failed(address, now, fired)
                    tried = denied.tried
                    if tried is not None:
                        self._client_failed(tried.client_id, denied.error, now, fired)
                        if denied.key_ended and tried.key_id is not None:
                            rule = self._ended
                            if rule is not None and rule.hit(tried.key_id, now):
                                fired.append(
                                    self._ended_alert(tried.key_id, tried.client_id, denied.detail)
                                )
            elif denied.error == "rate_limited":  # source_limits shut this address out
                self._auth_failed(address, now, fired)
        for alert in fired:
            self._fire(alert)

    def refused(self, denied: Denied) -> None:
        """An admitted request that the application refused (``require_scopes``)."""
        client = denied.client
        if client is None or self._client is None:
            return
        fired: list[Alert] = []
        with self._lock:
            self._client_failed(client.client_id, denied.error, self._clock(), fired)
        for alert in fired:
            self._fire(alert)

    def authentication_failed(self, address: str | None) -> None:
        """A failed authentication that is no request's decision: the token endpoint's
        ``invalid_client``, or its refusal of an address over ``source_limits``."""
        if self._auth is None:
            return
        fired: list[Alert] = []
        with self._lock:
            self._auth_failed(address, self._clock(), fired)
        for alert in fired:
            self._fire(alert)

    def tracked(self) -> dict[str, int]:
        """How many subjects each rule that is on keeps a window for (at most
        :data:`MAX_SUBJECTS`): what an operator or a test looks at for memory."""
        with self._lock:
            counts = {kind: len(rule.seen) for kind, rule in self._rules.items()}
        if self._traffic is not None:
            with self._traffic.lock:
                counts["traffic_spike"] = len(self._traffic.seen)
        return counts

    # -- each rule's bookkeeping, under the lock --------------------------------

    def _auth_failed(self, address: str | None, now: float, fired: list[Alert]) -> None:
        rule = self._auth
        subject = source_of(address)
        if rule is not None and rule.hit(subject, now):
            fired.append(
                Alert(
                    "auth_failures",
                    subject,
                    rule.limit,
                    rule.window,
                    f"{rule.limit} failed authentications from {subject} within {rule.window}s",
                )
            )

    def _client_failed(self, client_id: str, error: str, now: float, fired: list[Alert]) -> None:
        rule = self._client
        if rule is not None and rule.hit(client_id, now):
            fired.append(
                Alert(
                    "client_failures",
                    client_id,
                    rule.limit,
                    rule.window,
                    f"{rule.limit} refused requests of client {client_id} "
                    f"within {rule.window}s (the last: {error})",
                )
            )

    def _rate_limited_alert(self, client_id: str) -> Alert:
        rule = self._limited
        assert rule is not None
        return Alert(
            "rate_limited",
            client_id,
            rule.limit,
            rule.window,
            f"client {client_id} was rate limited {rule.limit} times within {rule.window}s",
        )

    def _ended_alert(self, key_id: str, client_id: str, reason: str) -> Alert:
        rule = self._ended
        assert rule is not None
        # ``reason`` is the engine's own refusal text ("the API key was revoked"),
        # which the client was sent: never the key.
        return Alert(
            "ended_keys",
            key_id,
            rule.limit,
            rule.window,
            f"a key of client {client_id} tried {rule.limit} time(s) within "
            f"{rule.window}s after it ended: {reason}",
        )

    def _spike_alert(self, client_id: str, count: int, baseline: float) -> Alert:
        traffic = self._traffic
        assert traffic is not None
        return Alert(
            "traffic_spike",
            client_id,
            count,
            traffic.window,
            f"client {client_id} made {count} requests within {traffic.window}s, "
            f"over {traffic.spike:g} times its usual {baseline:.1f}",
        )

    def _forked(self) -> None:
        """In a forked child: the parent's lock may have been held at the fork,
        and its windows are the parent's requests."""
        self._lock = threading.Lock()
        for rule in self._rules.values():
            rule.seen = OrderedDict()
        if self._traffic is not None:
            self._traffic.lock = threading.Lock()
            self._traffic.seen = OrderedDict()


_live: weakref.WeakSet[Alerts] = weakref.WeakSet()


def _after_fork() -> None:
    for alerts in list(_live):
        alerts._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
