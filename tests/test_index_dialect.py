"""Where the two index dialects differ, on both backends: the SQLite file of one machine and the
PostgreSQL database a cluster shares. Each test is a difference found by running the in-process
suite with ``ARTIFACT_PROXY_TEST_ALL_ON_POSTGRES`` set, kept here so that CI (which runs the
suite on SQLite) sees it on PostgreSQL too.

- gc reads its eviction candidates in pages (``LIMIT ? OFFSET ?`` over the LRU order). Rows
  written in one batch (a cache fill of a file and its checksums, a bundle import, a migration)
  share their ``last_accessed`` and ``fetched_at``. SQLite returns such ties in the same order
  whatever the LIMIT; PostgreSQL's top-N sort does not, so unless the order ends with a unique
  key, the pages of one gc overlap and skip rows: a row counted twice lets gc believe a blob
  unreferenced (and the store under budget) while another row, never read, still holds it.
- PostgreSQL's TEXT cannot hold a NUL character, nor its ``json`` functions a ``\\u0000``;
  SQLite's can. The dependencies an archive declares are the upstream's text: one package.json
  naming a dependency with a NUL made every dependency query of its repository, and so every
  quarantine there, a 500 on PostgreSQL alone. A version's attributes hold what a publisher
  wrote: an npm deprecation message with a NUL was a 500 there, and one stored at publish would
  have made every later update of that version fail.
"""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from proxy.app import open_index
from proxy.config import Overrides, parse_config
from proxy.model import AssetRecord, Digest, RepoRef
from proxy.storage import lifecycle
from proxy.storage.index import ASSET_INSERT, Index, asset_params
from proxy.storage.local import LocalBlobStore
from tests.conftest import proxy_config, serve_config
from tests.fakes.npm import FakeNpmRegistry
from tests.npm_clients import npm_publish_doc

API = "/-/api/v1/domains/default/repositories"


# More than the first pages of gc (500, then 2000, then 8000 rows): on PostgreSQL 15, 6000 rows
# of equal times are enough for the pages of an order without a unique key to overlap.
ROWS = 6000
SIZE = 1000
REPO = RepoRef("acme", "main")


@pytest.fixture(params=["sqlite", "postgresql"])
def index_url(request: pytest.FixtureRequest) -> str | None:
    """A fresh PostgreSQL database (``postgres_dsn``; skips where there is no server), or None for
    the data directory's SQLite file. Synchronous: the server starts outside the event loop."""
    return str(request.getfixturevalue("postgres_dsn")) if request.param == "postgresql" else None


@pytest.fixture
async def index(index_url: str | None, tmp_path: Path) -> AsyncIterator[Index]:
    """The index ``open_index`` builds for that backend."""
    raw: dict[str, object] = {"server": {"data_dir": str(tmp_path / "data")}}
    if index_url is not None:
        raw["index"] = {"url": index_url, "pool_size": 2}
    await asyncio.to_thread((tmp_path / "data").mkdir)
    # An empty environment: ARTIFACT_PROXY_INDEX_URL in the test's own must not move it.
    opened = open_index(parse_config(raw, Overrides(), {}))
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


@pytest.mark.timeout(60)
async def test_gc_evicts_each_of_many_rows_of_equal_age_exactly_once(index: Index, tmp_path: Path) -> None:
    blobs = LocalBlobStore(tmp_path / "blobs")
    await asyncio.to_thread(blobs.prepare)
    shared = Digest("ab" * 32)  # every row holds the same blob: it may go only with the last row
    path = blobs.local_path(shared)
    await asyncio.to_thread(path.parent.mkdir, exist_ok=True)
    await asyncio.to_thread(path.write_bytes, b"x" * SIZE)
    now = time.time()
    rows = [
        asset_params(
            AssetRecord(
                repo=REPO,
                format="pypi",
                package=f"p{n:05d}",
                filename=f"p{n:05d}-1.0.whl",
                digest=shared,
                size=SIZE,
                content_type="application/octet-stream",
                version="1.0",
                origin_url=None,
                upstream=None,
                hosted=False,
                fetched_at=now,
            ),
            now,
        )
        for n in range(ROWS)
    ]
    async with index.transaction():
        await index.db.executemany(ASSET_INSERT, rows)

    report = await lifecycle.gc(index, blobs, budget=0)

    evicted = [e["package"] for e in report.evicted]
    assert len(evicted) == len(set(evicted)), "a row was read in two pages"
    async with index.db.execute("SELECT package FROM assets") as cur:
        left = [str(r[0]) for r in await cur.fetchall()]
    assert left == [], f"{len(left)} rows never read by gc, e.g. {left[:3]}"
    assert len(evicted) == ROWS
    assert report.blobs_deleted == 1 and report.after == 0
    assert not await asyncio.to_thread(path.exists)


