"""Metadata documents from external connections: freshness, revalidation, stale-if-error.

A document is fresh for the connection's ``metadata_ttl``; after that it is revalidated with
``If-None-Match``/``If-Modified-Since``. If the upstream has not answered within the soft deadline
and a stale copy exists, the stale copy is served at once and the refresh finishes in the
background. A refresh whose serial (e.g. PyPI's ``X-PyPI-Last-Serial``) is older than the cached
one never replaces it (a lagging CDN node). When the upstream fails, the stale copy is served and
flagged; only what was never cached fails. Offline mode never contacts an upstream. An upstream
404 is remembered briefly (negative cache), and served again past that while the upstream is
failing or offline mode is on; a failure is never remembered. A body that breaks off, stalls or
that the format cannot parse (``DocumentRequest.check``) is a failure like any other: it is never
cached, and the last good copy stays and is served.

With several worker processes a refresh also takes the document's cross-process lock
(storage/locks.py) and, once it has it, looks at the index again: a refresh another worker
finished meanwhile is used as it is, so N workers asking for one cold page cause one GET.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import aiohttp

from proxy.config import ServerConfig
from proxy.errors import Offline, UpstreamCorrupt, UpstreamTimeout, UpstreamUnavailable
from proxy.model import CacheStatus
from proxy.storage.index import DocumentRow, Index
from proxy.storage.locks import KeyLockGroup
from proxy.upstream.client import UpstreamClient

log = logging.getLogger("proxy.documents")

# Fresh bodies bigger than this are checked in a worker thread, so the event loop keeps serving.
CHECK_IN_THREAD = 512 * 1024


@dataclass(frozen=True, slots=True)
class DocumentRequest:
    """What to ask an upstream for one package's metadata document."""

    key: str
    url: str
    headers: Mapping[str, str]
    serial_header: str | None = None
    # Parses a fresh body (bytes, Content-Type) as the format would, raising ValueError when it
    # cannot: a malformed answer must not replace the last good copy.
    check: Callable[[bytes, str], object] | None = None


@dataclass(frozen=True, slots=True)
class FetchedDocument:
    """A document and how it was obtained."""

    row: DocumentRow
    status: CacheStatus
    warning: str | None = None


