"""The index's contract, run against both backends (issue #12): the SQLite file of one machine
and the PostgreSQL database a cluster shares.

The query modules are written once, against aiosqlite's shape, and PostgreSQL gets them through
a translation layer (storage/postgres.py) and migrations of its own (migrations_pg/). Whatever
differs between the two dialects (upsert and rowcount semantics, ``json_patch``, byte-order
collation, BYTEA against BLOB, DOUBLE PRECISION and BIGINT against SQLite's dynamic types, the
audit trail's triggers) shows up here as a different answer to the same call: every test runs
the same calls and the same assertions through the public query classes on both backends.

The ``sqlite`` backend is the index as ``app.open_index`` builds it on a data directory; the
``postgresql`` one is ``open_index`` with ``[index] url`` on a fresh database of the
``postgres_dsn`` fixture (skipped, with the fixture's reason, where PostgreSQL is not there).
Several ``Index`` objects opened on one database stand for several nodes (or worker processes)
sharing it: what one commits the other reads, concurrent writers serialise, and the change
counter tells one node of the other's commits.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from proxy.app import open_index
from proxy.config import Overrides, parse_config
from proxy.errors import Unauthorized
from proxy.formats.deps_base import Declared
from proxy.model import AssetRecord, Digest, RepoRef
from proxy.security.audit import GENESIS, AuditEvent, AuditLog, chain_hash
from proxy.security.policy import Grant, Policies
from proxy.security.tokens import TokenStore
from proxy.storage import lifecycle, postgres
from proxy.storage.catalog import Catalog, OriginRule, QuarantineEntry, RepositoryRow, VersionRow
from proxy.storage.dependencies import DependencyStore
from proxy.storage.index import ASSET_INSERT, DocumentRow, Index, asset_params
from proxy.storage.leases import Leases
from proxy.storage.local import LocalBlobStore
from tests.postgres import Postgres, connect, drop_database, dsn_for, run_sync

BACKENDS = ("sqlite", "postgresql")
SCHEMA_VERSION = 8  # the newest numbered step of migrations/ and migrations_pg/
REPO = RepoRef("acme", "main")
OTHER = RepoRef("acme", "other")
# Byte order of the UTF-8 encodings: upper case before lower case, non-ASCII last. A locale's
# collation (PostgreSQL's default) would put "a" before "B" and "é" next to "e".
BYTE_ORDERED = ["B", "Z", "a", "b", "e", "z", "é"]


def digest(n: int) -> Digest:
    """A made-up digest, the same for the same ``n`` (the index never hashes anything)."""
    return Digest(f"{n:064x}")


def asset(
    package: str,
    filename: str,
    d: Digest,
    *,
    repo: RepoRef = REPO,
    fmt: str = "pypi",
    size: int = 1000,
    version: str | None = "1.0",
    hosted: bool = False,
    origin_url: str | None = None,
    upstream: str | None = None,
    fetched_at: float = 0.0,
) -> AssetRecord:
    return AssetRecord(
        repo=repo,
        format=fmt,
        package=package,
        filename=filename,
        digest=d,
        size=size,
        content_type="application/octet-stream",
        version=version,
        origin_url=origin_url,
        upstream=upstream,
        hosted=hosted,
        fetched_at=fetched_at,
    )


@dataclass
class Database:
    """One database of either backend; ``node()`` opens another ``Index`` on it (as another
    process or another machine would), closed at the end of the test."""

    backend: str
    data_dir: Path
    dsn: str | None
    opened: list[Index] = field(default_factory=list)

    def config_raw(self) -> dict[str, Any]:
        raw: dict[str, Any] = {"server": {"data_dir": str(self.data_dir)}}
        if self.dsn is not None:
            raw["index"] = {"url": self.dsn, "pool_size": 4}
        return raw

    def build(self) -> Index:
        """The index ``app.open_index`` builds for this backend (not opened yet). An empty
        environment: ``ARTIFACT_PROXY_INDEX_URL`` in the test's own must not move it."""
        return open_index(parse_config(self.config_raw(), Overrides(), {}))

    async def node(self) -> Index:
        index = self.build()
        self.opened.append(index)
        await index.open()
        return index


@pytest.fixture(params=BACKENDS)
def backend_dsn(request: pytest.FixtureRequest) -> tuple[str, str | None]:
    """(backend, DSN): a fresh PostgreSQL database for ``postgresql`` (this skips where the
    server cannot be had), nothing for ``sqlite``. Synchronous, so that the server's start
    runs outside the event loop."""
    backend: str = request.param
    if backend == "postgresql":
        return backend, str(request.getfixturevalue("postgres_dsn"))
    return backend, None


@pytest.fixture
async def db(backend_dsn: tuple[str, str | None], tmp_path: Path) -> AsyncIterator[Database]:
    backend, dsn = backend_dsn
    data_dir = tmp_path / "data"
    await asyncio.to_thread(data_dir.mkdir)
    database = Database(backend, data_dir, dsn)
    try:
        yield database
    finally:
        for index in reversed(database.opened):
            await index.close()


@pytest.fixture
async def index(db: Database) -> Index:
    index = await db.node()
    assert index.dialect == db.backend
    assert index.shared is (db.backend == "postgresql")
    return index


async def scalar(index: Index, sql: str, args: Sequence[Any] = ()) -> Any:
    """One value, read through the same ``index.db`` (and the same SQL) on both backends."""
    async with index.db.execute(sql, args) as cur:
        row = await cur.fetchone()
    return None if row is None else row[0]


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Whether ``check()`` becomes true within ``timeout`` seconds (polled)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True


# --- assets ---------------------------------------------------------------------------------


