"""``m2m demo``: the example API, running, and a walkthrough of its answers.

    m2m demo              # walk through, print curl lines, serve until Ctrl-C
    m2m demo --once       # walk through and exit: 0 when every answer was as expected
    m2m demo --port 8000 --host 127.0.0.1

The demo serves the same small API as ``example_apps/starlette_app.py`` (a
public ``/health``, ``/whoami`` for any client, ``/orders`` needing the scope
``orders:read``) under uvicorn, with the embedded defaults: keys in an SQLite
file in a temporary directory (removed at exit, so nothing is left behind) and
limits counted in memory, and the token service on (``POST /oauth/token``,
signing keys sealed with ``$M2M_SIGNING_SECRET`` or a secret made for the
run). It creates demo keys and signs a demo JWT, then makes real HTTP calls
over the socket and shows each answer: status, the headers that matter and
the problem body. The last steps exchange a key for a short-lived token, call
the API with the token, revoke the key and show the token refused.

Needs Starlette, uvicorn, authlib and cryptography: ``pip install "m2m-middleware[demo]"``.

Exit status: 0 when every step answered as expected (and after Ctrl-C while
serving), 1 when a step did not or the server could not start, 2 for bad
usage or missing packages, 130 when interrupted during the walkthrough.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any, TextIO

from .cli import parse_port
from .errors import ConfigError
from .settings import Settings
from .stores import KeyStore, open_key_store

if TYPE_CHECKING:
    import uvicorn
    from starlette.applications import Starlette

PROG = "m2m demo"
INSTALL_HINT = 'pip install "m2m-middleware[demo]"'

#: Requests per minute each client may make: small, so the burst is short.
LIMIT = 10
LIMITS = f"{LIMIT}/minute"
JWT_ISSUER = "m2m-demo"
JWT_AUDIENCE = "m2m-demo-api"
JWT_LIFETIME = 3600
#: Where the demo's own token service answers (CONTRACT.md "Token service").
TOKEN_PATH = "/oauth/token"  # noqa: S105 (a path, not a secret)
SIGNING_SECRET_VARIABLE = "M2M_SIGNING_SECRET"  # noqa: S105 (a name, not a secret)
START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
HTTP_TIMEOUT = 10.0
#: Headers shown under each step, in this order, when the answer has them.
SHOWN_HEADERS = ("WWW-Authenticate", "Retry-After", "RateLimit-Policy", "RateLimit")


class DemoError(Exception):
    """A failure to report as one ``m2m demo: error:`` line with this exit status."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _Stop(Exception):
    """SIGTERM while serving: stop as cleanly as after Ctrl-C."""


# -- the app ---------------------------------------------------------------------


def _require_packages() -> None:
    """Starlette, uvicorn and the issuer's packages are the ``demo`` extra; say how
    to get them."""
    for module in ("starlette", "uvicorn", "authlib", "cryptography"):
        try:
            __import__(module)
        except ImportError as exc:
            raise DemoError(
                f"the demo needs {module}, which is not installed: {INSTALL_HINT}", exit_code=2
            ) from exc


def build_settings(
    store: KeyStore, jwt_secret: str, *, issuer: str, signing_secret: str
) -> Settings:
    """The example app's settings, with JWTs accepted too, a short limit, and
    our own token service issuing as ``issuer``."""
    return Settings(
        schemes=("api_key", "jwt"),
        key_store=store,
        default_limits=LIMITS,
        rate_limit_storage="memory://",
        public_paths=("/health",),
        routes=({"path": "/orders*", "scopes": ["orders:read"]},),
        jwt_keys=jwt_secret,
        jwt_algorithms=("HS256",),
        jwt_issuer=JWT_ISSUER,
        jwt_audience=JWT_AUDIENCE,
        token_endpoint=TOKEN_PATH,
        token_issuer=issuer,
        signing_key_secret=signing_secret,
    )


def build_app(settings: Settings) -> Starlette:
    """The API of ``example_apps/starlette_app.py``: ``/health``, ``/whoami``, ``/orders``."""
    from starlette.applications import Starlette
    from starlette.authentication import requires
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from .client import Client
    from .starlette import M2MMiddleware

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

    @requires("orders:read")  # the route rule already demands it; belt and braces
    async def orders(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "client_id": request.user.client_id,
                "orders": [{"id": 1, "item": "widget", "qty": 3}],
            }
        )

    return Starlette(
        routes=[Route("/health", health), Route("/whoami", whoami), Route("/orders", orders)],
        middleware=[Middleware(M2MMiddleware, settings=settings)],
    )