class DocumentCache:
    """Gets documents through the index, refreshing them from upstreams as freshness requires."""

    def __init__(self, index: Index, server: ServerConfig, locks: KeyLockGroup | None = None) -> None:
        self._index = index
        self._server = server
        self._locks = locks
        self._refreshes: dict[tuple[str, str], asyncio.Task[FetchedDocument | None]] = {}

    async def get(self, client: UpstreamClient, req: DocumentRequest) -> FetchedDocument | None:
        """The document, or None when the upstream says it does not exist (404/410)."""
        row = await self._index.get_document(client.name, req.key)
        now = time.time()
        if row is not None and now < row.expires_at:
            return FetchedDocument(row, CacheStatus.HIT)
        negative = await self._index.get_negative(client.name, req.key) if row is None else None
        if self._server.offline:
            if row is not None:
                return FetchedDocument(row, CacheStatus.STALE, "offline mode")
            if negative is not None:  # known not to exist: still so, as far as anyone can tell
                return None
            raise Offline(
                f"offline mode: {req.url} was never cached, so it cannot be served",
                detail={"upstream": client.name},
            )
        if negative is not None and now < negative:
            return None
        task = self._refresh_task(client, req, row)
        if row is None:
            try:
                return await asyncio.shield(task)
            except UpstreamUnavailable as exc:
                if negative is None:
                    raise
                # Stale-if-error for absence too: what was a 404 stays one while the upstream is
                # down (a build that tolerated the 404 before keeps working).
                log.warning("upstream failing; %s stays not found as last seen: %s", req.url, exc.message)
                return None
        try:
            return await asyncio.wait_for(asyncio.shield(task), self._server.soft_deadline)
        except TimeoutError:
            if self._server.max_staleness and now - row.fetched_at > self._server.max_staleness:
                # Too old to stand in for the upstream: wait for its answer (or its failure).
                return await asyncio.shield(task)
            log.warning(
                "upstream %s slow for %s; serving the stale copy, refresh continues",
                client.name,
                req.url,
            )
            return FetchedDocument(row, CacheStatus.STALE, f"upstream {client.name} slow")
        except (UpstreamUnavailable, UpstreamCorrupt) as exc:
            age = now - row.fetched_at
            if self._server.max_staleness and age > self._server.max_staleness:
                raise
            log.warning("serving stale %s (%.0fs old): %s", req.url, age, exc.message)
            return FetchedDocument(row, CacheStatus.STALE, exc.message)

    def _refresh_task(
        self, client: UpstreamClient, req: DocumentRequest, row: DocumentRow | None
    ) -> asyncio.Task[FetchedDocument | None]:
        key = (client.name, req.key)
        task = self._refreshes.get(key)
        if task is None:
            task = asyncio.create_task(self._refresh(client, req, row), name=f"refresh {req.url}")
            self._refreshes[key] = task
            task.add_done_callback(lambda t: self._finished(key, t))
        return task

    def _finished(self, key: tuple[str, str], task: asyncio.Task[FetchedDocument | None]) -> None:
        self._refreshes.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved: a refresh that outlived its requests is not a bug

    async def _refresh(
        self, client: UpstreamClient, req: DocumentRequest, row: DocumentRow | None
    ) -> FetchedDocument | None:
        if self._locks is None:
            return await self._refetch(client, req, row)
        patience = client.config.metadata_timeout + 5.0
        lock = self._locks.hold(("document", client.name, req.key), patience)
        try:
            await lock.__aenter__()
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"another worker's refresh of {req.url} did not finish in time",
                detail={"upstream": client.name},
            ) from exc
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_exit(lock)
            now = time.time()
            current = await self._index.get_document(client.name, req.key)
            if current is not None and now < current.expires_at and current != row:
                return FetchedDocument(current, CacheStatus.HIT)  # another worker refreshed it
            if current is None and row is None:
                negative = await self._index.get_negative(client.name, req.key)
                if negative is not None and now < negative:
                    return None  # another worker just learned that it does not exist
            return await self._refetch(client, req, current or row)

    async def _refetch(
        self, client: UpstreamClient, req: DocumentRequest, row: DocumentRow | None
    ) -> FetchedDocument | None:
        headers = dict(req.headers)
        if row is not None and row.etag:
            headers["If-None-Match"] = row.etag
        if row is not None and row.last_modified:
            headers["If-Modified-Since"] = row.last_modified
        ttl = client.config.metadata_ttl
        async with client.get(req.url, headers=headers, total_timeout=client.config.metadata_timeout) as resp:
            now = time.time()
            if resp.status == 304 and row is not None:
                await self._index.renew_document(client.name, req.key, now, now + ttl)
                renewed = replace(row, fetched_at=now, expires_at=now + ttl)
                return FetchedDocument(renewed, CacheStatus.REVALIDATED)
            if resp.status in {404, 410}:
                await self._index.put_negative(client.name, req.key, now + self._server.negative_ttl)
                return None
            if resp.status != 200:
                raise UpstreamUnavailable(
                    f"upstream {client.name} answered {resp.status} for {req.url}",
                    detail={"upstream": client.name, "upstream_status": resp.status},
                )
            limit = self._server.max_metadata_size
            if (resp.content_length or 0) > limit:
                raise UpstreamUnavailable(f"upstream {client.name}: document larger than {limit} bytes")
            body = bytearray()
            try:
                async for chunk in resp.content.iter_any():
                    body += chunk
                    if len(body) > limit:
                        raise UpstreamUnavailable(
                            f"upstream {client.name}: document larger than {limit} bytes"
                        )
            except TimeoutError as exc:  # stalled or dripping: sock_read or metadata_timeout
                raise UpstreamTimeout(
                    f"upstream {client.name} stalled while sending {req.url}",
                    detail={"upstream": client.name},
                ) from exc
            except aiohttp.ClientError as exc:  # cut short, reset
                raise UpstreamUnavailable(
                    f"upstream {client.name} broke off sending {req.url}: {str(exc)[:200]}",
                    detail={"upstream": client.name},
                ) from exc
            serial = _int_or_none(resp.headers.get(req.serial_header)) if req.serial_header else None
            if row is not None and serial is not None and row.serial is not None and serial < row.serial:
                log.warning(
                    "upstream %s sent %s at serial %d, older than the cached %d; keeping the cached copy",
                    client.name,
                    req.url,
                    serial,
                    row.serial,
                )
                # Look again soon rather than after a whole TTL: the lagging node may catch up.
                retry_at = now + min(ttl, 30.0)
                await self._index.renew_document(client.name, req.key, row.fetched_at, retry_at)
                kept = replace(row, expires_at=retry_at)
                return FetchedDocument(kept, CacheStatus.REVALIDATED)
            data, content_type = bytes(body), resp.headers.get("Content-Type", "application/octet-stream")
            if req.check is not None:
                await _check(client.name, req, data, content_type)
            new = DocumentRow(
                upstream=client.name,
                key=req.key,
                url=str(resp.url),
                body=data,
                content_type=content_type,
                etag=resp.headers.get("ETag"),
                last_modified=resp.headers.get("Last-Modified"),
                serial=serial,
                fetched_at=now,
                expires_at=now + ttl,
            )
            await self._index.put_document(new)
            return FetchedDocument(new, CacheStatus.MISS)

    async def aclose(self) -> None:
        for task in list(self._refreshes.values()):
            task.cancel()
        for task in list(self._refreshes.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def _check(upstream: str, req: DocumentRequest, body: bytes, content_type: str) -> None:
    """Raise :class:`UpstreamCorrupt` (naming the upstream) if ``req.check`` refuses ``body``."""
    assert req.check is not None
    try:
        if len(body) > CHECK_IN_THREAD:
            await asyncio.to_thread(req.check, body, content_type)
        else:
            req.check(body, content_type)
    except ValueError as exc:
        log.error("upstream %s sent a malformed document for %s: %s", upstream, req.url, exc)
        raise UpstreamCorrupt(
            f"upstream {upstream} sent a malformed document for {req.url}: {str(exc)[:200]}",
            detail={"upstream": upstream},
        ) from exc


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
