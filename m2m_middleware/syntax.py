"""Which characters may go where: text that reaches a response header, a route rule or a log.

Configured text that ends up in response headers (scopes, tier names, the
realm) is checked once, at configuration and at key creation, so that no
response can carry a CR/LF or a character outside latin-1. Request paths with
control characters are refused before any rule sees them. Text that reaches a
log line is escaped so that no value can begin a line of its own.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable

#: RFC 6749 section 3.3: ``scope-token = 1*( %x21 / %x23-5B / %x5D-7E )``.
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
#: Tier names and realms: printable ASCII without the quote and the backslash, so
#: they sit in a quoted string (``realm="..."``, ``RateLimit-Policy: "tier.gold-60s"``)
#: with nothing to escape.
_QUOTABLE = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]*")
#: C0, DEL and C1: never part of a path a client means, and each a way to make a
#: rule and a router disagree (Python's ``$`` matches before a final newline).
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: What a client id may not hold: control characters, line and paragraph
#: separators (both end a line in many viewers) and lone surrogates (no UTF-8).
_NOT_IN_CLIENT_ID = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
#: The longest client id a token may name: the usage and alert tables' columns
#: (``UsageCount.client_id``, ``AlertRecord.subject``) hold 255 characters.
MAX_TOKEN_CLIENT_ID_LENGTH = 255

_SCOPE_RULE = (
    "a scope is one or more printable ASCII characters without spaces, "
    'quotes (") or backslashes (RFC 6749 section 3.3)'
)
_QUOTABLE_RULE = 'printable ASCII without quotes (") or backslashes'
# Values are shown with !a (ascii): the character at fault is the point of the
# message, and a look-alike (Cyrillic "a" for "a") would otherwise hide it.


def check_scope(scope: object) -> str:
    """``scope`` itself, or ValueError saying why it cannot be a scope."""
    if not isinstance(scope, str):
        raise ValueError(f"expected a scope string, got {scope!r}")
    if not _SCOPE_TOKEN.fullmatch(scope):
        raise ValueError(f"invalid scope {scope!a}: {_SCOPE_RULE}")
    return scope


def check_tier(tier: object) -> str:
    """``tier`` itself, or ValueError: tier names appear in ``RateLimit-Policy``."""
    if not isinstance(tier, str) or not tier:
        raise ValueError(f"expected a non-empty tier name, got {tier!r}")
    if not _QUOTABLE.fullmatch(tier):
        raise ValueError(f"invalid tier name {tier!a}: a tier name is {_QUOTABLE_RULE}")
    return tier


def check_realm(realm: object) -> str:
    if not isinstance(realm, str) or not _QUOTABLE.fullmatch(realm):
        raise ValueError(f"expected {_QUOTABLE_RULE}, got {realm!a}")
    return realm


def check_client_id(client_id: object) -> str:
    if not isinstance(client_id, str) or not client_id.strip():
        raise ValueError("client_id must be a non-empty string")
    if _NOT_IN_CLIENT_ID.search(client_id):
        raise ValueError(
            f"invalid client id {client_id!a}: control characters, line separators "
            "and lone surrogates are not allowed"
        )
    return client_id


# -- paths ---------------------------------------------------------------------------


def exact_glob_pattern(globs: Iterable[str]) -> re.Pattern[str]:
    """One pattern for ``globs`` (``*`` matches across ``/``), matched on the path as is."""
    return re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs))


def glob_pattern(globs: Iterable[str]) -> re.Pattern[str]:
    """One pattern for ``globs`` that matches with or without one trailing slash.

    Match it against :func:`slashed` of the path: a path ``p`` is matched when
    ``p``, or ``p`` with one trailing slash added or removed, matches a glob.
    Frameworks route both spellings to one view (Flask's
    ``strict_slashes=False``, Starlette's slash redirects, Django's
    ``APPEND_SLASH``), so a route rule must not tell them apart either.
    Testing the slashed form against ``glob`` and ``glob + "/"`` covers all
    three spellings with ``fnmatch``'s own translation, in one match.
    """
    parts = [f"(?:{fnmatch.translate(g)})|(?:{fnmatch.translate(g + '/')})" for g in globs]
    return re.compile("|".join(parts))


def slashed(path: str) -> str:
    """``path`` with a trailing slash: what :func:`glob_pattern` patterns are matched on."""
    return path if path[-1:] == "/" else path + "/"


# -- log lines -------------------------------------------------------------------------


def log_safe(value: str) -> str:
    """``value`` fit for one field of a space-separated log line, unambiguously.

    A backslash becomes ``\\\\``, a space ``\\x20``, and every character that
    ``str.isprintable`` refuses (C0, DEL, C1, U+0085, U+2028, U+2029, bidi
    controls, lone surrogates...) its Python escape (``\\n``, ``\\x85``,
    ``\\u2028``), so no value can start a line or a field of its own, and an
    escape in the output always comes from this function. Not ``repr`` (adds
    quotes, escapes quotes) nor ``unicode_escape`` (would escape every
    non-ASCII letter too).
    """
    if value.isprintable() and "\\" not in value and " " not in value:
        return value  # the common case: one C call and two scans
    return "".join(_escape_char(ch) for ch in value)


def _escape_char(ch: str) -> str:
    if ch == " ":
        return "\\x20"
    if ch == "\\" or not ch.isprintable():
        return repr(ch)[1:-1]
    return ch
