"""The Django middleware: sync and async views, require_scopes, override_settings.

Django's settings are configured once in tests/conftest.py; every test
switches ``M2M_AUTH`` (and the URLconf below) with ``override_settings``.
"""

from __future__ import annotations

import asyncio
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest
from adapter_support import config
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.test import AsyncClient, Client, override_settings
from django.urls import path

from m2m_middleware import Client as M2MClient
from m2m_middleware import ConfigError, KeyStore, open_key_store
from m2m_middleware.django import M2MAuthMiddleware, get_client, require_scopes

# -- views --------------------------------------------------------------------------


def _describe(request: HttpRequest, kind: str) -> dict[str, Any]:
    client = request.m2m_client  # type: ignore[attr-defined]
    return {
        "view": kind,
        "client_id": client.client_id,
        "scopes": sorted(client.scopes),
        "key_id": client.key_id,
        "is_client": isinstance(client, M2MClient),
        "same": get_client(request) is client,
    }


def sync_whoami(request: HttpRequest) -> HttpResponse:
    return JsonResponse(_describe(request, "sync"))


async def async_whoami(request: HttpRequest) -> HttpResponse:
    asyncio.get_running_loop()  # really running as a coroutine
    return JsonResponse(_describe(request, "async"))


@require_scopes("orders:read")
def sync_orders(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"view": "sync", "orders": []})


@require_scopes("orders:read", "orders:audit")
async def async_orders(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"view": "async", "orders": []})


def health(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"client": request.m2m_client is not None})  # type: ignore[attr-defined]


@require_scopes("orders:read")
def public_sync_guarded(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"ok": True})


@require_scopes("orders:read")
async def public_async_guarded(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"ok": True})


URLCONF = "m2m_django_adapter_urls"
_urls = types.ModuleType(URLCONF)
_urls.urlpatterns = [  # type: ignore[attr-defined]
    path("sync/whoami", sync_whoami),
    path("async/whoami", async_whoami),
    path("sync/orders", sync_orders),
    path("async/orders", async_orders),
    path("health", health),
    path("public/sync", public_sync_guarded),
    path("public/async", public_async_guarded),
]
sys.modules[URLCONF] = _urls


# -- fixtures -------------------------------------------------------------------------


@pytest.fixture
def store() -> KeyStore:
    return open_key_store("memory://")


@pytest.fixture
def use_urls() -> Iterator[None]:
    with override_settings(ROOT_URLCONF=URLCONF):
        yield


def sync_get(path_: str, key: str | None = None, header: str = "X-API-Key") -> Any:
    return Client().get(path_, headers={header: key} if key else {})


def async_get(path_: str, key: str | None = None, header: str = "X-API-Key") -> Any:
    async def go() -> Any:
        return await AsyncClient().get(path_, headers={header: key} if key else {})

    return asyncio.run(go())


GETTERS = {"sync-client": sync_get, "async-client": async_get}


def assert_problem(response: Any, status: int, error: str) -> dict[str, Any]:
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == status
    assert problem["error"] == error
    return problem


# -- sync and async views ----------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("use_urls")


@pytest.mark.parametrize("getter", sorted(GETTERS))
@pytest.mark.parametrize("view", ["sync", "async"])
def test_views_get_the_client(store: KeyStore, getter: str, view: str) -> None:
    issued = store.create_key("acme", scopes=["orders:read"])
    get = GETTERS[getter]
    with override_settings(M2M_AUTH=config(store)):
        response = get(f"/{view}/whoami", issued.key)
        assert response.status_code == 200, response.content
        assert response.json() == {
            "view": view,
            "client_id": "acme",
            "scopes": ["orders:read"],
            "key_id": issued.key_id,
            "is_client": True,
            "same": True,
        }
        assert response["RateLimit-Policy"] == '"default-60s";q=100;w=60'
        assert response["RateLimit"].startswith('"default-60s";r=99;t=')
        assert_problem(get(f"/{view}/whoami"), 401, "missing_credentials")


@pytest.mark.parametrize("getter", sorted(GETTERS))
def test_public_paths_attach_no_client(store: KeyStore, getter: str) -> None:
    with override_settings(M2M_AUTH=config(store)):
        response = GETTERS[getter]("/health")
    assert response.status_code == 200
    assert response.json() == {"client": False}
    assert "RateLimit" not in response


def test_sync_and_async_requests_share_one_budget(store: KeyStore) -> None:
    key = store.create_key("acme").key
    with override_settings(M2M_AUTH=config(store, default_limits="2/minute")):
        assert sync_get("/sync/whoami", key).status_code == 200
        assert async_get("/async/whoami", key).status_code == 200
        assert_problem(sync_get("/sync/whoami", key), 429, "rate_limited")
        assert_problem(async_get("/async/whoami", key), 429, "rate_limited")


# -- require_scopes -------------------------------------------------------------------


