"""RFC 9421 HTTP message signatures on requests, verified with ``http-message-signatures``.

A key that carries a client public key (Ed25519 or P-256; the server never
holds a signing secret) may be required to sign its requests: a route rule
with ``"signed": True``, or ``require_signatures``. The engine then calls
:meth:`SignatureVerifier.verify` (or :meth:`~SignatureVerifier.averify`) with
the request view, the key's id and public key, and the request's target URI
(:func:`target_uri`). It returns when the request is signed as the contract
says and raises :class:`~m2m_middleware.errors.InvalidSignature` otherwise:

- ``Signature-Input`` and ``Signature`` hold exactly one signature;
- its ``keyid`` is the key's ``key_id``;
- it covers ``@method``, ``@target-uri`` and, when there is a body,
  ``content-digest`` (RFC 9530, sha-256 or sha-512), which must match the body;
- ``created`` is at most :data:`CLOCK_SKEW` seconds ahead and at most
  ``signature_max_age`` seconds old (``expires``, when present, has not passed);
- ``alg``, when present, is the key's own (``ed25519``, ``ecdsa-p256-sha256``);
- it verifies;
- its ``nonce`` was never seen for this key within ``signature_max_age``.

The signature base, the structured fields and the digests are the library's;
what is ours is the policy above and the nonce memory, which lives in the
limit storage (:func:`nonce_store`), so two instances sharing a Redis catch a
replay between them. With Redis (not a cluster) and limits to charge, the
engine asks :meth:`SignatureVerifier.check` for the nonce and the limiter
remembers it in the script that charges the limits: one round trip for both.
Nothing here runs unless a signature is asked for: the
API-key path pays nothing for this module.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Protocol
from urllib.parse import quote

from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from http_message_signatures import (
    HTTPMessageSignaturesException,
    HTTPMessageVerifier,
    HTTPSignatureAlgorithm,
    HTTPSignatureKeyResolver,
    algorithms,
)
from http_message_signatures import InvalidSignature as LibraryInvalidSignature

from .errors import NONCE_REPLAYED, InvalidSignature, TemporarilyUnavailable
from .limiting import Limiter, StorageDown
from .redaction import redact, secrets_of
from .request_view import RequestView
from .settings import Settings

logger = logging.getLogger("m2m_middleware")

#: Seconds a ``created`` may lie ahead of our clock (the library's own default).
CLOCK_SKEW = 5
#: What every signature must cover; ``content-digest`` too when there is a body.
REQUIRED_COMPONENTS = ("@method", "@target-uri")
#: Longer Signature-Input / Signature fields are refused before they are parsed:
#: one Ed25519 or P-256 signature and its parameters take a few hundred bytes.
MAX_FIELD_LENGTH = 4096
#: A nonce is an sf-string of this many characters at most, printable, no spaces:
#: it becomes part of a storage key.
_NONCE = re.compile(r"[\x21-\x7e]{1,128}")
#: RFC 3986 ``pchar`` plus "/", the characters a client leaves as they are in a path.
_PATH_SAFE = "/!$&'()*+,;=:@-._~"
#: Reasons from the library that are shown to the client are printable ASCII, cut here.
_SHOWN_REASON = 160


class NonceStore(Protocol):
    """Where nonces are remembered: each is new once, for ``ttl`` seconds."""

    def remember(self, key: str, ttl: int) -> bool:
        """True if ``key`` was not remembered yet (it is now); False for a replay.

        Raises :class:`~m2m_middleware.limiting.StorageDown` when the storage
        cannot be reached.
        """

    async def aremember(self, key: str, ttl: int) -> bool:
        """The async twin of :meth:`remember`."""


class MemoryNonces:
    """Nonces in this process's memory (``memory://``), expiring, bounded.

    Full of nonces that have not expired yet, it refuses new ones as an
    outage (``on_storage_error`` decides) rather than forget one early, which
    would let that signature be replayed.
    """

    #: Seconds between sweeps of expired nonces.
    sweep_interval = 10.0

    def __init__(self, max_entries: int = 1_000_000, clock: Any = time.monotonic) -> None:
        self.max_entries = max_entries
        self._clock = clock
        self._expiry: dict[str, float] = {}
        self._lock = threading.Lock()
        self._sweep_at = 0.0

    def remember(self, key: str, ttl: int) -> bool:
        now = self._clock()
        with self._lock:
            if now >= self._sweep_at:  # never more often: a sweep reads every entry
                self._sweep(now)
            expiry = self._expiry
            known = expiry.get(key)
            if known is not None and known > now:
                return False
            if len(expiry) >= self.max_entries:
                raise StorageDown(f"the nonce memory holds {self.max_entries} live nonces")
            expiry[key] = now + ttl
            return True

    async def aremember(self, key: str, ttl: int) -> bool:
        return self.remember(key, ttl)  # never blocks

    def _sweep(self, now: float) -> None:
        self._sweep_at = now + self.sweep_interval
        self._expiry = {k: t for k, t in self._expiry.items() if t > now}

    def __len__(self) -> int:
        return len(self._expiry)


class RedisNonces:
    """Nonces in the limiter's Redis: ``SET key 1 NX EX ttl``, one round trip, on the
    connection (and, on the async path, the per-loop ``redis.asyncio`` client) that
    the limiter opened, with its timeouts and its one retry."""

    def __init__(self, limiter: Limiter) -> None:
        self._limiter = limiter
        self._secrets = secrets_of(limiter.settings.rate_limit_storage)

    def remember(self, key: str, ttl: int) -> bool:
        try:
            return bool(self._limiter.storage.get_connection().set(key, b"1", nx=True, ex=ttl))
        except Exception as exc:  # redis-py's errors, whatever the connection died of
            raise StorageDown(redact(str(exc), self._secrets)) from exc

    async def aremember(self, key: str, ttl: int) -> bool:
        try:
            # The limiter's client for this event loop (limits.aio over redis.asyncio).
            storage, _ = await self._limiter._async_storage()
            client = storage.bridge.get_connection()
            return bool(await client.set(key, b"1", nx=True, ex=ttl))
        except Exception as exc:
            raise StorageDown(redact(str(exc), self._secrets)) from exc


class CounterNonces:
    """Nonces in any other ``limits`` storage (memcached, MongoDB, ...): its atomic
    ``incr`` with an expiry; the first increment of a key is the only new one."""

    def __init__(self, limiter: Limiter) -> None:
        self._limiter = limiter
        self._secrets = secrets_of(limiter.settings.rate_limit_storage)

    def remember(self, key: str, ttl: int) -> bool:
        try:
            return int(self._limiter.storage.incr(key, ttl)) == 1
        except Exception as exc:
            raise StorageDown(redact(str(exc), self._secrets)) from exc

    async def aremember(self, key: str, ttl: int) -> bool:
        try:
            storage, _ = await self._limiter._async_storage()
            return int(await storage.incr(key, ttl)) == 1
        except Exception as exc:
            raise StorageDown(redact(str(exc), self._secrets)) from exc


def nonce_store(limiter: Limiter) -> NonceStore:
    """The nonce memory in ``limiter``'s storage: in process, Redis, or its counters."""
    if limiter.windows is not None or limiter.in_memory:
        return MemoryNonces()
    if limiter.redis:
        return RedisNonces(limiter)
    return CounterNonces(limiter)