async def test_assets_round_trip_exactly_and_list_in_byte_order(index: Index) -> None:
    fetched = 1_732_579_200.123_456_7  # a float whose every bit must survive
    big = 2**33 + 7  # beyond a 32-bit integer column
    rows = [
        asset(
            "é", "é-1.0.whl", digest(1), fetched_at=fetched, size=big, origin_url="https://x/é", upstream="u"
        ),
        asset("B", "B-1.0.whl", digest(2), hosted=True, fetched_at=fetched),
        asset("a", "a-1.0.tar.gz", digest(3), version=None, fetched_at=fetched),
        asset("a", "A-1.0.whl", digest(4), fetched_at=fetched),
        asset("a", "a-1.0.whl", digest(5), fetched_at=fetched),
        asset("Z", "z.jar", digest(6), fmt="maven", fetched_at=fetched),
    ]
    assert await index.add_assets(rows) == []
    for rec in rows:
        assert await index.get_asset(rec.repo, rec.format, rec.package, rec.filename) == rec
    got = await index.get_asset(REPO, "pypi", "é", "é-1.0.whl")
    assert got is not None and got.size == big and got.fetched_at == fetched
    assert got.version == "1.0" and got.origin_url == "https://x/é" and got.upstream == "u"
    none_cols = await index.get_asset(REPO, "pypi", "a", "a-1.0.tar.gz")
    assert none_cols is not None
    assert (none_cols.version, none_cols.origin_url, none_cols.upstream) == (None, None, None)
    assert await index.get_asset(REPO, "pypi", "a", "missing.whl") is None
    assert await index.get_asset(OTHER, "pypi", "a", "a-1.0.whl") is None
    # A file without a time of its own gets the insert's.
    before = time.time()
    await index.add_assets([asset("b", "b-1.whl", digest(7))])
    stamped = await index.get_asset(REPO, "pypi", "b", "b-1.whl")
    assert stamped is not None and before <= stamped.fetched_at <= time.time()

    files = [r.filename for r in await index.package_assets(REPO, "pypi", "a")]
    assert files == ["A-1.0.whl", "a-1.0.tar.gz", "a-1.0.whl"]
    assert await index.list_packages(REPO, "pypi") == ["B", "a", "b", "é"]
    assert await index.list_packages(REPO, "maven") == ["Z"]
    assert await index.list_packages(OTHER, "pypi") == []
    assert await index.stored_packages(REPO) == [
        ("maven", "Z"),
        ("pypi", "B"),
        ("pypi", "a"),
        ("pypi", "b"),
        ("pypi", "é"),
    ]
    assert await index.stored_packages(REPO, "maven") == [("maven", "Z")]


async def test_add_assets_reports_a_different_digest_and_keeps_the_first(index: Index) -> None:
    first = asset("pkg", "pkg-1.0.whl", digest(1), fetched_at=100.5)
    assert await index.add_assets([first]) == []
    # The same bytes again: nothing to report, nothing changed.
    assert await index.add_assets([replace(first, fetched_at=200.0)]) == []
    # Other bytes under the name: the stored row is the conflict, and it stays.
    other = replace(first, digest=digest(2), size=5)
    fresh = asset("pkg", "pkg-2.0.whl", digest(3))
    conflicts = await index.add_assets([other, fresh])
    assert conflicts == [first]
    assert await index.get_asset(REPO, "pypi", "pkg", "pkg-1.0.whl") == first
    # The rest of the batch was written.
    assert await index.get_asset(REPO, "pypi", "pkg", "pkg-2.0.whl") is not None
    # The same name in another repository is another row.
    assert await index.add_assets([replace(other, repo=OTHER)]) == []


async def test_delete_touch_origin_drop_and_in_use(index: Index) -> None:
    cached = asset("p", "p-1.whl", digest(1), origin_url="https://up/p-1.whl", upstream="up")
    copy = replace(cached, repo=OTHER)
    hosted = asset("p", "p-1.whl", digest(1), repo=RepoRef("acme", "private"), hosted=True, fetched_at=5.0)
    lone = asset("q", "q-1.whl", digest(2))
    assert await index.add_assets([cached, copy, hosted, lone]) == []

    assert await index.origin_digest("up", "https://up/p-1.whl") == digest(1)
    assert await index.origin_digest("up", "https://up/other.whl") is None
    assert await index.origin_digest("elsewhere", "https://up/p-1.whl") is None

    when = 1_800_000_000.25
    await index.touch_assets([(REPO, "pypi", "p", "p-1.whl"), (REPO, "pypi", "q", "q-1.whl")], when)
    sql = "SELECT last_accessed FROM assets WHERE domain=? AND repository=? AND package=?"
    assert await scalar(index, sql, (REPO.domain, REPO.repository, "p")) == when
    assert await scalar(index, sql, (OTHER.domain, OTHER.repository, "p")) != when
    await index.touch_assets([], when)  # nothing to do, and no empty statement sent

    # A damaged blob: every cached row of it goes (they can be fetched again), hosted ones stay.
    dropped = await index.drop_cached_digest(digest(1))
    assert sorted((r.repo.repository, r.filename) for r in dropped) == [
        ("main", "p-1.whl"),
        ("other", "p-1.whl"),
    ]
    assert await index.get_asset(REPO, "pypi", "p", "p-1.whl") is None
    assert await index.get_asset(hosted.repo, "pypi", "p", "p-1.whl") == hosted
    assert await index.digest_in_use(digest(1))  # the hosted row
    assert await index.drop_cached_digest(digest(1)) == []

    assert await index.delete_asset(REPO, "pypi", "q", "q-1.whl") is True
    assert await index.delete_asset(REPO, "pypi", "q", "q-1.whl") is False
    assert not await index.digest_in_use(digest(2))