@pytest.mark.parametrize("getter", sorted(GETTERS))
@pytest.mark.parametrize(
    ("view", "needed"), [("sync", "orders:read"), ("async", "orders:audit orders:read")]
)
def test_require_scopes_refuses_a_missing_scope(
    store: KeyStore, getter: str, view: str, needed: str
) -> None:
    key = store.create_key("acme", scopes=["orders:write"]).key
    with override_settings(M2M_AUTH=config(store)):
        response = GETTERS[getter](f"/{view}/orders", key)
    problem = assert_problem(response, 403, "insufficient_scope")
    assert key not in response.content.decode()
    challenge = response["WWW-Authenticate"]
    assert 'error="insufficient_scope"' in challenge
    assert f'scope="{needed}"' in challenge
    assert problem.get("scope", needed) == needed


@pytest.mark.parametrize("getter", sorted(GETTERS))
@pytest.mark.parametrize("view", ["sync", "async"])
def test_require_scopes_admits_the_scopes(store: KeyStore, getter: str, view: str) -> None:
    key = store.create_key("acme", scopes=["orders:read", "orders:audit"]).key
    partial = store.create_key("acme", scopes=["orders:read"]).key
    with override_settings(M2M_AUTH=config(store)):
        response = GETTERS[getter](f"/{view}/orders", key)
        assert response.status_code == 200
        assert response.json() == {"view": view, "orders": []}
        expected = 200 if view == "sync" else 403  # the async view needs both scopes
        assert GETTERS[getter](f"/{view}/orders", partial).status_code == expected


@pytest.mark.parametrize("getter", sorted(GETTERS))
@pytest.mark.parametrize("view", ["sync", "async"])
def test_require_scopes_on_a_public_path_is_401(store: KeyStore, getter: str, view: str) -> None:
    with override_settings(M2M_AUTH=config(store)):
        response = GETTERS[getter](f"/public/{view}")
    assert_problem(response, 401, "missing_credentials")
    challenge = response["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert "error=" not in challenge


# -- settings ---------------------------------------------------------------------------


def test_override_settings_switches_the_configuration(store: KeyStore) -> None:
    key = store.create_key("acme").key
    other_store = open_key_store("memory://")
    other_key = other_store.create_key("globex").key
    strict = config(store, default_limits="1/minute")
    with override_settings(M2M_AUTH=strict):
        assert sync_get("/sync/whoami", key).status_code == 200
        assert sync_get("/sync/whoami", key).status_code == 429
    with override_settings(M2M_AUTH=config(store, default_limits="5/minute")):
        response = sync_get("/sync/whoami", key)
        assert response.status_code == 200
        assert response["RateLimit-Policy"] == '"default-60s";q=5;w=60'
    with override_settings(M2M_AUTH=config(store, api_key_header="X-Service-Key")):
        assert sync_get("/sync/whoami", key).status_code == 401
        assert sync_get("/sync/whoami", key, header="X-Service-Key").status_code == 200
    with override_settings(M2M_AUTH=config(other_store)):
        assert sync_get("/sync/whoami", key).status_code == 401
        response = sync_get("/sync/whoami", other_key)
        assert response.json()["client_id"] == "globex"
    # Leaving the override restores the session's settings.
    assert_problem(sync_get("/sync/whoami", key), 401, "invalid_token")


@pytest.mark.parametrize("getter", sorted(GETTERS))
def test_invalid_settings_fail_when_the_middleware_loads(store: KeyStore, getter: str) -> None:
    with (
        override_settings(M2M_AUTH=config(store, default_limits="lots")),
        pytest.raises(ConfigError) as caught,
    ):
        GETTERS[getter]("/health")
    assert caught.value.field == "default_limits"


def test_the_middleware_is_sync_and_async_capable() -> None:
    assert M2MAuthMiddleware.sync_capable is True
    assert M2MAuthMiddleware.async_capable is True


# -- transport: the async path reads the ASGI scope's scheme and client ------------------


@pytest.mark.parametrize("view", ["sync", "async"])
def test_the_async_path_reads_the_scopes_scheme_and_proxy_headers(
    store: KeyStore, view: str
) -> None:
    key = store.create_key("acme", allowed_cidrs=["203.0.113.0/24"]).key
    settings = {**config(store), "require_https": True, "trusted_proxies": ["127.0.0.1/32"]}

    def get(secure: bool, **headers: str) -> Any:
        async def go() -> Any:
            return await AsyncClient().get(
                f"/{view}/whoami", headers={"X-API-Key": key, **headers}, secure=secure
            )

        return asyncio.run(go())

    with override_settings(M2M_AUTH=settings):
        assert_problem(get(False, x_forwarded_for="203.0.113.9"), 403, "https_required")
        assert_problem(get(True), 403, "address_not_allowed")  # the peer is 127.0.0.1
        assert get(True, x_forwarded_for="203.0.113.9").status_code == 200
        proxied = get(False, x_forwarded_for="203.0.113.9", x_forwarded_proto="https")
        assert proxied.status_code == 200
