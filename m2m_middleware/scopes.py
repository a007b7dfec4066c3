"""What ``require_scopes`` decides, written once for the three adapters.

Flask, Django and Starlette each wrap their own kind of view, but the decision
(who is let in) and the answer (status, headers, problem body) are made here, so
a refused request gets the same ``Denied`` in every framework, the one the
engine's route rules give.
"""

from __future__ import annotations

from collections.abc import Iterable

from .client import Client
from .errors import ConfigError, InsufficientScope, MissingCredentials
from .outcome import Denied, deny
from .syntax import check_scope


def scope_tokens(scopes: Iterable[object], where: str) -> tuple[str, ...]:
    """``scopes``, each an RFC 6749 scope token (:func:`~.syntax.check_scope`, the rule
    route rules and keys follow too), or a ConfigError naming ``where`` that says
    how to write what was probably meant."""
    tokens: list[str] = []
    for scope in scopes:
        if callable(scope):
            raise ConfigError(
                where,
                f"expected scope strings, got the function {scope!r}; "
                f'write @{where}("orders:read"), with parentheses',
            )
        if not isinstance(scope, str) and isinstance(scope, Iterable):
            raise ConfigError(
                where,
                f"expected scope strings, got {scope!r}; pass each scope as an argument "
                f'of its own: {where}("orders:read", "orders:write")',
            )
        try:
            tokens.append(check_scope(scope))
        except ValueError as exc:
            hint = ""
            parts = scope.split(" ") if isinstance(scope, str) else []
            if len(parts) > 1 and all(_is_token(part) for part in parts):
                shown = ", ".join(f'"{part}"' for part in parts)
                hint = f"; for several scopes pass each as an argument of its own: {where}({shown})"
            raise ConfigError(where, f"{exc}{hint}") from None
    return tuple(tokens)


def _is_token(text: str) -> bool:
    try:
        check_scope(text)
    except ValueError:
        return False
    return True


class ScopeRequirement:
    """The scopes one view needs: who it admits, and the answer for everyone else.

    Built once, when the view is decorated, so a bad scope is refused at import
    time and a request pays for one subset test.
    """

    __slots__ = ("_detail", "_needed", "scopes")

    def __init__(self, scopes: Iterable[object], where: str = "require_scopes") -> None:
        self._needed = frozenset(scope_tokens(scopes, where))
        #: The scopes, sorted: as the challenge and the problem body name them.
        self.scopes = tuple(sorted(self._needed))
        self._detail = f"this view needs the scope(s): {' '.join(self.scopes)}"

    def admits(self, client: Client | None) -> bool:
        return client is not None and self._needed <= client.scopes

    def refuse(self, client: Client | None, realm: str) -> Denied:
        """The answer for a request :meth:`admits` turned away.

        401 ``missing_credentials`` with no client (a public path), else 403
        ``insufficient_scope`` naming every scope the view needs, as a route rule
        would; the Denied names the client, for the audit.
        """
        if client is None:
            return deny(MissingCredentials("this view needs an authenticated client"), realm)
        return deny(InsufficientScope(self._detail, scopes=self.scopes), realm, client=client)
