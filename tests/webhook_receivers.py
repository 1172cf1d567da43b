"""Real HTTP receivers on localhost for webhook tests: a threaded http.server per receiver.

Each answer is decided by `behave(n)`, called with the 1-based number of the request; it
returns (status, headers, body) and may sleep. Every request is recorded.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Answer = tuple[int, dict[str, str], bytes]


def ok(_n: int) -> Answer:
    return 200, {}, b"thanks"


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.time() when it arrived
    peer: tuple[str, int] = ("", 0)  # the sender's address and port: one per connection


@dataclass
class Receiver:
    url: str
    requests: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    release: threading.Event = field(default_factory=threading.Event)  # ends deliberate sleeps

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.requests) >= count:
                    return list(self.requests)
            time.sleep(0.01)
        raise AssertionError(f"expected {count} request(s) at {self.url}, "
                             f"got {len(self.requests)}")


@contextmanager
def receiver(behave: Callable[[int], Answer] = ok,
             tls: ssl.SSLContext | None = None) -> Iterator[Receiver]:
    """A receiver on a free port; https:// with `tls` (a server-side context)."""
    box: dict[str, Any] = {}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length)
            rec: Receiver = box["receiver"]
            with rec.lock:
                rec.requests.append(Received(self.path, {k.lower(): v for k, v in
                                                         self.headers.items()}, body,
                                             time.time(), self.client_address[:2]))
                number = len(rec.requests)
            status, headers, answer = behave(number)
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    scheme = "https" if tls is not None else "http"
    rec = Receiver(url=f"{scheme}://127.0.0.1:{server.server_address[1]}/hook")
    box["receiver"] = rec
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield rec
    finally:
        rec.release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
