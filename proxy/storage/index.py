"""The SQLite index: every fact about blobs, assets and cached documents.

One aiosqlite connection (its own thread) in WAL mode with ``synchronous=FULL``, so an
acknowledged write survives a crash. The schema is versioned with ``PRAGMA user_version`` and
migrated at startup from the numbered files in ``migrations/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path

import aiosqlite

from proxy.model import AssetRecord, Digest, RepoRef
from proxy.storage.generation import ChangeCounter, Generation

BUSY_TIMEOUT = 5.0  # seconds a write waits for another process's write to finish

_ASSET_COLUMNS = (
    "domain, repository, format, package, filename, version, digest, size, content_type, "
    "origin_url, upstream, hosted, fetched_at, last_accessed"
)
ASSET_INSERT = f"INSERT INTO assets ({_ASSET_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"


def asset_params(rec: AssetRecord, now: float) -> tuple[object, ...]:
    """The values of :data:`ASSET_INSERT` for one record."""
    return (
        rec.repo.domain,
        rec.repo.repository,
        rec.format,
        rec.package,
        rec.filename,
        rec.version,
        rec.digest.hex,
        rec.size,
        rec.content_type,
        rec.origin_url,
        rec.upstream,
        int(rec.hosted),
        rec.fetched_at or now,
        now,
    )


@dataclass(frozen=True, slots=True)
class DocumentRow:
    """A cached metadata document and the validators to revalidate it."""

    upstream: str
    key: str
    url: str
    body: bytes
    content_type: str
    etag: str | None
    last_modified: str | None
    serial: int | None
    fetched_at: float
    expires_at: float


def migration_steps(package: str = "proxy.storage.migrations") -> list[tuple[int, str]]:
    """The numbered SQL steps of a migrations package, in order (``migrations_pg`` holds the
    same steps in PostgreSQL's dialect). Blocking: call from a thread."""
    folder = importlib.resources.files(package)
    found = []
    for entry in folder.iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append((int(name[:4]), entry.read_text(encoding="utf-8")))
    return sorted(found)


class Index:
    """Typed queries over the index; the only code that writes SQL."""

    def __init__(self, path: Path | None, generation: Generation | None = None) -> None:
        self.path = path
        # Bumped after every commit other processes must see at once (storage/generation.py).
        self.generation = generation
        self._conn: aiosqlite.Connection | None = None
        # One connection is shared by every coroutine: writes take turns, so one coroutine's
        # transaction never swallows (or rolls back) another's statements.
        self._write_lock = asyncio.Lock()

    @property
    def changes(self) -> ChangeCounter | None:
        """The counter every commit others must see moves (server/changes.py reads it)."""
        return self.generation

    @property
    def dialect(self) -> str:
        """ "sqlite" here; "postgresql" for a cluster's shared index (storage/postgres.py)."""
        return "sqlite"

    @property
    def shared(self) -> bool:
        """Whether other nodes (machines) share this index."""
        return self.dialect != "sqlite"

    @property
    def db(self) -> aiosqlite.Connection:
        """The shared connection, for the other query modules of ``storage/`` (catalog.py)."""
        return self._db

    async def rows_in(self, sql: str, values: Iterable[str], *, chunk: int = 500) -> list[sqlite3.Row]:
        """Every row of ``sql`` for these values, whose ``{marks}`` becomes ``?, ?, …``: one query
        per chunk, as SQLite bounds the number of parameters of one statement."""
        wanted = sorted(set(values))
        rows: list[sqlite3.Row] = []
        for start in range(0, len(wanted), chunk):
            part = wanted[start : start + chunk]
            async with self._db.execute(sql.format(marks=",".join("?" * len(part))), part) as cur:
                rows += await cur.fetchall()
        return rows

    def transaction(self, *, shared: bool = True) -> contextlib.AbstractAsyncContextManager[None]:
        """A write transaction (BEGIN IMMEDIATE … COMMIT), one at a time across the app.

        ``shared=False`` for writes no other process keeps a view of (audit records, access
        times, cached upstream documents): they do not bump the change counter, so they do not
        make every worker drop its caches.
        """
        return self._transaction(shared=shared)

    @contextlib.asynccontextmanager
    async def _transaction(self, *, shared: bool = True) -> AsyncIterator[None]:
        async with self._write_lock:
            await self._begin()
            try:
                yield
            except BaseException:
                await self._db.execute("ROLLBACK")
                raise
            try:
                await self._db.execute("COMMIT")
            except BaseException:
                # A COMMIT that fails (a full disk, an I/O error) may leave the transaction
                # open; SQLite's advice is an explicit ROLLBACK, so the connection is usable.
                with contextlib.suppress(Exception):
                    await self._db.execute("ROLLBACK")
                raise
            if shared and self.generation is not None and self.generation.is_open:
                await asyncio.to_thread(self.generation.bump)

    async def _begin(self) -> None:
        """BEGIN IMMEDIATE, tried again while SQLite says "locked", up to the busy timeout.

        The busy timeout does not cover one case: another coroutine's statement still open on
        this shared connection holds a read snapshot that another process (the CLI, another
        worker) has since outdated; SQLite then fails at once rather than wait. That clears as
        soon as the statement ends, so a short wait and a retry is all it takes.
        """
        await self._while_locked("BEGIN IMMEDIATE")

    async def _while_locked(self, statement: str) -> None:
        """Run ``statement``, again while SQLite says "locked", up to the busy timeout."""
        deadline = time.monotonic() + BUSY_TIMEOUT
        delay = 0.002
        while True:
            try:
                await self._db.execute(statement)
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    @property
    def _db(self) -> aiosqlite.Connection:
        if self._conn is None:
            raise RuntimeError("the index is not open")
        return self._conn

    async def open(self) -> None:
        """Connect, set WAL and durability, and migrate the schema to the newest version."""
        if self.generation is not None:
            try:
                await asyncio.to_thread(self.generation.open)
            except OSError as exc:  # e.g. a read-only data directory opened by the CLI
                logging.getLogger("proxy.index").warning(
                    "no change counter (%s): changes made here are not announced to running workers", exc
                )
        assert self.path is not None
        self._conn = await aiosqlite.connect(self.path, isolation_level=None)
        # The busy timeout first: switching a new file to WAL takes its lock, which another
        # process opening the same new file may hold for a moment.
        await self._db.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")
        # Switching a new file to WAL needs its exclusive lock, which SQLite does not wait for
        # (no busy handler there) while another process is opening the same new file.
        await self._while_locked("PRAGMA journal_mode=WAL")
        await self._db.execute("PRAGMA synchronous=FULL")
        await self._db.execute("PRAGMA foreign_keys=ON")
        await self._migrate()

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.close()
        if self.generation is not None:
            self.generation.close()

    async def _migrate(self) -> None:
        async with self._db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        current = int(row[0]) if row else 0
        for version, script in await asyncio.to_thread(migration_steps):
            if version <= current:
                continue
            # Each step with its version in one write transaction (IMMEDIATE: it waits its turn
            # rather than fail). Another process opening the same new file may have applied the
            # step since ``current`` was read: the step then fails (its CREATE TABLE) and is
            # skipped once the version it left says so.
            try:
                await self._db.executescript(
                    f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version={version};\nCOMMIT;"
                )
            except sqlite3.OperationalError:
                with contextlib.suppress(sqlite3.Error):
                    await self._db.execute("ROLLBACK")
                current = await self.schema_version()
                if version > current:
                    raise

    async def schema_version(self) -> int:
        async with self._db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def data_version(self) -> int:
        """Changes whenever another connection (another process) commits to the database."""
        async with self._db.execute("PRAGMA data_version") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    size_help = "Bytes of the SQLite index and its WAL"  # what database_bytes measures

    async def database_bytes(self) -> int:
        """The index's size on disk (the ``artifact_proxy_index_bytes`` metric)."""
        assert self.path is not None
        files = (self.path, self.path.with_name(self.path.name + "-wal"))
        return await asyncio.to_thread(lambda: sum(p.stat().st_size for p in files if p.exists()))

    async def ping(self) -> None:
        """A trivial query, for readiness checks."""
        async with self._db.execute("SELECT 1") as cur:
            await cur.fetchone()

    # --- assets -------------------------------------------------------------------------------

    async def get_asset(self, repo: RepoRef, fmt: str, package: str, filename: str) -> AssetRecord | None:
        sql = (
            f"SELECT {_ASSET_COLUMNS} FROM assets WHERE domain=? AND repository=? AND format=? "
            "AND package=? AND filename=?"
        )
        async with self._db.execute(sql, (repo.domain, repo.repository, fmt, package, filename)) as cur:
            row = await cur.fetchone()
        return _asset(row) if row else None

    async def package_assets(self, repo: RepoRef, fmt: str, package: str) -> list[AssetRecord]:
        sql = (
            f"SELECT {_ASSET_COLUMNS} FROM assets WHERE domain=? AND repository=? AND format=? "
            "AND package=? ORDER BY filename"
        )
        async with self._db.execute(sql, (repo.domain, repo.repository, fmt, package)) as cur:
            rows = await cur.fetchall()
        return [_asset(r) for r in rows]

    async def list_packages(self, repo: RepoRef, fmt: str) -> list[str]:
        sql = (
            "SELECT DISTINCT package FROM assets WHERE domain=? AND repository=? AND format=? "
            "ORDER BY package"
        )
        async with self._db.execute(sql, (repo.domain, repo.repository, fmt)) as cur:
            rows = await cur.fetchall()
        return [str(r[0]) for r in rows]

    async def stored_packages(self, repo: RepoRef, fmt: str | None = None) -> list[tuple[str, str]]:
        """(format, package) pairs with files in the repository, of every format or one."""
        sql = "SELECT DISTINCT format, package FROM assets WHERE domain=? AND repository=?"
        args: tuple[str, ...] = (repo.domain, repo.repository)
        if fmt is not None:
            sql += " AND format=?"
            args += (fmt,)
        async with self._db.execute(sql + " ORDER BY format, package", args) as cur:
            return [(str(r[0]), str(r[1])) for r in await cur.fetchall()]

    async def add_assets(self, records: Iterable[AssetRecord]) -> list[AssetRecord]:
        """Insert rows that do not exist yet, in one transaction.

        Returns the rows that already existed with a *different* digest: a cached or published
        ``name@version`` never changes bytes, so such a conflict is reported, never followed.
        Rows of cache fills alone do not bump the change counter: other workers find them in the
        index when they look, and need not drop their caches for them.
        """
        conflicts: list[AssetRecord] = []
        now = time.time()
        records = list(records)
        async with self._transaction(shared=any(rec.hosted for rec in records)):
            for rec in records:
                existing = await self.get_asset(rec.repo, rec.format, rec.package, rec.filename)
                if existing is not None:
                    if existing.digest != rec.digest:
                        conflicts.append(existing)
                    continue
                await self._db.execute(ASSET_INSERT, asset_params(rec, now))
        return conflicts

    async def delete_asset(self, repo: RepoRef, fmt: str, package: str, filename: str) -> bool:
        async with self._transaction():
            cur = await self._db.execute(
                "DELETE FROM assets WHERE domain=? AND repository=? AND format=? AND package=? "
                "AND filename=?",
                (repo.domain, repo.repository, fmt, package, filename),
            )
        return cur.rowcount > 0

    async def touch_assets(self, keys: Iterable[tuple[RepoRef, str, str, str]], when: float) -> None:
        """Record last access for a batch of assets (flushed periodically, not per request)."""
        rows = [(when, k[0].domain, k[0].repository, k[1], k[2], k[3]) for k in keys]
        if rows:
            async with self._transaction(shared=False):
                await self._db.executemany(
                    "UPDATE assets SET last_accessed=? WHERE domain=? AND repository=? "
                    "AND format=? AND package=? AND filename=?",
                    rows,
                )

    async def origin_digest(self, upstream: str, url: str) -> Digest | None:
        """The digest some repository stored for ``url`` of ``upstream`` (cross-process
        single-flight asks after waiting for another worker's download; rare, so unindexed)."""
        sql = "SELECT digest FROM assets WHERE upstream=? AND origin_url=? LIMIT 1"
        async with self._db.execute(sql, (upstream, url)) as cur:
            row = await cur.fetchone()
        return Digest(str(row[0])) if row else None

    async def drop_cached_digest(self, digest: Digest) -> list[AssetRecord]:
        """Remove every cached (not hosted) row of a blob found damaged, so it is fetched again;
        returns the removed rows."""
        sql = f"SELECT {_ASSET_COLUMNS} FROM assets WHERE digest=? AND hosted=0"
        async with self._transaction():
            async with self._db.execute(sql, (digest.hex,)) as cur:
                rows = [_asset(r) for r in await cur.fetchall()]
            await self._db.execute("DELETE FROM assets WHERE digest=? AND hosted=0", (digest.hex,))
        return rows

    async def digest_in_use(self, digest: Digest) -> bool:
        async with self._db.execute("SELECT 1 FROM assets WHERE digest=? LIMIT 1", (digest.hex,)) as cur:
            return await cur.fetchone() is not None

    # --- documents ----------------------------------------------------------------------------

    async def get_document(self, upstream: str, key: str) -> DocumentRow | None:
        sql = (
            "SELECT upstream, doc_key, url, body, content_type, etag, last_modified, serial, "
            "fetched_at, expires_at FROM documents WHERE upstream=? AND doc_key=?"
        )
        async with self._db.execute(sql, (upstream, key)) as cur:
            row = await cur.fetchone()
        if row is None:
            return None
        return DocumentRow(
            upstream=row[0],
            key=row[1],
            url=row[2],
            body=bytes(row[3]),
            content_type=row[4],
            etag=row[5],
            last_modified=row[6],
            serial=row[7],
            fetched_at=row[8],
            expires_at=row[9],
        )

    async def put_document(self, doc: DocumentRow) -> None:
        async with self._transaction(shared=False):
            await self._db.execute(
                "INSERT INTO documents (upstream, doc_key, url, body, content_type, etag, "
                "last_modified, serial, fetched_at, expires_at) VALUES (?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT (upstream, doc_key) DO UPDATE SET url=excluded.url, body=excluded.body, "
                "content_type=excluded.content_type, etag=excluded.etag, "
                "last_modified=excluded.last_modified, serial=excluded.serial, "
                "fetched_at=excluded.fetched_at, expires_at=excluded.expires_at",
                (
                    doc.upstream,
                    doc.key,
                    doc.url,
                    doc.body,
                    doc.content_type,
                    doc.etag,
                    doc.last_modified,
                    doc.serial,
                    doc.fetched_at,
                    doc.expires_at,
                ),
            )
            await self._db.execute(
                "DELETE FROM negative_cache WHERE upstream=? AND doc_key=?", (doc.upstream, doc.key)
            )

    async def renew_document(self, upstream: str, key: str, fetched_at: float, expires_at: float) -> None:
        async with self._transaction(shared=False):
            await self._db.execute(
                "UPDATE documents SET fetched_at=?, expires_at=? WHERE upstream=? AND doc_key=?",
                (fetched_at, expires_at, upstream, key),
            )

    async def get_negative(self, upstream: str, key: str) -> float | None:
        """When the remembered 404 expires, or None if there is none."""
        sql = "SELECT expires_at FROM negative_cache WHERE upstream=? AND doc_key=?"
        async with self._db.execute(sql, (upstream, key)) as cur:
            row = await cur.fetchone()
        return float(row[0]) if row else None

    async def put_negative(self, upstream: str, key: str, expires_at: float) -> None:
        async with self._transaction(shared=False):
            await self._db.execute(
                "INSERT INTO negative_cache (upstream, doc_key, expires_at) VALUES (?,?,?) "
                "ON CONFLICT (upstream, doc_key) DO UPDATE SET expires_at=excluded.expires_at",
                (upstream, key, expires_at),
            )


def _asset(row: aiosqlite.Row | tuple[object, ...]) -> AssetRecord:
    r = tuple(row)
    return AssetRecord(
        repo=RepoRef(str(r[0]), str(r[1])),
        format=str(r[2]),
        package=str(r[3]),
        filename=str(r[4]),
        version=None if r[5] is None else str(r[5]),
        digest=Digest(str(r[6])),
        size=int(r[7]),
        content_type=str(r[8]),
        origin_url=None if r[9] is None else str(r[9]),
        upstream=None if r[10] is None else str(r[10]),
        hosted=bool(r[11]),
        fetched_at=float(r[12]),
    )
