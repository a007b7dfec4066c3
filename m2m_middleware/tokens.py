"""JWT bearer tokens: parsed strictly, verified with joserfc, claims checked -> Client.

The parse is ours and deliberately narrow (RFC 8725): three base64url
segments of a capped size, a JSON header with no duplicate members and an
``alg`` from the allow-list, no ``crit``, no key or URL taken from the header
(``jwk``, ``jku``, ``x5u``, ``x5c`` are ignored), ``kid`` used only as an exact
lookup. The signature is then checked by joserfc's algorithm for that one
``alg``, with a key of the matching type. Every failure is an
:class:`InvalidToken` (401), never an exception escaping to the framework.
"""

from __future__ import annotations

import binascii
import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from time import time
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NoReturn

from joserfc.jws import JWSRegistry

from .client import Client
from .errors import AuthError, InvalidToken, TemporarilyUnavailable
from .jwks import JWKSClient
from .jwtkeys import Key, KeyRing
from .settings import Settings
from .syntax import MAX_TOKEN_CLIENT_ID_LENGTH

if TYPE_CHECKING:
    from .issuer.own_tokens import OwnTokens

logger = logging.getLogger("m2m_middleware")
#: A well-formed compact JWS in one match: one regex call where a split and
#: three segment matches measured 1.8x as long (timeit, a 330-byte token).
#: A token it refuses is split again by _malformed, to say what is wrong with it.
_COMPACT = re.compile(r"([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)")
#: base64url -> the standard alphabet, for binascii (see _b64decode).
_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
#: Headers no sane IdP makes large; refused before JSON parsing.
MAX_HEADER_BYTES = 2048
#: Distinct header texts of verified tokens remembered parsed (see TokenVerifier.parse).
#: A signer's header is the same on every token it signs (alg, typ, kid), so a few
#: per trusted key; the bound is for a signer that varies it.
MAX_KNOWN_HEADERS = 64


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    client: Client
    #: Epoch seconds from which the token is expired (``exp`` plus the leeway).
    dead_at: float


# Not frozen: admit sets the route in place. dataclasses.replace of it measured
# 8.6 us a call on the benchmark machine (python -m timeit), more than admit itself.
@dataclass(slots=True)
class _Parsed:
    header: Mapping[str, Any]
    alg: str
    kid: str | None
    signing_input: bytes
    signature: bytes
    payload: bytes
    #: Whose rules it answers to: our own issuer's (``own``), an identity
    #: provider's, or not known yet (``undecided``: a kid no key set holds,
    #: which a reread of our own signing keys may still find).
    own: bool = False
    undecided: bool = False
    #: The header's base64url text, under which a verified token's header is remembered.
    header_text: str = ""


#: A header's checked fields: the header itself, its ``alg`` ("" when not a string), its ``kid``.
_HeaderFields = tuple[Mapping[str, Any], str, str | None]


def _standard_base64(segment: str) -> bytes:
    """A base64url segment (already matched against its alphabet) in the standard
    alphabet, padded: what binascii decodes, and what a canonical encoding gives back."""
    return segment.encode("ascii").translate(_FROM_URLSAFE) + b"=" * (-len(segment) % 4)


def _b64decode(segment: str) -> bytes:
    # binascii directly: base64.urlsafe_b64decode wraps the same C function in
    # three Python calls, 1.5x as long measured (timeit). The alphabet was
    # checked by the caller, so the non-strict decoder has nothing to skip.
    try:
        return binascii.a2b_base64(_standard_base64(segment))
    except (binascii.Error, ValueError):
        raise InvalidToken("the token is not valid base64url") from None


def _signature_bytes(segment: str) -> bytes:
    """The signature bytes, from their canonical base64url text only (RFC 4648 3.5).

    Lenient decoding ignores the unused low bits of the last character, so
    the same bytes would have several accepted texts. The header and payload
    need no such check: their texts are what the signature covers. What this
    enforces is one text per signature *value*, not one signature per token:
    ECDSA is malleable (``(r, n - s)`` verifies wherever ``(r, s)`` does), and
    high-S values are accepted, since identity providers' signers emit either.
    So a token's text is not unique; nothing may count or revoke by it (see
    ``KeyCache.put_token``).
    """
    padded = _standard_base64(segment)
    try:
        raw = binascii.a2b_base64(padded)
    except (binascii.Error, ValueError):
        raise InvalidToken("the token is not valid base64url") from None
    # The same comparison as re-encoding the bytes to base64url without padding,
    # made in the standard alphabet with padding: one C call each way (timeit:
    # three quarters of the time of the base64 module's round trip).
    if binascii.b2a_base64(raw, newline=False) != padded:
        raise InvalidToken("the token's signature is not canonical base64url")
    return raw


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate member")
    return result


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


