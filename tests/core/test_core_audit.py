"""The audit log: one INFO record per checked request on ``m2m_middleware.audit``.

How adapters record a request the engine admitted once the app has answered
it is pinned across the three frameworks in
tests/conformance/test_audit_conformance.py; here, the core's part.

Allowed and denied alike, with the outcome in the record's extras; never for
a public path, never a credential, and nothing at all when the logger is off.
Every value a client, a key's creator or a token's issuer chose is escaped, so
no record can forge a line or a field. Every test runs through both front
doors (the ``check`` fixture).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from core_support import make_engine

import m2m_middleware.audit as audit_log
import m2m_middleware.engine as engine_module
from m2m_middleware import Allowed, Denied, Engine, StoreUnavailable
from m2m_middleware.keys import generate_key, hash_key
from m2m_middleware.outcome import PUBLIC
from m2m_middleware.scopes import ScopeRequirement
from m2m_middleware.stores import KeyRecord, MemoryKeyStore
from m2m_middleware.syntax import log_safe

Check = Any  # the conftest ``check`` fixture
AUDIT = "m2m_middleware.audit"
EXTRAS = (
    "m2m_allowed",
    "m2m_status",
    "m2m_error",
    "m2m_client_id",
    "m2m_key_id",
    "m2m_method",
    "m2m_path",
)


class SwitchableStore(MemoryKeyStore):
    """A memory store whose lookups can be made to fail, as a database server's can."""

    down = False

    def _fetch_by_hash(self, key_hash: str) -> tuple[KeyRecord, str] | None:
        if self.down:
            raise StoreUnavailable("connection refused")
        return super()._fetch_by_hash(key_hash)


def audit_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == AUDIT]


def only_record(caplog: pytest.LogCaptureFixture) -> logging.LogRecord:
    records = audit_records(caplog)
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].levelno == logging.INFO
    return records[0]


def extras(record: logging.LogRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in EXTRAS}


class World:
    """An engine and keys for every outcome the audit log records."""

    def __init__(self) -> None:
        self.store = SwitchableStore()
        self.engine: Engine = make_engine(
            self.store,
            default_limits="1/minute",
            public_paths=["/health"],
            routes=[{"path": "/orders", "scopes": ["orders:read"]}],
            key_cache_ttl=0,
        )
        self.good = self.store.create_key("client-a", scopes=["orders:read"])
        self.no_scope = self.store.create_key("client-b")
        self.limited = self.store.create_key("client-c", max_uses=1)
        self.busy = self.store.create_key("client-d")
        revoked = self.store.create_key("client-e")
        self.store.revoke_key(revoked.key_id)
        self.revoked = revoked.key
        past = datetime.now(timezone.utc) - timedelta(minutes=1)
        self.expired = self.store.create_key("client-f", expires_at=past).key
        self.unknown = generate_key()
        good = self.good.key
        self.malformed = good[:-1] + ("A" if good[-1] != "A" else "B")

    def secrets(self) -> list[str]:
        keys = [
            self.good.key,
            self.no_scope.key,
            self.limited.key,
            self.busy.key,
            self.revoked,
            self.expired,
            self.unknown,
            self.malformed,
        ]
        # The plaintext, its bare secret, and the hash the store keeps.
        return [piece for key in keys for piece in (key, key[4:-6], hash_key(key))]


@pytest.fixture
def world() -> World:
    return World()


@pytest.fixture
def audit_on(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger=AUDIT)
    return caplog


def test_an_allowed_request_is_one_info_record(
    world: World, check: Check, audit_on: pytest.LogCaptureFixture
) -> None:
    outcome = check(world.engine, "GET", "/orders", f"Bearer {world.good.key}", None)
    assert isinstance(outcome, Allowed)
    record = only_record(audit_on)
    assert extras(record) == {
        "m2m_allowed": True,
        "m2m_status": 200,
        "m2m_error": None,
        "m2m_client_id": "client-a",
        "m2m_key_id": world.good.key_id,
        "m2m_method": "GET",
        "m2m_path": "/orders",
    }
    message = record.getMessage()
    assert message.startswith("allowed GET /orders")
    assert "client-a" in message and world.good.key_id in message


Scenario = Callable[[World, Check], Any]


def _rate_limited(world: World, check: Check) -> Any:
    assert isinstance(check(world.engine, "GET", "/x", None, world.busy.key), Allowed)
    return world.busy


def _quota_exceeded(world: World, check: Check) -> Any:
    assert isinstance(check(world.engine, "GET", "/x", None, world.limited.key), Allowed)
    return world.limited


# Denials of a good credential: (status, error, method, path, the key sent, set-up).
KNOWN_CLIENT: dict[str, tuple[int, str, str, str, Scenario]] = {
    "insufficient_scope": (403, "insufficient_scope", "DELETE", "/orders", lambda w, c: w.no_scope),
    "rate_limited": (429, "rate_limited", "GET", "/x", _rate_limited),
    "quota_exceeded": (429, "quota_exceeded", "POST", "/x", _quota_exceeded),
}


@pytest.mark.parametrize("case", sorted(KNOWN_CLIENT))
def test_a_denied_good_credential_is_one_record_naming_the_client(
    world: World, check: Check, audit_on: pytest.LogCaptureFixture, case: str
) -> None:
    status, error, method, path, setup = KNOWN_CLIENT[case]
    issued = setup(world, check)
    audit_on.clear()
    outcome = check(world.engine, method, path, None, issued.key)
    assert isinstance(outcome, Denied) and (outcome.status, outcome.error) == (status, error)
    record = only_record(audit_on)
    assert extras(record) == {
        "m2m_allowed": False,
        "m2m_status": status,
        "m2m_error": error,
        "m2m_client_id": issued.record.client_id,
        "m2m_key_id": issued.key_id,
        "m2m_method": method,
        "m2m_path": path,
    }
    message = record.getMessage()
    assert message.startswith(f"denied {method} {path} status={status} error={error}")
    assert f"client={issued.record.client_id}" in message


def _missing(world: World) -> tuple[str | None, str | None]:
    return None, None


# Denials without a usable credential: (status, error, (authorization, api key)).
NO_CLIENT: dict[str, tuple[int, str, Callable[[World], tuple[str | None, str | None]]]] = {
    "missing": (401, "missing_credentials", _missing),
    "unknown": (401, "invalid_token", lambda w: (None, w.unknown)),
    "malformed": (401, "invalid_token", lambda w: (f"Bearer {w.malformed}", None)),
    "revoked": (401, "invalid_token", lambda w: (None, w.revoked)),
    "expired": (401, "invalid_token", lambda w: (f"Bearer {w.expired}", None)),
    "two-credentials": (400, "invalid_request", lambda w: (f"Bearer {w.good.key}", w.unknown)),
}


@pytest.mark.parametrize("case", sorted(NO_CLIENT))
def test_a_denial_without_a_good_credential_names_no_client(
    world: World, check: Check, audit_on: pytest.LogCaptureFixture, case: str
) -> None:
    status, error, credentials = NO_CLIENT[case]
    outcome = check(world.engine, "PUT", "/orders/7", *credentials(world))
    assert isinstance(outcome, Denied) and (outcome.status, outcome.error) == (status, error)
    record = only_record(audit_on)
    assert extras(record) == {
        "m2m_allowed": False,
        "m2m_status": status,
        "m2m_error": error,
        "m2m_client_id": None,
        "m2m_key_id": None,
        "m2m_method": "PUT",
        "m2m_path": "/orders/7",
    }
    assert record.getMessage().endswith(" client=-")


def test_an_unreachable_store_is_one_503_record(
    world: World, check: Check, audit_on: pytest.LogCaptureFixture
) -> None:
    world.store.down = True
    outcome = check(world.engine, "GET", "/x", None, world.good.key)
    assert isinstance(outcome, Denied) and outcome.status == 503
    record = only_record(audit_on)
    assert (record.m2m_status, record.m2m_error, record.m2m_client_id) == (  # type: ignore[attr-defined]
        503,
        "temporarily_unavailable",
        None,
    )


def test_public_paths_are_not_audited(
    world: World, check: Check, audit_on: pytest.LogCaptureFixture
) -> None:
    for credentials in ((None, None), (None, world.good.key), (None, world.malformed)):
        assert isinstance(check(world.engine, "GET", "/health", *credentials), Allowed)
    assert audit_records(audit_on) == []
    # Control: the same engine audits a protected path.
    check(world.engine, "GET", "/x", None, None)
    assert len(audit_records(audit_on)) == 1


