"""Sign outgoing requests the way a signed route wants them (RFC 9421), for httpx and requests.

Importable, rather than an example to copy: a client that signs must match
what :mod:`m2m_middleware.signatures` checks to the byte (the components, the
digest, ``created``, ``nonce``, ``keyid``), and a copy drifts when either side
changes; here both sides are tested together. Neither HTTP library is
imported: both take any callable as ``auth``::

    httpx.Client(auth=HttpxSignatureAuth(key_id, private_key))
    requests.Session().auth = RequestsSignatureAuth(key_id, private_key)

The signature is made with ``http-message-signatures`` (``pip install
"m2m-middleware[signatures]"``), with the client's Ed25519 or P-256 private
key; the server holds only the public key.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from http_message_signatures import (
    HTTPMessageSigner,
    HTTPSignatureAlgorithm,
    MappingKeyResolver,
    algorithms,
)

#: What a signed route requires, plus content-digest whenever there is a body.
COVERED_COMPONENTS = ("@method", "@target-uri")

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey


def load_private_key(key: PrivateKey | bytes | str, password: bytes | None = None) -> PrivateKey:
    """A cryptography private key, from itself or from PEM text; Ed25519 or P-256 only."""
    if isinstance(key, str):
        key = key.encode("ascii")
    if isinstance(key, bytes):
        loaded = load_pem_private_key(key, password=password)
        if not isinstance(loaded, (ed25519.Ed25519PrivateKey, ec.EllipticCurvePrivateKey)):
            raise ValueError(f"a {type(loaded).__name__} cannot sign requests here")
        key = loaded
    if isinstance(key, ec.EllipticCurvePrivateKey) and not isinstance(key.curve, ec.SECP256R1):
        raise ValueError(f"an EC key on {key.curve.name} cannot sign requests here; use P-256")
    if not isinstance(key, (ed25519.Ed25519PrivateKey, ec.EllipticCurvePrivateKey)):
        raise TypeError(f"expected an Ed25519 or P-256 private key, got {type(key).__name__}")
    return key


class RequestSigner:
    """Signs one request in place: ``Content-Digest`` (when there is a body),
    ``Signature-Input`` and ``Signature`` with ``keyid``, ``alg``, ``created``
    and a fresh ``nonce``.

    ``key_id`` is the API key's ``key_id`` (``m2m keys list``), not the key
    itself. ``covered`` may add components (``"content-type"``, ...) to the
    ones every signed route requires. ``clock`` gives the time (tests).
    """

    def __init__(
        self,
        key_id: str,
        private_key: PrivateKey | bytes | str,
        *,
        covered: Sequence[str] = (),
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        key = load_private_key(private_key)
        algorithm: type[HTTPSignatureAlgorithm] = (
            algorithms.ED25519
            if isinstance(key, ed25519.Ed25519PrivateKey)
            else algorithms.ECDSA_P256_SHA256
        )
        self.key_id = key_id
        self.algorithm_id = algorithm.algorithm_id
        self.covered = tuple(dict.fromkeys((*COVERED_COMPONENTS, *covered)))
        self._clock = clock or (lambda: datetime.now(timezone.utc))
        self._signer = HTTPMessageSigner(
            signature_algorithm=algorithm,
            key_resolver=MappingKeyResolver(public_keys={}, private_keys={key_id: key}),
        )

    def sign(self, message: Any, body: bytes) -> None:
        """Sign ``message`` (its ``method``, ``url`` and ``headers``) whose body is ``body``."""
        self._signer.sign(
            message,
            key_id=self.key_id,
            created=self._clock(),
            nonce=secrets.token_urlsafe(16),
            covered_component_ids=self.covered,
            body=body or None,  # an empty body needs no digest
            # A retry re-signs a request that has one (checked against the body).
            use_existing_digest=bool(body),
        )

    def __repr__(self) -> str:
        # Never the private key.
        return f"{type(self).__name__}(key_id={self.key_id!r}, alg={self.algorithm_id!r})"


class HttpxSignatureAuth(RequestSigner):
    """``auth=`` for ``httpx.Client`` and ``httpx.AsyncClient``.

    The body must be bytes (``content=``, ``json=``, ``data=``); a streamed
    body cannot be digested before it is sent, and is refused.
    """

    def __call__(self, request: Any) -> Any:
        try:
            body = request.content
        except Exception as exc:  # httpx.RequestNotRead: a streamed body
            raise ValueError(
                "a streamed request body cannot be signed; send bytes (content=...)"
            ) from exc
        self.sign(request, body)
        return request


class RequestsSignatureAuth(RequestSigner):
    """``auth=`` for ``requests`` (a session's ``auth``, or per request).

    The body must be bytes or text (``json=``, ``data=``); a file or generator
    body is refused. Text is sent as UTF-8.
    """

    def __call__(self, request: Any) -> Any:
        body = request.body
        if body is None:
            body = b""
        elif isinstance(body, str):
            body = body.encode("utf-8")
            request.body = body
            request.headers["Content-Length"] = str(len(body))
        elif not isinstance(body, bytes):
            raise ValueError("a streamed or file request body cannot be signed; send bytes")
        self.sign(request, body)
        return request