#: Strict JSON: no duplicate members (parsers disagree on which one wins), no NaN.
_STRICT_JSON = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
_decode_json = _STRICT_JSON.decode
#: The same decoder without decode's whitespace matches and Python frame around it
#: (the documented ``raw_decode``; decode is 1.6x the scanner alone for a payload of
#: benchmarks/jwt_overhead.py, interleaved loops, CPU time). Used when it takes the
#: whole text; anything else (whitespace around, trailing data) goes to decode.
_raw_decode_json = _STRICT_JSON.raw_decode


#: Deepest nesting of arrays and objects accepted in a header or payload. Python's
#: JSON parser refuses ~1000 levels up to 3.12 and goes far deeper from 3.13 on:
#: a limit of our own gives one answer everywhere, and no claim needs more.
MAX_JSON_DEPTH = 64
_JSON_STRING_OR_BRACKET = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _too_deep(data: bytes) -> bool:
    # The exact scan (strings skipped) only when there are enough brackets to matter.
    if data.count(b"[") + data.count(b"{") <= MAX_JSON_DEPTH:
        return False
    depth = 0
    for match in _JSON_STRING_OR_BRACKET.finditer(data):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return True
        elif token in (b"]", b"}"):
            depth -= 1
    return False


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    if _too_deep(data):
        raise InvalidToken(f"the token's {what} is nested too deeply")
    try:
        text = data.decode("utf-8")
        try:
            value, end = _raw_decode_json(text)
        except ValueError:  # leading whitespace, or not JSON: decode says which
            end = -1
        if end != len(text):
            value = _decode_json(text)  # the whole decoder judges (or refuses) the rest
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidToken(f"the token's {what} is not a JSON object") from None
    if not isinstance(value, dict):
        raise InvalidToken(f"the token's {what} is not a JSON object")
    return value


def _malformed(token: str) -> NoReturn:
    """Why a token that is not three base64url segments is refused."""
    parts = token.split(".")
    if len(parts) == 5:
        raise InvalidToken("encrypted tokens (JWE) are not accepted")
    if len(parts) != 3:
        raise InvalidToken("a JWT has three dot-separated parts")
    raise InvalidToken("the token has an empty part or characters outside base64url")


def _header_fields(header_part: str) -> _HeaderFields:
    """The header's own checks, which depend on its text alone: its JSON, ``crit``, ``b64``,
    and the types of ``alg`` and ``kid``."""
    if len(header_part) > MAX_HEADER_BYTES:
        raise InvalidToken("the token's header is too large")
    header = _json_object(_b64decode(header_part), "header")
    alg = header.get("alg")
    if not isinstance(alg, str):
        alg = ""  # in no allow-list: refused by admit, under the rules the kid picks
    if "crit" in header:
        raise InvalidToken("the token has critical header extensions (crit) we do not support")
    if header.get("b64") is not None:
        raise InvalidToken("unencoded payloads (b64) are not accepted")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise InvalidToken("the token's kid is not a string")
    return header, alg, kid