async def test_rows_in_reads_more_values_than_one_chunk(index: Index) -> None:
    present = [digest(n) for n in range(1, 531)]
    await index.add_assets(asset(f"p{n:04}", "f.whl", d, size=n) for n, d in enumerate(present))
    absent = [digest(n).hex for n in range(10_000, 10_100)]
    wanted = [d.hex for d in present] + absent + [present[0].hex]  # a duplicate too
    rows = await index.rows_in("SELECT digest, size FROM assets WHERE digest IN ({marks})", wanted)
    assert sorted((str(r[0]), int(r[1])) for r in rows) == [(d.hex, n) for n, d in enumerate(present)]
    # Through a query module that uses it: gc's reference check, chunked smaller.
    sql = "SELECT DISTINCT digest FROM assets WHERE digest IN ({marks})"
    small = await index.rows_in(sql, wanted, chunk=64)
    assert {str(r[0]) for r in small} == {d.hex for d in present}


# --- documents and the negative cache -------------------------------------------------------


async def test_documents_round_trip_bytes_and_replace_and_renew(index: Index) -> None:
    body = bytes(range(256)) + b"\xff\xfe\x00 not UTF-8 \xc3\x28"
    doc = DocumentRow(
        upstream="up",
        key="simple/é",
        url="https://up/simple/é/",
        body=body,
        content_type="text/html",
        etag='"abc"',
        last_modified=None,
        serial=2**40,
        fetched_at=1_700_000_000.5,
        expires_at=1_700_000_600.75,
    )
    assert await index.get_document("up", "simple/é") is None
    await index.put_document(doc)
    assert await index.get_document("up", "simple/é") == doc
    assert await index.get_document("other", "simple/é") is None

    newer = replace(doc, body=b"", etag=None, last_modified="Tue, 01 Jan 2030 00:00:00 GMT", serial=None)
    await index.put_document(newer)
    assert await index.get_document("up", "simple/é") == newer

    await index.renew_document("up", "simple/é", 1_800_000_000.0, 1_800_000_300.0)
    renewed = await index.get_document("up", "simple/é")
    assert renewed == replace(newer, fetched_at=1_800_000_000.0, expires_at=1_800_000_300.0)
    await index.renew_document("up", "unknown", 1.0, 2.0)  # nothing there: a no-op
    assert await index.get_document("up", "unknown") is None


async def test_negative_cache_and_a_document_clears_it(index: Index) -> None:
    assert await index.get_negative("up", "simple/gone") is None
    await index.put_negative("up", "simple/gone", 1_700_000_060.5)
    assert await index.get_negative("up", "simple/gone") == 1_700_000_060.5
    await index.put_negative("up", "simple/gone", 1_700_000_120.25)  # remembered again: replaced
    assert await index.get_negative("up", "simple/gone") == 1_700_000_120.25
    await index.put_negative("up", "simple/other", 5.0)
    doc = DocumentRow(
        "up", "simple/gone", "https://up/simple/gone/", b"{}", "application/json", None, None, None, 1.0, 2.0
    )
    await index.put_document(doc)
    assert await index.get_negative("up", "simple/gone") is None
    assert await index.get_negative("up", "simple/other") == 5.0


# --- catalog --------------------------------------------------------------------------------


async def test_domains_and_repositories_upsert_and_delete_cascade(index: Index) -> None:
    catalog = Catalog(index)
    for name in ("zeta", "acme", "Beta"):
        assert await catalog.put_domain(name) is True
    assert await catalog.put_domain("acme") is False
    assert await catalog.domains() == ["Beta", "acme", "zeta"]

    row = RepositoryRow("acme", "main", "first", ("up", "é"), 3600.5, 1_700_000_000.25, False, True)
    assert await catalog.put_repository(row, replace=False) is True
    assert await catalog.put_repository(replace(row, description="ignored"), replace=False) is False
    assert await catalog.repositories() == [row]
    changed = replace(row, description="second", upstreams=(), allow_redeploy=True, anonymous_read=False)
    assert await catalog.put_repository(replace(changed, created_at=5.0), replace=True) is True
    assert await catalog.repositories() == [changed]  # created_at is the first write's
    await catalog.put_repository(RepositoryRow("acme", "B", "", (), 0.0, 1.0), replace=False)
    await catalog.put_repository(RepositoryRow("zeta", "a", "", (), 0.0, 1.0), replace=False)
    assert [(r.domain, r.name) for r in await catalog.repositories()] == [
        ("acme", "B"),
        ("acme", "main"),
        ("zeta", "a"),
    ]

    def check(rows: list[RepositoryRow]) -> None:
        assert sorted(r.name for r in rows) == ["B", "main"]

    await catalog.put_repository_checked(RepositoryRow("acme", "c", "", (), 0.0, 1.0), check)
    # A repository belongs to a domain that exists (a foreign key on both).
    with pytest.raises(Exception, match=r"(?i)foreign key"):
        await catalog.put_repository(RepositoryRow("nowhere", "x", "", (), 0.0, 1.0), replace=False)

    # Everything of the repository goes with it; other repositories keep theirs.
    version = VersionRow(REPO, "npm", "pkg", "1.0.0", "Published", {"k": 1})
    await catalog.publish(version, [asset("pkg", "pkg-1.0.0.tgz", digest(1), fmt="npm", hosted=True)])
    await catalog.publish(
        replace(version, repo=OTHER), [asset("pkg", "pkg-1.0.0.tgz", digest(1), repo=OTHER, fmt="npm")]
    )
    await catalog.put_tag(REPO, "npm", "pkg", "latest", "1.0.0")
    await catalog.put_origin_rule(REPO, "npm", OriginRule("pkg", "ALLOW", "BLOCK"))
    await catalog.put_quarantine(REPO, "npm", QuarantineEntry("pkg@1.0.0", "bad"))
    assert await catalog.delete_repository(REPO) is True
    assert await catalog.delete_repository(REPO) is False
    assert await index.package_assets(REPO, "npm", "pkg") == []
    assert await catalog.versions(REPO, "npm") == []
    assert await catalog.tags(REPO, "npm", "pkg") == {}
    assert await catalog.origin_rules(REPO, "npm") == []
    assert await catalog.quarantine(REPO, "npm") == []
    assert len(await index.package_assets(OTHER, "npm", "pkg")) == 1
    assert [v.version for v in await catalog.versions(OTHER, "npm")] == ["1.0.0"]

    assert await catalog.delete_domain("acme") is True
    assert await catalog.delete_domain("acme") is False
    assert await catalog.domains() == ["Beta", "zeta"]
    assert [(r.domain, r.name) for r in await catalog.repositories()] == [("zeta", "a")]


