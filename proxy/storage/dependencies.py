"""The declared dependencies in the index (migration 0007): SQL only, no formats.

Dependencies are keyed by the digest of the file they were read from: the same bytes always
declare the same dependencies, so a version held in several repositories is read once, and the
rows never go stale (a cached or published version never changes bytes, invariant 3).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from proxy.formats.deps_base import Declared
from proxy.model import RepoRef
from proxy.storage.index import Index


@dataclass(frozen=True, slots=True)
class HeldFile:
    """One stored file of a version: where it is held and which blob it is."""

    repo: RepoRef
    package: str
    version: str
    filename: str
    digest: str
    hosted: bool


class DependencyStore:
    """Typed queries over the ``dependency_sources`` and ``dependencies`` tables."""

    def __init__(self, index: Index) -> None:
        self._index = index

    async def held_files(
        self, repos: Sequence[RepoRef], fmt: str, package: str | None = None
    ) -> list[HeldFile]:
        """Files with a version, of one format, in these repositories (of one package, or all)."""
        found: list[HeldFile] = []
        for repo in repos:
            sql = (
                "SELECT package, version, filename, digest, hosted FROM assets "
                "WHERE domain=? AND repository=? AND format=? AND version IS NOT NULL"
            )
            args: tuple[str, ...] = (repo.domain, repo.repository, fmt)
            if package is not None:
                sql += " AND package=?"
                args += (package,)
            async with self._index.db.execute(sql + " ORDER BY package, filename", args) as cur:
                rows = await cur.fetchall()
            found += [HeldFile(repo, str(r[0]), str(r[1]), str(r[2]), str(r[3]), bool(r[4])) for r in rows]
        return found

    async def read_digests(self, digests: Iterable[str]) -> set[str]:
        """Which of these blobs have had their dependencies read already."""
        sql = "SELECT digest FROM dependency_sources WHERE digest IN ({marks})"
        return {str(r[0]) for r in await self._index.rows_in(sql, digests)}

    async def record(self, digest: str, fmt: str, declared: Sequence[Declared], error: str = "") -> None:
        """What a blob declares (or why it could not be read), once: a second record is a no-op."""
        async with self._index.transaction(shared=False):
            cur = await self._index.db.execute(
                "INSERT INTO dependency_sources (digest, format, parsed_at, error) "
                "VALUES (?,?,?,?) ON CONFLICT DO NOTHING",
                (digest, fmt, time.time(), _storable(error)),
            )
            if cur.rowcount == 0:
                return
            await self._index.db.executemany(
                "INSERT INTO dependencies (digest, seq, package, range, kind, extras, condition) "
                "VALUES (?,?,?,?,?,?,?)",
                [
                    (digest, seq, *map(_storable, (d.package, d.range, d.kind, d.extras, d.condition)))
                    for seq, d in enumerate(declared)
                ],
            )

    async def declared(self, digests: Iterable[str]) -> dict[str, list[Declared]]:
        """The dependencies each blob declares, in declaration order."""
        found: dict[str, list[Declared]] = {d: [] for d in set(digests)}
        sql = (
            "SELECT digest, package, range, kind, extras, condition FROM dependencies "
            "WHERE digest IN ({marks}) ORDER BY digest, seq"
        )
        for row in await self._index.rows_in(sql, found):
            found[str(row[0])].append(Declared(*(str(v) for v in row[1:])))
        return found

    async def errors(self, digests: Iterable[str]) -> dict[str, str]:
        """Why a blob's dependencies could not be read, for those that could not."""
        sql = "SELECT digest, error FROM dependency_sources WHERE error != '' AND digest IN ({marks})"
        return {str(r[0]): str(r[1]) for r in await self._index.rows_in(sql, digests)}


def _storable(text: str) -> str:
    """``text`` with NUL characters as U+FFFD. What an archive declares is the upstream's (or a
    publisher's) text, and PostgreSQL's TEXT cannot hold a NUL where SQLite's can: kept as is,
    one such manifest would fail every dependency query (and every quarantine) of its repository
    on PostgreSQL alone. No package name or range holds a NUL, so nothing real is lost."""
    return text.replace("\x00", "\ufffd")
