"""Per-request overhead of API-key auth + rate limits counted in Redis, per framework.

The Redis companion of ``overhead.py``, with the same method and drivers (it
imports them): apps called directly through a WSGI environ or an ASGI scope,
variants timed round-robin, each variant's figure the median of its per-round
means, overhead = that median minus the bare app's of the same framework.

Every limit lives in one Redis (``--redis-url``, by default the machine's at
127.0.0.1:6379). Per framework (Starlette, Flask, Django) it times:

- the bare app;
- m2m-middleware with ``rate_limit_storage`` set to the Redis URL (and
  ``invalidation_url=""``, so no pub/sub listener runs), once with a key
  charged one limit and once with a key whose tier has three limits;
- the same with ``rate_limit_sync="batched"`` (the default lease, a tenth of
  each limit), for Starlette and Flask (Django's middleware reads one
  ``M2M_AUTH`` per process, and its engine path is the same);
- the peer stack, with the same one limit and with the same three limits:
  Starlette's ``AuthenticationMiddleware`` plus slowapi's ``@limiter.limit``;
  a ``before_request`` SHA-256 check plus Flask-Limiter; a DRF ``APIView``
  with a SHA-256 authentication class plus one ``SimpleRateThrottle`` per
  limit, on Django's own ``RedisCache``.

Plus a raw floor with no framework: SHA-256, a dict lookup and one ``limits``
``FixedWindowRateLimiter.hit`` on its (sync) ``RedisStorage``.

After the warm-up and before the first timed round, each variant serves 100
more requests while redis-py's ``send_packed_command`` (sync and asyncio) is
wrapped with a counter: the **Redis round trips per request** column. The
wrapper is removed before anything is timed.

Each run uses client ids (and a Django cache key prefix) of its own, so runs
never share a counter; its keys are deleted at the end. Limits are high
enough that no request is refused.

Run ``python benchmarks/redis_overhead.py --help`` for the options (those of
``overhead.py``, 400 requests per round by default, plus ``--redis-url``).
Needs the ``bench`` and ``redis`` extras. Not a pytest test: it calls
``django.conf.settings.configure()``, so run it in its own process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import overhead
from overhead import FRAMEWORKS, LIMIT, Variant

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
#: The second configuration: three limits on every request, high enough never to trip.
LIMITS_3 = "100000/minute;1000000/hour;10000000/day"
#: Our tier whose keys are charged LIMITS_3 instead of the default LIMIT.
TIER_3 = "three-limits"
#: Requests per variant in the (untimed) round-trip counting pass.
COUNT_REQUESTS = 100

#: This run's own ids: in every client id, and the Django cache's key prefix.
RUN = uuid.uuid4().hex[:12]
DJANGO_KEY_PREFIX = f"m2m-bench-{RUN}"

#: Every variant under (framework, kind); kind is "bare", "ours 1", "ours 3", "batched 1",
#: "batched 3", "peer 1", "peer 3" (the number is how many limits each request is
#: charged), or "floor".
ROWS: dict[tuple[str, str], Variant] = {}
#: id(variant) -> Redis round trips per request, from the counting pass.
ROUND_TRIPS: dict[int, float] = {}
#: The Redis this run has written to: its keys are deleted at the end.
USED_URLS: list[str] = []


def client_id(framework: str, limits: int) -> str:
    return f"bench-{RUN}-{framework}-{limits}"


def shown_url(url: str) -> str:
    """``url`` with any password masked, for messages."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def require_redis(url: str) -> None:
    """PING Redis at ``url``, or exit with status 2 and one line saying why."""

    def give_up(reason: str) -> None:
        print(f"redis_overhead.py: {reason}", file=sys.stderr)
        raise SystemExit(2)

    try:
        import redis
    except ImportError:
        give_up('needs redis-py: pip install -e ".[bench,redis]"')
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        give_up(f"no Redis at {shown_url(url)} ({reason}); start one or pass --redis-url")


def delete_run_keys(url: str) -> None:
    """Delete every key of this run (their names all hold ``RUN``)."""
    import redis

    with contextlib.suppress(Exception), redis.Redis.from_url(url, socket_timeout=5) as client:
        found = list(client.scan_iter(match=f"*{RUN}*", count=1000))
        for start in range(0, len(found), 500):
            client.delete(*found[start : start + 500])


# -- counting round trips -----------------------------------------------------------------------