async def test_versions_publish_and_attributes_merge_like_json_patch(index: Index) -> None:
    catalog = Catalog(index)
    attrs: dict[str, Any] = {
        "description": "é ünïcode ✓",
        "nested": {"a": 1, "b": {"c": [1, 2, {"d": None}], "e": "keep"}},
        "float": 1.5,
        "big": 2**53,
        "flag": True,
        "huge": 1e300,  # no integer: kept as the text SQLite keeps, not rewritten as NUMERIC
        "exp": 1.5e20,
        "gone": "soon",
    }
    v1 = VersionRow(REPO, "npm", "pkg", "1.0.0", "Published", attrs)
    file1 = asset("pkg", "pkg-1.0.0.tgz", digest(1), fmt="npm", version="1.0.0", hosted=True, fetched_at=7.0)
    assert await catalog.publish(v1, [file1]) is True
    assert await catalog.publish(v1, [file1]) is False  # a published file is immutable
    [stored] = await catalog.versions(REPO, "npm", "pkg")
    assert stored.attributes == attrs and stored.status == "Published"
    assert stored.created_at == stored.updated_at > 0

    # RFC 7396 merge patch, as SQLite's json_patch: nested objects merge, null removes a key,
    # arrays and scalars replace, a patch object lands on a scalar as an object.
    patch: dict[str, Any] = {
        "nested": {"b": {"c": ["x"], "e": None, "new": {"deep": None, "kept": 0}}, "a": None},
        "gone": None,
        "float": {"now": "an object"},
        "added": [None, {"z": None}],
        "absent": None,
    }
    assert await catalog.update_attributes(REPO, "npm", "pkg", "1.0.0", patch) is True
    expected: dict[str, Any] = {
        "description": "é ünïcode ✓",
        "nested": {"b": {"c": ["x"], "new": {"kept": 0}}},
        "float": {"now": "an object"},
        "big": 2**53,
        "flag": True,
        "huge": 1e300,
        "exp": 1.5e20,
        "added": [None, {"z": None}],
    }
    [merged] = await catalog.versions(REPO, "npm", "pkg")
    assert merged.attributes == expected
    # Byte for byte once re-encoded: every number's type and value, and the order of the keys
    # (the target's, then the patch's new ones), as SQLite's json_patch leaves them.
    assert json.dumps(merged.attributes) == json.dumps(expected)
    assert await catalog.update_attributes(REPO, "npm", "pkg", "9.9.9", {"x": 1}) is False

    # Another file of the same version (a second wheel, a pom after a jar): the version row's
    # attributes merge the new ones in, the same patch.
    file2 = asset("pkg", "pkg-1.0.0.extra", digest(2), fmt="npm", version="1.0.0", hosted=True)
    assert await catalog.publish(replace(v1, attributes={"big": None, "more": {"k": "v"}}), [file2]) is True
    [again] = await catalog.versions(REPO, "npm", "pkg")
    after = {**{k: v for k, v in expected.items() if k != "big"}, "more": {"k": "v"}}
    assert json.dumps(again.attributes) == json.dumps(after)
    assert again.created_at == merged.created_at and again.updated_at >= merged.updated_at

    # Redeploy replaces files rather than refusing them.
    redeployed = replace(file1, digest=digest(3))
    assert await catalog.publish(replace(v1, attributes={}), [redeployed], replace=True) is True
    assert await index.get_asset(REPO, "npm", "pkg", "pkg-1.0.0.tgz") == redeployed

    # Listings in byte order; statuses; disposal.
    for name in ("é", "a", "B"):
        await catalog.publish(VersionRow(REPO, "npm", name, "1", "Published"), [])
    assert [v.package for v in await catalog.versions(REPO, "npm")] == ["B", "a", "pkg", "é"]
    assert await catalog.packages(REPO) == [("npm", "B"), ("npm", "a"), ("npm", "pkg"), ("npm", "é")]
    assert await catalog.packages(REPO, "pypi") == []
    assert await catalog.set_status(REPO, "npm", "pkg", "1.0.0", "Unlisted") is True
    assert await catalog.set_status(REPO, "npm", "pkg", "2.0.0", "Unlisted") is False
    await catalog.put_tag(REPO, "npm", "pkg", "latest", "1.0.0")
    assert await catalog.dispose(REPO, "npm", "pkg", "1.0.0", forget=False) is True
    [disposed] = await catalog.versions(REPO, "npm", "pkg")
    assert disposed.status == "Disposed"
    assert await index.package_assets(REPO, "npm", "pkg") == []
    assert await catalog.tags(REPO, "npm", "pkg") == {}
    assert await catalog.dispose(REPO, "npm", "a", "1", forget=True) is True
    assert [v.package for v in await catalog.versions(REPO, "npm")] == ["B", "pkg", "é"]


