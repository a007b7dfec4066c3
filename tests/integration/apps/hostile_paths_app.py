"""Starlette, a Django ASGI app and a Flask WSGI app behind one M2MMiddleware, for
``uvicorn --root-path /api hostile_paths_app:app`` (see test_hostile_paths_over_uvicorn.py).

Every view says which one it is, so a test can tell "refused" from "reached".
The key store is an SQLite file the test made: ``$HOSTILE_PATHS_KEY_STORE``.
"""

from __future__ import annotations

import os
import warnings

import django
import flask
from django.conf import settings as django_settings
from django.core.asgi import get_asgi_application
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path as django_path
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

with warnings.catch_warnings():
    # Deprecated in favour of a2wsgi, which the test extra does not install;
    # this is still how a WSGI app is mounted in a Starlette app here.
    warnings.simplefilter("ignore")
    from starlette.middleware.wsgi import WSGIMiddleware

from m2m_middleware import Settings
from m2m_middleware.starlette import M2MMiddleware


def _dj_orders(request: HttpRequest) -> HttpResponse:
    if request.method != "POST":
        return HttpResponse(status=405)
    return JsonResponse({"view": "django POST /orders", "method": request.method})


urlpatterns = [django_path("orders", _dj_orders)]
django_settings.configure(
    DEBUG=False,
    SECRET_KEY="hostile-paths-test",
    ALLOWED_HOSTS=["*"],
    ROOT_URLCONF=__name__,
    MIDDLEWARE=[],
    INSTALLED_APPS=[],
)
django.setup()

flask_app = flask.Flask(__name__)


@flask_app.post("/orders")
def _flask_orders() -> object:
    return {"view": "flask POST /orders", "method": flask.request.method}


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def orders(request: Request) -> Response:
    return JSONResponse({"view": "starlette /orders", "path": request.url.path})


async def reports(request: Request) -> Response:
    return JSONResponse({"view": "starlette /reports/"})


routes = [
    {"path": "/orders", "scopes": ["orders:read"]},
    {"path": "/reports", "scopes": ["reports:read"]},
    {"path": "/django/orders", "methods": ["POST"], "scopes": ["orders:write"]},
    {"path": "/flask/orders", "methods": ["POST"], "scopes": ["orders:write"]},
]
app = M2MMiddleware(
    Starlette(
        routes=[
            Route("/health", health),
            Route("/orders", orders),
            Route("/reports/", reports),
            Mount("/django", app=get_asgi_application()),
            Mount("/flask", app=WSGIMiddleware(flask_app)),
        ]
    ),
    settings=Settings(
        key_store=os.environ["HOSTILE_PATHS_KEY_STORE"],
        public_paths=["/health"],
        routes=routes,
        default_limits="10000/minute",
        key_cache_ttl=0,
    ),
)
