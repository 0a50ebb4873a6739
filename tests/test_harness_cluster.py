"""Self-test of the scale-out test harness: the throw-away PostgreSQL server and the cluster launcher.

The PostgreSQL tests prove the fixture gives each test a database of its own on a server that
really runs (queries, advisory locks across sessions, LISTEN/NOTIFY: what the shared index is
built on) and that a dropped database is gone; the cluster tests prove the launcher starts
several real proxy processes on one config, each serving on its own port and data directory,
and that killing one leaves the others serving and stopping them ends every process.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tomllib
from pathlib import Path

import aiohttp
import pytest

from tests.cluster import (
    StartCluster,
    bucket_keys,
    s3_storage,
    to_toml,
    use_fake_aws,
)
from tests.conftest import Dists
from tests.fakes.dists import sha256_file
from tests.fakes.pypi import FakePyPI
from tests.postgres import Postgres, connect, create_database, drop_database
from tests.s3_server import MotoServer


async def test_each_test_gets_a_fresh_database_with_advisory_locks(postgres_dsn: str) -> None:
    async with connect(postgres_dsn) as a, connect(postgres_dsn) as b:
        assert await a.fetchval("SELECT 1") == 1
        assert await a.fetchval("SELECT current_database()") == postgres_dsn.rsplit("/", 1)[1]
        # Empty: no table of a previous test (or of the proxy's migrations) is there.
        assert await a.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 0
        await a.execute("CREATE TABLE t (x int)")
        assert await b.fetchval("SELECT count(*) FROM t") == 0
        # Advisory locks exclude across sessions: what the cluster's single-flight relies on.
        key = 12_345
        assert await a.fetchval("SELECT pg_try_advisory_lock($1)", key) is True
        assert await b.fetchval("SELECT pg_try_advisory_lock($1)", key) is False
        waiter = asyncio.create_task(b.fetchval("SELECT pg_advisory_lock($1)", key))
        await asyncio.sleep(0.2)
        assert not waiter.done()  # b waits on a's lock ...
        assert await a.fetchval("SELECT pg_advisory_unlock($1)", key) is True
        await asyncio.wait_for(waiter, 10)  # ... and gets it once a lets go
        assert await a.fetchval("SELECT pg_try_advisory_lock($1)", key) is False
        # A transaction-level lock is released by the commit (the index's write lock).
        async with a.transaction():
            await a.execute("SELECT pg_advisory_xact_lock(7)")
            assert await b.fetchval("SELECT pg_try_advisory_xact_lock(7)") is False
        assert await b.fetchval("SELECT pg_try_advisory_xact_lock(7)") is True
        # LISTEN/NOTIFY between sessions: the cache invalidation's channel.
        heard: asyncio.Queue[str] = asyncio.Queue()
        await b.add_listener("changes", lambda *args: heard.put_nowait(args[3]))
        await a.execute("SELECT pg_notify('changes', '42')")
        assert await asyncio.wait_for(heard.get(), 10) == "42"


async def test_databases_are_created_apart_and_dropped(postgres_server: Postgres) -> None:
    name = postgres_server.next_database_name()
    dsn = await create_database(postgres_server.dsn, name)
    async with connect(dsn) as conn:
        await conn.execute("CREATE TABLE kept (x int)")
    async with connect(postgres_server.dsn) as admin:
        assert await admin.fetchval("SELECT count(*) FROM pg_database WHERE datname = $1", name) == 1
        # A session still open on it (a killed node's) does not stop the drop.
        async with connect(dsn):
            await drop_database(postgres_server.dsn, name)
        assert await admin.fetchval("SELECT count(*) FROM pg_database WHERE datname = $1", name) == 0
    assert name != postgres_server.next_database_name()


def test_the_server_runs_as_the_postgres_user_when_we_are_root(postgres_server: Postgres) -> None:
    from tests.postgres import PostgresServer

    if not isinstance(postgres_server, PostgresServer):
        pytest.skip("an external server (ARTIFACT_PROXY_TEST_POSTGRES): not started here")
    status = Path(f"/proc/{postgres_server.pid}/status").read_text()
    uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
    assert uid != 0  # PostgreSQL refuses root; as root we run it as `postgres`, else as ourselves
    if os.geteuid() != 0:
        assert uid == os.geteuid()
    assert postgres_server.root is not None
    assert (postgres_server.root / "data" / "PG_VERSION").exists()


def test_config_documents_round_trip_through_toml() -> None:
    doc = {
        "server": {"listen": "127.0.0.1:1", "data_dir": '/tmp/a b/"q"', "auth": False, "workers": 2},
        "index": {"url": "postgresql://u:p%40ss@127.0.0.1:5432/db"},
        "upstreams": {"fake.one": {"format": "pypi", "url": "http://127.0.0.1:2/simple/", "retries": 0}},
        "domains": [
            {"name": "default", "repositories": [{"name": "a", "upstreams": ["fake.one"]}, {"name": "b"}]},
            {"name": "other", "repositories": [{"name": "c", "upstreams": []}]},
        ],
    }
    assert tomllib.loads(to_toml(doc)) == doc


async def _simple(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with http.get(f"{url}/default/pypi/public/simple/alpha/") as resp:
        return resp.status, await resp.text()


async def test_two_nodes_start_serve_and_stop(
    cluster_factory: StartCluster, pypi: FakePyPI, tmp_path: Path
) -> None:
    cluster = await cluster_factory(2, upstream_url=pypi.url)
    a, b = cluster
    assert a.url != b.url and a.data_dir != b.data_dir and a.pid != b.pid
    async with aiohttp.ClientSession() as http:
        for node in cluster:
            status, body = await _simple(http, node.url)
            assert status == 200, await node.log_tail()
            assert "alpha-1.0-py3-none-any.whl" in body
        # Each node has its own data directory (its own SQLite index without [index] url).
        for node in cluster:
            assert await asyncio.to_thread((node.data_dir / "index.sqlite3").exists)
        # A node killed outright: the other serves on.
        await a.kill()
        assert a.proc is not None and a.proc.returncode == -9
        with pytest.raises(aiohttp.ClientConnectionError):
            await _simple(http, a.url)
        assert (await _simple(http, b.url))[0] == 200
    await cluster.stop()
    assert b.proc is not None and b.proc.returncode == 0  # SIGTERM: a clean exit


async def test_nodes_started_together_share_the_bucket(
    cluster_factory: StartCluster,
    moto_s3: MotoServer,
    pypi: FakePyPI,
    dists: Dists,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_fake_aws(monkeypatch)
    storage = await s3_storage(moto_s3.endpoint, "harness", prefix="h/")
    cluster = await cluster_factory(2, upstream_url=pypi.url, storage=storage, together=True)
    digest = await asyncio.to_thread(sha256_file, dists.beta)
    async with aiohttp.ClientSession() as http:
        for node in cluster:
            async with http.get(f"{node.url}/default/pypi/public/simple/beta/") as resp:
                assert resp.status == 200, await node.log_tail()  # a file is served once listed
            async with http.get(node.files_url("beta", dists.beta.name)) as resp:
                assert resp.status == 200, (await resp.text(), await node.log_tail())
                body = await resp.read()
            assert hashlib.sha256(body).hexdigest() == digest
    # The first node stored it in the one bucket the [storage] table named, under its prefix;
    # the second (its own index knows nothing of it) found it there, not upstream.
    assert f"h/sha256/{digest}" in await bucket_keys(moto_s3.endpoint, "harness", "h/")
    assert pypi.hits[f"/files/{dists.beta.name}"] == 1
    for node in cluster:  # ... and each keeps a copy in its own disk cache
        assert await asyncio.to_thread(_cached, node.data_dir, digest) == [digest]


def _cached(data_dir: Path, digest: str) -> list[str]:
    return [p.name for p in data_dir.rglob(digest) if p.is_file()]
