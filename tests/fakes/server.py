"""The part every fake upstream shares: an aiohttp server on 127.0.0.1 that can go down and up.

Each fake (PyPI, npm) routes every request to its own ``_entry``; this base runs it on an
ephemeral port, stops listening on demand (new connections refused, open ones dropped: what a
crashed upstream looks like) and listens again on the same port so configured URLs keep working.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Self

from aiohttp import web


class FakeServer:
    """Lifecycle of an in-process fake upstream; subclasses implement ``_entry``."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self._port: int | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._closing = asyncio.Event()

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
