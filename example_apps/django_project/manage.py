#!/usr/bin/env python
"""Django's command-line utility for the m2m-middleware example project.

Run the example: ``python example_apps/django_project/manage.py runserver 127.0.0.1:8001``.
"""

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_project.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
