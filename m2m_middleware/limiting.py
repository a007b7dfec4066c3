"""Per-client limits on the ``limits`` library, charged all-or-nothing.

Limits are written and parsed in ``limits`` notation. Every strategy charges
all the limits of a request or none of them, under any concurrency:

- ``memory://`` is counted by a few classes of our own, one per strategy
  (:class:`MemoryWindows`, :class:`MemoryMovingWindows`,
  :class:`MemorySlidingWindows`): one lock covers testing and charging every
  limit of a request, so all-or-nothing needs no rollback, and expired state
  is swept in bulk. ``limits``' ``MemoryStorage`` takes a per-key lock and
  re-arms a timer thread on every hit (a new thread every 10 ms under
  traffic), which made it most of the cost of a request; it also reads the
  clock itself, so a test could not inject time. (Measured on two limits of
  one client: ``limits``' moving window and sliding window counter 18-34 us a
  charge, ours 3-4 us, the fixed windows' 2-3 us.)
- Redis (``redis://``, ``rediss://``, ``redis+unix://``, ``redis+sentinel://``,
  ``redis+cluster://``) runs one Lua script per request on connections of the
  client ``limits`` opened, one script per strategy: every limit of the request
  is tested, charged (all or none) and read back for the headers in **one round
  trip**. :mod:`m2m_middleware.redis_scripts` runs them straight on the
  connection, and on an event loop pipelines the requests in flight together
  (a round trip serves all of them; redis-py's own command path cost about as
  much as the round trip itself). The keys of one client share a Redis Cluster
  hash tag, so the scripts run on clusters too. (``limits``' own strategies test every limit,
  then hit every limit: racing requests all pass the test and then charge
  some limits before one refuses.)
- Any other storage counts fixed windows with its atomic ``incr``: every
  applicable limit is incremented, and if any one overflows, all the
  increments of this request are taken back. The other strategies are
  refused there at configuration (:class:`~m2m_middleware.Settings`), since
  ``limits`` offers no way to take back a moving- or sliding-window hit.

Network storages get their ``limits.aio`` twin on the async path (Redis through
``redis.asyncio``, one client per event loop), so the event loop never waits on
a socket; in-process counting never blocks, so both paths share it (a Django
project serving sync and async views keeps one budget). Network calls time out
after ``storage_timeout`` seconds and are retried once at once (a connection
that died while idle, say after a Redis restart, is replaced without failing
a request); a storage that still fails is an outage, handled by the engine's
``on_storage_error`` policy.

A ``RateLimit`` header's ``t`` is the number of seconds until the client has
more of that limit to spend: the end of a fixed window, the moment the oldest
charge leaves a moving window, the moment the weighted count of a sliding
window counter drops by one. A refusal's ``Retry-After`` is the number of
seconds until that request would fit, if nothing else is charged meanwhile.

A signed request's nonce rides in the same script (:data:`NONCE_FIRST`), so
it too makes one round trip (not on a cluster, where the nonce's key is in
another slot).

With ``rate_limit_sync="batched"`` (Redis, fixed windows) each instance leases
a share of a client's window from Redis and spends it in process; see
:class:`Leases` for the design and the bound.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import logging
import math
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import limits
import limits.storage
from limits import RateLimitItem

from .errors import ConfigError
from .processes import watch_memory_limiter
from .redaction import redact, secrets_of
from .settings import REDIS_SCHEMES, Route, Settings
from .syntax import log_safe

logger = logging.getLogger("m2m_middleware")

Header = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Limit:
    """One limit as it applies to a request: the item, its policy name, its key prefix."""

    item: RateLimitItem
    policy: str
    key_prefix: str
    amount: int
    expiry: int
    #: ``"<policy>";r=`` : the start of this limit's item in a ``RateLimit`` header.
    header_start: str = ""


@dataclass(frozen=True, slots=True)
class LimitPlan:
    """The limits a request is charged against, with their static policy header."""

    limits: tuple[Limit, ...]
    policy_header: str


@dataclass(slots=True)
class Charge:
    """What charging a plan gave: admitted or not, and the headers to send."""

    allowed: bool
    headers: list[Header]
    retry_after: int = 0
    #: Not admitted because the request's signature nonce was seen before (nothing charged).
    replayed: bool = False


class StorageDown(Exception):
    """The limit storage could not be reached."""


#: All-or-nothing fixed windows for one request, in one round trip.
#: KEYS[i]: limit i's counter; ARGV[1]: the cost; ARGV[2i], ARGV[2i+1]: limit i's
#: amount and window in seconds. Returns {i, count, pttl} for the first limit
#: that would overflow (nothing is charged), else {0, count1, pttl1, ...}
#: after charging every limit.
REDIS_FIXED_WINDOWS = """
local cost = tonumber(ARGV[1])
for i = 1, #KEYS do
  local current = tonumber(redis.call('GET', KEYS[i]) or '0')
  if current + cost > tonumber(ARGV[2 * i]) then
    return {i, current, redis.call('PTTL', KEYS[i])}
  end
end
local out = {0}
for i = 1, #KEYS do
  local count = redis.call('INCRBY', KEYS[i], cost)
  local ttl = redis.call('PTTL', KEYS[i])
  if ttl < 0 then
    ttl = tonumber(ARGV[2 * i + 1]) * 1000
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
  out[2 * i] = count
  out[2 * i + 1] = ttl
