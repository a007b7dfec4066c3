"""The neutral view of a request that the core reads, whatever framework it came through.

Each adapter builds one from what its server handed it (an ASGI scope, a
WSGI environ, a Django ``HttpRequest``) without copying what no check needs:
the headers are decoded only when first asked for, and the body is there
only when the adapter was told to read it (see :attr:`Engine.endpoints`).
Anchors: whitenoise's neutral ``get_response(method, headers)``, Starlette's
``HTTPConnection`` over a scope.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

#: Headers as an adapter can give them cheaply: lower-case name -> value, with
#: repeated fields joined by ", " (RFC 9110 section 5.3).
Headers = Mapping[str, str]

#: The largest body the middleware reads for an endpoint it answers itself.
#: A token request is a few hundred bytes; anything near this is not one.
MAX_ENDPOINT_BODY = 16 * 1024


#: (``Forwarded``, ``X-Forwarded-For``, ``X-Forwarded-Proto``): what
#: :class:`~m2m_middleware.transport.Transport` reads of a request from a trusted proxy.
ProxyHeaders = tuple[str | None, str | None, str | None]


class RequestView:
    """Method, path, query, headers, client address, scheme, and the body when read.

    ``body`` is None when the client sent more than the adapter would read.
    The adapters build the subclasses below (:class:`AsgiView`, :class:`WsgiView`),
    which read their server's own structures on demand; this one takes a mapping
    or a loader of one, for tests and callers of the engine without a server.
    """

    __slots__ = (
        "_find",
        "_headers",
        "_load_headers",
        "_query",
        "body",
        "client_address",
        "method",
        "path",
        "raw_path",
        "scheme",
    )

    def __init__(
        self,
        method: str,
        path: str,
        *,
        headers: Headers | Callable[[], Headers],
        query: str = "",
        scheme: str = "http",
        client_address: str | None = None,
        body: bytes | None = b"",
        find_header: Callable[[str], str | None] | None = None,
    ) -> None:
        self.method = method
        self.path = path
        self._query = query
        self.scheme = scheme
        self.client_address = client_address
        self.body = body
        #: The path as the client sent it, mount prefix included (a signed request's
        #: ``@target-uri``); None: ``path`` encoded again stands for it.
        self.raw_path: str | None = None
        #: One header by lower-case name without decoding them all (an environ
        #: lookup, a scan of raw ASGI pairs): what a check that reads two or
        #: three headers uses, until something has decoded them all anyway.
        self._find = find_header
        if callable(headers):
            self._headers: Headers | None = None
            self._load_headers: Callable[[], Headers] | None = headers
        else:
            self._headers = headers
            self._load_headers = None

    @property
    def query(self) -> str:
        """The query string, without the ``?``."""
        return self._query

    @property
    def headers(self) -> Headers:
        """Lower-case header name -> value, decoded on first use."""
        headers = self._headers
        if headers is None:
            assert self._load_headers is not None
            headers = self._headers = self._load_headers()
        return headers

    def header(self, name: str) -> str | None:
        """One header's value (``name`` in lower case; repeated fields joined), or None."""
        headers = self._headers
        if headers is None:
            find = self._find
            if find is not None:
                return find(name)
            headers = self.headers
        return headers.get(name)

    def proxy_headers(self) -> ProxyHeaders:
        """``Forwarded``, ``X-Forwarded-For``, ``X-Forwarded-Proto`` (None where absent)."""
        header = self.header
        return header("forwarded"), header("x-forwarded-for"), header("x-forwarded-proto")

    def __repr__(self) -> str:
        # Never the headers or the body: they hold credentials.
        return f"{type(self).__name__}(method={self.method!r}, path={self.path!r})"


# The two views below are what the adapters make per request when a transport
# setting is on. Each is slotted, takes its arguments positionally and keeps a
# reference to the server's own structure instead of a closure, a header index
# and a bound method made per request. Measured (timeit, best of 9 x 100k,
# CPython 3.11, a shared 2-core machine, ASGI, 6 headers): the view 1.0 -> 0.36 us;
# the view plus Transport.resolve through a trusted proxy 2.4 -> 0.95 us.


class AsgiView(RequestView):
    """A view of an ASGI scope: its raw header pairs are decoded only when read.

    ``proxy`` is the proxy headers, when the adapter collected them in its one
    pass over the pairs (it does when ``trusted_proxies`` is set); else they
    are looked up when a trusted proxy's request needs them.
    """

    __slots__ = ("_proxy", "_raw", "_raw_query")

    def __init__(
        self,
        method: str,
        path: str,
        raw: list[tuple[bytes, bytes]],
        scheme: str,
        client_address: str | None,
        raw_query: bytes = b"",
        body: bytes | None = b"",
        proxy: ProxyHeaders | None = None,
    ) -> None:
        self.method = method
        self.path = path
        self._raw = raw
        self.scheme = scheme
        self.client_address = client_address
        self._raw_query = raw_query
        self.body = body
        self.raw_path = None
        self._proxy = proxy
        self._headers = None

    @property
    def query(self) -> str:
        return self._raw_query.decode("latin-1")

    @property
    def headers(self) -> Headers:
        headers = self._headers
        if headers is None:
            headers = self._headers = joined_headers(
                [(n.decode("latin-1"), v.decode("latin-1")) for n, v in self._raw]
            )
        return headers

    def header(self, name: str) -> str | None:
        headers = self._headers
        if headers is not None:
            return headers.get(name)
        return asgi_header(self._raw, name)

    def proxy_headers(self) -> ProxyHeaders:
        proxy = self._proxy
        if proxy is None:
            proxy = self._proxy = asgi_proxy_headers(self._raw)
        return proxy


class WsgiView(RequestView):
    """A view of a WSGI environ (also Django's ``request.META``): each header is a dict get."""

    __slots__ = ("_environ",)

    def __init__(
        self,
        method: str,
        path: str,
        environ: Mapping[str, Any],
        scheme: str,
        body: bytes | None = b"",
    ) -> None:
        self.method = method
        self.path = path
        self._environ = environ
        self.scheme = scheme
        self.client_address = environ.get("REMOTE_ADDR")
        self.body = body
        self.raw_path = None
        self._headers = None

    @property
    def query(self) -> str:
        return str(self._environ.get("QUERY_STRING") or "")

    @property
    def headers(self) -> Headers:
        headers = self._headers
        if headers is None:
            headers = self._headers = wsgi_headers(self._environ)
        return headers

    def header(self, name: str) -> str | None:
        return wsgi_header(self._environ, name)

    def proxy_headers(self) -> ProxyHeaders:
        get = self._environ.get
        forwarded = get("HTTP_FORWARDED")
        xff = get("HTTP_X_FORWARDED_FOR")
        xfp = get("HTTP_X_FORWARDED_PROTO")
        return (
            forwarded if isinstance(forwarded, str) and forwarded else None,
            xff if isinstance(xff, str) and xff else None,
            xfp if isinstance(xfp, str) and xfp else None,
        )


def joined_headers(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """``[(name, value), ...]`` -> ``{lower name: value}``, repeated fields joined."""
    headers: dict[str, str] = {}
    for name, value in pairs:
        name = name.lower()
        known = headers.get(name)
        headers[name] = value if known is None else f"{known}, {value}"
    return headers


def asgi_header(raw: list[tuple[bytes, bytes]], name: str) -> str | None:
    """One header of an ASGI scope's raw pairs (names already lower case, per the
    ASGI spec), repeated fields joined; only that one value is decoded."""
    wanted = name.encode("latin-1")
    found: bytes | None = None
    for key, value in raw:
        if key == wanted:
            found = value if found is None else found + b", " + value
    return found.decode("latin-1") if found is not None else None


def asgi_proxy_headers(raw: list[tuple[bytes, bytes]]) -> ProxyHeaders:
    """The proxy headers of an ASGI scope's raw pairs, in one pass over them."""
    forwarded = xff = xfp = None
    for key, value in raw:
        if key == b"x-forwarded-for":
            text = value.decode("latin-1")
            xff = text if xff is None else f"{xff}, {text}"
        elif key == b"x-forwarded-proto":
            text = value.decode("latin-1")
            xfp = text if xfp is None else f"{xfp}, {text}"
        elif key == b"forwarded":
            text = value.decode("latin-1")
            forwarded = text if forwarded is None else f"{forwarded}, {text}"
    return forwarded, xff, xfp


def _environ_key(name: str) -> str:
    key = name.upper().replace("-", "_")
    return key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + key


#: The environ keys of the headers the checks read on every request, spelled once.
_ENVIRON_KEYS = {
    name: _environ_key(name) for name in ("forwarded", "x-forwarded-for", "x-forwarded-proto")
}


def wsgi_header(environ: Mapping[str, object], name: str) -> str | None:
    """One header of a WSGI environ (also Django's ``request.META``), by lower-case name."""
    value = environ.get(_ENVIRON_KEYS.get(name) or _environ_key(name))
    return value if isinstance(value, str) and value else None


def wsgi_headers(environ: Mapping[str, object]) -> dict[str, str]:
    """The headers of a WSGI environ (PEP 3333; also Django's ``request.META``)."""
    headers: dict[str, str] = {}
    for key, value in environ.items():
        if not isinstance(value, str):
            continue
        if key.startswith("HTTP_"):
            headers[key[5:].replace("_", "-").lower()] = value
        elif key in ("CONTENT_TYPE", "CONTENT_LENGTH") and value:
            headers[key.replace("_", "-").lower()] = value
    return headers
