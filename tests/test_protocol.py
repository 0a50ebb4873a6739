"""The simple API as clients see it: negotiation, PEP 658/691/700 fields, errors, path safety."""

from __future__ import annotations

import asyncio
import hashlib

import aiohttp
import pytest
from yarl import URL

from tests.conftest import Dists, RunningProxy, index_rows
from tests.fakes.dists import wheel_metadata
from tests.fakes.pypi import FakePyPI

JSON_V1 = "application/vnd.pypi.simple.v1+json"
HTML_V1 = "application/vnd.pypi.simple.v1+html"


async def _json(http: aiohttp.ClientSession, url: str) -> dict[str, object]:
    async with http.get(url, headers={"Accept": JSON_V1}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith(JSON_V1)
        data: dict[str, object] = await resp.json(content_type=None)
        return data


@pytest.mark.parametrize(
    ("accept", "query", "expected"),
    [
        (JSON_V1, "", JSON_V1),
        (HTML_V1, "", HTML_V1),
        ("text/html", "", "text/html"),
        (None, "", "text/html"),
        (f"{JSON_V1};q=0.1, text/html", "", "text/html"),
        ("application/vnd.pypi.simple.latest+json", "", JSON_V1),
        ("text/html", f"?format={JSON_V1}", JSON_V1),
    ],
)
async def test_content_negotiation(
    proxy: RunningProxy,
    http: aiohttp.ClientSession,
    accept: str | None,
    query: str,
    expected: str,
) -> None:
    headers = {"Accept": accept} if accept else {"Accept": ""}
    async with http.get(proxy.simple() + "alpha/" + query, headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith(expected)
        assert resp.headers["Vary"] == "Accept, Accept-Encoding"


async def test_unacceptable_media_type_is_406(proxy: RunningProxy, http: aiohttp.ClientSession) -> None:
    async with http.get(proxy.simple() + "alpha/", headers={"Accept": "application/xml"}) as resp:
        assert resp.status == 406
        assert (await resp.json())["error"] == "not_acceptable"


async def test_json_page_keeps_pep_700_658_and_592_fields(
    proxy: RunningProxy, pypi: FakePyPI, dists: Dists, http: aiohttp.ClientSession
) -> None:
    page = await _json(http, proxy.simple() + "beta/")
    assert page["meta"] == {"api-version": "1.1", "_last-serial": pypi.serial["beta"]}
    assert page["versions"] == ["1.0"]
    files = {f["filename"]: f for f in page["files"]}  # type: ignore[attr-defined]
    wheel = files[dists.beta.name]
    upstream = {f.filename: f for f in pypi.files("beta")}[dists.beta.name]
    assert wheel["hashes"] == {"sha256": upstream.sha256}
    assert wheel["size"] == upstream.size
    assert wheel["upload-time"] == upstream.upload_time
    assert wheel["core-metadata"] == {"sha256": upstream.core_metadata_sha256}
    assert wheel["url"] == proxy.files("beta", dists.beta.name)
    assert files[dists.beta_sdist.name]["core-metadata"] is False


async def test_html_page_keeps_hash_fragment_and_data_attributes(
    proxy: RunningProxy, pypi: FakePyPI, dists: Dists, tmp_path: object, http: aiohttp.ClientSession
) -> None:
    from tests.fakes.dists import build_wheel

    path = await asyncio.to_thread(build_wheel, dists.root, "delta", "3.0", requires_python=">=3.8")
    await pypi.add_file_async("delta", path, requires_python=">=3.8", yanked="broken build")
    async with http.get(proxy.simple() + "delta/", headers={"Accept": "text/html"}) as resp:
        body = await resp.text()
    upstream = pypi.files("delta")[0]
    assert f"{proxy.files('delta', path.name)}#sha256={upstream.sha256}" in body
    assert 'data-requires-python="&gt;=3.8"' in body
    assert 'data-yanked="broken build"' in body
    assert f'data-core-metadata="sha256={upstream.core_metadata_sha256}"' in body


async def test_upstream_core_metadata_is_served_through_the_cache(
    proxy: RunningProxy, pypi: FakePyPI, dists: Dists, http: aiohttp.ClientSession
) -> None:
    url = proxy.files("alpha", dists.alpha.name) + ".metadata"
    expected = await asyncio.to_thread(wheel_metadata, dists.alpha)
    for status in ("MISS", "HIT"):
        async with http.get(url) as resp:
            assert resp.status == 200
            assert resp.headers["X-Cache"] == status
            assert await resp.read() == expected
    assert pypi.hits[f"/files/{dists.alpha.name}.metadata"] == 1


async def test_metadata_is_extracted_from_cached_wheels_without_upstream_metadata(
    proxy: RunningProxy, dists: Dists, http: aiohttp.ClientSession
) -> None:
    name = dists.gamma_nometa.name
    page = await _json(http, proxy.simple() + "gamma/")
    assert page["files"][0]["core-metadata"] is False  # type: ignore[index]
    async with http.get(proxy.files("gamma", name) + ".metadata") as resp:
        assert resp.status == 404

    async with http.get(proxy.files("gamma", name)) as resp:
        await resp.read()
    expected = await asyncio.to_thread(wheel_metadata, dists.gamma_nometa)
    page = await _json(http, proxy.simple() + "gamma/")
    declared = page["files"][0]["core-metadata"]  # type: ignore[index]
    assert declared == {"sha256": hashlib.sha256(expected).hexdigest()}
    async with http.get(proxy.files("gamma", name) + ".metadata") as resp:
        assert resp.status == 200
        assert await resp.read() == expected


async def test_cached_asset_supports_head_range_and_etag(
    proxy: RunningProxy, dists: Dists, http: aiohttp.ClientSession
) -> None:
    url = proxy.files("beta", dists.beta.name)
    async with http.get(url) as resp:
        body = await resp.read()
    digest = hashlib.sha256(body).hexdigest()
    async with http.head(url) as resp:
        assert resp.status == 200
        assert resp.headers["X-Cache"] == "HIT"
        assert int(resp.headers["Content-Length"]) == len(body)
        assert resp.headers["ETag"] == f'"{digest}"'
    async with http.get(url, headers={"Range": "bytes=10-19"}) as resp:
        assert resp.status == 206
        assert await resp.read() == body[10:20]
    async with http.get(url, headers={"If-None-Match": f'"{digest}"'}) as resp:
        assert resp.status == 304
    async with http.get(url, headers={"Accept-Encoding": "gzip, br"}) as resp:
        assert "Content-Encoding" not in resp.headers
        assert await resp.read() == body


async def test_project_list_shows_stored_projects(
    proxy: RunningProxy, dists: Dists, http: aiohttp.ClientSession
) -> None:
    async with http.get(proxy.files("beta", dists.beta.name)) as resp:
        await resp.read()
    async with http.get(proxy.simple(), headers={"Accept": JSON_V1}) as resp:
        listing = await resp.json(content_type=None)
    assert listing["projects"] == [{"name": "beta"}]
    async with http.get(proxy.simple()) as resp:
        assert '<a href="beta/">beta</a>' in await resp.text()


async def test_names_are_normalized_by_redirect(proxy: RunningProxy, http: aiohttp.ClientSession) -> None:
    async with http.get(proxy.simple() + "Alpha_Pkg.X/", allow_redirects=False) as resp:
        assert resp.status == 301
        assert resp.headers["Location"].endswith("/default/pypi/public/simple/alpha-pkg-x/")
    async with http.get(proxy.simple() + "alpha", allow_redirects=False) as resp:
        assert resp.status == 301
        assert resp.headers["Location"].endswith("/simple/alpha/")


async def test_chained_repository_retains_what_it_fetched(
    proxy: RunningProxy, dists: Dists, http: aiohttp.ClientSession
) -> None:
    page = await _json(http, proxy.simple("team") + "beta/")
    urls = [f["url"] for f in page["files"]]  # type: ignore[attr-defined]
    assert proxy.files("beta", dists.beta.name, repo="team") in urls
    async with http.get(proxy.files("beta", dists.beta.name, repo="team")) as resp:
        assert resp.status == 200
        await resp.read()
    rows = await asyncio.to_thread(
        index_rows, proxy.data_dir, "SELECT repository FROM assets WHERE filename=?", (dists.beta.name,)
    )
    assert ("team",) in rows


@pytest.mark.parametrize(
    ("path", "what"),
    [
        ("/nodomain/pypi/public/simple/alpha/", "domain"),
        ("/default/pypi/nope/simple/alpha/", "repository"),
        ("/default/cargo/public/simple/alpha/", "format"),
        ("/default/pypi/public/nothing-here", None),
    ],
)
async def test_unknown_things_are_404_json(
    proxy: RunningProxy, http: aiohttp.ClientSession, path: str, what: str | None
) -> None:
    async with http.get(proxy.url + path) as resp:
        assert resp.status == 404
        body = await resp.json()
    assert body["error"] == "not_found"
    assert body["request_id"]
    if what:
        assert what in body["message"]


@pytest.mark.parametrize(
    "raw_path",
    [
        "/default/pypi/public/files/alpha/..%2f..%2fetc%2fpasswd",
        "/default/pypi/public/files/alpha/%2e%2e/x.whl",
        "/default/pypi/public/files/%2e%2e/%2e%2e/index.sqlite3",
        "/default/pypi/public/files/alpha/../../x.whl",
        "/default/pypi/public/files/alpha/a%00.whl",
        "/default/pypi/public/simple/a%5cb/",
    ],
)
async def test_path_tricks_are_400(proxy: RunningProxy, http: aiohttp.ClientSession, raw_path: str) -> None:
    async with http.get(URL(proxy.url + raw_path, encoded=True)) as resp:
        assert resp.status == 400
        body = await resp.json()
    assert body["error"] == "bad_request"


@pytest.mark.parametrize(
    "path",
    [
        "/default/pypi/public/simple/-bad-/",
        "/default/pypi/public/files/alpha/.hidden.whl",
    ],
)
async def test_malformed_names_are_400(proxy: RunningProxy, http: aiohttp.ClientSession, path: str) -> None:
    async with http.get(proxy.url + path) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == "bad_request"


async def test_health_and_readiness(proxy: RunningProxy, http: aiohttp.ClientSession) -> None:
    async with http.get(proxy.url + "/-/healthz") as resp:
        assert resp.status == 200
    async with http.get(proxy.url + "/-/readyz") as resp:
        assert resp.status == 200
        assert (await resp.json())["checks"] == {"index": "ok", "blobs": "ok", "tmp": "ok", "audit": "ok"}
