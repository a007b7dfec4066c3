"""The Flask extension: wiring, configuration, ``current_client`` and ``require_scopes``."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import flask
import pytest
from adapter_support import config
from missing_modules import WAYS, hide
from werkzeug.middleware.proxy_fix import ProxyFix

from m2m_middleware import Client, ConfigError, Engine, KeyStore, Settings, open_key_store
from m2m_middleware.flask import M2MAuth, _attach_client, _Gate, current_client, require_scopes
from m2m_middleware.stores import MemoryKeyStore


@pytest.fixture
def store() -> KeyStore:
    return open_key_store("memory://")


def add_views(app: flask.Flask, calls: list[str] | None = None) -> flask.Flask:
    """Register the test views; ``calls`` records which views ran."""
    ran = calls if calls is not None else []

    @app.get("/whoami")
    def whoami() -> Any:
        ran.append("whoami")
        return {
            "client_id": current_client.client_id,
            "key_id": current_client.key_id,
            "has_read": current_client.has_scopes("orders:read"),
            "same": current_client._get_current_object() is flask.g.m2m_client,  # type: ignore[attr-defined]
            "is_client": isinstance(flask.g.m2m_client, Client),
        }

    @app.get("/orders")
    @require_scopes("orders:read")
    def orders() -> Any:
        ran.append("orders")
        return {"orders": [], "client_id": current_client.client_id}

    @app.get("/orders/audit")
    @require_scopes("orders:read", "orders:audit")
    async def audit() -> Any:
        ran.append("audit")
        return {"audit": [], "client_id": current_client.client_id}

    @app.get("/health")
    def health() -> Any:
        ran.append("health")
        return {"client": flask.g.m2m_client is not None, "proxy_truthy": bool(current_client)}

    @app.get("/public/guarded")
    @require_scopes("orders:read")
    def public_guarded() -> Any:
        ran.append("public_guarded")
        return {"ok": True}

    return app


def make_app(name: str = "m2m_flask_tests") -> flask.Flask:
    return flask.Flask(name)


def get(app: flask.Flask, path: str, key: str | None = None) -> Any:
    headers = {"X-API-Key": key} if key else {}
    return app.test_client().get(path, headers=headers)


# -- wiring -------------------------------------------------------------------------


def test_init_app_factory_pattern(store: KeyStore) -> None:
    auth = M2MAuth(settings=Settings(**config(store, default_limits="1/minute")))
    key = store.create_key("acme").key

    def create_app() -> flask.Flask:
        app = make_app()
        auth.init_app(app)
        return add_views(app)

    first, second = create_app(), create_app()
    assert get(first, "/whoami").status_code == 401
    assert get(first, "/whoami", key).status_code == 200
    assert get(first, "/whoami", key).status_code == 429
    # The same extension object serves each app with counters of its own.
    assert get(second, "/whoami", key).status_code == 200
    assert isinstance(M2MAuth.engine(first), Engine)
    assert M2MAuth.engine(first) is not M2MAuth.engine(second)
    assert "m2m_middleware" in first.extensions


def test_app_and_settings_in_the_constructor(store: KeyStore) -> None:
    key = store.create_key("acme").key
    app = add_views(make_app())
    M2MAuth(app, settings=Settings(**config(store)))
    response = get(app, "/whoami", key)
    assert response.status_code == 200
    assert response.headers["RateLimit-Policy"] == '"default-60s";q=100;w=60'


def test_setting_fields_as_keyword_arguments(store: KeyStore) -> None:
    key = store.create_key("acme").key
    app = add_views(make_app())
    M2MAuth(app, key_store=store, default_limits="1/minute", api_key_header="X-Key")
    client = app.test_client()
    assert client.get("/whoami", headers={"X-Key": key}).status_code == 200
    assert client.get("/whoami", headers={"X-Key": key}).status_code == 429
    assert client.get("/whoami", headers={"X-API-Key": key}).status_code == 401


def test_settings_and_fields_together_are_refused(store: KeyStore) -> None:
    with pytest.raises(TypeError):
        M2MAuth(settings=Settings(**config(store)), default_limits="1/second")


@pytest.mark.parametrize("upper", [False, True], ids=["lower-case", "upper-case"])
def test_settings_come_from_app_config(store: KeyStore, upper: bool) -> None:
    key = store.create_key("acme").key
    mapping = config(store, default_limits="2/minute", api_key_header="X-Client-Key")
    app = add_views(make_app())
    app.config["M2M_AUTH"] = {k.upper(): v for k, v in mapping.items()} if upper else mapping
    M2MAuth().init_app(app)
    client = app.test_client()
    assert M2MAuth.engine(app).settings.api_key_header == "X-Client-Key"
    assert client.get("/whoami", headers={"X-Client-Key": key}).status_code == 200
    response = client.get("/whoami", headers={"X-Client-Key": key})
    assert response.status_code == 200
    assert response.headers["RateLimit"].startswith('"default-60s";r=0;')
    assert client.get("/whoami", headers={"X-Client-Key": key}).status_code == 429


@pytest.mark.parametrize(
    ("mapping", "field"),
    [
        ({"default_limits": "abc"}, "default_limits"),
        ({"bogus_setting": 1}, "bogus_setting"),
        ({"routes": [{"path": "orders"}]}, "routes[0].path"),
        ({"tiers": {"gold": "lots"}}, "tiers.gold"),
        ({"on_storage_error": "maybe"}, "on_storage_error"),
        ({"api_key_header": "Authorization"}, "api_key_header"),
        ("default_limits=1/second", "M2M_AUTH"),
    ],
)
def test_invalid_config_fails_at_init_app_naming_the_field(
    store: KeyStore, mapping: Any, field: str
) -> None:
    app = add_views(make_app())
    app.config["M2M_AUTH"] = (
        {"key_store": store, **mapping} if isinstance(mapping, dict) else mapping
    )
    auth = M2MAuth()
    with pytest.raises(ConfigError) as caught:
        auth.init_app(app)
    assert caught.value.field == field
    assert field in str(caught.value)
    # Nothing half-registered: the app is left as it was.
    assert "m2m_middleware" not in app.extensions
    assert not app.before_request_funcs


# -- identity -------------------------------------------------------------------------


def test_current_client_is_the_authenticated_client(store: KeyStore) -> None:
    issued = store.create_key("acme", scopes=["orders:read"])
    app = add_views(make_app())
    M2MAuth(app, settings=Settings(**config(store)))
    response = get(app, "/whoami", issued.key)
    assert response.status_code == 200
    assert response.get_json() == {
        "client_id": "acme",
        "key_id": issued.key_id,
        "has_read": True,
        "same": True,
        "is_client": True,
    }


def test_no_client_on_a_public_path(store: KeyStore) -> None:
    app = add_views(make_app())
    M2MAuth(app, settings=Settings(**config(store)))
    response = get(app, "/health")
    assert response.status_code == 200
    assert response.get_json() == {"client": False, "proxy_truthy": False}
    assert "RateLimit" not in response.headers


def test_a_refused_request_never_reaches_the_view(store: KeyStore) -> None:
    calls: list[str] = []
    app = add_views(make_app(), calls)
    M2MAuth(app, settings=Settings(**config(store)))
    response = app.test_client().post("/whoami")
    assert response.status_code == 401
    assert response.mimetype == "application/problem+json"
    assert calls == []


# -- require_scopes -------------------------------------------------------------------


def test_require_scopes_answers_403_without_the_scope(store: KeyStore) -> None:
    calls: list[str] = []
    key = store.create_key("acme", scopes=["orders:write"]).key
    app = add_views(make_app(), calls)
    M2MAuth(app, settings=Settings(**config(store)))
    response = get(app, "/orders", key)
    assert response.status_code == 403
    assert response.mimetype == "application/problem+json"
    problem = response.get_json()
    assert problem["error"] == "insufficient_scope"
    assert problem["status"] == 403
    challenge = response.headers["WWW-Authenticate"]
    assert 'error="insufficient_scope"' in challenge
    assert 'scope="orders:read"' in challenge
    assert key not in response.get_data(as_text=True)
    assert calls == []
    # The request itself was admitted, so it carries its rate-limit state.
    assert "RateLimit" in response.headers


def test_require_scopes_lets_the_scope_through(store: KeyStore) -> None:
    key = store.create_key("acme", scopes=["orders:read"]).key
    app = add_views(make_app())
    M2MAuth(app, settings=Settings(**config(store)))
    response = get(app, "/orders", key)
    assert response.status_code == 200
    assert response.get_json() == {"orders": [], "client_id": "acme"}


def test_require_scopes_needs_every_scope_on_an_async_view(store: KeyStore) -> None:
    partial = store.create_key("acme", scopes=["orders:read"]).key
    full = store.create_key("acme", scopes=["orders:read", "orders:audit"]).key
    app = add_views(make_app())
    M2MAuth(app, settings=Settings(**config(store)))
    response = get(app, "/orders/audit", partial)
    assert response.status_code == 403
    assert 'scope="orders:audit orders:read"' in response.headers["WWW-Authenticate"]
    response = get(app, "/orders/audit", full)
    assert response.status_code == 200
    assert response.get_json() == {"audit": [], "client_id": "acme"}


def test_require_scopes_on_a_public_path_is_401(store: KeyStore) -> None:
    calls: list[str] = []
    app = add_views(make_app(), calls)
    M2MAuth(app, settings=Settings(**config(store)))
    response = get(app, "/public/guarded")
    assert response.status_code == 401
    assert response.mimetype == "application/problem+json"
    assert response.get_json()["error"] == "missing_credentials"
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert "error=" not in challenge
    assert calls == []


# -- several apps ---------------------------------------------------------------------


def test_two_apps_with_separate_configs_do_not_interfere(store: KeyStore) -> None:
    key = store.create_key("acme").key
    strict = add_views(make_app("strict"))
    strict.config["M2M_AUTH"] = config(store, default_limits="1/minute")
    M2MAuth(strict)
    lenient = add_views(make_app("lenient"))
    lenient.config["M2M_AUTH"] = config(
        store, default_limits="3/minute", public_paths=[], api_key_header="X-Other"
    )
    M2MAuth(lenient)

    def lenient_get(path: str, headers: dict[str, str] | None = None) -> Any:
        return lenient.test_client().get(path, headers=headers or {"X-Other": key})

    assert get(strict, "/whoami", key).status_code == 200
    response = lenient_get("/whoami")
    assert response.status_code == 200
    assert response.headers["RateLimit-Policy"] == '"default-60s";q=3;w=60'
    assert get(strict, "/whoami", key).status_code == 429
    assert [lenient_get("/whoami").status_code for _ in range(3)] == [200, 200, 429]
    # Each app keeps its own public paths and its own header name.
    assert get(strict, "/health").status_code == 200
    assert lenient_get("/health", {"X-Unrelated": "1"}).status_code == 401
    assert lenient_get("/health", {"X-API-Key": key}).status_code == 401
    assert strict.test_client().get("/whoami", headers={"X-Other": key}).status_code == 401


# -- limits and usage quotas together -----------------------------------------------------


class GatedStore(MemoryKeyStore):
    """Holds ``take_use`` until released, as a slow network store would."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def take_use(self, key_id: str) -> int | None:
        if self.gate:
            self.entered.set()
            self.release.wait(timeout=5)
        return super().take_use(key_id)