def mint_jwt(secret: str, client_id: str, scopes: str, *, lifetime: int = JWT_LIFETIME) -> str:
    """An HS256 token such as an identity provider would issue to ``client_id``."""
    from joserfc import jwt
    from joserfc.jwk import OctKey

    now = int(time.time())
    claims = {
        "iss": JWT_ISSUER,
        "aud": JWT_AUDIENCE,
        "sub": client_id,
        "client_id": client_id,
        "scope": scopes,
        "iat": now,
        "exp": now + lifetime,
    }
    return jwt.encode({"alg": "HS256", "typ": "JWT"}, claims, OctKey.import_key(secret))


# -- the server ------------------------------------------------------------------


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound before uvicorn starts, so a taken port is one clear error."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise DemoError(f"--host: cannot use {host!r}: {reason}", exit_code=2) from None
    sock = socket.socket(family, kind, proto)
    try:
        if os.name != "nt":  # on Windows SO_REUSEADDR would let two servers share a port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        where = f"{_host_in_url(host)}:{port}"
        if exc.errno in (errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", -1)):
            raise DemoError(
                f"cannot listen on {where}: port {port} is already in use "
                "(pick another with --port N, or --port 0 for a free one)"
            ) from None
        raise DemoError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    return sock


def _host_in_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _connect_host(host: str) -> str:
    """Where to send requests: a wildcard address is reached on loopback."""
    if host in ("", "0.0.0.0"):  # noqa: S104 - compared, not bound
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


class BackgroundServer:
    """uvicorn in a daemon thread, serving one already-bound socket."""

    def __init__(self, app: Starlette, sock: socket.socket) -> None:
        import uvicorn

        config = uvicorn.Config(
            app,
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,
            loop="asyncio",
            http="h11",
            ws="none",
            timeout_graceful_shutdown=2,
        )
        self.server: uvicorn.Server = uvicorn.Server(config)
        self.sock = sock
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="m2m-demo-server", daemon=True)

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException as exc:  # reported by start(); a thread has nobody else to tell
            self.failure = exc

    def start(self, timeout: float = START_TIMEOUT) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                reason = f": {self.failure}" if self.failure and str(self.failure) else ""
                raise DemoError(f"the demo server failed to start{reason}")
            if time.monotonic() > deadline:
                raise DemoError(f"the demo server did not start within {timeout:g} s")
            time.sleep(0.01)

    def stop(self) -> None:
        if not self.thread.is_alive():
            return
        self.server.should_exit = True
        self.thread.join(STOP_TIMEOUT)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(STOP_TIMEOUT)

    def wait(self) -> None:
        """Block until the server stops (it does not by itself) or Ctrl-C."""
        while self.thread.is_alive():
            self.thread.join(0.5)


# -- HTTP ------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: Mapping[str, str]
    body: Any  # the decoded JSON, or the text when it is not JSON


def _headers(message: Any) -> dict[str, str]:
    found: dict[str, str] = {}
    for name in SHOWN_HEADERS:
        value = message.get(name)
        if value is not None:
            found[name] = str(value)
    return found


def _decode(raw: bytes) -> Any:
    text = raw.decode("utf-8", errors="replace")
    try:
        return json.loads(text)
    except ValueError:
        return text


