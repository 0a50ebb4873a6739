"""Move a single node's data directory into a cluster's shared index and bucket (issue #12).

``artifact-proxy cluster migrate --from DATA_DIR`` (cli_cluster.py) copies what a single node
knows (``DATA_DIR/index.sqlite3`` and the blobs under ``DATA_DIR/blobs/``) into the PostgreSQL
index and S3 bucket of the target config. What a node rebuilds by itself (``pages/``, ``tmp/``,
``locks/``, the change counter) is left behind, and so are two tables that are a cluster's own
runtime state: ``leases`` (who runs gc now) and ``shared_credentials`` (upstream tokens sealed
for the nodes that renewed them).

The order keeps the invariants (DESIGN.md 2 and 6: an index row only ever points at a complete,
verified blob):

1. The source is held: a proxy that has the SQLite file open keeps a shared lock on its WAL
   index (byte 128 of ``index.sqlite3-shm``, SQLite's "dead man switch"), so a free lock means
   nobody has it open; then the file is opened in exclusive locking mode and held for the whole
   run, so a proxy started meanwhile fails to open it rather than write rows the copy misses.
2. Every blob an asset references is copied to the bucket first: hashed from the source file
   (the plaintext, when encryption at rest sealed it) and uploaded as the very bytes the local
   backend keeps (sealed files stay sealed, as storage/s3.py expects), with its plaintext size
   in the object's metadata. A blob already in the bucket with that size is skipped, which is
   what makes a re-run after a crash cheap. A blob that does not hash to its name, or is
   missing, is reported, and the rows that point at it are not migrated.
3. Then the rows, every table in one PostgreSQL transaction (COPY into a temporary table, then
   ``INSERT … SELECT … ON CONFLICT DO NOTHING``), under the index's cluster-wide write lock: a
   crash leaves no rows or all of them. The audit trail keeps ``seq``, ``prev_hash`` and
   ``hash`` as they are (its hash chain still verifies), and the identity sequence is moved past
   the last record.

The target must hold no rows, unless ``merge``: then rows are inserted where absent and never
overwrite; an asset whose name the target already maps to other bytes is reported, not applied
(Invariant 3), and audit records are appended only where they continue the target's chain.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from proxy.config import StorageConfig
from proxy.model import Digest
from proxy.storage.crypto import HEADER, MAGIC, SealedFileError, Sealer
from proxy.storage.index import migration_steps
from proxy.storage.local import LocalBlobStore
from proxy.storage.postgres import CHANNEL, WRITE_LOCK, PostgresIndex, redact
from proxy.storage.s3 import S3BlobStore

# Rows that are one installation's runtime state, not facts to carry over.
SKIPPED_TABLES = ("leases", "shared_credentials")
# Parents before children (repositories reference domains); the audit trail last. Tables not
# named here (added by later migrations) follow in name order.
ORDER = ("domains", "repositories")
LAST = ("audit",)
DIGEST_TABLES = ("assets", "dependency_sources", "dependencies")  # rows that name a blob's digest
DMS_BYTE = 128  # SQLite's unix VFS: every connection holds a shared lock here (os_unix.c)
BATCH = 1000


class MigrationError(Exception):
    """The migration refused to run, or could not: the message says why and what to do."""


@dataclass
class TableCount:
    rows: int = 0  # in the source
    copied: int = 0  # inserted into the target (would be, on a dry run)
    present: int = 0  # already in the target (merge)
    skipped: int = 0  # not migrated: their blob is corrupt or missing
    not_merged: int = 0  # audit records a merge could not append (they would break the chain)

    def as_dict(self) -> dict[str, int]:
        return {
            "rows": self.rows,
            "copied": self.copied,
            "present": self.present,
            "skipped": self.skipped,
            "not_merged": self.not_merged,
        }


@dataclass
class MigrationReport:
    source: str
    index: str  # the target's URL without its password
    bucket: str
    dry_run: bool
    merge: bool
    tables: dict[str, TableCount] = field(default_factory=dict)
    blobs_referenced: int = 0
    blobs_copied: int = 0
    blobs_present: int = 0  # already in the bucket (a re-run, or another node stored it)
    bytes_copied: int = 0
    corrupt: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    hosted_lost: list[str] = field(default_factory=list)  # published files whose rows were skipped
    conflicts: list[dict[str, str]] = field(default_factory=list)  # merge: same name, other bytes
    audit_not_merged: str = ""  # merge: why the source's audit records were not appended
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "index": self.index,
            "bucket": self.bucket,
            "dry_run": self.dry_run,
            "merge": self.merge,
            "tables": {name: count.as_dict() for name, count in self.tables.items()},
            "skipped_tables": list(SKIPPED_TABLES),
            "blobs": {
                "referenced": self.blobs_referenced,
                "copied": self.blobs_copied,
                "present": self.blobs_present,
                "bytes": self.bytes_copied,
                "corrupt": self.corrupt,
                "missing": self.missing,
            },
            "hosted_lost": self.hosted_lost,
            "conflicts": self.conflicts,
            "audit_not_merged": self.audit_not_merged,
            "seconds": round(self.seconds, 3),
        }


Progress = Callable[[int, int], None]


# --- the source: a data directory no proxy has open -------------------------------------------


def in_use(db: Path) -> bool:
    """Whether another process has the SQLite file open (see the module docstring, step 1).

    Blocking. The probe lock is a POSIX record lock, released when its descriptor closes, which
    is before this process opens the file itself (closing would drop SQLite's locks too).
    """
    try:
        fd = os.open(db.with_name(db.name + "-shm"), os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, DMS_BYTE)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def open_source(data_dir: Path) -> sqlite3.Connection:
    """The source index, held exclusively until closed, its schema at this version's (blocking)."""
    db = data_dir / "index.sqlite3"
    if not db.is_file():
        raise MigrationError(f"{data_dir} is not a data directory: it has no index.sqlite3")
    busy = (
        f"{db} is in use: a proxy (or another artifact-proxy command) has it open. "
        "Stop it first: the migration must see every row it will ever write"
    )
    if in_use(db):
        raise MigrationError(busy)
    conn = sqlite3.connect(
        db.resolve().as_uri() + "?mode=rw",
        uri=True,
        isolation_level=None,
        timeout=1.0,
        check_same_thread=False,
    )
    try:
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        try:
            conn.execute("BEGIN EXCLUSIVE")  # in exclusive locking mode the lock outlives COMMIT
            conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            raise MigrationError(busy) from exc
        current = int(conn.execute("PRAGMA user_version").fetchone()[0])
        for version, script in migration_steps():  # what `serve` would do at startup
            if version > current:
                conn.executescript(f"BEGIN;\n{script}\nPRAGMA user_version={version};\nCOMMIT;")
        conn.execute("BEGIN")  # one snapshot for everything read below
    except BaseException:
        conn.close()
        raise
    return conn


def source_tables(conn: sqlite3.Connection) -> list[str]:
    names = [
        str(r[0])
        for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'"
        )
    ]
    rest = sorted(n for n in names if n not in ORDER and n not in LAST and n not in SKIPPED_TABLES)
    return [n for n in ORDER if n in names] + rest + [n for n in LAST if n in names]


def columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [str(r[1]) for r in conn.execute(f'PRAGMA table_info("{table}")')]


def count_rows(conn: sqlite3.Connection, table: str) -> int:
    return int(conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0])


def referenced_digests(conn: sqlite3.Connection) -> list[str]:
    return [str(r[0]) for r in conn.execute("SELECT DISTINCT digest FROM assets ORDER BY digest")]


def count_bad_rows(conn: sqlite3.Connection, table: str, bad: set[str]) -> int:
    if table not in DIGEST_TABLES or not bad:
        return 0
    marks = ",".join("?" * len(bad))
    return int(
        conn.execute(f'SELECT count(*) FROM "{table}" WHERE digest IN ({marks})', sorted(bad)).fetchone()[0]
    )


def hosted_rows(conn: sqlite3.Connection, bad: set[str]) -> list[str]:
    if not bad:
        return []
    marks = ",".join("?" * len(bad))
    sql = (
        "SELECT domain, repository, format, package, filename FROM assets "
        f"WHERE hosted=1 AND digest IN ({marks}) ORDER BY 1, 2, 3, 4, 5"
    )
    return ["/".join(map(str, r)) for r in conn.execute(sql, sorted(bad))]


def read_batches(conn: sqlite3.Connection, table: str, cols: list[str]) -> Iterator[list[tuple[Any, ...]]]:
    """The table's rows, a batch at a time (the audit trail in chain order)."""
    order = " ORDER BY seq" if table == "audit" else ""
    quoted = ", ".join(f'"{c}"' for c in cols)
    cur = conn.execute(f'SELECT {quoted} FROM "{table}"{order}')
    try:
        while batch := cur.fetchmany(BATCH):
            yield batch
    finally:
        cur.close()


