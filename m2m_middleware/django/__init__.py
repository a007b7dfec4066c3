"""Django integration: ``MIDDLEWARE = [..., "m2m_middleware.django.M2MAuthMiddleware"]``.

Settings come from the mapping ``settings.M2M_AUTH``. Add
``"m2m_middleware.django"`` to ``INSTALLED_APPS`` for the system checks, and
for ``key_store="django://"``: keys in the project's database (the ``APIKey``
model, after ``manage.py migrate``), managed in the admin.
"""

from __future__ import annotations

try:
    import django  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        'm2m_middleware.django needs Django: pip install "m2m-middleware[django]"'
    ) from exc

from .middleware import M2MAuthMiddleware, current_engine, get_client, require_scopes
from .store import DjangoKeyStore

__all__ = ["DjangoKeyStore", "M2MAuthMiddleware", "current_engine", "get_client", "require_scopes"]
