"""The apps ``server_load.py`` serves, one per server process, configured by environment.

A real server (uvicorn, gunicorn) imports ``server_apps:app`` in a process of
its own, so the app cannot be handed over as an object: ``server_load.py``
describes it in environment variables instead, and this module builds it at
import time with the app builders of ``overhead.py`` (the same apps the
in-process benchmarks time, so the figures compare).

``M2M_BENCH_APP``
    ``starlette``, ``flask``, ``django-wsgi`` or ``django-asgi``.
``M2M_BENCH_ROLE``
    ``bare``, ``ours`` or ``peer``.
``M2M_BENCH_KEY_STORE``
    ours: the key store URL (a SQLite file the driver created the key in).
``M2M_BENCH_SETTINGS``
    ours: a JSON object of settings (``rate_limit_storage``, ...) laid over the
    defaults below.
``M2M_BENCH_KEY_SHA256`` and ``M2M_BENCH_CLIENT``
    peer: the SHA-256 hex of the one valid key and its client id (the peers
    look keys up by hash; the plaintext never needs to reach the server).
``M2M_BENCH_REDIS_URL``
    peer: the Redis their limiter counts in.
``M2M_BENCH_CACHE_PREFIX``
    peer on Django: the ``RedisCache`` key prefix (this run's own).
``M2M_BENCH_LIMIT``
    the one limit every limited stack charges (high enough never to trip).

Every app answers ``ok`` at ``/``; the driver checks 200 with the key, 401
without and with a wrong one, before it times anything.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import overhead

APPS = ("starlette", "flask", "django-wsgi", "django-asgi")
ROLES = ("bare", "ours", "peer")


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise SystemExit(f"server_apps: {name} is not set (server_load.py sets it)")
    return value


def ours_settings() -> dict[str, Any]:
    settings: dict[str, Any] = {
        "key_store": _env("M2M_BENCH_KEY_STORE"),
        "default_limits": _env("M2M_BENCH_LIMIT"),
        "rate_limit_storage": "memory://",
    }
    settings.update(json.loads(os.environ.get("M2M_BENCH_SETTINGS") or "{}"))
    return settings


def peer_table() -> dict[str, str]:
    return {_env("M2M_BENCH_KEY_SHA256"): _env("M2M_BENCH_CLIENT")}


def starlette(role: str) -> Any:
    if role == "bare":
        return overhead.starlette_app()
    if role == "ours":
        from m2m_middleware import Settings
        from m2m_middleware.starlette import M2MMiddleware

        app = overhead.starlette_app()
        app.add_middleware(M2MMiddleware, settings=Settings(**ours_settings()))
        return app
    return overhead.starlette_slowapi_decorated(
        overhead.starlette_key_backend(peer_table()),
        _env("M2M_BENCH_LIMIT"),
        storage_uri=_env("M2M_BENCH_REDIS_URL"),
    )


def flask(role: str) -> Any:
    app = overhead.flask_app()
    if role == "ours":
        from m2m_middleware import Settings
        from m2m_middleware.flask import M2MAuth

        M2MAuth(app, settings=Settings(**ours_settings()))
    elif role == "peer":
        overhead.flask_key_check(app, peer_table())
        overhead.flask_limiter(
            app, _env("M2M_BENCH_LIMIT"), storage_uri=_env("M2M_BENCH_REDIS_URL")
        )
    return app


def django(role: str, interface: str) -> Any:
    """Django with no middleware (bare), ours, or a DRF view throttled on ``RedisCache`` (peer).

    The peer answers at ``/`` too (the driver requests one path for every
    stack), so the URLconf's root is the DRF view there.
    """
    caches = {}
    if role == "peer":
        caches["throttle"] = {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": _env("M2M_BENCH_REDIS_URL"),
            "KEY_PREFIX": _env("M2M_BENCH_CACHE_PREFIX"),
        }
    overhead.configure_django(ours_settings() if role == "ours" else {}, caches=caches)
    from django.conf import settings

    if role == "peer":
        from django.core.cache import caches as django_caches
        from rest_framework.permissions import IsAuthenticated

        overhead.django_urls({})
        view = overhead.django_plain_view(
            authentication_classes=(overhead.drf_key_authentication(peer_table()),),
            permission_classes=(IsAuthenticated,),
            throttle_classes=(
                overhead.drf_client_throttle(
                    _env("M2M_BENCH_LIMIT"), "client", django_caches["throttle"]
                ),
            ),
        )
        from django.urls import path

        sys.modules[overhead._DJANGO_URLS].urlpatterns = [path("", view)]  # type: ignore[attr-defined]
    else:
        overhead.django_urls({})
    # One app per process: the chain is set before the handler loads it.
    settings.MIDDLEWARE = ["m2m_middleware.django.M2MAuthMiddleware"] if role == "ours" else []
    if interface == "asgi":
        from django.core.asgi import get_asgi_application

        return get_asgi_application()
    from django.core.wsgi import get_wsgi_application

    return get_wsgi_application()


def build() -> Any:
    which, role = _env("M2M_BENCH_APP"), _env("M2M_BENCH_ROLE")
    if which not in APPS or role not in ROLES:
        raise SystemExit(f"server_apps: unknown app {which!r} or role {role!r}")
    if which == "starlette":
        return starlette(role)
    if which == "flask":
        return flask(role)
    return django(role, which.partition("-")[2])


app = build()
