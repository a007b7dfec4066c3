"""The token service's three endpoints: token, JWKS and metadata (CONTRACT.md "Token service").

``POST <token_endpoint>`` is authlib's framework-neutral
:class:`~authlib.oauth2.rfc6749.AuthorizationServer` with its
:class:`~authlib.oauth2.rfc6749.grants.ClientCredentialsGrant`, fed from our
:class:`~m2m_middleware.request_view.RequestView` and answering our neutral
:class:`~m2m_middleware.outcome.Served`, so that every adapter writes it the
way it writes a denial. What is ours, and why:

- Client authentication: ``client_secret_basic`` and ``client_secret_post``
  are registered into authlib's registry as functions of our own. authlib's
  Basic parser decodes base64 leniently and raises ``UnicodeDecodeError`` (a
  500) on a header that is not UTF-8; ours refuses both with ``invalid_client``
  and verifies the secret as an API key through the engine (cache, store,
  expiry, revocation) rather than comparing a stored secret.
- The access token: authlib's ``JWTBearerTokenGenerator`` signs with one
  ``alg`` fixed when it is made, through joserfc's default registry (which
  warns on every EdDSA token) and writes no ``kid``; our signing keys carry
  their own algorithm and ``kid`` across rotations, so the token is built
  here with the RFC 9068 claims and signed by
  :meth:`~m2m_middleware.issuer.signing_keys.SigningKey.sign`. authlib's
  :class:`~authlib.oauth2.rfc6750.BearerTokenGenerator` still makes the
  response (``token_type``, ``expires_in``, ``scope``).
- The form: parsed here (duplicates, size, encoding are refused as
  ``invalid_request``, RFC 6749 section 3.2), then handed to authlib as its
  payload.
"""

from __future__ import annotations

import binascii
import hmac
import json
import logging
import math
import secrets
import time
from base64 import b64decode
from collections.abc import Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import parse_qsl, unquote

# authlib ships no type information (no py.typed): its classes are Any here,
# which is why the classes below that subclass them carry ``type: ignore[misc]``.
from authlib.oauth2.rfc6749 import (  # type: ignore[import-untyped]
    AuthorizationServer,
    ClientMixin,
    OAuth2Request,
)
from authlib.oauth2.rfc6749.errors import (  # type: ignore[import-untyped]
    InvalidClientError,
    InvalidScopeError,
    OAuth2Error,
)
from authlib.oauth2.rfc6749.grants import ClientCredentialsGrant  # type: ignore[import-untyped]
from authlib.oauth2.rfc6749.hooks import hooked  # type: ignore[import-untyped]
from authlib.oauth2.rfc6749.requests import BasicOAuth2Payload  # type: ignore[import-untyped]
from authlib.oauth2.rfc6750 import BearerTokenGenerator  # type: ignore[import-untyped]

from ..audit import audit
from ..audit import write as _audit
from ..credentials import looks_like_jwt
from ..errors import AuthError, StoreUnavailable, TemporarilyUnavailable
from ..limiting import StorageDown
from ..outcome import Allowed, Denied, Served, _description
from ..syntax import check_scope
from ..transport import address_in

if TYPE_CHECKING:
    from ..engine import Engine, _CachedKey
    from ..request_view import RequestView
    from .signing_keys import SigningKey

logger = logging.getLogger("m2m_middleware")

JWKS_PATH = "/.well-known/jwks.json"
METADATA_PATH = "/.well-known/oauth-authorization-server"
AUTH_METHODS = ("client_secret_basic", "client_secret_post")
GRANT_TYPE = "client_credentials"
#: A token request has a handful of fields; far more is not one.
MAX_FORM_FIELDS = 16
#: On every answer of the token endpoint: RFC 6749 5.1's no-store (and Pragma),
#: and nosniff, as every other refusal of the middleware has (outcome.PROBLEM_HEADERS).
_NO_STORE = [
    ("Cache-Control", "no-store"),
    ("Pragma", "no-cache"),
    ("X-Content-Type-Options", "nosniff"),
]
#: The credentials that must never come in the query string (where logs keep them).
_SECRET_FIELDS = ("client_secret", "client_assertion")