def target_uri(view: RequestView, *, origin: str | None = None, path: str | None = None) -> str:
    """The ``@target-uri`` the client signed, rebuilt from what the server saw.

    ``scheme://host`` is ``origin`` when given (e.g. ``"https://api.example.com"``,
    for a deployment whose public name the proxy does not pass on), else the
    view's scheme (as the trusted proxies report it) and its ``Host`` header.
    Then the path and the query string as sent. ``path`` should be the path as
    the client sent it, mount prefix included (:func:`asgi_request_path`,
    :func:`wsgi_request_path`): the view's own path is decoded, and below a
    ``root_path`` / ``SCRIPT_NAME``; without ``path`` it is percent-encoded
    again (UTF-8), which gives back what httpx and requests send for any path
    an app is not mounted under and that has no encoded reserved character.

    So a proxy in front must pass on ``Host`` (nginx: ``proxy_set_header Host
    $host``) and the scheme (``X-Forwarded-Proto`` or ``Forwarded``, from a
    network in ``trusted_proxies``), and leave the path and query alone; and a
    path the client sent with an encoded reserved character (``%2F``) cannot be
    rebuilt from its decoded form unless ``path`` is given.
    """
    if origin is None:
        host = view.header("host")
        if not host:
            raise InvalidSignature("the request has no Host header to rebuild its @target-uri")
        origin = f"{view.scheme}://{host}"
    if path is None:
        path = quote(view.path, safe=_PATH_SAFE)
    query = view.query
    return f"{origin}{path}?{query}" if query else f"{origin}{path}"


