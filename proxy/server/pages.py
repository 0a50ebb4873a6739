"""Rendered metadata documents (index pages, packuments): built once, sent many times.

A page is rendered from a resolved listing, kept in the hot cache until the earliest expiry of
its sources (never when it was rendered from stale data: the next request re-renders it once a
refresh lands), and sent with a strong ETag, ``X-Cache`` and any ``X-Proxy-Warning``. Big pages
are also kept compressed (brotli and gzip), built once off the event loop, and sent so to clients
that accept it: an npm packument of several megabytes shrinks about tenfold. (Artifacts are never
compressed: their bytes are the same whatever the client accepts.)
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
from collections.abc import Awaitable, Callable, Hashable

import brotli
from aiohttp import hdrs, web

from proxy.pipeline.resolve import ResolvedListing
from proxy.storage.hot import HotCache, PackageKey, RenderedPage

COMPRESS_FROM = 32 * 1024  # smaller pages are not worth a compressed copy
RENDER_OFF_LOOP_FROM = 256 * 1024


async def build_page(resolved: ResolvedListing, body: bytes, content_type: str) -> RenderedPage:
    """A page for ``body``; big ones get their gzip copy built in a worker thread."""
    gzipped = brotlied = None
    if len(body) >= COMPRESS_FROM:
        gzipped, brotlied = await asyncio.to_thread(_compress, body)
    headers: tuple[tuple[str, str], ...] = ()
    if resolved.warnings:
        text = "; ".join(resolved.warnings).replace("\r", " ").replace("\n", " ")[:500]
        headers = (("X-Proxy-Warning", text),)
    return RenderedPage(
        body=body,
        content_type=content_type,
        etag=f'"{hashlib.sha256(body).hexdigest()[:40]}"',
        cache_status=resolved.status.value,
        expires_at=resolved.expires_at,
        headers=headers,
        gzip_body=gzipped,
        br_body=brotlied,
    )


def _compress(body: bytes) -> tuple[bytes, bytes]:
    # Brotli quality 5: most of the size win of 11 at a small part of its CPU cost.
    return gzip.compress(body, 6, mtime=0), brotli.compress(body, quality=5)


async def cached_page(
    hot: HotCache,
    package: PackageKey,
    variant: Hashable,
    render: Callable[[], Awaitable[RenderedPage]],
) -> tuple[RenderedPage, str]:
    """The page from the hot cache (``HIT``), or rendered now (its own cache status)."""
    page = hot.page(package, variant)
    if page is not None:
        return page, "HIT"
    page = await render()
    if page.cache_status != "STALE":
        hot.remember_page(package, variant, page)
    return page, page.cache_status


def page_response(request: web.Request, page: RenderedPage, status: str) -> web.Response:
    """The page, 304 when the client has it, compressed when the client takes it and it is big."""
    accepted = request.headers.get(hdrs.ACCEPT_ENCODING, "")
    encoding, body = None, page.body
    if page.br_body is not None and "br" in accepted:
        encoding, body = "br", page.br_body
    elif page.gzip_body is not None and "gzip" in accepted:
        encoding, body = "gzip", page.gzip_body
    etag = f'{page.etag[:-1]}-{encoding}"' if encoding else page.etag
    if _etag_matches(request, etag):
        response = web.Response(status=304)
    else:
        response = web.Response(body=body)
        response.headers[hdrs.CONTENT_TYPE] = page.content_type
        if encoding:
            response.headers[hdrs.CONTENT_ENCODING] = encoding
    response.headers[hdrs.ETAG] = etag
    response.headers[hdrs.VARY] = "Accept, Accept-Encoding"
    response.headers["X-Cache"] = status
    response.headers[hdrs.CACHE_CONTROL] = "max-age=0, must-revalidate"
    for name, value in page.headers:
        response.headers[name] = value
    return response


def _etag_matches(request: web.Request, etag: str) -> bool:
    header = request.headers.get(hdrs.IF_NONE_MATCH)
    if not header:
        return False
    tags = {t.strip().removeprefix("W/") for t in header.split(",")}
    return "*" in tags or etag in tags
