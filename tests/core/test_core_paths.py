"""Route rules see exactly what the router routes: hostile paths and method spellings.

A rule the router and the engine disagree on is a rule that does not apply:
Python's ``$`` matches before a final newline (Starlette routes ``/orders\\n``
to ``/orders``), frameworks route ``/orders/`` and ``/orders`` to one view,
and Django and WSGI apps route a ``post`` to the POST view. Every case runs
through both front doors (the ``check`` fixture).
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from core_support import make_engine

from m2m_middleware import Allowed, Denied, Engine, KeyStore, Settings
from m2m_middleware.stores import MemoryKeyStore

Check = Any

#: Every C0 control, DEL and every C1 control (U+0085 NEL among them).
CONTROL_CHARACTERS = [chr(c) for c in (*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0))]


def _name(ch: str) -> str:
    return f"U+{ord(ch):04X}"


def denied(outcome: Allowed | Denied, status: int, error: str) -> bool:
    return isinstance(outcome, Denied) and (outcome.status, outcome.error) == (status, error)


class World:
    def __init__(self, **fields: Any) -> None:
        self.store = MemoryKeyStore()
        fields.setdefault("public_paths", ["/health", "/docs/*"])
        fields.setdefault("routes", [{"path": "/orders", "scopes": ["orders:read"]}])
        fields.setdefault("default_limits", "100/minute")
        self.engine: Engine = make_engine(self.store, **fields)
        self.reader = self.store.create_key("reader", scopes=["orders:read"]).key
        self.nobody = self.store.create_key("nobody").key


@pytest.fixture
def world() -> World:
    return World()


# -- control characters ------------------------------------------------------------


@pytest.mark.parametrize("ch", CONTROL_CHARACTERS, ids=_name)
@pytest.mark.parametrize("where", ["end", "middle", "start-of-segment"])
def test_a_path_with_a_control_character_is_400_before_any_rule(
    world: World, check: Check, ch: str, where: str
) -> None:
    path = {"end": f"/orders{ch}", "middle": f"/ord{ch}ers", "start-of-segment": f"/{ch}orders"}[
        where
    ]
    # With a key that has every scope the rule asks for, and with none at all.
    for api_key in (world.reader, world.nobody, None):
        outcome = check(world.engine, "GET", path, None, api_key)
        assert denied(outcome, 400, "invalid_request"), (path, outcome)
        assert outcome.client is None


@pytest.mark.parametrize("ch", ["\n", "\r", "\x00", "\t", "\x7f", "\x85"], ids=_name)
def test_a_public_path_with_a_control_character_is_refused_too(
    world: World, check: Check, ch: str
) -> None:
    for path in (f"/health{ch}", f"/docs/{ch}", f"/docs/a{ch}b"):
        assert denied(check(world.engine, "GET", path, None, None), 400, "invalid_request"), path
    assert isinstance(check(world.engine, "GET", "/health", None, None), Allowed)


def test_the_refusal_is_problem_json_and_audited(
    world: World, check: Check, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="m2m_middleware.audit")
    outcome = check(world.engine, "GET", "/orders\n", None, world.reader)
    assert isinstance(outcome, Denied)
    assert outcome.content_type == "application/problem+json"
    assert b'"error":"invalid_request"' in outcome.body
    assert "control character" in outcome.detail
    # No challenge (nothing is wrong with the credential); what every problem carries.
    assert outcome.headers == [("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff")]
    [record] = [r for r in caplog.records if r.name == "m2m_middleware.audit"]
    assert (record.m2m_status, record.m2m_error) == (400, "invalid_request")  # type: ignore[attr-defined]
    assert record.getMessage() == "denied GET /orders\\n status=400 error=invalid_request client=-"


@pytest.mark.parametrize(
    "path",
    [
        "/orders/caf\u00e9",  # latin-1 letters
        "/orders/\u00a0",  # no-break space: not a control character
        "/orders/\u2028",  # line separator: escaped in logs, but not a control character
        "/orders/\u200b",  # zero-width space
        "/orders/\ufffd",  # what a server makes of invalid UTF-8
        "/orders/\U0001f600",
    ],
)
def test_other_unusual_characters_are_routed_as_usual(
    world: World, check: Check, path: str
) -> None:
    # The /orders rule does not cover these paths, so the key without scopes passes.
    outcome = check(world.engine, "GET", path, None, world.nobody)
    assert isinstance(outcome, Allowed), outcome


# -- methods -----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["post", "Post", "pOST", "POST"])
def test_a_rule_matches_the_method_however_it_is_spelled(check: Check, method: str) -> None:
    world = World(routes=[{"path": "/orders", "methods": ["POST"], "scopes": ["orders:write"]}])
    outcome = check(world.engine, method, "/orders", None, world.reader)
    assert denied(outcome, 403, "insufficient_scope"), (method, outcome)
    # Control: the rule is for POST only.
    assert isinstance(check(world.engine, "get", "/orders", None, world.reader), Allowed)


@pytest.mark.parametrize("method", ["head", "Head", "HEAD", "get", "Get"])
def test_a_get_rule_guards_head_in_any_spelling(check: Check, method: str) -> None:
    world = World(routes=[{"path": "/orders", "methods": ["get"], "scopes": ["orders:read"]}])
    outcome = check(world.engine, method, "/orders", None, world.nobody)
    assert denied(outcome, 403, "insufficient_scope"), method


def test_spellings_of_one_method_share_the_route_cache_safely(check: Check) -> None:
    # The cache is keyed on the method as sent: a lower-case spelling cached
    # first must not make the upper-case one slip past, nor the other way round.
    world = World(routes=[{"path": "/orders", "methods": ["DELETE"], "scopes": ["orders:admin"]}])
    for method in ("delete", "DELETE", "Delete", "delete"):
        outcome = check(world.engine, method, "/orders", None, world.reader)
        assert denied(outcome, 403, "insufficient_scope"), method


# -- trailing slashes ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "path"),
    [
        ("/orders", "/orders/"),
        ("/orders/", "/orders"),
        ("/orders/", "/orders/"),
        ("/orders/*", "/orders"),  # Flask strict_slashes=False routes it to the /orders/ view
        ("/orders/*", "/orders/7/"),
        ("/orders/*/items", "/orders/7/items/"),
        ("/orders/?", "/orders/7/"),
        ("/", "/"),
    ],
)
def test_a_rule_matches_with_or_without_one_trailing_slash(
    check: Check, rule: str, path: str
) -> None:
    world = World(routes=[{"path": rule, "scopes": ["orders:admin"]}], public_paths=[])
    outcome = check(world.engine, "GET", path, None, world.reader)
    assert denied(outcome, 403, "insufficient_scope"), (rule, path, outcome)


@pytest.mark.parametrize(
    ("rule", "path"),
    [
        ("/orders", "/orders//"),  # one slash, not two
        ("/orders", "/ordersx"),
        ("/orders", "/order"),
        ("/orders/", "/orders/x"),
        ("/orders", "/ORDERS"),  # every framework routes case-sensitively
        ("/orders", "/api/orders"),
    ],
)
def test_a_rule_does_not_match_more_than_that(check: Check, rule: str, path: str) -> None:
    world = World(routes=[{"path": rule, "scopes": ["orders:admin"]}], public_paths=[])
    assert isinstance(check(world.engine, "GET", path, None, world.reader), Allowed), path


def test_route_limits_and_cost_apply_to_the_slash_spelling_too(check: Check) -> None:
    world = World(
        routes=[{"path": "/export", "limits": "2/minute", "cost": 1}], default_limits="100/minute"
    )
    answers = [
        check(world.engine, "GET", path, None, world.nobody)
        for path in ("/export", "/export/", "/export", "/export/")
    ]
    assert [isinstance(a, Allowed) for a in answers] == [True, True, False, False]
    assert denied(answers[2], 429, "rate_limited")


def test_public_paths_match_exactly_as_written(check: Check) -> None:
    # A public path opens a path without credentials: it never opens more than
    # its glob says, so "/health/" is not public when only "/health" is listed.
    world = World(public_paths=["/health", "/docs/", "/static/*"])
    for path in ("/health", "/docs/", "/static/", "/static/app.js"):
        assert isinstance(check(world.engine, "GET", path, None, None), Allowed), path
    for path in ("/health/", "/docs", "/static", "/health//"):
        outcome = check(world.engine, "GET", path, None, None)
        assert denied(outcome, 401, "missing_credentials"), path


def test_route_matches_is_the_same_rule_the_engine_applies() -> None:
    (route,) = Settings(routes=[{"path": "/orders", "methods": ["POST"]}]).route_rules
    assert route.matches("post", "/orders/")
    assert route.matches("POST", "/orders")
    assert not route.matches("get", "/orders/")
    assert not route.matches("post", "/orders\n")  # never reached: refused with 400 first


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("public_paths", ["/health\n"]),
        ("public_paths", ["/ok", "/docs/\x00*"]),
        ("routes[0].path", [{"path": "/orders\r\n"}]),
        ("routes[1].path", [{"path": "/a"}, {"path": "/b\x85"}]),
    ],
)
def test_a_glob_with_a_control_character_is_refused_at_configuration(
    field: str, value: object
) -> None:
    from m2m_middleware import ConfigError

    key = "public_paths" if field == "public_paths" else "routes"
    with pytest.raises(ConfigError) as caught:
        Settings(**{key: value})
    assert caught.value.field == field
    assert "control character" in str(caught.value)


def test_a_store_is_not_asked_for_a_refused_path(check: Check) -> None:
    class CountingStore(MemoryKeyStore):
        lookups = 0

        def find_by_hash(self, key_hash: str) -> Any:
            CountingStore.lookups += 1
            return super().find_by_hash(key_hash)

    store: KeyStore = CountingStore()
    key = store.create_key("acme").key
    engine = make_engine(store, key_cache_ttl=0)
    assert denied(check(engine, "GET", "/x\x00", None, key), 400, "invalid_request")
    assert CountingStore.lookups == 0
