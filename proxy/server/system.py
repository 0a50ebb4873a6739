"""System endpoints under ``/-/`` (``-`` is never a domain name): liveness and readiness."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from pathlib import Path

from aiohttp import web

from proxy.security.audit import AuditLog
from proxy.storage.index import Index
from proxy.upstream.client import UpstreamClient


def _dir_usable(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


class SystemRoutes:
    """``/-/healthz``: the process answers. ``/-/readyz``: the index and data directory work."""

    def __init__(
        self, index: Index, data_dir: Path, audit: AuditLog, clients: Mapping[str, UpstreamClient]
    ) -> None:
        self._index = index
        self._data_dir = data_dir
        self._audit = audit
        self._clients = clients

    def register(self, router: web.UrlDispatcher) -> None:
        router.add_get("/-/healthz", self.healthz)
        router.add_get("/-/readyz", self.readyz)

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.StreamResponse:
        checks: dict[str, str] = {}
        try:
            await asyncio.wait_for(self._index.ping(), 2.0)
            checks["index"] = "ok"
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            checks["index"] = f"failed: {type(exc).__name__}"
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
        return web.json_response(
            {"status": "ready" if ready else "not ready", "checks": checks, "credentials": credentials},
            status=200 if ready else 503,
        )
