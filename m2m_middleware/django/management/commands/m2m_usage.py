"""``manage.py m2m_usage``: ``m2m usage`` on the project's key store.

The same options and output as the ``m2m usage`` command line (a table with
totals, ``--json``, or ``--csv`` for the billing export), with ``--store``
defaulting to ``settings.M2M_AUTH["key_store"]``.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from ....cli import add_usage_arguments, usage_with_options
from ....errors import ConfigError
from ....settings import Settings
from ....stores import open_key_store


class Command(BaseCommand):
    help = (
        "Requests counted per client, key and period in the key store of settings.M2M_AUTH: "
        "the same options and output as `m2m usage`."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        # On Django's own parser, so --help lists them beside Django's options and
        # call_command("m2m_usage", by="month", csv=True) works.
        add_usage_arguments(parser, store_help="key-store URL (default: M2M_AUTH's key_store)")

    def handle(self, *args: str, **options: Any) -> None:
        try:
            config = Settings.from_mapping(getattr(settings, "M2M_AUTH", None))
            store = open_key_store(config.key_store, prefix=config.key_prefix)
        except ConfigError as exc:
            raise CommandError(f"M2M_AUTH is invalid: {exc}", returncode=2) from None
        try:
            code = usage_with_options(options, prog="manage.py m2m_usage", store=store)
        finally:
            if store is not config.key_store:  # opened here: close it again
                store.close()
        if code:
            # usage_with_options has already said what went wrong, on stderr.
            raise SystemExit(code)
