"""One HTTP behaviour, three frameworks: every case runs against each adapter.

The cases follow the contract's "HTTP answers" table; ``make_app`` (see
conftest.py) builds the same app in Starlette, Flask or Django.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from contextlib import closing
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from readme_anchors import REPOSITORY_URL, error_sections

from m2m_middleware import KeyStore, StoreUnavailable, open_key_store
from m2m_middleware import keys as keyformat
from m2m_middleware.stores import MemoryKeyStore, SQLiteKeyStore

ORDERS_RULE = {"path": "/orders", "scopes": ["orders:read"]}
PROBLEM_FIELDS = {"type", "title", "status", "detail", "error"}

_POLICY_ITEM = r'"(?P<name>[A-Za-z0-9._-]+)";q=(?P<q>\d+);w=(?P<w>\d+)'
_LIMIT_ITEM = r'"(?P<name>[A-Za-z0-9._-]+)";r=(?P<r>\d+);t=(?P<t>\d+)'


def config(store: KeyStore, **overrides: Any) -> dict[str, Any]:
    """Fresh settings for one test: its own key store and its own counters."""
    values: dict[str, Any] = {
        "key_store": store,
        "rate_limit_storage": "memory://",
        "default_limits": "100/minute",
        "public_paths": ["/health"],
        "routes": [ORDERS_RULE],
        "key_cache_ttl": 30,
    }
    values.update(overrides)
    return values


@pytest.fixture
def store() -> KeyStore:
    return open_key_store("memory://")


def api_key(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def structured_list(value: str, item: str) -> list[dict[str, str]]:
    """Parse a draft-11 RateLimit / RateLimit-Policy field, insisting on its exact shape."""
    plain = _strip_groups(item)
    assert re.fullmatch(rf"{plain}(?:,[ \t]*{plain})*", value), value
    return [m.groupdict() for m in re.finditer(item, value)]


def _strip_groups(pattern: str) -> str:
    return re.sub(r"\?P<\w+>", "?:", pattern)


def policies(reply: Any) -> list[dict[str, str]]:
    return structured_list(reply.headers["RateLimit-Policy"], _POLICY_ITEM)


def limits_left(reply: Any) -> list[dict[str, str]]:
    return structured_list(reply.headers["RateLimit"], _LIMIT_ITEM)


def assert_problem(
    reply: Any, status: int, error: str, *, secrets: tuple[str, ...] = ()
) -> dict[str, Any]:
    """A problem+json answer with the contract's fields, and no secret anywhere in it."""
    assert reply.status == status, (reply.status, reply.body)
    assert reply.headers["Content-Type"] == "application/problem+json"
    problem = json.loads(reply.body)
    assert problem.keys() >= PROBLEM_FIELDS, problem
    assert problem["status"] == status
    assert problem["error"] == error
    # The type is the address of the README section that explains this code.
    assert problem["type"] == f"{REPOSITORY_URL}#{error_sections()[error].anchor}"
    assert isinstance(problem["title"], str) and problem["title"]
    assert isinstance(problem["detail"], str) and problem["detail"]
    # Neither the credential nor a recognisable piece of its secret part.
    fragments = [piece for secret in secrets for piece in (secret, secret[-16:])]
    text = reply.body.decode("utf-8")
    for fragment in fragments:
        assert fragment not in text
        for _, value in reply.headers.items:
            assert fragment not in value
    return problem


def assert_retry_after(reply: Any, maximum: int) -> int:
    value = reply.headers["Retry-After"]
    assert re.fullmatch(r"[0-9]+", value), value
    seconds = int(value)
    assert 1 <= seconds <= maximum
    return seconds


Maker = Callable[[Mapping[str, Any]], Any]

# -- authentication ---------------------------------------------------------------


def test_missing_credentials_is_401_without_error_code(make_app: Maker, store: KeyStore) -> None:
    app = make_app(config(store))
    reply = app.get("/orders")
    assert_problem(reply, 401, "missing_credentials")
    challenge = reply.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert "error=" not in challenge
    assert "RateLimit" not in reply.headers


def _unknown(store: KeyStore) -> str:
    return keyformat.generate_key()