class TokenVerifier:
    """Verifies JWTs against the keys in settings and/or a JWKS URL, and, with
    ``own``, our own issuer's tokens against its signing keys in the key store.

    A token goes to our own issuer's rules when its ``kid`` is one of our
    keys (or when nothing else is trusted); to the identity provider's
    otherwise. The two never mix: our keys never verify a token under the
    provider's rules, nor the provider's keys one of ours.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        jwks: JWKSClient | None = None,
        own: OwnTokens | None = None,
    ) -> None:
        self.algorithms = frozenset(settings.jwt_algorithms or ())
        self._models = {alg: JWSRegistry.algorithms[alg] for alg in self.algorithms}
        self.static: KeyRing | None = settings.jwt_key_ring
        self.jwks = jwks
        if self.jwks is None and settings.jwt_jwks_url is not None:
            self.jwks = JWKSClient(
                settings.jwt_jwks_url,
                timeout=settings.jwt_jwks_timeout,
                refetch_interval=settings.jwt_jwks_refetch_interval,
            )
        self.issuer = settings.jwt_issuer
        audience = settings.jwt_audience
        self.audience = frozenset((audience,) if isinstance(audience, str) else audience or ())
        self.leeway = float(settings.jwt_leeway)
        self.typ = media_type(settings.jwt_typ) if settings.jwt_typ else None
        self.client_id_claims = settings.jwt_client_id_claims
        self.tier_claim = settings.jwt_tier_claim
        self.own = own
        #: Whether anyone but our own issuer is trusted (jwt_keys, jwt_jwks_url).
        self.external = self.static is not None or self.jwks is not None
        #: Header text -> its checked fields, for headers of tokens whose signature
        #: verified. Decoding and checking a header is a pure function of its text,
        #: so a known text skips only the repeat of work already done on the same
        #: bytes; everything that depends on keys or settings (admit) runs every
        #: time, and the signature still covers the header. Filled only after a
        #: signature verifies, so forged tokens cannot crowd it. Measured: a cold
        #: HS256 token's header JSON and checks were ~15% of TokenVerifier.verify
        #: (line_profiler, benchmarks/jwt_overhead.py's tokens).
        self._headers: dict[str, _HeaderFields] = {}

    # -- the two front doors --------------------------------------------------

    def verify(self, token: str, now: float | None = None) -> VerifiedToken:
        try:
            parsed = self.parse(token)
            own = self.own
            if own is not None:
                # Our keys from the store: reread every refresh_interval, and for
                # a kid no key set holds at most once per OWN_KEY_REREAD_INTERVAL.
                own.prepare(parsed.kid if parsed.undecided else None)
                if parsed.undecided:
                    parsed = self.admit(parsed, final=True)
            jwks = self.jwks
            if jwks is not None and not parsed.own and not self._static_knows(parsed):
                jwks.prepare(parsed.kid)  # waits only when the token cannot do without a fetch
            return self.finish(parsed, now)
        except AuthError:
            raise
        except Exception as exc:  # defence in depth: a 401, never a 500
            raise _unexpected(exc) from None

    async def averify(self, token: str, now: float | None = None) -> VerifiedToken:
        try:
            parsed = self.parse(token)
            own = self.own
            if own is not None:
                # The same, with a blocking store's read in a thread, off the loop.
                await own.aprepare(parsed.kid if parsed.undecided else None)
                if parsed.undecided:
                    parsed = self.admit(parsed, final=True)
            jwks = self.jwks
            if jwks is not None and not parsed.own and not self._static_knows(parsed):
                await jwks.aprepare(parsed.kid)  # awaits the shared fetch, holds no thread
            return self.finish(parsed, now)
        except AuthError:
            raise
        except Exception as exc:
            raise _unexpected(exc) from None

    # -- steps ----------------------------------------------------------------

    def parse(self, token: str) -> _Parsed:
        """Shape and header checks: everything that needs no key."""
        match = _COMPACT.fullmatch(token)
        if match is None:
            _malformed(token)
        header_part, payload_part, signature_part = match.groups()
        known = self._headers.get(header_part)
        header, alg, kid = _header_fields(header_part) if known is None else known
        return self.admit(
            _Parsed(
                header,
                alg,
                kid,
                f"{header_part}.{payload_part}".encode("ascii"),
                _signature_bytes(signature_part),
                _b64decode(payload_part),
                header_text=header_part,
            )
        )

    def admit(self, parsed: _Parsed, *, final: bool = False) -> _Parsed:
        """Whose rules the token answers to, and its ``alg`` and ``typ`` under them.

        Decided on the header alone: our own issuer's rules when its ``kid``
        names one of our keys; the identity provider's when theirs, or when it
        names no key and they are trusted. A ``kid`` that no key set holds is
        ``undecided`` until ``final`` (after a reread of our keys); then it is
        ours only if nobody else is trusted, so that it fails with our rules.
        """
        own = self.own
        if own is not None:
            kid = parsed.kid
            parsed.undecided = False
            if kid is not None and kid in own.ring.by_kid:
                parsed.own = True
                return own.admit(parsed)
            if kid is not None and not final and not self._external_knows(kid):
                parsed.undecided = True
                return parsed
            if not self.external:
                parsed.own = True
                return own.admit(parsed)
        if parsed.alg not in self.algorithms:
            raise InvalidToken(algorithm_refused(self.algorithms))
        if self.typ is not None:
            typ = parsed.header.get("typ")
            if not isinstance(typ, str) or media_type(typ) != self.typ:
                raise InvalidToken(f"the token's type (typ) must be {self.typ}")
        return parsed

    def _external_knows(self, kid: str) -> bool:
        """Whether a key of the identity provider's (static or fetched) has this ``kid``."""
        static = self.static
        if static is not None and kid in static.by_kid:
            return True
        jwks = self.jwks
        ring = jwks.ring if jwks is not None else None
        return ring is not None and kid in ring.by_kid

    def finish(self, parsed: _Parsed, now: float | None = None) -> VerifiedToken:
        """Signature, then claims, by the rules :meth:`admit` chose."""
        if parsed.undecided:
            parsed = self.admit(parsed, final=True)
        own = self.own if parsed.own else None
        if own is not None:
            keys, model = own.candidates(parsed.kid, parsed.alg)
        else:
            keys = self._candidates(parsed)
            model = self._models[parsed.alg]
        # Every candidate came from KeyRing.candidates, which ran joserfc's
        # model.check_key on it (see jwtkeys.key_fits): a pure function of the
        # key and alg, no longer repeated per token (measured 6% of verify).
        for key in keys:
            try:
                if model.verify(parsed.signing_input, parsed.signature, key):
                    break
            except Exception:  # noqa: S112 - a library error is a failed check, never a 500
                continue
        else:
            raise InvalidToken("the token's signature does not verify")
        headers = self._headers
        if parsed.header_text not in headers:
            if len(headers) >= MAX_KNOWN_HEADERS:
                headers.clear()
            headers[parsed.header_text] = (
                MappingProxyType(dict(parsed.header)),  # shared from now on: read-only
                parsed.alg,
                parsed.kid,
            )
        claims = _json_object(parsed.payload, "payload")
        if own is not None:
            return own.check_claims(claims, time() if now is None else now)
        return self.check_claims(claims, time() if now is None else now)

    def _static_knows(self, parsed: _Parsed) -> bool:
        """Whether a static key is named by the token's ``kid`` (so no fetch is needed).

        Only an exact ``kid`` counts: a static key without one (a PEM) would
        otherwise stand in for every ``kid`` and hide the JWKS URL's keys.
        """
        static = self.static
        kid = parsed.kid
        return (
            static is not None
            and kid is not None
            and kid in static.by_kid
            and bool(static.candidates(kid, parsed.alg))
        )

    def _candidates(self, parsed: _Parsed) -> list[Key]:
        jwks = self.jwks
        static = self.static
        if jwks is None and static is not None:
            # Static keys alone: their memoized list as it is, not a copy per token.
            found = static.candidates(parsed.kid, parsed.alg)
            if found:
                return found
            return self._no_candidates(parsed)
        keys: list[Key] = []
        if static is not None:
            keys.extend(static.candidates(parsed.kid, parsed.alg))
        if jwks is not None:
            ring = jwks.ring
            if ring is None and not keys:
                raise TemporarilyUnavailable(
                    "the identity provider's keys cannot be fetched; try again shortly"
                )
            if ring is not None:
                keys.extend(ring.candidates(parsed.kid, parsed.alg))
        if not keys:
            return self._no_candidates(parsed)
        return keys

    @staticmethod
    def _no_candidates(parsed: _Parsed) -> NoReturn:
        if parsed.kid is not None:
            raise InvalidToken("no key with the token's kid can verify it")
        raise InvalidToken("no configured key can verify the token's algorithm")

    def check_claims(self, claims: dict[str, Any], now: float) -> VerifiedToken:
        exp = check_times(claims, now, self.leeway)
        if self.issuer is not None:
            check_issuer(claims, self.issuer)
        check_audience(claims, self.audience)
        return VerifiedToken(self._client(claims), exp + self.leeway)

    def _client(self, claims: dict[str, Any]) -> Client:
        client_id = None
        for name in self.client_id_claims:
            if claims.get(name) is not None:
                client_id = _client_id_claim(claims, name)
                break
        if client_id is None:
            names = " or ".join(self.client_id_claims)
            raise InvalidToken(f"the token names no client ({names})")
        tier = None
        if self.tier_claim is not None:
            tier = claims.get(self.tier_claim)
            if tier is not None and not isinstance(tier, str):
                raise InvalidToken(f"the token's {self.tier_claim} claim is not a string")
        # Positional: a frozen dataclass's keywords cost 0.23 us a token here (timeit).
        return Client(client_id, "jwt", scopes_of(claims), tier, None, MappingProxyType(claims))


