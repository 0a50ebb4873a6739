"""Upstream trouble: single-flight, integrity, retries, timeouts, staleness, breaker, serials."""

from __future__ import annotations

import asyncio
import hashlib
import time

import aiohttp
import pytest

from tests.conftest import Dists, ProxyFactory, RunningProxy, blob_files, index_rows, temp_files
from tests.fakes.dists import sha256_file
from tests.fakes.pypi import FakePyPI, Fault

JSON = {"Accept": "application/vnd.pypi.simple.v1+json"}


async def _sha(path: object) -> str:
    return await asyncio.to_thread(sha256_file, path)  # type: ignore[arg-type]


async def _asset_rows(proxy: RunningProxy, filename: str) -> list[tuple[object, ...]]:
    return await asyncio.to_thread(
        index_rows, proxy.data_dir, "SELECT digest FROM assets WHERE filename=?", (filename,)
    )


async def _download(http: aiohttp.ClientSession, url: str) -> bytes:
    async with http.get(url) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.read()


async def test_fifty_concurrent_misses_cause_one_upstream_fetch(
    proxy: RunningProxy, pypi: FakePyPI, dists: Dists, http: aiohttp.ClientSession
) -> None:
    name = dists.big.name
    # Trickle the body so that all fifty requests overlap the one download.
    pypi.faults[f"/files/{name}"] = Fault("slow", chunk=2 * 2**20, delay=0.05)
    url = proxy.files("bigpkg", name)
    bodies = await asyncio.gather(*(_download(http, url) for _ in range(50)))
    assert pypi.hits[f"/files/{name}"] == 1
    assert pypi.hits["/simple/bigpkg/"] == 1
    expected = await _sha(dists.big)
    assert {hashlib.sha256(b).hexdigest() for b in bodies} == {expected}
    assert len(bodies[0]) > 20 * 2**20
    assert len(await asyncio.to_thread(blob_files, proxy.data_dir)) == 1


async def test_first_bytes_reach_the_client_before_the_download_ends(
    proxy: RunningProxy, pypi: FakePyPI, dists: Dists, http: aiohttp.ClientSession
) -> None:
    name = dists.big.name
    pypi.faults[f"/files/{name}"] = Fault("slow", chunk=2**20, delay=0.3)
    async with http.get(proxy.files("bigpkg", name)) as resp:
        assert resp.headers["X-Cache"] == "MISS"
        first = await resp.content.readexactly(512 * 1024)
        # The upstream is still trickling: nothing is committed yet, the file is staged.
        assert await _asset_rows(proxy, name) == []
        assert len(await asyncio.to_thread(temp_files, proxy.data_dir)) == 1
        rest = await resp.read()
    assert hashlib.sha256(first + rest).hexdigest() == await _sha(dists.big)
    assert len(await _asset_rows(proxy, name)) == 1


@pytest.mark.parametrize("kind", ["wrong_bytes", "truncate"])
async def test_bad_bytes_are_never_cached_and_the_transfer_breaks(
    kind: str, proxy: RunningProxy, pypi: FakePyPI, dists: Dists, http: aiohttp.ClientSession
) -> None:
    name = dists.beta.name
    pypi.faults[f"/files/{name}"] = Fault(kind, times=1)  # type: ignore[arg-type]
    url = proxy.files("beta", name)
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.get(url) as resp:
            await resp.read()
    await asyncio.sleep(0.05)
    assert await _asset_rows(proxy, name) == []
    assert await asyncio.to_thread(blob_files, proxy.data_dir) == []
    assert await asyncio.to_thread(temp_files, proxy.data_dir) == []
    # The next request tries again and gets the right bytes.
    body = await _download(http, url)
    assert hashlib.sha256(body).hexdigest() == await _sha(dists.beta)
    assert pypi.hits[f"/files/{name}"] == 2


async def test_5xx_and_429_are_retried(
    proxy: RunningProxy, pypi: FakePyPI, http: aiohttp.ClientSession
) -> None:
    pypi.faults["/simple/alpha/"] = Fault("status", times=1, status=500)
    async with http.get(proxy.simple() + "alpha/", headers=JSON) as resp:
        assert resp.status == 200
    assert pypi.hits["/simple/alpha/"] == 2

    pypi.faults["/simple/beta/"] = Fault("429", times=1, retry_after=1)
    started = time.monotonic()
    async with http.get(proxy.simple() + "beta/", headers=JSON) as resp:
        assert resp.status == 200
    assert time.monotonic() - started >= 0.9  # Retry-After honoured
    assert pypi.hits["/simple/beta/"] == 2


