"""Django's audit record through both of its stacks: the sync middleware chain
(``Client``) and the async one (``AsyncClient``), which the conformance suite,
driving Django through its sync test client, does not reach. The records
themselves are pinned against Starlette's and Flask's in
tests/conformance/test_audit_conformance.py."""

from __future__ import annotations

import asyncio
import logging
import sys
import types
from collections.abc import Callable
from typing import Any

import pytest
from adapter_support import config
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.test import AsyncClient, Client, override_settings
from django.urls import path

from m2m_middleware import KeyStore, open_key_store
from m2m_middleware.django import require_scopes

AUDIT = "m2m_middleware.audit"


async def whoami(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"client_id": request.m2m_client.client_id})  # type: ignore[attr-defined]


@require_scopes("orders:read")
async def orders(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"orders": []})


async def boom(request: HttpRequest) -> HttpResponse:
    raise LookupError("the view's own bug")


URLCONF = "m2m_django_audit_urls"
_urls = types.ModuleType(URLCONF)
_urls.urlpatterns = [  # type: ignore[attr-defined]
    path("whoami", whoami),
    path("orders", orders),
    path("public/orders", orders),
    path("boom", boom),
]
sys.modules[URLCONF] = _urls


def sync_get(path_: str, key: str | None) -> Any:
    client = Client(raise_request_exception=False)
    return client.get(path_, headers={"X-API-Key": key} if key else {})


def async_get(path_: str, key: str | None) -> Any:
    async def go() -> Any:
        client = AsyncClient(raise_request_exception=False)
        return await client.get(path_, headers={"X-API-Key": key} if key else {})

    return asyncio.run(go())


GETTERS: dict[str, Callable[[str, str | None], Any]] = {"sync": sync_get, "async": async_get}


@pytest.mark.parametrize("stack", sorted(GETTERS))
def test_each_request_is_one_record_of_how_it_ended(
    stack: str, caplog: pytest.LogCaptureFixture
) -> None:
    store: KeyStore = open_key_store("memory://")
    issued = store.create_key("acme")
    get = GETTERS[stack]
    caplog.set_level(logging.INFO, logger=AUDIT)
    with override_settings(M2M_AUTH=config(store), ROOT_URLCONF=URLCONF):
        sent = {
            "/whoami": 200,
            "/orders": 403,  # require_scopes
            "/public/orders": 401,  # require_scopes on a public path, no key looked at
            "/health": 404,  # public, nobody refused: no record
            "/boom": 500,
            "/nowhere": 404,
        }
        for url, status in sent.items():
            assert get(url, issued.key).status_code == status, url
    got = [
        (r.m2m_path, r.m2m_allowed, r.m2m_status, r.m2m_error, r.m2m_key_id)  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == AUDIT
    ]
    assert got == [
        ("/whoami", True, 200, None, issued.key_id),
        ("/orders", False, 403, "insufficient_scope", issued.key_id),
        ("/public/orders", False, 401, "missing_credentials", None),
        ("/boom", True, 500, None, issued.key_id),
        ("/nowhere", True, 404, None, issued.key_id),
    ]
