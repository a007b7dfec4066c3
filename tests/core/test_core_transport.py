"""The transport core: addresses and proxy headers parsed, settings validated, the
engine's two front doors with and without a request view."""

from __future__ import annotations

import asyncio

import pytest

from m2m_middleware import ConfigError, Denied, Engine, Settings, open_key_store
from m2m_middleware.request_view import AsgiView, RequestView, WsgiView
from m2m_middleware.transport import Transport, parse_address, parse_networks


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("203.0.113.7", "203.0.113.7"),
        (" 203.0.113.7 ", "203.0.113.7"),
        ("203.0.113.7:4711", "203.0.113.7"),
        ('"203.0.113.7:4711"', "203.0.113.7"),
        ("2001:db8::1", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("[2001:db8::1]:4711", "2001:db8::1"),
        ('"[2001:DB8::1]:4711"', "2001:db8::1"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("unknown", None),
        ("_hidden", None),
        ("fe80::1%eth0", None),
        ("[2001:db8::1", None),
        ("", None),
        (None, None),
        ("999.1.1.1", None),
        ("1.2.3.4:5:6", None),
    ],
)
def test_addresses_as_proxies_write_them(text: str | None, expected: str | None) -> None:
    found = parse_address(text)
    assert (str(found) if found is not None else None) == expected


def view(peer: str | None, headers: dict[str, str], scheme: str = "http") -> RequestView:
    return RequestView("GET", "/", headers=headers, scheme=scheme, client_address=peer)


TRUSTED = Transport(parse_networks(["10.0.0.0/8", "2001:db8:ffff::/48"]))


@pytest.mark.parametrize(
    ("peer", "headers", "expected"),
    [
        ("10.0.0.1", {"x-forwarded-for": "203.0.113.9"}, ("203.0.113.9", False)),
        ("10.0.0.1", {"x-forwarded-for": "203.0.113.9, 10.0.0.2"}, ("203.0.113.9", False)),
        ("10.0.0.1", {"x-forwarded-for": "1.1.1.1, 203.0.113.9"}, ("203.0.113.9", False)),
        ("10.0.0.1", {"x-forwarded-for": "10.0.0.3, 10.0.0.2"}, ("10.0.0.3", False)),
        ("10.0.0.1", {"x-forwarded-proto": "https"}, ("10.0.0.1", True)),
        ("10.0.0.1", {"x-forwarded-proto": "HTTPS"}, ("10.0.0.1", True)),
        # One proto per hop: the client's; else the nearest proxy's (rightmost).
        (
            "10.0.0.1",
            {"x-forwarded-for": "203.0.113.9, 10.0.0.2", "x-forwarded-proto": "https, http"},
            ("203.0.113.9", True),
        ),
        ("10.0.0.1", {"x-forwarded-proto": "http, https"}, ("10.0.0.1", True)),
        ("10.0.0.1", {"forwarded": "for=203.0.113.9;proto=https"}, ("203.0.113.9", True)),
        ("10.0.0.1", {"forwarded": 'For="[2001:db8::5]:1";Proto=HTTPS'}, ("2001:db8::5", True)),
        (
            "10.0.0.1",
            {"forwarded": 'for=203.0.113.9;proto=https, for="[2001:db8:ffff::1]"'},
            ("203.0.113.9", True),
        ),
        ("10.0.0.1", {"forwarded": 'for=203.0.113.9;by="a,b", for=1.1.1.1'}, ("1.1.1.1", False)),
        ("10.0.0.1", {"forwarded": "for=_x;proto=https"}, (None, True)),
        ("10.0.0.1", {"forwarded": "proto=https"}, (None, True)),
        ("10.0.0.1", {}, ("10.0.0.1", False)),
        (
            "10.0.0.1",
            {"forwarded": "for=1.1.1.1", "x-forwarded-for": "1.1.1.1"},
            (None, False),  # not the proxy's own request: an unknown client
        ),
        # An untrusted peer: its headers say nothing.
        (
            "1.1.1.1",
            {"x-forwarded-for": "203.0.113.9", "x-forwarded-proto": "https"},
            ("1.1.1.1", False),
        ),
        (None, {"x-forwarded-for": "203.0.113.9"}, (None, False)),
        ("unix:/tmp/sock", {"x-forwarded-for": "203.0.113.9"}, ("unix:/tmp/sock", False)),
    ],
)
def test_the_chain_as_the_transport_reads_it(
    peer: str | None, headers: dict[str, str], expected: tuple[str | None, bool]
) -> None:
    assert TRUSTED.resolve(view(peer, headers)) == expected