class HTTP:
    """HTTP over a real socket with the standard library, never through a proxy."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def get(self, path: str, headers: Mapping[str, str]) -> Answer:
        return self.send("GET", path, headers)

    def send(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes | None = None
    ) -> Answer:
        url = self.base_url + path
        request = urllib.request.Request(  # noqa: S310
            url, data=body, headers=dict(headers), method=method
        )
        try:
            with self.opener.open(request, timeout=HTTP_TIMEOUT) as response:
                return Answer(response.status, _headers(response.headers), _decode(response.read()))
        except urllib.error.HTTPError as exc:  # 4xx and 5xx: the answers we came to see
            try:
                return Answer(exc.code, _headers(exc.headers), _decode(exc.read()))
            finally:
                exc.close()
        except (urllib.error.URLError, OSError) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            raise DemoError(f"{method} {url} failed: {reason}") from None


# -- the walkthrough -------------------------------------------------------------


@dataclass
class Step:
    title: str
    path: str
    credential: str  # how the request is authenticated, for people
    #: The request's headers, or a function that makes them when the step runs
    #: (from what an earlier step answered).
    headers: Mapping[str, str] | Callable[[], Mapping[str, str]]
    expect: int
    expect_error: str | None = None
    burst: bool = False
    before: Callable[[], None] | None = None
    method: str = "GET"
    body: bytes | None = None
    #: Reads the answer (say, to keep the token it holds) before it is shown.
    after: Callable[[Answer], None] | None = None
    #: Words the refusal's ``detail`` must hold: a 401 for another reason is no pass.
    expect_detail: str | None = None


@dataclass
class Result:
    step: Step
    answer: Answer
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        if self.answer.status != self.step.expect:
            return False
        if self.step.expect_error is None:
            return True
        body = self.answer.body
        if not isinstance(body, dict) or body.get("error") != self.step.expect_error:
            return False
        wanted = self.step.expect_detail
        return wanted is None or wanted in str(body.get("detail", ""))


@dataclass
class Demo:
    """What the walkthrough and the curl lines need: the keys, the token, the URL."""

    base_url: str
    store: KeyStore
    jwt_secret: str = field(repr=False)
    keys: dict[str, str] = field(default_factory=dict, repr=False)
    key_ids: dict[str, str] = field(default_factory=dict)
    token: str = field(default="", repr=False)
    #: The access token the token endpoint issued in the walkthrough.
    issued_token: str = field(default="", repr=False)

    def create_keys(self) -> None:
        for client_id, scopes in (
            ("demo-client", ["orders:read"]),
            ("no-scope-client", []),
            ("burst-client", ["orders:read"]),
            ("token-client", ["orders:read"]),
        ):
            issued = self.store.create_key(client_id, scopes=scopes, name="m2m demo")
            self.keys[client_id] = issued.key
            self.key_ids[client_id] = issued.record.key_id
        self.token = mint_jwt(self.jwt_secret, "demo-client", "orders:read")

    def steps(self) -> list[Step]:
        def key(client_id: str) -> dict[str, str]:
            return {"X-API-Key": self.keys[client_id]}

        def revoke() -> None:
            self.store.revoke_key(self.key_ids["burst-client"])

        def revoke_token_client() -> None:
            self.store.revoke_key(self.key_ids["token-client"])

        def bearer_issued() -> dict[str, str]:
            return {"Authorization": f"Bearer {self.issued_token}"}

        return [
            Step("public path, no credentials", "/health", "none", {}, 200),
            Step(
                "protected path, no credentials",
                "/orders",
                "none",
                {},
                401,
                "missing_credentials",
            ),
            Step(
                "API key with the scope orders:read",
                "/orders",
                "X-API-Key: demo-client's key",
                key("demo-client"),
                200,
            ),
            Step(
                "API key without the scope",
                "/orders",
                "X-API-Key: no-scope-client's key",
                key("no-scope-client"),
                403,
                "insufficient_scope",
            ),
            Step(
                "JWT bearer token (HS256)",
                "/whoami",
                "Authorization: Bearer <JWT for demo-client>",
                {"Authorization": f"Bearer {self.token}"},
                200,
            ),
            Step(
                f"burst past the limit ({LIMITS})",
                "/whoami",
                "X-API-Key: burst-client's key, repeated",
                key("burst-client"),
                429,
                "rate_limited",
                burst=True,
            ),
            Step(
                "revoked key",
                "/whoami",
                "X-API-Key: burst-client's key, just revoked",
                key("burst-client"),
                401,
                "invalid_token",
                before=revoke,
            ),
            Step(
                "exchange a key for a token",
                TOKEN_PATH,
                "Basic token-client's key_id:key",
                {
                    "Authorization": basic_auth(
                        self.key_ids["token-client"], self.keys["token-client"]
                    ),
                    "Content-Type": "application/x-www-form-urlencoded",
                },
                200,
                method="POST",
                body=b"grant_type=client_credentials&scope=orders%3Aread",
                after=self.keep_token,
            ),
            Step(
                "call with the token",
                "/orders",
                "Authorization: Bearer <the token>",
                bearer_issued,
                200,
            ),
            Step(
                "the token, its key revoked",
                "/orders",
                "Authorization: Bearer <the token>, token-client's key just revoked",
                bearer_issued,
                401,
                "invalid_token",
                before=revoke_token_client,
                expect_detail="revoked",
            ),
        ]

    def keep_token(self, answer: Answer) -> None:
        """Keep the issued token for the next steps; show only its start."""
        body = answer.body
        if answer.status != 200 or not isinstance(body, dict):
            return
        token = body.get("access_token")
        if isinstance(token, str):
            self.issued_token = token
            body["access_token"] = f"{token[:12]}... ({len(token)} characters)"


def basic_auth(client_id: str, secret: str) -> str:
    """``client_secret_basic`` (RFC 6749 2.3.1: each part form-encoded, then base64)."""
    from urllib.parse import quote

    pair = f"{quote(client_id, safe='')}:{quote(secret, safe='')}"
    return "Basic " + b64encode(pair.encode()).decode("ascii")


def run_step(step: Step, http: HTTP, out: Output) -> Result:
    if step.before is not None:
        step.before()
    headers = step.headers() if callable(step.headers) else step.headers
    if not step.burst:
        answer = http.send(step.method, step.path, headers, step.body)
        if step.after is not None:
            step.after(answer)
        return Result(step, answer)
    # The long step: one request after another until the limit refuses one.
    progress = out.progress("burst: ")
    answer = http.get(step.path, headers)
    sent = 1
    while answer.status == 200 and sent < LIMIT * 3:
        progress.tick()
        answer = http.get(step.path, headers)
        sent += 1
    progress.done(f" {answer.status} on request {sent}")
    allowed = sent - 1
    note = f"{allowed} requests answered 200, then request {sent} got {answer.status}"
    return Result(step, answer, [note])


# -- output ----------------------------------------------------------------------


def _isatty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (OSError, ValueError):
        return False


def _use_color() -> bool:
    """https://no-color.org: any non-empty NO_COLOR turns colours off."""
    return not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def _printable(value: str) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in value)


