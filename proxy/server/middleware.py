"""Request-scoped middleware: a request id on every request and response, and a time bound on
request bodies."""

from __future__ import annotations

import asyncio
import random

from aiohttp import StreamReader, web
from aiohttp.typedefs import Middleware

from proxy.errors import REQUEST_ID, Handler, RequestTimeout


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Tag the request (for logs and error bodies) and echo the id to the client."""
    # Unique, not secret: Python's own generator (reseeded in every forked worker) rather than
    # ``secrets``, which costs a getrandom() system call on every request.
    request_id = f"{random.getrandbits(64):016x}"
    request[REQUEST_ID] = request_id
    response = await handler(request)
    if not response.prepared:
        response.headers["X-Request-Id"] = request_id
    return response


def body_deadline_middleware(timeout: float) -> Middleware:
    """Fail a request whose body brings no new byte for ``timeout`` seconds (checked every
    ``timeout``, so within twice that) with a 408.

    aiohttp bounds only the request head (``client_timeout`` is its keep-alive timeout); a client
    that sends a head and part of a body, then falls silent (crashed, half-open, or a slowloris),
    would hold a connection, a handler and a staging file for ever. The handler's next read
    raises instead, so it cleans up as usual. (A body that trickles is bounded by the upload
    size only: there is no minimum rate.)
    """

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if timeout <= 0 or not request.body_exists:
            return await handler(request)
        watchdog = asyncio.create_task(_watch(request.content, timeout))
        try:
            return await handler(request)
        finally:
            watchdog.cancel()
            if watchdog.done() and not watchdog.cancelled() and watchdog.result():
                # Fired: after the answer aiohttp drains the rest of the body ("lingering"); a
                # timeout there makes it close the connection quietly, with the 408 sent.
                request.content.set_exception(TimeoutError("request body stalled"))

    return middleware


async def _watch(body: StreamReader, stall: float) -> bool:
    """Check every ``stall`` seconds that new body bytes came; stop once the body is complete.
    True when it stopped the body instead."""
    seen = -1
    while not body.is_eof():
        if body.total_bytes == seen:
            body.set_exception(
                RequestTimeout(f"the request body stalled for over {stall:g}s (server.client_timeout)")
            )
            return True
        seen = body.total_bytes
        await asyncio.sleep(stall)
    return False