def test_the_servers_own_scheme_counts_without_proxy_headers() -> None:
    assert TRUSTED.resolve(view("1.1.1.1", {}, "https")) == ("1.1.1.1", True)
    assert TRUSTED.resolve(view("1.1.1.1", {}, "wss")) == ("1.1.1.1", True)
    assert Transport(()).resolve(view("10.0.0.1", {"x-forwarded-proto": "https"})) == (
        "10.0.0.1",
        False,
    )


def test_one_header_kind_only_when_told() -> None:
    both = {"forwarded": "for=203.0.113.9", "x-forwarded-for": "198.51.100.1"}
    only_x = Transport(parse_networks(["10.0.0.0/8"]), "x-forwarded")
    only_rfc = Transport(parse_networks(["10.0.0.0/8"]), "forwarded")
    assert only_x.resolve(view("10.0.0.1", both))[0] == "198.51.100.1"
    assert only_rfc.resolve(view("10.0.0.1", both))[0] == "203.0.113.9"


def test_headers_are_not_decoded_for_an_untrusted_peer() -> None:
    def headers() -> dict[str, str]:
        raise AssertionError("decoded")

    request = RequestView("GET", "/", headers=headers, client_address="1.1.1.1")
    assert TRUSTED.resolve(request) == ("1.1.1.1", False)


