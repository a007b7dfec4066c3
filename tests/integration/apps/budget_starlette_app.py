"""A Starlette app for ``uvicorn --workers 2 budget_starlette_app:app``; answers with
its worker's pid."""

from __future__ import annotations

import os

from budget_settings import m2m_config
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from m2m_middleware import Settings
from m2m_middleware.starlette import M2MMiddleware


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok", "pid": os.getpid()})


async def ping(request: Request) -> Response:
    return JSONResponse({"pid": os.getpid(), "client_id": request.user.client_id})


app = Starlette(routes=[Route("/health", health), Route("/ping", ping)])
app.add_middleware(M2MMiddleware, settings=Settings(**m2m_config()))
