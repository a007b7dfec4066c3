"""The token service under real servers: ``uvicorn token_service_apps:starlette_app``
and ``gunicorn token_service_apps:flask_app``, settings from the test's environment
(the signing secret from ``M2M_SIGNING_SECRET``, as in production)."""

from __future__ import annotations

import os
from typing import Any

import flask
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from m2m_middleware import Settings
from m2m_middleware.flask import M2MAuth
from m2m_middleware.starlette import M2MMiddleware


def m2m_config() -> dict[str, Any]:
    return {
        "key_store": os.environ["M2M_TEST_KEY_STORE"],
        "rate_limit_storage": "memory://",
        "public_paths": ["/health"],
        "routes": [{"path": "/orders", "scopes": ["orders:read"]}],
        "token_endpoint": "/oauth/token",
        "token_issuer": os.environ["M2M_TEST_ISSUER"],
        "token_ttl": int(os.environ["M2M_TEST_TOKEN_TTL"]),
        "token_limits": "1000/minute",
    }


async def _health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


starlette_app = Starlette(routes=[Route("/health", _health)])
starlette_app.add_middleware(M2MMiddleware, settings=Settings(**m2m_config()))

flask_app = flask.Flask(__name__)
flask_app.config["M2M_AUTH"] = m2m_config()
M2MAuth(flask_app)


@flask_app.get("/health")
def health() -> Any:
    return {"status": "ok"}
