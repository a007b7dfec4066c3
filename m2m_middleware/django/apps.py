from __future__ import annotations

from django.apps import AppConfig


class M2MMiddlewareConfig(AppConfig):
    name = "m2m_middleware.django"
    label = "m2m_middleware"
    verbose_name = "M2M API keys"

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers the system checks)
