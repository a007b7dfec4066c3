"""A Starlette app for ``uvicorn transport_starlette_app:app``: echoes what the server saw."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from transport_settings import m2m_config

from m2m_middleware import Settings
from m2m_middleware.starlette import M2MMiddleware


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def seen(request: Request) -> Response:
    client = request.scope.get("client")
    return JSONResponse(
        {"peer": client[0] if client else None, "scheme": request.scope.get("scheme")}
    )


app = Starlette(routes=[Route("/health", health), Route("/seen", seen)])
app.add_middleware(M2MMiddleware, settings=Settings(**m2m_config()))
