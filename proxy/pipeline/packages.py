"""Package administration: versions and their status, promotion, deletion, origin rules, quarantine.

The admin API and the CLI both call these methods, so the rules live in one place: a status is
one of Published, Unlisted (hidden from indexes, downloadable by exact URL), Archived (kept, not
installable) or Disposed (assets removed, record kept); a copy between repositories shares the
blobs and copies no bytes; every change forgets the cached pages and policies it affects.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

from proxy.errors import BadRequest, Conflict, NotFound
from proxy.model import AssetRecord, RepoRef
from proxy.pipeline.origin import valid_switch
from proxy.pipeline.resolve import Resolver
from proxy.security.audit import AuditLog
from proxy.storage.catalog import VERSION_STATUSES, Catalog, OriginRule, QuarantineEntry, VersionRow
from proxy.storage.index import Index

log = logging.getLogger("proxy.packages")


def check_tag(tag: str) -> None:
    """A dist-tag name npm would accept (not a version, no separators, no control characters);
    checked before a publish commits anything, so a bad tag never leaves half a publish."""
    if not tag or any(c in tag for c in "/@ ") or tag[0].isdigit() or not tag.isprintable():
        raise BadRequest(f"invalid tag name {tag!r}")


class PackageService:
    """See the module docstring."""

    def __init__(self, resolver: Resolver, catalog: Catalog, index: Index, audit: AuditLog) -> None:
        self._resolver = resolver
        self._catalog = catalog
        self._index = index
        self._audit = audit

    def _repo(self, ref: RepoRef) -> None:
        self._resolver.repository(ref)

    async def list_packages(self, ref: RepoRef, fmt: str | None = None) -> list[dict[str, Any]]:
        """Packages with versions of their own here, and packages cached here from upstreams."""
        self._repo(ref)
        found: dict[tuple[str, str], dict[str, Any]] = {}
        for f, package in await self._catalog.packages(ref, fmt):
            found[(f, package)] = {"format": f, "package": package, "origin": "published"}
        for f, package in await self._index.stored_packages(ref, fmt):
            found.setdefault((f, package), {"format": f, "package": package, "origin": "cached"})
        return [found[k] for k in sorted(found)]

    async def describe(self, ref: RepoRef, fmt: str, package: str) -> dict[str, Any]:
        """Every version of a package here, with its status and its assets (digests, sizes)."""
        self._repo(ref)
        versions = {v.version: v for v in await self._catalog.versions(ref, fmt, package)}
        assets = await self._index.package_assets(ref, fmt, package)
        if not versions and not assets:
            raise NotFound(
                f"package {package!r} has no versions in {ref.domain}/{ref.repository}",
                detail={"package": package},
            )
        out: dict[str, dict[str, Any]] = {}
        for name, row in versions.items():
            out[name] = _version_json(row)
        for rec in assets:
            version = rec.version or "unknown"
            entry = out.setdefault(version, {"version": version, "status": "Cached", "origin": "upstream"})
            entry.setdefault("assets", []).append(_asset_json(rec))
        policy = await self._resolver.policy(ref, fmt, package)
        return {
            "domain": ref.domain,
            "repository": ref.repository,
            "format": fmt,
            "package": package,
            "origin": {
                "rule": policy.rule.pattern if policy.rule else None,
                "upstream_blocked": policy.upstream_block_reason(),
                "publish_blocked": policy.publish_block_reason(),
            },
            "versions": [out[k] for k in sorted(out)],
        }

    async def set_status(self, ref: RepoRef, fmt: str, package: str, version: str, status: str) -> None:
        self._repo(ref)
        if status not in VERSION_STATUSES:
            raise BadRequest(f"status must be one of {', '.join(VERSION_STATUSES)}, got {status!r}")
        if status == "Disposed":
            await self.delete(ref, fmt, package, version, keep_record=True)
            return
        current = await self._version(ref, fmt, package, version)
        if current.status == "Disposed":
            raise Conflict(f"{package} {version} is disposed: its files are gone")
        await self._catalog.set_status(ref, fmt, package, version, status)
        self._changed(ref, fmt, package)
        self._audit.record("status", detail={"status": status}, **_where(ref, fmt, package, version))
        log.info("status of %s %s in %s/%s set to %s", package, version, ref.domain, ref.repository, status)

    async def delete(
        self, ref: RepoRef, fmt: str, package: str, version: str, *, keep_record: bool = False
    ) -> None:
        """Remove a version's files (blobs stay until garbage collection, they may be shared)."""
        await self._version(ref, fmt, package, version)
        await self._catalog.dispose(ref, fmt, package, version, forget=not keep_record)
        self._changed(ref, fmt, package)
        self._audit.record("delete", **_where(ref, fmt, package, version))
        log.info("deleted %s %s from %s/%s", package, version, ref.domain, ref.repository)

    async def copy(self, src: RepoRef, dst: RepoRef, fmt: str, package: str, version: str) -> None:
        """Promote a version: the destination gets rows pointing at the same blobs."""
        self._repo(dst)
        row = await self._version(src, fmt, package, version)
        if row.status == "Disposed":
            raise Conflict(f"{package} {version} is disposed in {src.repository}; nothing to copy")
        assets = [
            replace(a, repo=dst, hosted=True, fetched_at=time.time())
            for a in await self._index.package_assets(src, fmt, package)
            if a.version == version
        ]
        if not assets:
            raise NotFound(f"{package} {version} has no files in {src.repository}")
        copied = VersionRow(
            repo=dst,
            format=fmt,
            package=package,
            version=version,
            status="Published",
            attributes=row.attributes,
        )
        if not await self._catalog.publish(copied, assets):
            raise Conflict(f"{package} {version} already has files in {dst.repository}")
        self._resolver.published(assets)
        self._audit.record("copy", detail={"from": src.repository}, **_where(dst, fmt, package, version))

    async def published_versions(self, ref: RepoRef, fmt: str, package: str) -> dict[str, VersionRow]:
        self._repo(ref)
        return {v.version: v for v in await self._catalog.versions(ref, fmt, package)}

    async def tags(self, ref: RepoRef, fmt: str, package: str) -> dict[str, str]:
        self._repo(ref)
        return await self._catalog.tags(ref, fmt, package)

    async def put_tag(self, ref: RepoRef, fmt: str, package: str, tag: str, version: str) -> None:
        """Point a tag at a version published here (npm's dist-tags)."""
        await self._version(ref, fmt, package, version)
        check_tag(tag)
        await self._catalog.put_tag(ref, fmt, package, tag, version)
        self._changed(ref, fmt, package)
        self._audit.record("tag", detail={"tag": tag}, **_where(ref, fmt, package, version))

    async def delete_tag(self, ref: RepoRef, fmt: str, package: str, tag: str) -> None:
        self._repo(ref)
        if not await self._catalog.delete_tag(ref, fmt, package, tag):
            raise NotFound(f"{package} has no tag {tag!r} in {ref.repository}")
        self._changed(ref, fmt, package)
        self._audit.record("untag", detail={"tag": tag}, **_where(ref, fmt, package, ""))

    async def update_attributes(
        self, ref: RepoRef, fmt: str, package: str, version: str, attributes: dict[str, Any]
    ) -> None:
        await self._version(ref, fmt, package, version)
        await self._catalog.update_attributes(ref, fmt, package, version, attributes)
        self._changed(ref, fmt, package)

    async def _version(self, ref: RepoRef, fmt: str, package: str, version: str) -> VersionRow:
        self._repo(ref)
        for row in await self._catalog.versions(ref, fmt, package):
            if row.version == version:
                return row
        raise NotFound(
            f"{package} {version} is not a version of {ref.domain}/{ref.repository}",
            detail={"package": package, "version": version},
        )

    # --- origin controls ----------------------------------------------------------------------

    async def origin_rules(self, ref: RepoRef, fmt: str) -> list[OriginRule]:
        self._repo(ref)
        return await self._catalog.origin_rules(ref, fmt)

    async def put_origin_rule(self, ref: RepoRef, fmt: str, rule: OriginRule) -> None:
        self._repo(ref)
        if not rule.pattern or "*" in rule.pattern[:-1]:
            raise BadRequest("a pattern is a package name or a prefix ending in '*'")
        if not (valid_switch(rule.publish) and valid_switch(rule.upstream)):
            raise BadRequest("publish and upstream must each be ALLOW or BLOCK")
        await self._catalog.put_origin_rule(ref, fmt, rule)
        self._changed(ref, fmt, None)
        detail = {"pattern": rule.pattern, "publish": rule.publish, "upstream": rule.upstream}
        self._audit.record("policy", detail=detail, **_where(ref, fmt, "", ""))

    async def delete_origin_rule(self, ref: RepoRef, fmt: str, pattern: str) -> None:
        self._repo(ref)
        if not await self._catalog.delete_origin_rule(ref, fmt, pattern):
            raise NotFound(f"no origin rule {pattern!r} in {ref.repository}")
        self._changed(ref, fmt, None)
        self._audit.record("policy", detail={"pattern": pattern, "removed": True}, **_where(ref, fmt, "", ""))

    async def quarantine(self, ref: RepoRef, fmt: str) -> list[QuarantineEntry]:
        self._repo(ref)
        return await self._catalog.quarantine(ref, fmt)

    async def put_quarantine(self, ref: RepoRef, fmt: str, entry: QuarantineEntry) -> None:
        self._repo(ref)
        if not entry.pattern or entry.pattern.startswith("@"):
            raise BadRequest("a quarantine pattern is 'package' or 'package@version' (wildcards allowed)")
        await self._catalog.put_quarantine(ref, fmt, entry)
        self._changed(ref, fmt, None)
        detail = {"quarantine": entry.pattern, "reason": entry.reason}
        self._audit.record("policy", detail=detail, **_where(ref, fmt, "", ""))

    async def delete_quarantine(self, ref: RepoRef, fmt: str, pattern: str) -> None:
        self._repo(ref)
        if not await self._catalog.delete_quarantine(ref, fmt, pattern):
            raise NotFound(f"no quarantine entry {pattern!r} in {ref.repository}")
        self._changed(ref, fmt, None)
        detail = {"quarantine": pattern, "removed": True}
        self._audit.record("policy", detail=detail, **_where(ref, fmt, "", ""))

    def _changed(self, ref: RepoRef, fmt: str, package: str | None) -> None:
        self._resolver.catalog_changed(ref.domain, fmt, package)
        if package is not None:
            self._resolver.forget_package_assets(ref, fmt, package)


def _version_json(row: VersionRow) -> dict[str, Any]:
    return {
        "version": row.version,
        "status": row.status,
        "origin": "published",
        "attributes": row.attributes,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
        "assets": [],
    }


def _asset_json(rec: AssetRecord) -> dict[str, Any]:
    return {
        "filename": rec.filename,
        "sha256": rec.digest.hex,
        "size": rec.size,
        "hosted": rec.hosted,
        "upstream": rec.upstream,
    }


def _where(ref: RepoRef, fmt: str, package: str, version: str) -> dict[str, str]:
    return {
        "domain": ref.domain,
        "repository": ref.repository,
        "format": fmt,
        "package": package,
        "version": version,
    }
