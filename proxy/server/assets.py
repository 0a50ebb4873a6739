"""Sending an asset: sendfile for cache hits, a tail of the staging file for downloads.

Cache hits go through aiohttp's FileResponse (sendfile, HEAD and Range) with the digest as the
ETag, answered for ``If-None-Match`` here because FileResponse would use mtime and size. A miss
streams as the bytes arrive; if the download then fails its check, the connection is aborted, so
the client sees a broken transfer, never a complete-looking wrong file.
"""

from __future__ import annotations

import logging

from aiohttp import hdrs, web

from proxy.model import CacheStatus, Digest
from proxy.pipeline.resolve import AssetHandle
from proxy.storage.local import LocalBlobStore

log = logging.getLogger("proxy.assets")

IMMUTABLE = "public, max-age=31536000, immutable"


class BlobFileResponse(web.FileResponse):
    """A FileResponse whose ETag is always the content digest."""

    def __init__(self, path: str, etag: str) -> None:
        super().__init__(path)
        self._digest_etag = etag

    @property  # type: ignore[override]
    def etag(self) -> object:
        return super().etag

    @etag.setter
    def etag(self, value: object) -> None:
        web.FileResponse.etag.fset(self, self._digest_etag)  # type: ignore[attr-defined]


def _etag_matches(request: web.Request, etag: str) -> bool:
    header = request.headers.get(hdrs.IF_NONE_MATCH)
    if not header:
        return False
    wanted = {t.strip().removeprefix("W/").strip('"') for t in header.split(",")}
    return "*" in wanted or etag in wanted


def _common_headers(response: web.StreamResponse, status: CacheStatus, content_type: str) -> None:
    response.headers["X-Cache"] = status.value
    response.headers[hdrs.CACHE_CONTROL] = IMMUTABLE
    response.content_type = content_type.split(";")[0]
    if "charset=" in content_type:
        response.charset = content_type.split("charset=", 1)[1].strip()


def send_blob(
    request: web.Request,
    digest: Digest,
    content_type: str,
    blobs: LocalBlobStore,
    status: CacheStatus,
) -> web.StreamResponse:
    """A committed blob by sendfile, or 304 when the client already has these bytes."""
    etag = digest.hex
    if _etag_matches(request, etag):
        not_modified = web.Response(status=304)
        not_modified.headers["X-Cache"] = status.value
        not_modified.headers[hdrs.ETAG] = f'"{etag}"'
        return not_modified
    response = BlobFileResponse(str(blobs.local_path(digest)), etag)
    _common_headers(response, status, content_type)
    response.headers["X-Content-SHA256"] = etag
    return response


async def send_asset(request: web.Request, handle: AssetHandle, blobs: LocalBlobStore) -> web.StreamResponse:
    """Answer with the asset ``handle`` points at (see the module docstring)."""
    if handle.record is not None:
        record = handle.record
        return send_blob(request, record.digest, record.content_type, blobs, handle.status)
    flight = handle.flight
    assert flight is not None
    try:
        await flight.started()  # a failure before the first byte is an ordinary error response
        if request.method == hdrs.METH_HEAD or handle.entry is None:
            info = await flight.result()
            return send_blob(request, info.digest, flight.content_type, blobs, CacheStatus.MISS)
        response = web.StreamResponse()
        _common_headers(response, CacheStatus.MISS, flight.content_type)
        if flight.expected_size is not None:
            response.content_length = flight.expected_size
        if handle.entry.sha256:
            response.headers[hdrs.ETAG] = f'"{handle.entry.sha256}"'
        await response.prepare(request)
        try:
            async for chunk in flight.stream():
                await response.write(chunk)
        except (ConnectionError, RuntimeError) as exc:
            log.info("client went away during %s: %s", request.path, exc)
        except Exception as exc:  # noqa: BLE001 - the body has started: abort, never complete it
            log.warning("aborting %s mid-body: %s", request.path, exc)
            if request.transport is not None:
                request.transport.abort()
        return response
    finally:
        flight.release()
