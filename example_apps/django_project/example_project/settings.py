"""Minimal settings for the m2m-middleware Django example. Not for production."""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

# INSECURE development default: set DJANGO_SECRET_KEY to a real secret anywhere else.
SECRET_KEY = os.environ.get(
    "DJANGO_SECRET_KEY", "django-insecure-m2m-example-dev-only-do-not-use-in-production"
)
DEBUG = os.environ.get("DJANGO_DEBUG", "0") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = ["m2m_middleware.django"]  # adds the M2M_AUTH system checks
MIDDLEWARE = ["m2m_middleware.django.M2MAuthMiddleware"]

ROOT_URLCONF = "example_project.urls"
WSGI_APPLICATION = "example_project.wsgi.application"
ASGI_APPLICATION = "example_project.asgi.application"

DATABASES: dict[str, dict[str, str]] = {}  # nothing here needs a database
USE_TZ = True

M2M_AUTH = {
    "key_store": os.environ.get("M2M_KEY_STORE", "sqlite:///example_keys.db"),
    "default_limits": "10/second;1000/day",
    "public_paths": ["/health"],
    "routes": [{"path": "/orders*", "scopes": ["orders:read"]}],
}
if os.environ.get("M2M_SIGNING_SECRET"):  # seals the token service's signing keys
    M2M_AUTH.update(
        schemes=["api_key", "jwt"],
        token_endpoint="/oauth/token",
        token_issuer="http://127.0.0.1:8001",  # the iss of its tokens; use your https URL
    )
