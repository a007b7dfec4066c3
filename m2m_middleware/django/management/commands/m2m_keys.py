"""``manage.py m2m_keys create|list|revoke|rotate``: ``m2m keys`` on the project's key store.

The same actions, options and output as the ``m2m keys`` command line, with
``--store`` defaulting to ``settings.M2M_AUTH["key_store"]`` (keys are made
with the project's ``key_prefix``) and ``--notify`` to its Redis
``invalidation_url``, so a revocation reaches the running instances at once.
"""

from __future__ import annotations

import argparse
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from ....cli import keys_main
from ....errors import ConfigError
from ....settings import Settings, invalidation_url
from ....stores import open_key_store


class Command(BaseCommand):
    help = (
        "Create, list, revoke and rotate API keys in the key store of settings.M2M_AUTH: "
        "the same actions and options as `m2m keys` (try `m2m_keys create --help`)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "args",
            nargs=argparse.REMAINDER,
            metavar="ACTION ...",
            help="create, list, revoke or rotate, and its options",
        )

    def handle(self, *args: str, **options: Any) -> None:
        try:
            config = Settings.from_mapping(getattr(settings, "M2M_AUTH", None))
            store = open_key_store(config.key_store, prefix=config.key_prefix)
        except ConfigError as exc:
            raise CommandError(f"M2M_AUTH is invalid: {exc}", returncode=2) from None
        try:
            try:
                notify = invalidation_url(config, store)
            except ConfigError as exc:
                raise CommandError(f"M2M_AUTH is invalid: {exc}", returncode=2) from None
            code = keys_main(
                args or ["--help"], prog="manage.py m2m_keys", store=store, notify=notify
            )
        finally:
            if store is not config.key_store:  # opened here: close it again
                store.close()
        if code:
            # keys_main has already said what went wrong, on stderr.
            raise SystemExit(code)