def test_a_request_refused_for_quota_does_not_hold_rate_limit_budget() -> None:
    gated = GatedStore()
    issued = gated.create_key("acme", max_uses=2)
    once = issued.key
    other = gated.create_key("acme").key
    app = add_views(make_app())
    M2MAuth(app, settings=Settings(**config(gated, default_limits="2/minute")))
    assert get(app, "/whoami", once).status_code == 200  # 1 of 2 used; one use left
    assert gated.take_use(issued.key_id) == 0  # another instance spends the last use

    gated.gate = True
    with ThreadPoolExecutor(max_workers=1) as pool:
        spent = pool.submit(get, app, "/whoami", once)
        assert gated.entered.wait(timeout=5)
        try:
            second = get(app, "/whoami", other)
        finally:
            gated.release.set()
        assert spent.result().get_json()["error"] == "quota_exceeded"
    # Only one request was admitted so far: the second of a 2/minute budget fits.
    assert second.status_code == 200, second.get_json()


# -- the WSGI-layer gate ----------------------------------------------------------------


def gates(app: flask.Flask) -> int:
    """How many M2M gates the WSGI stack of ``app`` holds (under ProxyFix and the like)."""
    found, layer = 0, cast(Any, app.wsgi_app)
    while layer is not None:
        found += isinstance(layer, _Gate)
        layer = getattr(layer, "wsgi_app", None) or getattr(layer, "app", None)
    return found


def test_proxy_fix_wrapped_around_the_extension_still_authenticates(store: KeyStore) -> None:
    key = store.create_key("acme").key
    app = add_views(make_app())
    M2MAuth(app, settings=Settings(**config(store)))
    app.wsgi_app = ProxyFix(app.wsgi_app)  # type: ignore[method-assign]

    @app.get("/remote")
    def remote() -> Any:
        return {"remote_addr": flask.request.remote_addr, "client": current_client.client_id}

    client = app.test_client()
    forwarded = {"X-Forwarded-For": "203.0.113.7"}
    assert client.get("/remote", headers=forwarded).status_code == 401
    response = client.get("/remote", headers={**forwarded, "X-API-Key": key})
    assert response.status_code == 200
    assert response.get_json() == {"remote_addr": "203.0.113.7", "client": "acme"}
    assert response.headers["RateLimit-Policy"] == '"default-60s";q=100;w=60'
    assert gates(app) == 1


@pytest.mark.parametrize("proxied", [False, True], ids=["bare", "under-proxy-fix"])
def test_init_app_again_replaces_the_settings_without_a_second_gate(
    store: KeyStore, proxied: bool
) -> None:
    key = store.create_key("acme").key
    app = add_views(make_app())
    auth = M2MAuth(app, settings=Settings(**config(store, default_limits="1/minute")))
    if proxied:
        app.wsgi_app = ProxyFix(app.wsgi_app)  # type: ignore[method-assign]
    first = M2MAuth.engine(app)
    new = Settings(**config(store, default_limits="3/minute", public_paths=[]))
    auth.init_app(app, settings=new)
    assert M2MAuth.engine(app) is not first
    assert M2MAuth.engine(app).settings is new
    assert gates(app) == 1
    assert app.before_request_funcs[None].count(_attach_client) == 1

    client = app.test_client()
    assert client.get("/health").status_code == 401  # public under the old settings only
    replies = [client.get("/orders", headers={"X-API-Key": key}) for _ in range(4)]
    assert [r.status_code for r in replies] == [403, 403, 403, 429]  # one gate, one charge
    assert replies[0].headers["RateLimit-Policy"] == '"default-60s";q=3;w=60'


