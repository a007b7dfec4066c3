"""Where a request came from: the client address and scheme, as trusted proxies report them.

``Forwarded`` (RFC 7239), ``X-Forwarded-For`` and ``X-Forwarded-Proto`` are
believed only when the peer (the socket's other end) is in ``trusted_proxies``.
The chain is walked from the right, the hop nearest us first, and the walk
stops at the first hop that is not itself a trusted proxy: everything left of
it was written by a party we do not trust. Any client can send these headers,
so from a peer outside those networks they are ignored altogether.

Hand-written rather than taken from a library: werkzeug's ``ProxyFix`` counts
hops instead of trusting networks and reads no ``Forwarded``; uvicorn's
``ProxyHeadersMiddleware`` reads no ``Forwarded`` either, and neither is
framework-free. The parsing is small and every malformed value (an obfuscated
``_hidden`` identifier, ``unknown``, a quoted IPv6 address with a port, garbage)
makes an unknown address, never an exception.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

from .request_view import RequestView

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network

#: Which proxy headers are read: both kinds ("auto"; a request carrying both
#: ``Forwarded`` and ``X-Forwarded-For``/``-Proto`` is then believed in neither,
#: since a proxy that writes one passes a client's forgery of the other on), or one.
#: Believed in neither means an unknown client over plain HTTP, not the proxy's own
#: request: the proxy's address may be in a key's ``allowed_cidrs`` (an internal
#: network), and its socket to us may be TLS while the client's was not.
PROXY_HEADER_CHOICES = ("auto", "forwarded", "x-forwarded")
#: At most this many hops of a chain are read; a longer one is cut on the left.
MAX_HOPS = 32
_PEERS_CACHED = 1024
#: Resolved (peer, proxy headers) -> (address, https), so a client that keeps
#: coming through the same proxy costs a dict lookup, not a parse: parsing an
#: X-Forwarded-For hop with ipaddress takes 2-3 us (cProfile, CPython 3.11),
#: most of a cached API-key request's 3.5 us. Cleared when full: distinct
#: header values cost what they would uncached, and no more memory than this.
_RESOLVED_CACHED = 4096
#: The schemes that mean the client's connection to us was encrypted.
_SECURE = frozenset(("https", "wss"))

#: One RFC 7239 forwarded-pair: token "=" ( token / quoted-string ).
_PAIR = re.compile(r'\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;,\s"]*)\s*')


def parse_address(text: str | None) -> Address | None:
    """An IP address as proxies and servers write it, or None.

    Takes ``203.0.113.7``, ``203.0.113.7:4711``, ``2001:db8::1``,
    ``[2001:db8::1]:4711``, quoted forms of those; an IPv4-mapped IPv6
    address (``::ffff:203.0.113.7``) is its IPv4 address. ``unknown``, an
    obfuscated identifier (``_hidden``) and anything else: None.
    """
    if not text:
        return None
    text = text.strip().strip('"').strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:  # IPv4 with a port; an IPv6 address has two or more
        text = text.partition(":")[0]
    if "%" in text:  # a zone id names an interface of the sender, not an address
        return None
    try:
        address = ip_address(text)
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """CIDR strings -> networks; ValueError naming the first bad one.

    Host bits must be zero (``10.0.0.1/8`` is refused: it is ambiguous); a
    bare address is its own /32 or /128.
    """
    networks: list[Network] = []
    for value in values:
        if not isinstance(value, str):
            raise ValueError(f"expected CIDR text like '10.0.0.0/8', got {value!r}")
        try:
            network = ip_network(value.strip(), strict=True)
        except ValueError as exc:
            raise ValueError(f"{value[:60]!r} is not a network in CIDR notation ({exc})") from None
        if isinstance(network, IPv6Network):
            mapped = network.network_address.ipv4_mapped
            if mapped is not None and network.prefixlen >= 96:  # ::ffff:a.b.c.d/n
                network = IPv4Network(f"{mapped}/{network.prefixlen - 96}")
        networks.append(network)
    return tuple(networks)


def normalised_cidrs(values: Iterable[str]) -> tuple[str, ...]:
    """CIDRs as a key stores them: validated, in canonical form, without repeats."""
    if isinstance(values, str):
        values = [values]
    return tuple(dict.fromkeys(str(n) for n in parse_networks(values)))


def address_in(address: str | None, networks: tuple[Network, ...]) -> bool:
    """True when ``address`` (text) is in one of ``networks``; an unknown address is in none."""
    parsed = parse_address(address)
    if parsed is None:
        return False
    # IPv4Address in IPv6Network (and the reverse) is False, never an error.
    return any(parsed in network for network in networks)


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def _forwarded_elements(header: str) -> list[dict[str, str]] | None:
    """RFC 7239 section 4: elements split on commas outside quoted strings, each a
    mapping of lower-case parameter -> unquoted value; None when the header does
    not follow that grammar anywhere in it.

    Strict, because the header is the client's text with each proxy's element
    appended: a client that leaves a quote open (``for=203.0.113.9;x="``) makes
    the proxy's first quote close it, and the proxy's own address is left over
    as garbage. Skipping the garbage made the client's element the rightmost
    hop, so it chose its address and ``proto``; a header that does not parse
    says nothing about who sent it."""
    elements: list[dict[str, str]] = []
    position = 0
    current: dict[str, str] = {}
    length = len(header)
    while len(elements) <= 4 * MAX_HOPS:
        match = _PAIR.match(header, position)
        if match is not None:
            current.setdefault(match.group(1).lower(), _unquote(match.group(2)))
            position = match.end()
        else:  # an empty pair (";;", ",,") or not a pair at all: see what follows
            while position < length and header[position] in " \t":
                position += 1
        if position >= length:
            break
        separator = header[position]
        if separator == ",":
            elements.append(current)
            current = {}
        elif separator != ";":
            return None
        position += 1
    elements.append(current)
    return elements


class Transport:
    """Resolves a request's client address and whether it arrived over HTTPS."""

    def __init__(self, trusted: tuple[Network, ...], proxy_headers: str = "auto") -> None:
        self.trusted = trusted
        self.proxy_headers = proxy_headers
        self._peers: dict[str, bool] = {}
        self._resolved: dict[
            tuple[str, bool, str | None, str | None, str | None], tuple[str | None, bool]
        ] = {}

    def is_trusted(self, address: str | None) -> bool:
        """True when ``address`` (a peer as the server gave it) is a trusted proxy."""
        if address is None or not self.trusted:
            return False
        known = self._peers.get(address)
        if known is None:
            known = address_in(address, self.trusted)
            if len(self._peers) >= _PEERS_CACHED:
                self._peers.clear()
            self._peers[address] = known
        return known

    def resolve(self, view: RequestView) -> tuple[str | None, bool]:
        """(client address as text, or None when unknown; True when the client used HTTPS)."""
        peer = view.client_address
        https = view.scheme in _SECURE
        if peer is None or not self.trusted:
            return peer, https
        trusted = self._peers.get(peer)
        if trusted is None:
            trusted = self.is_trusted(peer)
        if not trusted:
            return peer, https
        forwarded, xff, xfp = view.proxy_headers()
        choice = self.proxy_headers
        if choice != "auto":
            if choice == "forwarded":
                xff = xfp = None
            else:
                forwarded = None
        if forwarded is None and xff is None and xfp is None:
            return peer, https
        # A tuple of what the server and the headers said: no string is built to
        # find a chain resolved before.
        key = (peer, https, forwarded, xff, xfp)
        found = self._resolved.get(key)
        if found is None:
            found = self._resolve(forwarded, xff, xfp, peer, https)
            if len(self._resolved) >= _RESOLVED_CACHED:
                self._resolved.clear()
            self._resolved[key] = found
        return found

    def _resolve(
        self,
        forwarded: str | None,
        xff: str | None,
        xfp: str | None,
        peer: str | None,
        https: bool,
    ) -> tuple[str | None, bool]:
        if forwarded is not None and (xff is not None or xfp is not None):
            return None, False  # "auto" and both kinds: see PROXY_HEADER_CHOICES
        if forwarded is not None:
            return self._from_forwarded(forwarded, peer, https)
        return self._from_x_forwarded(xff, xfp, peer, https)

    def _walk(self, hops: list[str]) -> tuple[int, str | None]:
        """The index (into ``hops``) of the client and its address: the first hop from
        the right that is not a trusted proxy (or the leftmost if all are)."""
        index = len(hops) - 1
        while index >= 0:
            address = parse_address(hops[index])
            if address is None:
                return index, None
            text = str(address)
            if index == 0 or not self.is_trusted(text):
                return index, text
            index -= 1
        return 0, None  # pragma: no cover - hops is never empty

    def _from_forwarded(
        self, header: str, peer: str | None, https: bool
    ) -> tuple[str | None, bool]:
        parsed = _forwarded_elements(header)
        if parsed is None:
            return None, False  # unknown, and nothing says the client used HTTPS
        elements = parsed[-MAX_HOPS:]
        hops = [element.get("for", "") for element in elements]
        index, address = self._walk(hops)
        proto = elements[index].get("proto", "").lower()
        return address, (proto == "https") if proto else https

    def _from_x_forwarded(
        self, xff: str | None, xfp: str | None, peer: str | None, https: bool
    ) -> tuple[str | None, bool]:
        address = peer
        protos = [p.strip().lower() for p in xfp.split(",")][-MAX_HOPS:] if xfp else []
        index = -1
        hops: list[str] = []
        if xff is not None:
            hops = xff.split(",")[-MAX_HOPS:]
            index, address = self._walk(hops)
        if protos:
            # One proto per hop: the client's. Else the one the nearest proxy
            # wrote (rightmost): what werkzeug's ProxyFix reads, too.
            proto = protos[index] if len(protos) == len(hops) and index >= 0 else protos[-1]
            https = proto == "https"
        return address, https
