"""The catalog tables of the index: domains, repositories, versions, origin rules, quarantine.

Shares the index's connection and its one-writer-at-a-time transactions (storage/index.py); a
publish writes its asset rows and its version row in one transaction, so either all of a
publish is visible or none of it is, and of concurrent publishes of one file exactly one wins.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from proxy.model import AssetRecord, RepoRef
from proxy.storage.index import ASSET_INSERT, Index, asset_params

VERSION_STATUSES = ("Published", "Unlisted", "Archived", "Disposed")


@dataclass(frozen=True, slots=True)
class RepositoryRow:
    domain: str
    name: str
    description: str
    upstreams: tuple[str, ...]
    min_release_age: float
    created_at: float
    allow_redeploy: bool = False
    anonymous_read: bool = False


@dataclass(frozen=True, slots=True)
class VersionRow:
    repo: RepoRef
    format: str
    package: str
    version: str
    status: str
    attributes: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0


@dataclass(frozen=True, slots=True)
class OriginRule:
    pattern: str  # an exact (normalized) name, or a prefix ending in "*"
    publish: str  # ALLOW | BLOCK
    upstream: str  # ALLOW | BLOCK


@dataclass(frozen=True, slots=True)
class QuarantineEntry:
    pattern: str  # "name@version", either part may use * wildcards
    reason: str


class Catalog:
    """Typed queries over the catalog tables."""

    def __init__(self, index: Index) -> None:
        self._index = index

    # --- domains and repositories -------------------------------------------------------------

    async def domains(self) -> list[str]:
        async with self._index.db.execute("SELECT name FROM domains ORDER BY name") as cur:
            return [str(r[0]) for r in await cur.fetchall()]

    async def repositories(self) -> list[RepositoryRow]:
        sql = (
            "SELECT domain, name, description, upstreams, min_release_age, created_at, "
            "allow_redeploy, anonymous_read FROM repositories ORDER BY domain, name"
        )
        async with self._index.db.execute(sql) as cur:
            rows = await cur.fetchall()
        return [
            RepositoryRow(
                domain=str(r[0]),
                name=str(r[1]),
                description=str(r[2]),
                upstreams=tuple(json.loads(str(r[3]))),
                min_release_age=float(r[4]),
                created_at=float(r[5]),
                allow_redeploy=bool(r[6]),
                anonymous_read=bool(r[7]),
            )
            for r in rows
        ]

    async def put_domain(self, name: str) -> bool:
        """Create a domain; False if it existed."""
        async with self._index.transaction():
            cur = await self._index.db.execute(
                "INSERT INTO domains (name, created_at) VALUES (?, ?) ON CONFLICT DO NOTHING",
                (name, time.time()),
            )
            return cur.rowcount > 0

    async def delete_domain(self, name: str) -> bool:
        async with self._index.transaction():
            await self._index.db.execute("DELETE FROM repositories WHERE domain=?", (name,))
            cur = await self._index.db.execute("DELETE FROM domains WHERE name=?", (name,))
            return cur.rowcount > 0

    async def put_repository(self, row: RepositoryRow, *, replace: bool) -> bool:
        """Insert a repository (or, with ``replace``, update its settings); False if it existed."""
        async with self._index.transaction():
            return await self._write_repository(row, replace=replace)

    async def put_repository_checked(
        self, row: RepositoryRow, check: Callable[[list[RepositoryRow]], None]
    ) -> None:
        """Write a repository after ``check`` accepted the domain's repositories as stored now."""
        async with self._index.transaction():
            check([r for r in await self.repositories() if r.domain == row.domain])
            await self._write_repository(row, replace=True)

    async def _write_repository(self, row: RepositoryRow, *, replace: bool) -> bool:
        conflict = (
            "DO UPDATE SET description=excluded.description, upstreams=excluded.upstreams, "
            "min_release_age=excluded.min_release_age, allow_redeploy=excluded.allow_redeploy, "
            "anonymous_read=excluded.anonymous_read"
            if replace
            else "DO NOTHING"
        )
        cur = await self._index.db.execute(
            "INSERT INTO repositories (domain, name, description, upstreams, min_release_age, "
            "created_at, allow_redeploy, anonymous_read) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            f"ON CONFLICT (domain, name) {conflict}",
            (
                row.domain,
                row.name,
                row.description,
                json.dumps(list(row.upstreams)),
                row.min_release_age,
                row.created_at or time.time(),
                int(row.allow_redeploy),
                int(row.anonymous_read),
            ),
        )
        return cur.rowcount > 0

    async def delete_repository(self, ref: RepoRef) -> bool:
        """Remove a repository and its rows (blobs stay until garbage collection)."""
        async with self._index.transaction():
            args = (ref.domain, ref.repository)
            for table in ("assets", "versions", "origin_rules", "quarantine", "package_tags"):
                await self._index.db.execute(f"DELETE FROM {table} WHERE domain=? AND repository=?", args)
            cur = await self._index.db.execute("DELETE FROM repositories WHERE domain=? AND name=?", args)
            return cur.rowcount > 0

    # --- versions -----------------------------------------------------------------------------

    async def publish(
        self, version: VersionRow, assets: Iterable[AssetRecord], *, replace: bool = False
    ) -> bool:
        """Record a published file and its version in one transaction.

        False (and nothing written) when any of the files already exists in the repository: a
        published file is immutable, and of concurrent publishes exactly one gets True. With
        ``replace`` (a repository that allows Maven redeploys) existing rows are replaced.
        """
        now = time.time()
        records = list(assets)
        db = self._index.db
        async with self._index.transaction():
            for rec in records:
                sql = (
                    "SELECT 1 FROM assets WHERE domain=? AND repository=? AND format=? AND package=? "
                    "AND filename=?"
                )
                args = (rec.repo.domain, rec.repo.repository, rec.format, rec.package, rec.filename)
                if replace:
                    await db.execute(f"DELETE FROM assets {sql[sql.index('WHERE') :]}", args)
                    continue
                async with db.execute(sql, args) as cur:
                    if await cur.fetchone() is not None:
                        return False
            for rec in records:
                await db.execute(ASSET_INSERT, asset_params(rec, now))
            await db.execute(
                "INSERT INTO versions (domain, repository, format, package, version, status, "
                "attributes, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT (domain, repository, format, package, version) "
                "DO UPDATE SET updated_at=excluded.updated_at, "
                "attributes=json_patch(versions.attributes, excluded.attributes)",
                (
                    version.repo.domain,
                    version.repo.repository,
                    version.format,
                    version.package,
                    version.version,
                    version.status,
                    _attributes_json(version.attributes),
                    now,
                    now,
                ),
            )
        return True

    async def versions(self, repo: RepoRef, fmt: str, package: str | None = None) -> list[VersionRow]:
        sql = (
            "SELECT package, version, status, attributes, created_at, updated_at FROM versions "
            "WHERE domain=? AND repository=? AND format=?"
        )
        args: tuple[Any, ...] = (repo.domain, repo.repository, fmt)
        if package is not None:
            sql += " AND package=?"
            args += (package,)
        async with self._index.db.execute(sql + " ORDER BY package, created_at", args) as cur:
            rows = await cur.fetchall()
        return [
            VersionRow(
                repo=repo,
                format=fmt,
                package=str(r[0]),
                version=str(r[1]),
                status=str(r[2]),
                attributes=json.loads(str(r[3])),
                created_at=float(r[4]),
                updated_at=float(r[5]),
            )
            for r in rows
        ]

    async def packages(self, repo: RepoRef, fmt: str | None = None) -> list[tuple[str, str]]:
        """(format, package) pairs with versions in this repository."""
        sql = "SELECT DISTINCT format, package FROM versions WHERE domain=? AND repository=?"
        args: tuple[Any, ...] = (repo.domain, repo.repository)
        if fmt is not None:
            sql += " AND format=?"
            args += (fmt,)
        async with self._index.db.execute(sql + " ORDER BY format, package", args) as cur:
            return [(str(r[0]), str(r[1])) for r in await cur.fetchall()]

    async def set_status(self, repo: RepoRef, fmt: str, package: str, version: str, status: str) -> bool:
        async with self._index.transaction():
            cur = await self._index.db.execute(
                "UPDATE versions SET status=?, updated_at=? WHERE domain=? AND repository=? "
                "AND format=? AND package=? AND version=?",
                (status, time.time(), repo.domain, repo.repository, fmt, package, version),
            )
            return cur.rowcount > 0

    async def dispose(self, repo: RepoRef, fmt: str, package: str, version: str, *, forget: bool) -> bool:
        """Drop a version's asset rows; keep the version as Disposed, or remove it (``forget``)."""
        args = (repo.domain, repo.repository, fmt, package, version)
        async with self._index.transaction():
            await self._index.db.execute(
                "DELETE FROM assets WHERE domain=? AND repository=? AND format=? AND package=? AND version=?",
                args,
            )
            await self._index.db.execute(
                "DELETE FROM package_tags WHERE domain=? AND repository=? AND format=? AND package=? "
                "AND version=?",
                args,
            )
            if forget:
                sql = (
                    "DELETE FROM versions WHERE domain=? AND repository=? AND format=? AND package=? "
                    "AND version=?"
                )
                cur = await self._index.db.execute(sql, args)
            else:
                cur = await self._index.db.execute(
                    "UPDATE versions SET status='Disposed', updated_at=? WHERE domain=? AND "
                    "repository=? AND format=? AND package=? AND version=?",
                    (time.time(), *args),
                )
            return cur.rowcount > 0

    async def update_attributes(
        self, repo: RepoRef, fmt: str, package: str, version: str, attributes: dict[str, Any]
    ) -> bool:
        """Merge keys into a version's attributes (npm's ``deprecated``, for one)."""
        async with self._index.transaction():
            cur = await self._index.db.execute(
                "UPDATE versions SET attributes=json_patch(attributes, ?), updated_at=? WHERE "
                "domain=? AND repository=? AND format=? AND package=? AND version=?",
                (
                    _attributes_json(attributes),
                    time.time(),
                    repo.domain,
                    repo.repository,
                    fmt,
                    package,
                    version,
                ),
            )
            return cur.rowcount > 0

    # --- tags -----------------------------------------------------------------------------------

    async def tags(self, repo: RepoRef, fmt: str, package: str) -> dict[str, str]:
        sql = (
            "SELECT tag, version FROM package_tags WHERE domain=? AND repository=? AND format=? "
            "AND package=? ORDER BY tag"
        )
        async with self._index.db.execute(sql, (repo.domain, repo.repository, fmt, package)) as cur:
            return {str(r[0]): str(r[1]) for r in await cur.fetchall()}

    async def put_tag(self, repo: RepoRef, fmt: str, package: str, tag: str, version: str) -> None:
        async with self._index.transaction():
            await self._index.db.execute(
                "INSERT INTO package_tags (domain, repository, format, package, tag, version, updated_at) "
                "VALUES (?,?,?,?,?,?,?) ON CONFLICT (domain, repository, format, package, tag) "
                "DO UPDATE SET version=excluded.version, updated_at=excluded.updated_at",
                (repo.domain, repo.repository, fmt, package, tag, version, time.time()),
            )

    async def delete_tag(self, repo: RepoRef, fmt: str, package: str, tag: str) -> bool:
        async with self._index.transaction():
            cur = await self._index.db.execute(
                "DELETE FROM package_tags WHERE domain=? AND repository=? AND format=? AND package=? "
                "AND tag=?",
                (repo.domain, repo.repository, fmt, package, tag),
            )
            return cur.rowcount > 0

    # --- origin controls and quarantine -------------------------------------------------------

    async def origin_rules(self, repo: RepoRef, fmt: str) -> list[OriginRule]:
        sql = (
            "SELECT pattern, publish, upstream FROM origin_rules WHERE domain=? AND repository=? "
            "AND format=? ORDER BY pattern"
        )
        async with self._index.db.execute(sql, (repo.domain, repo.repository, fmt)) as cur:
            return [OriginRule(str(r[0]), str(r[1]), str(r[2])) for r in await cur.fetchall()]

    async def put_origin_rule(self, repo: RepoRef, fmt: str, rule: OriginRule) -> None:
        async with self._index.transaction():
            await self._index.db.execute(
                "INSERT INTO origin_rules (domain, repository, format, pattern, publish, upstream) "
                "VALUES (?,?,?,?,?,?) ON CONFLICT (domain, repository, format, pattern) "
                "DO UPDATE SET publish=excluded.publish, upstream=excluded.upstream",
                (repo.domain, repo.repository, fmt, rule.pattern, rule.publish, rule.upstream),
            )

    async def delete_origin_rule(self, repo: RepoRef, fmt: str, pattern: str) -> bool:
        async with self._index.transaction():
            cur = await self._index.db.execute(
                "DELETE FROM origin_rules WHERE domain=? AND repository=? AND format=? AND pattern=?",
                (repo.domain, repo.repository, fmt, pattern),
            )
            return cur.rowcount > 0

    async def quarantine(self, repo: RepoRef, fmt: str) -> list[QuarantineEntry]:
        sql = (
            "SELECT pattern, reason FROM quarantine WHERE domain=? AND repository=? AND format=? "
            "ORDER BY pattern"
        )
        async with self._index.db.execute(sql, (repo.domain, repo.repository, fmt)) as cur:
            return [QuarantineEntry(str(r[0]), str(r[1])) for r in await cur.fetchall()]

    async def put_quarantine(self, repo: RepoRef, fmt: str, entry: QuarantineEntry) -> None:
        async with self._index.transaction():
            await self._index.db.execute(
                "INSERT INTO quarantine (domain, repository, format, pattern, reason, created_at) "
                "VALUES (?,?,?,?,?,?) ON CONFLICT (domain, repository, format, pattern) "
                "DO UPDATE SET reason=excluded.reason, created_at=excluded.created_at",
                (repo.domain, repo.repository, fmt, entry.pattern, entry.reason, time.time()),
            )

    async def delete_quarantine(self, repo: RepoRef, fmt: str, pattern: str) -> bool:
        async with self._index.transaction():
            cur = await self._index.db.execute(
                "DELETE FROM quarantine WHERE domain=? AND repository=? AND format=? AND pattern=?",
                (repo.domain, repo.repository, fmt, pattern),
            )
            return cur.rowcount > 0


def _attributes_json(value: Any) -> str:
    """A version's attributes as the JSON the index keeps, every NUL in a key or a string as
    U+FFFD. The attributes hold what publishers wrote (npm's dist-tags, deprecation messages);
    PostgreSQL's ``json`` functions (``json_patch`` is ``json_each`` there) refuse ``\\u0000``,
    so one such value would make every later update of the version a 500 on PostgreSQL alone,
    where SQLite keeps it. Replaced, both backends keep the same text."""

    def clean(item: Any) -> Any:
        if isinstance(item, str):
            return item.replace("\x00", "\ufffd")
        if isinstance(item, dict):
            return {clean(k): clean(v) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [clean(v) for v in item]
        return item

    return json.dumps(clean(value))
