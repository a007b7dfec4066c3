"""Failed authentications per source address (m2m_middleware.source_limits)."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
import servers

from m2m_middleware import ConfigError, Settings
from m2m_middleware.limiting import Limiter
from m2m_middleware.outcome import deny
from m2m_middleware.source_limits import SourceLimits, SourceRateLimited

ADDRESS = "203.0.113.7"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def source_limits(
    limits: str = "3/minute", clock: Any = None, max_blocked: int = 100_000, **fields: Any
) -> SourceLimits:
    settings = Settings(key_store="memory://", source_limits=limits, **fields)
    return SourceLimits(
        settings, Limiter(settings), clock=clock or Clock(), max_blocked=max_blocked
    )


def blocked_for(limits: SourceLimits, address: str) -> int | None:
    try:
        limits.check(address)
    except SourceRateLimited as exc:
        return exc.retry_after
    return None


def test_the_failure_that_spends_the_budget_blocks_the_address_at_once() -> None:
    clock = Clock()
    limits = source_limits("3/minute", clock)
    for _ in range(2):
        limits.failed(ADDRESS)
        assert blocked_for(limits, ADDRESS) is None
    limits.failed(ADDRESS)
    assert blocked_for(limits, ADDRESS) == 60
    clock.now += 45
    assert blocked_for(limits, ADDRESS) == 15


def test_the_block_lasts_the_rest_of_the_window_then_a_new_budget_starts() -> None:
    clock = Clock()
    limits = source_limits("2/minute", clock)
    limits.failed(ADDRESS)
    clock.now += 30
    limits.failed(ADDRESS)
    assert blocked_for(limits, ADDRESS) == 30  # the window opened at the first failure
    clock.now += 31
    assert blocked_for(limits, ADDRESS) is None
    limits.failed(ADDRESS)
    assert blocked_for(limits, ADDRESS) is None  # one failure of a fresh budget


def test_other_addresses_are_not_affected() -> None:
    limits = source_limits("1/minute")
    limits.failed(ADDRESS)
    assert blocked_for(limits, ADDRESS) == 60
    assert blocked_for(limits, "203.0.113.8") is None
    assert blocked_for(limits, "2001:db8::1") is None
    limits.check(None)  # the unknown clients' budget is their own


def test_unknown_addresses_share_one_budget_instead_of_none() -> None:
    """A client that makes its address unknown (through a trusted proxy, a
    malformed chain) must not guess credentials without a limit."""
    limits = source_limits("2/minute")
    limits.failed(None)
    limits.check(None)
    limits.failed(None)
    with pytest.raises(SourceRateLimited):
        limits.check(None)
    limits.check(ADDRESS)  # a known address keeps its own budget


def test_with_several_limits_the_longest_spent_window_counts() -> None:
    clock = Clock()
    limits = source_limits("2/second;3/hour", clock)
    limits.failed(ADDRESS)
    limits.failed(ADDRESS)
    assert blocked_for(limits, ADDRESS) == 1
    clock.now += 2
    assert blocked_for(limits, ADDRESS) is None
    limits.failed(ADDRESS)  # the third of the hour
    assert blocked_for(limits, ADDRESS) == 3600 - 2


def test_a_request_from_an_address_not_blocked_reads_no_clock_and_no_storage() -> None:
    def no_clock() -> float:
        raise AssertionError("the success path read the clock")

    limits = source_limits("3/minute", no_clock)
    limits._memory = None  # any storage access would now fail
    for _ in range(1000):
        limits.check(ADDRESS)


def test_without_source_limits_nothing_is_counted() -> None:
    settings = Settings(key_store="memory://")
    limits = SourceLimits(settings, Limiter(settings))
    assert not limits.enabled
    for _ in range(100):
        limits.failed(ADDRESS)
    limits.check(ADDRESS)


def test_the_blocked_addresses_are_bounded() -> None:
    clock = Clock()
    limits = source_limits("1/minute", clock, max_blocked=3)
    for i in range(10):
        limits.failed(f"198.51.100.{i}")
    assert len(limits._blocked) == 3
    assert blocked_for(limits, "198.51.100.9") == 60  # the latest are kept
    # A forgotten address is blocked again by its next counted failure.
    limits.failed("198.51.100.0")
    assert blocked_for(limits, "198.51.100.0") == 60


def test_the_answer_is_429_rate_limited_with_retry_after() -> None:
    error = SourceRateLimited(42)
    denied = deny(error, "api", error.headers)
    assert denied.status == 429
    assert denied.error == "rate_limited"
    assert ("Retry-After", "42") in denied.headers
    assert json.loads(denied.body)["error"] == "rate_limited"


@pytest.mark.parametrize("value", ["twenty/minute", "lots", 5, ["1/minute", 3]])
def test_source_limits_is_validated(value: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings(key_store="memory://", source_limits=value)
    assert caught.value.field == "source_limits"


def test_source_limits_take_limits_notation() -> None:
    assert [str(i) for i in Settings(source_limits="20/minute").source_limit_items] == [
        "20 per 1 minute"
    ]
    assert Settings().source_limit_items == ()


def test_an_unreachable_storage_leaves_the_failure_uncounted_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"redis://127.0.0.1:{servers.free_port()}"
    limits = source_limits("1/minute", rate_limit_storage=url, storage_timeout=0.2)
    with caplog.at_level(logging.ERROR, logger="m2m_middleware"):
        limits.failed(ADDRESS)
        limits.failed(ADDRESS)
        asyncio.run(limits.afailed(ADDRESS))
    assert blocked_for(limits, ADDRESS) is None
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "uncounted" in errors[0].getMessage()


# -- shared through Redis ---------------------------------------------------------------


@pytest.mark.redis
def test_instances_sharing_redis_share_the_budget(redis_url: str) -> None:
    address = servers.unique("addr")  # parallel workers never share a counter
    first = source_limits("3/minute", rate_limit_storage=redis_url)
    second = source_limits("3/minute", rate_limit_storage=redis_url)
    first.failed(address)
    first.failed(address)
    assert blocked_for(second, address) is None
    second.failed(address)  # the third failure, wherever it happened
    retry = blocked_for(second, address)
    assert retry is not None and 55 <= retry <= 60
    assert blocked_for(first, address) is None  # learns at its own next failure
    first.failed(address)
    assert blocked_for(first, address) is not None


@pytest.mark.redis
def test_the_async_twin_counts_in_the_same_redis(redis_url: str) -> None:
    address = servers.unique("addr")
    sync = source_limits("2/minute", rate_limit_storage=redis_url)
    async_ = source_limits("2/minute", rate_limit_storage=redis_url)

    async def fail_once() -> None:
        await async_.afailed(address)
        await async_.afailed(address)

    asyncio.run(fail_once())
    retry = blocked_for(async_, address)
    assert retry is not None and 55 <= retry <= 60
    sync.failed(address)
    assert blocked_for(sync, address) is not None


def test_an_empty_address_is_the_unknown_budget_too() -> None:
    """gunicorn on a Unix socket gives REMOTE_ADDR "": not a budget of its own."""
    limits = source_limits("1/minute")
    limits.failed("")
    with pytest.raises(SourceRateLimited):
        limits.check(None)