def quoted_path(path: str) -> str:
    """A decoded path percent-encoded again (UTF-8), as httpx and requests send it."""
    return quote(path, safe=_PATH_SAFE)


def asgi_request_path(scope: Mapping[str, Any]) -> str | None:
    """The path as the client sent it, from an ASGI scope: ``raw_path`` (percent-encoded,
    mount prefix included), or None when the server gives none (then ``target_uri``
    encodes the decoded path again)."""
    raw = scope.get("raw_path")
    if not isinstance(raw, bytes) or not raw:
        return None
    return raw.partition(b"?")[0].decode("latin-1")


def wsgi_request_path(environ: Mapping[str, Any]) -> str:
    """The path as the client sent it, from a WSGI environ (also Django's ``request.META``).

    ``RAW_URI`` (gunicorn) or ``REQUEST_URI`` (werkzeug, uWSGI, Apache) when the
    server keeps it; else ``SCRIPT_NAME`` + ``PATH_INFO`` encoded again from their
    PEP 3333 form (the bytes as latin-1), which holds the mount prefix too.
    """
    script = str(environ.get("SCRIPT_NAME", ""))
    for name in ("RAW_URI", "REQUEST_URI"):
        raw = environ.get(name)
        if isinstance(raw, str) and raw.startswith("/"):
            raw = raw.partition("?")[0]
            prefix = _pep3333_quoted(script)
            # A mount prefix the raw URI lacks was taken off before us (werkzeug's test
            # client, a proxy that strips it and says so, ProxyFix's x_prefix): the
            # client sent it, so it signed it.
            return raw if raw.startswith(prefix) else prefix + raw
    return _pep3333_quoted(script + str(environ.get("PATH_INFO", ""))) or "/"


def _pep3333_quoted(path: str) -> str:
    """A WSGI path (its bytes as latin-1) percent-encoded as a client sends it."""
    try:
        return quote(path.encode("latin-1"), safe=_PATH_SAFE)
    except UnicodeEncodeError:  # not PEP 3333 text: encode it as a client would
        return quote(path, safe=_PATH_SAFE)


class _Message:
    """What the library reads of a request: method, encoded URL, header items."""

    __slots__ = ("headers", "method", "url")

    def __init__(self, method: str, url: str, headers: Mapping[str, str]) -> None:
        self.method = method
        self.url = url
        self.headers = headers


@functools.lru_cache(maxsize=4096)
def _public_key(pem: str) -> tuple[Any, type[HTTPSignatureAlgorithm]]:
    """A stored PEM -> (key, algorithm), parsed once per process (about 20 us each).

    Raises ValueError for a key that is neither Ed25519 nor P-256.
    """
    key = load_pem_public_key(pem.encode("ascii"))
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key, algorithms.ED25519
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key, algorithms.ECDSA_P256_SHA256
    raise ValueError(f"a {type(key).__name__} cannot sign requests here")


def signing_key_algorithm(pem: str) -> str:
    """The RFC 9421 ``alg`` a client's PEM public key signs with, or ValueError.

    For stores and the CLI, to refuse a key that could never sign a request.
    """
    try:
        return _public_key(pem)[1].algorithm_id
    except (ValueError, TypeError, UnicodeError) as exc:
        raise ValueError(
            f"expected an Ed25519 or P-256 public key in PEM form: {_shown(exc)}"
        ) from None


class _OneKey(HTTPSignatureKeyResolver):
    """Only the key the credential named resolves; the ``keyid`` was checked before."""

    def __init__(self, key_id: str, key: Any) -> None:
        self._key_id = key_id
        self._key = key

    def resolve_public_key(self, key_id: str) -> Any:
        return self._key if key_id == self._key_id else None


