"""Shared by the Flask and Starlette examples' tests."""

import os

# The keys the tests make live in memory, never in the examples' key file.
# Set before the apps are imported (Starlette's documented way to configure
# an app for its tests); the Flask app reads it when create_app() runs.
os.environ["M2M_KEY_STORE"] = "memory://"

pytest_plugins = ["m2m_middleware.testing"]