async def test_tags_origin_rules_and_quarantine_upsert_list_delete(index: Index) -> None:
    catalog = Catalog(index)
    for tag, version in (("next", "2.0.0"), ("latest", "1.0.0"), ("Beta", "3.0.0"), ("é", "4")):
        await catalog.put_tag(REPO, "npm", "pkg", tag, version)
    await catalog.put_tag(REPO, "npm", "pkg", "latest", "1.1.0")
    tags = await catalog.tags(REPO, "npm", "pkg")
    assert tags == {"Beta": "3.0.0", "latest": "1.1.0", "next": "2.0.0", "é": "4"}
    assert list(tags) == ["Beta", "latest", "next", "é"]
    assert await catalog.delete_tag(REPO, "npm", "pkg", "next") is True
    assert await catalog.delete_tag(REPO, "npm", "pkg", "next") is False
    assert await catalog.tags(REPO, "npm", "other") == {}

    for pattern in ("acme-*", "Zed", "alpha"):
        await catalog.put_origin_rule(REPO, "pypi", OriginRule(pattern, "ALLOW", "BLOCK"))
    await catalog.put_origin_rule(REPO, "pypi", OriginRule("alpha", "BLOCK", "ALLOW"))
    assert await catalog.origin_rules(REPO, "pypi") == [
        OriginRule("Zed", "ALLOW", "BLOCK"),
        OriginRule("acme-*", "ALLOW", "BLOCK"),
        OriginRule("alpha", "BLOCK", "ALLOW"),
    ]
    assert await catalog.origin_rules(REPO, "npm") == []
    assert await catalog.delete_origin_rule(REPO, "pypi", "Zed") is True
    assert await catalog.delete_origin_rule(REPO, "pypi", "Zed") is False

    await catalog.put_quarantine(REPO, "pypi", QuarantineEntry("evil@*", "malware"))
    await catalog.put_quarantine(REPO, "pypi", QuarantineEntry("Evil@1.0", "typo"))
    await catalog.put_quarantine(REPO, "pypi", QuarantineEntry("evil@*", "malware, confirmed"))
    assert await catalog.quarantine(REPO, "pypi") == [
        QuarantineEntry("Evil@1.0", "typo"),
        QuarantineEntry("evil@*", "malware, confirmed"),
    ]
    assert await catalog.delete_quarantine(REPO, "pypi", "evil@*") is True
    assert await catalog.delete_quarantine(REPO, "pypi", "evil@*") is False


async def check_listings_in_byte_order(index: Index) -> None:
    """Every listing of the index, written in reverse order and read back in byte order."""
    catalog = Catalog(index)
    names = list(reversed(BYTE_ORDERED))
    await catalog.put_domain("acme")
    for name in names:
        await catalog.put_domain(name)
        await catalog.put_repository(RepositoryRow("acme", name, "", (), 0.0, 1.0), replace=False)
        await catalog.publish(VersionRow(REPO, "npm", name, "1", "Published"), [])
        await catalog.put_tag(REPO, "npm", "pkg", name, "1")
        await catalog.put_origin_rule(REPO, "npm", OriginRule(name, "ALLOW", "ALLOW"))
        await catalog.put_quarantine(REPO, "npm", QuarantineEntry(name, ""))
    await index.add_assets(
        [asset(name, f"{name}.whl", digest(n + 1)) for n, name in enumerate(names)]
        + [asset("one", f"{name}.whl", digest(n + 100)) for n, name in enumerate(names)]
    )
    assert await catalog.domains() == sorted([*BYTE_ORDERED, "acme"], key=str.encode)
    assert [r.name for r in await catalog.repositories()] == BYTE_ORDERED
    assert [v.package for v in await catalog.versions(REPO, "npm")] == BYTE_ORDERED
    assert await catalog.packages(REPO, "npm") == [("npm", n) for n in BYTE_ORDERED]
    assert list(await catalog.tags(REPO, "npm", "pkg")) == BYTE_ORDERED
    assert [r.pattern for r in await catalog.origin_rules(REPO, "npm")] == BYTE_ORDERED
    assert [q.pattern for q in await catalog.quarantine(REPO, "npm")] == BYTE_ORDERED
    assert await index.list_packages(REPO, "pypi") == sorted([*BYTE_ORDERED, "one"], key=str.encode)
    assert [p for _, p in await index.stored_packages(REPO, "pypi")] == await index.list_packages(
        REPO, "pypi"
    )
    assert [a.filename for a in await index.package_assets(REPO, "pypi", "one")] == [
        f"{n}.whl" for n in BYTE_ORDERED
    ]


async def test_every_listing_is_in_byte_order(index: Index) -> None:
    await check_listings_in_byte_order(index)


@pytest.fixture
def linguistic_dsn(postgres_server: Postgres) -> Iterator[str]:
    """A database whose default collation is a language's (ICU's root locale), as one created
    with a production server's default locale would be: there ``ORDER BY`` on a column without
    ``COLLATE "C"`` puts "a" before "B". (The ``postgres_dsn`` databases use the C locale.)"""
    import asyncpg

    name = postgres_server.next_database_name() + "_icu"

    async def create() -> None:
        async with connect(postgres_server.dsn) as conn:
            await conn.execute(
                f"CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'UTF8' "
                "LOCALE_PROVIDER icu ICU_LOCALE 'und' LC_COLLATE 'C' LC_CTYPE 'C'"
            )

    try:
        run_sync(create())
    except asyncpg.PostgresError as exc:  # a server before 15, or built without ICU
        pytest.skip(f"no ICU collation on this PostgreSQL: {exc}")
    try:
        yield dsn_for(postgres_server.dsn, name)
    finally:
        run_sync(drop_database(postgres_server.dsn, name))


