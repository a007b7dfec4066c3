"""Secrets out of every message, log record and repr: the one place that knows
where connection strings keep them.

A store, limit storage, bus or JWKS URL can carry a secret in three spellings:

- userinfo: ``redis://user:PASSWORD@host``, ``redis://:PASSWORD@host``;
- a query parameter: ``?password=``, ``?token=``, ``?sslpassword=``,
  ``?access_token=``, ``?api_key=``, ``?sig=`` ... (libpq, redis-py and signed
  JWKS URLs all take them);
- a libpq keyword DSN: ``host=db password=PASSWORD`` (quoted as ``'...'``
  when it holds a space).

:func:`redact` masks all three wherever they appear in a text, and also each
secret it is given, because libraries quote a password apart from its URL
(libpq echoes the part of a DSN it cannot parse, limits the URI it was given).
Hand-written: no well-kept library does this for arbitrary URLs and DSNs
(SQLAlchemy's ``URL.render_as_string`` knows only its own URLs and userinfo).
User names and host names are not secrets and stay, so messages still say
which server and which account.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import unquote, urlsplit

MASK = "***"

#: ``user:password@`` in ``scheme://user:password@host``, and in the URLs with
#: a slash too few or too many that a typo makes. The password runs to the
#: last ``@`` before a space or a quote, so an unencoded ``@`` or ``/`` in it
#: is masked too (the host may go with it in such a URL: more hidden, never
#: less). ``(?!//)`` keeps ``scheme:`` itself from passing for a user name.
_USERINFO = re.compile(r"([^\s'\"@:/]*:)(?!//)[^\s'\"]*@")

#: Query parameters whose value is a secret.
_MASKED_PARAMETERS = (
    r"[A-Za-z0-9_.\-]*(?:password|passwd|pwd|secret|token|api[_\-]?key|apikey|signature"
    r"|credential)[A-Za-z0-9_.\-]*|pass|key|sig|auth|access[_\-]?key"
)
_QUERY = re.compile(rf"([?&;](?:{_MASKED_PARAMETERS})=)[^&;#\s'\"]*", re.IGNORECASE)

#: libpq keyword DSNs: ``password=...`` or ``password = '...'`` after a space.
_KEYWORD = re.compile(
    r"((?:^|[\s,(])(?:ssl)?password\s*=\s*)(?:'(?:[^'\\]|\\.)*'?|[^\s'\"]+)", re.IGNORECASE
)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every secret in it replaced by ``***``.

    ``secrets`` are strings known to be secret (see :func:`secrets_of`),
    masked wherever they occur, longest first.
    """
    for secret in sorted(set(secrets), key=len, reverse=True):
        if secret:
            text = text.replace(secret, MASK)
    if "=" in text or "@" in text:  # all three patterns need one of them
        text = _USERINFO.sub(rf"\1{MASK}@", text)
        text = _QUERY.sub(rf"\1{MASK}", text)
        text = _KEYWORD.sub(rf"\1{MASK}", text)
    return text


def secrets_of(url: str) -> tuple[str, ...]:
    """The secrets in ``url`` (a URL or a keyword DSN) as spelt and as decoded."""
    found: set[str] = set()
    try:
        password = urlsplit(url).password
    except ValueError:  # an invalid port, say: the patterns still apply
        password = None
    if password:
        found.update((password, unquote(password)))
    for match in _QUERY.finditer(url):
        value = url[match.end(1) : match.end()]
        found.update((value, unquote(value)))
    for match in _KEYWORD.finditer(url):
        value = url[match.end(1) : match.end()]
        if value.startswith("'"):
            found.add(re.sub(r"\\(.)", r"\1", value.strip("'")))
        found.add(value)
    return tuple(secret for secret in found if secret)


def redact_url(url: str) -> str:
    """``url`` fit for a message, a log record or a repr."""
    return redact(url, secrets_of(url))
