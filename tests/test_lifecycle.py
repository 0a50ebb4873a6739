"""gc, verify and stats on a data directory the proxy is using (run as real CLI subprocesses)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp

from tests.clients import installed, pip_install
from tests.conftest import Dists, ProxyFactory, RunningProxy, cli_env, index_rows
from tests.fakes.pypi import FakePyPI, Fault


async def cli(proxy: RunningProxy, *args: str) -> Any:
    cmd = [sys.executable, "-c", "import sys; from proxy.cli import main; sys.exit(main())", *args]
    cmd += ["--data-dir", str(proxy.data_dir), "--json"]
    env = cli_env(proxy.data_dir)
    done = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, check=False, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


async def fetch(http: aiohttp.ClientSession, url: str) -> bytes:
    async with http.get(url) as resp:
        assert resp.status == 200, url
        return await resp.read()


def file_url(proxy: RunningProxy, project: str, path: Path) -> str:
    return f"{proxy.url}/default/pypi/public/files/{project}/{path.name}"


async def test_gc_evicts_least_recently_used_cached_assets_and_keeps_hosted_ones(
    proxy_factory: ProxyFactory, pypi: FakePyPI, dists: Dists, http: aiohttp.ClientSession
) -> None:
    proxy = await proxy_factory(pypi.url)
    jar = b"PK" + b"h" * 5000
    async with http.put(f"{proxy.url}/default/maven/team/com/acme/kept/1.0/kept-1.0.jar", data=jar) as resp:
        assert resp.status == 201
    for project, dist in (("beta", dists.beta), ("alpha", dists.alpha)):
        await fetch(http, file_url(proxy, project, dist))
        await asyncio.sleep(0.05)
    big = await fetch(http, file_url(proxy, "bigpkg", dists.big))
    await proxy.pipeline.resolver.flush_touches()
    stats = await cli(proxy, "stats")
    assert stats["blob_bytes"] > len(big)
    hosted = next(r for r in stats["repositories"] if r["repository"] == "default/team")
    assert hosted["hosted_files"] == 5 and hosted["cached_files"] == 0  # the jar and its 4 checksums
    budget = str(len(big) + hosted["bytes"] + 200)  # room for the big wheel and the hosted files only

    dry = await cli(proxy, "gc", "--max-size", budget, "--dry-run")
    assert dry["dry_run"] and dry["evicted"]
    # The least recently used go first; the big wheel, used last, stays; hosted files are never evicted.
    report = await cli(proxy, "gc", "--max-size", budget)
    evicted = [e["filename"] for e in report["evicted"]]
    assert dists.beta.name in evicted and dists.alpha.name in evicted and dists.big.name not in evicted
    assert not any("kept" in name for name in evicted)
    assert report["after"] <= report["budget"] < report["before"]
    assert await fetch(http, f"{proxy.url}/default/maven/team/com/acme/kept/1.0/kept-1.0.jar") == jar
    await asyncio.sleep(2.5)  # the proxy notices the index change and forgets its in-memory rows
    assert await fetch(http, file_url(proxy, "beta", dists.beta)) == await asyncio.to_thread(
        dists.beta.read_bytes
    )

    # A download running during a gc that evicts everything completes intact.
    pypi.faults[f"/files/{dists.big.name}"] = Fault("slow", delay=0.05, chunk=1024 * 1024, times=1)
    fresh = await proxy_factory(pypi.url, data_dir=proxy.data_dir.parent / "other")
    download = asyncio.create_task(fetch(http, file_url(fresh, "bigpkg", dists.big)))
    await asyncio.sleep(0.3)
    await cli(fresh, "gc", "--max-size", "0")
    assert await download == big


async def test_verify_finds_corrupt_and_missing_blobs_and_repair_lets_pip_fetch_again(
    proxy_factory: ProxyFactory, pypi: FakePyPI, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    proxy = await proxy_factory(pypi.url)
    run = await pip_install(f"{proxy.url}/default/pypi/public/simple/", tmp_path / "t1", "alpha")
    assert run.ok, run.output
    rows = await asyncio.to_thread(
        index_rows, proxy.data_dir, "SELECT filename, digest FROM assets WHERE filename LIKE '%.whl'"
    )
    digests = dict(rows)
    alpha = next(d for f, d in digests.items() if f.startswith("alpha"))
    beta = next(d for f, d in digests.items() if f.startswith("beta"))

    def damage() -> None:
        blob = proxy.data_dir / "blobs" / "sha256" / alpha[:2] / alpha
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF
        blob.write_bytes(bytes(data))
        (proxy.data_dir / "blobs" / "sha256" / beta[:2] / beta).unlink()

    await asyncio.to_thread(damage)
    report = await cli(proxy, "verify")
    assert report["corrupt"] == [alpha] and report["missing"] == [beta]
    repaired = await cli(proxy, "verify", "--repair")
    assert repaired["rows_removed"] >= 2
    assert await asyncio.to_thread((proxy.data_dir / "quarantine" / alpha).exists)
    assert (await cli(proxy, "verify"))["corrupt"] == []
    await asyncio.sleep(2.5)  # the proxy notices the index change
    run = await pip_install(f"{proxy.url}/default/pypi/public/simple/", tmp_path / "t2", "alpha")
    assert run.ok, run.output
    assert await installed(tmp_path / "t2") == {"alpha", "beta"}
    assert (await cli(proxy, "verify")) == {
        "checked": (await cli(proxy, "stats"))["blobs"],
        "corrupt": [],
        "missing": [],
        "rows_removed": 0,
        "hosted_lost": [],
    }


async def test_a_background_gc_policy_keeps_the_store_under_its_budget(
    proxy_factory: ProxyFactory, pypi: FakePyPI, dists: Dists, http: aiohttp.ClientSession
) -> None:
    proxy = await proxy_factory(pypi.url, gc_max_size="100KiB", gc_interval="1s")
    await fetch(http, file_url(proxy, "alpha", dists.alpha))
    big = await fetch(http, file_url(proxy, "bigpkg", dists.big))
    assert len(big) > 100 * 1024
    for _ in range(60):  # the housekeeping task runs every two seconds
        stats = await cli(proxy, "stats")
        if stats["blob_bytes"] <= 100 * 1024:
            break
        await asyncio.sleep(0.25)
    assert stats["blob_bytes"] <= 100 * 1024
    assert await fetch(http, file_url(proxy, "bigpkg", dists.big)) == big  # fetched again
