"""A hostile upstream: a raw HTTP/1.1 server in front of a real fake registry.

By default it relays every request to the backend fake (FakePyPI, FakeNpm, FakeMavenRepo,
FakeNuGet) and rewrites the backend's origin to its own in bodies, so the proxy sees a normal
registry. A test installs a *rule* for a path (exact, or a prefix ending in ``*``) and the rule
writes the answer byte by byte: truncated with or without Content-Length, chunked and cut,
gzip without Content-Encoding, a header that never ends, a body that drips, nothing at all.
Raw sockets, because aiohttp's server would repair most of these lies.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import struct
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

import aiohttp

REASONS = {
    200: "OK",
    304: "Not Modified",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
}
TEXT_TYPES = ("json", "html", "xml", "text")


@dataclass
class Relayed:
    """The backend's answer to a relayed request, body already rewritten to the hostile origin."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def without(self, *names: str) -> list[tuple[str, str]]:
        drop = {n.lower() for n in names}
        return [(k, v) for k, v in self.headers if k.lower() not in drop]


@dataclass
class Exchange:
    """One request on a raw connection, and the means to answer it (or not)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    writer: asyncio.StreamWriter
    upstream: HostileUpstream

    async def relay(self) -> Relayed:
        """What the backend answers to this request (origin rewritten, never decompressed)."""
        return await self.upstream.fetch_backend(self.method, self.path, self.headers, self.body)

    async def send_head(self, status: int, headers: list[tuple[str, str]]) -> None:
        lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}"]
        lines += [f"{k}: {v}" for k, v in headers]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await self.writer.drain()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        """A well-formed answer with an exact Content-Length."""
        head = [(k, v) for k, v in headers if k.lower() not in ("content-length", "transfer-encoding")]
        await self.send_head(status, [*head, ("Content-Length", str(len(body)))])
        if self.method != "HEAD":
            await self.send(body)

    def close(self) -> None:
        """End the connection after what was sent (FIN)."""
        self.writer.close()

    def reset(self) -> None:
        """End the connection with an RST (SO_LINGER 0)."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.close()

    async def hang(self) -> None:
        """Never answer (a blackhole), until the server closes."""
        await self.upstream.closing.wait()


# A rule answers an exchange; it returns True to keep the connection open for the next request.
Rule = Callable[[Exchange], Awaitable[bool]]


