"""Which characters may go where: text that reaches a route rule.

Request paths with control characters are refused before any rule sees
them, and rule globs match as frameworks route.
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