# --- blobs: verified, then into the bucket ----------------------------------------------------


def _check_key(path: Path, sealer: Sealer | None) -> None:
    """A sealed source blob needs the key that sealed it: without it every blob would look corrupt."""
    with path.open("rb") as f:
        header = f.read(HEADER)
    if header[:4] != MAGIC:
        return
    key_id = header[8:24].decode(errors="replace").strip()
    if sealer is None:
        raise MigrationError(
            "the source's blobs are sealed (encryption at rest): configure the same key in the "
            "target's config (server.encryption_key_env or encryption_key_file)"
        )
    try:
        sealer.keys.key(key_id)
    except KeyError:
        raise MigrationError(
            f"the source's blobs are sealed with key {key_id}, which the config does not have"
        ) from None


def _plain_hash(source: LocalBlobStore, path: Path) -> tuple[str, int] | None:
    """(sha256, size) of a stored file's plaintext; None when it does not open (tampered)."""
    try:
        return source.plain_sha256(path)
    except FileNotFoundError:
        return None


async def _plain_size(source: LocalBlobStore, hex_digest: str) -> int | None:
    try:
        info = await source.stat(Digest(hex_digest))
    except (SealedFileError, ValueError, OSError):
        return None
    return None if info is None else info.size


async def copy_blobs(
    digests: list[str],
    source: LocalBlobStore,
    target: S3BlobStore,
    report: MigrationReport,
    *,
    dry_run: bool,
    concurrency: int = 4,
    progress: Progress | None = None,
) -> None:
    """Step 2 of the module docstring: each referenced blob checked, then uploaded unless there."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for d in digests:
        queue.put_nowait(d)
    done = 0

    async def one(hex_digest: str) -> None:
        path = source.local_path(Digest(hex_digest))
        try:
            raw_size = (await asyncio.to_thread(path.stat)).st_size
        except FileNotFoundError:
            report.missing.append(hex_digest)
            return
        await asyncio.to_thread(_check_key, path, source.sealer)
        key = target.key(hex_digest)
        found = await target.client.head(key)
        if found is not None:
            length, meta = found
            if length == raw_size or meta.get("plain-size") == str(await _plain_size(source, hex_digest)):
                report.blobs_present += 1
                return
        hashed = await asyncio.to_thread(_plain_hash, source, path)
        if hashed is None or hashed[0] != hex_digest:
            report.corrupt.append(hex_digest)
            return
        if not dry_run:
            meta = {"plain-size": str(hashed[1])}
            await target.client.put_file(key, path, meta, target.config.multipart_threshold)
        report.blobs_copied += 1
        report.bytes_copied += raw_size

    async def worker() -> None:
        nonlocal done
        while not queue.empty():
            await one(queue.get_nowait())
            done += 1
            if progress is not None:
                progress(done, len(digests))

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(max(1, min(concurrency, len(digests)))):
                group.create_task(worker())
    except BaseExceptionGroup as failed:  # the first worker's error, as the caller knows it
        raise failed.exceptions[0] from None
    report.corrupt.sort()
    report.missing.sort()


# --- rows: one transaction ----------------------------------------------------------------------


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bytes(value: Any) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


# SQLite keeps whatever type a value came with; PostgreSQL's binary COPY wants the column's own.
_CASTS: dict[str, Callable[[Any], Any]] = {
    "double precision": float,
    "bigint": int,
    "integer": int,
    "text": _text,
    "bytea": _bytes,
}


async def target_columns(conn: Any, table: str) -> dict[str, str]:
    rows = await conn.fetch(
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = $1",
        table,
    )
    return {str(r[0]): str(r[1]) for r in rows}


async def tables_with_rows(conn: Any, tables: list[str]) -> list[str]:
    """The tables of ``tables`` that exist in the target and hold rows."""
    found = []
    for table in tables:
        if await conn.fetchval("SELECT to_regclass($1)", f'"{table}"') is None:
            continue
        if await conn.fetchval(f'SELECT EXISTS (SELECT 1 FROM "{table}")'):
            found.append(table)
    return found


def _refusal(tables: list[str]) -> MigrationError:
    return MigrationError(
        f"the target index already holds rows ({', '.join(tables)}): a migration goes into an "
        "empty index (start the nodes after it), or pass --merge to add what is absent and "
        "overwrite nothing"
    )


async def _records(
    batches: Iterator[list[tuple[Any, ...]]],
    casts: list[Callable[[Any], Any]],
    digest_at: int | None,
    bad: set[str],
) -> AsyncIterator[tuple[Any, ...]]:
    while True:
        batch = await asyncio.to_thread(next, batches, None)
        if batch is None:
            return
        for row in batch:
            if digest_at is not None and row[digest_at] in bad:
                continue
            yield tuple(None if v is None else cast(v) for cast, v in zip(casts, row, strict=True))


async def copy_rows(
    source: sqlite3.Connection,
    conn: Any,
    tables: list[str],
    bad: set[str],
    report: MigrationReport,
    *,
    merge: bool,
) -> None:
    """Step 3 of the module docstring, inside the caller's transaction on ``conn``."""
    for table in tables:
        cols = await asyncio.to_thread(columns, source, table)
        types = await target_columns(conn, table)
        if not types:
            raise MigrationError(
                f"the target index has no table {table}: is this proxy older than the source's?"
            )
        unknown = [c for c in cols if c not in types]
        if unknown:
            raise MigrationError(f"the target's table {table} has no column {', '.join(unknown)}")
        casts = [_CASTS.get(types[c], lambda v: v) for c in cols]
        staged = f"migrate_{table}"
        await conn.execute(f'CREATE TEMP TABLE "{staged}" (LIKE "{table}" INCLUDING DEFAULTS) ON COMMIT DROP')
        batches = read_batches(source, table, cols)  # a generator: it reads on first next()
        digest_at = cols.index("digest") if table in DIGEST_TABLES else None
        await conn.copy_records_to_table(
            staged, records=_records(batches, casts, digest_at, bad), columns=cols
        )
        quoted = ", ".join(f'"{c}"' for c in cols)
        count = report.tables[table]
        if table == "assets" and merge:
            report.conflicts += await _asset_conflicts(conn, staged)
        if table == "audit":
            where = await _audit_where(conn, staged, merge, report)
            status = await conn.execute(
                f'INSERT INTO audit ({quoted}) OVERRIDING SYSTEM VALUE SELECT {quoted} FROM "{staged}" '
                f"WHERE {where} ORDER BY seq"
            )
            # An identity column hands out its own numbers: past the last copied one.
            await conn.execute(
                "SELECT setval(pg_get_serial_sequence('audit', 'seq'), max(seq)) FROM audit "
                "HAVING max(seq) IS NOT NULL"
            )
        else:
            status = await conn.execute(
                f'INSERT INTO "{table}" ({quoted}) SELECT {quoted} FROM "{staged}" ON CONFLICT DO NOTHING'
            )
        count.copied = int(str(status).rsplit(" ", 1)[-1])
        count.present = count.rows - count.skipped - count.copied
        if table == "audit" and report.audit_not_merged:
            count.present = int(
                await conn.fetchval(
                    f'SELECT count(*) FROM "{staged}" s JOIN audit t USING (seq) WHERE s.hash = t.hash'
                )
            )
            count.not_merged = count.rows - count.skipped - count.copied - count.present


