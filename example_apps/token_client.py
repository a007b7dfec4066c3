"""A client of the example apps' token service, with authlib: no client library of ours.

It exchanges an API key for a short-lived access token at ``POST /oauth/token``
(OAuth 2 client credentials), calls the API with the token, and shows authlib
fetching a new token by itself once the first one is about to expire. Start an
example app with the token service on, then run this against it:

    export M2M_SIGNING_SECRET="$(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
    python example_apps/starlette_app.py &          # or flask_app.py, or the Django project
    m2m keys create --client demo-client --scope orders:read --json \\
        --store sqlite:///example_keys.db
    python example_apps/token_client.py --base-url http://127.0.0.1:8000 \\
        --key-id <key_id> --key <key>               # or $M2M_KEY_ID and $M2M_API_KEY

The client id is the key's ``key_id``, the client secret the API key itself.
Exit status 0 when every answer was as expected, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Any

from authlib.deprecate import AuthlibDeprecationWarning

with warnings.catch_warnings():
    # authlib builds OAuth2Client on httpx2 when it is installed and warns when it
    # falls back to httpx; both work the same here.
    warnings.simplefilter("ignore", AuthlibDeprecationWarning)
    from authlib.integrations.httpx_client import OAuth2Client


def make_client(base_url: str, key_id: str, key: str, scope: str | None) -> Any:
    """authlib's httpx client, renewing its token with the client-credentials grant."""
    return OAuth2Client(
        client_id=key_id,  # the API key's key_id
        client_secret=key,  # the API key itself (sent with HTTP Basic)
        scope=scope,
        token_endpoint=f"{base_url}/oauth/token",
        grant_type="client_credentials",  # what lets authlib fetch a new token by itself
        base_url=base_url,
        timeout=10.0,
        trust_env=False,  # straight to the app, never through a proxy
    )


def run(base_url: str, key_id: str, key: str, scope: str | None = "orders:read") -> int:
    """Fetch a token, call the API with it, renew it; print what happened. 0 when all went well."""
    failed = 0

    def check(label: str, response: Any, status: int = 200) -> Any:
        nonlocal failed
        verdict = "OK" if response.status_code == status else "UNEXPECTED"
        failed += verdict != "OK"
        print(f"{label}: {response.status_code} {verdict}")
        return response.json() if response.status_code == status else None

    renewed: list[str] = []

    def update_token(token: dict[str, Any], access_token: str | None = None) -> None:
        renewed.append(token["access_token"])  # authlib calls this with each new token

    with make_client(base_url, key_id, key, scope) as client:
        client.update_token = update_token
        # The issuer's RFC 8414 metadata: public, so sent without a token.
        metadata = check(
            "GET /.well-known/oauth-authorization-server",
            client.request("GET", "/.well-known/oauth-authorization-server", withhold_token=True),
        )
        if metadata is not None:
            print(f"  grant types: {', '.join(metadata['grant_types_supported'])}")
        token = client.fetch_token()
        print(
            f"POST /oauth/token: a {token['token_type']} token for scope "
            f"{token.get('scope')!r}, good for {token['expires_in']} s"
        )
        whoami = check("GET /whoami with the token", client.get("/whoami"))
        if whoami is not None:
            print(f"  client_id={whoami['client_id']} scheme={whoami['scheme']}")
        orders = check("GET /orders with the token", client.get("/orders"))
        if orders is not None:
            print(f"  {len(orders['orders'])} order(s)")

        # As if the token's time were up: authlib fetches a new one before this
        # request (it renews a token `leeway`, 60 s, before it expires).
        client.token["expires_at"] = int(time.time())
        check("GET /whoami once the token has expired", client.get("/whoami"))
        if renewed and renewed[-1] != token["access_token"]:
            print("  authlib fetched a new token by itself")
        else:
            failed += 1
            print("  UNEXPECTED: no new token was fetched")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--key-id", default=os.environ.get("M2M_KEY_ID"), help="$M2M_KEY_ID")
    parser.add_argument(
        "--key",
        default=os.environ.get("M2M_API_KEY"),
        help="$M2M_API_KEY (an option shows the key in ps: prefer the variable)",
    )
    parser.add_argument("--scope", default="orders:read", help="the scopes to ask for")
    args = parser.parse_args(argv)
    if not args.key_id or not args.key:
        parser.error("give the key's key_id and the key (--key-id/--key or the variables)")
    return run(args.base_url.rstrip("/"), args.key_id, args.key, args.scope)


if __name__ == "__main__":
    sys.exit(main())
