"""Text that reaches a response header: what configuration and key creation accept.

Scopes, tier names and the realm go into ``WWW-Authenticate`` and
``RateLimit-Policy``: a CR/LF there injects a header (Starlette, Flask) or
fails the response (Django), and a non-latin-1 character cannot be sent at
all. They are refused when configured and when a key is created, in every
store; every ASCII character is tried against each rule.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from core_support import make_engine

from m2m_middleware import ConfigError, KeyStore, Settings
from m2m_middleware.errors import InvalidToken
from m2m_middleware.outcome import challenge
from m2m_middleware.stores import MemoryKeyStore

ASCII = [chr(c) for c in range(0x80)]
#: RFC 6749 section 3.3 scope-token characters.
SCOPE_CHARS = {chr(c) for c in (0x21, *range(0x23, 0x5C), *range(0x5D, 0x7F))}
#: Tier names and realms: printable ASCII without the quote and the backslash.
QUOTABLE_CHARS = {chr(c) for c in range(0x20, 0x7F)} - {'"', "\\"}
HOSTILE = [
    "\r\nX-Injected: 1",
    "\n",
    "\x00",
    "\x85",
    "\u2028",
    "\u00e9",  # latin-1, but not ASCII
    "\u0430",  # Cyrillic a: not latin-1 (UnicodeEncodeError in Starlette)
    "\u2603",
    "\ud800",
]


def _id(value: str) -> str:
    return ascii(value)


# -- settings ---------------------------------------------------------------------------


@pytest.mark.parametrize("ch", ASCII, ids=_id)
def test_every_ascii_character_in_a_route_scope(ch: str) -> None:
    rule = {"path": "/orders", "scopes": [f"orders{ch}read"]}
    if ch in SCOPE_CHARS:
        (route,) = Settings(routes=[rule]).route_rules
        assert route.scopes == {f"orders{ch}read"}
        return
    with pytest.raises(ConfigError) as caught:
        Settings(routes=[rule])
    assert caught.value.field == "routes[0].scopes"
    assert "RFC 6749" in str(caught.value)


@pytest.mark.parametrize("ch", ASCII, ids=_id)
def test_every_ascii_character_in_a_tier_name_and_the_realm(ch: str) -> None:
    name = f"gold{ch}plus"
    if ch in QUOTABLE_CHARS:
        assert Settings(tiers={name: "5/minute"}, realm=name).realm == name
        return
    for fields, field in (({"tiers": {name: "5/minute"}}, "tiers"), ({"realm": name}, "realm")):
        with pytest.raises(ConfigError) as caught:
            Settings(**fields)
        assert caught.value.field == field


@pytest.mark.parametrize("bad", HOSTILE, ids=_id)
def test_hostile_text_is_refused_in_every_field_that_reaches_a_header(bad: str) -> None:
    cases: list[tuple[str, dict[str, Any]]] = [
        ("realm", {"realm": "api" + bad}),
        ("tiers", {"tiers": {"gold" + bad: "5/minute"}}),
        ("tiers", {"tiers": {"silver": "1/second", bad: "5/minute"}}),
        ("routes[0].scopes", {"routes": [{"path": "/a", "scopes": ["a" + bad]}]}),
        ("routes[1].scopes", {"routes": [{"path": "/a"}, {"path": "/b", "scopes": ["ok", bad]}]}),
    ]
    for field, fields in cases:
        with pytest.raises(ConfigError) as caught:
            Settings(**fields)
        assert caught.value.field == field, (fields, caught.value)
        with pytest.raises(ConfigError) as caught:
            Settings.from_mapping({k.upper(): v for k, v in fields.items()})
        assert caught.value.field == field
        message = str(caught.value)
        assert message.isprintable() and message.isascii(), message  # shown with its escapes


def test_an_empty_tier_name_is_refused_and_so_is_a_scope_list_in_one_string() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings(tiers={"": "5/minute"})
    assert caught.value.field == "tiers"
    with pytest.raises(ConfigError) as caught:
        Settings(routes=[{"path": "/a", "scopes": "orders:read orders:write"}])
    assert caught.value.field == "routes[0].scopes"
    # One scope in a string is still fine.
    (route,) = Settings(routes=[{"path": "/a", "scopes": "orders:read"}]).route_rules
    assert route.scopes == {"orders:read"}


def test_an_error_description_never_carries_what_a_header_cannot() -> None:
    # Whatever a detail holds (a configured claim name, a future message),
    # the challenge keeps to RFC 6750's characters.
    value = challenge(
        "api", InvalidToken('the "tier\r\nX-Injected: 1" claim \\ is caf\u00e9 \u2603')
    )
    assert value == (
        'Bearer realm="api", error="invalid_token", '
        'error_description="the ?tier??X-Injected: 1? claim ? is caf? ?"'
    )


@pytest.mark.parametrize("claim", ["tier\r\nX-Injected: 1", "ti\u00e9r"])
def test_a_hostile_claim_name_in_settings_cannot_reach_a_header(claim: str) -> None:
    import jwt as pyjwt

    secret = "0123456789abcdef" * 4
    engine = make_engine(
        MemoryKeyStore(),
        schemes=["jwt"],
        jwt_keys=secret,
        jwt_tier_claim=claim,
        jwt_client_id_claims=[claim],
    )
    token = pyjwt.encode({"exp": 2**31, claim: 42}, secret, algorithm="HS256")
    outcome = engine.check("GET", "/x", f"Bearer {token}", None)
    assert outcome.allowed is False
    for _, value in outcome.headers:
        assert re.fullmatch(r"[\x20-\x7e]*", value), value


# -- key creation, in every store ------------------------------------------------------


BAD_AT_CREATION: list[tuple[str, dict[str, Any]]] = [
    *[("scope", {"scopes": ["orders:read", "x" + bad]}) for bad in HOSTILE],
    ("scope", {"scopes": ['orders"read']}),
    ("scope", {"scopes": ["orders\\read"]}),
    ("scope", {"scopes": [""]}),
    ("scope", {"scopes": [42]}),
    *[("tier", {"tier": "gold" + bad}) for bad in HOSTILE],
    ("tier", {"tier": 'gold"'}),
    ("tier", {"tier": ""}),
    *[
        ("client id", {"client_id": "acme" + bad})
        for bad in ("\n", "\r", "\x00", "\x1b", "\x7f", "\x85", "\u2028", "\u2029", "\ud800")
    ],
    ("client_id", {"client_id": "   "}),
]


@pytest.mark.parametrize(("what", "fields"), BAD_AT_CREATION, ids=lambda v: ascii(v)[:40])
def test_create_key_refuses_what_would_break_a_header_or_a_log_line(
    store: KeyStore, what: str, fields: dict[str, Any]
) -> None:
    fields = dict(fields)
    client_id = fields.pop("client_id", "acme")
    with pytest.raises(ValueError) as caught:
        store.create_key(client_id, **fields)
    message = str(caught.value)
    assert what in message, message
    assert message.isprintable(), message  # one line, shown with its escapes
    assert not isinstance(caught.value, ConfigError)
    assert store.list_keys() == []


def test_create_key_accepts_the_widest_values(store: KeyStore) -> None:
    every_scope_char = "".join(sorted(SCOPE_CHARS))
    issued = store.create_key(
        "Acme GmbH \u00e9\u2603 svc",  # a client id may be any printable text
        scopes=[every_scope_char, "https://api.example/orders#read"],
        tier="gold plus/v2 {eu}",
    )
    record = store.get_key(issued.key_id)
    assert record.scopes == {every_scope_char, "https://api.example/orders#read"}
    assert record.tier == "gold plus/v2 {eu}"
    assert record.client_id == "Acme GmbH \u00e9\u2603 svc"