# -- claim checks, shared with our own issuer's rules (issuer/own_tokens.py) --------


def check_times(claims: dict[str, Any], now: float, leeway: float) -> float:
    """``exp`` (required), ``nbf`` and ``iat``: the token's ``exp``, or InvalidToken."""
    exp = _time_claim(claims, "exp")
    if exp is None:
        raise InvalidToken("the token has no expiry (exp)")
    if now >= exp + leeway:
        raise InvalidToken("the token has expired")
    nbf = _time_claim(claims, "nbf")
    if nbf is not None and nbf > now + leeway:
        raise InvalidToken("the token is not valid yet (nbf)")
    iat = _time_claim(claims, "iat")
    if iat is not None and iat > now + leeway:
        raise InvalidToken("the token was issued in the future (iat)")
    return exp


def check_issuer(claims: dict[str, Any], issuer: str) -> None:
    iss = claims.get("iss")
    if not isinstance(iss, str) or iss != issuer:
        raise InvalidToken("the token's issuer (iss) is not the expected one")


def check_audience(claims: dict[str, Any], audience: frozenset[str]) -> None:
    if "aud" not in claims:
        if audience:
            raise InvalidToken("the token has no audience (aud)")
        return
    aud = claims["aud"]
    if isinstance(aud, str):
        values = [aud]
    elif isinstance(aud, list) and all(isinstance(v, str) for v in aud):
        values = aud
    else:
        raise InvalidToken("the token's audience (aud) is not a string or a list of strings")
    if not audience:
        # RFC 7519 section 4.1.3: a token meant for someone must name us.
        raise InvalidToken("the token names an audience (aud), and this API accepts none")
    if audience.isdisjoint(values):
        raise InvalidToken("the token is not meant for this audience (aud)")


