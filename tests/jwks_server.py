"""A JWKS endpoint on 127.0.0.1 that answers at once, trickles, or stalls.

For the tests that show a slow identity provider cannot stall the service:
``mode = "trickle"`` sends the answer (status line, headers, body) one byte
every ``byte_interval`` seconds, so no socket read ever waits long enough for a
per-read timeout to fire (``"trickle-body"``: the headers at once, then the
body so); ``mode = "stall"`` reads the request and answers nothing. Either way
no answer lasts longer than ``limit`` seconds, and :meth:`SlowJWKS.close` ends
them all at once: the tests stay bounded.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class SlowJWKS:
    """With ``tls`` (a server-side context), it answers over HTTPS."""

    def __init__(
        self, document: dict[str, Any] | None = None, *, tls: ssl.SSLContext | None = None
    ) -> None:
        self.document: dict[str, Any] = document if document is not None else {"keys": []}
        self.cache_control = "max-age=300"
        self.mode = "fast"
        self.byte_interval = 0.5
        self.limit = 10.0
        self.hits = 0
        #: Set when a trickling or stalled answer has begun.
        self.slow_started = threading.Event()
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self.server = _Server(("127.0.0.1", 0), self._handler())
        self.scheme = "https" if tls is not None else "http"
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self.thread.start()

    @property
    def url(self) -> str:
        port = self.server.server_address[1]
        return f"{self.scheme}://127.0.0.1:{port}/.well-known/jwks.json"

    def close(self) -> None:
        self._closing.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def _answer(self) -> bytes:
        body = json.dumps(self.document).encode()
        head = (
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            f"Cache-Control: {self.cache_control}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        return head.encode("ascii") + body

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        jwks = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with jwks._lock:
                    jwks.hits += 1
                mode = jwks.mode
                answer = jwks._answer()
                if mode == "fast":
                    self.wfile.write(answer)
                    return
                jwks.slow_started.set()
                until = time.monotonic() + jwks.limit
                if mode == "stall":
                    jwks._closing.wait(jwks.limit)
                    return
                if mode == "trickle-body":  # the headers at once, then the body
                    split = answer.index(b"\r\n\r\n") + 4
                    self.wfile.write(answer[:split])
                    self.wfile.flush()
                    answer = answer[split:]
                for byte in answer:  # trickle
                    if time.monotonic() >= until or jwks._closing.wait(jwks.byte_interval):
                        return
                    try:
                        self.wfile.write(bytes((byte,)))
                        self.wfile.flush()
                    except OSError:  # the client gave up: what the tests want to see
                        return

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler
