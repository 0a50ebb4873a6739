"""First contact: a page and a file through the proxy, cold then warm."""

from __future__ import annotations

import hashlib

import aiohttp

from tests.conftest import Dists, RunningProxy
from tests.fakes.pypi import FakePyPI

JSON = "application/vnd.pypi.simple.v1+json"


async def test_page_and_file_cold_then_warm(
    proxy: RunningProxy, pypi: FakePyPI, http: aiohttp.ClientSession, dists: Dists
) -> None:
    async with http.get(proxy.simple() + "alpha/", headers={"Accept": JSON}) as resp:
        assert resp.status == 200
        assert resp.headers["X-Cache"] == "MISS"
        page = await resp.json(content_type=None)
    [entry] = page["files"]
    assert entry["url"].startswith(proxy.url)
    async with http.get(entry["url"]) as resp:
        assert resp.status == 200
        assert resp.headers["X-Cache"] == "MISS"
        body = await resp.read()
    assert hashlib.sha256(body).hexdigest() == entry["hashes"]["sha256"]
    async with http.get(entry["url"]) as resp:
        assert resp.headers["X-Cache"] == "HIT"
        assert await resp.read() == body
    async with http.get(proxy.simple() + "alpha/", headers={"Accept": JSON}) as resp:
        assert resp.headers["X-Cache"] == "HIT"
    assert pypi.hits["/simple/alpha/"] == 1
    assert pypi.hits[f"/files/{dists.alpha.name}"] == 1