class _PolicyVerifier(HTTPMessageVerifier):
    """The library's verifier with our clock and our rules on the signature's
    parameters, checked before any cryptography is spent on it."""

    def __init__(
        self,
        algorithm: type[HTTPSignatureAlgorithm],
        key_id: str,
        key: Any,
        now: float,
        max_age: int,
    ) -> None:
        super().__init__(signature_algorithm=algorithm, key_resolver=_OneKey(key_id, key))
        self.key_id = key_id
        self.now = now
        self.max_age_seconds = max_age

    def validate_created_and_expires(self, sig_input: Any, max_age: Any = None) -> None:
        params = sig_input.params
        keyid = params.get("keyid")
        if keyid != self.key_id:
            raise InvalidSignature("the signature's keyid is not this key's key_id")
        alg = params.get("alg")
        if alg is not None and alg != self.signature_algorithm.algorithm_id:
            raise InvalidSignature(
                f"the signature's alg is not {self.signature_algorithm.algorithm_id}, "
                "the algorithm of this key"
            )
        created = params.get("created")
        if type(created) is not int:
            raise InvalidSignature("the signature has no created time (an integer)")
        if created > self.now + CLOCK_SKEW:
            raise InvalidSignature("the signature's created time is in the future")
        if created < self.now - self.max_age_seconds - CLOCK_SKEW:
            raise InvalidSignature(
                f"the signature is older than signature_max_age ({self.max_age_seconds} s)"
            )
        expires = params.get("expires")
        if expires is not None and (type(expires) is not int or expires < self.now - CLOCK_SKEW):
            raise InvalidSignature("the signature has expired")
        nonce = params.get("nonce")
        if not isinstance(nonce, str) or not _NONCE.fullmatch(nonce):
            raise InvalidSignature(
                "the signature has no nonce (1 to 128 printable characters, no spaces)"
            )


