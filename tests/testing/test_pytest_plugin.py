"""``m2m_middleware.testing``, the pytest plugin for users' own tests, as users run it.

Each test writes a small project of a user's (an app, a conftest that opts
in, test files) and runs pytest on it in a fresh process (pytester), as
``pytest`` in that project would: Django's settings can be configured once
per process, and the plugin must work without this suite's conftest.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import pytest

pytestmark = pytest.mark.slow

#: Warnings fail the users' runs too, except Starlette 1.x's own about httpx in its TestClient.
STRICT = ("-p", "no:cacheprovider", "-W", "error", "-W", "ignore:Using `httpx` with:UserWarning")

SECRET = "a-test-only-hmac-secret-of-at-least-32-bytes"

OPT_IN = 'pytest_plugins = ["m2m_middleware.testing"]\n'


def write(pytester: pytest.Pytester, **files: str) -> None:
    pytester.makepyfile(**{name: textwrap.dedent(text) for name, text in files.items()})


# -- Flask ----------------------------------------------------------------------------------

FLASK_CONFTEST = f"""
    import pytest
    from flask import Flask
    from werkzeug.middleware.proxy_fix import ProxyFix

    from m2m_middleware.flask import M2MAuth, current_client, require_scopes

    pytest_plugins = ["m2m_middleware.testing"]


    def create_app():
        app = Flask(__name__)
        app.config["M2M_AUTH"] = {{
            "key_store": "memory://",
            "api_key_header": "X-Service-Key",
            "schemes": ["api_key", "jwt"],
            "jwt_keys": "{SECRET}",
            "jwt_issuer": "https://issuer.test/",
            "jwt_audience": ["orders-api", "other-api"],
            "jwt_tier_claim": "plan",
            "tiers": {{"gold": "1000/second"}},
            "default_limits": "100/second",
        }}
        app.wsgi_app = ProxyFix(app.wsgi_app)
        M2MAuth(app)

        @app.get("/orders")
        @require_scopes("orders:read")
        def orders():
            return {{"client": current_client.client_id, "tier": current_client.tier}}

        @app.get("/whoami")
        def whoami():
            return {{"client": current_client.client_id, "scheme": current_client.scheme}}

        return app


    @pytest.fixture(scope="session")
    def app():
        return create_app()


    @pytest.fixture
    def client(app):
        return app.test_client()