def _text(description: str) -> str:
    """An error description as RFC 6749 section 5.2 allows it (authlib raises on any other)."""
    return _description(description)


#: The client address of the token request being answered (as trusted proxies
#: report it), for verify_key, which authlib calls without the request view.
_CLIENT_ADDRESS: ContextVar[str | None] = ContextVar("m2m_token_client_address", default=None)


class _Refusal(OAuth2Error):  # type: ignore[misc]
    """An answer of ours that RFC 6749 has no code for: limits, uses, outages."""

    def __init__(
        self, error: str, status: int, description: str, headers: list[tuple[str, str]]
    ) -> None:
        super().__init__(description=_text(description), status_code=status)
        self.error = error
        self._extra = headers

    def get_headers(self) -> list[tuple[str, str]]:
        return [*super().get_headers(), *self._extra]


class _InvalidClient(InvalidClientError):  # type: ignore[misc]
    """401 with ``WWW-Authenticate: Basic realm=...`` (RFC 6749 5.2, RFC 7617 needs the realm)."""

    status_code = 401

    def __init__(self, description: str, realm: str) -> None:
        super().__init__(description=_text(description), status_code=401)
        self._realm = realm

    def get_headers(self) -> list[tuple[str, str]]:
        headers = [h for h in OAuth2Error.get_headers(self) if h[0] != "WWW-Authenticate"]
        challenge = f'Basic realm="{self._realm}", error="invalid_client"'
        headers.append(("WWW-Authenticate", challenge))
        return headers


class _KeyClient(ClientMixin):  # type: ignore[misc]
    """An OAuth 2 client as authlib sees one: an API key, its ``key_id`` the client id.

    Nothing is known about it until :meth:`check_client_secret` has verified
    the key: a client id alone reveals nothing (no lookup, no answer that
    differs for a key id that exists).
    """

    def __init__(self, service: TokenService, client_id: str) -> None:
        self.service = service
        self.client_id = client_id
        self.entry: _CachedKey | None = None
        #: The issued token's lifetime, set when it is signed (``expires_in``).
        self.expires_in = 0
        #: The key that signs its token, read before the client is charged anything.
        self.signer: SigningKey | None = None

    def get_client_id(self) -> str:
        return self.client_id

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return endpoint == "token" and method in AUTH_METHODS

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == GRANT_TYPE

    def check_client_secret(self, client_secret: str) -> bool:
        self.entry = self.service.verify_key(self.client_id, client_secret)
        return True

    @property
    def key_scopes(self) -> frozenset[str]:
        assert self.entry is not None
        return self.entry.client.scopes

    def get_allowed_scope(self, scope: str | None) -> str:
        """The token's scope: the requested one (already checked), else all the key's."""
        if scope:
            return " ".join(dict.fromkeys(scope.split()))
        return " ".join(sorted(self.key_scopes))


