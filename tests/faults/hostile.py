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
