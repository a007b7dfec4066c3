"""The limiter on its own: in-process fixed windows (``memory://``), with time injected.

``Limiter.charge(..., now=...)`` takes the time from the caller, so windows
can be opened, run out and swept without sleeping.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest

from m2m_middleware import ConfigError, Settings
from m2m_middleware.limiting import (
    Charge,
    Limiter,
    MemoryMovingWindows,
    MemorySlidingWindows,
    MemoryWindows,
)

InMemory = MemoryWindows | MemoryMovingWindows | MemorySlidingWindows


def memory_limiter(**fields: Any) -> tuple[Limiter, InMemory]:
    limiter = Limiter(Settings(key_store="memory://", rate_limit_storage="memory://", **fields))
    assert limiter.windows is not None  # memory:// is counted in-process, every strategy
    return limiter, limiter.windows


def remaining(charge: Charge) -> str:
    """The ``RateLimit`` header of an admitted charge."""
    assert charge.allowed
    values = [value for name, value in charge.headers if name == "RateLimit"]
    assert len(values) == 1, charge.headers
    return values[0]


def test_a_window_runs_out_after_its_period_and_a_fresh_one_opens() -> None:
    limiter, _ = memory_limiter(default_limits="2/minute")
    plan = limiter.plan(None, ())
    t0 = float(int(time.time()))  # whole seconds: exact sums below
    assert remaining(limiter.charge(plan, "client-a", 1, now=t0)) == '"default-60s";r=1;t=60'
    assert remaining(limiter.charge(plan, "client-a", 1, now=t0 + 10)) == '"default-60s";r=0;t=50'
    assert not limiter.charge(plan, "client-a", 1, now=t0 + 59.9).allowed
    # Another client has a window of its own.
    assert limiter.charge(plan, "client-b", 1, now=t0 + 59.9).allowed
    # At the window's end the budget is whole again, in a window that starts now.
    assert remaining(limiter.charge(plan, "client-a", 1, now=t0 + 60)) == '"default-60s";r=1;t=60'
    assert remaining(limiter.charge(plan, "client-a", 1, now=t0 + 61)) == '"default-60s";r=0;t=59'
    assert not limiter.charge(plan, "client-a", 1, now=t0 + 62).allowed


def test_each_limit_of_a_plan_expires_on_its_own() -> None:
    limiter, _ = memory_limiter(default_limits="1/second;3/minute")
    plan = limiter.plan(None, ())
    t0 = float(int(time.time()))
    admitted = [limiter.charge(plan, "client-a", 1, now=t0 + i * 0.5).allowed for i in range(8)]
    # One a second, until the minute's three are spent.
    assert admitted == [True, False, True, False, True, False, False, False]
    assert limiter.charge(plan, "client-a", 1, now=t0 + 60).allowed  # the minute ran out


@pytest.mark.parametrize("strategy", ["fixed-window", "moving-window", "sliding-window-counter"])
def test_the_sweep_drops_expired_windows_and_keeps_live_ones(strategy: str) -> None:
    limiter, windows = memory_limiter(
        default_limits="1/second", tiers={"slow": "1/hour"}, rate_limit_strategy=strategy
    )
    short, long = limiter.plan(None, ()), limiter.plan("slow", ())
    t0 = float(int(time.time()))
    for i in range(5):
        assert limiter.charge(short, f"short-{i}", 1, now=t0).allowed
    assert limiter.charge(long, "long", 1, now=t0).allowed
    assert len(windows._windows) == 6

    assert limiter.charge(short, "late", 1, now=t0 + windows.sweep_interval).allowed
    assert sorted(key.rsplit("/", 1)[1] for key in windows._windows) == ["late", "long"]
    # The window the sweep kept still counts: its hour is not over.
    assert not limiter.charge(long, "long", 1, now=t0 + windows.sweep_interval + 1).allowed


@pytest.mark.parametrize(
    "uri", ["rediz://user:s3cret-pw@cache:6379/0", "redis+nope://:s3cret-pw@cache:6379"]
)
def test_a_bad_storage_uri_is_named_without_its_password(uri: str) -> None:
    from m2m_middleware import Engine

    with pytest.raises(ConfigError, match="rate_limit_storage") as raised:
        Engine(Settings(key_store="memory://", rate_limit_storage=uri))
    assert "s3cret-pw" not in str(raised.value)
    assert "***@cache" in str(raised.value)


@pytest.mark.parametrize("strategy", ["fixed-window", "moving-window", "sliding-window-counter"])
def test_a_limit_written_twice_is_one_limit(strategy: str) -> None:
    # Both spellings name one counter: charging it twice per request halved the budget.
    limiter, _ = memory_limiter(
        default_limits="5/second;5 per 1 second", rate_limit_strategy=strategy
    )
    plan = limiter.plan(None, ())
    assert plan.policy_header == '"default-1s";q=5;w=1'
    t0 = float(int(time.time()))
    assert [limiter.charge(plan, "client-a", 1, now=t0).allowed for _ in range(6)] == [True] * 5 + [
        False
    ]


# -- tiers that are not configured -----------------------------------------------------


def _tier_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "m2m_middleware" and r.levelno == logging.WARNING
    ]


def test_an_unknown_tier_is_warned_about_once_per_name_with_or_without_routes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = Settings(
        key_store="memory://",
        default_limits="5/second",
        tiers={"gold": "10/second"},
        routes=[{"path": "/a", "limits": "1/second"}, {"path": "/b"}],
    )
    limiter = Limiter(settings)
    caplog.set_level(logging.WARNING, logger="m2m_middleware")
    a, b = settings.route_rules
    for _ in range(3):
        for routes in ((), (a,), (b,), (a, b)):
            assert limiter.plan("platinum", routes).limits[0].amount == 5  # the default
            assert limiter.plan("gold", routes).limits[0].amount == 10
            limiter.plan(None, routes)
    assert _tier_warnings(caplog) == [
        "tier platinum is not in tiers (configured: gold): its clients get default_limits"
    ]
    limiter.plan("Gold", ())  # tier names are exact: another name, another warning
    assert len(_tier_warnings(caplog)) == 2


def test_unknown_tier_warnings_are_escaped_and_bounded(caplog: pytest.LogCaptureFixture) -> None:
    from m2m_middleware.limiting import UNKNOWN_TIERS_LOGGED

    limiter = Limiter(Settings(key_store="memory://", default_limits="5/second"))
    caplog.set_level(logging.WARNING, logger="m2m_middleware")
    limiter.plan("gold\nallowed GET /admin client=root", ())
    limiter.plan("x" * 5000, ())
    [forged, long] = _tier_warnings(caplog)
    assert "\n" not in forged
    assert "gold\\nallowed\\x20GET" in forged
    assert "(configured: none)" in forged
    assert len(long) < 400
    for n in range(UNKNOWN_TIERS_LOGGED * 10):  # a token issuer could mint any number
        limiter.plan(f"t{n}", ())
    warnings = _tier_warnings(caplog)
    assert len(warnings) == UNKNOWN_TIERS_LOGGED + 1
    assert warnings[-1].startswith(f"more than {UNKNOWN_TIERS_LOGGED} tier names")


def test_a_token_tier_claim_that_is_not_configured_is_warned_about_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from jwt_support import bearer, claims, hs256, jwt_engine

    engine = jwt_engine(jwt_tier_claim="tier", default_limits="2/day", tiers={"gold": "9/day"})
    caplog.set_level(logging.WARNING, logger="m2m_middleware")
    for sub in ("a", "b"):
        token = bearer(hs256(claims(sub=sub, tier="platnum")))
        assert [engine.check("GET", "/x", token, None).allowed for _ in range(3)] == [
            True,
            True,
            False,
        ]
    [warning] = _tier_warnings(caplog)
    assert warning.startswith("tier platnum is not in tiers (configured: gold)")
