"""Settings shared by the Flask and Django adapter suites."""

from __future__ import annotations

from typing import Any

from m2m_middleware import KeyStore


def config(store: KeyStore, **overrides: Any) -> dict[str, Any]:
    """Settings fields for an app on ``store``: 100/minute, two public paths."""
    values: dict[str, Any] = {
        "key_store": store,
        "rate_limit_storage": "memory://",
        "default_limits": "100/minute",
        "public_paths": ["/health", "/public/*"],
    }
    values.update(overrides)
    return values