class SignatureVerifier:
    """Checks a request's RFC 9421 signature against a key's public key.

    ``settings`` gives ``signature_max_age`` and ``on_storage_error``;
    ``nonces`` is where nonces are remembered (:func:`nonce_store` of the
    engine's limiter). One verifier serves every request and thread.
    """

    def __init__(self, settings: Settings, nonces: NonceStore) -> None:
        self.max_age = settings.signature_max_age
        self.nonces = nonces
        self._allow_on_outage = settings.on_storage_error == "allow"
        #: Seconds a nonce is remembered: as long as its signature could be accepted.
        self.nonce_ttl = self.max_age + 2 * CLOCK_SKEW + 1
        self._down = False

    def verify(
        self,
        view: RequestView,
        key_id: str,
        public_key_pem: str,
        target_uri: str,
        now: float | None = None,
    ) -> None:
        """Return if ``view`` is signed by ``key_id``'s key as required; else raise
        :class:`~m2m_middleware.errors.InvalidSignature` (or ``TemporarilyUnavailable``
        when the nonce storage is down and ``on_storage_error`` is ``"deny"``)."""
        nonce_key = self._checked(view, key_id, public_key_pem, target_uri, now)
        try:
            fresh = self.nonces.remember(nonce_key, self.nonce_ttl)
        except StorageDown as exc:
            fresh = self._outage(exc)
        else:
            self._recovered()
        if not fresh:
            raise InvalidSignature(NONCE_REPLAYED)

    async def averify(
        self,
        view: RequestView,
        key_id: str,
        public_key_pem: str,
        target_uri: str,
        now: float | None = None,
    ) -> None:
        """The async twin of :meth:`verify`: the nonce is remembered without blocking
        the event loop. The check itself runs on the loop: about 0.4 ms of CPU
        (benchmarks/signature_overhead.py), mostly pure-Python parsing that holds
        the GIL, so a thread would not run it beside the loop anyway."""
        nonce_key = self._checked(view, key_id, public_key_pem, target_uri, now)
        try:
            fresh = await self.nonces.aremember(nonce_key, self.nonce_ttl)
        except StorageDown as exc:
            fresh = self._outage(exc)
        else:
            self._recovered()
        if not fresh:
            raise InvalidSignature(NONCE_REPLAYED)

    def check(
        self,
        view: RequestView,
        key_id: str,
        public_key_pem: str,
        target_uri: str,
        now: float | None = None,
    ) -> tuple[str, int]:
        """:meth:`verify` but for the nonce memory: returns the nonce's (key, TTL) for
        the caller to remember in the round trip the request's limits make
        (:meth:`Limiter.charge <m2m_middleware.limiting.Limiter.charge>`); the key is
        the one :class:`RedisNonces` remembers, so both paths catch each other's
        replays."""
        return self._checked(view, key_id, public_key_pem, target_uri, now), self.nonce_ttl

    def _checked(
        self,
        view: RequestView,
        key_id: str,
        public_key_pem: str,
        target_uri: str,
        now: float | None,
    ) -> str:
        """Everything but the nonce memory; returns the nonce's storage key."""
        headers = view.headers
        signature_input = headers.get("signature-input")
        signature = headers.get("signature")
        if not signature_input or not signature:
            raise InvalidSignature("this request must be signed: Signature-Input and Signature")
        if len(signature_input) > MAX_FIELD_LENGTH or len(signature) > MAX_FIELD_LENGTH:
            raise InvalidSignature("Signature-Input or Signature is too long")
        body = view.body
        if body is None or (not body and _announces_body(headers)):
            # Too large to read (the adapter answers 413 before this), or not read at
            # all: a digest checked against no body would let any body through.
            raise InvalidSignature("the request body was not read, so its digest cannot be checked")
        try:
            key, algorithm = _public_key(public_key_pem)
        except (ValueError, TypeError, UnicodeError):
            # The store took the PEM; it is not a key that can sign requests.
            raise InvalidSignature(
                "this key's signing_public_key is not an Ed25519 or P-256 public key"
            ) from None
        verifier = _PolicyVerifier(
            algorithm, key_id, key, time.time() if now is None else now, self.max_age
        )
        required = (*REQUIRED_COMPONENTS, "content-digest") if body else REQUIRED_COMPONENTS
        message = _Message(view.method, target_uri, headers)
        try:
            results = verifier.verify(
                message,
                max_age=timedelta(seconds=self.max_age),
                require_components=required,
                body=body,
            )
        except LibraryInvalidSignature as exc:
            cause = exc.args[0] if exc.args else None
            if isinstance(cause, InvalidSignature):  # ours, wrapped by the library
                raise cause from None
            raise InvalidSignature(f"the signature does not verify: {_shown(exc)}") from None
        except InvalidSignature:
            raise
        except (
            HTTPMessageSignaturesException,
            ValueError,
            TypeError,
            UnicodeError,
            LookupError,
            RecursionError,
            OverflowError,
        ) as exc:  # a malformed field the library refused some other way: a 401, never a 500
            raise InvalidSignature(f"the signature does not verify: {_shown(exc)}") from None
        nonce = results[0].nonce
        assert nonce is not None  # checked by _PolicyVerifier before the signature was
        return f"m2m:nonce:{key_id}:{nonce}"

    def _outage(self, exc: StorageDown) -> bool:
        if not self._down:
            self._down = True
            logger.error("nonce storage unreachable: %s", exc)
        if self._allow_on_outage:
            return True  # on_storage_error="allow": signed, but not checked for replay
        raise TemporarilyUnavailable("the nonce storage cannot be reached; try again shortly")

    def _recovered(self) -> None:
        if self._down:
            self._down = False
            logger.warning("nonce storage reachable again")


def _announces_body(headers: Mapping[str, str]) -> bool:
    """Whether the headers say a body was sent (a non-zero length, or chunks)."""
    if "transfer-encoding" in headers:
        return True
    length = headers.get("content-length", "0").strip()
    return length not in ("0", "")


def _shown(exc: BaseException) -> str:
    """A library's reason, as printable ASCII of bounded length (it may quote the request)."""
    text = str(exc) or type(exc).__name__
    text = "".join(c if " " <= c <= "~" else "?" for c in text)
    return text[:_SHOWN_REASON]
