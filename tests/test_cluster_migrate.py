"""``artifact-proxy cluster migrate``: a single node's data directory into PostgreSQL and a bucket.

A real single-node proxy (in-process, local storage, auth on) gets a published wheel, a published
npm package, a cached upstream wheel, tokens and audit records; it is stopped and the CLI runs as
a subprocess against a fresh PostgreSQL database (tests/postgres.py) and moto's S3 server
(tests/s3_server.py). A real node then starts on the migrated index and bucket, with its upstream
gone, and serves all of it: pip installs both packages, the old token works, the audit chain
verifies. The refusals (source in use, target not empty, sealed blobs without the key),
``--merge`` (nothing duplicated, a conflicting asset reported, not applied), ``--dry-run``, runs
that fail or are killed in either phase then a re-run, a corrupt source blob, and encryption at
rest (sealed blobs stay sealed in the bucket) are tried too.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from proxy.config import StorageConfig
from proxy.model import Digest
from proxy.storage.crypto import MAGIC, Sealer, StaticKeys, plain_size
from proxy.storage.postgres import WRITE_LOCK, PostgresIndex
from proxy.storage.s3 import S3BlobStore, S3Client
from tests.clients import installed, pip_install, upload_form
from tests.cluster import StartCluster, bucket_keys, s3_storage, to_toml, use_fake_aws
from tests.conftest import Dists, ProxyFactory, RunningProxy, proxy_config
from tests.fakes.dists import build_wheel, sha256_file
from tests.fakes.pypi import FakePyPI
from tests.faults.crashkit import npm_tarball
from tests.npm_clients import npm_publish_doc
from tests.s3_server import FAKE_ENV, MotoServer

ADMIN = "migrate-bootstrap-admin-" + "m" * 40
TABLES_SKIPPED = {"leases", "shared_credentials"}


@dataclass
class Source:
    """The single node, stopped, and what it was given."""

    data_dir: Path
    token: str  # read + publish on domain default
    wheel: Path  # published to public
    npm_data: bytes  # the tarball of "migr-pkg" 1.0.0, published to public
    cached: str  # sha256 of the upstream wheel (beta) cached through public
    extra_wheels: list[Path]


def _basic(token: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"aws:{token}".encode()).decode()}


async def _single_node(
    proxy_factory: ProxyFactory,
    pypi: FakePyPI,
    dists: Dists,
    http: aiohttp.ClientSession,
    root: Path,
    *,
    extra: int = 0,
    **server: Any,
) -> tuple[RunningProxy, Source]:
    """A running single node with published and cached packages, a token and audit records."""
    admin_file = root / "admin-token"
    await asyncio.to_thread(root.mkdir, parents=True, exist_ok=True)
    await asyncio.to_thread(admin_file.write_text, ADMIN + "\n")
    node = await proxy_factory(
        pypi.url, data_dir=root / "source", auth=True, admin_token_file=str(admin_file), **server
    )
    body = {
        "domain": "default",
        "repository": None,
        "principal": "ci",
        "permissions": ["read", "publish"],
        "duration": "12h",
    }
    async with http.post(
        node.url + "/-/api/v1/tokens", json=body, headers={"Authorization": f"Bearer {ADMIN}"}
    ) as resp:
        assert resp.status == 201, await resp.text()
        token = str((await resp.json())["token"])
    auth = _basic(token)

    async def publish(name: str, version: str, payload: int = 0) -> Path:
        wheel = await asyncio.to_thread(build_wheel, root, name, version, payload_size=payload)
        data = await asyncio.to_thread(wheel.read_bytes)
        form = upload_form(wheel, data, name=name, version=version)
        async with http.post(node.upload_url("public"), data=form, headers=auth) as resp:
            assert resp.status in {200, 201}, await resp.text()
        return wheel

    wheel = await publish("internal-tool", "1.0")
    extra_wheels = [await publish(f"extra-{i}", "1.0", payload=64 * 1024) for i in range(extra)]
    npm_data = await asyncio.to_thread(npm_tarball, "migr-pkg", "1.0.0", 1000)
    async with http.put(
        f"{node.url}/default/npm/public/migr-pkg",
        json=npm_publish_doc("migr-pkg", "1.0.0", npm_data),
        headers=auth,
    ) as resp:
        assert resp.status in {200, 201}, await resp.text()
    # An upstream file cached through the node, and its page (pip installs it offline later).
    async with http.get(node.simple() + "beta/", headers=auth) as resp:
        assert resp.status == 200
    async with http.get(node.files("beta", dists.beta.name), headers=auth) as resp:
        assert resp.status == 200
        cached = hashlib.sha256(await resp.read()).hexdigest()
    assert cached == await asyncio.to_thread(sha256_file, dists.beta)
    async with http.get(node.files("beta", dists.beta.name + ".metadata"), headers=auth) as resp:
        assert resp.status == 200  # pip reads it first (PEP 658), so a warm cache has it
    return node, Source(root / "source", token, wheel, npm_data, cached, extra_wheels)


async def _target_config(
    root: Path,
    upstream: str,
    dsn: str | None,
    storage: dict[str, Any],
    name: str = "cluster.toml",
    **server: Any,
) -> Path:
    """The cluster's config file: [index] url (unless None) and [storage] (the CLI's target)."""
    document = proxy_config(root / "cli-data", upstream, auth=True, **server)
    if dsn is not None:
        document["index"] = {"url": dsn}
    document["storage"] = storage
    path = root / name
    await asyncio.to_thread(path.write_text, to_toml(document), encoding="utf-8")
    return path


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.out)
        return data


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "proxy", *args]


async def _cli(*args: str, timeout: float = 60) -> Run:
    proc = await asyncio.create_subprocess_exec(
        *_command(*args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


async def _migrate(config: Path, source: Path, *extra: str) -> Run:
    return await _cli("cluster", "migrate", "--config", str(config), "--from", str(source), *extra)


def _sqlite_counts(data_dir: Path) -> dict[str, int]:
    with contextlib.closing(sqlite3.connect(data_dir / "index.sqlite3")) as db:
        names = [
            str(r[0])
            for r in db.execute(
                "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'"
            )
        ]
        return {
            n: int(db.execute(f'SELECT count(*) FROM "{n}"').fetchone()[0])
            for n in names
            if n not in TABLES_SKIPPED
        }


def _sqlite_rows(data_dir: Path, sql: str) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(data_dir / "index.sqlite3")) as db:
        return [tuple(r) for r in db.execute(sql)]


async def _pg_counts(dsn: str, tables: list[str]) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        out = {}
        for table in tables:
            exists = await conn.fetchval("SELECT to_regclass($1)", table)
            out[table] = int(await conn.fetchval(f'SELECT count(*) FROM "{table}"')) if exists else 0
        return out
    finally:
        await conn.close()


async def _pg_rows(dsn: str, sql: str) -> list[tuple[Any, ...]]:
    conn = await asyncpg.connect(dsn)
    try:
        return [tuple(r) for r in await conn.fetch(sql)]
    finally:
        await conn.close()


async def test_a_node_on_the_migrated_index_and_bucket_serves_everything(
    proxy_factory: ProxyFactory,
    cluster_factory: StartCluster,
    pypi: FakePyPI,
    dists: Dists,
    http: aiohttp.ClientSession,
    postgres_dsn: str,
    moto_s3: MotoServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    use_fake_aws(monkeypatch)
    single, source = await _single_node(proxy_factory, pypi, dists, http, tmp_path)
    storage = await s3_storage(moto_s3.endpoint, "migrate-main", prefix="m/")
    config = await _target_config(tmp_path, pypi.url, postgres_dsn, storage)

    # While the single node runs, the migration refuses and writes nothing.
    busy = await _migrate(config, source.data_dir)
    assert busy.code == 1 and "is in use" in busy.err, busy
    assert await bucket_keys(moto_s3.endpoint, "migrate-main", "m/") == set()
    assert (await _pg_counts(postgres_dsn, ["assets"]))["assets"] == 0

    await single.stop()
    before = await asyncio.to_thread(_sqlite_counts, source.data_dir)
    # assets: the published wheel and its .metadata, the npm tarball, the cached wheel and its .metadata
    assert before["audit"] >= 4 and before["tokens"] == 1 and before["assets"] == 5, before
    digests = {
        str(r[0]) for r in await asyncio.to_thread(_sqlite_rows, source.data_dir, "SELECT digest FROM assets")
    }
    chain = await asyncio.to_thread(
        _sqlite_rows, source.data_dir, "SELECT seq, prev_hash, hash FROM audit ORDER BY seq"
    )

    run = await _migrate(config, source.data_dir, "--json")
    assert run.code == 0, run
    report = run.json()
    assert set(report["tables"]) == set(before)
    for table, rows in before.items():
        assert report["tables"][table] == {
            "rows": rows,
            "copied": rows,
            "present": 0,
            "skipped": 0,
            "not_merged": 0,
        }
    assert report["blobs"]["referenced"] == len(digests) == report["blobs"]["copied"]
    assert report["blobs"]["present"] == 0 and report["blobs"]["corrupt"] == report["blobs"]["missing"] == []
    assert await bucket_keys(moto_s3.endpoint, "migrate-main", "m/") == {f"m/sha256/{d}" for d in digests}
    assert await _pg_counts(postgres_dsn, list(before)) == before
    assert await _pg_rows(postgres_dsn, "SELECT seq, prev_hash, hash FROM audit ORDER BY seq") == chain
    assert await _pg_rows(postgres_dsn, "SELECT leases FROM (SELECT count(*) AS leases FROM leases) x") == [
        (0,)
    ]

    # A node on the migrated index and bucket, its upstream gone: everything is served from them.
    await pypi.close()
    cluster = await cluster_factory(
        1,
        upstream_url=pypi.url,
        index_url=postgres_dsn,
        storage=storage,
        auth=True,
        admin_token_file=str(tmp_path / "admin-token"),
        offline=True,
    )
    node = cluster[0]
    simple = f"{node.url}/default/pypi/public/simple/"
    async with http.get(simple + "internal-tool/") as resp:
        assert resp.status == 401  # auth on: the migrated repository is not anonymous
    async with http.get(simple + "internal-tool/", headers=_basic(source.token)) as resp:
        assert resp.status == 200, await node.log_tail()  # the single node's token
    index_url = simple.replace("http://", f"http://aws:{source.token}@", 1)
    pip = await pip_install(index_url, tmp_path / "pip", "internal-tool", "beta")
    assert pip.ok, pip.output + await node.log_tail()
    assert await installed(tmp_path / "pip") >= {"internal_tool", "beta"}
    async with http.get(f"{node.url}/default/npm/public/migr-pkg", headers=_basic(source.token)) as resp:
        assert resp.status == 200, await node.log_tail()
        tarball_url = (await resp.json())["versions"]["1.0.0"]["dist"]["tarball"]
    async with http.get(tarball_url, headers=_basic(source.token)) as resp:
        assert resp.status == 200 and await resp.read() == source.npm_data

    # The node appends to the migrated trail (the identity sequence continues past the copied
    # records), and the whole hash chain verifies on the cluster's index.
    body = {"domain": "default", "principal": "after", "permissions": ["read"], "duration": "1h"}
    async with http.post(
        node.url + "/-/api/v1/tokens", json=body, headers={"Authorization": f"Bearer {ADMIN}"}
    ) as resp:
        assert resp.status == 201, await resp.text()
    issued = "SELECT max(seq) FROM audit WHERE action='token_issue' AND detail LIKE '%after%'"
    for _ in range(100):
        [(seq,)] = await _pg_rows(postgres_dsn, issued)
        if seq is not None:
            break
        await asyncio.sleep(0.1)
    assert seq is not None and seq > chain[-1][0], (seq, await node.log_tail())
    assert "audit writes are failing" not in await node.log_tail(100_000)  # no seq taken twice
    verify = await _cli("audit", "verify", "--config", str(config), "--json")
    assert verify.code == 0, verify
    assert verify.json()["intact"] is True and verify.json()["records"] > before["audit"]

    # Again: refused, the target has rows ...
    again = await _migrate(config, source.data_dir)
    assert again.code == 1 and "already holds rows" in again.err and "--merge" in again.err, again
    # ... with --merge: nothing is duplicated, and an asset the target maps to other bytes is
    # reported and kept as the target has it.
    other = "f" * 64
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute("UPDATE assets SET digest=$1 WHERE filename=$2", other, source.wheel.name)
    finally:
        await conn.close()
    counts = await _pg_counts(postgres_dsn, list(before))
    merged = await _migrate(config, source.data_dir, "--merge", "--json")
    assert merged.code == 0, merged
    data = merged.json()
    assert all(t["copied"] == 0 for t in data["tables"].values()), data["tables"]
    assert data["tables"]["audit"]["present"] == before["audit"]
    assert data["blobs"]["present"] == len(digests) and data["blobs"]["copied"] == 0
    [conflict] = data["conflicts"]
    assert conflict["asset"].endswith("/" + source.wheel.name) and conflict["target_digest"] == other
    assert "conflict:" in merged.err
    assert await _pg_counts(postgres_dsn, list(before)) == counts
    assert await _pg_rows(
        postgres_dsn, f"SELECT digest FROM assets WHERE filename='{source.wheel.name}'"
    ) == [(other,)]


async def _seed(endpoint: str, storage: dict[str, Any], data_dir: Path, digests: list[str]) -> None:
    """Blobs a crashed run uploaded before it died."""
    client = S3Client(StorageConfig(backend="s3", bucket=storage["bucket"], endpoint_url=endpoint), FAKE_ENV)
    try:
        for d in digests:
            path = data_dir / "blobs" / "sha256" / d[:2] / d
            size = plain_size((await asyncio.to_thread(path.stat)).st_size)  # the blobs are sealed
            meta = {"plain-size": str(size), "seeded": "yes"}  # an upload again would drop "seeded"
            await client.put_file(f"{storage['prefix']}sha256/{d}", path, meta, 2**30)
    finally:
        await client.close()


async def _objects(endpoint: str, bucket: str, prefix: str) -> dict[str, dict[str, str]]:
    """key → metadata of every object (an object uploaded again has the uploader's metadata)."""
    client = S3Client(StorageConfig(backend="s3", bucket=bucket, endpoint_url=endpoint), FAKE_ENV)
    try:
        out = {}
        async for key, _, _ in client.list(prefix):
            found = await client.head(key)
            assert found is not None
            out[key] = found[1]
        return out
    finally:
        await client.close()


async def test_a_crash_in_either_phase_then_a_rerun_and_a_corrupt_blob(
    proxy_factory: ProxyFactory,
    pypi: FakePyPI,
    dists: Dists,
    http: aiohttp.ClientSession,
    postgres_dsn: str,
    moto_s3: MotoServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    use_fake_aws(monkeypatch)
    # Encryption at rest on the single node: its blobs go to the bucket sealed, as they were.
    monkeypatch.setenv("MIGRATE_TEST_KEYS", base64.b64encode(b"k" * 32).decode())
    sealed = {"encryption_key_env": "MIGRATE_TEST_KEYS"}
    single, source = await _single_node(proxy_factory, pypi, dists, http, tmp_path, extra=4, **sealed)
    await single.stop()
    storage = await s3_storage(moto_s3.endpoint, "migrate-crash", prefix="c/")
    # A config without the key (and the index URL given by flag) is refused before any upload.
    keyless = await _target_config(tmp_path, pypi.url, None, storage, "keyless.toml")
    refused = await _migrate(keyless, source.data_dir, "--index-url", postgres_dsn)
    assert refused.code == 1 and "sealed" in refused.err and "encryption_key" in refused.err, refused
    assert "Traceback" not in refused.err
    config = await _target_config(tmp_path, pypi.url, postgres_dsn, storage, **sealed)
    before = await asyncio.to_thread(_sqlite_counts, source.data_dir)
    rows = await asyncio.to_thread(
        _sqlite_rows, source.data_dir, "SELECT filename, digest, hosted FROM assets ORDER BY filename"
    )
    digest_of = {str(name): str(digest) for name, digest, _ in rows}
    bad = digest_of[source.extra_wheels[0].name]  # a published wheel whose bytes rot on disk
    path = source.data_dir / "blobs" / "sha256" / bad[:2] / bad
    damaged = bytearray(await asyncio.to_thread(path.read_bytes))
    damaged[len(damaged) // 2] ^= 0xFF
    await asyncio.to_thread(path.write_bytes, bytes(damaged))
    good = sorted(set(digest_of.values()) - {bad})

    # A dry run counts, finds the corrupt blob, and writes nothing anywhere.
    dry = await _migrate(config, source.data_dir, "--dry-run", "--json")
    assert dry.code == 0, dry
    assert dry.json()["blobs"]["corrupt"] == [bad] and dry.json()["blobs"]["copied"] == len(good)
    assert dry.json()["tables"]["assets"] == {
        "rows": before["assets"],
        "copied": before["assets"] - 1,
        "present": 0,
        "skipped": 1,
        "not_merged": 0,
    }
    assert await bucket_keys(moto_s3.endpoint, "migrate-crash", "c/") == set()
    assert await _pg_rows(postgres_dsn, "SELECT to_regclass('assets')::text") == [(None,)]

    # A first run died in its blob phase after half the blobs (what it left: those objects) ...
    seeded = good[: len(good) // 2]
    await _seed(moto_s3.endpoint, storage, source.data_dir, seeded)
    # ... a second one dies in its row phase: a table refuses its rows half way through.
    index = PostgresIndex(postgres_dsn, pool_size=2)
    await index.open()
    try:
        async with index.pool.acquire() as conn:
            await conn.execute(
                "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'the disk is on fire'; END $$;"
                "CREATE TRIGGER boom BEFORE INSERT ON tokens FOR EACH ROW EXECUTE FUNCTION boom()"
            )
    finally:
        await index.close()
    first = await _objects(moto_s3.endpoint, "migrate-crash", "c/")
    crashed = await _migrate(config, source.data_dir)
    assert crashed.code == 1 and "the disk is on fire" in crashed.err, crashed
    # Every good blob is in the bucket, those already there not uploaded again; no row at all
    # is in the index.
    expected_keys = {f"c/sha256/{d}" for d in good}
    objects = await _objects(moto_s3.endpoint, "migrate-crash", "c/")
    assert set(objects) == expected_keys and len(first) == len(seeded) > 0
    assert {key: objects[key] for key in first} == first
    assert all("seeded" not in objects[key] for key in set(objects) - set(first))
    assert set((await _pg_counts(postgres_dsn, list(before))).values()) == {0}

    # A third run is killed outright (SIGKILL) with its row transaction open: it waits there for
    # the index's write lock, which the test holds. Still no row.
    async with asyncpg.create_pool(postgres_dsn, min_size=1, max_size=1) as pool, pool.acquire() as conn:
        await conn.execute("DROP TRIGGER boom ON tokens")
        await conn.execute("SELECT pg_advisory_lock($1)", WRITE_LOCK)
        proc = await asyncio.create_subprocess_exec(
            *_command("cluster", "migrate", "--config", str(config), "--from", str(source.data_dir)),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            waiting = 0
            for _ in range(300):
                waiting = await conn.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                    "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                )
                if waiting or proc.returncode is not None:
                    break
                await asyncio.sleep(0.05)
            assert waiting == 1 and proc.returncode is None
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        await conn.execute("SELECT pg_advisory_unlock($1)", WRITE_LOCK)
    assert proc.returncode == -9
    assert set((await _pg_counts(postgres_dsn, list(before))).values()) == {0}

    rerun = await _migrate(config, source.data_dir, "--json")
    assert rerun.code == 0, rerun
    report = rerun.json()
    assert report["blobs"]["present"] == len(good) and report["blobs"]["copied"] == 0
    assert report["blobs"]["corrupt"] == [bad] and f"corrupt blob {bad}" in rerun.err
    assert report["hosted_lost"] == [f"default/public/pypi/extra-0/{source.extra_wheels[0].name}"]
    assert report["tables"]["assets"]["skipped"] == 1
    after = await _pg_counts(postgres_dsn, list(before))
    assert after == {**before, "assets": before["assets"] - 1}, (after, before)
    assert await bucket_keys(moto_s3.endpoint, "migrate-crash", "c/") == expected_keys
    assert await _pg_rows(postgres_dsn, f"SELECT count(*) FROM assets WHERE digest='{bad}'") == [(0,)]
    assert len(await _pg_rows(postgres_dsn, "SELECT DISTINCT seq FROM audit")) == before["audit"]
    # What the bucket holds is what a node reads: sealed bytes that open to the published wheel.
    wheel = source.wheel.name
    store = S3BlobStore(
        tmp_path / "reader" / "blobs",
        tmp_path / "reader" / "tmp",
        StorageConfig(backend="s3", bucket="migrate-crash", prefix="c/", endpoint_url=moto_s3.endpoint),
        FAKE_ENV,
        Sealer(StaticKeys.from_env(os.environ, "MIGRATE_TEST_KEYS")),
    )
    try:
        await asyncio.to_thread(store.prepare)
        response = await store.client.get(store.key(digest_of[wheel]))
        assert response is not None
        raw = await response.read()
        response.release()
        assert raw[:4] == MAGIC  # sealed in the bucket too
        assert await store.read_bytes(Digest(digest_of[wheel])) == await asyncio.to_thread(
            source.wheel.read_bytes
        )
    finally:
        await store.close()