def _malformed(store: KeyStore) -> str:
    key = store.create_key("acme", scopes=["orders:read"]).key
    return key[:-1] + ("A" if key[-1] != "A" else "B")


def _revoked(store: KeyStore) -> str:
    issued = store.create_key("acme", scopes=["orders:read"])
    store.revoke_key(issued.key_id)
    return issued.key


def _expired(store: KeyStore) -> str:
    past = datetime.now(timezone.utc) - timedelta(minutes=1)
    return store.create_key("acme", scopes=["orders:read"], expires_at=past).key


def _wrong_prefix(store: KeyStore) -> str:
    key = store.create_key("acme", scopes=["orders:read"]).key
    return "xyz" + key[3:]


INVALID_CREDENTIALS = {
    "unknown-key": (_unknown, api_key),
    "unknown-key-bearer": (_unknown, bearer),
    "bad-checksum": (_malformed, api_key),
    "bad-checksum-bearer": (_malformed, bearer),
    "wrong-prefix": (_wrong_prefix, api_key),
    "revoked": (_revoked, api_key),
    "expired": (_expired, bearer),
    "garbage-bearer": (lambda store: "not-a-key", bearer),
    "jwt-shaped-bearer": (lambda store: "eyJhbGciOiJIUzI1NiJ9.e30.c2ln", bearer),
    "garbage-api-key": (lambda store: "hunter2", api_key),
    "overlong-bearer": (lambda store: "m2m_" + "a" * 5000, bearer),
}


@pytest.mark.parametrize("case", sorted(INVALID_CREDENTIALS))
def test_invalid_credential_is_401_invalid_token(
    make_app: Maker, store: KeyStore, case: str
) -> None:
    make_credential, send_as = INVALID_CREDENTIALS[case]
    credential = make_credential(store)
    app = make_app(config(store))
    reply = app.get("/orders", send_as(credential))
    assert_problem(reply, 401, "invalid_token", secrets=(credential,))
    challenge = reply.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert 'error="invalid_token"' in challenge


@pytest.mark.parametrize("send_as", [api_key, bearer], ids=["api-key", "bearer"])
def test_non_ascii_credential_is_401_not_a_crash(
    make_app: Maker, store: KeyStore, send_as: Callable[[str], dict[str, str]]
) -> None:
    # Header values arrive as latin-1 text: a stray byte must not become a 500.
    app = make_app(config(store))
    reply = app.get("/orders", send_as("m2m_caf\u00e9"))
    assert_problem(reply, 401, "invalid_token")


def test_revocation_after_use_is_seen_at_once(make_app: Maker, store: KeyStore) -> None:
    issued = store.create_key("acme", scopes=["orders:read"])
    app = make_app(config(store, key_cache_ttl=3600))
    assert app.get("/orders", api_key(issued.key)).status == 200
    store.revoke_key(issued.key_id)
    reply = app.get("/orders", api_key(issued.key))
    assert_problem(reply, 401, "invalid_token", secrets=(issued.key,))