def text_claim(claims: dict[str, Any], name: str) -> str:
    """A claim that must be a non-empty string of valid Unicode text."""
    value = claims.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidToken(f"the token's {name} claim is not a non-empty string")
    # isascii first: an ASCII string holds no surrogate, and it is 20x cheaper
    # than the search (timeit); nearly every client id is ASCII.
    if not value.isascii() and _LONE_SURROGATE.search(value):
        # JSON can spell one (\ud800), UTF-8 cannot: such an id could
        # name no counter in Redis (redis-py failed to encode it, an
        # "outage" that let it past every limit) nor a key's client.
        raise InvalidToken(f"the token's {name} claim is not valid Unicode text")
    return value


def _client_id_claim(claims: dict[str, Any], name: str) -> str:
    """The client id a token names, fit for the usage and alert tables it is written to.

    One they cannot hold (a NUL, which PostgreSQL text refuses; more than the
    Django columns' 255 characters, which also keeps it under PostgreSQL's
    index row limit) would fail every usage flush after it, every other
    client's counts included. Other control characters are taken, and escaped
    wherever they are shown (see Logging in the README).
    """
    value = text_claim(claims, name)
    if len(value) > MAX_TOKEN_CLIENT_ID_LENGTH:
        raise InvalidToken(
            f"the token's {name} claim is longer than {MAX_TOKEN_CLIENT_ID_LENGTH} characters"
        )
    if "\x00" in value:
        raise InvalidToken(f"the token's {name} claim holds a NUL character")
    return value


def algorithm_refused(algorithms: frozenset[str]) -> str:
    return f"the token's algorithm is not one of: {', '.join(sorted(algorithms))}"


def _unexpected(exc: Exception) -> InvalidToken:
    logger.warning("unexpected %s while verifying a JWT", type(exc).__name__)  # no token text
    return InvalidToken("the token cannot be verified")


def _time_claim(claims: dict[str, Any], name: str) -> float | None:
    if name not in claims:
        return None
    value = claims[name]
    try:
        if type(value) in (int, float) and math.isfinite(value):
            return float(value)
    except OverflowError:  # an integer too large for a float
        pass
    raise InvalidToken(f"the token's {name} claim is not a number")


#: ``scope`` strings -> their (immutable, so shareable) sets. A client's tokens carry
#: the same string; one set for all of them is one object less for each cached token
#: to allocate and for the garbage collector to walk (cold tokens measured ~2.7 us a
#: request for what their cache entries keep alive). Filled from verified tokens only.
_SCOPE_SETS: dict[str, frozenset[str]] = {}
MAX_KNOWN_SCOPES = 256


def scopes_of(claims: dict[str, Any]) -> frozenset[str]:
    """``scope`` (space-delimited, RFC 8693/9068) or ``scp`` (a list, or a string)."""
    for name in ("scope", "scp"):
        if name not in claims:
            continue
        value = claims[name]
        if isinstance(value, str):
            scopes = _SCOPE_SETS.get(value)
            if scopes is None:
                scopes = frozenset(value.split())
                if len(_SCOPE_SETS) >= MAX_KNOWN_SCOPES:
                    _SCOPE_SETS.clear()
                _SCOPE_SETS[value] = scopes
            return scopes
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return frozenset(value)
        raise InvalidToken(f"the token's {name} claim is not a string or a list of strings")
    return frozenset()


def media_type(value: str) -> str:
    """RFC 7515 section 4.1.9: ``typ`` compares case-insensitively, ``application/`` optional."""
    value = value.strip().lower()
    return value.removeprefix("application/")
