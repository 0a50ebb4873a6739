"""Fetching one asset from an external connection into the blob store.

Runs inside a flight (upstream/flight.py): the body streams into a staging file that readers tail,
is checked against the length and every hash the upstream declared, fsynced, renamed into the
blob store, and only then reported done. Companion files the adapter derives from the asset
(PEP 658 metadata of a wheel) are stored alongside before the flight completes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import aiohttp

from proxy.config import ServerConfig
from proxy.errors import (
    InsufficientStorage,
    NotFound,
    UpstreamCorrupt,
    UpstreamTimeout,
    UpstreamUnavailable,
    is_disk_full,
)
from proxy.model import ListedFile
from proxy.storage.blobs import BlobInfo
from proxy.storage.local import LocalBlobStore
from proxy.storage.staging import StagingArea, StagingError
from proxy.upstream.client import UpstreamClient
from proxy.upstream.flight import Flight

if TYPE_CHECKING:
    from proxy.formats.base import FormatAdapter

log = logging.getLogger("proxy.fetch")


class Fetcher:
    """Downloads, verifies and commits assets; see the module docstring."""

    def __init__(self, server: ServerConfig, blobs: LocalBlobStore, staging: StagingArea) -> None:
        self._server = server
        self._blobs = blobs
        self._staging = staging

    async def fetch(
        self, client: UpstreamClient, adapter: FormatAdapter, entry: ListedFile, flight: Flight
    ) -> BlobInfo:
        """The flight's job: the committed blob, or an error naming the upstream."""
        try:
            async with asyncio.timeout(self._server.asset_timeout):
                info = await self._download(client, adapter, entry, flight)
        except StagingError as exc:
            log.error("upstream %s sent bad bytes for %s: %s", client.name, entry.url, exc)
            raise UpstreamCorrupt(
                f"upstream {client.name} sent bad bytes for {entry.filename}: {exc}",
                detail={"upstream": client.name},
            ) from exc
        except aiohttp.ClientPayloadError as exc:
            raise UpstreamUnavailable(
                f"upstream {client.name} broke off the transfer of {entry.filename}",
                detail={"upstream": client.name},
            ) from exc
        except TimeoutError as exc:  # an OSError too: caught first, it is the asset deadline
            raise UpstreamTimeout(
                f"upstream {client.name} took too long to send {entry.filename}",
                detail={"upstream": client.name},
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            if is_disk_full(exc):  # our disk is full, not the upstream at fault: a 507 that says so
                raise InsufficientStorage(
                    f"no space left to store {entry.filename}: the proxy's storage is full"
                ) from exc
            raise UpstreamUnavailable(
                f"upstream {client.name} failed while sending {entry.filename}: {exc}",
                detail={"upstream": client.name},
            ) from exc
        flight.derived.extend(await self.derive(adapter, entry, info))
        return info

    async def _download(
        self, client: UpstreamClient, adapter: FormatAdapter, entry: ListedFile, flight: Flight
    ) -> BlobInfo:
        limit = self._server.max_asset_size
        async with client.get(entry.url, headers={"Accept-Encoding": "identity"}, total_timeout=None) as resp:
            if resp.status in {404, 410} and entry.located:
                raise NotFound(
                    f"upstream {client.name} has no {entry.filename} ({resp.status})",
                    detail={"upstream": client.name, "upstream_status": resp.status},
                )
            if resp.status in {404, 410}:
                # The upstream listed this file and then denies it: its fault, not "not found"
                # (a 404 here would tell a build the version does not exist).
                raise UpstreamUnavailable(
                    f"upstream {client.name} lists {entry.filename} but answered {resp.status} for it",
                    detail={"upstream": client.name, "upstream_status": resp.status},
                )
            if resp.status != 200:
                raise UpstreamUnavailable(
                    f"upstream {client.name} answered {resp.status} for {entry.filename}",
                    detail={"upstream": client.name, "upstream_status": resp.status},
                )
            size = resp.content_length
            if size is not None and entry.size is not None and size != entry.size:
                raise UpstreamCorrupt(
                    f"upstream {client.name} sends {size} bytes for {entry.filename}, "
                    f"its index declares {entry.size}",
                    detail={"upstream": client.name},
                )
            expect_size = size if size is not None else entry.size
            if expect_size is not None and expect_size > limit:
                raise UpstreamUnavailable(f"{entry.filename} is larger than max_asset_size ({limit})")
            writer = self._staging.create(entry.hashes, expect_size=expect_size, max_size=limit)
            async with writer:
                await flight.attach(writer, adapter.content_type(entry.filename), expect_size)
                async for chunk in resp.content.iter_any():
                    await writer.write(chunk)
                staged = await writer.finish()
        return await self._blobs.put(staged)

    async def derive(
        self, adapter: FormatAdapter, entry: ListedFile, info: BlobInfo
    ) -> list[tuple[str, BlobInfo, str]]:
        """Store the adapter's companion files of a committed asset (failures only logged)."""
        blobs = self._blobs
        try:
            companions = await asyncio.to_thread(adapter.derive, entry, lambda: blobs.open_plain(info.digest))
        except Exception:
            log.exception("could not derive companions of %s", entry.filename)
            return []
        return [(name, await self.store_bytes(data), ctype) for name, data, ctype in companions]

    async def store_bytes(self, data: bytes) -> BlobInfo:
        """A small in-memory document as a blob (staged and fsynced like everything else)."""
        writer = self._staging.create(max_size=len(data))
        async with writer:
            await writer.write(data)
            staged = await writer.finish()
        return await self._blobs.put(staged)