def run_every_outcome(world: World, check: Check) -> list[Allowed | Denied]:
    engine, key = world.engine, world.good.key
    outcomes = [
        check(engine, "GET", "/orders", None, key),
        check(engine, "GET", "/orders", f"Bearer {key}", None),  # rate limited
        check(engine, "GET", "/orders", None, world.no_scope.key),
        check(engine, "GET", "/x", None, world.limited.key),
        check(engine, "GET", "/x", None, world.limited.key),  # quota exceeded
        check(engine, "GET", "/x", None, world.revoked),
        check(engine, "GET", "/x", None, world.expired),
        check(engine, "GET", "/x", None, world.unknown),
        check(engine, "GET", "/x", f"Bearer {world.malformed}", None),
        check(engine, "GET", "/x", f"Bearer {key}", world.unknown),
        check(engine, "GET", "/x", None, None),
    ]
    world.store.down = True
    outcomes.append(check(engine, "GET", "/x", None, world.busy.key))
    world.store.down = False
    return outcomes


def test_no_record_holds_a_credential_or_its_hash(
    world: World, check: Check, audit_on: pytest.LogCaptureFixture
) -> None:
    outcomes = run_every_outcome(world, check)
    records = audit_records(audit_on)
    assert len(records) == len(outcomes) == 12  # one per request
    assert sorted({o.status if isinstance(o, Denied) else 200 for o in outcomes}) == [
        200, 400, 401, 403, 429, 503
    ]  # fmt: skip
    for record in records:
        text = record.getMessage() + repr(record.args) + repr(vars(record))
        for secret in world.secrets():
            assert secret not in text


