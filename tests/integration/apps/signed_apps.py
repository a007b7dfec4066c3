"""Apps with a signed route, for ``uvicorn signed_apps:starlette_app`` and
``gunicorn signed_apps:flask_app``: ``POST /payments`` (signed) echoes the body
it read after the middleware checked its digest."""

from __future__ import annotations

import os
from typing import Any

import flask
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from m2m_middleware import Settings
from m2m_middleware.flask import M2MAuth
from m2m_middleware.starlette import M2MMiddleware


def m2m_config() -> dict[str, Any]:
    return {
        "key_store": os.environ["M2M_TEST_KEY_STORE"],
        "rate_limit_storage": os.environ.get("M2M_TEST_LIMITS", "memory://"),
        "public_paths": ["/health"],
        "routes": [{"path": "/payments", "methods": ["POST"], "signed": True}],
        "source_limits": "50/minute",
    }


async def _health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def _payments(request: Request) -> Response:
    return Response(await request.body(), media_type="application/octet-stream")


starlette_app = Starlette(
    routes=[Route("/health", _health), Route("/payments", _payments, methods=["POST"])]
)
starlette_app.add_middleware(M2MMiddleware, settings=Settings(**m2m_config()))

flask_app = flask.Flask(__name__)
flask_app.config["M2M_AUTH"] = m2m_config()
M2MAuth(flask_app)


@flask_app.get("/health")
def health() -> Any:
    return {"status": "ok"}


@flask_app.post("/payments")
def payments() -> Any:
    return flask.Response(flask.request.get_data(), mimetype="application/octet-stream")
