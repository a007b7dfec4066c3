"""What a limit holds for a client, read straight from where it is counted.

The race tests compare it with how many requests were admitted: a request
refused by one limit must have charged no other. Read from the counters
themselves (the in-process windows, or the Redis keys the scripts write), not
through the headers, which only show what an admitted request saw.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from m2m_middleware.limiting import Limit, Limiter


def charged(limiter: Limiter, limit: Limit, client_id: str) -> int:
    """The units ``limit`` holds for ``client_id`` now (every unit still counted,
    both windows of a sliding window counter)."""
    strategy = limiter.settings.rate_limit_strategy
    key = limit.key_prefix + client_id
    if limiter.windows is not None:
        state = limiter.windows._windows.get(key)
        if state is None:
            return 0
        if strategy == "moving-window":
            return int(state.expire(time.time()))  # type: ignore[union-attr]
        if strategy == "sliding-window-counter":
            return int(state[1] + state[2])  # type: ignore[index]
        return int(state[0])  # type: ignore[index]
    client = redis.Redis.from_url(limiter.settings.rate_limit_storage)
    try:
        key = f"m2m:{{{client_id}}}:{limiter._script_kind}{limit.key_prefix}"
        if strategy == "moving-window":
            seconds, micros = client.time()
            start = seconds * 1_000_000 + micros - limit.expiry * 1_000_000
            return sum(int(entry) > start for entry in client.lrange(key, 0, -1))
        if strategy == "sliding-window-counter":
            previous, current = client.hmget(key, "p", "c")
            return int(previous or 0) + int(current or 0)
        return int(client.get(key) or 0)
    finally:
        client.close()


@contextmanager
def switching_often() -> Iterator[None]:
    """Threads switch every microsecond instead of every 5 ms, so racing requests
    interleave between testing a limit and charging it (if anything lets them)."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)