@dataclass
class HostileUpstream:
    """Serve on 127.0.0.1; relay to ``backend_origin`` unless a rule for the path says otherwise."""

    backend_origin: str
    rules: dict[str, Rule] = field(default_factory=dict)
    hits: Counter[str] = field(default_factory=Counter)
    closing: asyncio.Event = field(default_factory=asyncio.Event)
    _server: asyncio.Server | None = None
    _session: aiohttp.ClientSession | None = None
    _port: int = 0
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def url(self, path: str = "/") -> str:
        """A URL on this server for a backend path (``/simple/``, ``/``, ``/v3/index.json``)."""
        return self.origin + path

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0, limit=2**20)
        self._port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.closing.set()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def rule_for(self, path: str) -> Rule | None:
        if path in self.rules:
            return self.rules[path]
        for key, rule in self.rules.items():
            if key.endswith("*") and path.startswith(key[:-1]):
                return rule
        return None

    async def fetch_backend(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Relayed:
        assert self._session is not None
        send = {k: v for k, v in headers.items() if k.lower() not in ("host", "content-length", "connection")}
        async with self._session.request(
            method, self.backend_origin + path, headers=send, data=body or None, allow_redirects=False
        ) as resp:
            data = await resp.read()
            out = [
                (k, v)
                for k, v in resp.headers.items()
                if k.lower() not in ("content-length", "transfer-encoding")
            ]
            ctype = resp.headers.get("Content-Type", "")
            if any(t in ctype for t in TEXT_TYPES) and "Content-Encoding" not in resp.headers:
                data = data.replace(self.backend_origin.encode(), self.origin.encode())
            return Relayed(resp.status, out, data)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while not self.closing.is_set():
                exchange = await self._read_request(reader, writer)
                if exchange is None:
                    break
                self.hits[exchange.path] += 1
                rule = self.rule_for(exchange.path)
                if rule is None:
                    relayed = await exchange.relay()
                    await exchange.reply(relayed.status, relayed.headers, relayed.body)
                    keep = True
                else:
                    keep = await rule(exchange)
                if not keep or writer.is_closing():
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _read_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Exchange | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                key, value = line.split(":", 1)
                headers[key.strip()] = value.strip()
        length = int(next((v for k, v in headers.items() if k.lower() == "content-length"), "0"))
        body = await reader.readexactly(length) if length else b""
        return Exchange(method, path, headers, body, writer, self)


# ----------------------------------------------------------------------------- ready-made rules


def truncated(*, keep: float = 0.5, declare_length: bool = True) -> Rule:
    """Relay, but send only ``keep`` of the body, then close (with or without Content-Length)."""

    async def rule(ex: Exchange) -> bool:
        r = await ex.relay()
        head = r.without("content-length", "transfer-encoding")
        if declare_length:
            head.append(("Content-Length", str(len(r.body))))
        await ex.send_head(r.status, head)
        await ex.send(r.body[: int(len(r.body) * keep)])
        ex.close()
        return False

    return rule


def chunked_cut(*, keep: float = 0.5, terminate: bool = False) -> Rule:
    """Relay as chunked transfer encoding; stop after ``keep`` of the body (optionally with a 0-chunk)."""

    async def rule(ex: Exchange) -> bool:
        r = await ex.relay()
        await ex.send_head(
            r.status, [*r.without("content-length", "transfer-encoding"), ("Transfer-Encoding", "chunked")]
        )
        part = r.body[: int(len(r.body) * keep)]
        step = 16 * 1024
        for i in range(0, len(part), step):
            piece = part[i : i + step]
            await ex.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        if terminate:
            await ex.send(b"0\r\n\r\n")
        ex.close()
        return False

    return rule


def mutated(change: Callable[[bytes], bytes], *, status: int | None = None) -> Rule:
    """Relay with the body replaced by ``change(body)`` and an honest Content-Length."""

    async def rule(ex: Exchange) -> bool:
        r = await ex.relay()
        await ex.reply(status or r.status, r.headers, change(r.body))
        return True

    return rule


def answer(status: int, body: bytes = b"", headers: list[tuple[str, str]] | None = None) -> Rule:
    """A fixed answer, whatever the backend has."""

    async def rule(ex: Exchange) -> bool:
        await ex.reply(status, headers or [("Content-Type", "text/plain")], body)
        return True

    return rule


def blackhole() -> Rule:
    """Accept the request and never answer."""

    async def rule(ex: Exchange) -> bool:
        await ex.hang()
        return False

    return rule


def drip(*, chunk: int = 1, delay: float = 0.5) -> Rule:
    """Relay the head at once, then ``chunk`` bytes every ``delay`` seconds."""

    async def rule(ex: Exchange) -> bool:
        r = await ex.relay()
        await ex.send_head(r.status, [*r.without("content-length"), ("Content-Length", str(len(r.body)))])
        for i in range(0, len(r.body), chunk):
            await ex.send(r.body[i : i + chunk])
            await asyncio.sleep(delay)
        return True

    return rule


def reset() -> Rule:
    """Close the connection with an RST before any answer."""

    async def rule(ex: Exchange) -> bool:
        ex.reset()
        return False

    return rule


def decoded() -> Rule:
    """Relay a gzipped answer decompressed, with the backend's origin rewritten in it.

    The relay leaves ``Content-Encoding: gzip`` bodies alone, so links inside them (nuget.org's
    gzip-only registration hives) would send the proxy straight to the backend, past every rule.
    """

    async def rule(ex: Exchange) -> bool:
        r = await ex.relay()
        body = r.body
        if (r.header("content-encoding") or "").lower() == "gzip":
            body = gzip.decompress(body).replace(
                ex.upstream.backend_origin.encode(), ex.upstream.origin.encode()
            )
        await ex.reply(r.status, r.without("content-encoding"), body)
        return True

    return rule


def endless(
    *,
    status: int = 200,
    headers: list[tuple[str, str]] | None = None,
    declare_length: int | None = None,
    chunk: bytes = bytes(64 * 1024),
    cap: int = 2**30,
    sent: Counter[str] | None = None,
) -> Rule:
    """A body that does not stop: ``chunk`` after ``chunk`` (under ``Content-Length:
    declare_length``, or chunked when None) until the reader hangs up or ``cap`` bytes are out.

    Generated as it goes, never held, so a test can offer gigabytes; ``sent[path]`` counts the
    body bytes that left, which shows whether the reader stopped early or swallowed it all.
    """

    async def rule(ex: Exchange) -> bool:
        head = list(headers or [("Content-Type", "application/octet-stream")])
        if declare_length is not None:
            head.append(("Content-Length", str(declare_length)))
            cap_here = min(cap, declare_length)
        else:
            head.append(("Transfer-Encoding", "chunked"))
            cap_here = cap
        await ex.send_head(status, head)
        out = 0
        try:
            while out < cap_here:
                piece = chunk[: cap_here - out]
                frame = (
                    piece if declare_length is not None else f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
                )
                await ex.send(frame)
                out += len(piece)
                if sent is not None:
                    sent[ex.path] += len(piece)
        except ConnectionError:
            return False
        ex.close()
        return False

    return rule


def header_flood(
    *, line: bytes = b"X-Flood: " + b"a" * 64, cap: int = 2**26, sent: Counter[str] | None = None
) -> Rule:
    """A status line, then header lines that never end (``line`` again and again, CRLF each)
    until the reader hangs up or ``cap`` bytes are out; an empty ``line`` sends one header whose
    value never ends instead. ``sent[path]`` counts the bytes that left."""

    async def rule(ex: Exchange) -> bool:
        await ex.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n")
        piece = line + b"\r\n" if line else b"a" * 4096
        if not line:
            await ex.send(b"X-Endless: ")
        out = 0
        try:
            while out < cap:
                await ex.send(piece * 16)
                out += len(piece) * 16
                if sent is not None:
                    sent[ex.path] += len(piece) * 16
        except ConnectionError:
            return False
        ex.close()
        return False

    return rule


# ----------------------------------------------------------------------- availability (group 2)


async def stop_listening(hostile: HostileUpstream) -> None:
    """Close the listening socket and end every open connection: from now on connecting is
    *refused* (nothing listens on the port), as with a crashed upstream."""
    if hostile._server is not None:
        hostile._server.close()
        hostile._server = None
    tasks = list(hostile._tasks)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def resume_listening(hostile: HostileUpstream) -> None:
    """Listen again on the same port (after :func:`stop_listening`), so configured URLs work."""
    if hostile._server is None:
        hostile._server = await asyncio.start_server(
            hostile._connection, "127.0.0.1", hostile._port, limit=2**20
        )


def passthrough() -> Rule:
    """Relay unchanged (for rules that misbehave only some of the time)."""

    async def rule(ex: Exchange) -> bool:
        r = await ex.relay()
        await ex.reply(r.status, r.headers, r.body)
        return True

    return rule


def stalled(*, keep: float = 0.5) -> Rule:
    """Relay the head (with the full Content-Length) and ``keep`` of the body, then go silent
    with the connection open: a transfer that stalls midway and never ends by itself. Conditional
    headers are dropped, so a revalidation gets a body to stall in too."""

    async def rule(ex: Exchange) -> bool:
        drop_conditionals(ex)
        r = await ex.relay()
        await ex.send_head(
            r.status,
            [*r.without("content-length", "transfer-encoding"), ("Content-Length", str(len(r.body)))],
        )
        await ex.send(r.body[: int(len(r.body) * keep)])
        await ex.hang()
        return False

    return rule


def gzipped() -> Rule:
    """Relay the full answer gzip-compressed but *without* ``Content-Encoding`` (a misconfigured
    CDN): the bytes are no longer the document their Content-Type claims. Conditional headers
    are dropped so there is always a body to compress."""

    async def rule(ex: Exchange) -> bool:
        drop_conditionals(ex)
        r = await ex.relay()
        await ex.reply(r.status, r.without("content-encoding", "etag"), gzip.compress(r.body))
        return True

    return rule


def limited(retry_after: Callable[[], str], *, times: int | None = None) -> Rule:
    """Answer 429 Too Many Requests with ``Retry-After: retry_after()`` (delta seconds or an
    HTTP-date, computed per request) to the first ``times`` requests (None: to all), then relay."""
    left = [times]

    async def rule(ex: Exchange) -> bool:
        if left[0] is not None:
            if left[0] <= 0:
                return await passthrough()(ex)
            left[0] -= 1
        body = b'{"error": "too many requests"}'
        await ex.reply(429, [("Content-Type", "application/json"), ("Retry-After", retry_after())], body)
        return True

    return rule


def flapping(down: Rule, *, period: int = 1) -> Rule:
    """Alternate across requests: ``period`` answered by ``down``, then ``period`` relayed, ..."""
    seen = [0]

    async def rule(ex: Exchange) -> bool:
        turn = seen[0] // period
        seen[0] += 1
        if turn % 2 == 0:
            return await down(ex)
        return await passthrough()(ex)

    return rule


def timed(inner: Rule, stamps: list[float]) -> Rule:
    """``inner``, noting when each request arrived (the event loop's clock, ``loop.time()``)."""

    async def rule(ex: Exchange) -> bool:
        stamps.append(asyncio.get_running_loop().time())
        return await inner(ex)

    return rule


def drop_conditionals(ex: Exchange) -> None:
    """Forget the request's validators, so the backend answers 200 with a body, never a 304."""
    for name in [k for k in ex.headers if k.lower() in ("if-none-match", "if-modified-since")]:
        del ex.headers[name]


def unconditional(inner: Rule) -> Rule:
    """``inner`` on a request without validators (a fault that needs a body to act on)."""

    async def rule(ex: Exchange) -> bool:
        drop_conditionals(ex)
        return await inner(ex)

    return rule