@contextlib.contextmanager
def counting_round_trips() -> Iterator[list[int]]:
    """While open, every ``send_packed_command`` of redis-py (sync or asyncio) made
    on the main thread, which serves every request here, adds 1.

    One call writes one command, or one pipeline, before its reply is read:
    one round trip.
    """
    from redis.asyncio.connection import AbstractConnection as AsyncConnection
    from redis.connection import AbstractConnection

    count = [0]
    sync_send = AbstractConnection.send_packed_command
    async_send = AsyncConnection.send_packed_command

    requests = threading.main_thread()

    def send(self: Any, command: Any, check_health: bool = True) -> None:
        # Only the requests' own: not a batched limiter's thread giving back idle leases.
        if threading.current_thread() is requests:
            count[0] += 1
        sync_send(self, command, check_health)

    async def asend(self: Any, command: Any, check_health: bool = True) -> None:
        count[0] += 1
        await async_send(self, command, check_health)

    AbstractConnection.send_packed_command = send  # type: ignore[method-assign]
    AsyncConnection.send_packed_command = asend  # type: ignore[method-assign]
    try:
        yield count
    finally:
        AbstractConnection.send_packed_command = sync_send  # type: ignore[method-assign]
        AsyncConnection.send_packed_command = async_send  # type: ignore[method-assign]


def count_round_trips(variants: list[Variant], args: argparse.Namespace) -> None:
    """After the warm-up: each variant serves COUNT_REQUESTS requests, round trips counted."""
    with counting_round_trips() as count:
        for variant in variants:
            count[0] = 0
            _elapsed, bad = variant.run(COUNT_REQUESTS)
            if bad:
                raise SystemExit(
                    f"{variant.framework}/{variant.stack}: {bad} non-200s while counting"
                )
            ROUND_TRIPS[id(variant)] = count[0] / COUNT_REQUESTS


# -- the variants -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    """One framework's two API keys, in one memory store."""

    store: Any
    one: str  # charged the default LIMIT
    three: str  # of TIER_3: charged the three LIMITS_3
    table: dict[str, str]  # SHA-256 hex -> client id, for the peers

    @classmethod
    def make(cls, framework: str) -> Keys:
        from m2m_middleware import open_key_store

        store = open_key_store("memory://")
        one = store.create_key(client_id(framework, 1)).key
        three = store.create_key(client_id(framework, 3), tier=TIER_3).key
        table = {
            hashlib.sha256(one.encode()).hexdigest(): client_id(framework, 1),
            hashlib.sha256(three.encode()).hexdigest(): client_id(framework, 3),
        }
        return cls(store, one, three, table)

    def headers(self, limits: int) -> dict[str, str]:
        return {"X-API-Key": self.one if limits == 1 else self.three}


def ours_config(store: Any, url: str, sync: str = "exact") -> dict[str, Any]:
    """m2m-middleware's settings: one limit by default, three for TIER_3, all in Redis."""
    return {
        "key_store": store,
        "default_limits": LIMIT,
        "tiers": {TIER_3: LIMITS_3},
        "rate_limit_storage": url,
        "rate_limit_sync": sync,
        "invalidation_url": "",  # no revocation listener (it would default to this Redis)
    }


@dataclass(frozen=True)
class Spec:
    kind: str
    stack: str
    app: Any
    headers: dict[str, str]
    path: str = "/"

    @property
    def role(self) -> str:
        role = self.kind.partition(" ")[0]
        return "ours" if role == "batched" else role  # the same middleware, batched

    @property
    def deny(self) -> int | None:
        return None if self.kind == "bare" else 401


def _limits_label(limits: int) -> str:
    return "1 limit" if limits == 1 else f"{limits} limits"


def specs(
    keys: Keys,
    bare: tuple[str, Any],
    ours: tuple[str, Any],
    peers: tuple[str, dict[int, tuple[Any, str]]],
    batched: tuple[str, Any] | None = None,
) -> list[Spec]:
    """bare; ours with one and three limits (exact, then batched); the peer with one
    and three.

    ``bare``, ``ours`` and ``batched`` are (stack, app); ``peers`` is (stack, {limits:
    (app, path)}).
    """
    found = [Spec("bare", bare[0], bare[1], keys.headers(1))]
    for kind, stack in (("ours", ours), ("batched", batched)):
        if stack is None:
            continue
        for limits in (1, 3):
            found.append(
                Spec(
                    f"{kind} {limits}",
                    f"{stack[0]} ({_limits_label(limits)})",
                    stack[1],
                    keys.headers(limits),
                )
            )
    for limits, (app, path) in peers[1].items():
        found.append(
            Spec(
                f"peer {limits}",
                f"{peers[0]} ({_limits_label(limits)})",
                app,
                keys.headers(limits),
                path,
            )
        )
    return found


