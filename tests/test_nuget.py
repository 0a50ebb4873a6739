"""NuGet through the proxy: NuGet.exe (on Mono) and raw HTTP against a fake nuget.org v3 feed.

The upstream is :class:`tests.fakes.nuget.FakeNuGetFeed` serving real ``.nupkg`` files built in
the test; the proxy is the real application with one NuGet connection (``nugetfake``, its URL
the fake's service index) behind ``public`` and the chain ``team`` → ``public``. NuGet.exe runs
with isolated caches, so every package it installs really comes through the proxy.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import io
import json
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import ProxyFactory, RunningProxy, index_rows
from tests.fakes.nuget import FakeNuGetFeed, build_nupkg
from tests.fakes.server import Fault
from tests.nuget_clients import NUGET_MISSING, nuget, write_nuget_config

UPSTREAM = "nugetfake"
needs_nuget = pytest.mark.skipif(NUGET_MISSING is not None, reason=NUGET_MISSING or "")


@dataclass(frozen=True)
class Nupkgs:
    alpha: Path  # Acme.Alpha 1.0.0 -> Acme.Beta [1.0.0, )
    beta: Path  # Acme.Beta 1.0.0
    beta_11: Path  # Acme.Beta 1.1.0
    gamma: Path  # Team.Gamma 2.0.0 -> Acme.Alpha, pushed by the tests
    gamma_3: Path  # Team.Gamma 3.0.0


@pytest.fixture(scope="session")
def nupkgs(tmp_path_factory: pytest.TempPathFactory) -> Nupkgs:
    root = tmp_path_factory.mktemp("proxy-nupkgs")
    return Nupkgs(
        alpha=build_nupkg(root, "Acme.Alpha", "1.0.0", [("Acme.Beta", "1.0.0")]),
        beta=build_nupkg(root, "Acme.Beta", "1.0.0"),
        beta_11=build_nupkg(root, "Acme.Beta", "1.1.0"),
        gamma=build_nupkg(root, "Team.Gamma", "2.0.0", [("Acme.Alpha", "1.0.0")], description="internal"),
        gamma_3=build_nupkg(root, "Team.Gamma", "3.0.0", description="internal, newer"),
    )


async def start_feed(nupkgs: Nupkgs, **kwargs: Any) -> FakeNuGetFeed:
    fake = FakeNuGetFeed(**kwargs)
    await fake.start()
    for path in (nupkgs.alpha, nupkgs.beta, nupkgs.beta_11):
        await fake.add_package_async(path)
    return fake


@pytest.fixture
async def feed(nupkgs: Nupkgs) -> AsyncIterator[FakeNuGetFeed]:
    fake = await start_feed(nupkgs, hash_in_registration=True)
    yield fake
    await fake.close()


@pytest.fixture
async def proxy(proxy_factory: ProxyFactory, feed: FakeNuGetFeed) -> RunningProxy:
    return await proxy_factory(feed.url, fmt="nuget", connection=UPSTREAM)


def feed_url(proxy: RunningProxy, repo: str = "public") -> str:
    return f"{proxy.url}/default/nuget/{repo}/v3/index.json"


async def get_json(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url, headers={"Accept-Encoding": "gzip"}) as resp:
        body = await resp.read()
        if resp.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        return resp.status, json.loads(body) if body else None


async def install(
    tmp_path: Path, name: str, source: str, package: str, version: str | None = None
) -> tuple[bool, str, Path]:
    work = tmp_path / name
    config = await write_nuget_config(work / "NuGet.Config", source)
    args = ["install", package, "-OutputDirectory", str(work / "out")]
    if version:
        args += ["-Version", version]
    run = await nuget(args, cwd=await asyncio.to_thread(_mkdir, work), config_file=config)
    return run.ok, run.output, work / "out"


def _sha512_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.sha512(data).digest()).decode()


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


async def installed(out: Path) -> set[str]:
    return set(await asyncio.to_thread(lambda: [p.name for p in out.iterdir()] if out.exists() else []))


async def push(tmp_path: Path, proxy: RunningProxy, repo: str, package: Path) -> tuple[bool, str]:
    work = tmp_path / f"push-{package.name}"
    config = await write_nuget_config(work / "NuGet.Config", feed_url(proxy, repo), api_key="any-key")
    run = await nuget(["push", str(package), "-Source", feed_url(proxy, repo)], cwd=work, config_file=config)
    return run.ok, run.output


# --- NuGet.exe ---------------------------------------------------------------------------------


@needs_nuget
@pytest.mark.timeout(300)
async def test_install_cold_warm_and_with_the_upstream_down(
    proxy: RunningProxy, feed: FakeNuGetFeed, tmp_path: Path
) -> None:
    ok, output, out = await install(tmp_path, "cold", feed_url(proxy), "Acme.Alpha", "1.0.0")
    assert ok, output
    assert await installed(out) == {"Acme.Alpha.1.0.0", "Acme.Beta.1.0.0"}
    data = await asyncio.to_thread((out / "Acme.Beta.1.0.0" / "Acme.Beta.1.0.0.nupkg").read_bytes)
    beta = feed.get("Acme.Beta", "1.0.0")
    assert beta is not None and _sha512_b64(data) == beta.sha512
    fetched = feed.hits[feed.nupkg_path("Acme.Beta", "1.0.0")]
    assert fetched == 1

    await feed.stop_listening()
    ok, output, out = await install(tmp_path, "down", feed_url(proxy), "Acme.Alpha", "1.0.0")
    assert ok, output
    assert await installed(out) == {"Acme.Alpha.1.0.0", "Acme.Beta.1.0.0"}
    ok, output, out = await install(tmp_path, "chain", feed_url(proxy, "team"), "Acme.Alpha", "1.0.0")
    assert ok, output
    await feed.resume_listening()
    assert feed.hits[feed.nupkg_path("Acme.Beta", "1.0.0")] == fetched


@needs_nuget
@pytest.mark.timeout(300)
async def test_linked_registration_pages_are_followed(
    proxy_factory: ProxyFactory, nupkgs: Nupkgs, tmp_path: Path
) -> None:
    fake = await start_feed(nupkgs, inline_threshold=1, page_size=1)
    try:
        proxy = await proxy_factory(fake.url, fmt="nuget", connection=UPSTREAM)
        ok, output, out = await install(tmp_path, "linked", feed_url(proxy), "Acme.Beta")
        assert ok, output
        assert await installed(out) == {"Acme.Beta.1.1.0"}  # the newest, found on a linked page
        assert any("/page/" in r.path for r in fake.requests)
    finally:
        await fake.close()


@needs_nuget
@pytest.mark.timeout(300)
async def test_push_install_downstream_conflict_unlist_and_relist(
    proxy: RunningProxy, feed: FakeNuGetFeed, nupkgs: Nupkgs, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with http.post(
        f"{proxy.url}/-/api/v1/domains/default/repositories",
        json={"name": "consumers", "upstreams": ["team"]},
    ) as resp:
        assert resp.status == 201
    ok, output = await push(tmp_path, proxy, "team", nupkgs.gamma)
    assert ok, output
    ok, output = await push(tmp_path, proxy, "team", nupkgs.gamma_3)
    assert ok, output
    ok, output = await push(tmp_path / "again", proxy, "team", nupkgs.gamma)
    assert not ok and "409" in output, output

    # A downstream repository installs the pushed package and its upstream dependencies.
    ok, output, out = await install(tmp_path, "consumer", feed_url(proxy, "consumers"), "Team.Gamma", "2.0.0")
    assert ok, output
    assert await installed(out) == {"Team.Gamma.2.0.0", "Acme.Alpha.1.0.0", "Acme.Beta.1.0.0"}

    # Search merges the repository's packages with the upstream's.
    status, found = await get_json(http, f"{proxy.url}/default/nuget/team/v3/query?q=a&prerelease=false")
    assert status == 200
    assert {hit["id"] for hit in found["data"]} >= {"Team.Gamma", "Acme.Alpha", "Acme.Beta"}
    gamma = next(hit for hit in found["data"] if hit["id"] == "Team.Gamma")
    assert gamma["version"] == "3.0.0" and gamma["registration"].startswith(proxy.url)

    # delete = unlist: gone from search and "latest", still installable by exact version.
    work = tmp_path / "delete"
    config = await write_nuget_config(work / "NuGet.Config", feed_url(proxy, "team"), api_key="any-key")
    run = await nuget(
        ["delete", "Team.Gamma", "3.0.0", "-Source", feed_url(proxy, "team")], cwd=work, config_file=config
    )
    assert run.ok, run.output
    status, found = await get_json(http, f"{proxy.url}/default/nuget/team/v3/query?q=gamma")
    assert [hit["version"] for hit in found["data"]] == ["2.0.0"]
    _, reg = await get_json(http, f"{proxy.url}/default/nuget/team/v3/registration/team.gamma/index.json")
    listed = {
        leaf["catalogEntry"]["version"]: leaf["catalogEntry"]["listed"] for leaf in reg["items"][0]["items"]
    }
    assert listed == {"2.0.0": True, "3.0.0": False}
    ok, output, out = await install(tmp_path, "exact", feed_url(proxy, "team"), "Team.Gamma", "3.0.0")
    assert ok, output

    # Relisted through the admin API.
    api = f"{proxy.url}/-/api/v1/domains/default/repositories/team"
    url = f"{api}/packages/nuget/team.gamma/versions/3.0.0/status"
    async with http.put(url, json={"status": "Published"}) as resp:
        assert resp.status == 200, await resp.text()
    _, found = await get_json(http, f"{proxy.url}/default/nuget/team/v3/query?q=gamma")
    assert [hit["version"] for hit in found["data"]] == ["3.0.0"]


# --- raw HTTP ----------------------------------------------------------------------------------


async def test_service_index_and_documents_point_at_the_proxy(
    proxy: RunningProxy, feed: FakeNuGetFeed, http: aiohttp.ClientSession
) -> None:
    status, index = await get_json(http, feed_url(proxy))
    assert status == 200
    types = {r["@type"] for r in index["resources"]}
    assert {"PackageBaseAddress/3.0.0", "RegistrationsBaseUrl/3.6.0", "PackagePublish/2.0.0"} <= types
    assert {"SearchQueryService", "SearchAutocompleteService"} <= types
    assert all(r["@id"].startswith(f"{proxy.url}/default/nuget/public/") for r in index["resources"])

    base = f"{proxy.url}/default/nuget/public"
    status, versions = await get_json(http, f"{base}/v3-flatcontainer/ACME.Beta/index.json")
    assert status == 200 and versions == {"versions": ["1.0.0", "1.1.0"]}
    status, reg = await get_json(http, f"{base}/v3/registration/acme.alpha/index.json")
    assert status == 200
    text = json.dumps(reg)
    assert feed.origin not in text  # every URL rewritten
    entry = reg["items"][0]["items"][0]["catalogEntry"]
    assert entry["dependencyGroups"][0]["dependencies"][0]["id"] == "Acme.Beta"
    assert entry["packageContent"] == f"{base}/v3-flatcontainer/acme.alpha/1.0.0/acme.alpha.1.0.0.nupkg"
    status, leaf = await get_json(http, f"{base}/v3/registration/acme.alpha/1.0.0.json")
    assert status == 200 and leaf["listed"] is True

    async with http.get(f"{base}/v3-flatcontainer/acme.beta/1.0.0/acme.beta.nuspec") as resp:
        assert resp.status == 200
        assert b"<id>Acme.Beta</id>" in await resp.read()
    status, auto = await get_json(http, f"{base}/v3/autocomplete?q=acme")
    assert status == 200 and {"Acme.Alpha", "Acme.Beta"} <= set(auto["data"])
    status, missing = await get_json(http, f"{base}/v3/registration/nothing.here/index.json")
    assert status == 404 and "nothing.here" in missing["message"]


async def test_a_package_whose_bytes_do_not_match_the_registration_hash_is_never_cached(
    proxy: RunningProxy, feed: FakeNuGetFeed, http: aiohttp.ClientSession
) -> None:
    path = feed.nupkg_path("Acme.Beta", "1.1.0")
    feed.faults[path] = Fault("wrong_bytes")
    url = f"{proxy.url}/default/nuget/public/v3-flatcontainer/acme.beta/1.1.0/acme.beta.1.1.0.nupkg"
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.get(url) as resp:
            await resp.read()
    rows = await asyncio.to_thread(
        index_rows, proxy.data_dir, "SELECT 1 FROM assets WHERE filename=?", ("acme.beta.1.1.0.nupkg",)
    )
    assert rows == []
    del feed.faults[path]
    async with http.get(url) as resp:
        assert resp.status == 200
        beta = feed.get("Acme.Beta", "1.1.0")
        assert beta is not None and _sha512_b64(await resp.read()) == beta.sha512


async def test_pushes_that_are_not_packages_are_refused(
    proxy: RunningProxy, http: aiohttp.ClientSession, nupkgs: Nupkgs
) -> None:
    url = f"{proxy.url}/default/nuget/team/api/v2/package"

    async def put(data: bytes, filename: str = "package.nupkg") -> tuple[int, str]:
        form = aiohttp.FormData()
        form.add_field("package", data, filename=filename, content_type="application/octet-stream")
        async with http.put(url, data=form) as resp:
            return resp.status, (await resp.json())["message"]

    status, message = await put(b"not a zip")
    assert status == 400 and "zip" in message
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr(
            "a.nuspec", "<package><metadata><id>A</id><version>1.0</version></metadata></package>"
        )
        archive.writestr("b.nuspec", "<package/>")
    status, message = await put(buf.getvalue())
    assert status == 400 and "exactly one .nuspec" in message
    status, message = await put(await asyncio.to_thread(nupkgs.beta.read_bytes), "Acme.Beta.1.0.0.snupkg")
    assert status == 400 and "symbol packages" in message
    async with http.put(url, data=b"raw") as resp:
        assert resp.status == 400


async def test_search_without_the_upstream_answers_from_the_repository(
    proxy: RunningProxy, feed: FakeNuGetFeed, http: aiohttp.ClientSession
) -> None:
    base = f"{proxy.url}/default/nuget/public"
    async with http.get(f"{base}/v3-flatcontainer/acme.beta/1.0.0/acme.beta.1.0.0.nupkg") as resp:
        assert resp.status == 200 and await resp.read()  # now the repository holds Acme.Beta
    await feed.stop_listening()
    async with http.get(f"{proxy.url}/default/nuget/public/v3/query?q=beta") as resp:
        assert resp.status == 200 and resp.headers["X-Cache"] == "LOCAL"
        found = await resp.json()
    await feed.resume_listening()
    assert [hit["id"] for hit in found["data"]] == ["Acme.Beta"], found


async def test_origin_rules_go_by_id_prefix(
    proxy: RunningProxy, http: aiohttp.ClientSession, nupkgs: Nupkgs
) -> None:
    api = f"{proxy.url}/-/api/v1/domains/default/repositories/team/origin-rules/nuget"
    async with http.put(api, json={"pattern": "Team.*", "publish": "BLOCK", "upstream": "ALLOW"}) as resp:
        assert resp.status in {200, 201}, await resp.text()
        assert (await resp.json())["pattern"] == "team.*"
    form = aiohttp.FormData()
    data = await asyncio.to_thread(nupkgs.gamma.read_bytes)
    form.add_field("package", data, filename="package.nupkg", content_type="application/octet-stream")
    async with http.put(f"{proxy.url}/default/nuget/team/api/v2/package", data=form) as resp:
        assert resp.status == 403
        assert "team.*" in (await resp.json())["message"]
