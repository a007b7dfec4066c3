"""System checks: bad ``M2M_AUTH`` settings show up in ``manage.py check``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, Warning, register

from ..errors import ConfigError
from ..limiting import open_limit_storage
from ..redaction import redact, secrets_of
from ..settings import Settings, invalidation_url
from ..stores import open_key_store

MIDDLEWARE_PATH = "m2m_middleware.django.M2MAuthMiddleware"


def _e002(exc: ConfigError) -> Error:
    if exc.suggestion is not None:
        hint = f"Rename '{exc.field}' to '{exc.suggestion}' in M2M_AUTH."
    else:
        hint = f"Fix the '{exc.field}' entry of M2M_AUTH."
    return Error(
        f"M2M_AUTH is invalid: {exc}",
        hint=hint,
        obj=exc.field,
        id="m2m_middleware.E002",
    )


def _check_key_store(config: Settings) -> None:
    """Open ``key_store`` as the engine will, see that revocations made through
    it can reach the other instances (``invalidation_url``), then close it again.

    Opening does no I/O (SQLite connects on first use, so no file is made);
    a store object passed in is left alone, open, for the engine to use.
    """
    try:
        store = open_key_store(config.key_store, prefix=config.key_prefix)
    except ConfigError:
        raise
    except Exception as exc:  # e.g. ValueError for a path with a NUL byte
        url = config.key_store
        secrets = secrets_of(url) if isinstance(url, str) else ()
        problem = redact(f"{url!r}: {exc}", secrets)
        raise ConfigError("key_store", problem) from None
    try:
        invalidation_url(config, store)  # whether revocations can reach other instances
    finally:
        if store is not config.key_store:
            store.close()


def _check_rate_limit_storage(config: Settings) -> None:
    """Build the limits storage as ``Limiter.__init__`` does, then stop its timer."""
    storage = open_limit_storage(config.rate_limit_storage)
    timer = getattr(storage, "timer", None)  # MemoryStorage's expiry thread
    if timer is not None:
        timer.cancel()


@register(Tags.security)
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    messages: list[CheckMessage] = []
    config = getattr(settings, "M2M_AUTH", None)
    if config is not None and not isinstance(config, (Mapping, Settings)):
        messages.append(
            Error(
                "M2M_AUTH must be a dict (or another mapping) of m2m-middleware settings.",
                hint='For example M2M_AUTH = {"default_limits": "100/second"}.',
                id="m2m_middleware.E001",
            )
        )
        return messages
    try:
        validated = config if isinstance(config, Settings) else Settings.from_mapping(config)
    except ConfigError as exc:
        messages.append(_e002(exc))
    else:
        # Settings accept any URL with '://'; the engine rejects what it cannot open.
        for check in (_check_key_store, _check_rate_limit_storage):
            try:
                check(validated)
            except ConfigError as exc:
                messages.append(_e002(exc))
        if "jwt" in validated.schemes and not (validated.jwt_audience or validated.jwt_issuer):
            messages.append(
                Warning(
                    "M2M_AUTH accepts JWTs without checking their audience or issuer: "
                    "any token these keys verify is accepted, whoever it was meant for.",
                    hint="Set jwt_audience (and jwt_issuer) in M2M_AUTH (RFC 8725 section 3.9).",
                    id="m2m_middleware.W002",
                )
            )
    # MIDDLEWARE may be a list or a tuple.
    if MIDDLEWARE_PATH not in (getattr(settings, "MIDDLEWARE", None) or ()):
        messages.append(
            Warning(
                f"{MIDDLEWARE_PATH} is not in MIDDLEWARE, so no request is authenticated.",
                hint=f'Add "{MIDDLEWARE_PATH}" to MIDDLEWARE.',
                id="m2m_middleware.W001",
            )
        )
    return messages


@register(Tags.security, deploy=True)
def check_deploy(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """``manage.py check --deploy``: as Django warns for ``SECURE_SSL_REDIRECT``
    (security.W008), a deployment that takes credentials over plain HTTP."""
    config = getattr(settings, "M2M_AUTH", None)
    try:
        validated = config if isinstance(config, Settings) else Settings.from_mapping(config)
    except (ConfigError, TypeError, AttributeError):
        return []  # reported by check_settings (E001, E002)
    if validated.require_https:
        return []
    return [
        Warning(
            "M2M_AUTH does not set require_https, so API keys and tokens are accepted over "
            "plain HTTP, where anyone on the path can read and replay them.",
            hint="Set require_https to True in M2M_AUTH (behind a TLS-terminating proxy, also "
            "set trusted_proxies to its networks so its X-Forwarded-Proto is believed).",
            id="m2m_middleware.W003",
        )
    ]
