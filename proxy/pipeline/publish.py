"""Publishing: an upload becomes a blob, then asset rows and a version row in one transaction.

The adapter streams the uploaded file into staging (checking the client's declared digests and
the size limit while it streams) and checks that the name and version in the URL, the form and
the archive agree. This module then applies the origin controls, commits the blob, and records
the files; a published file is immutable, so a second upload of the same filename is a 409, and
of concurrent uploads of one file exactly one is acknowledged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import BodyPartReader

from proxy.errors import BadRequest, Conflict, PayloadTooLarge, PublishBlocked
from proxy.model import AssetRecord, RepoRef
from proxy.pipeline.fetch import Fetcher
from proxy.pipeline.resolve import Resolver
from proxy.security.audit import AuditLog
from proxy.storage.catalog import Catalog, VersionRow
from proxy.storage.local import LocalBlobStore
from proxy.storage.staging import BlobCorrupt, BlobTooLarge, StagedBlob, StagingArea, StagingError

if TYPE_CHECKING:
    from proxy.formats.base import FormatAdapter

log = logging.getLogger("proxy.publish")


@dataclass(slots=True)
class Upload:
    """A validated upload: its identity, the staged file and the metadata to record."""

    package: str
    version: str
    filename: str
    staged: StagedBlob
    content_type: str
    attributes: dict[str, Any] = field(default_factory=dict)
    companions: list[tuple[str, bytes, str]] = field(default_factory=list)


async def part_chunks(part: BodyPartReader, size: int) -> AsyncIterator[bytes]:
    """A multipart file part's bytes, ``size`` at a time."""
    while chunk := await part.read_chunk(size):
        yield chunk


class Publisher:
    """See the module docstring."""

    def __init__(
        self,
        resolver: Resolver,
        catalog: Catalog,
        blobs: LocalBlobStore,
        staging: StagingArea,
        fetcher: Fetcher,
        max_upload_size: int,
        audit: AuditLog,
    ) -> None:
        self._resolver = resolver
        self._catalog = catalog
        self._blobs = blobs
        self.staging = staging
        self._fetcher = fetcher
        self.max_upload_size = max_upload_size
        self._audit = audit

    async def stage(
        self,
        chunks: AsyncIterator[bytes],
        what: str,
        *,
        expect: Mapping[str, str] | None = None,
        expect_size: int | None = None,
        compute: tuple[str, ...] = (),
        declared: str = "digest",
    ) -> StagedBlob:
        """An upload's bytes into staging, checked as they stream: 413 past the upload limit,
        400 when a declared digest or length is not met (``what`` names the file in the message,
        ``declared`` what the client called its digest: npm's "integrity")."""
        limit = self.max_upload_size
        writer = self.staging.create(expect, expect_size=expect_size, max_size=limit, compute=compute)
        try:
            async with writer:
                async for chunk in chunks:
                    await writer.write(chunk)
                return await writer.finish()
        except BlobTooLarge as exc:
            raise PayloadTooLarge(
                f"{what} is larger than the limit of {limit} bytes (server.max_upload_size)"
            ) from exc
        except BlobCorrupt as exc:
            raise BadRequest(f"{what} does not match its declared {declared}: {exc}") from exc
        except StagingError as exc:
            raise BadRequest(f"{what} is incomplete: {exc}") from exc

    async def check_allowed(self, ref: RepoRef, fmt: str, package: str) -> None:
        """Refuse early (before the body is read) when the repository may not take the package."""
        self._resolver.repository(ref)
        policy = await self._resolver.policy(ref, fmt, package)
        why = policy.publish_block_reason()
        if why is not None:
            self._audit.record(
                "publish",
                result="blocked",
                domain=ref.domain,
                repository=ref.repository,
                format=fmt,
                package=package,
            )
            raise PublishBlocked(
                f"{package} cannot be published to {ref.domain}/{ref.repository}: {why}",
                detail={"package": package},
            )

    async def publish(
        self, ref: RepoRef, adapter: FormatAdapter, upload: Upload, *, replace: bool = False
    ) -> AssetRecord:
        """Commit the staged file and record it; 409 if the filename exists in the repository
        (unless ``replace``: a Maven redeploy the repository allows)."""
        await self.check_allowed(ref, adapter.name, upload.package)
        info = await self._blobs.put(upload.staged)
        now = time.time()
        main = AssetRecord(
            repo=ref,
            format=adapter.name,
            package=upload.package,
            filename=upload.filename,
            digest=info.digest,
            size=info.size,
            content_type=upload.content_type,
            version=upload.version,
            hosted=True,
            fetched_at=now,
        )
        records = [main]
        for name, data, ctype in upload.companions:
            blob = await self._fetcher.store_bytes(data)
            records.append(
                AssetRecord(
                    repo=ref,
                    format=adapter.name,
                    package=upload.package,
                    filename=name,
                    digest=blob.digest,
                    size=blob.size,
                    content_type=ctype,
                    version=upload.version,
                    hosted=True,
                    fetched_at=now,
                )
            )
        version = VersionRow(
            repo=ref,
            format=adapter.name,
            package=upload.package,
            version=upload.version,
            status="Published",
            attributes=upload.attributes,
        )
        where = {
            "domain": ref.domain,
            "repository": ref.repository,
            "format": adapter.name,
            "package": upload.package,
            "version": upload.version,
            "digest": info.digest.hex,
            "detail": {"filename": upload.filename, "size": info.size},
        }
        if not await self._catalog.publish(version, records, replace=replace):
            self._audit.record("publish", result="conflict", **where)
            raise Conflict(
                f"{upload.filename} already exists in {ref.domain}/{ref.repository}; "
                "published files are immutable",
                detail={"package": upload.package, "filename": upload.filename},
            )
        self._resolver.published(records)
        self._audit.record("publish", result="replaced" if replace else "ok", **where)
        log.info("published %s %s to %s/%s", upload.package, upload.filename, ref.domain, ref.repository)
        return main
