"""The one identity every credential kind turns into."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Client:
    """An authenticated caller.

    It also quacks like Starlette's ``BaseUser`` (``is_authenticated``,
    ``display_name``, ``identity``), so ``request.user`` works unchanged.
    """

    client_id: str
    scheme: Literal["api_key", "jwt"]
    scopes: frozenset[str] = frozenset()
    tier: str | None = None
    key_id: str | None = None
    claims: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def display_name(self) -> str:
        return self.client_id

    @property
    def identity(self) -> str:
        return self.client_id

    def has_scopes(self, *scopes: str) -> bool:
        return self.scopes.issuperset(scopes)