def test_init_app_again_with_a_new_api_key_header_reads_the_new_header(store: KeyStore) -> None:
    key = store.create_key("acme").key
    app = add_views(make_app())
    auth = M2MAuth(app, settings=Settings(**config(store)))
    auth.init_app(app, settings=Settings(**config(store, api_key_header="X-Other")))
    client = app.test_client()
    assert client.get("/whoami", headers={"X-Other": key}).status_code == 200
    assert client.get("/whoami", headers={"X-API-Key": key}).status_code == 401


def test_a_refused_request_runs_no_before_request_hook_and_no_view(store: KeyStore) -> None:
    no_scope = store.create_key("acme").key
    limited = store.create_key("globex", scopes=["orders:read"]).key
    calls: list[str] = []
    app = make_app()
    app.before_request(lambda: calls.append("hook before the extension"))
    M2MAuth(
        app,
        settings=Settings(
            **config(
                store,
                default_limits="1/minute",
                routes=[{"path": "/orders", "scopes": ["orders:read"]}],
            )
        ),
    )
    app.before_request(lambda: calls.append("hook after the extension"))
    add_views(app, calls)
    client = app.test_client()
    assert client.get("/whoami").status_code == 401
    assert client.get("/whoami", headers={"X-API-Key": "m2m_nonsense"}).status_code == 401
    assert client.get("/orders", headers={"X-API-Key": no_scope}).status_code == 403
    assert calls == []
    # Control: an admitted request runs both hooks and the view; the next one is refused.
    assert client.get("/orders", headers={"X-API-Key": limited}).status_code == 200
    assert calls == ["hook before the extension", "hook after the extension", "orders"]
    assert client.get("/orders", headers={"X-API-Key": limited}).status_code == 429
    assert len(calls) == 3