async def _asset_conflicts(conn: Any, staged: str) -> list[dict[str, str]]:
    rows = await conn.fetch(
        "SELECT s.domain, s.repository, s.format, s.package, s.filename, s.digest, t.digest "
        f'FROM "{staged}" s '
        "JOIN assets t USING (domain, repository, format, package, filename) WHERE s.digest <> t.digest "
        "ORDER BY 1, 2, 3, 4, 5"
    )
    return [
        {
            "asset": "/".join(str(v) for v in r[:5]),
            "source_digest": str(r[5]),
            "target_digest": str(r[6]),
        }
        for r in rows
    ]


async def _audit_where(conn: Any, staged: str, merge: bool, report: MigrationReport) -> str:
    """Which staged audit records go in: all of them into an empty trail; on a merge, only those
    that continue the target's chain from its last record (any other way breaks the chain)."""
    last = await conn.fetchrow("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
    if last is None:
        return "TRUE"
    if not merge:  # checked empty inside this transaction; cannot happen
        raise _refusal(["audit"])
    diverged = await conn.fetchval(
        f'SELECT count(*) FROM "{staged}" s JOIN audit t USING (seq) WHERE s.hash <> t.hash'
    )
    first_new = await conn.fetchrow(
        f'SELECT seq, prev_hash FROM "{staged}" WHERE seq > $1 ORDER BY seq LIMIT 1', int(last[0])
    )
    if diverged:
        report.audit_not_merged = (
            f"the target's audit trail differs from the source's at {diverged} record(s): its chain is "
            "kept, the source's records stay in its index.sqlite3"
        )
        return "FALSE"
    if first_new is not None and first_new[1] != last[1]:
        report.audit_not_merged = (
            f"the source's record {first_new[0]} does not continue the target's chain: its records "
            "stay in its index.sqlite3"
        )
        return "FALSE"
    return f"seq > {int(last[0])}"


# --- the whole migration ------------------------------------------------------------------------


async def migrate(
    source_dir: Path,
    index_url: str,
    storage: StorageConfig,
    env: Mapping[str, str],
    sealer: Sealer | None,
    *,
    merge: bool = False,
    dry_run: bool = False,
    concurrency: int = 4,
    progress: Progress | None = None,
) -> MigrationReport:
    """See the module docstring; raises :class:`MigrationError` when it refuses."""
    if storage.backend != "s3":
        raise MigrationError(
            "the target config's blobs are not shared: a cluster keeps them in a bucket "
            '([storage] backend = "s3")'
        )
    started = time.monotonic()
    where = f"s3://{storage.bucket}/{storage.prefix}" + (
        f" at {storage.endpoint_url}" if storage.endpoint_url else ""
    )
    report = MigrationReport(str(source_dir), redact(index_url), where, dry_run, merge)
    conn = await asyncio.to_thread(open_source, source_dir)
    try:
        tables = await asyncio.to_thread(source_tables, conn)
        for table in tables:
            report.tables[table] = TableCount(rows=await asyncio.to_thread(count_rows, conn, table))
        digests = await asyncio.to_thread(referenced_digests, conn)
        report.blobs_referenced = len(digests)
        await _refuse_unless_empty(index_url, tables, merge)
        blobs_root = source_dir / "blobs"
        source = LocalBlobStore(blobs_root, sealer)
        # The store is built for its client and key layout only: it is never prepared, so it
        # touches no cache directory (blobs go from the source's files straight to the bucket).
        target = S3BlobStore(blobs_root, source_dir / "tmp" / "s3", storage, env, sealer)
        try:
            await copy_blobs(
                digests, source, target, report, dry_run=dry_run, concurrency=concurrency, progress=progress
            )
        finally:
            await target.close()
        bad = set(report.corrupt) | set(report.missing)
        for table in tables:
            report.tables[table].skipped = await asyncio.to_thread(count_bad_rows, conn, table, bad)
        report.hosted_lost = await asyncio.to_thread(hosted_rows, conn, bad)
        if dry_run:
            for count in report.tables.values():
                count.copied = count.rows - count.skipped
        else:
            await _copy_index(conn, index_url, tables, bad, report, merge=merge)
    finally:
        await asyncio.to_thread(conn.close)
    report.seconds = time.monotonic() - started
    return report


async def _refuse_unless_empty(index_url: str, tables: list[str], merge: bool) -> None:
    """Before any blob is uploaded: a target that holds rows is refused (unless ``merge``)."""
    try:
        conn = await asyncpg.connect(index_url, timeout=10)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise MigrationError(f"index database {redact(index_url)} is unreachable: {exc}") from None
    try:
        full = await tables_with_rows(conn, tables)
    finally:
        await conn.close()
    if full and not merge:
        raise _refusal(full)


async def _copy_index(
    source: sqlite3.Connection,
    index_url: str,
    tables: list[str],
    bad: set[str],
    report: MigrationReport,
    *,
    merge: bool,
) -> None:
    index = PostgresIndex(index_url, pool_size=2)
    await index.open()  # the target's migrations first
    try:
        async with index.pool.acquire() as conn, conn.transaction():
            # The index's own write lock: no node writes while the rows go in.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", WRITE_LOCK)
            full = await tables_with_rows(conn, tables)
            if full and not merge:
                raise _refusal(full)
            await copy_rows(source, conn, tables, bad, report, merge=merge)
            # Running nodes (a merge) drop what they cached of the index, as after any commit.
            generation = await conn.fetchval(
                "UPDATE cluster_changes SET generation = generation + 1 WHERE id = 1 RETURNING generation"
            )
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, str(generation))
    finally:
        with contextlib.suppress(Exception):
            await index.close()
