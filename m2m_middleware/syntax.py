"""Which characters may go where: text that reaches a route rule or a log.

Request paths with control characters are refused before any rule sees
them, and rule globs match as frameworks route. Text that reaches a log line
is escaped so that no value can begin a line of its own.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable

#: C0, DEL and C1: never part of a path a client means, and each a way to make a
#: rule and a router disagree (Python's ``$`` matches before a final newline).
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
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
