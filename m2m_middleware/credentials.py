"""Finding the one credential a request carries: a Bearer token or an API-key header.

Never the query string: URLs end up in access logs, browser history and
``Referer`` headers, so a credential there is a leaked credential.
"""

from __future__ import annotations

import re

from .errors import InvalidRequest, InvalidToken

# A comma followed by "<auth-scheme> " starts a second Authorization value
# (RFC 9110 section 5.3 joins repeated headers with commas).
_ANOTHER_SCHEME = re.compile(r",\s*[A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]*\s")


def extract_credential(
    authorization: str | None, api_key: str | None, *, header_name: str, max_length: int
) -> str | None:
    """The credential sent, or None when there is none.

    Headers that arrived several times are joined with commas (as WSGI and
    the ASGI adapters do): a comma before another ``<scheme> `` in
    ``Authorization``, or a comma in the API-key header, means more than one
    value was sent.
    """
    bearer = None
    if authorization:
        scheme, _, rest = authorization.strip().partition(" ")
        if scheme.lower() == "bearer":
            bearer = rest.strip()
            if "," in bearer and _ANOTHER_SCHEME.search(bearer):
                raise InvalidRequest("more than one Authorization header was sent")
            # Any other comma (a JWS JSON serialization, say) is part of one
            # malformed credential, which verification refuses as invalid_token.
            if not bearer:
                raise InvalidToken("the Bearer credential is empty")
        # Other schemes (Basic for a proxy, say) are not ours to judge.
    key = None
    if api_key is not None:
        key = api_key.strip()
        if "," in key:
            values = {v.strip() for v in key.split(",")}
            if len(values) > 1:
                raise InvalidRequest(f"more than one {header_name} header was sent")
            key = values.pop()
        if not key:
            raise InvalidToken(f"the {header_name} header is empty")
    if bearer is not None and key is not None and bearer != key:
        raise InvalidRequest(f"both an Authorization header and an {header_name} header were sent")
    credential = bearer if bearer is not None else key
    if credential is not None and len(credential) > max_length:
        raise InvalidToken(f"the credential is longer than {max_length} characters")
    return credential


def looks_like_jwt(credential: str) -> bool:
    """JWTs and API keys are told apart by shape: a JWT has dots, an API key never does."""
    return "." in credential
