"""m2m-middleware on Flask: API keys, scopes and per-client rate limits.

Run it (from the repository root):

    python example_apps/flask_app.py --create-key     # http://127.0.0.1:5000

or with the Flask CLI, which finds ``create_app()``:

    flask --app example_apps/flask_app run

The key store comes from the environment variable ``M2M_KEY_STORE``
(default ``sqlite:///example_keys.db``, relative to the working directory).
With ``M2M_SIGNING_SECRET`` set, the token service is on too: a key can be
exchanged for a short-lived token at ``POST /oauth/token`` (see
``token_client.py``), and the API takes that token as well.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from contextlib import closing
from typing import Any

from flask import Flask

from m2m_middleware import open_key_store
from m2m_middleware.flask import M2MAuth, current_client, require_scopes


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    app = Flask(__name__)
    app.config["M2M_AUTH"] = {
        "key_store": os.environ.get("M2M_KEY_STORE", "sqlite:///example_keys.db"),
        "default_limits": "10/second;1000/day",
        "public_paths": ["/health"],
        "routes": [{"path": "/orders*", "scopes": ["orders:read"]}],
    }
    if os.environ.get("M2M_SIGNING_SECRET"):  # seals the token service's signing keys
        app.config["M2M_AUTH"].update(
            schemes=["api_key", "jwt"],
            token_endpoint="/oauth/token",
            token_issuer="http://127.0.0.1:5000",  # the iss of its tokens; use your https URL
        )
    if config:
        app.config.update(config)
    M2MAuth(app)  # reads app.config["M2M_AUTH"]

    @app.get("/health")
    def health() -> Any:
        return {"status": "ok"}

    @app.get("/whoami")
    def whoami() -> Any:
        return {
            "client_id": current_client.client_id,
            "scheme": current_client.scheme,
            "scopes": sorted(current_client.scopes),
            "tier": current_client.tier,
            "key_id": current_client.key_id,
        }

    @app.get("/orders")
    @require_scopes("orders:read")
    def orders() -> Any:
        return {
            "client_id": current_client.client_id,
            "orders": [{"id": 1, "item": "widget", "qty": 3}],
        }

    return app


def print_banner(store_url: str, port: int, create_key: bool) -> None:
    base = f"http://127.0.0.1:{port}"
    print(f"m2m-middleware Flask example on {base} (key store: {store_url})")
    print(f"  curl {base}/health")
    key = "$API_KEY"
    if create_key:
        with closing(open_key_store(store_url)) as store:
            key = store.create_key("demo-client", scopes=["orders:read"]).key
        print(f"Demo key for demo-client (shown only this once): {key}")
    else:
        print("Create a key (its plaintext is shown once), then export API_KEY=<the key>:")
        print(f"  m2m keys create --client demo-client --scope orders:read --store {store_url}")
        print("  (or restart with --create-key)")
    print(f'  curl -H "X-API-Key: {key}" {base}/orders')
    print(f'  curl -H "X-API-Key: {key}" {base}/whoami')
    if os.environ.get("M2M_SIGNING_SECRET"):
        print(f"Token service on: python example_apps/token_client.py --base-url {base}")
    else:
        print("Token service off: set M2M_SIGNING_SECRET to turn it on")
    print(end="", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument(
        "--create-key",
        action="store_true",
        default=os.environ.get("M2M_EXAMPLE_CREATE_KEY") == "1",
        help="create a demo key for demo-client (also: M2M_EXAMPLE_CREATE_KEY=1)",
    )
    args = parser.parse_args(argv)
    app = create_app()
    print_banner(app.config["M2M_AUTH"]["key_store"], args.port, args.create_key)
    app.run(host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
