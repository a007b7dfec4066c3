"""Tests of the Starlette example with m2m_middleware.testing and Starlette's TestClient."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import starlette_app
from starlette.applications import Starlette
from starlette.testclient import TestClient

from m2m_middleware.testing import KeyFactory


@pytest.fixture
def app() -> Starlette:
    return starlette_app.app


@pytest.fixture
def client(app: Starlette) -> Iterator[TestClient]:
    with TestClient(app) as client:
        yield client


def test_health_needs_no_key(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}


def test_orders_need_orders_read(client: TestClient, m2m_key: KeyFactory) -> None:
    key = m2m_key(scopes=["orders:read"], client_id="demo-client")
    response = client.get("/orders", headers=key.headers)
    assert response.status_code == 200
    assert response.json()["client_id"] == "demo-client"
    assert "RateLimit" in response.headers

    refused = client.get("/orders", headers=m2m_key().headers)
    assert refused.status_code == 403
    assert refused.json()["error"] == "insufficient_scope"
    assert client.get("/orders").status_code == 401


def test_whoami_shows_the_key(client: TestClient, m2m_headers: dict[str, str]) -> None:
    whoami = client.get("/whoami", headers=m2m_headers).json()
    assert (whoami["client_id"], whoami["scopes"]) == ("test-client", [])
