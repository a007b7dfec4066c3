"""The neutral result of checking a request, which each adapter translates."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from .client import Client
from .errors import AuthError

Header = tuple[str, str]

PROBLEM_TYPE = "https://github.com/m2m-middleware/m2m-middleware#error-"


class Allowed:
    """Let the request through. ``client`` is None on a public path.

    A plain slotted class rather than a frozen dataclass: one is made per
    request, and a frozen dataclass's ``__init__`` costs several times more.
    """

    __slots__ = ("client", "cost", "headers")
    allowed = True

    def __init__(
        self, client: Client | None, headers: list[Header] | None = None, cost: int = 1
    ) -> None:
        self.client = client
        self.headers = headers if headers is not None else []
        #: The cost units the request was charged (its route's ``cost``), for usage.
        self.cost = cost

    def __repr__(self) -> str:
        return f"Allowed(client={self.client!r}, headers={self.headers!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Allowed):
            return NotImplemented
        return self.client == other.client and self.headers == other.headers

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class Denied:
    """Answer with this response instead of calling the application."""

    status: int
    error: str
    headers: list[Header]
    body: bytes
    detail: str = ""
    #: Who was refused, when the credential was good (scope, limits, uses).
    client: Client | None = None
    #: Whose known credential was refused with a 401 (a revoked or expired key, a
    #: bad signature by a known key): for telemetry only, never an identity.
    tried: Client | None = None
    #: True when the refused request carried a credential over plain HTTP
    #: (``require_https``): the audit says so, so operators know to rotate it.
    credential_in_clear: bool = False

    allowed = False

    @property
    def content_type(self) -> str:
        return "application/problem+json"


@dataclass(frozen=True, slots=True)
class Served:
    """A response the middleware answers with itself (the token endpoint, the
    JWKS, the metadata): the same shape as :class:`Denied`, so each adapter
    writes both the one way."""

    status: int
    headers: list[Header]
    body: bytes = field(repr=False)  # a token response's: a bearer credential
    content_type: str = "application/json"
    #: The OAuth 2 error code of a refusal ("" when it succeeded), for the audit.
    error: str = ""

    allowed = False


#: What an adapter writes itself instead of calling the application.
Answer = Denied | Served

PUBLIC = Allowed(None)

#: On every problem response: a refusal is about one request and one credential,
#: so no cache may keep it (RFC 9111), and no browser may sniff it into HTML.
PROBLEM_HEADERS: tuple[Header, ...] = (
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
)

_ALL_STATUS_TEXT = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    429: "Too Many Requests",
    503: "Service Unavailable",
}


def status_line(status: int) -> str:
    return f"{status} {_ALL_STATUS_TEXT.get(status, '')}".rstrip()


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


#: RFC 6750 section 3: error_description holds only %x20-21 / %x23-5B / %x5D-7E.
_NOT_IN_DESCRIPTION = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")


def _description(detail: str) -> str:
    """A detail as RFC 6750 allows it in a header: whatever text went into it
    (a configured claim name, a future message), a response can never carry
    a CR/LF or a character outside latin-1 because of it."""
    return _NOT_IN_DESCRIPTION.sub("?", detail)


def challenge(realm: str, error: AuthError | None) -> str:
    """RFC 6750 section 3: no error code when no credentials were sent."""
    parts = [f'Bearer realm="{_quote(realm)}"']
    if error is not None:
        parts.append(f'error="{error.error}"')
        parts.append(f'error_description="{_description(error.detail)}"')
        if error.scopes:
            parts.append(f'scope="{_quote(" ".join(error.scopes))}"')
    return ", ".join(parts)


def deny(
    error: AuthError,
    realm: str,
    extra_headers: list[Header] | None = None,
    client: Client | None = None,
) -> Denied:
    """Turn an :class:`AuthError` into a problem+json response (RFC 9457)."""
    problem: dict[str, object] = {
        "type": PROBLEM_TYPE + error.error,
        "title": error.title,
        "status": error.status,
        "detail": error.detail,
        "error": error.error,
    }
    if error.scopes:
        problem["scope"] = " ".join(error.scopes)
    headers: list[Header] = []
    if error.status == 401 and error.bearer_challenge:
        is_missing = error.error == "missing_credentials"
        headers.append(("WWW-Authenticate", challenge(realm, None if is_missing else error)))
    elif error.error == "insufficient_scope":
        headers.append(("WWW-Authenticate", challenge(realm, error)))
    if extra_headers:
        headers.extend(extra_headers)
    headers.extend(PROBLEM_HEADERS)
    body = json.dumps(problem, separators=(",", ":")).encode()
    return Denied(error.status, error.error, headers, body, error.detail, client)