def test_a_public_path_leaves_g_m2m_client_none(store: KeyStore) -> None:
    key = store.create_key("acme").key
    app = make_app()
    M2MAuth(app, settings=Settings(**config(store)))
    seen: list[tuple[bool, Any]] = []

    @app.get("/public/probe")
    def probe() -> Any:
        seen.append(("m2m_client" in flask.g, flask.g.m2m_client))
        return {"client": current_client._get_current_object() is not None}  # type: ignore[attr-defined]

    client = app.test_client()
    # Even with a valid key sent along: public paths attach no client.
    for headers in ({}, {"X-API-Key": key}):
        response = client.get("/public/probe", headers=headers)
        assert response.status_code == 200
        assert response.get_json() == {"client": False}
    assert seen == [(True, None), (True, None)]


def test_a_non_ascii_path_matches_a_unicode_rule(store: KeyStore) -> None:
    reader = store.create_key("acme", scopes=["menu:read"]).key
    nobody = store.create_key("acme").key
    rules = [{"path": "/café/*", "scopes": ["menu:read"]}]
    app = make_app()
    M2MAuth(app, settings=Settings(**config(store, routes=rules)))

    @app.get("/café/<item>")
    def cafe(item: str) -> Any:
        return {"item": item}

    @app.get("/cafe/<item>")
    def plain(item: str) -> Any:
        return {"item": item}

    client = app.test_client()
    response = client.get("/café/1", headers={"X-API-Key": nobody})
    assert response.status_code == 403
    assert 'scope="menu:read"' in response.headers["WWW-Authenticate"]
    assert client.get("/caf%C3%A9/1", headers={"X-API-Key": nobody}).status_code == 403
    response = client.get("/café/1", headers={"X-API-Key": reader})
    assert response.status_code == 200
    assert response.get_json() == {"item": "1"}
    # The rule is for the accented path only.
    assert client.get("/cafe/1", headers={"X-API-Key": nobody}).status_code == 200


# -- configuration mistakes, at start-up ------------------------------------------------


@pytest.mark.parametrize(
    ("mapping", "field", "meant"),
    [
        ({"defualt_limits": "1/second"}, "defualt_limits", "default_limits"),
        ({"DEFUALT_LIMITS": "1/second"}, "DEFUALT_LIMITS", "default_limits"),
        ({"public_path": ["/health"]}, "public_path", "public_paths"),
        ({"routes": [{"path": "/orders", "scope": "orders:read"}]}, "routes[0].scope", "scopes"),
    ],
)
def test_a_misspelt_field_in_app_config_names_the_one_meant(
    store: KeyStore, mapping: dict[str, Any], field: str, meant: str
) -> None:
    app = add_views(make_app())
    app.config["M2M_AUTH"] = {"key_store": store, **mapping}
    with pytest.raises(ConfigError) as caught:
        M2MAuth(app)
    assert caught.value.field == field
    assert f"did you mean `{meant}`?" in str(caught.value)


def test_a_misspelt_keyword_of_m2m_auth_names_the_one_meant() -> None:
    with pytest.raises(ConfigError) as caught:
        M2MAuth(key_store="memory://", defualt_limits="1/second")
    assert caught.value.suggestion == "default_limits"


@pytest.mark.parametrize("how", WAYS)
@pytest.mark.parametrize(
    ("module", "mapping", "field", "extra"),
    [
        ("redis", {"rate_limit_storage": "redis://127.0.0.1:6379"}, "rate_limit_storage", "redis"),
        ("redis", {"invalidation_url": "redis://127.0.0.1:6379"}, "invalidation_url", "redis"),
        ("psycopg", {"key_store": "postgresql://127.0.0.1/keys"}, "key_store", "postgres"),
        ("joserfc", {"schemes": ["jwt"], "jwt_keys": "s" * 32}, "schemes", ""),
    ],
)
def test_a_missing_extra_fails_the_app_start_up_with_the_install_line(
    monkeypatch: pytest.MonkeyPatch,
    how: str,
    module: str,
    mapping: dict[str, Any],
    field: str,
    extra: str,
) -> None:
    app = add_views(make_app())
    app.config["M2M_AUTH"] = {"key_store": "memory://", **mapping}
    hide(monkeypatch, module, how)
    with pytest.raises(ConfigError) as caught:
        M2MAuth(app)
    assert type(caught.value) is ConfigError
    assert caught.value.field == field
    assert f'pip install "m2m-middleware{f"[{extra}]" if extra else ""}"' in str(caught.value)
