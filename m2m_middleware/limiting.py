"""Per-client limits on the ``limits`` library, charged all-or-nothing.

Limits are written and parsed in ``limits`` notation and, for every storage
but the in-process one, counted by ``limits``:

- Fixed windows (the default) go straight to the storage's atomic ``incr``:
  every applicable limit is incremented, and if any one overflows, all the
  increments of this request are taken back. That admits exactly the budget
  under any concurrency (a test-then-hit pair would let racing requests
  overspend) and costs one storage call per limit on the happy path.
- Moving and sliding windows use the ``limits`` strategies: test all, then
  hit all.
- ``memory://`` with fixed windows is counted by :class:`MemoryWindows`, a
  few lines of our own. ``limits``' ``MemoryStorage`` takes a per-key lock and
  re-arms a timer thread on every ``incr`` (a new thread every 10 ms under
  traffic), which made it most of the cost of a request; here one lock covers
  testing and charging all of a request's limits, so all-or-nothing needs no
  rollback, and expired windows are swept in bulk.

- Redis (``redis://``, ``rediss://``, ``redis+unix://``, ``redis+sentinel://``,
  ``redis+cluster://``) with fixed windows runs one Lua script on the
  connection ``limits`` opened: every limit of a request is tested, charged
  (all or none) and read back for the headers in **one round trip**, where
  the generic path costs two per limit. The keys of one client share a Redis
  Cluster hash tag, so the script runs on clusters too.

Network storages get their ``limits.aio`` twin on the async path (Redis through
``redis.asyncio``, one client per event loop), so the event loop never waits on
a socket; in-process counting never blocks, so both paths share it (a Django
project serving sync and async views keeps one budget). Network calls time out
after ``storage_timeout`` seconds and are retried once at once (a connection
that died while idle, say after a Redis restart, is replaced without failing
a request); a storage that still fails is an outage, handled by the engine's
``on_storage_error`` policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
import weakref
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import limits
import limits.aio.strategies
import limits.storage
import limits.strategies
from limits import RateLimitItem

from .errors import ConfigError
from .redaction import redact, secrets_of
from .settings import Route, Settings

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

#: limits storage schemes served by redis-py, which the script above can use.
REDIS_SCHEMES = frozenset({"redis", "rediss", "redis+unix", "redis+sentinel", "redis+cluster"})


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
    while Redis is down)."""
    if asynchronous:
        from redis.asyncio.retry import Retry as AsyncRetry
        from redis.backoff import NoBackoff

        retry: Any = AsyncRetry(NoBackoff(), 1)
    else:
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        retry = Retry(NoBackoff(), 1)
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


def _limits_for(source: str, items: Sequence[RateLimitItem]) -> tuple[Limit, ...]:
    out = []
    seen: set[str] = set()
    for item in items:
        window = item.get_expiry()
        policy = f"{source}-{window}s"
        while policy in seen:
            policy += "'"
        seen.add(policy)
        key_prefix = f"m2m/{source}/{item.amount}/{window}/"
        out.append(Limit(item, policy, key_prefix, item.amount, window, f'"{policy}";r='))
    return tuple(out)


async def _close_with_loop(client: Any) -> AsyncIterator[None]:
    """Closes ``client`` when its event loop shuts down.

    A started async generator is closed by ``loop.shutdown_asyncgens()``,
    which ``asyncio.run``, uvicorn and asgiref all call before closing the
    loop, so the connections are released on the loop that owns them rather
    than left to warn in ``__del__`` (a test that runs a loop per request
    would otherwise leak one client per loop).
    """
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            await client.aclose()


def _script_call(plan: LimitPlan, client_id: str, cost: int) -> tuple[list[str], list[int]]:
    """The script's keys and arguments. The client id in braces is a Redis Cluster
    hash tag, so all of a request's counters live in one slot."""
    tag = f"m2m:{{{client_id}}}:"
    keys = [tag + lim.key_prefix for lim in plan.limits]
    args = [cost]
    for lim in plan.limits:
        args += (lim.amount, lim.expiry)
    return keys, args


