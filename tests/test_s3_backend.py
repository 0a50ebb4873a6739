"""The proxy on the S3 blob backend, end to end: pip through a FakePyPI upstream, moto as the bucket.

Until the PostgreSQL index exists (issue #12 part 2) each node has its own SQLite index, so
"a second node" here is a new data directory given a copy of the first node's index: what it
shows is that a node whose disk cache is empty serves from the bucket (never the upstream),
that ``serve = "redirect"`` sends clients to the bucket, and that a node whose object store is
down still serves what its cache holds and answers 503 for the rest.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web

from proxy.config import StorageConfig
from proxy.storage.s3 import S3Client
from tests.clients import installed, pip_install
from tests.cluster import bucket_keys, make_bucket
from tests.conftest import Dists, proxy_config, serve_config, write_config_file
from tests.fakes.pypi import FakePyPI
from tests.s3_server import FAKE_ENV, MotoServer, free_port, moto_server


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        yield server


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The proxy reads S3 credentials from the standard environment variables only."""
    for key, value in FAKE_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)


def _storage(endpoint: str, bucket: str, **keys: Any) -> dict[str, Any]:
    return {"backend": "s3", "bucket": bucket, "prefix": "prod/", "endpoint_url": endpoint, **keys}


async def _node(data_dir: Path, upstream: str, storage: dict[str, Any]) -> tuple[web.AppRunner, str]:
    raw = proxy_config(data_dir, upstream)
    raw["storage"] = storage
    _, runner, url = await serve_config(raw)
    return runner, url


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _copy_index(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for path in source.glob("index.sqlite3*"):
        shutil.copy2(path, target / path.name)


def _cached(data_dir: Path) -> set[str]:
    return {p.name for p in (data_dir / "blobs").rglob("*") if p.is_file()}


@pytest.mark.timeout(180)
async def test_two_nodes_share_the_bucket(
    tmp_path: Path, moto: MotoServer, pypi: FakePyPI, dists: Dists
) -> None:
    bucket = "nodes-share"
    await make_bucket(moto.endpoint, bucket)
    storage = _storage(moto.endpoint, bucket)
    wheels = {await asyncio.to_thread(_sha, p): p.name for p in (dists.alpha, dists.beta)}

    a_dir = tmp_path / "a"
    runner, url = await _node(a_dir, pypi.url, storage)
    try:
        run = await pip_install(f"{url}/default/pypi/public/simple/", tmp_path / "t-a", "alpha")
        assert run.ok, run.output
    finally:
        await runner.cleanup()
    keys = await bucket_keys(moto.endpoint, bucket, "prod/sha256/")
    assert {f"prod/sha256/{sha}" for sha in wheels} <= keys, (
        "the wheels are in the bucket under their digests"
    )
    assert set(wheels) <= await asyncio.to_thread(_cached, a_dir)  # and in node A's cache
    upstream_files = {name: pypi.hits[f"/files/{name}"] for name in wheels.values()}
    assert all(n == 1 for n in upstream_files.values())

    # Node B: same bucket, a copy of the index, an empty disk cache.
    b_dir = tmp_path / "b"
    await asyncio.to_thread(_copy_index, a_dir, b_dir)
    runner, url = await _node(b_dir, pypi.url, storage)
    try:
        run = await pip_install(f"{url}/default/pypi/public/simple/", tmp_path / "t-b", "alpha")
        assert run.ok, run.output
        assert {"alpha", "beta"} <= await installed(tmp_path / "t-b")
    finally:
        await runner.cleanup()
    assert {name: pypi.hits[f"/files/{name}"] for name in wheels.values()} == upstream_files, (
        "node B served the files from the bucket, not the upstream"
    )
    assert set(wheels) <= await asyncio.to_thread(_cached, b_dir), "node B's cache was filled from the bucket"


@pytest.mark.timeout(180)
async def test_redirect_mode_and_store_down(
    tmp_path: Path, moto: MotoServer, pypi: FakePyPI, dists: Dists
) -> None:
    bucket = "nodes-redirect"
    await make_bucket(moto.endpoint, bucket)
    beta_sha = await asyncio.to_thread(_sha, dists.beta)
    alpha_sha = await asyncio.to_thread(_sha, dists.alpha)
    a_dir = tmp_path / "a"
    runner, url = await _node(a_dir, pypi.url, _storage(moto.endpoint, bucket))
    try:
        run = await pip_install(f"{url}/default/pypi/public/simple/", tmp_path / "t-a", "alpha")
        assert run.ok, run.output
    finally:
        await runner.cleanup()

    # serve = "redirect": a blob this node has not cached is a 302 to a pre-signed bucket URL.
    c_dir = tmp_path / "c"
    await asyncio.to_thread(_copy_index, a_dir, c_dir)
    runner, url = await _node(c_dir, pypi.url, _storage(moto.endpoint, bucket, serve="redirect"))
    try:
        beta_url = f"{url}/default/pypi/public/files/beta/{dists.beta.name}"
        async with aiohttp.ClientSession() as http:
            async with http.get(beta_url, allow_redirects=False) as response:
                assert response.status == 302
                location = response.headers["Location"]
            assert location.startswith(f"{moto.endpoint}/{bucket}/prod/sha256/{beta_sha}?")
            assert "X-Amz-Signature=" in location and FAKE_ENV["AWS_SECRET_ACCESS_KEY"] not in location
            assert urlsplit(location).netloc != urlsplit(url).netloc
            async with http.get(location) as fetched:  # a plain client, no credentials of any kind
                assert fetched.status == 200
                assert hashlib.sha256(await fetched.read()).hexdigest() == beta_sha
        run = await pip_install(f"{url}/default/pypi/public/simple/", tmp_path / "t-c", "alpha")
        assert run.ok, run.output  # pip follows the redirects to the bucket
        assert not {alpha_sha, beta_sha} & await asyncio.to_thread(_cached, c_dir), "sent by the bucket"
    finally:
        await runner.cleanup()

    # The object store down: node A's cache still serves; a blob not on disk is a 503 that says so.
    dead = _storage(f"http://127.0.0.1:{free_port()}", bucket)
    await asyncio.to_thread(lambda: next((a_dir / "blobs").rglob(beta_sha)).unlink())
    runner, url = await _node(a_dir, pypi.url, dead)
    try:
        async with aiohttp.ClientSession() as http:
            alpha_url = f"{url}/default/pypi/public/files/alpha/{dists.alpha.name}"
            async with http.get(alpha_url) as response:
                assert response.status == 200
                assert hashlib.sha256(await response.read()).hexdigest() == alpha_sha
            async with http.get(f"{url}/default/pypi/public/files/beta/{dists.beta.name}") as response:
                assert response.status == 503
                body = await response.json()
        assert body["error"] == "storage_unavailable", body
        assert "unreachable" in body["message"]
        assert FAKE_ENV["AWS_SECRET_ACCESS_KEY"] not in str(body)
    finally:
        await runner.cleanup()


async def _cli(config: Path, *args: str) -> Any:
    """The real CLI in a subprocess (it inherits the AWS variables this test set)."""
    cmd = [sys.executable, "-c", "import sys; from proxy.cli import main; sys.exit(main())", *args]
    cmd += ["--config", str(config), "--json"]
    done = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert FAKE_ENV["AWS_SECRET_ACCESS_KEY"] not in done.stdout + done.stderr
    return json.loads(done.stdout)


@pytest.mark.timeout(180)
async def test_verify_stats_gc_work_on_the_bucket(
    tmp_path: Path, moto: MotoServer, pypi: FakePyPI, dists: Dists
) -> None:
    bucket = "nodes-lifecycle"
    await make_bucket(moto.endpoint, bucket)
    data_dir = tmp_path / "a"
    runner, url = await _node(data_dir, pypi.url, _storage(moto.endpoint, bucket))
    try:
        run = await pip_install(f"{url}/default/pypi/public/simple/", tmp_path / "t-a", "alpha")
        assert run.ok, run.output
    finally:
        await runner.cleanup()
    config = tmp_path / "node.toml"
    await asyncio.to_thread(write_config_file, config, data_dir, pypi.url)
    text = await asyncio.to_thread(config.read_text)
    storage = f'\n[storage]\nbackend = "s3"\nbucket = "{bucket}"\nprefix = "prod/"\n'
    storage += f'endpoint_url = "{moto.endpoint}"\n'
    await asyncio.to_thread(config.write_text, text + storage)
    keys = await bucket_keys(moto.endpoint, bucket, "prod/sha256/")
    stats = await _cli(config, "stats")
    assert stats["blobs"] == len(keys) >= 2

    # The node's cache emptied: verify hashes every object through it.
    await asyncio.to_thread(shutil.rmtree, data_dir / "blobs")
    report = await _cli(config, "verify")
    assert report["checked"] == len(keys) and report["corrupt"] == [] and report["missing"] == []
    beta_sha = await asyncio.to_thread(_sha, dists.beta)
    await asyncio.to_thread(lambda: next((data_dir / "blobs").rglob(beta_sha)).unlink())
    client = S3Client(StorageConfig(backend="s3", bucket=bucket, endpoint_url=moto.endpoint), FAKE_ENV)
    try:
        response = await client.request(
            "PUT", f"prod/sha256/{beta_sha}", data=b"rot", payload_hash=hashlib.sha256(b"rot").hexdigest()
        )
        response.release()
    finally:
        await client.close()
    report = await _cli(config, "verify")
    assert report["corrupt"] == [beta_sha]

    # gc to nothing: every cached asset evicted, every object deleted from the bucket.
    report = await _cli(config, "gc", "--max-size", "0")
    assert report["after"] == 0 and report["blobs_deleted"] == len(keys)
    assert await bucket_keys(moto.endpoint, bucket, "prod/sha256/") == set()