def test_nothing_is_audited_when_the_audit_logger_is_above_info(
    world: World,
    check: Check,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    built: list[object] = []
    real = engine_module._audit

    def spy(*args: Any) -> None:
        built.append(args)
        real(*args)

    monkeypatch.setattr(engine_module, "_audit", spy)
    caplog.set_level(logging.WARNING, logger=AUDIT)
    run_every_outcome(world, check)
    assert audit_records(caplog) == []
    assert built == []  # not even the fields are put together
    # Control: at INFO the same requests are audited.
    caplog.set_level(logging.INFO, logger=AUDIT)
    run_every_outcome(World(), check)
    assert len(built) == len(audit_records(caplog)) == 12


# -- forged lines -------------------------------------------------------------------


class HostileRowStore(MemoryKeyStore):
    """Hands out a record whose ids hold what a store's rows might (written around us)."""

    def _fetch_by_hash(self, key_hash: str) -> tuple[KeyRecord, str] | None:
        found = super()._fetch_by_hash(key_hash)
        if found is None:
            return None
        record, stored = found
        return (
            KeyRecord(
                key_id="key_x\nallowed GET /admin",
                client_id="acme\r\nallowed GET /admin client=root key=key_y",
                scopes=record.scopes,
            ),
            stored,
        )


@pytest.mark.parametrize(
    "method", ["GET", "GET\nallowed", "G\u2028ET", "get"], ids=["plain", "lf", "ls", "lower"]
)
def test_every_field_of_the_record_and_its_message_is_escaped(
    check: Check, audit_on: pytest.LogCaptureFixture, method: str
) -> None:
    store = HostileRowStore()
    key = store.create_key("acme").key
    engine = make_engine(store, default_limits="1/minute", key_cache_ttl=0)
    check(engine, method, "/x\u2028allowed GET /y", None, key)  # allowed
    check(engine, method, "/x\u2029y", None, key)  # rate limited: denied, client named
    check(engine, method, "/x\ny", None, key)  # refused for the path, no client
    records = audit_records(audit_on)
    assert [r.m2m_status for r in records] == [200, 429, 400]  # type: ignore[attr-defined]
    for record in records:
        for text in (record.getMessage(), *(str(v) for v in extras(record).values())):
            assert text.isprintable(), text
    allowed, limited, refused = records
    escaped_method = method.replace("\n", "\\n").replace("\u2028", "\\u2028")
    assert allowed.getMessage() == (
        f"allowed {escaped_method} /x\\u2028allowed\\x20GET\\x20/y "
        "client=acme\\r\\nallowed\\x20GET\\x20/admin\\x20client=root\\x20key=key_y "
        "key=key_x\\nallowed\\x20GET\\x20/admin"
    )
    assert limited.getMessage().startswith(f"denied {escaped_method} /x\\u2029y status=429")
    assert limited.m2m_client_id == allowed.m2m_client_id  # type: ignore[attr-defined]
    assert refused.getMessage() == (
        f"denied {escaped_method} /x\\ny status=400 error=invalid_request client=-"
    )
    assert extras(allowed)["m2m_method"] == escaped_method
    assert extras(allowed)["m2m_key_id"] == "key_x\\nallowed\\x20GET\\x20/admin"


# -- escaping --------------------------------------------------------------------------


def unescape(text: str) -> str:
    """The inverse of log_safe: Python escapes of one character each."""
    return re.sub(
        r"\\(\\|n|r|t|x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8})",
        lambda m: (
            "\\"
            if m[1] == "\\"
            else {"n": "\n", "r": "\r", "t": "\t"}.get(m[1]) or chr(int(m[1][1:], 16))
        ),
        text,
    )


SAMPLES = [
    "plain",
    "/orders/42",
    "caf\u00e9 \u2603",
    "a\nb",
    "a\\nb",  # backslash, n: must not read like a newline
    "a\\\nb",
    "\\",
    "\\\\x0a",
    "x\r\nallowed GET /admin client=billing-service key=key_x",
    "\x00\x1b[31m\x7f\x85\x9f",
    "\u2028\u2029\u0085\u200b\u202e\ufeff",
    "\ud800",
    "\U000e0001",
    " lead and trail ",
]


@pytest.mark.parametrize("value", SAMPLES, ids=ascii)
def test_log_safe_is_one_field_and_can_be_read_back(value: str) -> None:
    escaped = log_safe(value)
    assert escaped.isprintable()
    assert " " not in escaped  # one space-separated field
    assert len(escaped.splitlines()) <= 1
    assert unescape(escaped) == value


def test_log_safe_tells_every_sample_apart() -> None:
    assert len({log_safe(v) for v in SAMPLES}) == len(SAMPLES)
    assert log_safe("a\nb") == "a\\nb"
    assert log_safe("a\\nb") == "a\\\\nb"


def test_the_limiter_debug_line_escapes_the_client_id(caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryKeyStore()
    key = store.create_key("acme\u00e9 svc").key
    engine = make_engine(store, default_limits="1/minute")
    caplog.set_level(logging.DEBUG, logger="m2m_middleware")
    engine.check("GET", "/x", None, key)
    engine.check("GET", "/x", None, key)
    [line] = [r.getMessage() for r in caplog.records if "exceeded" in r.getMessage()]
    assert line.startswith("client acme\u00e9\\x20svc exceeded limit")


# -- adapters: a denial at once, an admission once the app answered -----------------------


@pytest.fixture(params=["sync", "async"])
def gate(request: pytest.FixtureRequest) -> Check:
    """``gate(engine, ...)`` through either of the adapters' front doors."""
    if request.param == "sync":
        return lambda engine, *args: engine.gate(*args)
    return lambda engine, *args: asyncio.run(engine.agate(*args))


def test_the_adapters_gate_audits_denials_at_once_and_no_admission(
    world: World, gate: Check, audit_on: pytest.LogCaptureFixture
) -> None:
    outcomes = run_every_outcome(world, gate)
    denials = [o for o in outcomes if isinstance(o, Denied)]
    assert 0 < len(denials) < len(outcomes)  # both kinds were decided
    found = audit_records(audit_on)
    assert [(r.m2m_allowed, r.m2m_status) for r in found] == [  # type: ignore[attr-defined]
        (False, d.status) for d in denials
    ]


def test_ended_writes_the_refusal_else_the_status_else_nothing(
    world: World, audit_on: pytest.LogCaptureFixture
) -> None:
    admitted = world.engine.gate("GET", "/orders", None, world.good.key)
    assert isinstance(admitted, Allowed)
    refusal = ScopeRequirement(["orders:write"]).refuse(admitted.client, "api")
    audit_log.ended(admitted, "GET", "/orders", 403, refusal)
    audit_log.ended(admitted, "GET", "/orders", 201, None)
    audit_log.ended(admitted, "GET", "/orders", None, None)  # the app raised
    audit_log.ended(admitted, "GET", "/orders", 200, "not a Denied")  # only ours count
    audit_log.ended(PUBLIC, "GET", "/health", 200, None)  # public, nobody refused
    public_refusal = ScopeRequirement(["orders:read"]).refuse(None, "api")
    audit_log.ended(PUBLIC, "GET", "/health", 401, public_refusal)
    got = [
        (r.m2m_allowed, r.m2m_status, r.m2m_error, r.m2m_client_id)  # type: ignore[attr-defined]
        for r in audit_records(audit_on)
    ]
    assert got == [
        (False, 403, "insufficient_scope", "client-a"),
        (True, 201, None, "client-a"),
        (True, 500, None, "client-a"),
        (True, 200, None, "client-a"),
        (False, 401, "missing_credentials", None),
    ]
