"""Request-scoped middleware: a request id on every request and response."""

from __future__ import annotations

import secrets

from aiohttp import web

from proxy.errors import REQUEST_ID, Handler


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Tag the request (for logs and error bodies) and echo the id to the client."""
    request_id = secrets.token_hex(8)
    request[REQUEST_ID] = request_id
    response = await handler(request)
    if not response.prepared:
        response.headers["X-Request-Id"] = request_id
    return response
