"""One error tree: every denial carries its code, status and a human detail."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .redaction import redact

if TYPE_CHECKING:
    from .client import Client


class M2MError(Exception):
    """Base class of every error the package raises."""


class ConfigError(M2MError, ValueError):
    """A setting is unknown or invalid. The message names the field.

    The message never shows a password or token: a URL's userinfo, secret
    query parameters and keyword-DSN passwords are masked here, whatever the
    caller quoted (callers mask the secrets they know of as well).
    ``suggestion`` is the known field an unknown one probably meant (a typo), if any.
    """

    def __init__(self, field: str, problem: str, *, suggestion: str | None = None) -> None:
        self.field = field
        self.problem = problem = redact(problem)
        self.suggestion = suggestion
        super().__init__(f"{field}: {problem}")


class KeyStoreError(M2MError):
    """A key-store operation failed."""


class KeyNotFound(KeyStoreError, LookupError):
    """No key has the given key id."""

    def __init__(self, key_id: str) -> None:
        self.key_id = key_id
        super().__init__(f"no key with id {key_id!r}")


class UnreadableRow(KeyStoreError):
    """A stored row does not make a key record (edited by hand, or by other software).

    The message names the key id and what is wrong, never the row's hash or values.
    """

    def __init__(self, key_id: str, problem: str) -> None:
        self.key_id = key_id
        self.problem = problem
        super().__init__(f"key {key_id!r}: its stored row cannot be read ({problem})")


class StoreUnavailable(KeyStoreError):
    """The key store or the limit storage cannot be reached."""


class AuthError(M2MError):
    """A request is denied. ``error`` is the code clients see in the problem body."""

    status = 401
    error = "invalid_token"
    title = "Invalid credentials"
    #: Whether a 401 carries an RFC 6750 ``WWW-Authenticate: Bearer`` challenge.
    bearer_challenge = True

    def __init__(self, detail: str, *, scopes: tuple[str, ...] = ()) -> None:
        self.detail = detail
        self.scopes = scopes
        super().__init__(detail)


class MissingCredentials(AuthError):
    status = 401
    error = "missing_credentials"
    title = "Authentication required"


class InvalidToken(AuthError):
    status = 401
    error = "invalid_token"
    title = "Invalid credentials"


class KeyEnded(InvalidToken):
    """A revoked or expired API key, or a token issued from one: answered as any
    other invalid token; the class only lets the alerts tell a dead key still in
    use from a guess (``Denied.key_ended``). ``client`` is the key's, when the
    refusal has no cached entry to name it."""

    def __init__(self, detail: str, client: Client | None = None) -> None:
        super().__init__(detail)
        self.client = client


class InvalidSignature(AuthError):
    """A request signature (RFC 9421) is missing, stale, replayed or does not verify.

    No Bearer challenge: the credential itself was good, and a client that
    retried with another one would be answered the same way.
    """

    status = 401
    error = "invalid_signature"
    title = "Invalid request signature"
    bearer_challenge = False


#: The detail of a replayed signature, from the nonce memory or the limit script.
NONCE_REPLAYED = "the signature's nonce was used before"


class InvalidRequest(AuthError):
    status = 400
    error = "invalid_request"
    title = "Invalid request"


class BodyTooLarge(InvalidRequest):
    """A request that must be signed sent a body over ``max_body_size``: 413.

    Its code stays ``invalid_request`` (the client sent what no check reads);
    the status tells it why.
    """

    status = 413
    title = "Request body too large"


class InsufficientScope(AuthError):
    status = 403
    error = "insufficient_scope"
    title = "Insufficient scope"


class RateLimited(AuthError):
    status = 429
    error = "rate_limited"
    title = "Too many requests"


class QuotaExceeded(AuthError):
    status = 429
    error = "quota_exceeded"
    title = "Quota exceeded"


class TemporarilyUnavailable(AuthError):
    status = 503
    error = "temporarily_unavailable"
    title = "Temporarily unavailable"


class HttpsRequired(AuthError):
    status = 403
    error = "https_required"
    title = "HTTPS required"


class AddressNotAllowed(AuthError):
    status = 403
    error = "address_not_allowed"
    title = "Address not allowed"