def _policy_header(limits_: Sequence[Limit]) -> str:
    return ", ".join(f'"{lim.policy}";q={lim.amount};w={lim.expiry}' for lim in limits_)


class Limiter:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.send_headers = settings.rate_limit_headers
        uri = settings.rate_limit_storage
        self._secrets = secrets_of(uri)
        self.fixed = settings.rate_limit_strategy == "fixed-window"
        self.windows: MemoryWindows | None = None
        if self.fixed and uri.partition("?")[0] == "memory://":
            self.windows = MemoryWindows()
        self.redis = _scheme(uri) in REDIS_SCHEMES
        options = _redis_options(settings.storage_timeout, False) if self.redis else {}
        self.storage: Any = open_limit_storage(uri, **options)
        #: The one-round-trip script, on the connection limits opened (Redis, fixed windows).
        self._script: Any = None
        if self.redis and self.fixed:
            self._script = self.storage.get_connection().register_script(REDIS_FIXED_WINDOWS)
        self.in_memory = isinstance(self.storage, limits.storage.MemoryStorage)
        if self.windows is not None:
            # Counted by MemoryWindows: stop the storage's timer thread now.
            timer = getattr(self.storage, "timer", None)
            if timer is not None:
                timer.cancel()
        #: event loop -> (storage, strategy, script, closer): redis.asyncio clients
        #: are bound to the loop that opened them.
        self._aio: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[Any, Any, Any, Any]
        ] = weakref.WeakKeyDictionary()
        strategy_cls: Any = {
            "fixed-window": limits.strategies.FixedWindowRateLimiter,
            "moving-window": limits.strategies.MovingWindowRateLimiter,
            "sliding-window-counter": limits.strategies.SlidingWindowCounterRateLimiter,
        }[settings.rate_limit_strategy]
        try:
            self.strategy: Any = strategy_cls(self.storage)
        except NotImplementedError as exc:
            raise ConfigError(
                "rate_limit_strategy", f"not supported by this storage: {exc}"
            ) from None
        self._default = _limits_for("default", settings.default_limit_items)
        self._tiers = {n: _limits_for(f"tier.{n}", v) for n, v in settings.tier_limit_items.items()}
        self._routes = {
            r.index: _limits_for(f"route.{r.index}", r.limits) for r in settings.route_rules
        }
        self._plans: dict[tuple[str | None, tuple[int, ...]], LimitPlan] = {}
        self._tier_plans: dict[str | None, LimitPlan] = {}
        self._down = False

    # -- planning -------------------------------------------------------------

    def plan(self, tier: str | None, routes: tuple[Route, ...]) -> LimitPlan:
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
        base = self._tiers.get(tier, self._default) if tier is not None else self._default
        chosen = base + tuple(lim for r in routes for lim in self._routes[r.index])
        return LimitPlan(chosen, _policy_header(chosen))

    def known_tier(self, tier: str | None) -> bool:
        return tier is None or tier in self._tiers

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

    def charge(
        self, plan: LimitPlan, client_id: str, cost: int, now: float | None = None
    ) -> Charge:
        """Charge ``cost`` to every limit of ``plan`` for ``client_id``, or to none.

        Raises :class:`StorageDown` when the storage cannot be reached.
        """
        if not plan.limits:
            return Charge(True, [])
        windows = self.windows
        if windows is not None:  # in-process fixed windows: the hot path
            if now is None:
                now = time.time()
            try:
                refused, states = windows.take(plan.limits, client_id, cost, now)
            except Exception as exc:  # no I/O here; a failure is still a failure
                raise self._failed(exc) from exc
            if refused is not None:
                return self._denied(plan, refused, states[0][1], client_id)
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
        try:
            if self._script is not None:
                keys, args = _script_call(plan, client_id, cost)
                result = self._script_result(plan, client_id, self._script(keys, args))
            elif self.fixed:
                result = self._charge_fixed(plan, client_id, cost)
            else:
                result = self._charge_strategy(plan, client_id, cost)
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

    def _charge_strategy(self, plan: LimitPlan, client_id: str, cost: int) -> Charge:
        strategy = self.strategy
        for lim in plan.limits:
            if not strategy.test(lim.item, lim.key_prefix, client_id, cost=cost):
                stats = strategy.get_window_stats(lim.item, lim.key_prefix, client_id)
                return self._denied(plan, lim, stats.reset_time, client_id)
        for lim in plan.limits:
            if not strategy.hit(lim.item, lim.key_prefix, client_id, cost=cost):
                stats = strategy.get_window_stats(lim.item, lim.key_prefix, client_id)
                return self._denied(plan, lim, stats.reset_time, client_id)
        if not self.send_headers:
            return Charge(True, [])
        windows = [
            strategy.get_window_stats(lim.item, lim.key_prefix, client_id) for lim in plan.limits
        ]
        return self._allowed(plan, [(w.remaining, w.reset_time) for w in windows])

    # -- async ----------------------------------------------------------------

    async def _async_storage(self) -> tuple[Any, Any, Any]:
        """This event loop's (storage, strategy, script), made on first use."""
        loop = asyncio.get_running_loop()
        found = self._aio.get(loop)
        if found is None:
            uri = self.settings.rate_limit_storage
            options: dict[str, Any] = {}
            if self.redis:
                options = _redis_options(self.settings.storage_timeout, True)
                options["implementation"] = "redispy"  # the redis package, not coredis
            storage: Any = limits.storage.storage_from_string(f"async+{uri}", **options)
            cls: Any = {
                "fixed-window": limits.aio.strategies.FixedWindowRateLimiter,
                "moving-window": limits.aio.strategies.MovingWindowRateLimiter,
                "sliding-window-counter": limits.aio.strategies.SlidingWindowCounterRateLimiter,
            }[self.settings.rate_limit_strategy]
            script = closer = None
            if self.redis:
                client = storage.bridge.get_connection()
                if self.fixed:
                    script = client.register_script(REDIS_FIXED_WINDOWS)
                closer = _close_with_loop(client)
                await closer.__anext__()
            found = self._aio[loop] = (storage, cls(storage), script, closer)
        return found[0], found[1], found[2]

    async def acharge(self, plan: LimitPlan, client_id: str, cost: int) -> Charge:
        if self.in_memory or not plan.limits:  # in-process: never blocks
            return self.charge(plan, client_id, cost)
        try:
            storage, strategy, script = await self._async_storage()
            if script is not None:
                keys, args = _script_call(plan, client_id, cost)
                result = self._script_result(plan, client_id, await script(keys, args))
            elif self.fixed:
                result = await self._acharge_fixed(storage, plan, client_id, cost)
            else:
                result = await self._acharge_strategy(strategy, plan, client_id, cost)
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

    async def _acharge_strategy(
        self, strategy: Any, plan: LimitPlan, client_id: str, cost: int
    ) -> Charge:
        for lim in plan.limits:
            if not await strategy.test(lim.item, lim.key_prefix, client_id, cost=cost):
                stats = await strategy.get_window_stats(lim.item, lim.key_prefix, client_id)
                return self._denied(plan, lim, stats.reset_time, client_id)
        for lim in plan.limits:
            if not await strategy.hit(lim.item, lim.key_prefix, client_id, cost=cost):
                stats = await strategy.get_window_stats(lim.item, lim.key_prefix, client_id)
                return self._denied(plan, lim, stats.reset_time, client_id)
        if not self.send_headers:
            return Charge(True, [])
        windows = [
            await strategy.get_window_stats(lim.item, lim.key_prefix, client_id)
            for lim in plan.limits
        ]
        return self._allowed(plan, [(w.remaining, w.reset_time) for w in windows])

    # -- the Redis script -----------------------------------------------------

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

    def _denied(self, plan: LimitPlan, lim: Limit, reset: float, client_id: str) -> Charge:
        retry = max(1, math.ceil(reset - time.time()))
        headers = [("Retry-After", str(retry))]
        if self.send_headers:
            headers.append(("RateLimit-Policy", plan.policy_header))
            headers.append(("RateLimit", f'"{lim.policy}";r=0;t={retry}'))
        logger.debug("client %s exceeded limit %s", client_id, lim.item)
        return Charge(False, headers, retry)