async def test_unreachable_upstream_is_502_and_a_stall_is_504(
    proxy_factory: ProxyFactory, pypi: FakePyPI, http: aiohttp.ClientSession
) -> None:
    proxy = await proxy_factory(pypi.url, upstream_retries=0, upstream_metadata_timeout="0.5s")
    pypi.faults["/simple/alpha/"] = Fault("stall", delay=3)
    async with http.get(proxy.simple() + "alpha/") as resp:
        assert resp.status == 504
        body = await resp.json()
    assert body["error"] == "upstream_timeout" and body["upstream"] == "fake"
    assert "fake" in body["message"]

    await pypi.stop_listening()
    async with http.get(proxy.simple() + "beta/") as resp:
        assert resp.status == 502
        body = await resp.json()
    assert body["error"] == "upstream_unavailable" and body["upstream"] == "fake"
    assert "Traceback" not in body["message"]


async def test_slow_upstream_gets_stale_page_at_soft_deadline(
    proxy_factory: ProxyFactory, pypi: FakePyPI, http: aiohttp.ClientSession
) -> None:
    proxy = await proxy_factory(pypi.url, upstream_metadata_ttl="0s", soft_deadline="0.3s")
    async with http.get(proxy.simple() + "alpha/", headers=JSON) as resp:
        assert resp.headers["X-Cache"] == "MISS"
        fresh = await resp.read()
    pypi.faults["/simple/alpha/"] = Fault("stall", times=1, delay=1.5)
    started = time.monotonic()
    async with http.get(proxy.simple() + "alpha/", headers=JSON) as resp:
        assert resp.headers["X-Cache"] == "STALE"
        assert "slow" in resp.headers["X-Proxy-Warning"]
        assert await resp.read() == fresh
    assert time.monotonic() - started < 1.2
    await asyncio.sleep(1.6)  # the background refresh finishes and is stored
    async with http.get(proxy.simple() + "alpha/", headers=JSON) as resp:
        assert resp.status == 200
        assert resp.headers["X-Cache"] in {"REVALIDATED", "MISS", "HIT"}
        assert "X-Proxy-Warning" not in resp.headers


async def test_revalidation_uses_etag(
    proxy_factory: ProxyFactory, pypi: FakePyPI, http: aiohttp.ClientSession
) -> None:
    proxy = await proxy_factory(pypi.url, upstream_metadata_ttl="0s")
    for expected in ("MISS", "REVALIDATED"):
        async with http.get(proxy.simple() + "alpha/", headers=JSON) as resp:
            assert resp.headers["X-Cache"] == expected


async def test_a_lagging_upstream_serial_never_replaces_a_newer_page(
    proxy_factory: ProxyFactory, pypi: FakePyPI, dists: Dists, http: aiohttp.ClientSession
) -> None:
    proxy = await proxy_factory(pypi.url, upstream_metadata_ttl="0s")
    async with http.get(proxy.simple() + "beta/", headers=JSON) as resp:
        before = await resp.json(content_type=None)
    cached_serial = pypi.serial["beta"]
    await pypi.add_file_async("beta", dists.alpha)  # any new file: the page changes
    pypi.serial["beta"] = cached_serial - 5  # ... but the node answering lags behind
    async with http.get(proxy.simple() + "beta/", headers=JSON) as resp:
        lagging = await resp.json(content_type=None)
    assert [f["filename"] for f in lagging["files"]] == [f["filename"] for f in before["files"]]

    pypi.serial["beta"] = cached_serial + 5
    async with http.get(proxy.simple() + "beta/", headers=JSON) as resp:
        caught_up = await resp.json(content_type=None)
    assert len(caught_up["files"]) == len(before["files"]) + 1


async def test_open_circuit_fails_fast(
    proxy_factory: ProxyFactory, pypi: FakePyPI, http: aiohttp.ClientSession
) -> None:
    proxy = await proxy_factory(pypi.url, upstream_retries=0, upstream_breaker_threshold=2)
    await pypi.stop_listening()
    for project in ("alpha", "beta"):
        async with http.get(proxy.simple() + f"{project}/") as resp:
            assert resp.status == 502
    async with http.get(proxy.simple() + "gamma/") as resp:
        assert resp.status == 502
        body = await resp.json()
    assert "skipped" in body["message"]


async def test_upstream_404_is_remembered_briefly(
    proxy: RunningProxy, pypi: FakePyPI, http: aiohttp.ClientSession
) -> None:
    for _ in range(3):
        async with http.get(proxy.simple() + "no-such-project/") as resp:
            assert resp.status == 404
            body = await resp.json()
            assert body["error"] == "not_found"
    assert pypi.hits["/simple/no-such-project/"] == 1