async def test_listings_keep_byte_order_where_the_database_collates_by_language(
    linguistic_dsn: str, tmp_path: Path
) -> None:
    database = Database("postgresql", tmp_path / "data", linguistic_dsn)
    try:
        index = await database.node()
        assert await scalar(index, "SELECT 'a' < 'B'") is True  # the database's own order
        await check_listings_in_byte_order(index)
    finally:
        for node in database.opened:
            await node.close()


# --- security -------------------------------------------------------------------------------


async def test_tokens_issue_verify_list_revoke(db: Database, index: Index) -> None:
    tokens = TokenStore(index, 3600.0, 60.0, 7200.0)
    admin = await tokens.issue(
        principal="root",
        domain=None,
        repository=None,
        permissions=frozenset({"admin"}),
        duration=None,
        issued_by="",
    )
    reader = await tokens.issue(
        principal="ci é",
        domain="acme",
        repository="main",
        permissions=frozenset({"read", "publish"}),
        duration=120.0,
        issued_by="root",
    )
    verified = await tokens.verify(reader.secret)
    assert verified == reader.token
    assert verified.allows("acme", "main", "publish") and not verified.allows("acme", "other", "read")
    assert (await tokens.verify(admin.secret)).domain is None
    with pytest.raises(Unauthorized):
        await tokens.verify("apt_" + "x" * 43)

    await tokens.flush_last_used()
    listed = await tokens.list()
    assert [t.id for t in listed] == [admin.token.id, reader.token.id]
    assert all(t.last_used_at is not None for t in listed)
    assert [t.id for t in await tokens.list("acme")] == [reader.token.id]
    assert (await tokens.get(reader.token.id)).permissions == frozenset({"read", "publish"})

    # Another node's store (its own verified-token cache) sees the revocation at once.
    other = TokenStore(await db.node(), 3600.0, 60.0, 7200.0)
    revoked = await tokens.revoke(reader.token.id)
    assert revoked.revoked_at is not None
    assert (await tokens.revoke(reader.token.id)).revoked_at == revoked.revoked_at  # kept, not moved
    for store in (tokens, other):
        with pytest.raises(Unauthorized, match="revoked"):
            await store.verify(reader.secret)
    assert (await other.verify(admin.secret)).id == admin.token.id


async def test_audit_chain_appends_verifies_and_refuses_changes(index: Index) -> None:
    audit = AuditLog(index, fetches="all")
    audit.record("publish", domain="acme", repository="main", package="é", version="1.0", detail={"n": 1.5})
    audit.record("delete", result="denied", domain="acme", package="b")
    audit.fetch("MISS", domain="acme", package="c")
    await audit.flush()
    audit.record("publish", domain="other", package="d")
    await audit.flush()
    assert await audit.verify() == (True, 4, "")
    rows = await audit.query()
    assert [r["action"] for r in rows] == ["publish", "delete", "fetch", "publish"]
    assert rows[0]["prev_hash"] == GENESIS
    assert all(b["prev_hash"] == a["hash"] for a, b in itertools.pairwise(rows))
    assert rows[0]["detail"] == {"n": 1.5} and rows[0]["package"] == "é"
    assert [r["package"] for r in await audit.query(domain="acme")] == ["é", "b", "c"]
    assert [r["action"] for r in await audit.query(action="publish", limit=1)] == ["publish"]
    assert await audit.query(since=rows[-1]["at"] + 1) == []

    # Append-only on both: the database refuses to change or remove a record.
    for statement in ("UPDATE audit SET principal='mallory' WHERE seq=?", "DELETE FROM audit WHERE seq=?"):
        with pytest.raises(Exception, match="append-only"):
            async with index.transaction():
                await index.db.execute(statement, (rows[1]["seq"],))
    assert await audit.query() == rows
    assert await audit.verify() == (True, 4, "")


async def test_policies_grants_replace_and_load(db: Database, index: Index) -> None:
    policies = Policies(index)
    await policies.load()
    assert policies.permits("anyone", "acme", "main", "publish")  # no grants: tokens decide
    await policies.replace(
        "acme",
        [Grant("ci", frozenset({"read", "publish"}), "main"), Grant("*", frozenset({"read"}))],
    )
    assert policies.permits("ci", "acme", "main", "publish")
    assert not policies.permits("ci", "acme", "other", "publish")
    assert policies.permits("someone", "acme", "other", "read")
    assert policies.permits("someone", "zeta", "other", "delete")
    # Another node loads the same grants.
    other = Policies(await db.node())
    await other.load()
    key = lambda g: (g.principal, g.repository)  # noqa: E731
    assert sorted(other.grants("acme"), key=key) == sorted(policies.grants("acme"), key=key)
    assert len(other.grants("acme")) == 2
    await policies.replace("acme", [Grant("admin", frozenset({"admin"}))])
    await other.load()
    assert other.grants("acme") == [Grant("admin", frozenset({"admin"}))]
    assert not other.permits("ci", "acme", "main", "read") and other.permits("admin", "acme", "x", "delete")


# --- dependencies ---------------------------------------------------------------------------