class Progress:
    """Dots as requests go out. On a terminal the line is erased once the step is done
    (its row says what happened); in a log it stays."""

    def __init__(self, out: Output, label: str) -> None:
        self.out = out
        out.write("    " + out.style(label, "2"))

    def tick(self) -> None:
        self.out.write(".")

    def done(self, text: str) -> None:
        if self.out.interactive:
            self.out.write("\r\x1b[K")
        else:
            self.out.write(text + "\n")


class Output:
    """Plain text, as wide as the terminal; colours only on a terminal without NO_COLOR."""

    LABEL_WIDTH = 18

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.interactive = _isatty(self.stream)
        self.color = self.interactive and _use_color()
        columns = shutil.get_terminal_size((100, 24)).columns
        self.width = max(60, min(columns, 120))

    def write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def line(self, text: str = "") -> None:
        self.write(text + "\n")

    def style(self, text: str, *codes: str) -> str:
        if not self.color or not codes:
            return text
        return f"\x1b[{';'.join(codes)}m{text}\x1b[0m"

    def progress(self, label: str) -> Progress:
        return Progress(self, label)

    def field(self, label: str, value: str, indent: int = 5) -> None:
        """``label  value``, the value wrapped under itself."""
        room = max(20, self.width - indent - self.LABEL_WIDTH)
        lines = textwrap.wrap(
            _printable(value), room, break_long_words=True, break_on_hyphens=False
        ) or [""]
        pad = " " * indent
        self.line(pad + self.style(label.ljust(self.LABEL_WIDTH), "2") + lines[0])
        for more in lines[1:]:
            self.line(pad + " " * self.LABEL_WIDTH + more)


_TABLE_HEAD = ("#", "STEP", "EXPECTED", "GOT", "RESULT")


def _status_style(status: int) -> tuple[str, ...]:
    return ("32",) if status < 400 else ("33",) if status < 500 else ("31",)


def print_intro(out: Output, demo: Demo, store_label: str) -> None:
    out.field("API", f"{demo.base_url}  (the Starlette example under uvicorn)", indent=2)
    out.field("key store", store_label, indent=2)
    out.field("limits", f"{LIMITS} per client, counted in memory", indent=2)
    out.field(
        "API keys",
        "demo-client (orders:read), no-scope-client (no scopes), burst-client (orders:read)",
        indent=2,
    )
    out.field(
        "JWT",
        f"HS256 with a secret made for this run; iss={JWT_ISSUER}, aud={JWT_AUDIENCE}, "
        "client_id=demo-client, scope=orders:read",
        indent=2,
    )
    out.field(
        "token service",
        f"POST {TOKEN_PATH} (OAuth 2 client credentials) issues ES256 access tokens "
        f"for token-client's key (orders:read); iss={demo.base_url}",
        indent=2,
    )
    out.line()


