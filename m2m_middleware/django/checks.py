"""System checks: bad ``M2M_AUTH`` settings show up in ``manage.py check``."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, Warning, register

from ..errors import ConfigError
from ..settings import Settings

MIDDLEWARE_PATH = "m2m_middleware.django.M2MAuthMiddleware"


@register(Tags.security)
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    messages: list[CheckMessage] = []
    config = getattr(settings, "M2M_AUTH", None)
    if config is not None and not isinstance(config, dict):
        messages.append(
            Error(
                "M2M_AUTH must be a dict of m2m-middleware settings.",
                hint='For example M2M_AUTH = {"default_limits": "100/second"}.',
                id="m2m_middleware.E001",
            )
        )
        return messages
    try:
        Settings.from_mapping(config)
    except ConfigError as exc:
        messages.append(
            Error(
                f"M2M_AUTH is invalid: {exc}",
                hint=f"Fix the '{exc.field}' entry of M2M_AUTH.",
                obj=exc.field,
                id="m2m_middleware.E002",
            )
        )
    if MIDDLEWARE_PATH not in getattr(settings, "MIDDLEWARE", []):
        messages.append(
            Warning(
                f"{MIDDLEWARE_PATH} is not in MIDDLEWARE, so no request is authenticated.",
                hint=f'Add "{MIDDLEWARE_PATH}" to MIDDLEWARE.',
                id="m2m_middleware.W001",
            )
        )
    return messages
