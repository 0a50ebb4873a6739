"""The resolver: walk a repository and its upstream chain for a listing or an asset.

Listing: the repository's own published versions first, then every upstream in order (sibling
repositories recursively, external connections through the document cache), filtered by the
repository's origin controls (pipeline/origin.py) and merged with the nearest source winning for
the same filename. Asset: an index hit in the repository or along its chain of repositories
(copied into the asked repository so a later outage of the chain does not lose it); else the
file is located in the listing and fetched once through the flight group (pipeline/fetch.py),
verified, committed, and recorded for the repository that was asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from cachetools import LRUCache

from proxy.config import Config, RepositoryConfig
from proxy.errors import (
    BlockedByOrigin,
    NotFound,
    Offline,
    ProxyError,
    UpstreamCorrupt,
    UpstreamUnavailable,
)
from proxy.model import AssetRecord, CacheStatus, Digest, ListedFile, Listing, RepoRef
from proxy.pipeline.documents import DocumentCache, DocumentRequest
from proxy.pipeline.fetch import Fetcher
from proxy.pipeline.mutations import MutationGuard
from proxy.pipeline.origin import PackagePolicy, matching_rule
from proxy.pipeline.registry import RepositoryRegistry
from proxy.security.audit import AuditLog
from proxy.storage.blobs import BlobInfo
from proxy.storage.catalog import Catalog, QuarantineEntry
from proxy.storage.hot import HotCache
from proxy.storage.index import Index
from proxy.storage.intact import BlobCheck
from proxy.storage.local import LocalBlobStore
from proxy.upstream.client import UpstreamClient
from proxy.upstream.flight import Flight, FlightGroup

if TYPE_CHECKING:
    from proxy.formats.base import FormatAdapter

log = logging.getLogger("proxy.resolve")

# How soon a merged listing is looked at again when part of it is stale or failed.
RETRY_SOON = 5.0
# Documents bigger than this are parsed in a worker thread, so the event loop keeps serving.
BIG_DOCUMENT = 512 * 1024
HOSTED = ""  # the ``source`` of a listed file published in a repository of the chain
# Package versions the cached policies may hold in all. A policy carries every version's
# attributes (npm manifests, PyPI metadata), most of its memory: bounding by versions rather than
# by packages keeps a busy registry's memory bounded (bench/index_scale.py: 10k policies of
# published packages held ~70 MB).
POLICY_CACHE_VERSIONS = 20_000


@dataclass(frozen=True, slots=True)
class ResolvedListing:
    """A merged listing and what the response should say about it."""

    listing: Listing
    status: CacheStatus
    expires_at: float
    warnings: tuple[str, ...] = ()
    blocked: Mapping[str, str] = field(default_factory=dict)  # filename -> why it is hidden
    stale_upstreams: tuple[str, ...] = ()  # connections answered for by a stale copy or not at all
    sources: tuple[Hashable, ...] = ()  # identities of the upstream documents it was built from


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
    blocked: dict[str, str] = field(default_factory=dict)
    stale: list[str] = field(default_factory=list)
    sources: list[Hashable] = field(default_factory=list)

    def absorb(self, other: _Collected) -> None:
        self.stale += [name for name in other.stale if name not in self.stale]
        self.sources += other.sources
        self.listings += other.listings
        self.statuses += other.statuses
        self.expiries += other.expiries
        self.warnings += other.warnings
        self.errors += other.errors
        for name, why in other.blocked.items():
            self.blocked.setdefault(name, why)


class Resolver:
    """See the module docstring. One per app, built in ``build_app``."""

    def __init__(
        self,
        config: Config,
        registry: RepositoryRegistry,
        index: Index,
        catalog: Catalog,
        hot: HotCache,
        blobs: LocalBlobStore,
        fetcher: Fetcher,
        documents: DocumentCache,
        clients: Mapping[str, UpstreamClient],
        flights: FlightGroup,
        audit: AuditLog,
    ) -> None:
        self.config = config
        self.registry = registry
        self._index = index
        self._catalog = catalog
        self._hot = hot
        self._blobs = blobs
        self._fetcher = fetcher
        self._documents = documents
        self._clients = clients
        self._flights = flights
        self._audit = audit
        self._touched: set[tuple[RepoRef, str, str, str]] = set()
        self._mutations = MutationGuard(blobs)
        self._blob_check = BlobCheck(blobs, config.server.data_dir / "quarantine")
        self._policies: LRUCache[tuple[RepoRef, str, str], PackagePolicy] = LRUCache(
            maxsize=POLICY_CACHE_VERSIONS, getsizeof=lambda policy: 1 + len(policy.statuses)
        )

    @property
    def index(self) -> Index:
        """The index, for the CLI's maintenance commands (gc, verify, stats, export)."""
        return self._index

    # --- repositories -------------------------------------------------------------------------

    def repository(self, ref: RepoRef) -> RepositoryConfig:
        return self.registry.repository(ref)

    def _upstream_repos(self, ref: RepoRef) -> list[RepoRef]:
        domain = self.registry.domain(ref.domain)
        assert domain is not None
        return [
            RepoRef(ref.domain, name)
            for name in self.repository(ref).upstreams
            if domain.repository(name) is not None
        ]

    # --- origin controls ----------------------------------------------------------------------

    async def policy(self, ref: RepoRef, fmt: str, package: str) -> PackagePolicy:
        """What decides the package's visibility here; cached until a catalog change."""
        key = (ref, fmt, package)
        found = self._policies.get(key)
        if found is not None:
            return found
        epoch = self._hot.epoch
        rules = await self._catalog.origin_rules(ref, fmt)
        versions = await self._catalog.versions(ref, fmt, package)
        policy = PackagePolicy(
            rule=matching_rule(package, rules),
            has_hosted=any(v.status != "Disposed" for v in versions),
            quarantine=await self._quarantine(ref, fmt),
            min_release_age=self.repository(ref).min_release_age,
            statuses={v.version: v.status for v in versions},
            attributes={v.version: v.attributes for v in versions},
        )
        if epoch == self._hot.epoch:  # not when another worker's change landed meanwhile
            with contextlib.suppress(ValueError):  # more versions than the whole budget: not kept
                self._policies[key] = policy
        return policy

    async def _quarantine(self, ref: RepoRef, fmt: str) -> tuple[QuarantineEntry, ...]:
        """This repository's quarantine and that of every repository it draws from: a release
        quarantined upstream is not served downstream either, even from a copy kept earlier."""
        entries: list[QuarantineEntry] = []
        for repo in [ref, *self._chain_repos(ref)]:
            entries += await self._catalog.quarantine(repo, fmt)
        return tuple(entries)

    def catalog_changed(self, domain: str, fmt: str, package: str | None = None) -> None:
        """Forget derived state after a publish, status change, rule or quarantine change."""
        self._policies.clear()
        if package is not None:
            self._hot.invalidate_package((domain, fmt, package))
        else:
            self._hot.clear_pages()

    # --- listings -----------------------------------------------------------------------------

    async def listing(self, ref: RepoRef, adapter: FormatAdapter, package: str) -> ResolvedListing:
        collected = await self._collect(ref, adapter, package)
        now = time.time()
        if not any(lst.files for lst in collected.listings):
            if collected.errors:
                raise collected.errors[0]
            if collected.blocked:
                reason = next(iter(collected.blocked.values()))
                raise BlockedByOrigin(
                    f"every version of {package!r} is hidden in {ref.domain}/{ref.repository}: {reason}",
                    detail={"package": package},
                )
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
        merged = Listing.merge(package, collected.listings)
        if any(f.source and f.hashes for f in merged.files):  # cached upstream files stay as cached
            stored = await self.cached_files(ref, adapter.name, package)
            merged = await self._mutations.keep_cached(adapter, merged, stored)
        return ResolvedListing(
            listing=merged,
            status=status,
            expires_at=expires,
            warnings=tuple(warnings),
            blocked=collected.blocked,
            stale_upstreams=tuple(
                collected.stale
                + [str(e.detail["upstream"]) for e in collected.errors if "upstream" in e.detail]
            ),
            sources=tuple(collected.sources),
        )

    async def _collect(self, ref: RepoRef, adapter: FormatAdapter, package: str) -> _Collected:
        repo = self.repository(ref)
        domain = self.registry.domain(ref.domain)
        assert domain is not None
        policy = await self.policy(ref, adapter.name, package)
        out = _Collected()
        hosted = await self._hosted(ref, adapter, package, policy)
        if hosted.files:
            out.listings.append(hosted)
            out.statuses.append(CacheStatus.HIT)
        block = policy.upstream_block_reason()
        jobs = []
        for name in repo.upstreams:
            if domain.repository(name) is not None:
                jobs.append(self._collect(RepoRef(ref.domain, name), adapter, package))
            elif self._clients[name].config.format == adapter.name:  # a connection serves one format
                jobs.append(self._external(self._clients[name], adapter, package))
        now = time.time()
        for part in await asyncio.gather(*jobs, return_exceptions=True):
            if isinstance(part, ProxyError):
                if block is None:
                    out.errors.append(part)
                continue
            if isinstance(part, BaseException):
                raise part
            upstream_part = _Collected(
                statuses=part.statuses,
                expiries=part.expiries,
                warnings=part.warnings,
                errors=part.errors,
                stale=part.stale,
                sources=part.sources,
            )
            upstream_part.blocked.update(part.blocked)
            for listing in part.listings:
                kept = []
                for entry in listing.files:
                    why = block or policy.quarantine_reason(package, entry.version)
                    why = why or policy.age_reason(entry.extra.get("upload_time"), now)
                    if why is None:
                        kept.append(entry)
                    else:
                        upstream_part.blocked.setdefault(entry.filename, why)
                upstream_part.listings.append(replace(listing, files=tuple(kept)))
            if block is not None:
                upstream_part.errors = []
            out.absorb(upstream_part)
        return out

    async def _hosted(
        self, ref: RepoRef, adapter: FormatAdapter, package: str, policy: PackagePolicy
    ) -> Listing:
        """The repository's own published files (Unlisted ones hidden, Archived ones left out)."""
        if not policy.statuses:
            return Listing(package=package)
        files = []
        for rec in await self._index.package_assets(ref, adapter.name, package):
            if not rec.hosted or rec.version is None:
                continue
            status = policy.statuses.get(rec.version)
            if status in (None, "Archived", "Disposed"):
                continue
            attrs = policy.attributes.get(rec.version, {})
            files.append(
                adapter.hosted_file(
                    rec,
                    attrs,
                    hidden=status == "Unlisted",
                    upload_time=datetime.fromtimestamp(rec.fetched_at, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                )
            )
        versions = tuple(v for v, st in policy.statuses.items() if st in ("Published",))
        tags = await self._catalog.tags(ref, adapter.name, package)
        extra = adapter.hosted_extra(
            tags, {f.version: f.extra.get("upload_time") for f in files if f.version}
        )
        return Listing(package=package, files=tuple(files), versions=versions, extra=extra)

    async def _external(self, client: UpstreamClient, adapter: FormatAdapter, package: str) -> _Collected:
        out = _Collected()
        base = client.config.url
        if adapter.discovers_service:
            try:
                base = await self._service_base(client, adapter)
            except ProxyError as exc:
                out.errors.append(exc)
                return out
        req = adapter.document_request(base, package)
        # A fresh body the adapter cannot parse is refused before it replaces the last good copy;
        # what the check parsed is used below rather than parsed again (same body, same URL).
        url, source = req.url, client.name
        checked: list[tuple[bytes, Listing]] = []

        def check(body: bytes, ctype: str) -> Listing:
            listing = adapter.parse_listing(body, ctype, url, source)
            checked.append((body, listing))
            return listing

        req = replace(req, check=check)
        doc = await self._documents.get(client, req)
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
            # Without validators every refresh is a full 200: only its time identifies it.
            None if row.etag or row.last_modified else row.fetched_at,
        )
        parsed = self._hot.listing(key)
        if parsed is None:
            try:
                if checked and checked[-1][0] is row.body and row.url == url:
                    parsed = checked[-1][1]
                elif len(row.body) > BIG_DOCUMENT:  # tens of MB for the biggest npm packuments
                    parsed = await asyncio.to_thread(
                        adapter.parse_listing, row.body, row.content_type, row.url, client.name
                    )
                else:
                    parsed = adapter.parse_listing(row.body, row.content_type, row.url, client.name)
                parsed = await self._with_linked(client, adapter, parsed)
            except ValueError as exc:  # malformed: reported and skipped, never served
                log.error("upstream %s sent a malformed document for %s: %s", client.name, package, exc)
                out.errors.append(
                    UpstreamCorrupt(
                        f"upstream {client.name} sent a malformed document for {package}: {exc}",
                        detail={"upstream": client.name, "package": package},
                    )
                )
                return out
            self._hot.remember_listing(key, parsed, len(row.body))
        out.listings.append(parsed)
        out.sources.append(key)
        out.statuses.append(doc.status)
        if doc.status is CacheStatus.STALE:
            out.stale.append(client.name)
        out.expiries.append(row.expires_at)
        if doc.warning:
            out.warnings.append(doc.warning)
        return out

    async def _with_linked(self, client: UpstreamClient, adapter: FormatAdapter, parsed: Listing) -> Listing:
        """Follow the documents a listing links to (each cached with its own freshness)."""
        links = adapter.linked_documents(parsed)
        if not links:
            return parsed
        docs = await asyncio.gather(*(self._documents.get(client, link) for link in links))
        missing = [link.url for link, doc in zip(links, docs, strict=True) if doc is None]
        if missing:
            raise ValueError(f"linked documents are missing upstream: {', '.join(missing[:3])}")
        bodies = [doc.row.body for doc in docs if doc is not None]
        return adapter.with_linked(parsed, bodies, client.name)

    async def _service_base(self, client: UpstreamClient, adapter: FormatAdapter) -> str:
        """Where a connection's package documents are, from its service index (a document too)."""
        doc = await self.service_index(client)
        try:
            return adapter.service_base(doc)
        except ValueError as exc:
            raise UpstreamCorrupt(
                f"upstream {client.name}: unusable service index: {exc}", detail={"upstream": client.name}
            ) from exc

    async def service_index(self, client: UpstreamClient) -> bytes:
        """A connection's service index (NuGet), through the document cache."""
        req = DocumentRequest(key="service-index", url=client.config.url, headers={})
        doc = await self._documents.get(client, req)
        if doc is None:
            raise UpstreamUnavailable(
                f"upstream {client.name} has no service index at {client.config.url}",
                detail={"upstream": client.name},
            )
        return doc.row.body

    def first_connection(self, ref: RepoRef, fmt: str) -> UpstreamClient:
        """The first external connection of ``fmt`` along the chain (for pass-through calls)."""
        domain = self.registry.domain(ref.domain)
        assert domain is not None
        for name in self.repository(ref).upstreams:
            if domain.repository(name) is not None:
                try:
                    return self.first_connection(RepoRef(ref.domain, name), fmt)
                except NotFound:
                    continue
            client = self._clients.get(name)
            if client is not None and client.config.format == fmt:
                if self.config.server.offline:
                    raise Offline(f"offline mode: {fmt} pass-through calls need the upstream")
                return client
        raise NotFound(f"{ref.domain}/{ref.repository} has no {fmt} upstream to pass this call to")

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
        fmt = adapter.name
        policy = await self.policy(ref, fmt, package)
        record = await self._stored(ref, fmt, package, filename)
        where = {"domain": ref.domain, "repository": ref.repository, "format": fmt, "package": package}
        if record is not None:
            self._check_visible(ref, package, record, policy)
            record = await self._intact(record)  # None: damaged on disk, to be fetched again
        if record is not None:
            self._touched.add((ref, fmt, package, filename))
            self._audit.fetch("HIT", version=record.version, digest=record.digest.hex, **where)
            return AssetHandle(CacheStatus.HIT, record=record)
        self._audit.fetch(
            "MISS", version=adapter.version_of(filename) or "", detail={"filename": filename}, **where
        )
        if adapter.files_at_paths:
            if self.config.server.offline:
                raise Offline(f"offline mode: {filename} was never cached, so it cannot be served")
            located = await self._locate(ref, adapter, package, filename, policy)
            return self._fetch(ref, adapter, package, located)
        resolved = await self.listing(ref, adapter, package)
        entry = resolved.listing.file(filename)
        if entry is None:
            if filename in resolved.blocked:
                raise BlockedByOrigin(
                    f"{filename} is not served by {ref.domain}/{ref.repository}: "
                    f"{resolved.blocked[filename]}",
                    detail={"package": package, "filename": filename},
                )
            raise NotFound(
                f"{filename} is not a file of {package!r} in {ref.domain}/{ref.repository}",
                detail={"package": package, "filename": filename},
            )
        if entry.source == HOSTED:
            raise NotFound(f"{filename} is listed but its file is gone", detail={"filename": filename})
        if self.config.server.offline:
            raise Offline(f"offline mode: {filename} was never cached, so it cannot be served")
        if entry.sha256:
            try:
                digest = Digest(entry.sha256)
            except ValueError:  # a hostile or broken index: never a 500, never a header
                raise UpstreamCorrupt(
                    f"the upstream declared a malformed sha256 for {filename}", detail={"filename": filename}
                ) from None
            # Same bytes already stored for another repository or name (or by another node).
            info = await self._blobs.servable(digest)
            if info is not None:
                record = self._record(ref, adapter, package, entry, info)
                await self._commit_rows([record])
                return AssetHandle(CacheStatus.HIT, record=record)
        return self._fetch(ref, adapter, package, entry)

    async def _intact(self, record: AssetRecord) -> AssetRecord | None:
        """The record, if its blob holds the bytes its name says (storage/intact.py). Else the
        damage is logged, every cached row of the blob dropped (so the caller fetches it again,
        as ``verify --repair`` would have it), and None returned; a damaged hosted file cannot
        be fetched again and is an error, never served."""
        damage = await self._blob_check.damage(record.digest)
        if damage is None:
            return record
        dropped = await self._index.drop_cached_digest(record.digest)
        for row in [record, *dropped]:
            self._hot.forget_asset((row.repo, row.format, row.package, row.filename))
            self._hot.invalidate_package((row.repo.domain, row.format, row.package))
        log.error(
            "blob %s of %s/%s %s is %s on disk: not served; %d cached rows dropped to fetch it again",
            record.digest.hex,
            record.repo.repository,
            record.package,
            record.filename,
            damage,
            len(dropped),
        )
        if record.hosted:
            raise ProxyError(
                f"the stored {record.filename} is {damage} on disk and cannot be served "
                "(a published file: restore it from a backup or publish it again)"
            )
        return None

    def _fetch(self, ref: RepoRef, adapter: FormatAdapter, package: str, entry: ListedFile) -> AssetHandle:
        """Join (or start) the one download of ``entry`` and record it for ``ref`` when done."""
        fmt = adapter.name
        client = self._clients[entry.source]

        async def fetch(flight: Flight) -> BlobInfo:
            if not entry.extra.get("probe"):
                return await self._fetcher.fetch(client, adapter, entry, flight)
            # A file no checksum vouched for: it may not exist. Its 404 is remembered like a
            # document's, and served again while the upstream is failing.
            missing_key = f"missing:{entry.url}"
            try:
                return await self._fetcher.fetch(client, adapter, entry, flight)
            except NotFound:
                ttl = self.config.server.negative_ttl
                await self._index.put_negative(client.name, missing_key, time.time() + ttl)
                raise
            except UpstreamUnavailable as exc:
                if await self._index.get_negative(client.name, missing_key) is None:
                    raise
                raise NotFound(
                    f"{entry.filename} was not found upstream when last asked ({exc.message})",
                    detail={"filename": entry.filename, "upstream": client.name},
                ) from exc

        async def on_commit(info: BlobInfo) -> None:
            rows = [self._record(ref, adapter, package, entry, info)]
            rows += [
                AssetRecord(
                    repo=ref,
                    format=fmt,
                    package=package,
                    filename=name,
                    digest=d.digest,
                    size=d.size,
                    content_type=ctype,
                    version=entry.version,
                    upstream=client.name,
                    fetched_at=time.time(),
                )
                for name, d, ctype in flight.derived
            ]
            await self._commit_rows(rows)

        async def recheck(flight: Flight) -> BlobInfo | None:
            """Another worker process may have committed the file while this one waited."""
            sha = entry.sha256
            digest = Digest(sha) if sha else await self._index.origin_digest(client.name, entry.url)
            info = await self._blobs.servable(digest) if digest is not None else None  # or another node
            if info is not None:
                flight.content_type = adapter.content_type(entry.filename)
                flight.derived.extend(await self._fetcher.derive(adapter, entry, info))
            return info

        flight = self._flights.join((client.name, entry.url), fetch, on_commit, recheck)
        return AssetHandle(CacheStatus.MISS, flight=flight, entry=entry)

    async def _locate(
        self, ref: RepoRef, adapter: FormatAdapter, package: str, filename: str, policy: PackagePolicy
    ) -> ListedFile:
        """The upstream entry of a file whose URL follows from its name (Maven).

        The first connection along the chain whose checksum document vouches for the file
        provides it, checked against that checksum; a connection that answers 404 is skipped
        (and remembered briefly). Where no connection offers checksums at all, the first one
        is asked for the file itself, and its bytes are taken as they come.
        """
        version = adapter.version_of(filename)
        why = policy.upstream_block_reason() or policy.quarantine_reason(package, version)
        if why is not None:
            raise BlockedByOrigin(
                f"{filename} is not served by {ref.domain}/{ref.repository}: {why}",
                detail={"package": package, "filename": filename},
            )
        connections = await self.connections(ref, adapter.name, package)
        errors: list[ProxyError] = []
        for client in connections:
            url, checksum = adapter.locate(client.config.url, package, filename)
            if checksum is None:
                return ListedFile(filename, url, client.name, {}, version, located=True)
            try:
                doc = await self._documents.get(client, checksum)
            except ProxyError as exc:
                errors.append(exc)
                continue
            if doc is None:
                continue
            try:
                hashes = adapter.checksum_hashes(doc.row.body)
            except ValueError as exc:
                log.warning("upstream %s: unusable checksum for %s: %s", client.name, filename, exc)
                hashes = {}
            return ListedFile(filename, url, client.name, hashes, version, located=True)
        if errors:
            raise errors[0]
        if connections:
            first = connections[0]
            url, _ = adapter.locate(first.config.url, package, filename)
            missing = await self._index.get_negative(first.name, f"missing:{url}")
            if missing is not None and time.time() < missing:
                raise NotFound(
                    f"{filename} was not found in {ref.domain}/{ref.repository} or its upstreams",
                    detail={"package": package, "filename": filename, "upstream": first.name},
                )
            return ListedFile(filename, url, first.name, {}, version, extra={"probe": True}, located=True)
        raise NotFound(
            f"{filename} was not found in {ref.domain}/{ref.repository} or its upstreams",
            detail={"package": package, "filename": filename},
        )

    async def connections(self, ref: RepoRef, fmt: str, package: str) -> list[UpstreamClient]:
        """The external connections of ``fmt`` along the chain, in order, skipping repositories
        whose origin controls keep ``package`` from their upstreams."""
        policy = await self.policy(ref, fmt, package)
        if policy.upstream_block_reason() is not None:
            return []
        domain = self.registry.domain(ref.domain)
        assert domain is not None
        found: list[UpstreamClient] = []
        for name in self.repository(ref).upstreams:
            if domain.repository(name) is not None:
                for client in await self.connections(RepoRef(ref.domain, name), fmt, package):
                    if client not in found:
                        found.append(client)
            else:
                connection = self._clients.get(name)
                if connection is not None and connection.config.format == fmt and connection not in found:
                    found.append(connection)
        return found

    async def hosted_files(self, ref: RepoRef, adapter: FormatAdapter, package: str) -> list[ListedFile]:
        """Files published in the repository or along its repository chain (nearest first)."""
        found: dict[str, ListedFile] = {}
        for repo in [ref, *self._chain_repos(ref)]:
            hosted = await self._hosted(
                repo, adapter, package, await self.policy(repo, adapter.name, package)
            )
            for entry in hosted.files:
                found.setdefault(entry.filename, entry)
        return list(found.values())

    async def upstream_document(
        self, ref: RepoRef, fmt: str, package: str, request_for: Callable[[str], DocumentRequest]
    ) -> tuple[bytes, CacheStatus] | None:
        """A document from the first connection along the chain that has it (None: none has).

        ``request_for`` builds the request from a connection's URL. Freshness, revalidation and
        stale-if-error are the document cache's, as for listings.
        """
        errors: list[ProxyError] = []
        for client in await self.connections(ref, fmt, package):
            try:
                doc = await self._documents.get(client, request_for(client.config.url))
            except ProxyError as exc:
                errors.append(exc)
                continue
            if doc is not None:
                return doc.row.body, doc.status
        if errors:
            raise errors[0]
        return None

    async def companion(
        self, ref: RepoRef, adapter: FormatAdapter, package: str, main: str, companion: str
    ) -> tuple[AssetRecord | None, CacheStatus]:
        """A file derived from another (a checksum, a .nuspec): stored, or stored once the main
        file has been fetched (derived files are committed with it). None if it still is not."""
        record = await self._stored(ref, adapter.name, package, companion)
        if record is not None:
            await self._blobs.locate(record.digest, fetch=False)  # an object store's: to this disk
            return record, CacheStatus.HIT
        handle = await self.asset(ref, adapter, package, main)
        status = CacheStatus.HIT
        if handle.flight is not None:
            status = CacheStatus.MISS
            try:
                await handle.flight.result()
            finally:
                handle.flight.release()
        return await self._stored(ref, adapter.name, package, companion), status

    async def stored_asset(self, ref: RepoRef, fmt: str, package: str, filename: str) -> AssetRecord | None:
        """A file stored in the repository or along its repository chain (no upstream asked)."""
        return await self._stored(ref, fmt, package, filename)

    def _check_visible(self, ref: RepoRef, package: str, record: AssetRecord, policy: PackagePolicy) -> None:
        """A stored file is served only while the repository's rules still show its version."""
        where = f"{ref.domain}/{ref.repository}"
        if record.hosted:
            status = policy.statuses.get(record.version or "")
            if status == "Archived":
                raise NotFound(
                    f"{package} {record.version} is archived in {where} and cannot be installed",
                    detail={"package": package, "version": record.version, "status": status},
                )
            return
        why = policy.upstream_block_reason() or policy.quarantine_reason(package, record.version)
        if why is not None:
            raise BlockedByOrigin(
                f"{record.filename} is not served by {where}: {why}",
                detail={"package": package, "filename": record.filename},
            )

    async def _stored(self, ref: RepoRef, fmt: str, package: str, filename: str) -> AssetRecord | None:
        key = (ref, fmt, package, filename)
        record = self._hot.asset(key)
        if record is not None:
            return record
        epoch = self._hot.epoch
        record = await self._index.get_asset(ref, fmt, package, filename)
        if record is not None:
            if epoch == self._hot.epoch:
                self._hot.remember_asset(record)
            return record
        for up in self._upstream_repos(ref):
            found = await self._stored(up, fmt, package, filename)
            if found is None:
                continue
            try:  # what the upstream repository itself would not serve is not taken from it
                self._check_visible(up, package, found, await self.policy(up, fmt, package))
            except ProxyError:
                continue
            copy = replace(found, repo=ref, hosted=False)
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

    def forget_package_assets(self, ref: RepoRef, fmt: str, package: str) -> None:
        self._hot.forget_package_assets(ref, fmt, package)

    def index_changed_elsewhere(self) -> None:
        """Another process (the CLI) wrote the index: drop every derived in-memory view."""
        self._policies.clear()
        self._hot.clear()

    def published(self, records: list[AssetRecord]) -> None:
        """Forget what a publish made stale: asset lookups, rendered pages, policies."""
        for rec in records:
            self._hot.forget_asset((rec.repo, rec.format, rec.package, rec.filename))
            self.catalog_changed(rec.repo.domain, rec.format, rec.package)

    async def flush_touches(self) -> None:
        """Write the batched last-access times (called periodically, not per request)."""
        touched, self._touched = self._touched, set()
        await self._index.touch_assets(touched, time.time())