end
return out
"""

#: The start of the moving and sliding scripts: the cost, and the time in
#: microseconds (the argument after the limits' pairs; 0: Redis's own clock).
_COST_AND_NOW = """
local cost = tonumber(ARGV[1])
local now = tonumber(ARGV[2 * #KEYS + 2])
if now == 0 then
  local clock = redis.call('TIME')
  now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
end
"""

#: All-or-nothing moving windows for one request, in one round trip.
#: KEYS[i]: limit i's list of charge times (microseconds, newest first, one entry
#: per unit); ARGV as for REDIS_FIXED_WINDOWS, then the time in microseconds (0:
#: Redis's own clock). An entry counts while it is younger than the window. Returns
#: {i, used, wait} when a limit would overflow (nothing is charged), for the one that
#: refuses longest, where wait is the milliseconds until the request would fit, else
#: {0, used1, wait1, ...} after charging every limit, where wait is the milliseconds
#: until the oldest charge leaves the window.
REDIS_MOVING_WINDOWS = (
    _COST_AND_NOW
    + """
-- Drops the expired entries at the list's tail; returns how many are left.
local function live(key, window)
  local n = redis.call('LLEN', key)
  if n == 0 or tonumber(redis.call('LINDEX', key, -1)) + window > now then
    return n
  end
  local low, high = 0, n - 1  -- entries below low are live, the one at high is not
  while low < high do
    local mid = math.floor((low + high) / 2)
    if tonumber(redis.call('LINDEX', key, mid)) + window > now then
      low = mid + 1
    else
      high = mid
    end
  end
  if low == 0 then
    redis.call('DEL', key)
  else
    redis.call('LTRIM', key, 0, low - 1)
  end
  return low
end
local used, refused, longest = {}, 0, 0
for i = 1, #KEYS do
  local amount = tonumber(ARGV[2 * i])
  local window = tonumber(ARGV[2 * i + 1]) * 1000000
  used[i] = live(KEYS[i], window)
  if used[i] + cost > amount then
    local wait = window
    if cost <= amount then  -- it fits once the entry at amount - cost has left
      wait = tonumber(redis.call('LINDEX', KEYS[i], amount - cost)) + window - now
    end
    if wait > longest then
      refused, longest = i, wait
    end
  end
end
if refused > 0 then
  return {refused, used[refused], math.ceil(longest / 1000)}
end
local out = {0}
for i = 1, #KEYS do
  local window = tonumber(ARGV[2 * i + 1]) * 1000000
  -- Never older than the newest entry: the list stays sorted if clocks step back.
  local stamp = math.max(now, tonumber(redis.call('LINDEX', KEYS[i], 0) or 0))
  local entries = {}
  for j = 1, math.min(cost, 1000) do
    entries[j] = stamp
  end
  for pushed = 0, cost - 1, 1000 do
    redis.call('LPUSH', KEYS[i], unpack(entries, 1, math.min(1000, cost - pushed)))
  end
  redis.call('PEXPIRE', KEYS[i], math.ceil((stamp + window - now) / 1000))
  local oldest = tonumber(redis.call('LINDEX', KEYS[i], -1))
  out[2 * i] = used[i] + cost
  out[2 * i + 1] = math.ceil((oldest + window - now) / 1000)
end
return out
"""
)

#: All-or-nothing sliding window counters for one request, in one round trip.
#: KEYS[i]: limit i's hash {s: the current window's start (microseconds), p: the
#: previous window's count, c: the current window's count}; ARGV and the answer
#: as for REDIS_MOVING_WINDOWS, where wait is the milliseconds until the request
#: would fit (refused) or until the weighted count drops by one (admitted).
#: The same arithmetic as MemorySlidingWindows.
REDIS_SLIDING_WINDOWS = (
    _COST_AND_NOW
    + """
-- Microseconds until `units` more fit, if nothing else is charged.
local function wait(units, amount, window, previous, current, left)
  if units > amount then
    return window
  end
  local room = amount - units - current
  if room >= 0 then
    if previous == 0 then
      return 0
    end
    -- it fits once less than `below` is left of this window
    local below = window * (room + 1) / previous
    if left < below then
      return 0
    end
    return left - below + 1
  end
  -- not in this window: after it, its count is the previous window's
  local below = window * (amount - units + 1) / current
  return left + math.max(0, window - below) + 1
end
local state, refused, refused_used, longest = {}, 0, 0, 0
for i = 1, #KEYS do
  local amount = tonumber(ARGV[2 * i])
  local window = tonumber(ARGV[2 * i + 1]) * 1000000
  local saved = redis.call('HMGET', KEYS[i], 's', 'p', 'c')
  local start, previous, current = tonumber(saved[1]), tonumber(saved[2]), tonumber(saved[3])
  if start == nil or now >= start + 2 * window then
    start, previous, current = now, 0, 0
  elseif now >= start + window then
    start, previous, current = start + window, current, 0
  end
  local left = start + window - now
  local used = math.floor(previous * left / window) + current
  if used + cost > amount then
    local until_fits = wait(cost, amount, window, previous, current, left)
    if until_fits > longest then
      refused, refused_used, longest = i, used, until_fits
    end
  end
  state[i] = {start, previous, current + cost, left, amount, window}
end
if refused > 0 then
  return {refused, refused_used, math.ceil(longest / 1000)}
end
local out = {0}
for i = 1, #KEYS do
  local start, previous, current, left, amount, window = unpack(state[i])
  redis.call('HSET', KEYS[i], 's', start, 'p', previous, 'c', current)
  redis.call('PEXPIRE', KEYS[i], math.ceil((start + 2 * window - now) / 1000))
  local used = math.floor(previous * left / window) + current
  out[2 * i] = used
  local more = wait(amount - used + 1, amount, window, previous, current, left)
  out[2 * i + 1] = math.ceil(more / 1000)
end
return out
"""
)

#: Batched counting (:class:`Leases`): one request's leases, all-or-nothing, in one
#: round trip. KEYS[i]: limit i's hash {c: the units leased out of this window, w:
#: the window's id (Redis's TIME when it opened)}; ARGV[1]: the cost; ARGV[3i-1],
#: ARGV[3i], ARGV[3i+1]: limit i's amount, window in seconds, and the units wanted
#: (0: this instance's lease covers the limit, which is only read back). Returns
#: {i, leased, pttl} for the first wanted limit that cannot give the cost (nothing is
#: leased), else {0, granted1, leased1, pttl1, id1, ...} where granted is at least
#: the cost for a wanted limit (the cost plus up to a lease), 0 for the others.
REDIS_LEASES = """
local cost = tonumber(ARGV[1])
local saved = {}
for i = 1, #KEYS do
  local state = redis.call('HMGET', KEYS[i], 'c', 'w')
  local leased = tonumber(state[1] or '0')
  if tonumber(ARGV[3 * i + 1]) > 0 and leased + cost > tonumber(ARGV[3 * i - 1]) then
    return {i, leased, redis.call('PTTL', KEYS[i])}
  end
  saved[i] = {leased, state[2]}
end
local out = {0}
for i = 1, #KEYS do
  local amount, window = tonumber(ARGV[3 * i - 1]), tonumber(ARGV[3 * i])
  local want = tonumber(ARGV[3 * i + 1])
  local leased, id = saved[i][1], saved[i][2]
  local granted = 0
  if want > cost and id then
    -- A lease is spent only until its window ends: from a window with a fraction of
    -- its time left, lease that fraction of a lease. A whole lease taken in a
    -- window's last milliseconds died unspent, and every request of every instance
    -- that came then took another, until the limit was all leased and refused.
    local left = redis.call('PTTL', KEYS[i])
    if left >= 0 then
      want = cost + math.ceil((want - cost) * math.min(left, window * 1000) / (window * 1000))
    end
  end
  if want > 0 then
    granted = math.min(want, amount - leased)
    leased = leased + granted
    if not id then
      local clock = redis.call('TIME')
      id = clock[1] .. '.' .. clock[2]
      redis.call('HSET', KEYS[i], 'c', leased, 'w', id)
      redis.call('PEXPIRE', KEYS[i], window * 1000)
    else
      redis.call('HINCRBY', KEYS[i], 'c', granted)
    end
  end
  local ttl = redis.call('PTTL', KEYS[i])
  if ttl < 0 and id then
    ttl = window * 1000
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
  local n = #out
  out[n + 1], out[n + 2], out[n + 3], out[n + 4] = granted, leased, ttl, id or ''
end
return out
"""

#: Gives back what idle leases did not spend. KEYS[i]: a lease's hash; ARGV[2i-1]:
#: the id of the window it was taken from; ARGV[2i]: the units unspent. A window
#: that has ended (or another one that opened since) is left alone.
REDIS_RETURN_LEASES = """
for i = 1, #KEYS do
  if redis.call('HGET', KEYS[i], 'w') == ARGV[2 * i - 1] then
    redis.call('HINCRBY', KEYS[i], 'c', -tonumber(ARGV[2 * i]))
  end
end
return #KEYS
"""

#: Put before any of the scripts above, for a signed request: remembers its
#: signature's nonce (the last key; the last argument its TTL in seconds) in the
#: same round trip as the limits, and answers {-1}, charging nothing, when it was
#: there already (a replay). Redis runs a script whole, so a replay racing the
#: original still finds one of them first.
NONCE_FIRST = """
local nonce_ttl = tonumber(table.remove(ARGV))
if not redis.call('SET', table.remove(KEYS), '1', 'NX', 'EX', nonce_ttl) then
  return {-1}
end
"""

#: A nonce alone (batched counting, when the leases held cover the limits): {0} when
#: it is new, {-1} when it was seen before. A script, not a ``SET``, so that it runs
#: on the scripts' own connection (pipelined with the others on an event loop).
NONCE_ONLY = NONCE_FIRST + "return {0}\n"

#: The script of each strategy, and the part of its keys that keeps the strategies'
#: keys apart (a deployment that switches strategy must never meet a key of another type).
REDIS_SCRIPTS = {
    "fixed-window": (REDIS_FIXED_WINDOWS, ""),
    "moving-window": (REDIS_MOVING_WINDOWS, "moving/"),
    "sliding-window-counter": (REDIS_SLIDING_WINDOWS, "sliding/"),
}


def open_limit_storage(uri: str, **options: Any) -> Any:
    """The ``limits`` storage for ``uri``, or a ConfigError that never shows its password."""
    try:
        return limits.storage.storage_from_string(uri, **options)
    except Exception as exc:  # limits raises ConfigurationError / ImportError
        hint = ' (pip install "m2m-middleware[redis]")' if _scheme(uri) in REDIS_SCHEMES else ""
        secrets = secrets_of(uri)
        problem = redact(str(exc), secrets)
        raise ConfigError(
            "rate_limit_storage", f"{redact(uri, secrets)!r}: {problem}{hint}"
        ) from None


def _scheme(uri: str) -> str:
    return uri.partition("://")[0].lower()


def _redis_options(timeout: float, asynchronous: bool) -> dict[str, Any]:
    """Short socket timeouts and one immediate retry, instead of redis-py's
    default of three retries with exponential backoff (seconds per request
    while Redis is down).

    The retry is for a lost connection only (a pooled one Redis closed), never
    for a timeout: a command that timed out was sent, and Redis may run it
    still (a slow or busy server answers late). A charge is no idempotent
    command, so run again it would charge the request twice.
    """
    from redis.exceptions import ConnectionError as RedisConnectionError

    if asynchronous:
        from redis.asyncio.retry import Retry as AsyncRetry
        from redis.backoff import NoBackoff

        retry: Any = AsyncRetry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
    else:
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
    return {"socket_timeout": timeout, "socket_connect_timeout": timeout, "retry": retry}


class MemoryWindows:
    """Fixed-window counters in this process's memory (``memory://``).

    A window opens at a client's first hit and lasts the limit's period, as
    in ``limits``. One lock makes testing and charging every limit of a
    request a single step.
    """

    #: Seconds between sweeps of expired windows.
    sweep_interval = 10.0

    def __init__(self) -> None:
        self._windows: dict[str, list[Any]] = {}  # key -> [count, window end (epoch)]
        self._lock = threading.Lock()
        self._sweep_at = 0.0

    def take(
        self, limits_: tuple[Limit, ...], client_id: str, cost: int, now: float
    ) -> tuple[Limit | None, list[tuple[int, float]]]:
        """Charge ``cost`` to every limit, or to none.

        Returns ``(None, [(count, end), ...])`` after the charge when admitted,
        or ``(the refused limit, [(its count, its end)])``.
        """
        with self._lock:
            if now >= self._sweep_at:
                self._sweep(now)
            windows = self._windows
            if len(limits_) == 1:  # the common case, without the lists
                lim = limits_[0]
                key = lim.key_prefix + client_id
                window = windows.get(key)
                if window is None or window[1] <= now:
                    window = windows[key] = [0, now + lim.expiry]
                count = window[0] + cost
                if count > lim.amount:
                    return lim, [(window[0], window[1])]
                window[0] = count
                return None, [(count, window[1])]
            opened = []
            for lim in limits_:
                key = lim.key_prefix + client_id
                window = windows.get(key)
                if window is None or window[1] <= now:
                    window = windows[key] = [0, now + lim.expiry]
                if window[0] + cost > lim.amount:
                    return lim, [(window[0], window[1])]
                opened.append(window)
            for window in opened:
                window[0] += cost
            return None, [(window[0], window[1]) for window in opened]

    def _sweep(self, now: float) -> None:
        self._sweep_at = now + self.sweep_interval
        self._windows = {k: w for k, w in self._windows.items() if w[1] > now}

    def clear(self) -> None:
        with self._lock:
            self._windows.clear()


class _MovingWindow:
    """One limit's charges in the last ``expiry`` seconds, oldest first."""

    __slots__ = ("charges", "expiry", "used")

    def __init__(self, expiry: int) -> None:
        self.charges: deque[list[Any]] = deque()  # [time, units]
        self.expiry = expiry
        self.used = 0

    def expire(self, now: float) -> int:
        """Drops the charges that have left the window; returns the units left in it."""
        charges, expiry = self.charges, self.expiry
        while charges and charges[0][0] + expiry <= now:
            self.used -= charges.popleft()[1]
        return self.used

    def free_at(self, target: int, now: float) -> float:
        """When at most ``target`` units are left in the window."""
        if target < 0:  # never: a window is as good an answer as any
            return now + self.expiry
        left, when = self.used, now
        for at, units in self.charges:
            if left <= target:
                break
            left -= units
            when = at + self.expiry
        return when

    def live_after(self, now: float) -> bool:
        """Whether any charge still counts at ``now``."""
        return bool(self.charges) and self.charges[-1][0] + self.expiry > now

    def add(self, now: float, units: int) -> None:
        charges = self.charges
        if charges and charges[-1][0] >= now:  # never out of order, should clocks step back
            charges[-1][1] += units
        else:
            charges.append([now, units])
        self.used += units


class MemoryMovingWindows:
    """Moving windows in this process's memory (``memory://``, ``moving-window``).

    A limit of N per W seconds admits a request of cost c when the units
    charged in the last W seconds plus c are at most N: N in any rolling
    window of W seconds, where a charge made at ``t`` counts until ``t + W``.
    One lock makes testing and charging every limit of a request a single
    step, as in :class:`MemoryWindows` (whose ``take`` this one mirrors).
    """

    sweep_interval = 10.0

    def __init__(self) -> None:
        self._windows: dict[str, _MovingWindow] = {}
        self._lock = threading.Lock()
        self._sweep_at = 0.0

    def take(
        self, limits_: tuple[Limit, ...], client_id: str, cost: int, now: float
    ) -> tuple[Limit | None, list[tuple[int, float]]]:
        """As :meth:`MemoryWindows.take`, with ``(units used, when more is free)`` per
        limit; a refusal names the limit that refuses longest, with ``(units used, when
        this request would fit)``, so that Retry-After holds for every limit."""
        with self._lock:
            if now >= self._sweep_at:
                self._sweep(now)
            windows = self._windows
            found = []
            refused: tuple[Limit, int, float] | None = None
            for lim in limits_:
                key = lim.key_prefix + client_id
                window = windows.get(key)
                if window is None:
                    window = windows[key] = _MovingWindow(lim.expiry)
                used = window.expire(now)
                if used + cost > lim.amount:
                    fits_at = window.free_at(lim.amount - cost, now)
                    if refused is None or fits_at > refused[2]:
                        refused = (lim, used, fits_at)
                found.append(window)
            if refused is not None:
                return refused[0], [(refused[1], refused[2])]
            for window in found:
                window.add(now, cost)
            return None, [(w.used, w.charges[0][0] + w.expiry) for w in found]

    def _sweep(self, now: float) -> None:
        self._sweep_at = now + self.sweep_interval
        self._windows = {k: w for k, w in self._windows.items() if w.live_after(now)}

    def clear(self) -> None:
        with self._lock:
            self._windows.clear()


def _sliding_wait(
    units: int, amount: int, expiry: float, previous: int, current: int, left: float
) -> float:
    """Seconds until ``units`` more fit in a sliding window counter, if nothing else is
    charged: ``previous`` and ``current`` are the two windows' counts, ``left`` the
    seconds left of the current one. The arithmetic of REDIS_SLIDING_WINDOWS."""
    if units > amount:  # never: a window is as good an answer as any
        return expiry
    room = amount - units - current
    if room >= 0:
        if previous == 0:
            return 0.0
        below = expiry * (room + 1) / previous  # it fits once less than this is left
        return 0.0 if left < below else left - below + 1e-6
    # Not in this window: after it, this window's count is the previous one's.
    below = expiry * (amount - units + 1) / current
    return left + max(0.0, expiry - below) + 1e-6


class MemorySlidingWindows:
    """Sliding window counters in this process's memory (``memory://``,
    ``sliding-window-counter``), as ``limits`` defines them.

    Each limit counts the units charged in a current and a previous fixed
    window of its period; a request of cost c is admitted when
    ``floor(previous * (seconds left of the current window) / period) + current + c``
    is at most the limit. A client's windows open at its first charge, as
    fixed windows do and as ``limits``' Redis storage does (its
    ``MemoryStorage`` aligns them to the epoch instead); once a whole period
    passes with nothing charged they open afresh. A refused request changes
    nothing, so this and REDIS_SLIDING_WINDOWS agree on any history.
    """

    sweep_interval = 10.0

    def __init__(self) -> None:
        # key -> [current window's start, previous count, current count, period]
        self._windows: dict[str, list[Any]] = {}
        self._lock = threading.Lock()
        self._sweep_at = 0.0

    def take(
        self, limits_: tuple[Limit, ...], client_id: str, cost: int, now: float
    ) -> tuple[Limit | None, list[tuple[int, float]]]:
        """As :meth:`MemoryMovingWindows.take`."""
        with self._lock:
            if now >= self._sweep_at:
                self._sweep(now)
            windows = self._windows
            found = []
            refused: tuple[Limit, int, float] | None = None
            for lim in limits_:
                key = lim.key_prefix + client_id
                expiry = lim.expiry
                start, previous, current, _ = windows.get(key) or (now, 0, 0, expiry)
                if now >= start + 2 * expiry:
                    start, previous, current = now, 0, 0
                elif now >= start + expiry:
                    start, previous, current = start + expiry, current, 0
                left = start + expiry - now
                used = math.floor(previous * left / expiry) + current
                if used + cost > lim.amount:
                    wait = _sliding_wait(cost, lim.amount, expiry, previous, current, left)
                    if refused is None or now + wait > refused[2]:
                        refused = (lim, used, now + wait)
                found.append((key, lim, start, previous, current + cost, left))
            if refused is not None:
                return refused[0], [(refused[1], refused[2])]
            out = []
            for key, lim, start, previous, current, left in found:
                windows[key] = [start, previous, current, lim.expiry]
                used = math.floor(previous * left / lim.expiry) + current
                units = lim.amount - used + 1
                wait = _sliding_wait(units, lim.amount, lim.expiry, previous, current, left)
                out.append((used, now + wait))
            return None, out

    def _sweep(self, now: float) -> None:
        self._sweep_at = now + self.sweep_interval
        self._windows = {k: w for k, w in self._windows.items() if w[0] + 2 * w[3] > now}

    def clear(self) -> None:
        with self._lock:
            self._windows.clear()


class _Lease:
    """A share of one limit's window in Redis, leased to this process."""

    __slots__ = ("client_id", "deadline", "leased", "touched", "unused", "window")

    def __init__(
        self, client_id: str, window: bytes, unused: int, deadline: float, leased: int, now: float
    ) -> None:
        self.client_id = client_id
        #: The id Redis gave the window; a lease is only ever given back to that window.
        self.window = window
        self.unused = unused
        #: When this process stops spending it (its clock): never after Redis ends the window.
        self.deadline = deadline
        #: What Redis said was leased out of the window (all instances), at the last round trip.
        self.leased = leased
        self.touched = now


#: Seconds a lease ends before the window Redis reported, for the rounding of PTTL.
LEASE_MARGIN = 0.002


class Leases:
    """Batched counting (``rate_limit_sync="batched"``): shares of Redis windows, spent here.

    Each limit of a client is a fixed window in Redis holding how many units
    have been *leased out* of it, by every instance. A request this process's
    leases cover is charged here, with no round trip. Otherwise one script
    (:data:`REDIS_LEASES`), one round trip, leases the cost plus up to a lease
    (``rate_limit_lease``: a fraction of each limit, or a count) for every limit
    the leases held do not cover, or, when any one of them has not the cost left,
    leases nothing: the units the covered limits had set aside for the request
    are put back, so a request takes from every limit's lease or from none. A
    lease taken from a window with a fraction of its time left is that fraction
    of a lease (rounded up): one taken in a window's last milliseconds would die
    unspent, and the requests after it would each take another.

    The bound. A unit is spent only after Redis has counted it, in the window it
    is spent in: a lease ends here (``deadline``) when the window's PTTL, counted
    from *before* the request was sent, runs out, so never after Redis ends the
    window. Hence, with any number of instances, **at most the limit is admitted
    per window**, as in exact mode. What batching costs is the other way round:
    a request may be refused while other instances hold leased units they have
    not spent, at most ``lease + cost - 1`` per instance and limit (``lease`` for
    requests of cost 1), and only until they give them back, after
    ``rate_limit_lease_idle`` seconds without use (or when the limiter closes).
    With one instance that slack is its own, so exactly the limit is admitted.

    Headers: a limit's ``r`` is what Redis said was left at this instance's last
    round trip plus what this instance's lease has not spent: exactly what it can
    still admit if no other instance takes more. With one instance it is exact;
    with several, other instances may have taken some of it since (never more
    than the limit is admitted, whatever ``r`` said).

    Outages: a lease already held is spent while Redis is down (its units were
    counted in Redis before the outage, so the bound holds); once it is spent or
    its window ends, ``on_storage_error`` decides.
    """

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        lease = settings.rate_limit_lease
        self.fraction = float(lease) if lease < 1 else 0.0
        self.count = int(lease) if lease >= 1 else 0
        self.idle = float(settings.rate_limit_lease_idle)
        #: This process's clock for deadlines and idleness (tests inject one).
        self.clock = clock
        self._held: dict[str, _Lease] = {}
        #: Key -> when a request of this process began fetching a whole lease of it (its
        #: clock; see wants()). A fetch older than a round trip can last is forgotten.
        self._fetching: dict[str, float] = {}
        self._fetch_stale = 2 * float(settings.storage_timeout) + 0.1
        self._lock = threading.Lock()
        ref = weakref.ref(self)
        # A forked child must not spend its parent's leases as well (gunicorn --preload).
        os.register_at_fork(after_in_child=lambda: _forget_leases(ref))

    def size(self, lim: Limit) -> int:
        """The units leased beyond a request's cost for ``lim``."""
        if self.count:
            return min(self.count, lim.amount)
        return max(1, int(lim.amount * self.fraction))

    def __len__(self) -> int:
        return len(self._held)

    def take(self, keys: list[str], cost: int) -> tuple[list[_Lease | None], bool, float]:
        """Set ``cost`` aside from each lease that covers it.

        Returns (per limit, the lease it was set aside from or None; whether every
        limit was covered, so the request is charged; the clock). When not, the
        request makes a round trip for its uncovered limits (:meth:`wants`), then
        :meth:`settle` or :meth:`give_back`.
        """
        now = self.clock()
        held = self._held
        taken: list[_Lease | None] = []
        covered = True
        with self._lock:
            for key in keys:
                lease = held.get(key)
                if lease is not None and lease.deadline <= now:
                    del held[key]  # its window has ended: the units left died with it
                    lease = None
                if lease is None or lease.unused < cost:
                    taken.append(None)
                    covered = False
                    continue
                lease.unused -= cost
                lease.touched = now
                taken.append(lease)
        return taken, covered, now

    def take_all(self, keys: list[str], cost: int) -> tuple[list[_Lease] | None, float]:
        """Set ``cost`` aside from every lease, or from none (None)."""
        now = self.clock()
        held = self._held
        with self._lock:
            chosen = []
            for key in keys:
                lease = held.get(key)
                if lease is None or lease.deadline <= now or lease.unused < cost:
                    return None, now
                chosen.append(lease)
            for lease in chosen:
                lease.unused -= cost
                lease.touched = now
        return chosen, now

    def give_back(
        self,
        keys: list[str],
        taken: list[_Lease | None],
        cost: int,
        args: list[int] | None = None,
    ) -> None:
        """Put back what :meth:`take` set aside for a request that was not admitted
        (``args``: what :meth:`wants` gave it, when it made a round trip)."""
        with self._lock:
            for lease in taken:
                if lease is not None:
                    lease.unused += cost
            if args is not None:
                self._fetched(keys, taken, cost, args)

    def _fetched(
        self, keys: list[str], taken: list[_Lease | None], cost: int, args: list[int]
    ) -> None:
        """The round trip of a request that was fetching whole leases has ended (under
        the lock): the next miss of those keys may fetch one again."""
        for i, (key, lease) in enumerate(zip(keys, taken, strict=True)):
            if lease is None and args[3 * i + 3] > cost:
                self._fetching.pop(key, None)

    def wants(
        self, limits_: tuple[Limit, ...], keys: list[str], taken: list[_Lease | None], cost: int
    ) -> list[int]:
        """The script's arguments: the cost, then amount, window, units wanted per limit.

        A request leases more than its cost only when no other request of this
        process is fetching a whole lease of that limit already: a burst of misses
        (a cold start under load, a window's end) leases one lease, not one per
        request, so an instance holds about a lease of a window, not a lease per
        request in flight. The fetch ends when that request's round trip does
        (:meth:`settle`, :meth:`give_back`), whatever it brought: a lease that
        came too late to spend (its window ended meanwhile) lets the next miss
        fetch another at once, instead of every request paying a round trip of
        its own until the misses stop overlapping.
        """
        args = [cost]
        fetching = self._fetching
        now = self.clock()
        with self._lock:
            for lim, key, lease in zip(limits_, keys, taken, strict=True):
                if lease is not None:
                    want = 0
                elif fetching.get(key, -math.inf) + self._fetch_stale > now:
                    want = cost
                else:
                    want = cost + self.size(lim)
                    fetching[key] = now
                args += (lim.amount, lim.expiry, want)
        return args

    def settle(
        self,
        client_id: str,
        keys: list[str],
        taken: list[_Lease | None],
        cost: int,
        result: Any,
        sent_at: float,
        args: list[int],
    ) -> list[_Lease]:
        """Keep what an admitting script leased beyond the cost; the lease of each limit
        (``args``: what :meth:`wants` gave the request)."""
        now = self.clock()
        held = self._held
        out = []
        with self._lock:
            self._fetched(keys, taken, cost, args)
            for i, key in enumerate(keys):
                granted, leased, ttl, window = result[4 * i + 1 : 4 * i + 5]
                granted, leased, ttl = int(granted), int(leased), int(ttl)
                lease = taken[i]
                if lease is not None:  # covered here: only Redis's count is news
                    if lease.window == window:
                        lease.leased = leased
                    out.append(lease)
                    continue
                lease = held.get(key)
                if lease is not None and lease.window == window and lease.deadline > now:
                    lease.unused += granted - cost
                    lease.leased = leased
                    lease.touched = now
                else:
                    deadline = sent_at + ttl / 1000 - LEASE_MARGIN
                    lease = _Lease(client_id, window, granted - cost, deadline, leased, now)
                    held[key] = lease
                out.append(lease)
        return out

    def ending(self, everything: bool = False) -> dict[str, list[tuple[str, bytes, int]]]:
        """Takes out the leases idle for ``idle`` seconds (or all): per client id, the
        (key, window, unspent units) to give back."""
        now = self.clock()
        out: dict[str, list[tuple[str, bytes, int]]] = {}
        with self._lock:
            held = self._held
            for key, lease in list(held.items()):
                if lease.deadline <= now:
                    del held[key]  # nothing to give back to a window that has ended
                elif everything or lease.touched + self.idle <= now:
                    del held[key]
                    if lease.unused > 0:
                        out.setdefault(lease.client_id, []).append(
                            (key, lease.window, lease.unused)
                        )
        return out

    def forget(self) -> None:
        with self._lock:
            self._held.clear()
            self._fetching.clear()


def _forget_leases(ref: weakref.ReferenceType[Leases]) -> None:
    leases = ref()
    if leases is not None:
        leases._lock = threading.Lock()  # a lock held at the fork stays held in the child
        leases.forget()


def _close_at_exit(ref: weakref.ReferenceType[Limiter]) -> None:
    limiter = ref()
    if limiter is not None:
        limiter.close()


def _return_idle_leases(
    ref: weakref.ReferenceType[Limiter], stop: threading.Event, interval: float
) -> None:
    """The background giver-back of idle leases; holds the limiter only while it works."""
    while not stop.wait(interval):
        limiter = ref()
        if limiter is None:
            return
        limiter.return_idle()
        del limiter


def _limits_for(source: str, items: Sequence[RateLimitItem]) -> tuple[Limit, ...]:
    out = []
    seen: set[str] = set()
    keys: set[str] = set()
    for item in items:
        window = item.get_expiry()
        # The client id follows this prefix unescaped, and a tier name may hold
        # "/": the source's length makes the split unambiguous, so tier "a/2/60"
        # with client "bob" and tier "a" with client "2/60/bob" never share a
        # counter.
        key_prefix = f"m2m/{len(source)}:{source}/{item.amount}/{window}/"
        if key_prefix in keys:  # "5/second;5/second": one counter, so one limit
            continue
        keys.add(key_prefix)
        policy = f"{source}-{window}s"
        while policy in seen:
            policy += "'"
        seen.add(policy)
        out.append(Limit(item, policy, key_prefix, item.amount, window, f'"{policy}";r='))
    return tuple(out)


async def _close_with_loop(
    client: Any, scripts: Any, forget: Callable[[], None]
) -> AsyncIterator[None]:
    """Closes ``client`` when its event loop shuts down, then drops the loop (``forget``).

    A started async generator is closed by ``loop.shutdown_asyncgens()``,
    which ``asyncio.run``, uvicorn and asgiref all call before closing the
    loop, so the connections are released on the loop that owns them rather
    than left to warn in ``__del__`` (a test that runs a loop per request
    would otherwise leak one client per loop). ``forget`` drops the loop's
    entry: the entry's client and this generator hold the loop, so the weak
    key alone would never let it go.
    """
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            await scripts.aclose()
        with contextlib.suppress(Exception):
            await client.aclose()
        forget()


def _forget_loop(ref: weakref.ReferenceType[Limiter], loop: asyncio.AbstractEventLoop) -> None:
    limiter = ref()
    if limiter is not None:
        limiter._aio.pop(loop, None)


def _script_call(
    plan: LimitPlan, client_id: str, cost: int, kind: str, clock: Callable[[], float] | None
) -> tuple[list[str], list[int]]:
    """The script's keys and arguments. The client id in braces is a Redis Cluster
    hash tag, so all of a request's counters live in one slot. ``kind`` keeps each
    strategy's keys apart; moving and sliding windows also take the time, 0 for
    Redis's own clock (see :attr:`Limiter.redis_clock`)."""
    tag = f"m2m:{{{client_id}}}:{kind}"
    keys = [tag + lim.key_prefix for lim in plan.limits]
    args = [cost]
    for lim in plan.limits:
        args += (lim.amount, lim.expiry)
    if kind:
        args.append(0 if clock is None else round(clock() * 1_000_000))
    return keys, args


def _replayed() -> Charge:
    return Charge(False, [], replayed=True)


def _lease_keys(plan: LimitPlan, client_id: str) -> list[str]:
    """The lease hashes of a request's limits, in one Redis Cluster slot (see
    :func:`_script_call`), apart from the exact mode's counters (another type)."""
    tag = f"m2m:{{{client_id}}}:batched/"
    return [tag + lim.key_prefix for lim in plan.limits]


#: Distinct unknown tier names a limiter logs; see :meth:`Limiter._unknown_tier`.
UNKNOWN_TIERS_LOGGED = 32


def _policy_header(limits_: Sequence[Limit]) -> str:
    return ", ".join(f'"{lim.policy}";q={lim.amount};w={lim.expiry}' for lim in limits_)


class Limiter:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.send_headers = settings.rate_limit_headers
        uri = settings.rate_limit_storage
        self._secrets = secrets_of(uri)
        strategy = settings.rate_limit_strategy
        #: In-process counting (memory://), every strategy.
        self.windows: MemoryWindows | MemoryMovingWindows | MemorySlidingWindows | None = None
        if _scheme(uri) == "memory":
            counters: dict[str, Callable[[], Any]] = {
                "fixed-window": MemoryWindows,
                "moving-window": MemoryMovingWindows,
                "sliding-window-counter": MemorySlidingWindows,
            }
            self.windows = counters[strategy]()
        self.redis = _scheme(uri) in REDIS_SCHEMES
        options = _redis_options(settings.storage_timeout, False) if self.redis else {}
        self.storage: Any = open_limit_storage(uri, **options)
        #: The one-round-trip script of the strategy, on the connection limits opened (Redis).
        self._script: Any = None
        self._script_source, self._script_kind = REDIS_SCRIPTS[strategy]
        #: Batched counting (Redis, fixed windows; Settings refuses the rest): see Leases.
        self.leases: Leases | None = None
        self._return_script: Any = None
        self._returner: threading.Thread | None = None
        self._returner_stop = threading.Event()
        #: Whether a thread gives back idle leases (tests call return_idle themselves).
        self.return_leases_in_background = True
        if self.redis and settings.rate_limit_sync == "batched":
            self.leases = Leases(settings)
            self._script_source, self._script_kind = REDIS_LEASES, "batched/"
        #: The script that remembers a signature's nonce first (see carries_nonces).
        self._nonce_script: Any = None
        self._nonce_only: Any = None
        self._nonce_source = NONCE_FIRST + self._script_source
        #: The scripts' runner on the connections of the client limits opened (Redis).
        self._scripts: Any = None
        if self.redis:
            from .redis_scripts import SyncScripts

            scripts = self._scripts = SyncScripts(
                self.storage.get_connection(), poll=float(settings.storage_poll)
            )
            self._script = scripts.script(self._script_source)
            if self.leases is not None:
                self._return_script = scripts.script(REDIS_RETURN_LEASES)
            if _scheme(uri) != "redis+cluster":
                # A nonce's key names the signing key, not the client: on a cluster it
                # lives in another slot than the client's counters, so it stays a
                # round trip of its own there (signatures.RedisNonces).
                self._nonce_script = scripts.script(self._nonce_source)
                self._nonce_only = scripts.script(NONCE_ONLY)
        #: The clock of the moving and sliding window scripts; None (the default) is
        #: Redis's own ``TIME``, which every instance shares, as they share the expiry
        #: clock of the fixed windows. Tests set it to replay a history.
        self.redis_clock: Callable[[], float] | None = None
        self.in_memory = isinstance(self.storage, limits.storage.MemoryStorage)
        if self.windows is not None:
            # Counted in-process by our own classes: stop the storage's timer thread now.
            timer = getattr(self.storage, "timer", None)
            if timer is not None:
                timer.cancel()
        #: event loop -> (storage, script, closer, scripts): redis.asyncio clients are
        #: bound to the loop that opened them.
        self._aio: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[Any, Any, Any, Any]
        ] = weakref.WeakKeyDictionary()
        self._default = _limits_for("default", settings.default_limit_items)
        self._tiers = {n: _limits_for(f"tier.{n}", v) for n, v in settings.tier_limit_items.items()}
        self._routes = {
            r.index: _limits_for(f"route.{r.index}", r.limits) for r in settings.route_rules
        }
        token_limits = (
            _limits_for("token", settings.token_limit_items) if settings.token_endpoint else ()
        )
        #: What each token request is charged, per client id (``token_limits``).
        self.token_plan = LimitPlan(token_limits, _policy_header(token_limits))
        self._plans: dict[tuple[str | None, tuple[int, ...]], LimitPlan] = {}
        self._tier_plans: dict[str | None, LimitPlan] = {}
        if self.windows is not None and (
            self._default or any(self._tiers.values()) or any(self._routes.values())
        ):
            watch_memory_limiter(self)  # one WARNING if several processes count apart
        #: Tier names not in ``tiers`` that were warned about (see :meth:`_unknown_tier`).
        self._unknown_tiers: set[str] = set()
        self._unknown_tiers_lock = threading.Lock()
        self._down = False

    # -- planning -------------------------------------------------------------

    def plan(self, tier: str | None, routes: tuple[Route, ...]) -> LimitPlan:
        if tier is not None and tier not in self._tiers:
            # Such a client gets default_limits: one plan serves them all, so
            # the plans cached stay bounded by the configured tiers however
            # many tier names a token issuer mints.
            self._unknown_tier(tier)
            tier = None
        if not routes:
            plan = self._tier_plans.get(tier)
            if plan is None:
                plan = self._tier_plans[tier] = self._build_plan(tier, routes)
            return plan
        key = (tier, tuple(r.index for r in routes))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._build_plan(tier, routes)
            if len(self._plans) < 4096:
                self._plans[key] = plan
        return plan

    def _build_plan(self, tier: str | None, routes: tuple[Route, ...]) -> LimitPlan:
        base = self._default if tier is None else self._tiers[tier]  # plan() vets the tier
        chosen = base + tuple(lim for r in routes for lim in self._routes[r.index])
        return LimitPlan(chosen, _policy_header(chosen))

    def known_tier(self, tier: str | None) -> bool:
        return tier is None or tier in self._tiers

    def _unknown_tier(self, tier: str) -> None:
        """One WARNING per tier name that a client carries but ``tiers`` does not name.

        Such a client quietly gets ``default_limits``: a tier misspelt on a key
        (made with the plain ``m2m`` CLI, which cannot know the app's tiers) or
        in a token's tier claim. Plans are built when a key or token is first
        verified, then cached with it, so this never runs per request; and at
        most :data:`UNKNOWN_TIERS_LOGGED` names are logged (a token issuer could
        mint any number), then one line saying that more are not.
        """
        warned = self._unknown_tiers
        if tier in warned or len(warned) > UNKNOWN_TIERS_LOGGED:
            return  # the common case, without the lock
        with self._unknown_tiers_lock:
            if tier in warned or len(warned) > UNKNOWN_TIERS_LOGGED:
                return
            warned.add(tier)
            if len(warned) > UNKNOWN_TIERS_LOGGED:
                logger.warning(
                    "more than %d tier names that are not in tiers: the others are not logged",
                    UNKNOWN_TIERS_LOGGED,
                )
                return
        configured = ", ".join(sorted(self._tiers)) or "none"
        logger.warning(
            "tier %s is not in tiers (configured: %s): its clients get default_limits",
            log_safe(tier[:200]),
            configured,
        )

    # -- outage bookkeeping ---------------------------------------------------

    def _failed(self, exc: BaseException) -> StorageDown:
        problem = redact(str(exc), self._secrets)  # a client library may quote its URL
        if not self._down:
            self._down = True
            logger.error("rate-limit storage unreachable (%s): %s", type(exc).__name__, problem)
        return StorageDown(problem)

    def _recovered(self) -> None:
        if self._down:
            self._down = False
            logger.warning("rate-limit storage reachable again")

    # -- sync -----------------------------------------------------------------

    def carries_nonces(self, plan: LimitPlan) -> bool:
        """Whether :meth:`charge` can remember a signature's nonce for ``plan`` in the
        round trip its limits make (Redis, not a cluster, and limits to charge)."""
        return self._nonce_script is not None and bool(plan.limits)

    def charge(
        self,
        plan: LimitPlan,
        client_id: str,
        cost: int,
        now: float | None = None,
        nonce: tuple[str, int] | None = None,
    ) -> Charge:
        """Charge ``cost`` to every limit of ``plan`` for ``client_id``, or to none.

        ``nonce`` (key, TTL seconds), only when :meth:`carries_nonces`: remember it
        first in the same round trip; a nonce seen before charges nothing and
        answers ``replayed``. Raises :class:`StorageDown` when the storage cannot
        be reached.
        """
        if not plan.limits:
            return Charge(True, [])
        windows = self.windows
        if windows is not None:  # in-process windows: the hot path
            if now is None:
                now = time.time()
            try:
                refused, states = windows.take(plan.limits, client_id, cost, now)
            except Exception as exc:  # no I/O here; a failure is still a failure
                raise self._failed(exc) from exc
            if refused is not None:
                return self._denied(plan, refused, states[0][1], client_id, now)
            if not self.send_headers:
                return Charge(True, [])
            if len(states) == 1:
                lim = plan.limits[0]
                count, end = states[0]
                value = f"{lim.header_start}{lim.amount - count};t={math.ceil(end - now)}"
            else:
                value = ", ".join(
                    f"{lim.header_start}{lim.amount - count};t={math.ceil(end - now)}"
                    for lim, (count, end) in zip(plan.limits, states, strict=True)
                )
            return Charge(True, [("RateLimit-Policy", plan.policy_header), ("RateLimit", value)])
        if self.leases is not None:
            return self._charge_leased(plan, client_id, cost, nonce)
        try:
            if nonce is not None:
                keys, args = _script_call(
                    plan, client_id, cost, self._script_kind, self.redis_clock
                )
                raw = self._nonce_script([*keys, nonce[0]], [*args, nonce[1]])
                result = (
                    _replayed() if int(raw[0]) < 0 else self._script_result(plan, client_id, raw)
                )
            elif self._script is not None:
                keys, args = _script_call(
                    plan, client_id, cost, self._script_kind, self.redis_clock
                )
                result = self._script_result(plan, client_id, self._script(keys, args))
            else:  # fixed windows: Settings refuses the other strategies here
                result = self._charge_fixed(plan, client_id, cost)
        except StorageDown:
            raise
        except Exception as exc:
            raise self._failed(exc) from exc
        if self._down:
            self._recovered()
        return result

    def _decr(self, key: str, expiry: int, cost: int) -> None:
        storage: Any = self.storage
        if hasattr(storage, "decr"):
            storage.decr(key, cost)
        else:
            storage.incr(key, expiry, amount=-cost)

    def _charge_fixed(self, plan: LimitPlan, client_id: str, cost: int) -> Charge:
        storage = self.storage
        send_headers = self.send_headers
        now = time.time()
        parts = []
        for i, lim in enumerate(plan.limits):
            key = lim.key_prefix + client_id
            count = storage.incr(key, lim.expiry, amount=cost)
            if count > lim.amount:
                for done in plan.limits[: i + 1]:
                    self._decr(done.key_prefix + client_id, done.expiry, cost)
                return self._denied(plan, lim, float(storage.get_expiry(key)), client_id)
            if send_headers:
                reset = float(storage.get_expiry(key))
                parts.append(
                    f'"{lim.policy}";r={lim.amount - count};t={max(0, math.ceil(reset - now))}'
                )
        if not send_headers:
            return Charge(True, [])
        return Charge(
            True, [("RateLimit-Policy", plan.policy_header), ("RateLimit", ", ".join(parts))]
        )

    # -- async ----------------------------------------------------------------

    async def _async_storage(self) -> tuple[Any, Any]:
        """This event loop's (storage, script), made on first use."""
        loop = asyncio.get_running_loop()
        found = self._aio.get(loop)
        if found is None:
            uri = self.settings.rate_limit_storage
            options: dict[str, Any] = {}
            if self.redis:
                options = _redis_options(self.settings.storage_timeout, True)
                options["implementation"] = "redispy"  # the redis package, not coredis
            storage: Any = limits.storage.storage_from_string(f"async+{uri}", **options)
            script = closer = scripts = None
            if self.redis:
                from .redis_scripts import AsyncScripts

                client = storage.bridge.get_connection()
                scripts = AsyncScripts(client)
                script = scripts.script(self._script_source)
                forget = functools.partial(_forget_loop, weakref.ref(self), loop)
                closer = _close_with_loop(client, scripts, forget)
                await closer.__anext__()
            found = self._aio[loop] = (storage, script, closer, scripts)
        return found[0], found[1]

    def redis_script(self, source: str) -> Any:
        """``source`` as a callable ``(keys, args) -> answer`` on this limiter's Redis
        connections (see :mod:`m2m_middleware.redis_scripts`); Redis storages only."""
        assert self._scripts is not None
        return self._scripts.script(source)

    async def aredis_script(self, source: str) -> Any:
        """The async twin of :meth:`redis_script`, on this event loop's client."""
        loop = asyncio.get_running_loop()
        found = self._aio.get(loop)
        if found is None:  # the loop's first use: its client is made once
            await self._async_storage()
            found = self._aio[loop]
        return found[3].script(source)

    async def acharge(
        self,
        plan: LimitPlan,
        client_id: str,
        cost: int,
        nonce: tuple[str, int] | None = None,
    ) -> Charge:
        """The async twin of :meth:`charge` (``nonce`` as there)."""
        if self.in_memory or not plan.limits:  # in-process: never blocks
            return self.charge(plan, client_id, cost)
        leases = self.leases
        if leases is not None:
            keys = _lease_keys(plan, client_id)
            taken, covered, sent_at = leases.take(keys, cost)
            if covered and nonce is None:  # no round trip, nothing to wait for
                return self._leased_headers(plan, taken, sent_at)  # type: ignore[arg-type]
            args = None if covered else leases.wants(plan.limits, keys, taken, cost)
            try:
                if args is None:  # covered: only the nonce to remember
                    assert nonce is not None
                    only = await self.aredis_script(NONCE_ONLY)
                    answer: Any = await only([nonce[0]], [nonce[1]])
                elif nonce is not None:
                    script = await self.aredis_script(self._nonce_source)
                    answer = await script([*keys, nonce[0]], [*args, nonce[1]])
                else:
                    _, script = await self._async_storage()
                    answer = await script(keys, args)
            except BaseException as exc:  # cancelled too: the fetch must end
                leases.give_back(keys, taken, cost, args)
                if not isinstance(exc, Exception):
                    raise
                raise self._failed(exc) from exc
            if self._down:
                self._recovered()
            return self._leased_outcome(plan, client_id, keys, taken, cost, answer, sent_at, args)
        try:
            storage, script = await self._async_storage()
            if nonce is not None:
                keys, args = _script_call(
                    plan, client_id, cost, self._script_kind, self.redis_clock
                )
                script = await self.aredis_script(self._nonce_source)
                raw = await script([*keys, nonce[0]], [*args, nonce[1]])
                result = (
                    _replayed() if int(raw[0]) < 0 else self._script_result(plan, client_id, raw)
                )
            elif script is not None:
                keys, args = _script_call(
                    plan, client_id, cost, self._script_kind, self.redis_clock
                )
                result = self._script_result(plan, client_id, await script(keys, args))
            else:  # fixed windows: Settings refuses the other strategies here
                result = await self._acharge_fixed(storage, plan, client_id, cost)
        except StorageDown:
            raise
        except Exception as exc:
            raise self._failed(exc) from exc
        if self._down:
            self._recovered()
        return result

    async def _acharge_fixed(
        self, storage: Any, plan: LimitPlan, client_id: str, cost: int
    ) -> Charge:
        counts = []
        for i, lim in enumerate(plan.limits):
            key = lim.key_prefix + client_id
            count = await storage.incr(key, lim.expiry, amount=cost)
            counts.append(count)
            if count > lim.amount:
                for done in plan.limits[: i + 1]:
                    await storage.incr(done.key_prefix + client_id, done.expiry, amount=-cost)
                return self._denied(plan, lim, await storage.get_expiry(key), client_id)
        if not self.send_headers:
            return Charge(True, [])
        resets = [await storage.get_expiry(lim.key_prefix + client_id) for lim in plan.limits]
        return self._allowed(
            plan,
            [(lim.amount - c, r) for lim, c, r in zip(plan.limits, counts, resets, strict=True)],
        )

    # -- batched counting (Leases) ---------------------------------------------

    def _charge_leased(
        self, plan: LimitPlan, client_id: str, cost: int, nonce: tuple[str, int] | None
    ) -> Charge:
        leases = self.leases
        assert leases is not None
        keys = _lease_keys(plan, client_id)
        taken, covered, sent_at = leases.take(keys, cost)
        if covered and nonce is None:  # the hot path: no round trip
            return self._leased_headers(plan, taken, sent_at)  # type: ignore[arg-type]
        args = None if covered else leases.wants(plan.limits, keys, taken, cost)
        try:
            if args is None:  # covered: only the nonce to remember
                assert nonce is not None
                result: Any = self._nonce_only([nonce[0]], [nonce[1]])
            elif nonce is not None:
                result = self._nonce_script([*keys, nonce[0]], [*args, nonce[1]])
            else:
                result = self._script(keys, args)
        except BaseException as exc:  # interrupted too: the fetch must end
            leases.give_back(keys, taken, cost, args)
            if not isinstance(exc, Exception):
                raise
            raise self._failed(exc) from exc
        if self._down:
            self._recovered()
        return self._leased_outcome(plan, client_id, keys, taken, cost, result, sent_at, args)

    def charge_held(self, plan: LimitPlan, client_id: str, cost: int) -> Charge | None:
        """Batched counting: ``cost`` charged to the leases this process holds, with no
        round trip and nothing to await; None when they do not cover every limit
        (nothing is charged then: :meth:`acharge` makes the round trip)."""
        leases = self.leases
        assert leases is not None
        held, now = leases.take_all(_lease_keys(plan, client_id), cost)
        if held is None:
            return None
        return self._leased_headers(plan, held, now)

    def _leased_outcome(
        self,
        plan: LimitPlan,
        client_id: str,
        keys: list[str],
        taken: list[_Lease | None],
        cost: int,
        result: Any,
        sent_at: float,
        args: list[int] | None,
    ) -> Charge:
        """A lease script's answer, or (``[0]`` / ``[-1]``) a nonce's alone (``args``
        None: every limit was covered here)."""
        if int(result[0]) < 0:  # a replay: nothing is charged
            leases = self.leases
            assert leases is not None
            leases.give_back(keys, taken, cost, args)
            return _replayed()
        if args is None:  # every limit covered here, the nonce new
            return self._leased_headers(plan, taken, sent_at)  # type: ignore[arg-type]
        return self._leased_result(plan, client_id, keys, taken, cost, result, sent_at, args)

    def _leased_result(
        self,
        plan: LimitPlan,
        client_id: str,
        keys: list[str],
        taken: list[_Lease | None],
        cost: int,
        result: Any,
        sent_at: float,
        args: list[int],
    ) -> Charge:
        leases = self.leases
        assert leases is not None
        refused = int(result[0])
        if refused:
            leases.give_back(keys, taken, cost, args)
            # A request racing this one may have leased what it needs meanwhile.
            held, now = leases.take_all(keys, cost)
            if held is not None:
                return self._leased_headers(plan, held, now)
            lim = plan.limits[refused - 1]
            ttl = int(result[2])
            now = time.time()
            return self._denied(plan, lim, now + (ttl / 1000 if ttl > 0 else lim.expiry), client_id)
        held = leases.settle(client_id, keys, taken, cost, result, sent_at, args)
        if self._returner is None and self.return_leases_in_background:
            self._start_returner()
        return self._leased_headers(plan, held, sent_at)

    def _leased_headers(self, plan: LimitPlan, held: list[_Lease], now: float) -> Charge:
        if not self.send_headers:
            return Charge(True, [])
        if len(held) == 1:
            # One limit, the common plan, without the generator and the join: under
            # uvicorn this header was the costliest line of a batched request (py-spy:
            # 2.6% of the server's samples, more than the rest of the limiter).
            lim, lease = plan.limits[0], held[0]
            left = lim.amount - lease.leased + lease.unused
            ends = math.ceil(lease.deadline - now)
            value = f"{lim.header_start}{left if left > 0 else 0};t={ends if ends > 0 else 0}"
        else:
            value = ", ".join(
                f"{lim.header_start}{max(0, lim.amount - lease.leased + lease.unused)};"
                f"t={max(0, math.ceil(lease.deadline - now))}"
                for lim, lease in zip(plan.limits, held, strict=True)
            )
        return Charge(True, [("RateLimit-Policy", plan.policy_header), ("RateLimit", value)])

    def _start_returner(self) -> None:
        with self._unknown_tiers_lock:  # any lock: this runs once
            if self._returner is not None or self.leases is None:
                return
            interval = min(self.leases.idle, 1.0)
            self._returner = threading.Thread(
                target=_return_idle_leases,
                args=(weakref.ref(self), self._returner_stop, interval),
                name="m2m-lease-returner",
                daemon=True,
            )
            self._returner.start()
            # A daemon thread dies with the process: give back what is held at exit.
            atexit.register(_close_at_exit, weakref.ref(self))

    def return_idle(self, everything: bool = False) -> int:
        """Give back to Redis what leases idle for ``rate_limit_lease_idle`` seconds (or
        all leases) have not spent; returns how many leases were given back.

        One round trip per client (its keys share a Cluster slot), off the request
        path. Never raises: units that cannot be given back stay counted until
        their window ends, which only ever refuses, never admits, more.
        """
        if self.leases is None:
            return 0
        given = 0
        for leases in self.leases.ending(everything).values():
            args: list[Any] = []
            for _, window, unused in leases:
                args += (window, unused)
            try:
                self._return_script([key for key, _, _ in leases], args)
            except Exception as exc:
                # Redis is down: stop at the first failure (each would wait out
                # storage_timeout, at exit too); the rest stay counted.
                logger.debug("leases not given back (%s)", type(exc).__name__)
                break
            given += len(leases)
        return given

    def close(self) -> None:
        """Stop the background giver-back and give back every lease held."""
        self._returner_stop.set()
        self.return_idle(everything=True)
        if self._scripts is not None:
            self._scripts.close()

    # -- the Redis scripts ----------------------------------------------------

    def _script_result(self, plan: LimitPlan, client_id: str, result: Any) -> Charge:
        now = time.time()
        refused = int(result[0])
        if refused:
            lim = plan.limits[refused - 1]
            ttl = int(result[2])
            return self._denied(plan, lim, now + (ttl / 1000 if ttl > 0 else lim.expiry), client_id)
        if not self.send_headers:
            return Charge(True, [])
        return self._allowed(
            plan,
            [
                (lim.amount - int(result[2 * i + 1]), now + int(result[2 * i + 2]) / 1000)
                for i, lim in enumerate(plan.limits)
            ],
        )

    # -- headers --------------------------------------------------------------

    def _allowed(self, plan: LimitPlan, stats: Sequence[tuple[int, float]]) -> Charge:
        now = time.time()
        value = ", ".join(
            f'"{lim.policy}";r={max(0, remaining)};t={max(0, math.ceil(reset - now))}'
            for lim, (remaining, reset) in zip(plan.limits, stats, strict=True)
        )
        return Charge(True, [("RateLimit-Policy", plan.policy_header), ("RateLimit", value)])

    def _denied(
        self, plan: LimitPlan, lim: Limit, reset: float, client_id: str, now: float | None = None
    ) -> Charge:
        retry = max(1, math.ceil(reset - (time.time() if now is None else now)))
        headers = [("Retry-After", str(retry))]
        if self.send_headers:
            headers.append(("RateLimit-Policy", plan.policy_header))
            headers.append(("RateLimit", f'"{lim.policy}";r=0;t={retry}'))
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("client %s exceeded limit %s", log_safe(client_id), lim.item)
        return Charge(False, headers, retry)
