"""The part every fake upstream shares: an aiohttp server on 127.0.0.1 that can go down and up.

Each fake (PyPI, npm) routes every request to its own ``_entry``; this base runs it on an
ephemeral port, stops listening on demand (new connections refused, open ones dropped: what a
crashed upstream looks like) and listens again on the same port so configured URLs keep working.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal, Protocol, Self

from aiohttp import web

FaultKind = Literal["refuse", "status", "429", "stall", "truncate", "wrong_bytes", "slow"]
BODY_FAULTS = frozenset({"truncate", "wrong_bytes", "slow"})


@dataclass
class Fault:
    """A misbehaviour injected into responses for one path (or ``"*"``).

    ``times`` None means forever; otherwise the fault hits that many
    requests and then the path behaves normally again (``used`` counts
    how many requests it has hit so far, so tests can assert on it).

    Per kind:
      * ``refuse``: close the connection without sending anything.
      * ``status``: answer ``status`` (default 503) with a short body.
      * ``429``: answer 429 with ``Retry-After: retry_after``.
      * ``stall``: sleep ``delay`` seconds, then answer normally.
      * ``truncate``: full Content-Length, half the body, then close.
      * ``wrong_bytes``: right length, one byte flipped, so sha256 mismatches.
      * ``slow``: send ``chunk`` bytes every ``delay`` seconds.

    Body faults (truncate, wrong_bytes, slow) only alter 200 responses.
    """

    kind: FaultKind
    times: int | None = None
    status: int = 503
    retry_after: int = 1
    delay: float = 1.0
    chunk: int = 64 * 1024
    used: int = field(default=0, compare=False)

    def active(self) -> bool:
        """Whether this fault still applies to the next request."""
        return self.times is None or self.used < self.times


class FileBody(Protocol):
    """A body served from a file on disk (never held in memory)."""

    @property
    def path(self) -> Path: ...

    @property
    def size(self) -> int: ...


@dataclass
class Reply:
    """What a route wants to send; faults are applied when it is sent."""

    status: int
    headers: dict[str, str]
    body: bytes | FileBody = b""


def read_range(path: Path, offset: int, size: int) -> bytes:
    """Read ``size`` bytes at ``offset``; run in a thread, never on the loop."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read(size)


class FakeServer:
    """Lifecycle of an in-process fake upstream; subclasses implement ``_entry``."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self._port: int | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._closing = asyncio.Event()
        self.faults: dict[str, Fault] = {}

    async def _entry(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    async def start(self) -> None:
        """Bind an ephemeral port on the host and begin serving."""
        self._closing = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._entry)
        # handler_cancellation: a client that hangs up mid-download cancels the streaming
        # handler, as a real server stops sending; a short shutdown_timeout keeps teardown fast.
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.host, 0)
        await self._site.start()
        self._port = int(self._runner.addresses[0][1])

    async def close(self) -> None:
        """Stop serving; wakes stalled or slow handlers so teardown is quick."""
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self._site = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def stop_listening(self) -> None:
        """Close the listening socket and drop open connections (a crashed upstream)."""
        if self._site is not None:
            await self._site.stop()
            self._site = None
        if self._runner is not None and self._runner.server is not None:
            for handler in list(self._runner.server.connections):
                handler.force_close()

    async def resume_listening(self) -> None:
        """Listen again on the same port, so configured URLs keep working."""
        if self._runner is None or self._port is None:
            raise RuntimeError(f"{type(self).__name__} was never started")
        if self._site is None:
            self._site = web.TCPSite(self._runner, self.host, self._port)
            await self._site.start()

    @property
    def port(self) -> int:
        """The bound TCP port; only valid after :meth:`start`."""
        if self._port is None:
            raise RuntimeError(f"{type(self).__name__} not started")
        return self._port

    @property
    def origin(self) -> str:
        """Scheme, host and port, e.g. ``http://127.0.0.1:PORT``."""
        return f"http://{self.host}:{self.port}"

    def _take_fault(self, path: str) -> Fault | None:
        """The fault for this request, if any, consuming one of its uses."""
        for key in (path, "*"):
            fault = self.faults.get(key)
            if fault is not None and fault.active():
                fault.used += 1
                return fault
        return None

    async def _sleep(self, seconds: float) -> bool:
        """Sleep, but return early (True) when the fake is shutting down."""
        try:
            await asyncio.wait_for(self._closing.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def _send(
        self, request: web.Request, reply: Reply, fault: Fault | None, *, read_chunk: int
    ) -> web.StreamResponse:
        """Send a reply, streaming file bodies and applying body faults."""
        body = reply.body
        if reply.status != 200:
            fault = None
        if isinstance(body, bytes) and fault is None:
            return web.Response(status=reply.status, headers=reply.headers, body=body)
        size = len(body) if isinstance(body, bytes) else body.size
        resp = web.StreamResponse(status=reply.status, headers=reply.headers)
        resp.content_length = size
        await resp.prepare(request)
        if request.method == "HEAD":
            await resp.write_eof()
            return resp
        limit = size // 2 if fault is not None and fault.kind == "truncate" else size
        chunk = fault.chunk if fault is not None and fault.kind == "slow" else read_chunk
        flip_at = size // 2 if fault is not None and fault.kind == "wrong_bytes" else -1
        offset = 0
        try:
            while offset < limit:
                n = min(chunk, limit - offset)
                if not isinstance(body, bytes):
                    data = await asyncio.to_thread(read_range, body.path, offset, n)
                    if not data:  # file shrank under us; do not spin
                        break
                else:
                    data = body[offset : offset + n]
                if offset <= flip_at < offset + len(data):
                    i = flip_at - offset
                    data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
                await resp.write(data)
                offset += len(data)
                if (
                    fault is not None
                    and fault.kind == "slow"
                    and offset < limit
                    and await self._sleep(fault.delay)
                ):
                    break  # shutting down: abandon the body
            if offset < size:
                # Truncated (or abandoned): close after what was sent is flushed.
                if request.transport is not None:
                    request.transport.close()
                return resp
            await resp.write_eof()
        except ConnectionError:
            pass  # client went away; nothing useful to do
        return resp
