"""Catching up with changes other processes committed, before a request is served.

Every process that writes the index (another worker, the CLI) bumps the shared change counter
(storage/generation.py) after its commit. This middleware compares the counter with the value
this process last caught up with (a memory read) and, when it moved, drops every in-memory view
of the index (rendered pages, asset rows, policies, verified tokens) and reloads the repository
and grant snapshots *before* the request goes on, so a publish, deletion, quarantine, rule change
or token revocation acknowledged by one worker holds in every worker for the next request.

One reload runs at a time; requests that notice the change meanwhile wait for it. The counter is
read before the reload starts, so a change committed during the reload is caught by the next one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from proxy.errors import Handler
from proxy.storage.generation import ChangeCounter

log = logging.getLogger("proxy.changes")


class ChangeWatcher:
    """See the module docstring. ``reload`` does the dropping and reloading."""

    def __init__(self, generation: ChangeCounter, reload: Callable[[], Awaitable[None]]) -> None:
        self._generation = generation
        self._reload = reload
        self._running: asyncio.Task[None] | None = None
        self.reloads = 0

    async def catch_up(self) -> None:
        """Return once this process has caught up with every change committed so far."""
        generation = self._generation
        while generation.changed():
            if self._running is None:
                self._running = asyncio.create_task(self._run(generation.read()), name="catch up")
            await asyncio.shield(self._running)

    async def _run(self, target: int) -> None:
        try:
            await self._reload()
            self._generation.seen = target
            self.reloads += 1
        finally:
            self._running = None

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._generation.changed():
            await self.catch_up()
        return await handler(request)
