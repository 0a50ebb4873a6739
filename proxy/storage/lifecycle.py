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

Several processes (``serve --workers N`` on one machine, the nodes of a cluster, the CLI beside
them) share one index and, on S3, one bucket. gc and ``verify --repair`` run in one of them at a
time: each holds the lease ``gc`` (storage/leases.py, :func:`gc_lease`) while it runs. The
automatic gc skips its round when another process holds it; the CLI says who does and fails, or
waits with ``--wait``. What keeps them safe against the *other* nodes' traffic, which no lease
stops:

- A blob another node has just uploaded but whose row it has not written yet is younger than
  ``GRACE_SECONDS``: on S3 the age is the object's ``LastModified`` from the bucket listing (the
  upload's time, whichever node made it), never this node's cache. Blobs this very run
  unreferenced (by evicting their last rows) go at once; every deletion asks the index once
  more, right before it, whether a row refers to the digest now.
- ``verify`` lists the bucket, not this node's cache: a blob only elsewhere is downloaded to be
  hashed, and a row is "missing" only when the store (the bucket) lacks its blob when asked again
  right before the repair removes the row (a blob uploaded after the listing is not missing). A
  corrupt copy in this node's cache is quarantined and, when the bucket's copy is sound, simply
  replaced: the bucket's object and the rows stay.
- Another node may still hold a blob gc deleted from the bucket in its own disk cache. That copy
  is the right bytes (named by their hash), and as the rows are gone nothing asks for it; the
  node's cache bound evicts it in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.errors import StorageCorrupt
from proxy.model import Digest
from proxy.storage.index import Index
from proxy.storage.leases import LeaseInfo, Leases
from proxy.storage.local import LocalBlobStore

GRACE_SECONDS = 600.0
CHUNK = 500  # digests per IN (...) query, and the first page of eviction candidates
MAX_PAGE = 50_000  # largest page of eviction candidates read at once
GC_LEASE = "gc"  # held by whoever runs gc or verify --repair (see the module docstring)
GC_LEASE_TTL = 60.0  # renewed every 20 s; a holder that died blocks the next run at most this long


def gc_lease(
    index: Index, holder: str, *, wait: float = 0.0
) -> contextlib.AbstractAsyncContextManager[LeaseInfo]:
    """Hold the ``gc`` lease for a run (LeaseBusy, naming the holder, when another has it)."""
    return Leases(index).hold(GC_LEASE, holder, GC_LEASE_TTL, wait=wait)


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
    replaced: list[str] = field(default_factory=list)  # a corrupt cached copy, sound in the bucket


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
        # connection fail once another worker has committed. The order ends with the primary key:
        # PostgreSQL's top-N sort puts equal keys (rows written in one batch share their times) in
        # a different order for each LIMIT, so pages would overlap and skip rows.
        sql = (
            "SELECT domain, repository, format, package, filename, digest, size, last_accessed "
            "FROM assets WHERE hosted = 0 "
            "ORDER BY last_accessed, fetched_at, domain, repository, format, package, filename "
            "LIMIT ? OFFSET ?"
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
    """See the module docstring (hold :func:`gc_lease` around a ``repair``)."""
    report = VerifyReport()
    files = await blobs.inventory()
    gone: set[str] = set()  # listed, then deleted by its owner before we got to it
    for digest, (path, _, _) in sorted(files.items()):
        if path is None:  # in an object store only: checked through this node's cache
            try:
                if await blobs.locate(Digest(digest)) == "missing":
                    gone.add(digest)
                    continue
                path = blobs.local_path(Digest(digest))
            except StorageCorrupt:
                path = None
        ok = path is not None and await asyncio.to_thread(_hash_matches, blobs, path, digest)
        report.checked += 1
        if not ok:
            report.corrupt.append(digest)
    async with index.db.execute("SELECT DISTINCT digest FROM assets") as cur:
        referenced = {str(r[0]) for r in await cur.fetchall()}
    # Asked again one by one: a row written after the listing may name a blob stored since.
    report.missing = [
        d for d in sorted(referenced - (set(files) - gone)) if await blobs.stat(Digest(d)) is None
    ]
    if not repair:
        return report
    quarantine = data_dir / "quarantine"
    for digest in list(report.corrupt):
        await asyncio.to_thread(quarantine.mkdir, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(os.replace, blobs.local_path(Digest(digest)), quarantine / digest)
        if await _sound_elsewhere(blobs, digest):
            report.corrupt.remove(digest)  # only this node's cached copy was bad: replaced
            report.replaced.append(digest)
            continue
        await blobs.delete(Digest(digest))  # an object store's copy too
    bad = report.corrupt + [d for d in report.missing if await blobs.stat(Digest(d)) is None]
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


async def _sound_elsewhere(blobs: LocalBlobStore, digest: str) -> bool:
    """Whether a sound copy comes back once this node's copy is gone: an object store's blob is
    downloaded (and hashed) again; the local backend has no other copy."""
    try:
        if await blobs.locate(Digest(digest)) == "missing":
            return False
    except StorageCorrupt:
        return False
    path = blobs.local_path(Digest(digest))
    return await asyncio.to_thread(_hash_matches, blobs, path, digest)


def _hash_matches(blobs: LocalBlobStore, path: Path, digest: str) -> bool:
    try:
        found = blobs.plain_sha256(path)
    except Exception:  # noqa: BLE001 - unreadable or undecryptable is corrupt
        return False
    return found is not None and found[0] == digest


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