def npm_tarball(dest: Path, name: str, version: str, dependencies: dict[str, str]) -> Path:
    """A package tarball as ``npm pack`` lays it out (``package/package.json``); blocking."""
    manifest = {"name": name, "version": version, "dependencies": dependencies}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = json.dumps(manifest).encode()
        info = tarfile.TarInfo("package/package.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"{name}-{version}.tgz"
    path.write_bytes(buf.getvalue())
    return path


async def test_a_dependency_named_with_a_nul_never_breaks_the_dependency_queries(
    index_url: str | None, tmp_path: Path
) -> None:
    registry = FakeNpmRegistry()
    await registry.start()
    runner = None
    try:
        for name, version, deps in (
            ("evil", "6.6.6", {}),
            ("lib", "1.0.0", {"evil": "^6.6.0", "ev\u0000il": "^1.0.0\u0000"}),
        ):
            path = await asyncio.to_thread(npm_tarball, tmp_path / "dists", name, version, deps)
            await registry.add_version_async(name, path, version=version, dependencies=deps)
        raw = proxy_config(tmp_path / "data", registry.url, fmt="npm")
        if index_url is not None:
            raw["index"] = {"url": index_url}
        _, runner, url = await serve_config(raw)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/default/npm/public/lib/-/lib-1.0.0.tgz") as resp:
                assert resp.status == 200
                await resp.read()
            # Quarantining is the answer to a malicious package: it must not fail because some
            # held manifest is odd. Its answer lists the held versions that depend on it.
            put = f"{url}{API}/public/quarantine/npm"
            async with http.put(put, json={"pattern": "evil@6.6.6", "reason": "malware"}) as resp:
                assert resp.status == 200, await resp.text()
                answer = await resp.json()
            assert [(d["package"], d["version"]) for d in answer["dependents"]["dependents"]] == [
                ("lib", "1.0.0")
            ]
            deps_url = f"{url}{API}/public/packages/npm/lib/versions/1.0.0/dependencies"
            async with http.get(deps_url) as resp:
                assert resp.status == 200, await resp.text()
                declared = {(d["package"], d["range"]) for d in (await resp.json())["dependencies"]}
        # The NUL is stored (and shown) as U+FFFD on both backends: the same answer from either.
        assert declared == {("evil", "^6.6.0"), ("ev\ufffdil", "^1.0.0\ufffd")}
    finally:
        if runner is not None:
            await runner.cleanup()
        await registry.close()


async def test_a_deprecation_message_with_a_nul_is_kept_alike_on_both_backends(
    index_url: str | None, tmp_path: Path
) -> None:
    raw = proxy_config(tmp_path / "data", "http://127.0.0.1:9/", fmt="npm")
    if index_url is not None:
        raw["index"] = {"url": index_url}
    _, runner, url = await serve_config(raw)
    try:
        tarball = await asyncio.to_thread(npm_tarball, tmp_path / "dists", "kept", "1.0.0", {})
        data = await asyncio.to_thread(tarball.read_bytes)
        packument = f"{url}/default/npm/team/kept"
        async with aiohttp.ClientSession() as http:
            async with http.put(packument, json=npm_publish_doc("kept", "1.0.0", data)) as resp:
                assert resp.status == 201, await resp.text()
            # Deprecated with a NUL, then again: the version's attributes stay updatable.
            for message, shown in (("do not use\u0000 this", "do not use\ufffd this"), ("use 2", "use 2")):
                manifest = {"name": "kept", "version": "1.0.0", "deprecated": message}
                doc = {"name": "kept", "versions": {"1.0.0": manifest}}
                async with http.put(packument, json=doc) as resp:  # npm deprecate
                    assert resp.status == 200, await resp.text()
                async with http.get(packument) as resp:
                    assert resp.status == 200
                    assert (await resp.json())["versions"]["1.0.0"].get("deprecated") == shown
    finally:
        await runner.cleanup()


async def test_text_the_database_cannot_store_is_a_400_not_a_500(
    index_url: str | None, tmp_path: Path
) -> None:
    """A repository description with a NUL: SQLite stores it, PostgreSQL's text cannot hold it;
    there the client is told why (400 JSON), never a 500, and nothing half-made is left."""
    raw = proxy_config(tmp_path / "data", "http://127.0.0.1:9/")
    if index_url is not None:
        raw["index"] = {"url": index_url}
    _, runner, url = await serve_config(raw)
    try:
        api = f"{url}/-/api/v1/domains/default/repositories"
        async with aiohttp.ClientSession() as http:
            async with http.post(api, json={"name": "nul", "description": "a\u0000b"}) as resp:
                body = await resp.json()
                if index_url is None:
                    assert resp.status == 201, body
                else:
                    assert resp.status == 400, body
                    assert body["error"] == "bad_request" and "NUL" in body["message"], body
            async with http.get(f"{api}/nul") as resp:
                assert resp.status == (200 if index_url is None else 404)
    finally:
        await runner.cleanup()


async def test_the_index_size_metric_measures_either_backend(index_url: str | None, tmp_path: Path) -> None:
    """``artifact_proxy_index_bytes``: the SQLite file and its WAL, or the PostgreSQL database."""
    raw = proxy_config(tmp_path / "data", "http://127.0.0.1:9/")
    if index_url is not None:
        raw["index"] = {"url": index_url}
    _, runner, url = await serve_config(raw)
    try:
        async with aiohttp.ClientSession() as http, http.get(f"{url}/-/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
        sizes = [
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("artifact_proxy_index_bytes ")
        ]
        assert len(sizes) == 1 and sizes[0] > 0, sizes
        help_line = next(
            line for line in text.splitlines() if line.startswith("# HELP artifact_proxy_index_bytes")
        )
        assert ("PostgreSQL" in help_line) == (index_url is not None), help_line
    finally:
        await runner.cleanup()