def _step_width(out: Output) -> int:
    fixed = 2 + 2 + 2 + 8 + 2 + 3 + 2 + 10  # "#", EXPECTED, GOT, RESULT and the gaps
    return max(20, min(38, out.width - fixed))


def print_table_head(out: Output) -> None:
    width = _step_width(out)
    number, step, expected, got, verdict = _TABLE_HEAD
    head = f"{number:>2}  {step:<{width}}  {expected:<8}  {got:<3}  {verdict}"
    out.line(out.style(head, "1"))


def print_result(out: Output, number: int, result: Result) -> None:
    step, answer = result.step, result.answer
    width = _step_width(out)
    title = step.title if len(step.title) <= width else step.title[: width - 3] + "..."
    got = out.style(f"{answer.status:<3}", *_status_style(answer.status))
    verdict = out.style("OK", "32") if result.ok else out.style("UNEXPECTED", "1", "31")
    out.line(f"{number:>2}  {title:<{width}}  {step.expect:<8}  {got}  {verdict}")
    out.field("request", f"{step.method} {step.path}   credentials: {step.credential}")
    for note in result.notes:
        out.field("progress", note)
    for name, value in answer.headers.items():
        out.field(name, value)
    body = answer.body
    if isinstance(body, dict) and "error" in body:
        # problem+json says `detail`; an OAuth 2 error (the token endpoint) `error_description`.
        detail = body.get("detail", body.get("error_description", ""))
        out.field("problem", f"{body.get('error')}: {detail}")
    elif body not in (None, ""):
        text = json.dumps(body, separators=(", ", ": ")) if not isinstance(body, str) else body
        out.field("body", text)
    if not result.ok:
        expected = f"{step.expect}" + (f" {step.expect_error}" if step.expect_error else "")
        if step.expect_detail:
            expected += f" ({step.expect_detail})"
        out.field("expected", expected)
    out.line()


def print_curl_lines(out: Output, demo: Demo) -> None:
    base = demo.base_url
    demo_key = demo.keys["demo-client"]
    out.line(
        out.style("Try it yourself", "1")
        + " (the keys and the token work until you stop the demo):"
    )
    out.line()
    lines = [
        ("200, no key needed", f"curl -i {base}/health"),
        ("200", f'curl -i -H "X-API-Key: {demo_key}" {base}/whoami'),
        ("200", f'curl -i -H "X-API-Key: {demo_key}" {base}/orders'),
        ("401", f"curl -i {base}/orders"),
        ("403", f'curl -i -H "X-API-Key: {demo.keys["no-scope-client"]}" {base}/orders'),
        ("200, scheme jwt", f'curl -i -H "Authorization: Bearer {demo.token}" {base}/whoami'),
        (
            "200: a short-lived token for demo-client's key; then send it as "
            "Authorization: Bearer <access_token>",
            f'curl -i -u "{demo.key_ids["demo-client"]}:{demo_key}" '
            f"-d grant_type=client_credentials {base}{TOKEN_PATH}",
        ),
        (
            f"429 once demo-client has made {LIMIT} requests in a minute",
            f"for i in $(seq {LIMIT + 2}); do curl -s -o /dev/null -w '%{{http_code}}\\n' "
            f'-H "X-API-Key: {demo_key}" {base}/whoami; done',
        ),
    ]
    for comment, command in lines:
        out.line(out.style(f"  # {comment}", "2"))
        out.line(f"  {command}")
    out.line()


# -- main ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run the Starlette example API with demo keys and a JWT, walk through "
        "its answers over real HTTP, then serve it until Ctrl-C.",
    )
    parser.add_argument(
        "--once", action="store_true", help="run the walkthrough and exit (0 when all went well)"
    )
    parser.add_argument(
        "--port",
        type=parse_port,
        default=0,
        metavar="N",
        help="port to listen on (default: a free one)",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)"
    )
    parser.add_argument(
        "--store",
        metavar="URL",
        help="key store for the demo keys (default: an SQLite file in a temporary directory, "
        "removed at exit); demo keys created in a store you name stay there, and so do "
        f"its signing keys, sealed with ${SIGNING_SECRET_VARIABLE} (or with a secret made for "
        "the run: set it to use one store twice)",
    )
    return parser


