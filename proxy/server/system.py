"""System endpoints under ``/-/`` (``-`` is never a domain name): liveness and readiness.

Readiness is what a load balancer or an orchestrator acts on, so it fails only for what makes
this node useless: the index (a cluster's PostgreSQL database, or the SQLite file) that every
request reads, the data directory, the audit writer. The object store of the S3 backend is
checked and reported (``object_store``) but does not fail readiness: while the bucket is down
a node still serves every blob on its own disk, and its neighbours are in the same position,
so taking every node out of rotation would turn a partial outage into a total one.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from pathlib import Path

from aiohttp import web

from proxy.errors import StorageUnavailable
from proxy.security.audit import AuditLog
from proxy.storage.index import Index
from proxy.storage.local import LocalBlobStore
from proxy.storage.s3 import S3BlobStore
from proxy.upstream.client import UpstreamClient

PROBE_TIMEOUT = 2.0  # a probe answers well within a load balancer's check interval


def _dir_usable(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


async def _object_store(blobs: S3BlobStore) -> str:
    """Whether the bucket answers: "ok", or why not (its endpoint, never a credential)."""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            response = await blobs.client.request("HEAD", "")  # HeadBucket: reachable, allowed
            response.release()
    except StorageUnavailable as exc:
        return f"failed: {exc.message}"
    except TimeoutError:
        return f"failed: object store {blobs.client.where} did not answer in {PROBE_TIMEOUT:.0f} s"
    return "ok"


class SystemRoutes:
    """``/-/healthz``: the process answers. ``/-/readyz``: the index and data directory work."""

    def __init__(
        self,
        index: Index,
        data_dir: Path,
        audit: AuditLog,
        clients: Mapping[str, UpstreamClient],
        blobs: LocalBlobStore | None = None,
    ) -> None:
        self._index = index
        self._data_dir = data_dir
        self._audit = audit
        self._clients = clients
        self._bucket = blobs if isinstance(blobs, S3BlobStore) else None

    def register(self, router: web.UrlDispatcher) -> None:
        router.add_get("/-/healthz", self.healthz)
        router.add_get("/-/readyz", self.readyz)

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.StreamResponse:
        # The bucket is asked alongside the index, not after it: an answer slower than the load
        # balancer's check timeout would take the node out for what must not (the docstring).
        bucket = asyncio.ensure_future(_object_store(self._bucket)) if self._bucket is not None else None
        try:
            return await self._answer(bucket)
        finally:
            if bucket is not None and not bucket.done():  # the prober hung up first
                bucket.cancel()

    async def _answer(self, bucket: asyncio.Future[str] | None) -> web.StreamResponse:
        checks: dict[str, str] = {}
        try:
            await asyncio.wait_for(self._index.ping(), PROBE_TIMEOUT)
            checks["index"] = "ok"
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            # The exception's type only: a driver's message may quote the database URL.
            where = " (the shared PostgreSQL database)" if self._index.shared else ""
            checks["index"] = f"failed: {type(exc).__name__}{where}"
        for name in ("blobs", "tmp"):
            usable = await asyncio.to_thread(_dir_usable, self._data_dir / name)
            checks[name] = "ok" if usable else "not writable"
        checks["audit"] = self._audit.failing or "ok"
        ready = all(v == "ok" for v in checks.values())
        # Upstream credentials: expiry, last refresh and last error (never the secret).
        credentials = {
            name: client.credentials.status()
            for name, client in self._clients.items()
            if client.credentials is not None
        }
        body: dict[str, object] = {
            "status": "ready" if ready else "not ready",
            "checks": checks,
            "credentials": credentials,
        }
        if bucket is not None:
            body["object_store"] = await bucket  # reported, never fatal
        return web.json_response(body, status=200 if ready else 503)
