"""The HTTP/1.1 client that delivers webhooks: one POST at a time per connection, kept alive.

Why not httpx, which Gatepass uses everywhere else: the worker's single event loop is what
bounds webhook throughput, and an attempt through `httpx.AsyncClient` cost ≈ 0.6 ms of CPU on
the development machine, four times the same exchange over asyncio streams with h11 (the
HTTP/1.1 parser httpx itself uses). See docs/performance.md, "Webhooks".

It does only what a delivery needs: POST a body; read the status, the headers and the first
EXCERPT_BYTES of the answer; never follow a redirect; no proxies, no cookies. TLS uses httpx's
default context (certificates verified against certifi's roots). An answer is read to its end
so the connection can carry the endpoint's next message; one longer than DRAIN_BYTES closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit

import h11
import httpx

EXCERPT_BYTES = 500  # of the receiver's answer, kept with the attempt
DRAIN_BYTES = 64 * 1024  # read past the excerpt to keep the connection; beyond, close it
IDLE_SECONDS = 2.0  # an idle connection older than this is closed rather than reused
IDLE_PER_ORIGIN = 8
READ_SIZE = 65536


class ProtocolError(Exception):
    """The receiver's answer was not HTTP/1.1, or it closed the connection mid-answer."""


class ConnectError(OSError):
    """No connection within the connect timeout."""


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]  # names lower-cased; a repeated header keeps its last value
    excerpt: bytes  # at most EXCERPT_BYTES of the body


@dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    state: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))
    idle_since: float = 0.0

    def reusable(self) -> bool:
        return (time.monotonic() - self.idle_since < IDLE_SECONDS
                and not self.reader.at_eof() and not self.writer.is_closing())

    def close(self) -> None:
        self.writer.close()


class _Stale(Exception):
    """A kept-alive connection was closed by the receiver before it answered anything."""


Origin = tuple[str, str, int]


class Client:
    """One per worker process; `post` runs concurrently for different endpoints."""

    def __init__(self, *, connect_timeout: float) -> None:
        self.connect_timeout = connect_timeout
        self._idle: dict[Origin, list[_Connection]] = {}
        self._tls: ssl.SSLContext | None = None
        self._pruned = 0.0

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Answer:
        """POST `body` to `url`. Raises OSError (ConnectError included), TimeoutError when
        the caller's deadline passes, or ProtocolError. The caller bounds the whole call."""
        parts = urlsplit(url)
        scheme, host = parts.scheme, parts.hostname or ""
        origin = (scheme, host, parts.port or (443 if scheme == "https" else 80))
        netloc = parts.netloc if parts.netloc.isascii() else parts.netloc.encode("idna").decode()
        target = quote(parts.path or "/", safe="/%:@!$&'()*+,;=~")
        if parts.query:
            target += "?" + quote(parts.query, safe="/%:@!$&'()*+,;=~?")
        request = h11.Request(method="POST", target=target, headers=[
            ("host", netloc), ("content-length", str(len(body))), *headers.items()])
        while (connection := self._take(origin)) is not None:
            try:
                return await self._exchange(connection, origin, request, body)
            except _Stale:
                continue  # closed while idle: the request never reached the receiver
        connection = await self._open(origin)
        return await self._exchange(connection, origin, request, body)

    async def close(self) -> None:
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.close()
                with contextlib.suppress(Exception):
                    await connection.writer.wait_closed()

    def _take(self, origin: Origin) -> _Connection | None:
        connections = self._idle.get(origin)
        while connections:
            connection = connections.pop()
            if connection.reusable():
                return connection
            connection.close()
        return None

    def _put(self, origin: Origin, connection: _Connection) -> None:
        now = connection.idle_since = time.monotonic()
        connections = self._idle.setdefault(origin, [])
        connections.append(connection)
        if len(connections) > IDLE_PER_ORIGIN:
            connections.pop(0).close()
        if now - self._pruned > IDLE_SECONDS:  # close what no endpoint came back for
            self._pruned = now
            for key, idle in list(self._idle.items()):
                for stale in [c for c in idle if not c.reusable()]:
                    stale.close()
                    idle.remove(stale)
                if not idle:
                    del self._idle[key]

    async def _open(self, origin: Origin) -> _Connection:
        scheme, host, port = origin
        tls = None
        if scheme == "https":
            if self._tls is None:
                self._tls = httpx.create_ssl_context(trust_env=False)
            tls = self._tls
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=tls,
                                        server_hostname=host if tls else None,
                                        limit=READ_SIZE),
                self.connect_timeout)
        except TimeoutError:
            raise ConnectError(f"no connection within {self.connect_timeout:g} s") from None
        return _Connection(reader, writer)

    async def _exchange(self, connection: _Connection, origin: Origin, request: h11.Request,
                        body: bytes) -> Answer:
        state = connection.state
        received = False
        kept = False
        try:
            try:
                connection.writer.write(state.send(request) + state.send(h11.Data(data=body))
                                        + state.send(h11.EndOfMessage()))
                await connection.writer.drain()
                status, excerpt, size = 0, b"", 0
                headers: dict[str, str] = {}
                while True:
                    event = state.next_event()
                    if event is h11.NEED_DATA:
                        data = await connection.reader.read(READ_SIZE)
                        received = received or bool(data)
                        state.receive_data(data)  # b"" means the receiver closed
                        continue
                    if isinstance(event, h11.InformationalResponse):
                        continue  # 100 Continue and the like: the answer follows
                    if isinstance(event, h11.Response):
                        status = event.status_code
                        headers = {name.decode("latin-1"): value.decode("latin-1")
                                   for name, value in event.headers}
                    elif isinstance(event, h11.Data):
                        if len(excerpt) < EXCERPT_BYTES:
                            excerpt += bytes(event.data[:EXCERPT_BYTES - len(excerpt)])
                        size += len(event.data)
                        if size > DRAIN_BYTES:
                            break  # not worth reading on: this connection closes
                    elif isinstance(event, h11.EndOfMessage):
                        if state.our_state is h11.DONE and state.their_state is h11.DONE:
                            state.start_next_cycle()
                            kept = True
                        break
                    else:  # ConnectionClosed before the answer ended
                        raise ProtocolError("the receiver closed the connection mid-answer")
            except (h11.RemoteProtocolError, ConnectionError) as exc:
                if connection.idle_since and not received:
                    raise _Stale() from exc
                if isinstance(exc, ConnectionError):
                    raise
                if not received:
                    raise ProtocolError("the receiver closed the connection without answering"
                                        ) from None
                raise ProtocolError(f"the answer is not HTTP/1.1: {exc}") from None
            except h11.LocalProtocolError as exc:  # e.g. a header value we cannot send
                raise ProtocolError(f"cannot send this request: {exc}") from None
        finally:
            if kept:
                self._put(origin, connection)
            else:
                connection.close()
        return Answer(status, headers, excerpt)