async def test_dependencies_record_once_and_read(index: Index) -> None:
    deps = DependencyStore(index)
    declared = [
        Declared("beta", ">=1.0", "runtime", "security,tests", 'python_version >= "3.9"'),
        Declared("alpha", "", "runtime"),
        Declared("é", "^2", "peerDependencies"),
    ]
    await deps.record(digest(1).hex, "pypi", declared)
    await deps.record(digest(1).hex, "pypi", [Declared("ignored", "", "runtime")])  # once only
    await deps.record(digest(2).hex, "npm", [], error="package.json: not JSON")
    await deps.record(digest(3).hex, "npm", [])
    assert await deps.read_digests([digest(n).hex for n in (1, 2, 3, 4)]) == {
        digest(n).hex for n in (1, 2, 3)
    }
    found = await deps.declared([digest(1).hex, digest(3).hex, digest(4).hex])
    assert found == {digest(1).hex: declared, digest(3).hex: [], digest(4).hex: []}
    assert await deps.errors([digest(n).hex for n in (1, 2, 3)]) == {digest(2).hex: "package.json: not JSON"}

    await index.add_assets(
        [
            asset("b", "b-2.whl", digest(5), version="2"),
            asset("a", "a-1.whl", digest(6), version="1", hosted=True),
            asset("a", "a.meta", digest(7), version=None),
        ]
    )
    held = await deps.held_files([REPO, OTHER], "pypi")
    assert [(h.package, h.version, h.filename, h.hosted) for h in held] == [
        ("a", "1", "a-1.whl", True),
        ("b", "2", "b-2.whl", False),
    ]
    assert [h.digest for h in await deps.held_files([REPO], "pypi", "b")] == [digest(5).hex]


