"""The resolver: walk a repository and its upstream chain for a listing or an asset.

Listing: every upstream in order (sibling repositories recursively, external connections through
the document cache), merged with the nearest source winning for the same filename.
Asset: an index hit in the repository or along its chain of repositories (copied into the asked
repository so a later outage of the chain does not lose it); else the file is located in the
listing and fetched once through the flight group, verified against the declared hash, committed,
and recorded for the repository that was asked.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import aiohttp

from proxy.config import Config, RepositoryConfig
from proxy.errors import (
    NotFound,
    Offline,
    ProxyError,
    UpstreamCorrupt,
    UpstreamUnavailable,
)
from proxy.model import AssetRecord, CacheStatus, Digest, ListedFile, Listing, RepoRef
from proxy.pipeline.documents import DocumentCache
from proxy.storage.blobs import BlobInfo
from proxy.storage.hot import HotCache
from proxy.storage.index import Index
from proxy.storage.local import LocalBlobStore
from proxy.storage.staging import StagingArea, StagingError
from proxy.upstream.client import UpstreamClient
from proxy.upstream.flight import Flight, FlightGroup

if TYPE_CHECKING:
    from proxy.formats.base import FormatAdapter

log = logging.getLogger("proxy.resolve")

# How soon a merged listing is looked at again when part of it is stale or failed.
RETRY_SOON = 5.0


@dataclass(frozen=True, slots=True)
class ResolvedListing:
    """A merged listing and what the response should say about it."""

    listing: Listing
    status: CacheStatus
    expires_at: float
    warnings: tuple[str, ...] = ()


@dataclass(slots=True)
class AssetHandle:
    """Either a committed asset (``record``) or a download in progress (``flight``)."""

    status: CacheStatus
    record: AssetRecord | None = None
    flight: Flight | None = None
    entry: ListedFile | None = None


@dataclass(slots=True)
class _Collected:
    listings: list[Listing] = field(default_factory=list)
    statuses: list[CacheStatus] = field(default_factory=list)
    expiries: list[float] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[ProxyError] = field(default_factory=list)


class Resolver:
    """See the module docstring. One per app, built in ``build_app``."""

    def __init__(
        self,
        config: Config,
        index: Index,
        hot: HotCache,
        blobs: LocalBlobStore,
        staging: StagingArea,
        documents: DocumentCache,
        clients: Mapping[str, UpstreamClient],
        flights: FlightGroup,
    ) -> None:
        self.config = config
        self._index = index
        self._hot = hot
        self._blobs = blobs
        self._staging = staging
        self._documents = documents
        self._clients = clients
        self._flights = flights
        self._touched: set[tuple[RepoRef, str, str, str]] = set()

    # --- repositories -------------------------------------------------------------------------

    def repository(self, ref: RepoRef) -> RepositoryConfig:
        domain = self.config.domain(ref.domain)
        if domain is None:
            raise NotFound(f"domain {ref.domain!r} does not exist", detail={"domain": ref.domain})
        repo = domain.repository(ref.repository)
        if repo is None:
            raise NotFound(
                f"repository {ref.repository!r} does not exist in domain {ref.domain!r}",
                detail={"domain": ref.domain, "repository": ref.repository},
            )
        return repo

    def _upstream_repos(self, ref: RepoRef) -> list[RepoRef]:
        domain = self.config.domain(ref.domain)
        assert domain is not None
        return [
            RepoRef(ref.domain, name)
            for name in self.repository(ref).upstreams
            if domain.repository(name) is not None
        ]

    # --- listings -----------------------------------------------------------------------------

    async def listing(self, ref: RepoRef, adapter: FormatAdapter, package: str) -> ResolvedListing:
        collected = await self._collect(ref, adapter, package)
        now = time.time()
        if not collected.listings:
            if collected.errors:
                raise collected.errors[0]
            raise NotFound(
                f"package {package!r} was not found in {ref.domain}/{ref.repository} or its upstreams",
                detail={"package": package, "repository": ref.repository},
            )
        status = CacheStatus.combine(collected.statuses)
        warnings = collected.warnings + [e.message for e in collected.errors]
        if collected.errors:
            status = CacheStatus.STALE
        expires = min(collected.expiries, default=now + RETRY_SOON)
        if status is CacheStatus.STALE:
            expires = min(expires, now + RETRY_SOON) if expires > now else now + RETRY_SOON
        return ResolvedListing(
            listing=Listing.merge(package, collected.listings),
            status=status,
            expires_at=expires,
            warnings=tuple(warnings),
        )

    async def _collect(self, ref: RepoRef, adapter: FormatAdapter, package: str) -> _Collected:
        repo = self.repository(ref)
        domain = self.config.domain(ref.domain)
        assert domain is not None
        jobs = []
        for name in repo.upstreams:
            if domain.repository(name) is not None:
                jobs.append(self._collect(RepoRef(ref.domain, name), adapter, package))
            else:
                jobs.append(self._external(self._clients[name], adapter, package))
        out = _Collected()
        for part in await asyncio.gather(*jobs, return_exceptions=True):
            if isinstance(part, ProxyError):
                out.errors.append(part)
            elif isinstance(part, BaseException):
                raise part
            else:
                out.listings += part.listings
                out.statuses += part.statuses
                out.expiries += part.expiries
                out.warnings += part.warnings
                out.errors += part.errors
        return out

    async def _external(self, client: UpstreamClient, adapter: FormatAdapter, package: str) -> _Collected:
        req = adapter.document_request(client.config.url, package)
        doc = await self._documents.get(client, req)
        out = _Collected()
        if doc is None:
            return out
        row = doc.row
        key = (
            client.name,
            req.key,
            row.etag,
            row.last_modified,
            row.serial,
            len(row.body),
            row.url,
        )
        parsed = self._hot.listing(key)
        if parsed is None:
            parsed = adapter.parse_listing(row.body, row.content_type, row.url, client.name)
            self._hot.remember_listing(key, parsed)
        out.listings.append(parsed)
        out.statuses.append(doc.status)
        out.expiries.append(row.expires_at)
        if doc.warning:
            out.warnings.append(doc.warning)
        return out

    async def cached_files(self, ref: RepoRef, fmt: str, package: str) -> dict[str, AssetRecord]:
        """Assets of a package stored in this repository or along its repository chain."""
        found: dict[str, AssetRecord] = {}
        for repo in [ref, *self._chain_repos(ref)]:
            for rec in await self._index.package_assets(repo, fmt, package):
                found.setdefault(rec.filename, rec)
        return found

    def _chain_repos(self, ref: RepoRef) -> list[RepoRef]:
        ordered: list[RepoRef] = []
        for up in self._upstream_repos(ref):
            for r in [up, *self._chain_repos(up)]:
                if r not in ordered:
                    ordered.append(r)
        return ordered

    async def package_names(self, ref: RepoRef, fmt: str) -> list[str]:
        """Packages this repository (and its repository chain) has stored, sorted."""
        names: set[str] = set()
        for repo in [ref, *self._chain_repos(ref)]:
            names.update(await self._index.list_packages(repo, fmt))
        return sorted(names)

    # --- assets -------------------------------------------------------------------------------

    async def asset(self, ref: RepoRef, adapter: FormatAdapter, package: str, filename: str) -> AssetHandle:
        self.repository(ref)
        record = await self._stored(ref, adapter.name, package, filename)
        if record is not None:
            self._touched.add((ref, adapter.name, package, filename))
            return AssetHandle(CacheStatus.HIT, record=record)
        resolved = await self.listing(ref, adapter, package)
        entry = resolved.listing.file(filename)
        if entry is None:
            raise NotFound(
                f"{filename} is not a file of {package!r} in {ref.domain}/{ref.repository}",
                detail={"package": package, "filename": filename},
            )
        if self.config.server.offline:
            raise Offline(f"offline mode: {filename} was never cached, so it cannot be served")
        if entry.sha256:
            info = await self._blobs.stat(Digest(entry.sha256))
            if info is not None:  # same bytes already stored for another repository or name
                record = self._record(ref, adapter, package, entry, info)
                await self._commit_rows([record])
                return AssetHandle(CacheStatus.HIT, record=record)
        client = self._clients[entry.source]

        async def fetch(flight: Flight) -> BlobInfo:
            return await self._fetch(client, adapter, entry, flight)

        async def on_commit(info: BlobInfo) -> None:
            rows = [self._record(ref, adapter, package, entry, info)]
            rows += [
                AssetRecord(
                    repo=ref,
                    format=adapter.name,
                    package=package,
                    filename=name,
                    digest=d.digest,
                    size=d.size,
                    content_type=ctype,
                    version=entry.version,
                    upstream=client.name,
                    fetched_at=time.time(),
                )
                for name, d, ctype in derived
            ]
            await self._commit_rows(rows)

        flight = self._flights.join((client.name, entry.url), fetch, on_commit)
        derived = flight.derived
        return AssetHandle(CacheStatus.MISS, flight=flight, entry=entry)

    async def _stored(self, ref: RepoRef, fmt: str, package: str, filename: str) -> AssetRecord | None:
        key = (ref, fmt, package, filename)
        record = self._hot.asset(key)
        if record is not None:
            return record
        record = await self._index.get_asset(ref, fmt, package, filename)
        if record is not None:
            self._hot.remember_asset(record)
            return record
        for up in self._upstream_repos(ref):
            found = await self._stored(up, fmt, package, filename)
            if found is not None:
                copy = replace(found, repo=ref)
                await self._commit_rows([copy])
                return copy
        return None

    def _record(
        self, ref: RepoRef, adapter: FormatAdapter, package: str, entry: ListedFile, info: BlobInfo
    ) -> AssetRecord:
        return AssetRecord(
            repo=ref,
            format=adapter.name,
            package=package,
            filename=entry.filename,
            digest=info.digest,
            size=info.size,
            content_type=adapter.content_type(entry.filename),
            version=entry.version,
            origin_url=entry.url,
            upstream=entry.source,
            fetched_at=time.time(),
        )

    async def _commit_rows(self, rows: list[AssetRecord]) -> None:
        conflicts = await self._index.add_assets(rows)
        for old in conflicts:
            log.error(
                "upstream changed the bytes of %s/%s %s: kept %s",
                old.repo.repository,
                old.package,
                old.filename,
                old.digest,
            )
        for row in rows:
            self._hot.forget_asset((row.repo, row.format, row.package, row.filename))
            self._hot.invalidate_package((row.repo.domain, row.format, row.package))

    async def _fetch(
        self, client: UpstreamClient, adapter: FormatAdapter, entry: ListedFile, flight: Flight
    ) -> BlobInfo:
        server = self.config.server
        try:
            async with asyncio.timeout(server.asset_timeout):
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
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnavailable(
                f"upstream {client.name} failed while sending {entry.filename}: {exc}",
                detail={"upstream": client.name},
            ) from exc
        except TimeoutError as exc:
            raise UpstreamUnavailable(
                f"upstream {client.name} took too long to send {entry.filename}",
                detail={"upstream": client.name},
            ) from exc
        flight.derived.extend(await self._derive(adapter, entry, info))
        return info

    async def _download(
        self, client: UpstreamClient, adapter: FormatAdapter, entry: ListedFile, flight: Flight
    ) -> BlobInfo:
        limit = self.config.server.max_asset_size
        async with client.get(entry.url, headers={"Accept-Encoding": "identity"}, total_timeout=None) as resp:
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

    async def _derive(
        self, adapter: FormatAdapter, entry: ListedFile, info: BlobInfo
    ) -> list[tuple[str, BlobInfo, str]]:
        path = self._blobs.local_path(info.digest)
        try:
            companions = await asyncio.to_thread(adapter.derive, entry, path)
        except Exception:
            log.exception("could not derive companions of %s", entry.filename)
            return []
        out = []
        for name, data, ctype in companions:
            writer = self._staging.create(max_size=len(data))
            async with writer:
                await writer.write(data)
                staged = await writer.finish()
            out.append((name, await self._blobs.put(staged), ctype))
        return out

    async def flush_touches(self) -> None:
        """Write the batched last-access times (called periodically, not per request)."""
        touched, self._touched = self._touched, set()
        await self._index.touch_assets(touched, time.time())
