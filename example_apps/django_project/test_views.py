"""Tests of the Django example with m2m_middleware.testing and pytest-django's client."""

from __future__ import annotations

from django.test import Client

from m2m_middleware.testing import KeyFactory


def test_health_needs_no_key(client: Client) -> None:
    assert client.get("/health").json() == {"status": "ok"}


def test_orders_need_orders_read(client: Client, m2m_key: KeyFactory) -> None:
    key = m2m_key(scopes=["orders:read"], client_id="demo-client")
    response = client.get("/orders", headers=key.headers)
    assert response.status_code == 200
    assert response.json()["client_id"] == "demo-client"
    assert "RateLimit" in response.headers

    refused = client.get("/orders", headers=m2m_key().headers)
    assert refused.status_code == 403
    assert refused.json()["error"] == "insufficient_scope"
    assert client.get("/orders").status_code == 401


def test_whoami_shows_the_key(client: Client, m2m_key: KeyFactory) -> None:
    key = m2m_key(scopes=["orders:read"], tier="gold")
    assert client.get("/whoami", headers=key.bearer_headers).json() == {
        "client_id": "test-client",
        "scheme": "api_key",
        "scopes": ["orders:read"],
        "tier": "gold",
        "key_id": key.key_id,
    }
