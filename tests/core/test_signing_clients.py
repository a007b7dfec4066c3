"""The client signers (m2m_middleware.signing_clients) against the server's verifier.

httpx (sync and async) and requests sign through a real uvicorn: the server
side is a bare ASGI app that hands what it received to
:class:`~m2m_middleware.signatures.SignatureVerifier`, as the engine does, so
the bytes the client signed are the bytes the server checks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import requests
import servers
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from m2m_middleware import Settings
from m2m_middleware.errors import InvalidSignature
from m2m_middleware.request_view import RequestView, joined_headers, wsgi_headers
from m2m_middleware.signatures import (
    MemoryNonces,
    SignatureVerifier,
    asgi_request_path,
    target_uri,
    wsgi_request_path,
)
from m2m_middleware.signing_clients import (
    HttpxSignatureAuth,
    RequestsSignatureAuth,
    load_private_key,
)

KEY_ID = "key_client_42"


def _pem(private: Any) -> str:
    return (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


class VerifyingApp:
    """ASGI: 200 with the body echoed when the request is signed by ``pem``, else 401."""

    def __init__(self) -> None:
        self.pem = ""
        self.verifier = SignatureVerifier(Settings(key_store="memory://"), MemoryNonces())

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        view = RequestView(
            scope["method"],
            scope["path"],
            headers=joined_headers(
                [(k.decode(), v.decode("latin-1")) for k, v in scope["headers"]]
            ),
            query=scope["query_string"].decode("latin-1"),
            scheme=scope["scheme"],
            body=body,
        )
        uri = target_uri(view, path=asgi_request_path(scope))
        try:
            await self.verifier.averify(view, KEY_ID, self.pem, uri)
        except InvalidSignature as exc:
            status, answer = 401, exc.detail.encode()
        else:
            status, answer = 200, body
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": answer})


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[VerifyingApp, str]]:
    app = VerifyingApp()
    with servers.uvicorn_in_thread(app) as url:
        yield app, url


@pytest.fixture(params=["ed25519", "p256"])
def private_key(request: pytest.FixtureRequest, server: tuple[VerifyingApp, str]) -> Any:
    key: Any = (
        ed25519.Ed25519PrivateKey.generate()
        if request.param == "ed25519"
        else ec.generate_private_key(ec.SECP256R1())
    )
    server[0].pem = _pem(key)
    return key


def test_httpx_signs_what_the_server_verifies(
    server: tuple[VerifyingApp, str], private_key: Any
) -> None:
    _, url = server
    with httpx.Client(base_url=url, auth=HttpxSignatureAuth(KEY_ID, private_key)) as client:
        posted = client.post("/orders", json={"item": "widget", "n": 3})
        assert posted.status_code == 200, posted.text
        assert posted.json() == {"item": "widget", "n": 3}
        fetched = client.get("/orders/a b/caf\u00e9", params={"q": "\u00e9 x", "page": 2})
        assert fetched.status_code == 200, fetched.text
        assert client.delete("/orders/1").status_code == 200


def test_httpx_async_signs_what_the_server_verifies(
    server: tuple[VerifyingApp, str], private_key: Any
) -> None:
    _, url = server

    async def send() -> list[int]:
        auth = HttpxSignatureAuth(KEY_ID, private_key)
        async with httpx.AsyncClient(base_url=url, auth=auth) as client:
            answers = await asyncio.gather(
                *(client.put(f"/orders/{i}", content=b"x" * i) for i in range(5))
            )
        return [a.status_code for a in answers]

    assert asyncio.run(send()) == [200] * 5


def test_requests_signs_what_the_server_verifies(
    server: tuple[VerifyingApp, str], private_key: Any
) -> None:
    _, url = server
    with requests.Session() as session:
        session.auth = RequestsSignatureAuth(KEY_ID, private_key)
        posted = session.post(f"{url}/orders", json={"item": "widget"}, timeout=10)
        assert posted.status_code == 200, posted.text
        text = session.post(f"{url}/notes", data="caf\u00e9 \u2603", timeout=10)
        assert text.status_code == 200, text.text
        assert text.content == "caf\u00e9 \u2603".encode()
        fetched = session.get(f"{url}/orders", params={"q": "a b"}, timeout=10)
        assert fetched.status_code == 200, fetched.text


class VerifyingWSGIApp:
    """The WSGI twin of :class:`VerifyingApp`, mounted below ``/api`` (SCRIPT_NAME)."""

    def __init__(self) -> None:
        self.pem = ""
        self.verifier = SignatureVerifier(Settings(key_store="memory://"), MemoryNonces())

    def __call__(self, environ: Any, start_response: Any) -> list[bytes]:
        environ["SCRIPT_NAME"], environ["PATH_INFO"] = "/api", environ["PATH_INFO"][4:]
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        view = RequestView(
            environ["REQUEST_METHOD"],
            environ["PATH_INFO"],
            headers=wsgi_headers(environ),
            query=environ.get("QUERY_STRING", ""),
            scheme=environ["wsgi.url_scheme"],
            body=body,
        )
        try:
            uri = target_uri(view, path=wsgi_request_path(environ))
            self.verifier.verify(view, KEY_ID, self.pem, uri)
        except InvalidSignature as exc:
            start_response("401 Unauthorized", [])
            return [exc.detail.encode()]
        start_response("200 OK", [])
        return [body]


def test_requests_signs_what_a_mounted_wsgi_server_verifies(private_key: Any) -> None:
    """wsgiref: a real socket and HTTP parser, PATH_INFO in its PEP 3333 (latin-1) form."""
    import threading
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    app = VerifyingWSGIApp()
    app.pem = _pem(private_key)
    httpd = make_server("127.0.0.1", 0, app, handler_class=Quiet)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{httpd.server_port}/api"
    try:
        with requests.Session() as session:
            session.auth = RequestsSignatureAuth(KEY_ID, private_key)
            for path in ("/orders", "/caf\u00e9/a b"):
                answer = session.post(f"{url}{path}?q=1", json={"a": 1}, timeout=10)
                assert answer.status_code == 200, (path, answer.text)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def test_the_request_path_helpers_give_the_path_as_sent() -> None:
    assert asgi_request_path({"raw_path": b"/api/caf%C3%A9?x=1", "path": "/caf\u00e9"}) == (
        "/api/caf%C3%A9"
    )
    assert asgi_request_path({"path": "/x"}) is None
    assert wsgi_request_path({"RAW_URI": "/api/a%2Fb?x=1", "PATH_INFO": "/a/b"}) == "/api/a%2Fb"
    assert wsgi_request_path({"REQUEST_URI": "/a%20b", "PATH_INFO": "/a b"}) == "/a%20b"
    pep3333 = "/caf\u00e9".encode().decode("latin-1")
    assert wsgi_request_path({"SCRIPT_NAME": "/api", "PATH_INFO": pep3333}) == "/api/caf%C3%A9"
    assert wsgi_request_path({"PATH_INFO": "/\u2603"}) == "/%E2%98%83"  # not latin-1 text
    # A raw URI without the mount prefix (werkzeug's test client; a proxy that strips
    # the prefix and reports it): the client sent the prefix, so it is put back.
    assert wsgi_request_path({"SCRIPT_NAME": "/api", "REQUEST_URI": "/echo?x=1"}) == "/api/echo"
    assert wsgi_request_path({"SCRIPT_NAME": "/api", "RAW_URI": "/api/echo"}) == "/api/echo"
    assert wsgi_request_path({}) == "/"
    assert wsgi_request_path({"RAW_URI": "http://proxy-form/x", "PATH_INFO": "/x"}) == "/x"


def test_a_replayed_signed_request_is_refused_by_the_server(
    server: tuple[VerifyingApp, str], private_key: Any
) -> None:
    _, url = server
    auth = HttpxSignatureAuth(KEY_ID, private_key)
    request = auth(httpx.Request("POST", f"{url}/pay", content=b'{"amount": 10}'))
    with httpx.Client() as client:
        assert client.send(request).status_code == 200
        again = httpx.Request("POST", f"{url}/pay", content=b'{"amount": 10}')
        again.headers.update({k: request.headers[k] for k in ("signature", "signature-input")})
        again.headers["content-digest"] = request.headers["content-digest"]
        replayed = client.send(again)
    assert replayed.status_code == 401
    assert "used before" in replayed.text


def test_a_request_signed_by_another_key_is_refused(server: tuple[VerifyingApp, str]) -> None:
    app, url = server
    app.pem = _pem(ed25519.Ed25519PrivateKey.generate())
    auth = HttpxSignatureAuth(KEY_ID, ed25519.Ed25519PrivateKey.generate())
    with httpx.Client(base_url=url, auth=auth) as client:
        assert client.get("/orders").status_code == 401


def test_a_streamed_body_is_refused_on_the_client() -> None:
    key = ed25519.Ed25519PrivateKey.generate()

    def chunks() -> Iterator[bytes]:
        yield b"a"

    with pytest.raises(ValueError, match="streamed"):
        HttpxSignatureAuth(KEY_ID, key)(httpx.Request("POST", "https://x.test/", content=chunks()))
    prepared = requests.Request("POST", "https://x.test/", data=chunks()).prepare()
    with pytest.raises(ValueError, match="streamed"):
        RequestsSignatureAuth(KEY_ID, key)(prepared)


def test_a_signed_request_carries_what_a_signed_route_requires() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    request = HttpxSignatureAuth(KEY_ID, key)(
        httpx.Request("POST", "https://api.example.com/x", content=b"{}")
    )
    signature_input = request.headers["signature-input"]
    for part in ['"@method"', '"@target-uri"', '"content-digest"', "created=", "nonce="]:
        assert part in signature_input
    assert f'keyid="{KEY_ID}"' in signature_input
    assert 'alg="ed25519"' in signature_input
    assert request.headers["content-digest"].startswith("sha-256=:")
    empty = HttpxSignatureAuth(KEY_ID, key)(httpx.Request("GET", "https://api.example.com/x"))
    assert "content-digest" not in empty.headers


def test_private_keys_load_from_pem_and_only_ed25519_or_p256() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    assert isinstance(load_private_key(pem), ec.EllipticCurvePrivateKey)
    assert isinstance(load_private_key(pem.decode()), ec.EllipticCurvePrivateKey)
    with pytest.raises(ValueError, match="P-256"):
        load_private_key(ec.generate_private_key(ec.SECP384R1()))
    rsa_pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(ValueError, match="RSA"):
        load_private_key(rsa_pem)
    with pytest.raises(TypeError):
        load_private_key(object())  # type: ignore[arg-type]


def test_the_private_key_is_never_in_a_repr() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    raw = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    for auth in (HttpxSignatureAuth(KEY_ID, raw), RequestsSignatureAuth(KEY_ID, raw)):
        shown = repr(auth) + str(auth) + repr(vars(auth))
        assert "PRIVATE" not in shown
        assert raw.decode().splitlines()[1] not in shown
        assert KEY_ID in repr(auth)


def test_a_retried_request_is_signed_again_with_a_fresh_nonce() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    auth = HttpxSignatureAuth(KEY_ID, key)
    request = auth(httpx.Request("POST", "https://api.example.com/x", content=b'{"a": 1}'))
    first = request.headers["signature-input"]
    auth(request)  # httpx re-runs auth on a retry; the digest is kept, the nonce is new
    assert request.headers["signature-input"] != first
    assert len(request.headers.get_list("signature")) == 1
    view = RequestView(
        "POST",
        "/x",
        headers={k: v for k, v in request.headers.items()},
        scheme="https",
        body=request.content,
    )
    verifier = SignatureVerifier(Settings(key_store="memory://"), MemoryNonces())
    verifier.verify(view, KEY_ID, _pem(key), target_uri(view))
