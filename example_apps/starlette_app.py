"""m2m-middleware on Starlette: API keys, scopes and per-client rate limits.

Run it (from the repository root):

    python example_apps/starlette_app.py --create-key     # http://127.0.0.1:8000

or under any ASGI server:

    uvicorn --app-dir example_apps starlette_app:app

The key store comes from the environment variable ``M2M_KEY_STORE``
(default ``sqlite:///example_keys.db``, relative to the working directory).
With ``M2M_SIGNING_SECRET`` set, the token service is on too: a key can be
exchanged for a short-lived token at ``POST /oauth/token`` (see
``token_client.py``), and the API takes that token as well.
"""

from __future__ import annotations

import argparse
import os
from contextlib import closing

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from m2m_middleware import Client, Settings, open_key_store
from m2m_middleware.starlette import M2MMiddleware, require_scopes

KEY_STORE = os.environ.get("M2M_KEY_STORE", "sqlite:///example_keys.db")
# The token service seals its signing keys with this secret (the default of the
# setting signing_key_secret): without it, the example serves API keys only.
TOKENS_ON = bool(os.environ.get("M2M_SIGNING_SECRET"))

settings = Settings(
    key_store=KEY_STORE,
    default_limits="10/second;1000/day",
    public_paths=["/health"],
    routes=[{"path": "/orders*", "scopes": ["orders:read"]}],
    schemes=["api_key", "jwt"] if TOKENS_ON else ["api_key"],
    token_endpoint="/oauth/token" if TOKENS_ON else None,
    token_issuer="http://127.0.0.1:8000",  # the iss of its tokens; use your https URL
)


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def whoami(request: Request) -> JSONResponse:
    client: Client = request.user
    return JSONResponse(
        {
            "client_id": client.client_id,
            "scheme": client.scheme,
            "scopes": sorted(client.scopes),
            "tier": client.tier,
            "key_id": client.key_id,
        }
    )


@require_scopes("orders:read")  # belt and braces: the route rule above already demands it
async def orders(request: Request) -> JSONResponse:
    return JSONResponse(
        {"client_id": request.user.client_id, "orders": [{"id": 1, "item": "widget", "qty": 3}]}
    )


app = Starlette(
    routes=[
        Route("/health", health),
        Route("/whoami", whoami),
        Route("/orders", orders),
    ],
    middleware=[Middleware(M2MMiddleware, settings=settings)],
)


def print_banner(port: int, create_key: bool) -> None:
    base = f"http://127.0.0.1:{port}"
    print(f"m2m-middleware Starlette example on {base} (key store: {KEY_STORE})")
    print(f"  curl {base}/health")
    key = "$API_KEY"
    if create_key:
        with closing(open_key_store(KEY_STORE)) as store:
            key = store.create_key("demo-client", scopes=["orders:read"]).key
        print(f"Demo key for demo-client (shown only this once): {key}")
    else:
        print("Create a key (its plaintext is shown once), then export API_KEY=<the key>:")
        print(f"  m2m keys create --client demo-client --scope orders:read --store {KEY_STORE}")
        print("  (or restart with --create-key)")
    print(f'  curl -H "X-API-Key: {key}" {base}/orders')
    print(f'  curl -H "X-API-Key: {key}" {base}/whoami')
    if TOKENS_ON:
        print(f"Token service on: python example_apps/token_client.py --base-url {base}")
    else:
        print("Token service off: set M2M_SIGNING_SECRET to turn it on")
    print(end="", flush=True)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--create-key",
        action="store_true",
        default=os.environ.get("M2M_EXAMPLE_CREATE_KEY") == "1",
        help="create a demo key for demo-client (also: M2M_EXAMPLE_CREATE_KEY=1)",
    )
    args = parser.parse_args(argv)
    print_banner(args.port, args.create_key)
    uvicorn.run(app, host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
