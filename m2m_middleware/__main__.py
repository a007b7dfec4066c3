"""``python -m m2m_middleware``: the ``m2m`` command."""

from __future__ import annotations

from .cli import main

raise SystemExit(main())
