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

#: Headers as an adapter can give them cheaply: lower-case name -> value, with
#: repeated fields joined by ", " (RFC 9110 section 5.3).
Headers = Mapping[str, str]

#: The largest body the middleware reads for an endpoint it answers itself.
#: A token request is a few hundred bytes; anything near this is not one.
MAX_ENDPOINT_BODY = 16 * 1024


class RequestView:
    """Method, path, query, headers, client address, scheme, and the body when read.

    ``body`` is None when the client sent more than the adapter would read.
    """

    __slots__ = (
        "_find",
        "_headers",
        "_load_headers",
        "body",
        "client_address",
        "method",
        "path",
        "query",
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
        self.query = query
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

    def __repr__(self) -> str:
        # Never the headers or the body: they hold credentials.
        return f"RequestView(method={self.method!r}, path={self.path!r})"


def joined_headers(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """``[(name, value), ...]`` -> ``{lower name: value}``, repeated fields joined."""
    headers: dict[str, str] = {}
    for name, value in pairs:
        name = name.lower()
        known = headers.get(name)
        headers[name] = value if known is None else f"{known}, {value}"
    return headers


class AsgiHeaderIndex:
    """One header of an ASGI scope's raw pairs at a time, without decoding them all.

    The first lookup indexes the raw pairs by their (already lower-case, per the
    ASGI spec) byte names; each lookup decodes one value. Three lookups this way
    cost about a third of decoding every header (python -m timeit, 6 headers).
    """

    __slots__ = ("_index", "_raw")

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self._raw = raw
        self._index: dict[bytes, bytes] | None = None

    def get(self, name: str) -> str | None:
        index = self._index
        if index is None:
            raw = self._raw
            index = self._index = dict(raw)  # in C; a repeated field needs the loop below
            if len(index) != len(raw):
                index.clear()
                for key, value in raw:
                    known = index.get(key)
                    index[key] = value if known is None else known + b", " + value
        found = index.get(name.encode("latin-1"))
        return found.decode("latin-1") if found is not None else None


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
