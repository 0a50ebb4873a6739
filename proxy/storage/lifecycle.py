"""Cache lifecycle: bound the store (gc), check it (verify), and say what it holds (stats).

``gc`` evicts the least recently used *cached* assets (what an upstream can give again) until
the blob store fits the budget, then deletes blobs no index row references. Hosted (published)
files are never evicted. It is safe while the proxy runs: a blob is deleted only when no row
references it and it is older than a grace period (a download that just committed has its row
written right after its rename), and a reader that already opened a blob keeps reading it after
the unlink (POSIX). The running proxy notices the index change within seconds and forgets what
it kept in memory.

With the S3 backend (storage/s3.py) the store is the bucket: gc measures and deletes objects
there (and in this node's cache), verify downloads each object through the cache to hash it.

``verify`` re-hashes every blob's plaintext against its name and checks that every index row's
blob exists; ``--repair`` moves corrupt blobs to ``quarantine/`` and removes the rows that point
at corrupt or missing blobs, so cached files are fetched again (hosted ones are reported lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.errors import StorageCorrupt
from proxy.model import Digest
from proxy.storage.index import Index
from proxy.storage.local import LocalBlobStore

GRACE_SECONDS = 600.0
CHUNK = 500  # digests per IN (...) query, and the first page of eviction candidates
MAX_PAGE = 50_000  # largest page of eviction candidates read at once


@dataclass(slots=True)
class GcReport:
    budget: int
    before: int
    after: int = 0
    evicted: list[dict[str, Any]] = field(default_factory=list)
    blobs_deleted: int = 0
    dry_run: bool = False


@dataclass(slots=True)
class VerifyReport:
    checked: int = 0
    corrupt: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    rows_removed: int = 0
    hosted_lost: list[str] = field(default_factory=list)


async def _referenced(index: Index, digests: list[str]) -> set[str]:
    """Which of ``digests`` some index row references."""
    sql = "SELECT DISTINCT digest FROM assets WHERE digest IN ({marks})"
    return {str(r[0]) for r in await index.rows_in(sql, digests, chunk=CHUNK)}


async def _usage(blobs: LocalBlobStore) -> int:
    """Bytes the store holds, summed a page at a time (keeps nothing per blob)."""
    total = 0
    async for page in blobs.inventory_pages():
        total += sum(size for _, size, _ in page)
    return total


async def gc(index: Index, blobs: LocalBlobStore, budget: int, *, dry_run: bool = False) -> GcReport:
    """See the module docstring.

    Memory stays bounded whatever the size of the index and the store (it runs inside the
    serving process): usage is summed page by page, eviction candidates are read in pages only
    while over budget, reference counts are asked for the evicted digests alone, and orphans are
    looked for one page of the store (a fan-out directory, a page of a bucket listing) at a time.
    """
    usage = await _usage(blobs)
    report = GcReport(budget=budget, before=usage, dry_run=dry_run)
    db = index.db
    doomed: list[tuple[Any, ...]] = []
    left: dict[str, int] = {}  # references left to each digest of an evicted row
    if usage > budget:
        # Pages of the LRU order (a top-N sort in SQLite), each read whole: no statement stays
        # open across awaits, as an open read would make other coroutines' writes on the shared
        # connection fail once another worker has committed.
        sql = (
            "SELECT domain, repository, format, package, filename, digest, size, last_accessed "
            "FROM assets WHERE hosted = 0 ORDER BY last_accessed, fetched_at LIMIT ? OFFSET ?"
        )
        page = CHUNK
        while usage > budget:
            async with db.execute(sql, (page, len(doomed))) as cur:
                rows = await cur.fetchall()
            if not rows:
                break
            page = min(page * 4, MAX_PAGE)
            for row in rows:
                if usage <= budget:
                    break
                digest = str(row[5])
                if digest not in left:
                    async with db.execute("SELECT COUNT(*) FROM assets WHERE digest=?", (digest,)) as cur:
                        counted = await cur.fetchone()
                    left[digest] = int(counted[0]) if counted else 0
                doomed.append(tuple(row))
                left[digest] -= 1
                if left[digest] == 0:
                    usage -= await blobs.stored_size(Digest(digest))
                where = f"{row[0]}/{row[1]}"
                report.evicted.append(
                    {"repository": where, "format": row[2], "package": row[3], "filename": row[4]}
                )
    if not dry_run and doomed:
        async with index.transaction():
            for victim in doomed:
                await db.execute(
                    "DELETE FROM assets WHERE domain=? AND repository=? AND format=? AND package=? "
                    "AND filename=?",
                    victim[:5],
                )
    now = time.time()
    evicted_digests = set(left)
    gone = {d for d, n in left.items() if n <= 0}
    # Blobs this run unreferenced go now; other orphans only once old enough that they cannot be
    # a download whose row is about to be written.
    async for files in blobs.inventory_pages():
        referenced = await _referenced(index, [d for d, _, _ in files])
        if dry_run:
            referenced -= gone  # what the deletes would have unreferenced
        for digest, _, mtime in files:
            if digest in referenced or (digest not in evicted_digests and now - mtime < GRACE_SECONDS):
                continue
            if dry_run:
                report.blobs_deleted += 1
                continue
            # Looked again inside the check: a row may have been written since (the proxy runs).
            async with db.execute("SELECT 1 FROM assets WHERE digest=? LIMIT 1", (digest,)) as cur:
                if await cur.fetchone() is not None:
                    continue
            await blobs.delete(Digest(digest))  # an object store's copy too
            report.blobs_deleted += 1
    report.after = usage if dry_run else await _usage(blobs)
    return report


async def verify(
    index: Index, blobs: LocalBlobStore, data_dir: Path, *, repair: bool = False
) -> VerifyReport:
    """See the module docstring."""
    report = VerifyReport()
    files = await blobs.inventory()
    for digest, (path, _, _) in sorted(files.items()):
        if path is None:  # in an object store only: checked through this node's cache
            try:
                await blobs.locate(Digest(digest))
                path = blobs.local_path(Digest(digest))
            except StorageCorrupt:
                path = None
        ok = path is not None and await asyncio.to_thread(_hash_matches, blobs, path, digest)
        report.checked += 1
        if not ok:
            report.corrupt.append(digest)
    async with index.db.execute("SELECT DISTINCT digest FROM assets") as cur:
        referenced = {str(r[0]) for r in await cur.fetchall()}
    report.missing = sorted(referenced - set(files))
    if not repair:
        return report
    quarantine = data_dir / "quarantine"
    for digest in report.corrupt:
        await asyncio.to_thread(quarantine.mkdir, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(os.replace, blobs.local_path(Digest(digest)), quarantine / digest)
        await blobs.delete(Digest(digest))  # an object store's copy too
    bad = report.corrupt + report.missing
    async with index.transaction():
        for digest in bad:
            sql = (
                "SELECT domain, repository, format, package, filename FROM assets WHERE digest=? AND hosted=1"
            )
            async with index.db.execute(sql, (digest,)) as cur:
                report.hosted_lost += ["/".join(map(str, r)) for r in await cur.fetchall()]
            cur2 = await index.db.execute("DELETE FROM assets WHERE digest=?", (digest,))
            report.rows_removed += cur2.rowcount
    return report


def _hash_matches(blobs: LocalBlobStore, path: Path, digest: str) -> bool:
    h = hashlib.sha256()
    try:
        with blobs.open_plain_path(path) as f:
            while chunk := f.read(1024 * 1024):
                h.update(chunk)
    except Exception:  # noqa: BLE001 - unreadable or undecryptable is corrupt
        return False
    return h.hexdigest() == digest


async def stats(index: Index, blobs: LocalBlobStore) -> dict[str, Any]:
    """Usage per repository and format, and of the blob store."""
    sql = (
        "SELECT domain, repository, format, SUM(hosted), COUNT(*) - SUM(hosted), SUM(size) "
        "FROM assets GROUP BY domain, repository, format ORDER BY domain, repository, format"
    )
    async with index.db.execute(sql) as cur:
        rows = await cur.fetchall()
    files = await blobs.inventory()
    return {
        "repositories": [
            {
                "repository": f"{r[0]}/{r[1]}",
                "format": r[2],
                "hosted_files": int(r[3] or 0),
                "cached_files": int(r[4] or 0),
                "bytes": int(r[5] or 0),
            }
            for r in rows
        ],
        "blobs": len(files),
        "blob_bytes": sum(size for _, size, _ in files.values()),
    }