class _ClientCredentials(ClientCredentialsGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS: ClassVar[list[str]] = list(AUTH_METHODS)

    def validate_requested_scope(self) -> None:
        """``scope`` narrows to a subset of the key's scopes; anything else is invalid_scope."""
        scope = self.request.payload.scope
        if not scope:
            return
        client: _KeyClient = self.request.client
        requested = scope.split(" ")
        for name in requested:
            try:
                check_scope(name)
            except ValueError:
                raise InvalidScopeError(
                    description="scope is a space-separated list of scope tokens (RFC 6749 3.3)"
                ) from None
        missing = sorted(set(requested) - client.key_scopes)
        if missing:
            raise InvalidScopeError(
                description=_text(f"this key does not hold the scope(s): {' '.join(missing)}")
            )

    def validate_token_request(self) -> None:
        super().validate_token_request()
        client: _KeyClient = self.request.client
        service: TokenService = self.server.service
        # The signing key before the use and the token_limits charge: a key that
        # cannot be read or unsealed (a store outage, a wrong signing_key_secret)
        # is a 503 that must cost the client nothing, or each retry it invites
        # would spend a use of a usage-limited key (tests/redteam).
        client.signer = service.signing_keys.current_signing_key()
        service.admit(client)

    @hooked  # type: ignore[untyped-decorator]
    def create_token_response(self) -> tuple[int, dict[str, Any], list[tuple[str, str]]]:
        """authlib's own, less its DEBUG record ``Issue token %r``, which holds the
        whole response: the access token is a bearer credential, and a DEBUG log
        is still a log (tests/conformance/test_token_secrecy_conformance.py)."""
        token = self.generate_token(scope=self.request.payload.scope, include_refresh_token=False)
        self.save_token(token)
        return 200, token, self.TOKEN_RESPONSE_HEADER


class _Server(AuthorizationServer):  # type: ignore[misc]
    def __init__(self, service: TokenService) -> None:
        super().__init__()
        self.service = service
        self.register_grant(_ClientCredentials)
        self.register_client_auth_method("client_secret_basic", service.authenticate_basic)
        self.register_client_auth_method("client_secret_post", service.authenticate_post)
        self.register_token_generator(
            "default",
            BearerTokenGenerator(
                access_token_generator=service.access_token,
                # What access_token gave this token (never past its key's end).
                expires_generator=lambda client, grant_type: client.expires_in,
            ),
        )

    def authenticate_client(
        self, request: OAuth2Request, methods: list[str], endpoint: str = "token"
    ) -> _KeyClient:
        try:
            client: _KeyClient = super().authenticate_client(request, methods, endpoint)
        except _InvalidClient:
            raise
        except InvalidClientError:  # no method found credentials: authlib's words are a repr
            raise _InvalidClient(
                "authenticate with HTTP Basic (key_id:API key) or with client_id and "
                "client_secret in the form",
                self.service.realm,
            ) from None
        return client

    def query_client(self, client_id: str) -> _KeyClient:
        return _KeyClient(self.service, client_id)

    def create_oauth2_request(self, request: OAuth2Request) -> OAuth2Request:
        return request  # built from our RequestView already (TokenService._token)

    def save_token(self, token: dict[str, Any], request: OAuth2Request) -> None:
        """Nothing to keep: the token is verified by its signature, and refused
        by its key's revocation."""

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        """No signal system here (authlib's framework integrations have one)."""

    def handle_response(self, status: int, body: Any, headers: list[tuple[str, str]]) -> Served:
        if status == 200 and isinstance(body, dict):
            body.setdefault("scope", "")  # CONTRACT: the granted scope, even when empty
        error = body.get("error", "") if isinstance(body, dict) else ""
        shown = [(n, v) for n, v in headers if n.lower() != "content-type"]
        shown.append(("X-Content-Type-Options", "nosniff"))  # authlib's carry no-store only
        return Served(
            status, shown, json.dumps(body, separators=(",", ":")).encode(), error=str(error)
        )


class TokenService:
    """Answers the token endpoint, the JWKS and the metadata for one engine."""

    def __init__(self, engine: Engine) -> None:
        settings = engine.settings
        assert settings.token_endpoint is not None and settings.token_issuer is not None
        assert engine.signing_keys is not None
        self.engine = engine
        self.settings = settings
        self.signing_keys = engine.signing_keys
        self.token_path = settings.token_endpoint
        self.issuer = settings.token_issuer
        self.audience = settings.token_audience or settings.token_issuer
        self.realm = settings.realm
        self.paths = frozenset({self.token_path, JWKS_PATH, METADATA_PATH})
        self._server = _Server(self)
        # The issuer's path is where the app is served (a mount, a proxy prefix:
        # "https://example.com/api"), so the endpoints' URLs are under it too.
        base = self.issuer.rstrip("/")
        scopes = sorted({s for route in settings.route_rules for s in route.scopes})
        metadata: dict[str, Any] = {
            "issuer": self.issuer,
            "token_endpoint": base + self.token_path,
            "jwks_uri": base + JWKS_PATH,
            "grant_types_supported": [GRANT_TYPE],
            "token_endpoint_auth_methods_supported": list(AUTH_METHODS),
            "response_types_supported": [],
        }
        if scopes:
            metadata["scopes_supported"] = scopes
        self._metadata = json.dumps(metadata, separators=(",", ":")).encode()
        self._cache_control = [("Cache-Control", f"public, max-age={settings.jwks_max_age}")]
        #: Called with each answer of the token endpoint (the engine's metrics count
        #: tokens issued and refused); it must not raise. None: nobody is counting.
        self.on_token: Callable[[Served], None] | None = None

    # -- dispatch -------------------------------------------------------------

    def serve(self, view: RequestView) -> Served:
        """The answer for one of :attr:`paths`. Never raises for anything a client sent."""
        served = self._serve(view)
        if self.on_token is not None and view.path == self.token_path:
            self.on_token(served)
        return served

    def _serve(self, view: RequestView) -> Served:
        path = view.path
        try:
            if path == self.token_path:
                if view.method != "POST":
                    return _method_not_allowed("POST", "the token endpoint takes POST")
                return self._token(view)
            if view.method not in ("GET", "HEAD"):
                return _method_not_allowed("GET, HEAD", "this endpoint takes GET")
            if path == JWKS_PATH:
                served = self._jwks()
            else:
                served = Served(200, list(self._cache_control), self._metadata)
        except StoreUnavailable as exc:
            self.engine._store_failed(exc)
            return _unavailable("the key store cannot be reached; try again shortly")
        except Exception as exc:  # a signing key that cannot be read or made: never a 500
            # ConfigError (a wrong signing_key_secret), a database error: the
            # operator's to fix, so logged once per request, without the text of
            # the request or the key, and answered as an outage.
            logger.error("the token service cannot sign: %s", type(exc).__name__)
            return _unavailable("the token service cannot sign tokens right now")
        if view.method == "HEAD":
            return Served(served.status, served.headers, b"", served.content_type)
        return served

    def _jwks(self) -> Served:
        keys = self.signing_keys
        jwks = keys.public_jwks()
        if not jwks["keys"]:
            keys.current_signing_key()  # a new database: its first key, published at once
            jwks = keys.public_jwks()
        body = json.dumps(jwks, separators=(",", ":")).encode()
        return Served(200, list(self._cache_control), body, "application/jwk-set+json")

    def _token(self, view: RequestView) -> Served:
        # verify_key, called from inside authlib, checks a key's allowed_cidrs against it.
        reset = _CLIENT_ADDRESS.set(view.client_address)
        try:
            return self._token_response(view)
        finally:
            _CLIENT_ADDRESS.reset(reset)

    def _token_response(self, view: RequestView) -> Served:
        if view.body is None:
            return _invalid_request("the token request is too large", 413)
        content_type = (view.header("content-type") or "").partition(";")[0].strip().lower()
        if content_type != "application/x-www-form-urlencoded":
            return _invalid_request(
                "send the token request as application/x-www-form-urlencoded (RFC 6749 4.4.2)"
            )
        if view.query and any(
            name in _SECRET_FIELDS for name, _ in parse_qsl(view.query, keep_blank_values=True)
        ):
            return _invalid_request("credentials are never accepted in the query string")
        try:
            pairs = parse_qsl(
                view.body.decode("utf-8"),
                keep_blank_values=True,
                strict_parsing=False,
                max_num_fields=MAX_FORM_FIELDS,
                errors="strict",
            )
        except (UnicodeDecodeError, ValueError):
            return _invalid_request("the token request is not a valid UTF-8 form")
        form = dict(pairs)
        if len(form) != len(pairs):
            return _invalid_request("a parameter is repeated (RFC 6749 section 3.2)")
        grant_type = form.get("grant_type")
        if not grant_type:
            return _invalid_request("grant_type is missing")
        if grant_type != GRANT_TYPE:
            # authlib answers this too, with no description; ours says what is.
            body = _error_body("unsupported_grant_type", "grant_type must be client_credentials")
            return Served(400, list(_NO_STORE), body, error="unsupported_grant_type")
        if "client_secret" in form and view.header("authorization") is not None:
            return _invalid_request("use one client authentication method, not two")
        request = OAuth2Request(
            "POST",
            # authlib refuses an http:// URL unless AUTHLIB_INSECURE_TRANSPORT is
            # set; the transport policy is the middleware's (require_https), and
            # this URL is only what authlib is told.
            "https://token-endpoint.invalid" + self.token_path,
            headers=view.headers,
        )
        request.payload = BasicOAuth2Payload(form)
        served: Served = self._server.create_token_response(request)
        client = request.client if isinstance(request.client, _KeyClient) else None
        if audit.isEnabledFor(logging.INFO):
            self._audit(served, view, client)
        return served

    def _audit(self, served: Served, view: RequestView, client: _KeyClient | None) -> None:
        who = client.entry.client if client is not None and client.entry is not None else None
        if served.status == 200:
            _audit(Allowed(who), view.method, view.path)
        else:
            refused = Denied(served.status, served.error or "invalid_request", [], b"", "", who)
            _audit(refused, view.method, view.path)

    # -- client authentication (registered into authlib) -----------------------

    def authenticate_basic(self, query_client: Any, request: OAuth2Request) -> _KeyClient | None:
        header = request.headers.get("authorization")
        if header is None:
            return None
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "basic":
            raise _InvalidClient(
                "the token endpoint takes HTTP Basic or form credentials", self.realm
            )
        try:
            decoded = b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            raise _InvalidClient(
                "the Basic credentials are not valid base64 UTF-8", self.realm
            ) from None
        client_id, colon, secret = decoded.partition(":")
        if not colon:
            raise _InvalidClient("the Basic credentials hold no client secret", self.realm)
        # RFC 6749 2.3.1: both are form-urlencoded before Basic encoding.
        client_id = unquote(client_id)
        named = request.payload.data.get("client_id")
        if named is not None and named != client_id:
            raise _InvalidClient("client_id in the form is not the one in Basic", self.realm)
        client: _KeyClient = query_client(client_id)
        client.check_client_secret(unquote(secret))
        return client

    def authenticate_post(self, query_client: Any, request: OAuth2Request) -> _KeyClient | None:
        form = request.payload.data
        client_id, secret = form.get("client_id"), form.get("client_secret")
        if not client_id and not secret:
            return None
        if not client_id or not secret:
            raise _InvalidClient("send both client_id and client_secret", self.realm)
        client: _KeyClient = query_client(client_id)
        client.check_client_secret(secret)
        return client

    def verify_key(self, client_id: str, secret: str) -> _CachedKey:
        """The API key ``secret``, verified as a request's would be; it must be ``client_id``'s."""
        refused = "the client id and secret are not a live API key"
        if looks_like_jwt(secret):
            raise _InvalidClient("the client secret is an API key, not a token", self.realm)
        try:
            entry = self.engine.key_entry(secret)
        except TemporarilyUnavailable as exc:
            raise _Refusal("temporarily_unavailable", 503, exc.detail, _retry_after()) from None
        except AuthError:
            raise _InvalidClient(refused, self.realm) from None
        record = entry.record
        if record is None or not hmac.compare_digest(
            record.key_id.encode(), client_id.encode("utf-8", "surrogatepass")
        ):
            raise _InvalidClient(refused, self.realm)
        if entry.dead_at <= time.time():
            reason = "was revoked" if record.revoked_at is not None else "has expired"
            raise _InvalidClient(f"the API key {reason}", self.realm)
        networks = entry.networks
        if networks is not None and not address_in(_CLIENT_ADDRESS.get(), networks):
            # A token would let the key's holder work from anywhere: none is issued.
            raise _InvalidClient("this key may not be used from this address", self.realm)
        return entry

    # -- what a verified client is charged --------------------------------------

    def admit(self, client: _KeyClient) -> None:
        """Take a use (a usage-limited key), then charge ``token_limits``: both or neither.

        The engine's own steps and outage policy (``_use_fallback``, ``_note_uses``,
        ``_limits_down``), as a request's; only their refusals are spelled in OAuth's way.
        """
        engine = self.engine
        entry = client.entry
        assert entry is not None and entry.record is not None
        key_id = entry.record.key_id
        took_use = False
        limiter = engine.limiter
        try:
            if entry.record.remaining_uses is not None:
                try:
                    left = engine.store.take_use(key_id)
                except StoreUnavailable as exc:
                    left = engine._use_fallback(exc)
                else:
                    took_use = left is not None
                engine._note_uses(entry, left)
            try:
                charge = limiter.charge(limiter.token_plan, entry.client.client_id, 1)
            except StorageDown:
                if took_use and not engine._allow_on_outage:
                    engine._return_use(key_id)
                charge = engine._limits_down()
        except AuthError as error:  # QuotaExceeded, TemporarilyUnavailable
            extra = _retry_after() if isinstance(error, TemporarilyUnavailable) else []
            raise _Refusal(error.error, error.status, error.detail, extra) from None
        if not charge.allowed:
            if took_use:
                engine._return_use(key_id)
            raise _Refusal(
                "rate_limited",
                429,
                f"too many token requests; retry in {charge.retry_after} second(s)",
                charge.headers,
            )

    # -- the token ------------------------------------------------------------

    def access_token(self, client: _KeyClient, grant_type: str, user: Any, scope: str) -> str:
        """An RFC 9068 access token for ``client``'s key, signed with the current key."""
        entry = client.entry
        assert entry is not None and entry.record is not None
        record = entry.record
        # The keys' clock: the key is chosen for this instant, and a token must
        # not outlive the publication its key's retirement was computed from.
        now = int(self.signing_keys.clock())
        # Never past the key's own end (expiry, or the end of a rotation's
        # grace): our engine caps a token there, but a service that trusts us
        # through the JWKS can only read exp, and the key would live on there.
        exp = now + self.settings.token_ttl
        if entry.dead_at < exp:  # dead_at is inf for a key that never ends
            exp = math.floor(entry.dead_at)
        if exp <= now:
            raise _InvalidClient("the API key has expired", self.realm)
        client.expires_in = exp - now
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": record.client_id,
            "client_id": record.client_id,
            "aud": self.audience,
            "exp": exp,
            "iat": now,
            "jti": secrets.token_urlsafe(16),
            "scope": scope,
            "key_id": record.key_id,
        }
        if record.tier is not None:
            claims["tier"] = record.tier
        assert client.signer is not None  # validate_token_request read it
        return client.signer.sign(claims)


def _retry_after() -> list[tuple[str, str]]:
    from ..engine import OUTAGE_RETRY_AFTER

    return [("Retry-After", str(OUTAGE_RETRY_AFTER))]


def _error_body(error: str, description: str) -> bytes:
    body = {"error": error, "error_description": _text(description)}
    return json.dumps(body, separators=(",", ":")).encode()


def _invalid_request(description: str, status: int = 400) -> Served:
    body = _error_body("invalid_request", description)
    return Served(status, list(_NO_STORE), body, error="invalid_request")


def _unavailable(description: str) -> Served:
    return Served(
        503,
        [*_NO_STORE, *_retry_after()],
        _error_body("temporarily_unavailable", description),
        error="temporarily_unavailable",
    )


def _method_not_allowed(allow: str, description: str) -> Served:
    return Served(
        405,
        [*_NO_STORE, ("Allow", allow)],
        _error_body("invalid_request", description),
        error="invalid_request",
    )
