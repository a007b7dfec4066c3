"""Failed authentications counted per source address, refused before the expensive work.

``source_limits`` (limits notation, e.g. ``"20/minute"``) is a budget of
failed authentications per client address (OWASP API4): once an address has
spent it, its requests get 429 ``rate_limited`` with ``Retry-After`` before
any key lookup, JWT verification or signature check. The engine calls

- :meth:`SourceLimits.check` first, for every request: one dict lookup in
  this process, nothing else (an address over budget is remembered here for
  the rest of its window);
- :meth:`SourceLimits.failed` (or :meth:`~SourceLimits.afailed`) when a
  request from that address failed to authenticate (401): the failure is
  counted in the limit storage, so instances sharing Redis share the budget.

An instance learns that an address is over budget from its own next failure
from it (the count is shared), so across ``n`` instances an address gets at
most ``n - 1`` extra attempts per window; the success path never waits on
the storage.

Counting is fixed windows, one per limit, that open at an address's first
failure. Not :meth:`Limiter.charge
<m2m_middleware.limiting.Limiter.charge>`: that charges all-or-nothing and
does not say how much is left, so it would only refuse the failure after the
budget, and the address would get one more key lookup than its budget says.
Here each failure is an increment that returns the count (in Redis one Lua
script, one round trip, on the limiter's connection), and the failure that
spends the budget blocks the address at once.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from limits import RateLimitItem

from .errors import RateLimited
from .limiting import Limiter
from .redaction import redact, secrets_of
from .settings import Settings
from .syntax import log_safe

logger = logging.getLogger("m2m_middleware")

#: KEYS: one counter per limit; ARGV[i]: limit i's window in milliseconds. Each
#: counter is incremented (its window opens at its first increment); returns
#: {count1, pttl1, count2, pttl2, ...}.
REDIS_FAILURES = """
local out = {}
for i, key in ipairs(KEYS) do
    local count = redis.call('INCR', key)
    if count == 1 then
        redis.call('PEXPIRE', key, ARGV[i])
    end
    local ttl = redis.call('PTTL', key)
    if ttl < 0 then
        redis.call('PEXPIRE', key, ARGV[i])
        ttl = tonumber(ARGV[i])
    end
    out[#out + 1] = count
    out[#out + 1] = ttl
end
return out
"""


#: The one budget of every request whose address cannot be known: a peer with
#: no IP address (a Unix socket), or a chain a trusted proxy passed on that no
#: one can read (a client's own Forwarded beside the proxy's X-Forwarded-For,
#: a malformed Forwarded). Found by the transport red team: a client could make
#: itself unknown on purpose, and unknown addresses were never counted, so it
#: could guess credentials without a limit. Sharing one budget fails closed.
UNKNOWN_SOURCE = "unknown"


class SourceRateLimited(RateLimited):
    """An address that spent its budget of failed authentications: 429 ``rate_limited``.

    ``headers`` holds ``Retry-After``, the seconds left of the window.
    """

    def __init__(self, retry_after: int) -> None:
        self.retry_after = retry_after
        self.headers = [("Retry-After", str(retry_after))]
        super().__init__(
            f"too many failed authentications from this address; retry in {retry_after} second(s)"
        )


class _MemoryFailures:
    """Fixed-window failure counts in this process (``memory://``)."""

    sweep_interval = 10.0

    def __init__(self) -> None:
        self._windows: dict[str, list[float]] = {}  # key -> [count, window end]
        self._lock = threading.Lock()
        self._sweep_at = 0.0

    def count(self, keys: list[str], windows: list[int], now: float) -> list[tuple[int, float]]:
        with self._lock:
            if now >= self._sweep_at:
                self._sweep_at = now + self.sweep_interval
                self._windows = {k: w for k, w in self._windows.items() if w[1] > now}
            found = []
            for key, seconds in zip(keys, windows, strict=True):
                window = self._windows.get(key)
                if window is None or window[1] <= now:
                    window = self._windows[key] = [0, now + seconds]
                window[0] += 1
                found.append((int(window[0]), window[1] - now))
            return found


class SourceLimits:
    """The per-address budget of failed authentications; see the module docstring.

    ``limiter`` is the engine's: its storage holds the counts. ``clock`` gives
    the wall time (tests). At most ``max_blocked`` addresses are remembered as
    blocked in process; past that the oldest are forgotten (each then costs
    one more counted failure to be blocked again, never a pass it should not get).
    """

    def __init__(
        self,
        settings: Settings,
        limiter: Limiter,
        *,
        clock: Callable[[], float] = time.time,
        max_blocked: int = 100_000,
    ) -> None:
        self.items: tuple[RateLimitItem, ...] = settings.source_limit_items
        self._amounts = [item.amount for item in self.items]
        self._windows = [item.get_expiry() for item in self.items]
        self._suffixes = [f"{item.amount}/{item.get_expiry()}" for item in self.items]
        self._limiter = limiter
        self._clock = clock
        self.max_blocked = max_blocked
        #: address -> wall time its block ends. Read without the lock (a dict get).
        self._blocked: dict[str, float] = {}
        self._lock = threading.Lock()
        self._memory = _MemoryFailures() if limiter.windows is not None else None
        self._script: Any = None
        if self._memory is None and limiter.redis:
            self._script = limiter.redis_script(REDIS_FAILURES)
        self._secrets = secrets_of(settings.rate_limit_storage)
        self._down = False

    @property
    def enabled(self) -> bool:
        return bool(self.items)

    # -- every request --------------------------------------------------------

    def check(self, address: str | None) -> None:
        """Raise :class:`SourceRateLimited` if ``address`` is over budget; else return.

        One dict lookup for an address that is not blocked. An unknown address
        (None) is the shared :data:`UNKNOWN_SOURCE` bucket.
        """
        if not address:  # None, or a server's empty REMOTE_ADDR (a Unix socket)
            address = UNKNOWN_SOURCE
        until = self._blocked.get(address)
        if until is None:
            return
        now = self._clock()
        if until > now:
            raise SourceRateLimited(max(1, math.ceil(until - now)))
        with self._lock:
            if self._blocked.get(address) == until:
                del self._blocked[address]

    # -- a failed authentication ----------------------------------------------

    def failed(self, address: str | None) -> None:
        """Count a failed authentication from ``address``; block it once its budget is spent.

        Never raises: the request is refused already, and a storage outage only
        means this failure goes uncounted (logged once per outage).
        """
        if not self.items:
            return
        if not address:  # None, or a server's empty REMOTE_ADDR (a Unix socket)
            address = UNKNOWN_SOURCE
        now = self._clock()
        keys = self._keys(address)
        try:
            if self._memory is not None:
                counts = self._memory.count(keys, self._windows, now)
            elif self._script is not None:
                counts = self._pairs(self._script(keys, [w * 1000 for w in self._windows]))
            else:
                counts = self._counted(keys)
        except Exception as exc:  # the storage's errors, whatever the connection died of
            self._failed(exc)
            return
        self._recovered()
        self._note(address, counts, now)

    async def afailed(self, address: str | None) -> None:
        """The async twin of :meth:`failed`, on the limiter's ``redis.asyncio`` client."""
        if not self.items:
            return
        if not address:  # None, or a server's empty REMOTE_ADDR (a Unix socket)
            address = UNKNOWN_SOURCE
        if self._memory is not None:  # in process: never blocks
            self.failed(address)
            return
        now = self._clock()
        keys = self._keys(address)
        try:
            if self._limiter.redis:  # on this event loop's client, pipelined with the limits
                script = await self._limiter.aredis_script(REDIS_FAILURES)
                counts = self._pairs(await script(keys, [w * 1000 for w in self._windows]))
            else:
                # The limiter's storage for this event loop (limits.aio).
                storage, _ = await self._limiter._async_storage()
                counts = []
                for key, window in zip(keys, self._windows, strict=True):
                    count = await storage.incr(key, window)
                    counts.append((int(count), float(await storage.get_expiry(key)) - now))
        except Exception as exc:
            self._failed(exc)
            return
        self._recovered()
        self._note(address, counts, now)

    # -- helpers --------------------------------------------------------------

    def _keys(self, address: str) -> list[str]:
        # The address in braces: a Redis Cluster hash tag, so one script's keys share a slot.
        return [f"m2m:source:{{{address}}}:{suffix}" for suffix in self._suffixes]

    @staticmethod
    def _pairs(result: Any) -> list[tuple[int, float]]:
        values = [int(v) for v in result]
        return [(values[i], values[i + 1] / 1000) for i in range(0, len(values), 2)]

    def _counted(self, keys: list[str]) -> list[tuple[int, float]]:
        """Any other ``limits`` storage: its atomic ``incr`` with an expiry."""
        storage = self._limiter.storage
        now = time.time()  # get_expiry is the storage's wall time
        found = []
        for key, window in zip(keys, self._windows, strict=True):
            count = int(storage.incr(key, window))
            found.append((count, float(storage.get_expiry(key)) - now))
        return found

    def _note(self, address: str, counts: list[tuple[int, float]], now: float) -> None:
        """Block ``address`` until the latest end among the windows it has spent."""
        left = 0.0
        for amount, (count, ttl) in zip(self._amounts, counts, strict=True):
            if count >= amount:
                left = max(left, ttl)
        if left <= 0:
            return
        with self._lock:
            blocked = self._blocked
            if len(blocked) >= self.max_blocked and address not in blocked:
                live = {a: t for a, t in blocked.items() if t > now}
                while len(live) >= self.max_blocked:  # still full: forget the oldest
                    live.pop(next(iter(live)))
                blocked = self._blocked = live
            blocked[address] = now + left
        logger.warning(
            "source address %s blocked for %d s: too many failed authentications",
            log_safe(address[:100]),
            math.ceil(left),
        )

    def _failed(self, exc: BaseException) -> None:
        if not self._down:
            self._down = True
            logger.error(
                "rate-limit storage unreachable; failed authentications go uncounted: %s",
                redact(str(exc), self._secrets),
            )

    def _recovered(self) -> None:
        if self._down:
            self._down = False
            logger.warning("rate-limit storage reachable again; failed authentications counted")