def _register(framework: str, found: list[Spec], make: Callable[[Spec], Variant]) -> list[Variant]:
    variants = []
    for spec in found:
        variant = make(spec)  # checked first: 200 with the key, 401 without or with a wrong one
        ROWS[framework, spec.kind] = variant
        variants.append(variant)
    return variants


def build_floor(url: str) -> list[Variant]:
    from limits import parse
    from limits.storage import storage_from_string
    from limits.strategies import FixedWindowRateLimiter

    key = "m2m_" + "k" * 38
    client = f"bench-{RUN}-floor"
    table = {hashlib.sha256(key.encode()).hexdigest(): client}
    limiter = FixedWindowRateLimiter(storage_from_string(url))
    item = parse(LIMIT)

    def run(n: int) -> tuple[int, int]:
        bad = 0
        sha256 = hashlib.sha256
        hit = limiter.hit
        perf = overhead.clock
        t0 = perf()
        for _ in range(n):
            found = table[sha256(key.encode()).hexdigest()]
            if not hit(item, "floor", found):
                bad += 1
        return perf() - t0, bad

    stack = "raw floor: sha256 + dict lookup + limits hit on RedisStorage (sync)"
    variant = Variant("-", stack, "floor", run)
    ROWS["-", "floor"] = variant
    return [variant]


def build_starlette(loop: asyncio.AbstractEventLoop, url: str) -> list[Variant]:
    from m2m_middleware import Settings
    from m2m_middleware.starlette import M2MMiddleware

    keys = Keys.make("starlette")
    ours = overhead.starlette_app()
    ours.add_middleware(M2MMiddleware, settings=Settings(**ours_config(keys.store, url)))
    batched = overhead.starlette_app()
    batched.add_middleware(
        M2MMiddleware, settings=Settings(**ours_config(keys.store, url, "batched"))
    )
    peers = {
        limits: (
            overhead.starlette_slowapi_decorated(
                overhead.starlette_key_backend(keys.table), rule, storage_uri=url
            ),
            "/",
        )
        for limits, rule in ((1, LIMIT), (3, LIMITS_3))
    }
    found = specs(
        keys,
        ("bare (Route + PlainTextResponse)", overhead.starlette_app()),
        ("ours: M2MMiddleware", ours),
        ("peer: AuthenticationMiddleware + slowapi @limit", peers),
        ("ours: M2MMiddleware, rate_limit_sync=batched", batched),
    )
    return _register(
        "starlette",
        found,
        lambda s: overhead.asgi_variant(
            loop, "starlette", s.stack, s.role, s.app, s.headers, s.deny
        ),
    )


def build_flask(url: str) -> list[Variant]:
    from m2m_middleware import Settings
    from m2m_middleware.flask import M2MAuth

    keys = Keys.make("flask")
    ours = overhead.flask_app()
    M2MAuth(ours, settings=Settings(**ours_config(keys.store, url)))
    batched = overhead.flask_app()
    M2MAuth(batched, settings=Settings(**ours_config(keys.store, url, "batched")))

    def peer(rule: str) -> Any:
        app = overhead.flask_app()
        overhead.flask_key_check(app, keys.table)
        overhead.flask_limiter(app, rule, storage_uri=url)
        return app

    found = specs(
        keys,
        ("bare (one route)", overhead.flask_app()),
        ("ours: M2MAuth", ours),
        (
            "peer: before_request sha256 check + Flask-Limiter",
            {1: (peer(LIMIT), "/"), 3: (peer(LIMITS_3), "/")},
        ),
        ("ours: M2MAuth, rate_limit_sync=batched", batched),
    )
    return _register(
        "flask",
        found,
        lambda s: overhead.wsgi_variant("flask", s.stack, s.role, s.app, s.path, s.headers, s.deny),
    )


def build_django(url: str) -> list[Variant]:
    keys = Keys.make("django")
    overhead.configure_django(
        ours_config(keys.store, url),
        caches={
            "throttle": {
                "BACKEND": "django.core.cache.backends.redis.RedisCache",
                "LOCATION": url,
                "KEY_PREFIX": DJANGO_KEY_PREFIX,
            }
        },
    )

    from django.core.cache import caches
    from rest_framework.permissions import IsAuthenticated

    cache = caches["throttle"]
    authentication = overhead.drf_key_authentication(keys.table)

    def view(rules: list[str]) -> Any:
        """One ``SimpleRateThrottle`` per limit: DRF's way to stack limits."""
        return overhead.django_plain_view(
            authentication_classes=(authentication,),
            permission_classes=(IsAuthenticated,),
            throttle_classes=tuple(
                overhead.drf_client_throttle(rule, f"client{i}", cache)
                for i, rule in enumerate(rules)
            ),
        )

    overhead.django_urls({"drf": view([LIMIT]), "drf-3": view(LIMITS_3.split(";"))})
    plain = overhead.django_handler([])
    ours = overhead.django_handler(["m2m_middleware.django.M2MAuthMiddleware"])
    found = specs(
        keys,
        ("bare (function view, no middleware)", plain),
        ("ours: M2MAuthMiddleware", ours),
        (
            "peer: DRF APIView + sha256 auth class + SimpleRateThrottle on RedisCache",
            {1: (plain, "/drf"), 3: (plain, "/drf-3")},
        ),
    )
    return _register(
        "django",
        found,
        lambda s: overhead.wsgi_variant(
            "django", s.stack, s.role, s.app, s.path, s.headers, s.deny
        ),
    )