def test_a_revocation_by_another_process_is_refused_within_a_poll_interval(
    make_app: Maker, tmp_path: Path
) -> None:
    # SQLite, no Redis, an hour of caching: the store's change log, polled at
    # most every 0.1 s, is all that can tell the app. The other process is
    # the operator's `m2m keys revoke`.
    url = "sqlite:///" + str(tmp_path / "keys.db")
    store = open_key_store(url)
    try:
        issued = store.create_key("acme", scopes=["orders:read"])
        app = make_app(config(store, key_cache_ttl=3600, invalidation_url=""))
        assert app.get("/orders", api_key(issued.key)).status == 200
        result = subprocess.run(
            [sys.executable, "-m", "m2m_middleware", "keys", "revoke", issued.key_id],
            env={**os.environ, "M2M_KEY_STORE": url, "M2M_INVALIDATION_URL": ""},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        committed = time.monotonic()
        while (reply := app.get("/orders", api_key(issued.key))).status == 200:
            assert time.monotonic() - committed < 1.0, "still admitted a second later"
            time.sleep(0.01)
        assert_problem(reply, 401, "invalid_token", secrets=(issued.key,))
    finally:
        store.close()


class CountingStore(MemoryKeyStore):
    def __init__(self) -> None:
        super().__init__()
        self.lookups = 0

    def find_by_hash(self, key_hash: str) -> Any:
        self.lookups += 1
        return super().find_by_hash(key_hash)


def test_bad_checksum_is_rejected_without_a_store_lookup(make_app: Maker) -> None:
    counting = CountingStore()
    app = make_app(config(counting))
    assert app.get("/orders", api_key(_malformed(counting))).status == 401
    assert counting.lookups == 0
    assert app.get("/orders", api_key(_unknown(counting))).status == 401
    assert counting.lookups == 1


class CountingSQLiteStore(SQLiteKeyStore):
    """A blocking store, so async adapters take the thread-hop path (acheck)."""

    lookups = 0

    def find_by_hash(self, key_hash: str) -> Any:
        self.lookups += 1
        return super().find_by_hash(key_hash)


def test_a_repeated_forged_key_reaches_the_store_once_a_second(
    make_app: Maker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counting = CountingSQLiteStore(str(tmp_path / "k.db"))
    app = make_app(config(counting))
    clock = [1000.0]
    app.engine().keys.unknown.clock = lambda: clock[0]
    forged = keyformat.generate_key()  # well formed: the checksum is public
    for _ in range(20):
        assert_problem(app.get("/orders", api_key(forged)), 401, "invalid_token", secrets=(forged,))
    assert counting.lookups == 1
    clock[0] += 1.0
    assert app.get("/orders", bearer(forged)).status == 401
    assert counting.lookups == 2

    # Created afterwards in another process (no notice reaches this one): within a second.
    with closing(sqlite3.connect(tmp_path / "k.db")) as raw, raw:
        raw.execute(
            "INSERT INTO m2m_api_keys (key_id, key_hash, client_id, scopes, created_at) "
            "VALUES ('key_elsewhere', ?, 'acme', 'orders:read', 0)",
            (keyformat.hash_key(forged),),
        )
    assert app.get("/orders", api_key(forged)).status == 401
    clock[0] += 1.0
    assert app.get("/orders", api_key(forged)).status == 200

    # Created here, through another store object for the same file: at once.
    guess = keyformat.generate_key()
    assert app.get("/orders", api_key(guess)).status == 401
    monkeypatch.setattr(keyformat, "generate_key", lambda prefix: guess)
    other = open_key_store("sqlite:///" + str(tmp_path / "k.db"))
    other.create_key("acme", scopes=["orders:read"])
    other.close()
    assert app.get("/orders", api_key(guess)).status == 200


@pytest.mark.parametrize(
    "damage",
    [
        "metadata = '{not json'",
        "metadata = '[1]'",
        "created_at = 'yesterday'",
        "revoked_at = 'last week'",
        "remaining_uses = 'plenty'",
        "scopes = x'00'",
    ],
)
def test_a_key_whose_row_cannot_be_read_is_401_never_500(
    make_app: Maker, tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = open_key_store("sqlite:///" + str(tmp_path / "k.db"))
    good = store.create_key("acme", scopes=["orders:read"])
    bad = store.create_key("acme", scopes=["orders:read"])
    with closing(sqlite3.connect(tmp_path / "k.db")) as raw, raw:
        raw.execute(f"UPDATE m2m_api_keys SET {damage} WHERE key_id = ?", (bad.key_id,))
    app = make_app(config(store, key_cache_ttl=0))
    for _ in range(3):
        reply = app.get("/orders", api_key(bad.key))
        assert_problem(reply, 401, "invalid_token", secrets=(bad.key,))
    assert app.get("/orders", api_key(good.key)).status == 200
    assert len([r for r in caplog.records if bad.key_id in r.getMessage()]) == 1


def test_two_different_credentials_is_400(make_app: Maker, store: KeyStore) -> None:
    first = store.create_key("acme", scopes=["orders:read"]).key
    second = store.create_key("acme", scopes=["orders:read"]).key
    app = make_app(config(store))
    reply = app.get("/orders", {**bearer(first), **api_key(second)})
    assert_problem(reply, 400, "invalid_request", secrets=(first, second))


@pytest.mark.parametrize("header", ["X-API-Key", "Authorization"])
def test_a_header_repeated_with_different_credentials_is_400(
    make_app: Maker, store: KeyStore, header: str
) -> None:
    first = store.create_key("acme", scopes=["orders:read"]).key
    second = store.create_key("acme", scopes=["orders:read"]).key
    scheme = "Bearer " if header == "Authorization" else ""
    app = make_app(config(store))
    reply = app.get("/orders", [(header, scheme + first), (header, scheme + second)])
    assert_problem(reply, 400, "invalid_request", secrets=(first, second))


def test_the_same_key_in_both_headers_is_fine(make_app: Maker, store: KeyStore) -> None:
    key = store.create_key("acme", scopes=["orders:read"]).key
    app = make_app(config(store))
    reply = app.get("/orders", {**bearer(key), **api_key(key)})
    assert reply.status == 200, reply.body
    assert reply.json() == {"orders": []}


@pytest.mark.parametrize("scheme", ["Bearer", "bearer"])
def test_an_api_key_works_as_a_bearer_token(make_app: Maker, store: KeyStore, scheme: str) -> None:
    key = store.create_key("acme", scopes=["orders:read"]).key
    app = make_app(config(store))
    reply = app.get("/orders", {"Authorization": f"{scheme} {key}"})
    assert reply.status == 200, reply.body


@pytest.mark.parametrize("param", ["api_key", "access_token", "key"])
def test_a_key_in_the_query_string_is_ignored(make_app: Maker, store: KeyStore, param: str) -> None:
    key = store.create_key("acme", scopes=["orders:read"]).key
    app = make_app(config(store))
    reply = app.get(f"/orders?{param}={key}")
    assert_problem(reply, 401, "missing_credentials", secrets=(key,))


def test_a_custom_api_key_header(make_app: Maker, store: KeyStore) -> None:
    key = store.create_key("acme", scopes=["orders:read"]).key
    app = make_app(config(store, api_key_header="X-Service-Token"))
    assert app.get("/orders", {"X-Service-Token": key}).status == 200
    assert_problem(app.get("/orders", api_key(key)), 401, "missing_credentials")


# -- identity -----------------------------------------------------------------------


def test_the_client_is_attached_to_the_request(make_app: Maker, store: KeyStore) -> None:
    issued = store.create_key("acme", scopes=["orders:read", "orders:write"], tier="gold")
    app = make_app(config(store, tiers={"gold": "10/minute"}))
    reply = app.get("/whoami", api_key(issued.key))
    assert reply.status == 200, reply.body
    assert reply.json() == {
        "client": {
            "is_client": True,
            "client_id": "acme",
            "scheme": "api_key",
            "scopes": ["orders:read", "orders:write"],
            "tier": "gold",
            "key_id": issued.key_id,
            "claims": {},
        },
        "same": True,
        "authenticated": True,
        "framework_scopes": ["orders:read", "orders:write"],
    }


def test_a_key_without_tier_or_scopes(make_app: Maker, store: KeyStore) -> None:
    issued = store.create_key("plain")
    app = make_app(config(store))
    client = app.get("/whoami", bearer(issued.key)).json()["client"]
    assert client["client_id"] == "plain"
    assert client["scopes"] == []
    assert client["tier"] is None
    assert client["key_id"] == issued.key_id


def test_a_public_path_needs_no_credentials_and_attaches_no_client(
    make_app: Maker, store: KeyStore
) -> None:
    app = make_app(config(store, default_limits="1/minute"))
    for _ in range(3):  # public paths are not rate limited either
        reply = app.get("/health")
        assert reply.status == 200, reply.body
        assert reply.json() == {"client": None, "authenticated": False}
        assert "RateLimit" not in reply.headers
    # The same app still guards everything else.
    assert app.get("/ping").status == 401


# -- scopes ---------------------------------------------------------------------------


def test_a_missing_scope_is_403(make_app: Maker, store: KeyStore) -> None:
    key = store.create_key("acme", scopes=["orders:write"]).key
    app = make_app(config(store))
    reply = app.get("/orders", api_key(key))
    problem = assert_problem(reply, 403, "insufficient_scope", secrets=(key,))
    assert problem.get("scope", "orders:read") == "orders:read"
    challenge = reply.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert 'error="insufficient_scope"' in challenge
    assert 'scope="orders:read"' in challenge
    # A route without a rule is open to the same key.
    assert app.get("/ping", api_key(key)).status == 200


def test_a_route_rule_needs_all_its_scopes(make_app: Maker, store: KeyStore) -> None:
    rule = {"path": "/orders", "scopes": ["orders:read", "orders:audit"]}
    partial = store.create_key("acme", scopes=["orders:read"]).key
    full = store.create_key("acme", scopes=["orders:read", "orders:audit", "x"]).key
    app = make_app(config(store, routes=[rule]))
    reply = app.get("/orders", api_key(partial))
    assert_problem(reply, 403, "insufficient_scope")
    assert 'scope="orders:audit orders:read"' in reply.headers["WWW-Authenticate"]
    assert app.get("/orders", api_key(full)).status == 200


def test_a_rule_limited_to_other_methods_does_not_apply(make_app: Maker, store: KeyStore) -> None:
    rule = {"path": "/orders", "methods": ["POST"], "scopes": ["orders:write"]}
    key = store.create_key("acme").key
    app = make_app(config(store, routes=[rule]))
    assert app.get("/orders", api_key(key)).status == 200


def test_a_get_rule_also_guards_head(make_app: Maker, store: KeyStore) -> None:
    rule = {"path": "/orders", "methods": ["GET"], "scopes": ["orders:read"]}
    key = store.create_key("acme").key
    app = make_app(config(store, routes=[rule]))
    assert app.get("/orders", api_key(key)).status == 403
    reply = app("HEAD", "/orders", api_key(key))
    assert reply.status == 403


def test_rules_match_the_path_the_app_routes_on_under_a_prefix(
    make_app: Maker, store: KeyStore
) -> None:
    key = store.create_key("acme").key
    app = make_app(config(store))
    # Sanity: the app really is served below the prefix.
    assert app("GET", "/ping", api_key(key), prefix="/api").body == b"pong"
    reply = app("GET", "/orders", api_key(key), prefix="/api")
    assert_problem(reply, 403, "insufficient_scope", secrets=(key,))
    reply = app("GET", "/health", prefix="/api")
    assert reply.status == 200
    assert reply.json()["client"] is None


# -- rate limits ------------------------------------------------------------------------


def test_successful_responses_carry_draft_11_ratelimit_headers(
    make_app: Maker, store: KeyStore
) -> None:
    key = store.create_key("acme").key
    app = make_app(config(store, default_limits="5/minute"))
    remaining = []
    for _ in range(3):
        reply = app.get("/ping", api_key(key))
        assert reply.status == 200, reply.body
        assert reply.body == b"pong"
        [policy] = policies(reply)
        assert policy == {"name": "default-60s", "q": "5", "w": "60"}
        [left] = limits_left(reply)
        assert left["name"] == policy["name"]
        assert 1 <= int(left["t"]) <= 60
        remaining.append(int(left["r"]))
    assert remaining == [4, 3, 2]


def test_ratelimit_headers_can_be_turned_off(make_app: Maker, store: KeyStore) -> None:
    key = store.create_key("acme").key
    app = make_app(config(store, default_limits="1/minute", rate_limit_headers=False))
    reply = app.get("/ping", api_key(key))
    assert reply.status == 200
    assert "RateLimit" not in reply.headers
    assert "RateLimit-Policy" not in reply.headers
    # The limit itself still holds.
    denied = app.get("/ping", api_key(key))
    assert_problem(denied, 429, "rate_limited")
    assert_retry_after(denied, 60)


def test_an_exhausted_limit_is_429(make_app: Maker, store: KeyStore) -> None:
    key = store.create_key("acme").key
    app = make_app(config(store, default_limits="2/minute"))
    assert [app.get("/ping", api_key(key)).status for _ in range(2)] == [200, 200]
    reply = app.get("/ping", api_key(key))
    assert_problem(reply, 429, "rate_limited", secrets=(key,))
    retry = assert_retry_after(reply, 60)
    [policy] = policies(reply)
    assert policy == {"name": "default-60s", "q": "2", "w": "60"}
    [left] = limits_left(reply)
    assert left["name"] == "default-60s"
    assert left["r"] == "0"
    assert 1 <= int(left["t"]) <= 60
    assert int(left["t"]) == retry
    # Still refused: denied requests do not reset anything.
    assert app.get("/ping", api_key(key)).status == 429


def test_a_usage_limited_key_stops_after_max_uses(make_app: Maker, store: KeyStore) -> None:
    issued = store.create_key("acme", max_uses=2)
    app = make_app(config(store, default_limits="10/minute"))
    assert [app.get("/ping", api_key(issued.key)).status for _ in range(2)] == [200, 200]
    for _ in range(2):
        reply = app.get("/ping", api_key(issued.key))
        assert_problem(reply, 429, "quota_exceeded", secrets=(issued.key,))
    assert store.get_key(issued.key_id).remaining_uses == 0
    # Refused uses cost the client nothing: another key of the same client sees
    # only the two admitted requests on its budget.
    other = store.create_key("acme").key
    [left] = limits_left(app.get("/ping", api_key(other)))
    assert left["r"] == "7"


def test_concurrent_requests_admit_exactly_the_budget(make_app: Maker, store: KeyStore) -> None:
    limited = store.create_key("acme", max_uses=3, tier="bulk").key
    plain = store.create_key("globex").key
    app = make_app(config(store, default_limits="4/minute", tiers={"bulk": "100/minute"}))
    replies = app.concurrently("/ping", [api_key(limited)] * 10)
    assert sorted(r.status for r in replies) == [200] * 3 + [429] * 7
    assert {r.json()["error"] for r in replies if r.status == 429} == {"quota_exceeded"}
    replies = app.concurrently("/ping", [api_key(plain)] * 10)
    assert sorted(r.status for r in replies) == [200] * 4 + [429] * 6
    assert {r.json()["error"] for r in replies if r.status == 429} == {"rate_limited"}
    remaining = sorted(int(limits_left(r)[0]["r"]) for r in replies if r.status == 200)
    assert remaining == [0, 1, 2, 3]


def test_a_tier_replaces_the_default_limits(make_app: Maker, store: KeyStore) -> None:
    gold = store.create_key("big-customer", tier="gold").key
    plain = store.create_key("small-customer").key
    app = make_app(config(store, default_limits="1/minute", tiers={"gold": "3/minute"}))
    replies = [app.get("/ping", api_key(gold)) for _ in range(4)]
    assert [r.status for r in replies] == [200, 200, 200, 429]
    [policy] = policies(replies[0])
    assert policy["q"] == "3" and policy["w"] == "60"
    assert [app.get("/ping", api_key(plain)).status for _ in range(2)] == [200, 429]


def test_keys_of_one_client_share_one_budget(make_app: Maker, store: KeyStore) -> None:
    first = store.create_key("acme").key
    second = store.create_key("acme").key
    stranger = store.create_key("globex").key
    app = make_app(config(store, default_limits="2/minute"))
    assert app.get("/ping", api_key(first)).status == 200
    reply = app.get("/ping", api_key(second))
    assert reply.status == 200
    assert limits_left(reply)[0]["r"] == "0"
    assert app.get("/ping", api_key(first)).status == 429
    assert app.get("/ping", api_key(second)).status == 429
    # Another client id has a budget of its own.
    reply = app.get("/ping", api_key(stranger))
    assert reply.status == 200
    assert limits_left(reply)[0]["r"] == "1"


def test_a_route_cost_is_charged(make_app: Maker, store: KeyStore) -> None:
    key = store.create_key("acme").key
    rules = [ORDERS_RULE, {"path": "/ping", "cost": 2}]
    app = make_app(config(store, default_limits="5/minute", routes=rules))
    assert limits_left(app.get("/ping", api_key(key)))[0]["r"] == "3"
    assert limits_left(app.get("/whoami", api_key(key)))[0]["r"] == "2"
    assert limits_left(app.get("/ping", api_key(key)))[0]["r"] == "0"
    assert_problem(app.get("/ping", api_key(key)), 429, "rate_limited")
    assert app.get("/whoami", api_key(key)).status == 429


def test_route_limits_add_to_the_default_ones(make_app: Maker, store: KeyStore) -> None:
    key = store.create_key("acme").key
    rules = [ORDERS_RULE, {"path": "/ping", "limits": "1/minute"}]
    app = make_app(config(store, default_limits="5/minute", routes=rules))
    reply = app.get("/ping", api_key(key))
    assert reply.status == 200
    default, route = policies(reply)
    assert (default["name"], default["q"], default["w"]) == ("default-60s", "5", "60")
    assert (route["q"], route["w"]) == ("1", "60")
    assert route["name"] != default["name"]
    assert [(x["name"], x["r"]) for x in limits_left(reply)] == [
        (default["name"], "4"),
        (route["name"], "0"),
    ]
    denied = app.get("/ping", api_key(key))
    assert_problem(denied, 429, "rate_limited")
    assert_retry_after(denied, 60)
    # Other routes only see the default limit, and the refused request was
    # charged to neither limit (all or nothing).
    reply = app.get("/whoami", api_key(key))
    assert reply.status == 200
    assert [(x["name"], x["r"]) for x in limits_left(reply)] == [(default["name"], "3")]


# -- key lifecycle ---------------------------------------------------------------------


def test_rotation_with_grace_keeps_both_keys_working(make_app: Maker, store: KeyStore) -> None:
    old = store.create_key("acme", scopes=["orders:read"])
    app = make_app(config(store))
    assert app.get("/orders", api_key(old.key)).status == 200
    new = store.rotate_key(old.key_id, grace_seconds=3600)
    assert new.key != old.key
    old_reply = app.get("/whoami", api_key(old.key))
    new_reply = app.get("/whoami", api_key(new.key))
    assert old_reply.status == new_reply.status == 200
    assert old_reply.json()["client"]["key_id"] == old.key_id
    assert new_reply.json()["client"]["key_id"] == new.key_id
    assert new_reply.json()["client"]["client_id"] == "acme"
    assert app.get("/orders", api_key(new.key)).status == 200


def test_rotation_without_grace_retires_the_old_key(make_app: Maker, store: KeyStore) -> None:
    old = store.create_key("acme", scopes=["orders:read"])
    app = make_app(config(store))
    assert app.get("/orders", api_key(old.key)).status == 200
    new = store.rotate_key(old.key_id, grace_seconds=0)
    assert_problem(app.get("/orders", api_key(old.key)), 401, "invalid_token", secrets=(old.key,))
    assert app.get("/orders", api_key(new.key)).status == 200


# -- outages ---------------------------------------------------------------------------


class UnreachableStore(MemoryKeyStore):
    """Keys can be made, but every lookup fails as a network store's would."""

    def find_by_hash(self, key_hash: str) -> Any:
        raise StoreUnavailable("connection refused")


def test_an_unreachable_key_store_is_503_when_denying(make_app: Maker) -> None:
    down = UnreachableStore()
    key = down.create_key("acme", scopes=["orders:read"]).key
    app = make_app(config(down, on_storage_error="deny"))
    reply = app.get("/orders", api_key(key))
    assert_problem(reply, 503, "temporarily_unavailable", secrets=(key,))
    assert_retry_after(reply, 3600)
    # Public paths do not need the store.
    assert app.get("/health").status == 200


@pytest.mark.parametrize("policy", ["deny", "allow"])
def test_an_unreachable_limit_storage_follows_the_policy(
    make_app: Maker, store: KeyStore, break_limit_storage: Any, policy: str
) -> None:
    key = store.create_key("acme").key
    app = make_app(config(store, on_storage_error=policy))
    break_limit_storage(app.engine().limiter)
    reply = app.get("/ping", api_key(key))
    if policy == "deny":
        assert_problem(reply, 503, "temporarily_unavailable", secrets=(key,))
        assert_retry_after(reply, 3600)
    else:
        assert reply.status == 200
        assert reply.body == b"pong"
        assert "RateLimit" not in reply.headers


def test_a_post_rule_does_not_guard_head(make_app: Maker, store: KeyStore) -> None:
    rule = {"path": "/orders", "methods": ["POST"], "scopes": ["orders:write"]}
    key = store.create_key("acme").key
    app = make_app(config(store, routes=[rule]))
    reply = app("HEAD", "/orders", api_key(key))
    assert reply.status == 200
    assert reply.body == b""
    assert "RateLimit" in reply.headers  # admitted and charged, not merely routed