"""

FLASK_TESTS = """
    from m2m_middleware import IssuedKey
    from m2m_middleware.testing import IssuedTestKey

    LEFT_OVER = []


    def test_a_key_with_scopes_and_tier(client, m2m_key):
        key = m2m_key(scopes=["orders:read"], tier="gold", client_id="billing")
        assert isinstance(key, IssuedKey) and isinstance(key, IssuedTestKey)
        assert key.headers == {"X-Service-Key": key.key}  # the app's own header
        response = client.get("/orders", headers=key.headers)
        assert response.status_code == 200, response.json
        assert response.json == {"client": "billing", "tier": "gold"}
        assert client.get("/orders", headers=key.bearer_headers).status_code == 200
        assert key.key not in repr(key)
        LEFT_OVER.append(key.headers)


    def test_keys_end_with_their_test(client):
        # The session's app still runs; the key the test above made does not.
        response = client.get("/whoami", headers=LEFT_OVER[0])
        assert response.status_code == 401
        assert response.json["error"] == "invalid_token"


    def test_headers_carry_a_key_without_scopes(client, m2m_headers):
        assert client.get("/whoami", headers=m2m_headers).json == {
            "client": "test-client",
            "scheme": "api_key",
        }
        assert client.get("/orders", headers=m2m_headers).json["error"] == "insufficient_scope"


    def test_a_token_the_app_accepts(client, m2m_token):
        token = m2m_token(scopes="orders:read", tier="gold", client_id="svc")
        response = client.get("/orders", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200, response.json
        assert response.json == {"client": "svc", "tier": "gold"}


    def test_tokens_the_app_refuses(client, m2m_token):
        for token in (
            m2m_token(expires_in=-1),
            m2m_token(claims={"aud": "someone-else"}),
            m2m_token(claims={"iss": "https://elsewhere.test/"}),
        ):
            response = client.get("/whoami", headers={"Authorization": f"Bearer {token}"})
            assert response.status_code == 401, token


    def test_the_settings_and_store_are_the_apps(app, m2m_settings, m2m_store, m2m_engine):
        from m2m_middleware.flask import M2MAuth

        assert m2m_engine is M2MAuth.engine(app)
        assert m2m_settings is m2m_engine.settings
        assert m2m_settings.jwt_issuer == "https://issuer.test/"
        assert m2m_store is m2m_engine.store
"""


def test_flask(pytester: pytest.Pytester) -> None:
    write(pytester, conftest=FLASK_CONFTEST, test_orders=FLASK_TESTS)
    result = pytester.runpytest_subprocess(*STRICT)
    result.assert_outcomes(passed=6)


# -- Starlette ------------------------------------------------------------------------------

STARLETTE_APP = f"""
    from starlette.applications import Starlette
    from starlette.authentication import requires
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from m2m_middleware import Settings
    from m2m_middleware.starlette import M2MMiddleware


    @requires("orders:read")
    async def orders(request):
        return JSONResponse({{"client": request.user.client_id}})


    async def whoami(request):
        return JSONResponse({{"client": request.user.client_id, "tier": request.user.tier}})


    ROUTES = [Route("/orders", orders), Route("/whoami", whoami)]
    SETTINGS = Settings(
        key_store="memory://",
        schemes=("api_key", "jwt"),
        jwt_keys="{SECRET}",
        jwt_typ="at+jwt",
        jwt_client_id_claims=("azp", "sub"),
        routes=[{{"path": "/orders", "scopes": ["orders:read"]}}],
    )


    def create_app():
        app = Starlette(routes=ROUTES)
        app.add_middleware(M2MMiddleware, settings=SETTINGS)
        return app


    def wrapped_app():
        # Any ASGI app, wrapped by hand.
        return M2MMiddleware(Starlette(routes=ROUTES), settings=SETTINGS)
"""

STARLETTE_TESTS = """
    import pytest
    from starlette.testclient import TestClient

    from myapp import create_app, wrapped_app


    @pytest.fixture(params=["add_middleware", "wrapped"])
    def app(request):
        return create_app() if request.param == "add_middleware" else wrapped_app()


    @pytest.fixture
    def client(app):
        with TestClient(app) as client:
            yield client


    def test_orders(client, m2m_key):
        key = m2m_key(scopes=["orders:read"])
        assert client.get("/orders", headers=key.headers).json() == {"client": "test-client"}
        assert client.get("/orders", headers=m2m_key().headers).status_code == 403


    def test_a_token(client, m2m_token):
        token = m2m_token(client_id="svc")
        response = client.get("/whoami", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200, response.text
        assert response.json() == {"client": "svc", "tier": None}


    def test_the_engine_is_the_one_serving(app, m2m_engine, m2m_store):
        assert m2m_store is m2m_engine.store
        assert m2m_engine.settings.jwt_typ == "at+jwt"
"""

#: No ``app`` fixture: the app is found through the test's client.
STARLETTE_CLIENT_ONLY = """
    import pytest
    from starlette.testclient import TestClient

    from myapp import create_app


    @pytest.fixture
    def client():
        return TestClient(create_app())


    def test_found_through_the_client(client, m2m_headers):
        assert client.get("/whoami", headers=m2m_headers).status_code == 200
"""


def test_starlette_with_the_plugin_named_on_the_command_line(pytester: pytest.Pytester) -> None:
    write(
        pytester,
        myapp=STARLETTE_APP,
        test_orders=STARLETTE_TESTS,
        test_client_only=STARLETTE_CLIENT_ONLY,
    )
    result = pytester.runpytest_subprocess("-p", "m2m_middleware.testing", *STRICT)
    result.assert_outcomes(passed=7)


# -- Django ---------------------------------------------------------------------------------

DJANGO_CONFTEST = f"""
    pytest_plugins = ["m2m_middleware.testing"]


    def pytest_configure():
        from django.conf import settings

        settings.configure(
            SECRET_KEY="test-only",
            ALLOWED_HOSTS=["*"],
            ROOT_URLCONF="urls",
            INSTALLED_APPS=["m2m_middleware.django"],
            MIDDLEWARE=["m2m_middleware.django.M2MAuthMiddleware"],
            DATABASES={{"default": {{"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}}},
            USE_TZ=True,
            M2M_AUTH={{
                "key_store": "memory://",
                "schemes": ["api_key", "jwt"],
                "jwt_keys": "{SECRET}",
                "jwt_audience": "orders-api",
                "public_paths": ["/health"],
            }},
        )
"""

DJANGO_URLS = """
    from django.http import JsonResponse
    from django.urls import path

    from m2m_middleware.django import require_scopes


    @require_scopes("orders:read")
    async def orders(request):
        return JsonResponse({"client": request.m2m_client.client_id})


    def whoami(request):
        return JsonResponse({"client": request.m2m_client.client_id})


    urlpatterns = [path("orders", orders), path("whoami", whoami)]
"""

DJANGO_TESTS = """
    import pytest


    def test_orders(client, m2m_key):
        key = m2m_key(scopes=["orders:read"])
        assert client.get("/orders", headers=key.headers).json() == {"client": "test-client"}
        assert client.get("/orders", headers=m2m_key().headers).status_code == 403


    async def _call(async_client, headers):
        return await async_client.get("/orders", headers=headers)


    def test_async_client(async_client, m2m_key):
        import asyncio

        key = m2m_key(scopes=["orders:read"])
        assert asyncio.run(_call(async_client, key.headers)).status_code == 200


    def test_a_token(client, m2m_token):
        token = m2m_token(client_id="svc")
        response = client.get("/whoami", headers={"Authorization": f"Bearer {token}"})
        assert response.json() == {"client": "svc"}


    @pytest.fixture
    def keys_in_the_database(settings):
        settings.M2M_AUTH = {**settings.M2M_AUTH, "key_store": "django://"}


    @pytest.mark.django_db
    def test_keys_in_the_projects_database(keys_in_the_database, client, m2m_key, m2m_store):
        from m2m_middleware.django import DjangoKeyStore
        from m2m_middleware.django.models import APIKey

        assert isinstance(m2m_store, DjangoKeyStore)
        key = m2m_key(scopes=["orders:read"])
        assert APIKey.objects.filter(key_id=key.key_id).exists()
        assert client.get("/orders", headers=key.headers).status_code == 200


    def test_the_settings_are_m2m_auth(settings, m2m_settings):
        assert m2m_settings.jwt_audience == ("orders-api",)
        assert m2m_settings.public_paths == ("/health",)
"""


def test_django_with_pytest_django(pytester: pytest.Pytester) -> None:
    write(pytester, conftest=DJANGO_CONFTEST, urls=DJANGO_URLS, test_views=DJANGO_TESTS)
    result = pytester.runpytest_subprocess(*STRICT)
    result.assert_outcomes(passed=5)


# -- what cannot work says why ---------------------------------------------------------------

MISTAKES = """
    import pytest
    from flask import Flask

    from m2m_middleware import Settings
    from m2m_middleware.flask import M2MAuth


    def test_no_app_to_find(m2m_key):
        pass


    class TestAnAppWithoutJWTs:
        @pytest.fixture
        def app(self):
            app = Flask(__name__)
            M2MAuth(app, settings=Settings(key_store="memory://"))
            return app

        def test_token(self, m2m_token):
            pass


    class TestAnAppWithPublicKeysOnly:
        @pytest.fixture
        def app(self):
            app = Flask(__name__)
            settings = Settings(
                key_store="memory://",
                schemes=("jwt",),
                jwt_jwks_url="https://idp.test/.well-known/jwks.json",
            )
            M2MAuth(app, settings=settings)
            return app

        def test_token(self, m2m_token):
            pass


    class TestSettingsOfMyOwnWithAMemoryStore:
        @pytest.fixture
        def m2m_settings(self):
            return Settings(key_store="memory://")

        def test_key(self, m2m_key):
            pass


    class TestSettingsOfMyOwnWithAFileStore:
        @pytest.fixture
        def m2m_settings(self, tmp_path):
            return Settings(key_store=f"sqlite:///{tmp_path}/keys.db", api_key_header="X-Key")

        def test_key(self, m2m_key, m2m_store):
            key = m2m_key(scopes=["a"])
            assert key.headers == {"X-Key": key.key}
            assert m2m_store.get_key(key.key_id).scopes == {"a"}


    class TestMySignersPrivateKey:
        PRIVATE = None

        @pytest.fixture
        def m2m_signing_key(self):
            from joserfc.jwk import RSAKey

            type(self).PRIVATE = RSAKey.generate_key(2048, private=True)
            return type(self).PRIVATE.as_dict(private=True)

        @pytest.fixture
        def m2m_settings(self, m2m_signing_key):
            public = self.PRIVATE.as_dict(private=False)
            return Settings(key_store="memory://", schemes=("jwt",), jwt_keys={"keys": [public]})

        def test_token(self, m2m_settings, m2m_token):
            from m2m_middleware import Engine

            engine = Engine(m2m_settings)
            outcome = engine.check("GET", "/", f"Bearer {m2m_token(scopes=['a'])}", None)
            assert outcome.allowed, outcome
            assert outcome.client.scopes == {"a"}
"""


def test_what_cannot_work_says_why(pytester: pytest.Pytester) -> None:
    write(pytester, conftest=OPT_IN, test_mistakes=MISTAKES)
    result = pytester.runpytest_subprocess(*STRICT, "-rE")
    result.assert_outcomes(passed=2, errors=4)
    result.stdout.fnmatch_lines_random(
        [
            "*test_no_app_to_find*found no app protected by m2m-middleware: define an `app`*",
            "*TestAnAppWithoutJWTs*does not accept JWTs (schemes=*'api_key'*): add 'jwt'*",
            "*TestAnAppWithPublicKeysOnly*verifies JWTs with jwt_jwks_url*m2m_signing_key*",
            "*TestSettingsOfMyOwnWithAMemoryStore*key_store='memory://'*MemoryKeyStore()*",
        ]
    )
    # The errors are the plugin's sentences, not tracebacks from inside it.
    assert "m2m_middleware/testing.py" not in result.stdout.str()


# -- what the plugin is and is not ------------------------------------------------------------


def test_it_imports_no_framework() -> None:
    code = (
        "import sys, m2m_middleware.testing; "
        "print(sorted(m for m in ('flask', 'django', 'starlette', 'werkzeug') if m in sys.modules))"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert output.strip() == "[]"


def test_it_is_never_loaded_unasked() -> None:
    # pytest loads every pytest11 entry point of every installed distribution.
    assert not [ep for ep in entry_points(group="pytest11") if ep.value.startswith("m2m")]
