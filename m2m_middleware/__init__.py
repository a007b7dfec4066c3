"""API-key and JWT authentication with per-client rate limits for Flask, Django and Starlette.

This module imports no web framework; the adapters live in
``m2m_middleware.flask``, ``m2m_middleware.django`` and ``m2m_middleware.starlette``.
"""

from __future__ import annotations

from .client import Client
from .engine import Engine
from .errors import (
    AuthError,
    ConfigError,
    KeyNotFound,
    KeyStoreError,
    M2MError,
    StoreUnavailable,
)
from .outcome import Allowed, Denied
from .settings import Settings
from .stores import IssuedKey, KeyRecord, KeyStore, open_key_store
from .telemetry.records import Alert, UsageRow

__version__ = "0.1.0"

__all__ = [
    "Alert",
    "Allowed",
    "AuthError",
    "Client",
    "ConfigError",
    "Denied",
    "Engine",
    "IssuedKey",
    "KeyNotFound",
    "KeyRecord",
    "KeyStore",
    "KeyStoreError",
    "M2MError",
    "Settings",
    "StoreUnavailable",
    "UsageRow",
    "open_key_store",
]
