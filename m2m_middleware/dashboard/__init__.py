"""A read-only page of a key store: clients, keys, requests over time, alerts.

``m2m dashboard --store URL`` serves it (:mod:`.server`); :mod:`.page` builds
the HTML and :mod:`.charts` the inline SVG charts, which the Django admin also
shows on a key's page.
"""

from __future__ import annotations

from .charts import usage_chart
from .server import DashboardApp, make_dashboard_server

__all__ = ["DashboardApp", "make_dashboard_server", "usage_chart"]
