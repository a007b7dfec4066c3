"""A Starlette app with websockets, for ``uvicorn --ws <implementation>``: refused
handshakes should reach the client with the HTTP answer (status, headers, problem body)."""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from m2m_middleware import Settings
from m2m_middleware.starlette import M2MMiddleware, require_scopes


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


@require_scopes("orders:watch")
async def feed(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_json({"client_id": websocket.user.client_id})
    await websocket.close()


app = Starlette(routes=[Route("/health", health), WebSocketRoute("/feed", feed)])
app.add_middleware(
    M2MMiddleware,
    settings=Settings(
        key_store=os.environ["M2M_TEST_KEY_STORE"],
        default_limits="100/minute",
        public_paths=["/health"],
    ),
)
