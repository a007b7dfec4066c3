"""What verifying a signed request costs, next to the raw signature verify inside it.

One run, variants timed round-robin (each round times every variant once, in
turn), each variant's figure the median of its per-round means:

- **raw**: ``cryptography``'s ``public_key.verify(signature, base)`` on a
  signature base the size of a real one (Ed25519, and P-256 with its DER
  re-encoding, as ``http-message-signatures`` does it): the floor;
- **verified**: :meth:`m2m_middleware.signatures.SignatureVerifier.verify` of a
  signed ``POST`` with a JSON body, as the engine calls it: ``target_uri``,
  parsing ``Signature-Input`` / ``Signature``, the policy checks, the signature
  base, the verify, the ``Content-Digest`` check and the nonce remembered
  (``memory://``). Every request is a different one (its own nonce), signed
  before anything is timed, so no variant sees a request twice.

The ratio verified / raw is the price of everything around the cryptography.
Run ``python benchmarks/signature_overhead.py --help`` for the options; needs
the ``signatures`` extra.
"""

from __future__ import annotations

import argparse
import datetime
import secrets
import statistics
import time
from collections.abc import Callable
from typing import Any

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from m2m_middleware import Settings
from m2m_middleware.request_view import RequestView
from m2m_middleware.signatures import MemoryNonces, SignatureVerifier, target_uri
from m2m_middleware.signing_clients import RequestSigner

KEY_ID = "key_4f2a9c1b7e"
URL = "https://api.example.com/payments/charge?idempotency=7"
BODY = b'{"amount": 1200, "currency": "EUR", "reference": "order-20261202-0042"}'


def _public_pem(private: Any) -> str:
    return (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def _view(request: httpx.Request) -> RequestView:
    return RequestView(
        request.method,
        request.url.path,
        headers={k.lower(): v for k, v in request.headers.items()},
        query=request.url.query.decode(),
        scheme=request.url.scheme,
        body=request.content,
    )


def _signed_views(private: Any, count: int, now: float) -> list[RequestView]:
    created = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
    signer = RequestSigner(KEY_ID, private, clock=lambda: created)
    views = []
    for _ in range(count):
        request = httpx.Request("POST", URL, content=BODY)
        signer.sign(request, BODY)
        views.append(_view(request))
    return views


def _raw_verify(kind: str, private: Any) -> Callable[[], None]:
    """One verify of a signature base as long as the signed requests' (about 300 bytes)."""
    base = (
        '"@method": POST\n"@target-uri": '
        + URL
        + '\n"content-digest": sha-256=:'
        + secrets.token_urlsafe(32)
        + ':\n"@signature-params": ("@method" "@target-uri" "content-digest");'
        f'created=1800000000;keyid="{KEY_ID}";alg="{kind}";nonce="{secrets.token_urlsafe(16)}"'
    ).encode()
    public = private.public_key()
    if kind == "ed25519":
        signature = private.sign(base)

        def verify() -> None:
            public.verify(signature, base)

        return verify
    der = private.sign(base, ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    algorithm = ec.ECDSA(hashes.SHA256())

    def verify_p256() -> None:
        # What the library does with an RFC 9421 r||s signature: back to DER, then verify.
        public.verify(
            encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")),
            base,
            algorithm,
        )

    return verify_p256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--requests", type=int, default=1000, help="calls per variant per round")
    parser.add_argument("--quick", action="store_true", help="a few calls: checks it runs")
    parser.add_argument("--cpu", action="store_true", help="time with the process CPU clock")
    options = parser.parse_args()
    if options.quick:
        options.rounds, options.requests = 2, 20
    clock = time.process_time if options.cpu else time.perf_counter
    now = time.time()
    keys = {
        "ed25519": ed25519.Ed25519PrivateKey.generate(),
        "ecdsa-p256-sha256": ec.generate_private_key(ec.SECP256R1()),
    }
    total = options.rounds * options.requests + options.requests  # one round of warm-up
    variants: dict[str, Callable[[int], None]] = {}
    for kind, private in keys.items():
        pem = _public_pem(private)
        views = iter(_signed_views(private, total, now))
        verifier = SignatureVerifier(Settings(key_store="memory://"), MemoryNonces())

        def verified(n: int, views: Any = views, verifier: Any = verifier, pem: str = pem) -> None:
            for _ in range(n):
                view = next(views)
                verifier.verify(view, KEY_ID, pem, target_uri(view), now)

        raw_one = _raw_verify(kind, private)

        def raw(n: int, raw_one: Callable[[], None] = raw_one) -> None:
            for _ in range(n):
                raw_one()

        variants[f"{kind} raw"] = raw
        variants[f"{kind} verified"] = verified

    for run in variants.values():  # warm-up: caches filled, code paths hot
        run(options.requests)
    means: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(options.rounds):
        for name, run in variants.items():
            started = clock()
            run(options.requests)
            means[name].append((clock() - started) / options.requests * 1e6)
    median = {name: statistics.median(values) for name, values in means.items()}

    print(
        f"{options.rounds} rounds x {options.requests} calls, median microseconds per call "
        f"({'CPU' if options.cpu else 'wall'} clock)"
    )
    for name, value in median.items():
        print(f"  {name:<30} {value:8.1f} us")
    for kind in keys:
        raw_us, verified_us = median[f"{kind} raw"], median[f"{kind} verified"]
        print(
            f"{kind}: verified request {verified_us:.1f} us / raw verify {raw_us:.1f} us "
            f"= {verified_us / raw_us:.2f}x (everything around the verify: "
            f"{verified_us - raw_us:+.1f} us)"
        )


if __name__ == "__main__":
    main()
