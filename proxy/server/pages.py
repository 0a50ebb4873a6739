"""Rendered metadata documents (index pages, packuments): built once, sent many times.

A page is rendered from a resolved listing and kept in the hot cache until the earliest expiry
of its sources (never when it was rendered from stale data: the next request re-renders it once
a refresh lands). When it expires and the refresh finds its sources unchanged (an upstream 304,
the same hosted versions, the same cached files), the page is renewed, not rendered again: a
packument of tens of megabytes is parsed and rendered once per upstream change.

Big pages are also kept compressed (brotli and gzip), built once off the event loop, and sent so
to clients that accept it: an npm packument of several megabytes shrinks about tenfold. Pages
of ``SPILL_FROM`` bytes or more keep their plain rendering in a file (storage/page_files.py),
sent by ``sendfile`` like artifacts, and only the compressed copies (a tenth of the size) in
memory, so twenty parallel installs of a huge package hold no copies of it. (Artifacts are
never compressed: their bytes are the same whatever the client accepts.)
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import time
from collections.abc import Awaitable, Callable, Hashable
from concurrent.futures import Executor
from dataclasses import dataclass, replace

import brotli
from aiohttp import hdrs, web

from proxy.model import CacheStatus
from proxy.pipeline.resolve import ResolvedListing
from proxy.server.assets import BlobFileResponse
from proxy.storage.hot import HotCache, PackageKey, RenderedPage
from proxy.storage.page_files import PageFiles

COMPRESS_FROM = 32 * 1024  # smaller pages are not worth a compressed copy
SPILL_FROM = 512 * 1024  # pages this big are kept in files, not in memory
DRAW_OFF_LOOP_FROM = 200  # listings with this many files are rendered in a worker thread


@dataclass(frozen=True, slots=True)
class PageSource:
    """What a page is rendered from: the listing, how to draw it, and what else it depends on."""

    resolved: ResolvedListing
    draw: Callable[[], bytes]
    content_type: str
    depends_on: Hashable = ()  # e.g. which files are cached, when the page shows their sizes

    def fingerprint(self) -> Hashable:
        files = tuple((f.filename, f.hidden) for f in self.resolved.listing.files)
        return (self.resolved.sources, files, tuple(sorted(self.resolved.blocked)), self.depends_on)


class PageStore:
    """Rendered pages: the hot cache for lookup, files for the big ones. Built in ``build_app``."""

    def __init__(self, hot: HotCache, files: PageFiles, executor: Executor | None) -> None:
        self._hot = hot
        self._files = files
        self._executor = executor
        # One rendering per page at a time: twenty installs asking at once for a packument that
        # just expired wait for one render, not twenty.
        # Each with the hot cache's epoch it began in: after another worker's change a request
        # does not join a rendering that may have read the index before that change.
        self._rendering: dict[tuple[PackageKey, Hashable], tuple[int, asyncio.Task[RenderedPage]]] = {}

    async def respond(
        self,
        request: web.Request,
        package: PackageKey,
        variant: Hashable,
        source: Callable[[], Awaitable[PageSource]],
    ) -> web.StreamResponse:
        """The page for ``variant`` of ``package``: from the cache, renewed, or rendered now."""
        page, status = await self.page(package, variant, source)
        return self.response(request, page, status)

    async def page(
        self, package: PackageKey, variant: Hashable, source: Callable[[], Awaitable[PageSource]]
    ) -> tuple[RenderedPage, str]:
        """The page and the ``X-Cache`` it is sent with (``HIT`` when nothing was looked up)."""
        previous = self._hot.page_entry(package, variant)
        if previous is not None and previous.expires_at > time.time():
            return previous, "HIT"
        key = (package, variant)
        running = self._rendering.get(key)
        if running is not None and running[0] == self._hot.epoch:
            task = running[1]
        else:
            task = asyncio.create_task(self._produce(package, variant, previous, source))
            self._rendering[key] = (self._hot.epoch, task)
            task.add_done_callback(lambda t: self._rendered(key, t))
        page = await asyncio.shield(task)
        return page, page.cache_status

    def _rendered(self, key: tuple[PackageKey, Hashable], task: asyncio.Task[RenderedPage]) -> None:
        running = self._rendering.get(key)
        if running is not None and running[1] is task:
            del self._rendering[key]
        if not task.cancelled():
            task.exception()  # retrieved here; every waiter got it already

    async def _produce(
        self,
        package: PackageKey,
        variant: Hashable,
        previous: RenderedPage | None,
        source: Callable[[], Awaitable[PageSource]],
    ) -> RenderedPage:
        epoch = self._hot.epoch
        src = await source()
        fingerprint = src.fingerprint()
        if previous is not None and previous.fingerprint == fingerprint:
            page = replace(
                previous,
                cache_status=src.resolved.status.value,
                expires_at=src.resolved.expires_at,
                headers=_warning_headers(src.resolved),
            )
        else:
            if len(src.resolved.listing.files) >= DRAW_OFF_LOOP_FROM:
                body = await asyncio.to_thread(src.draw)
            else:
                body = src.draw()
            page = await self.build(src.resolved, body, src.content_type, fingerprint)
        # Not kept when another worker's change cleared the cache while this was rendered.
        if page.cache_status != CacheStatus.STALE.value and epoch == self._hot.epoch:
            self._hot.remember_page(package, variant, page)
        elif page.files and (previous is None or previous.files != page.files):
            self._files.retire(page.files)  # sent once, never kept
        return page

    async def build(
        self, resolved: ResolvedListing, body: bytes, content_type: str, fingerprint: Hashable = None
    ) -> RenderedPage:
        """A page for ``body``; big ones are compressed (and written out) in a worker thread."""
        page = RenderedPage(
            body=body,
            content_type=content_type,
            etag=f'"{hashlib.sha256(body).hexdigest()[:40]}"',
            cache_status=resolved.status.value,
            expires_at=resolved.expires_at,
            headers=_warning_headers(resolved),
            fingerprint=fingerprint,
        )
        if len(body) < COMPRESS_FROM:
            return page
        gzipped, brotlied = await asyncio.to_thread(_compress, body)
        if len(body) < SPILL_FROM:
            return replace(page, gzip_body=gzipped, br_body=brotlied)
        # The compressed copies (what npm, pip and browsers ask for) stay in memory: a tenth of
        # the size, and sent without a file open. The plain one goes to disk.
        files = await asyncio.to_thread(self._files.write, {"": body})
        return replace(page, body=b"", gzip_body=gzipped, br_body=brotlied, files=files)

    def response(self, request: web.Request, page: RenderedPage, status: str) -> web.StreamResponse:
        """The page, 304 when the client has it, compressed when the client takes it and it is big."""
        accepted = request.headers.get(hdrs.ACCEPT_ENCODING, "")
        encoding = ""
        if "br" in accepted and page.br_body is not None:
            encoding = "br"
        elif "gzip" in accepted and page.gzip_body is not None:
            encoding = "gzip"
        etag = f'{page.etag[:-1]}-{encoding}"' if encoding else page.etag
        response: web.StreamResponse
        if _etag_matches(request, etag):
            response = web.Response(status=304)
        elif page.files and not encoding:
            path = page.files[0][1]
            response = BlobFileResponse(path, etag.strip('"'), self._executor)
            response.headers[hdrs.CONTENT_TYPE] = page.content_type
        else:
            body = {"": page.body, "gzip": page.gzip_body, "br": page.br_body}[encoding]
            response = web.Response(body=body)
            response.headers[hdrs.CONTENT_TYPE] = page.content_type
        if encoding and response.status != 304:
            response.headers[hdrs.CONTENT_ENCODING] = encoding
        response.headers[hdrs.ETAG] = etag
        response.headers[hdrs.VARY] = "Accept, Accept-Encoding"
        response.headers["X-Cache"] = status
        response.headers[hdrs.CACHE_CONTROL] = "max-age=0, must-revalidate"
        for name, value in page.headers:
            response.headers[name] = value
        return response


def _warning_headers(resolved: ResolvedListing) -> tuple[tuple[str, str], ...]:
    if not resolved.warnings:
        return ()
    text = "; ".join(resolved.warnings).replace("\r", " ").replace("\n", " ")[:500]
    return (("X-Proxy-Warning", text),)


def _compress(body: bytes) -> tuple[bytes, bytes]:
    # Brotli quality 5: most of the size win of 11 at a small part of its CPU cost.
    return gzip.compress(body, 6, mtime=0), brotli.compress(body, quality=5)


def _etag_matches(request: web.Request, etag: str) -> bool:
    header = request.headers.get(hdrs.IF_NONE_MATCH)
    if not header:
        return False
    tags = {t.strip().removeprefix("W/") for t in header.split(",")}
    return "*" in tags or etag in tags