def _open_store(url: str | None, stack: contextlib.ExitStack) -> tuple[KeyStore, str]:
    if url is None:
        directory = stack.enter_context(
            tempfile.TemporaryDirectory(prefix="m2m-demo-", ignore_cleanup_errors=True)
        )
        url = "sqlite:///" + os.path.join(directory, "demo_keys.db")
        label = "SQLite, in a temporary file removed at exit"
    else:
        label = url
    try:
        store = open_key_store(url)
    except ConfigError as exc:
        problem = exc.problem if exc.field == "key_store" else str(exc)
        raise DemoError(f"--store: {problem}", exit_code=2) from None
    stack.callback(store.close)
    # The usage counted during the run is written now, while the store (and its
    # temporary directory) is still there: the flush at process exit would be too late.
    stack.callback(_write_usage)
    return store, label


def _write_usage() -> None:
    from .telemetry.usage import _flush_at_exit

    _flush_at_exit()


def _first_signing_key(settings: Settings, store: KeyStore) -> None:
    """Make (or open) the issuer's signing key before the API starts, as a deployment
    has one before its clients come: a store whose keys were sealed with another
    secret is one clear error now, not a 503 in the middle of the walkthrough."""
    from .issuer import signing_keys_for

    try:
        signing_keys_for(settings, store=store).current_signing_key()
    except ConfigError as exc:
        raise DemoError(
            f"--store: its signing keys cannot be opened ({exc.problem}); set "
            f"{SIGNING_SECRET_VARIABLE} to the secret they were made with",
            exit_code=2,
        ) from None


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """While serving in the main thread, SIGTERM stops the demo like Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: FrameType | None) -> None:
        raise _Stop

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace, out: Output) -> int:
    _require_packages()
    with contextlib.ExitStack() as stack:
        store, store_label = _open_store(args.store, stack)
        sock = _listen(args.host, args.port)
        stack.callback(sock.close)
        port = sock.getsockname()[1]
        base_url = f"http://{_host_in_url(_connect_host(args.host))}:{port}"
        demo = Demo(base_url, store, secrets.token_urlsafe(48))
        signing_secret = os.environ.get(SIGNING_SECRET_VARIABLE) or secrets.token_urlsafe(32)
        try:
            settings = build_settings(
                store, demo.jwt_secret, issuer=base_url, signing_secret=signing_secret
            )
        except ConfigError as exc:  # the issuer extra missing, say
            raise DemoError(str(exc), exit_code=2) from None
        _first_signing_key(settings, store)
        app = build_app(settings)

        out.line(out.style("m2m-middleware demo", "1"))
        out.line()
        out.write("Starting the API ... ")
        started = time.monotonic()
        server = BackgroundServer(app, sock)
        stack.callback(server.stop)
        try:
            server.start()
        except DemoError:
            out.line("failed")
            raise
        out.line(f"ready in {time.monotonic() - started:.1f} s")
        out.line()

        demo.create_keys()
        print_intro(out, demo, store_label)
        out.line(out.style("Walkthrough", "1") + ": real HTTP calls to the running API")
        out.line()
        print_table_head(out)
        http = HTTP(base_url)
        results = []
        for number, step in enumerate(demo.steps(), start=1):
            result = run_step(step, http, out)
            results.append(result)
            print_result(out, number, result)

        failed = [(n, r) for n, r in enumerate(results, start=1) if not r.ok]
        if failed:
            summary = "; ".join(
                f"step {n} expected {r.step.expect}, got {r.answer.status}" for n, r in failed
            )
            out.line(out.style(f"{len(failed)} of {len(results)} steps UNEXPECTED", "1", "31"))
            print(f"{PROG}: error: the walkthrough went wrong: {summary}", file=sys.stderr)
        else:
            out.line(out.style(f"All {len(results)} steps answered as expected.", "1", "32"))
        out.line()
        if args.once:
            return 1 if failed else 0

        print_curl_lines(out, demo)
        try:
            with _stop_on_sigterm():
                out.line(f"Serving on {base_url} - press Ctrl-C to stop.")
                server.wait()
        except (KeyboardInterrupt, _Stop):
            out.line()
            out.line("Stopping the demo ...")
        else:
            raise DemoError("the demo server stopped unexpectedly")
        # The ExitStack stops the server, closes the store and removes the temp dir.
    if args.store is None:
        out.line("Stopped; the temporary key store with the demo keys is gone.")
    else:
        out.line(f"Stopped; the demo keys stay in {args.store}.")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Output()
    try:
        return _run(args, out)
    except DemoError as exc:
        text = " ".join(str(exc).split())
        print(f"{PROG}: error: {text}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
