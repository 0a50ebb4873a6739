"""The hit path's shortcuts answer exactly what the long way would (issue #11, hot paths).

- Routing by format (server/routing.py ``route_by_format``) picks the same route as aiohttp's
  own walk over every route, for every method, and leaves 404/405 answers to it.
- The path-safety check's fast path refuses what the full check refuses.
- Files go out by ``sendfile`` only on plain TCP: over the HTTPS listener a large cache hit and a
  large download in progress (the tail of the staging file) reach the client intact.
- A hundred readers of one cold download (sent by ``sendfile`` from the staging file) all get
  the verified bytes, and the upstream is asked once.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from proxy.errors import BadRequest
from proxy.server.routing import check_path
from tests.conftest import Dists, ProxyFactory, RunningProxy, proxy_config
from tests.fakes.pypi import FakePyPI
from tests.test_security import _make_tls, _serve_tls

PATHS = [
    "/default/pypi/public/simple/",
    "/default/pypi/public/simple/alpha/",
    "/default/pypi/public/simple/Alpha",
    "/default/pypi/public/files/alpha/alpha-1.0-py3-none-any.whl",
    "/default/pypi/public/",
    "/default/pypi/public",
    "/default/npm/public/left-pad",
    "/default/npm/public/@scope/pkg",
    "/default/npm/public/@scope%2fpkg",
    "/default/npm/public/left-pad/1.0.0",
    "/default/npm/public/left-pad/-/left-pad-1.0.0.tgz",
    "/default/npm/public/-/ping",
    "/default/npm/public/-/whoami",
    "/default/npm/public/-/v1/search",
    "/default/npm/public/-/package/left-pad/dist-tags",
    "/default/npm/public/-/package/left-pad/dist-tags/latest",
    "/default/npm/public/left-pad/-rev/1-abc",
    "/default/npm/public/-/npm/v1/security/advisories/bulk",
    "/default/maven/public/org/example/a/1.0/a-1.0.jar",
    "/default/maven/public",
    "/default/nuget/public/v3/index.json",
    "/default/nuget/public/v3-flatcontainer/pkg/index.json",
    "/default/nuget/public/v3-flatcontainer/pkg/1.0.0/pkg.1.0.0.nupkg",
    "/default/nuget/public/api/v2/package",
    "/default/nuget/public/api/v2/package/pkg/1.0.0",
    "/default/cargo/public/x",
    "/default/pypi",
    "/default",
    "/",
    "/-/healthz",
    "/-/metrics",
    "/-/api/v1/domains",
    "/-/api/v1/domains/default/repositories",
    "/v1/authorization-token",
    "/v1/npm/public/left-pad",
    "/-/npm/public/left-pad",
]
METHODS = ["GET", "HEAD", "PUT", "POST", "DELETE", "PATCH"]


async def test_route_by_format_picks_what_aiohttp_would(proxy: RunningProxy) -> None:
    router = proxy.runner.app.router
    assert "resolve" in vars(router), "route_by_format is installed at startup"
    compared = 0
    for path in PATHS:
        for method in METHODS:
            request = make_mocked_request(method, path, app=proxy.runner.app)
            fast = await router.resolve(request)
            slow = await web.UrlDispatcher.resolve(router, request)
            assert fast.route is slow.route, (method, path)
            assert dict(fast) == dict(slow), (method, path)
            fast_error, slow_error = fast.http_exception, slow.http_exception
            assert type(fast_error) is type(slow_error), (method, path)
            if slow_error is not None and fast_error is not None:
                assert fast_error.headers.get("Allow") == slow_error.headers.get("Allow"), (method, path)
            compared += 1
    assert compared == len(PATHS) * len(METHODS)


@pytest.mark.parametrize(
    "path",
    [
        "/default/pypi/public/simple/../../x/",
        "/default/pypi/public/simple/./alpha/",
        "/default/pypi/public/files/alpha/..",
        "/default/pypi/public/simple/%2e%2e/",
        "/default/pypi/public/simple/%2E./",
        "/default/pypi/public/simple/a%2fb/",
        "/default/pypi/public/simple/a%5cb/",
        "/default/pypi/public/simple/a%00b/",
        "/default/pypi/public/simple/a\\b/",
        "../default/pypi/public/simple/",
        "..",
    ],
)
def test_check_path_refuses_traversal_and_smuggling(path: str) -> None:
    with pytest.raises(BadRequest):
        check_path(path)


@pytest.mark.parametrize(
    "path",
    [
        "/default/pypi/public/simple/alpha/",
        "/default/npm/public/@scope%2fpkg",
        "/default/npm/public/left-pad/-/left-pad-1.0.0.tgz?x=1/..",
        "/default/pypi/public/files/alpha/alpha-1.0.tar.gz",
        "/default/maven/public/org/x/.hidden-is-not-traversal",
    ],
)
def test_check_path_lets_ordinary_paths_through(path: str) -> None:
    check_path(path)  # a dot-file segment is fine: only "." and ".." are refused
    assert not path.startswith(".")


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, str, str, int]:
    digest = hashlib.sha256()
    size = 0
    async with session.get(url) as response:
        async for chunk in response.content.iter_chunked(256 * 1024):
            digest.update(chunk)
            size += len(chunk)
        return response.status, response.headers.get("X-Cache", ""), digest.hexdigest(), size


async def test_large_files_over_https_are_not_sent_raw(pypi: FakePyPI, dists: Dists, tmp_path: Path) -> None:
    """sendfile would write plaintext into the TLS stream: a miss (tail) and a hit both arrive."""
    ca, cert, key = await asyncio.to_thread(_make_tls, tmp_path / "tls")
    runner, url = await _serve_tls(proxy_config(tmp_path / "data", pypi.url), cert, key)
    try:
        context = ssl.create_default_context(cafile=str(ca))
        want = await asyncio.to_thread(lambda: hashlib.sha256(dists.big.read_bytes()).hexdigest())
        file_url = f"{url}/default/pypi/public/files/bigpkg/{dists.big.name}"
        connector = aiohttp.TCPConnector(ssl=context)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
            miss = await _get(session, file_url)
            hit = await _get(session, file_url)
        assert miss[:3] == (200, "MISS", want)
        assert hit[:3] == (200, "HIT", want)
    finally:
        await runner.cleanup()


async def test_hundred_readers_of_one_cold_download(
    proxy_factory: ProxyFactory, pypi: FakePyPI, dists: Dists, http: aiohttp.ClientSession
) -> None:
    """Every reader of the tail gets the verified bytes; one upstream GET."""
    proxy = await proxy_factory(pypi.url)
    want = await asyncio.to_thread(lambda: hashlib.sha256(dists.big.read_bytes()).hexdigest())
    url = proxy.files("bigpkg", dists.big.name)
    results = await asyncio.gather(*(_get(http, url) for _ in range(100)))
    wrong = [r for r in results if r[0] != 200 or r[2] != want]
    assert not wrong, wrong[:3]
    assert {r[1] for r in results} <= {"MISS", "HIT"}
    assert pypi.hits[f"/files/{dists.big.name}"] == 1