# -- settings --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"trusted_proxies": ["10.0.0.1/8"]}, "trusted_proxies"),
        ({"trusted_proxies": ["nonsense"]}, "trusted_proxies"),
        ({"trusted_proxies": 5}, "trusted_proxies"),
        ({"proxy_headers": "both"}, "proxy_headers"),
        ({"require_https": "yes"}, "require_https"),
        ({"hsts_seconds": -1}, "hsts_seconds"),
        ({"hsts_seconds": 1.5}, "hsts_seconds"),
        ({"hsts_seconds": True}, "hsts_seconds"),
    ],
)
def test_bad_transport_settings_name_their_field(fields: dict[str, object], name: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings(key_store="memory://", **fields)  # type: ignore[arg-type]
    assert raised.value.field == name


def test_trusted_proxies_are_held_canonically() -> None:
    settings = Settings.from_mapping(
        {"key_store": "memory://", "trusted_proxies": "10.0.0.0/8, 2001:DB8::/32 127.0.0.1"}
    )
    assert settings.trusted_proxies == ("10.0.0.0/8", "2001:db8::/32", "127.0.0.1/32")


def test_no_view_is_needed_with_none_of_the_settings() -> None:
    assert not Engine(Settings(key_store="memory://")).needs_view
    for fields in (
        {"trusted_proxies": ["10.0.0.0/8"]},
        {"require_https": True},
        {"hsts_seconds": 60},
    ):
        assert Engine(Settings(key_store="memory://", **fields)).needs_view  # type: ignore[arg-type]


# -- the engine's front doors ----------------------------------------------------------------


@pytest.mark.parametrize("front", ["check", "gate", "acheck", "agate"])
def test_every_front_door_reads_the_view(front: str) -> None:
    store = open_key_store("memory://")
    key = store.create_key("svc", allowed_cidrs=["203.0.113.0/24"]).key
    engine = Engine(
        Settings(
            key_store=store,
            trusted_proxies=["10.0.0.0/8"],
            require_https=True,
            hsts_seconds=60,
        )
    )

    def call(*args: object, **kwargs: object) -> object:
        result = getattr(engine, front)(*args, **kwargs)
        return asyncio.run(result) if front.startswith("a") else result

    proxied = {"x-forwarded-for": "203.0.113.9", "x-forwarded-proto": "https"}
    allowed = call("GET", "/", None, key, view=view("10.0.0.1", proxied))
    assert allowed.allowed  # type: ignore[attr-defined]
    assert ("Strict-Transport-Security", "max-age=60") in allowed.headers  # type: ignore[attr-defined]
    plain = call("GET", "/", None, key, view=view("10.0.0.1", {"x-forwarded-for": "203.0.113.9"}))
    assert plain.error == "https_required"  # type: ignore[attr-defined]
    elsewhere = call(
        "GET", "/", None, key, view=view("10.0.0.1", {**proxied, "x-forwarded-for": "1.1.1.1"})
    )
    assert elsewhere.error == "address_not_allowed"  # type: ignore[attr-defined]
    assert elsewhere.client.client_id == "svc"  # type: ignore[attr-defined]  # for the audit


@pytest.mark.parametrize("front", ["check", "acheck"])
def test_the_peer_alone_serves_a_keys_networks(front: str) -> None:
    store = open_key_store("memory://")
    key = store.create_key("svc", allowed_cidrs=["203.0.113.0/24"]).key
    engine = Engine(Settings(key_store=store))

    def call(peer: str | None) -> object:
        result = getattr(engine, front)("GET", "/", None, key, peer)
        return asyncio.run(result) if front == "acheck" else result

    assert call("203.0.113.1").allowed  # type: ignore[attr-defined]
    assert call("198.51.100.1").error == "address_not_allowed"  # type: ignore[attr-defined]
    assert call(None).error == "address_not_allowed"  # type: ignore[attr-defined]


# -- the token endpoint ----------------------------------------------------------------------


def token_engine(**fields: object) -> tuple[Engine, str, str]:
    store = open_key_store("memory://")
    issued = store.create_key("svc", allowed_cidrs=["203.0.113.0/24"])
    engine = Engine(
        Settings(
            key_store=store,
            token_endpoint="/oauth/token",
            token_issuer="https://issuer.example",
            signing_key_secret="a test secret of enough length",
            **fields,  # type: ignore[arg-type]
        )
    )
    return engine, issued.key_id, issued.key


def token_request(key_id: str, key: str, peer: str, headers: dict[str, str]) -> RequestView:
    body = f"grant_type=client_credentials&client_id={key_id}&client_secret={key}".encode()
    return RequestView(
        "POST",
        "/oauth/token",
        headers={"content-type": "application/x-www-form-urlencoded", **headers},
        client_address=peer,
        body=body,
    )


@pytest.mark.parametrize("asynchronous", [False, True])
def test_the_token_endpoint_issues_no_token_outside_the_keys_networks(asynchronous: bool) -> None:
    engine, key_id, key = token_engine(trusted_proxies=["10.0.0.0/8"])

    def serve(request: RequestView) -> object:
        return asyncio.run(engine.aserve(request)) if asynchronous else engine.serve(request)

    inside = serve(token_request(key_id, key, "10.0.0.1", {"x-forwarded-for": "203.0.113.9"}))
    assert inside.status == 200  # type: ignore[attr-defined]
    outside = serve(token_request(key_id, key, "10.0.0.1", {"x-forwarded-for": "1.1.1.1"}))
    assert outside.status == 401  # type: ignore[attr-defined]
    assert b"invalid_client" in outside.body  # type: ignore[attr-defined]
    forged = serve(token_request(key_id, key, "1.1.1.1", {"x-forwarded-for": "203.0.113.9"}))
    assert forged.status == 401  # type: ignore[attr-defined]


def test_the_token_endpoint_checks_the_peer_without_transport_settings() -> None:
    engine, key_id, key = token_engine()
    assert engine.serve(token_request(key_id, key, "203.0.113.9", {})).status == 200
    assert engine.serve(token_request(key_id, key, "1.1.1.1", {})).status == 401


def test_the_token_endpoint_over_plain_http_is_refused_with_require_https() -> None:
    engine, key_id, key = token_engine(require_https=True, hsts_seconds=60)
    plain = engine.serve(token_request(key_id, key, "203.0.113.9", {}))
    assert (plain.status, plain.error) == (403, "https_required")
    assert isinstance(plain, Denied) and plain.credential_in_clear
    tls = token_request(key_id, key, "203.0.113.9", {})
    tls.scheme = "https"
    served = engine.serve(tls)
    assert served.status == 200
    assert ("Strict-Transport-Security", "max-age=60") in served.headers
    # The JWKS is public: served over plain HTTP too.
    jwks = RequestView("GET", "/.well-known/jwks.json", headers={}, client_address="1.1.1.1")
    assert engine.serve(jwks).status == 200


# -- the adapters' views read what a mapping of the same headers holds ------------------------

RAW_PAIRS = [
    (b"host", b"api.example"),
    (b"x-forwarded-for", b"198.51.100.1"),
    (b"x-forwarded-for", b"203.0.113.9"),  # repeated: one chain, joined in order
    (b"x-forwarded-proto", b"https"),
    (b"forwarded", b"for=192.0.2.1"),
]
JOINED = {
    "host": "api.example",
    "x-forwarded-for": "198.51.100.1, 203.0.113.9",
    "x-forwarded-proto": "https",
    "forwarded": "for=192.0.2.1",
}


def test_an_asgi_view_reads_its_raw_pairs_as_a_mapping_would() -> None:
    view = AsgiView("GET", "/", RAW_PAIRS, "http", "10.0.0.1", b"a=1")
    assert view.query == "a=1"
    assert view.header("x-forwarded-for") == JOINED["x-forwarded-for"]
    assert view.header("authorization") is None
    assert view.proxy_headers() == ("for=192.0.2.1", JOINED["x-forwarded-for"], "https")
    assert dict(view.headers) == JOINED
    assert "203.0.113.9" not in repr(view)


def test_a_wsgi_view_reads_its_environ_as_a_mapping_would() -> None:
    environ = {
        "REMOTE_ADDR": "10.0.0.1",
        "QUERY_STRING": "a=1",
        "HTTP_HOST": "api.example",
        "HTTP_X_FORWARDED_FOR": JOINED["x-forwarded-for"],
        "HTTP_X_FORWARDED_PROTO": "https",
        "HTTP_FORWARDED": "",  # an empty field is no field
    }
    view = WsgiView("GET", "/", environ, "http")
    assert view.client_address == "10.0.0.1"
    assert view.query == "a=1"
    assert view.header("host") == "api.example"
    assert view.proxy_headers() == (None, JOINED["x-forwarded-for"], "https")
    assert view.headers["x-forwarded-proto"] == "https"


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_the_adapters_views_resolve_as_a_mapping_view_does(kind: str) -> None:
    pairs = [pair for pair in RAW_PAIRS if pair[0] != b"forwarded"]
    joined = {name: value for name, value in JOINED.items() if name != "forwarded"}
    expected = TRUSTED.resolve(view("10.0.0.1", joined))
    made: RequestView
    if kind == "asgi":
        made = AsgiView("GET", "/", pairs, "http", "10.0.0.1")
    else:
        environ = {"HTTP_" + n.upper().replace("-", "_"): v for n, v in joined.items()}
        made = WsgiView("GET", "/", {**environ, "REMOTE_ADDR": "10.0.0.1"}, "http")
    assert TRUSTED.resolve(made) == expected == ("203.0.113.9", True)
