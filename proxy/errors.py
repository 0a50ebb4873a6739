"""The error tree and the one middleware that renders it.

    ProxyError                       (status, code)
    ├── NotFound                     404 not_found       repository, package, asset, route
    ├── BadRequest                   400 bad_request     invalid name, path or upload
    ├── NotAcceptable                406 not_acceptable  no representation the client accepts
    ├── Conflict                     409 conflict
    ├── RequestTimeout               408 request_timeout   a request body that stalled
    ├── PayloadTooLarge              413 payload_too_large
    ├── Unauthorized                 401 unauthorized
    ├── Forbidden                    403 forbidden
    ├── TooManyRequests              429 too_many_requests  failed authentications from one client
    ├── BlockedByOrigin              404 blocked_by_origin  hidden by origin rule / quarantine / age
    ├── PublishBlocked               403 publish_blocked    an origin rule blocks publishing
    ├── Offline                      503 offline         offline mode and never cached
    ├── InsufficientStorage          507 insufficient_storage  the data directory is full
    ├── StorageUnavailable           503 storage_unavailable   the object store (S3) failed
    ├── StorageCorrupt               502 storage_corrupt       the object store's bytes do not match
    ├── UpstreamUnavailable          502 upstream_unavailable  refused, 5xx, circuit open, bad bytes
    │   └── UpstreamTimeout          504 upstream_timeout
    └── UpstreamCorrupt              502 upstream_corrupt  declared hash or length not met

Handlers raise; nothing else writes an error status. Expected outcomes (4xx, upstream trouble)
log one quiet line; anything else is a 500 carrying a request id, with the traceback logged and
never sent.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar

from aiohttp import web

log = logging.getLogger("proxy.errors")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REQUEST_ID = web.RequestKey("request_id", str)


class ProxyError(Exception):
    """An outcome with an HTTP meaning; ``detail`` goes into the JSON body as extra fields."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        detail: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.detail = dict(detail or {})
        self.headers = dict(headers or {})


class NotFound(ProxyError):
    status = 404
    code = "not_found"


class BadRequest(ProxyError):
    status = 400
    code = "bad_request"


class NotAcceptable(ProxyError):
    status = 406
    code = "not_acceptable"


class Conflict(ProxyError):
    status = 409
    code = "conflict"


class RequestTimeout(ProxyError):
    """The client stopped sending its request body for longer than ``server.client_timeout``."""

    status = 408
    code = "request_timeout"


class PayloadTooLarge(ProxyError):
    status = 413
    code = "payload_too_large"


class Unauthorized(ProxyError):
    status = 401
    code = "unauthorized"


class Forbidden(ProxyError):
    status = 403
    code = "forbidden"


class TooManyRequests(ProxyError):
    """Too many failed authentications from one client: guessing tokens is slowed, not served."""

    status = 429
    code = "too_many_requests"


class BlockedByOrigin(ProxyError):
    """A version hidden by origin controls, quarantine or release age: a 404 that says why."""

    status = 404
    code = "blocked_by_origin"


class PublishBlocked(ProxyError):
    status = 403
    code = "publish_blocked"


class IndexUnavailable(ProxyError):
    """The cluster's index database (storage/postgres.py) is unreachable or shutting down:
    nothing was committed; readiness fails meanwhile, so a load balancer takes the node out."""

    status = 503
    code = "index_unavailable"


class StorageUnavailable(ProxyError):
    """The blob backend's object store refused, timed out or failed (storage/s3.py): blobs on
    this node's disk are still served, others wait for the store to come back."""

    status = 503
    code = "storage_unavailable"


class StorageCorrupt(ProxyError):
    """The object store returned bytes that do not hash to the blob's name: never served."""

    status = 502
    code = "storage_corrupt"


class Offline(ProxyError):
    status = 503
    code = "offline"


class InsufficientStorage(ProxyError):
    """The data directory's file system (or quota) is full: nothing was committed; retry later."""

    status = 507
    code = "insufficient_storage"


def is_disk_full(exc: BaseException) -> bool:
    """True when ``exc``, or an error it was raised from, is ENOSPC/EDQUOT or SQLite's "database
    or disk is full": the operator's problem, so a clear 507 rather than a 500 or a 502."""
    seen: BaseException | None = exc
    for _ in range(8):  # a short walk: causes chain only a few levels deep here
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(seen, sqlite3.OperationalError) and "disk is full" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class UpstreamUnavailable(ProxyError):
    status = 502
    code = "upstream_unavailable"


class UpstreamTimeout(UpstreamUnavailable):
    status = 504
    code = "upstream_timeout"


class UpstreamCorrupt(ProxyError):
    status = 502
    code = "upstream_corrupt"


def error_body(error: ProxyError, request_id: str) -> dict[str, Any]:
    """The JSON body clients see: a stable code, a sentence, the request id, the details."""
    return {"error": error.code, "message": error.message, "request_id": request_id, **error.detail}


def json_error(error: ProxyError, request_id: str) -> web.Response:
    """Render one error as JSON; adapters may shape their clients' bodies on top of this."""
    response = web.json_response(error_body(error, request_id), status=error.status, reason=_reason(error))
    response.headers.update(error.headers)
    return response


def _reason(error: ProxyError) -> str:
    """A reason phrase that says what happened: pip prints it, and it is all pip shows."""
    text = "".join(c if 32 <= ord(c) < 127 else "?" for c in error.message)
    return text[:160] or error.code


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every exception into a JSON error; never let a traceback reach a client."""
    request_id = str(request.get(REQUEST_ID, "-"))
    try:
        return await handler(request)
    except ProxyError as exc:
        log.info("%s %s -> %d %s: %s", request.method, request.path, exc.status, exc.code, exc.message)
        return json_error(exc, request_id)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 404:
            return json_error(NotFound(f"no route for {request.path}"), request_id)
        if exc.status == 405:
            error = ProxyError(f"method {request.method} is not allowed here")
            response = web.json_response(
                {"error": "method_not_allowed", "message": error.message, "request_id": request_id},
                status=405,
            )
            if allow := exc.headers.get("Allow"):
                response.headers["Allow"] = allow
            return response
        return web.json_response(
            {"error": "http_error", "message": exc.reason, "request_id": request_id},
            status=exc.status,
        )
    except Exception as exc:
        if is_disk_full(exc):
            log.error("%s %s -> 507: the data directory is full: %s", request.method, request.path, exc)
            return json_error(InsufficientStorage("the proxy's storage is full; try again later"), request_id)
        log.exception("unhandled error in %s %s (request id %s)", request.method, request.path, request_id)
        return web.json_response(
            {"error": "internal_error", "message": "internal error", "request_id": request_id},
            status=500,
        )