async def test_lifecycle_stats_and_gc_evict_the_least_recently_used_cached_rows(
    index: Index, tmp_path: Path
) -> None:
    blobs = LocalBlobStore(tmp_path / "blobs")
    await asyncio.to_thread(blobs.prepare)
    size = 1000
    records = [
        asset("old", "old.whl", digest(1), size=size),
        asset("mid", "mid.whl", digest(2), size=size),
        asset("new", "new.whl", digest(3), size=size),
        asset("pub", "pub.whl", digest(4), size=size, hosted=True),
        asset("big", "big.whl", digest(5), size=2**40, repo=OTHER, hosted=True),
    ]
    for rec in records[:4]:
        path = blobs.local_path(rec.digest)
        await asyncio.to_thread(path.parent.mkdir, exist_ok=True)
        await asyncio.to_thread(path.write_bytes, b"x" * size)
    assert await index.add_assets(records) == []
    for n, name in enumerate(("pub", "old", "mid", "new")):  # pub is the least recent of all
        await index.touch_assets([(REPO, "pypi", name, f"{name}.whl")], 1000.0 + n)

    stats = await lifecycle.stats(index, blobs)
    assert stats["repositories"] == [
        {
            "repository": "acme/main",
            "format": "pypi",
            "hosted_files": 1,
            "cached_files": 3,
            "bytes": 4 * size,
        },
        {"repository": "acme/other", "format": "pypi", "hosted_files": 1, "cached_files": 0, "bytes": 2**40},
    ]
    assert (stats["blobs"], stats["blob_bytes"]) == (4, 4 * size)

    report = await lifecycle.gc(index, blobs, budget=2 * size + size // 2)
    assert [e["package"] for e in report.evicted] == ["old", "mid"]
    assert report.blobs_deleted == 2 and report.after == 2 * size
    assert [p for _, p in await index.stored_packages(REPO)] == ["new", "pub"]
    assert await index.get_asset(OTHER, "pypi", "big", "big.whl") is not None


# --- transactions and values ----------------------------------------------------------------


async def test_an_exception_in_a_transaction_rolls_back_all_of_it(index: Index) -> None:
    catalog = Catalog(index)
    await catalog.put_domain("kept")

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        async with index.transaction():
            await index.db.execute("INSERT INTO domains (name, created_at) VALUES (?, ?)", ("gone", 1.0))
            await index.db.execute(ASSET_INSERT, asset_params(asset("p", "p.whl", digest(1)), 1.0))
            await index.db.execute("DELETE FROM domains WHERE name=?", ("kept",))
            assert await scalar(index, "SELECT COUNT(*) FROM assets") == 1  # seen inside
            raise Boom
    assert await catalog.domains() == ["kept"]
    assert await index.get_asset(REPO, "pypi", "p", "p.whl") is None
    # A failing statement rolls back what came before it too, and the index stays usable.
    with pytest.raises(Exception):  # noqa: B017 - sqlite3.IntegrityError or asyncpg's
        async with index.transaction():
            await index.db.execute("INSERT INTO domains (name, created_at) VALUES (?, ?)", ("half", 1.0))
            await index.db.execute("INSERT INTO domains (name, created_at) VALUES (?, ?)", ("kept", 1.0))
    assert await catalog.domains() == ["kept"]
    assert await catalog.put_domain("after") is True


# --- several nodes on one database ----------------------------------------------------------


async def test_two_nodes_read_each_others_commits(db: Database, index: Index) -> None:
    a, b = index, await db.node()
    await Catalog(a).put_domain("acme")
    assert await Catalog(b).domains() == ["acme"]
    rec = asset("p", "p.whl", digest(1), fetched_at=12.5)
    assert await b.add_assets([rec]) == []
    assert await a.get_asset(REPO, "pypi", "p", "p.whl") == rec
    await a.put_negative("up", "k", 9.0)
    assert await b.get_negative("up", "k") == 9.0
    assert await a.schema_version() == await b.schema_version() == SCHEMA_VERSION


async def test_concurrent_add_assets_of_one_key_from_two_nodes_one_wins(db: Database, index: Index) -> None:
    a, b = index, await db.node()
    for n in range(6):
        mine = asset("race", f"race-{n}.whl", digest(2 * n + 1), size=1)
        theirs = replace(mine, digest=digest(2 * n + 2), size=2)
        conflicts_a, conflicts_b = await asyncio.gather(a.add_assets([mine]), b.add_assets([theirs]))
        stored = await a.get_asset(REPO, "pypi", "race", mine.filename)
        assert stored is not None and stored.digest in (mine.digest, theirs.digest)
        winner, loser_conflicts = (
            (mine, conflicts_b) if stored.digest == mine.digest else (theirs, conflicts_a)
        )
        assert sorted([len(conflicts_a), len(conflicts_b)]) == [0, 1]
        assert loser_conflicts == [replace(winner, fetched_at=stored.fetched_at)]
        assert await b.get_asset(REPO, "pypi", "race", mine.filename) == stored


async def test_audit_appends_from_two_nodes_keep_one_chain(db: Database, index: Index) -> None:
    logs = [AuditLog(index), AuditLog(await db.node())]
    for round_ in range(5):
        for n, log in enumerate(logs):
            for k in range(3):
                log.record("publish", package=f"node{n}-r{round_}-{k}")
        await asyncio.gather(*(log.flush() for log in logs))
    for log in logs:
        assert await log.verify() == (True, 30, "")
    rows = await logs[1].query()
    assert {r["package"] for r in rows} == {
        f"node{n}-r{r}-{k}" for n in (0, 1) for r in range(5) for k in range(3)
    }
    prev = GENESIS
    for row in rows:  # one chain: each record names the one before it
        assert row["prev_hash"] == prev
        prev = row["hash"]
    # The first record hashed again here, independently of ``verify``.
    first = AuditEvent(**{k: rows[0][k] for k in AuditEvent.__dataclass_fields__})
    assert chain_hash(GENESIS, first) == rows[0]["hash"]


async def test_a_shared_commit_on_one_node_moves_the_others_change_counter(
    db: Database, index: Index, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Node B polls the PostgreSQL counter only every minute: what it hears within the bounded
    # waits below it hears by NOTIFY (a poll is the fallback for a lost connection).
    monkeypatch.setattr(postgres, "POLL_INTERVAL", 60.0)
    a, b = index, await db.node()
    assert a.changes is not None and b.changes is not None
    assert a.changes.is_open and b.changes.is_open
    assert not b.changes.changed() and not a.changes.changed()

    # Bookkeeping nobody caches (shared=False) is not announced.
    await a.touch_assets([(REPO, "pypi", "p", "p.whl")], 1.0)
    await a.put_document(DocumentRow("up", "k", "u", b"", "t", None, None, None, 1.0, 2.0))
    await Leases(a).acquire("gc", "node-a", 60.0)
    await asyncio.sleep(0.5 if db.backend == "postgresql" else 0.05)  # a NOTIFY would be here
    assert not b.changes.changed() and not a.changes.changed()

    # A publish is: the other node learns of it within a bounded wait; the writer, which
    # dropped what it changed itself, does not count its own commit as news.
    before = b.changes.read()
    await Catalog(a).put_domain("acme")
    assert await eventually(b.changes.changed), "node B never heard of node A's commit"
    assert b.changes.read() > before
    assert not a.changes.changed()
    b.changes.seen = b.changes.read()  # what server/changes.py does once it has reloaded
    assert not b.changes.changed()

    # And the other way round.
    await Catalog(b).put_domain("zeta")
    assert await eventually(a.changes.changed)
    assert not b.changes.changed()


# --- migrations -----------------------------------------------------------------------------


async def applied_steps(index: Index) -> list[int]:
    """The migration steps recorded as applied, each as often as it was recorded."""
    if index.dialect == "postgresql":
        async with index.db.execute("SELECT version FROM schema_version ORDER BY version") as cur:
            return [int(r[0]) for r in await cur.fetchall()]
    # SQLite records only the newest (PRAGMA user_version); a step run twice would have failed
    # on its CREATE TABLE, so the steps up to it are each applied once.
    return list(range(1, await index.schema_version() + 1))


async def test_migrations_run_once_when_opened_again(db: Database, index: Index) -> None:
    assert await index.schema_version() == SCHEMA_VERSION
    assert await applied_steps(index) == list(range(1, SCHEMA_VERSION + 1))
    await Catalog(index).put_domain("acme")
    await index.close()
    db.opened.remove(index)
    again = await db.node()  # re-running any step would fail (CREATE TABLE) or lose data
    third = await db.node()
    for node in (again, third):
        assert await node.schema_version() == SCHEMA_VERSION
        assert await applied_steps(node) == list(range(1, SCHEMA_VERSION + 1))
        assert await Catalog(node).domains() == ["acme"]


async def test_nodes_started_together_on_a_fresh_database_all_migrate(db: Database) -> None:
    """Cluster nodes (or a node and the CLI beside it) started at once on a new database: each
    step runs once, whoever runs it, and every node comes up at the newest schema."""
    nodes = [db.build() for _ in range(3)]
    db.opened.extend(nodes)
    await asyncio.gather(*(node.open() for node in nodes))
    for node in nodes:
        assert await node.schema_version() == SCHEMA_VERSION
        assert await applied_steps(node) == list(range(1, SCHEMA_VERSION + 1))
    await Catalog(nodes[0]).put_domain("acme")
    assert await Catalog(nodes[2]).domains() == ["acme"]