def build(
    args: argparse.Namespace, frameworks: list[str], loop: asyncio.AbstractEventLoop
) -> list[Variant]:
    url = args.redis_url
    require_redis(url)
    USED_URLS.append(url)
    variants = build_floor(url)
    if "starlette" in frameworks:
        variants += build_starlette(loop, url)
    if "flask" in frameworks:
        variants += build_flask(url)
    if "django" in frameworks:
        variants += build_django(url)
    return variants


# -- reporting ------------------------------------------------------------------------------------


def _trips(value: float | None) -> str:
    if value is None:
        return "-"
    return str(round(value)) if abs(value - round(value)) < 1e-9 else f"{value:.2f}"


def _x(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b is not None and b > 0 else "n/a"


def report(variants: list[Variant], verbose: bool) -> list[str]:
    overheads = overhead.overheads(variants)
    kind_of = {id(v): kind for (_, kind), v in ROWS.items()}

    def cost(framework: str, kind: str) -> float | None:
        row = ROWS.get((framework, kind))
        return None if row is None else overheads[id(row)]

    header = [
        "framework",
        "stack",
        "median us/request",
        "overhead us",
        "overhead ratio vs ours",
        "Redis round trips/request",
    ]
    rows = []
    for v in variants:
        mine = overheads[id(v)]
        kind = kind_of[id(v)]
        ratio = "-"
        if kind.startswith(("ours", "peer", "batched")):
            ratio = _x(mine, cost(v.framework, "ours " + kind.rpartition(" ")[2]))
        rows.append(
            [
                v.framework,
                v.stack,
                overhead._fmt(v.median_us),
                overhead._fmt(mine),
                ratio,
                _trips(ROUND_TRIPS.get(id(v))),
            ]
        )
    out = overhead.markdown_table(header, rows)
    out.append("")
    for framework in FRAMEWORKS:
        if (framework, "ours 1") not in ROWS:
            continue
        peer = ROWS[framework, "peer 1"].stack.removeprefix("peer: ").rpartition(" (")[0]
        for limits in (1, 3):
            mine, theirs = cost(framework, f"ours {limits}"), cost(framework, f"peer {limits}")
            assert mine is not None and theirs is not None
            label = framework if limits == 1 else f"{framework}, {limits} limits"
            trips = [
                _trips(ROUND_TRIPS.get(id(ROWS[framework, f"{who} {limits}"])))
                for who in ("ours", "peer")
            ]
            line = (
                f"{label}: ours {mine:+.2f} us, peer {theirs:+.2f} us ({peer}), "
                f"peer/ours {_x(theirs, mine)}; "
                f"Redis round trips/request: ours {trips[0]}, peer {trips[1]}"
            )
            batched = cost(framework, f"batched {limits}")
            if batched is not None:
                row = ROWS[framework, f"batched {limits}"]
                line += (
                    f"; batched {batched:+.2f} us, peer/batched {_x(theirs, batched)}, "
                    f"{_trips(ROUND_TRIPS.get(id(row)))} round trips/request"
                )
            out.append(line)
    if verbose:
        out += overhead.round_means(variants)
    return out


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis-url",
        default=DEFAULT_REDIS_URL,
        help=f"the Redis every limit is counted in (default {DEFAULT_REDIS_URL})",
    )


def main(argv: list[str] | None = None) -> int:
    try:
        return overhead.run_benchmark(
            argv,
            description="Per-request overhead of API-key auth + rate limits counted in Redis "
            "(one and three limits), per framework, with Redis round trips per request.",
            build=build,  # exits with status 2 when Redis is not there
            report=report,
            packages=["redis"],
            requests=400,  # each request is a network round trip (or several)
            add_options=add_options,
            after_warmup=count_round_trips,
        )
    finally:
        for url in USED_URLS:
            delete_run_keys(url)


if __name__ == "__main__":
    sys.exit(main())
