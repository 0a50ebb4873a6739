"""Private packages: twine uploads, pip installs them back, chains merge, origin controls protect."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import aiohttp
import pytest

from proxy.config import RepositoryConfig
from proxy.model import RepoRef
from proxy.storage.catalog import OriginRule, QuarantineEntry
from tests.clients import installed, pip_install, twine_upload, upload_form, uv_install
from tests.conftest import Dists, ProxyFactory, RunningProxy, blob_files, index_rows, temp_files
from tests.fakes.dists import build_sdist, build_wheel
from tests.fakes.pypi import FakePyPI

JSON = {"Accept": "application/vnd.pypi.simple.v1+json"}
PUBLIC = RepoRef("default", "public")
TEAM = RepoRef("default", "team")


async def _build(root: Path, name: str, version: str, *, sdist: bool = False, **kw: object) -> Path:
    builder = build_sdist if sdist else build_wheel
    return await asyncio.to_thread(builder, root, name, version, **kw)  # type: ignore[arg-type]


async def _page_files(http: aiohttp.ClientSession, url: str) -> dict[str, dict[str, object]]:
    async with http.get(url, headers=JSON) as resp:
        if resp.status != 200:
            return {}
        page = await resp.json(content_type=None)
    return {f["filename"]: f for f in page["files"]}


async def _post(
    http: aiohttp.ClientSession, url: str, path: Path, **kw: str
) -> tuple[int, dict[str, object]]:
    data = await asyncio.to_thread(path.read_bytes)
    name = kw.pop("name", path.name.split("-")[0])
    version = kw.pop("version", path.name.split("-")[1].removesuffix(".tar.gz"))
    async with http.post(url, data=upload_form(path, data, name=name, version=version, **kw)) as resp:
        return resp.status, await resp.json()


async def test_twine_publishes_and_pip_installs_from_the_repo_and_downstream(
    proxy: RunningProxy, tmp_path: Path
) -> None:
    wheel = await _build(tmp_path, "internal-tool", "1.0", requires=["beta"])
    sdist = await _build(tmp_path, "internal-tool", "1.0", sdist=True)
    first = await twine_upload(proxy.upload_url("public"), wheel, sdist)
    assert first.ok, first.output

    here = await pip_install(proxy.simple("public"), tmp_path / "here", "internal-tool")
    assert here.ok, here.output
    assert await installed(tmp_path / "here") >= {"internal_tool", "beta"}
    downstream = await pip_install(proxy.simple("team"), tmp_path / "down", "internal-tool")
    assert downstream.ok, downstream.output
    assert "internal_tool" in await installed(tmp_path / "down")
    with_uv = await uv_install(proxy.simple("team"), tmp_path / "uv", "internal-tool")
    assert with_uv.ok, with_uv.output
    assert await installed(tmp_path / "uv") >= {"internal_tool", "beta"}

    again = await twine_upload(proxy.upload_url("public"), wheel)
    assert not again.ok
    assert "409" in again.output and "already exists" in again.output
    skipped = await twine_upload(proxy.upload_url("public"), wheel, sdist, skip_existing=True)
    assert skipped.ok, skipped.output
    assert "Skipping" in skipped.output


async def test_uploaded_wheel_serves_its_core_metadata(
    proxy: RunningProxy, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    wheel = await _build(tmp_path, "meta-pkg", "2.0", requires_python=">=3.9")
    status, _ = await _post(http, proxy.upload_url(), wheel, name="meta-pkg", requires_python=">=3.9")
    assert status == 201
    files = await _page_files(http, proxy.simple() + "meta-pkg/")
    entry = files[wheel.name]
    assert entry["requires-python"] == ">=3.9"
    meta_hash = entry["core-metadata"]["sha256"]  # type: ignore[index]
    async with http.get(proxy.files("meta-pkg", wheel.name) + ".metadata") as resp:
        body = await resp.read()
    assert hashlib.sha256(body).hexdigest() == meta_hash
    assert b"Name: meta-pkg" in body


async def test_concurrent_uploads_of_one_file_one_wins(
    proxy: RunningProxy, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    wheel = await _build(tmp_path, "racer", "1.0", payload_size=256 * 1024)
    results = await asyncio.gather(*(_post(http, proxy.upload_url(), wheel) for _ in range(20)))
    statuses = sorted(status for status, _ in results)
    assert statuses == [201] + [409] * 19
    rows = await asyncio.to_thread(
        index_rows, proxy.data_dir, "SELECT digest FROM assets WHERE filename=?", (wheel.name,)
    )
    assert len(rows) == 1
    assert len(await asyncio.to_thread(blob_files, proxy.data_dir)) == 2  # the wheel + its METADATA
    assert await asyncio.to_thread(temp_files, proxy.data_dir) == []


async def test_chain_merges_three_sources_and_survives_an_outage(
    proxy: RunningProxy, pypi: FakePyPI, dists: Dists, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    packages = proxy.pipeline.packages
    for ref in (PUBLIC, TEAM):  # publishing here would otherwise block the upstream versions
        await packages.put_origin_rule(ref, "pypi", OriginRule("beta", "ALLOW", "ALLOW"))
    shared = await _build(tmp_path / "p", "beta", "2.0")
    local = await _build(tmp_path / "t", "beta", "3.0")
    clash = await _build(tmp_path / "c", "beta", "1.0", summary="team's own build")  # same filename
    assert (await _post(http, proxy.upload_url("public"), shared))[0] == 201
    assert (await _post(http, proxy.upload_url("team"), local))[0] == 201
    assert (await _post(http, proxy.upload_url("team"), clash))[0] == 201

    files = await _page_files(http, proxy.simple("team") + "beta/")
    assert {shared.name, local.name, clash.name, dists.beta_sdist.name} <= set(files)
    clash_sha = hashlib.sha256(await asyncio.to_thread(clash.read_bytes)).hexdigest()
    assert files[clash.name]["hashes"] == {"sha256": clash_sha}  # the nearest source wins

    async with http.get(proxy.files("beta", dists.beta_sdist.name, repo="team")) as resp:
        assert resp.status == 200
        await resp.read()
    await pypi.stop_listening()
    run = await pip_install(proxy.simple("team"), tmp_path / "down", "beta==3.0")
    assert run.ok, run.output
    async with http.get(proxy.files("beta", dists.beta_sdist.name, repo="team")) as resp:
        assert resp.status == 200
        assert resp.headers["X-Cache"] == "HIT"


async def test_dependency_confusion_is_blocked_until_allowed(
    proxy: RunningProxy, pypi: FakePyPI, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    attacker = await _build(tmp_path / "evil", "mypkg", "9.9")
    await pypi.add_file_async("mypkg", attacker)
    ours = await _build(tmp_path / "ours", "mypkg", "1.0")
    assert (await _post(http, proxy.upload_url("team"), ours))[0] == 201

    run = await pip_install(proxy.simple("team"), tmp_path / "t1", "mypkg")
    assert run.ok, run.output
    assert await asyncio.to_thread((tmp_path / "t1" / "mypkg-1.0.dist-info").is_dir)
    files = await _page_files(http, proxy.simple("team") + "mypkg/")
    assert set(files) == {ours.name}
    async with http.get(proxy.files("mypkg", attacker.name, repo="team")) as resp:
        assert resp.status == 404
        body = await resp.json()
    assert body["error"] == "blocked_by_origin"
    assert "published in this repository" in body["message"]

    await proxy.pipeline.packages.put_origin_rule(TEAM, "pypi", OriginRule("mypkg", "ALLOW", "ALLOW"))
    files = await _page_files(http, proxy.simple("team") + "mypkg/")
    assert set(files) == {ours.name, attacker.name}


async def test_prefix_rule_blocks_publishing(
    proxy: RunningProxy, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    await proxy.pipeline.packages.put_origin_rule(TEAM, "pypi", OriginRule("vendor-*", "BLOCK", "ALLOW"))
    wheel = await _build(tmp_path, "vendor-lib", "1.0")
    status, body = await _post(http, proxy.upload_url("team"), wheel, name="vendor-lib")
    assert status == 403
    assert body["error"] == "publish_blocked" and "vendor-*" in str(body["message"])


async def test_quarantine_hides_even_cached_versions(
    proxy: RunningProxy, dists: Dists, http: aiohttp.ClientSession
) -> None:
    url = proxy.files("beta", dists.beta.name)
    async with http.get(url) as resp:
        assert resp.status == 200
    async with http.get(proxy.files("beta", dists.beta.name, repo="team")) as resp:
        assert resp.status == 200  # team keeps its own copy ...
    entry = QuarantineEntry("beta@1.0", "known malicious")
    await proxy.pipeline.packages.put_quarantine(PUBLIC, "pypi", entry)
    async with http.get(url) as resp:
        assert resp.status == 404
        body = await resp.json()
    assert body["error"] == "blocked_by_origin" and "known malicious" in body["message"]
    async with http.get(proxy.simple() + "beta/", headers=JSON) as resp:
        assert resp.status == 404
    async with http.get(proxy.files("beta", dists.beta.name, repo="team")) as resp:
        assert resp.status == 404  # ... which a quarantine upstream of it still stops
    await proxy.pipeline.packages.delete_quarantine(PUBLIC, "pypi", "beta@1.0")
    async with http.get(url) as resp:
        assert resp.status == 200


async def test_minimum_release_age_hides_young_upstream_versions(
    proxy: RunningProxy, pypi: FakePyPI, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    old = await _build(tmp_path / "o", "aging", "1.0")
    young = await _build(tmp_path / "y", "aging", "2.0")
    await pypi.add_file_async("aging", old, upload_time="2020-01-01T00:00:00.000000Z")
    await pypi.add_file_async("aging", young)  # uploaded now
    await proxy.pipeline.registry.create_repository(
        "default", RepositoryConfig("public", ("fake",), min_release_age=3 * 86400), replace=True
    )
    proxy.pipeline.resolver.catalog_changed("default", "pypi")
    files = await _page_files(http, proxy.simple() + "aging/")
    assert set(files) == {old.name}
    async with http.get(proxy.files("aging", young.name)) as resp:
        assert resp.status == 404
        assert "minimum release age" in (await resp.json())["message"]


async def test_version_status_changes_what_pip_sees(
    proxy: RunningProxy, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    packages = proxy.pipeline.packages
    wheel = await _build(tmp_path, "stateful", "1.0")
    assert (await _post(http, proxy.upload_url("team"), wheel))[0] == 201
    url = proxy.files("stateful", wheel.name, repo="team")

    await packages.set_status(TEAM, "pypi", "stateful", "1.0", "Unlisted")
    assert await _page_files(http, proxy.simple("team") + "stateful/") == {}
    assert not (await pip_install(proxy.simple("team"), tmp_path / "u", "stateful")).ok
    async with http.get(url) as resp:
        assert resp.status == 200  # unlisted: still downloadable by exact URL

    await packages.set_status(TEAM, "pypi", "stateful", "1.0", "Archived")
    async with http.get(url) as resp:
        assert resp.status == 404
        assert "archived" in (await resp.json())["message"]

    await packages.set_status(TEAM, "pypi", "stateful", "1.0", "Published")
    assert (await pip_install(proxy.simple("team"), tmp_path / "p", "stateful")).ok

    await packages.copy(TEAM, PUBLIC, "pypi", "stateful", "1.0")
    assert wheel.name in await _page_files(http, proxy.simple("public") + "stateful/")

    await packages.set_status(TEAM, "pypi", "stateful", "1.0", "Disposed")
    described = await packages.describe(TEAM, "pypi", "stateful")
    assert described["versions"][0]["status"] == "Disposed"
    async with http.get(proxy.files("stateful", wheel.name, repo="public")) as resp:
        assert resp.status == 200  # the promoted copy shares the blob and survives
    await packages.delete(PUBLIC, "pypi", "stateful", "1.0")
    for repo in ("public", "team"):  # gone from the chain too
        async with http.get(proxy.files("stateful", wheel.name, repo=repo)) as resp:
            assert resp.status == 404


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "other"}, "does not match"),
        ({"version": "9.9"}, "does not match"),
        ({"sha256_digest": "0" * 64}, "declared digest"),
        ({":action": "submit"}, "unsupported :action"),
        ({"name": ""}, "'name' and 'version'"),
    ],
)
async def test_bad_uploads_are_400_and_store_nothing(
    proxy: RunningProxy, dists: Dists, http: aiohttp.ClientSession, fields: dict[str, str], message: str
) -> None:
    status, body = await _post(http, proxy.upload_url(), dists.alpha, **{"name": "alpha", **fields})
    assert status == 400, body
    assert message in str(body["message"])
    assert await asyncio.to_thread(blob_files, proxy.data_dir) == []
    assert await asyncio.to_thread(temp_files, proxy.data_dir) == []


async def test_archive_metadata_must_match_the_form(
    proxy: RunningProxy, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    real = await _build(tmp_path, "inner", "1.0")
    renamed = tmp_path / "outer-1.0-py3-none-any.whl"
    await asyncio.to_thread(renamed.write_bytes, await asyncio.to_thread(real.read_bytes))
    status, body = await _post(http, proxy.upload_url(), renamed, name="outer", version="1.0")
    assert status == 400
    assert "metadata inside" in str(body["message"])


@pytest.mark.parametrize("filename", ["../evil-1.0-py3-none-any.whl", "evil.exe", ".hidden-1.0.tar.gz"])
async def test_path_tricks_in_upload_filenames_are_400(
    proxy: RunningProxy, http: aiohttp.ClientSession, filename: str
) -> None:
    form = aiohttp.FormData()
    for key, value in {":action": "file_upload", "name": "evil", "version": "1.0"}.items():
        form.add_field(key, value)
    form.add_field("content", b"PK\x03\x04", filename=filename)
    async with http.post(proxy.upload_url(), data=form) as resp:
        assert resp.status == 400
    assert await asyncio.to_thread(temp_files, proxy.data_dir) == []


async def test_oversized_upload_is_413(
    proxy_factory: ProxyFactory, pypi: FakePyPI, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    proxy = await proxy_factory(pypi.url, max_upload_size="64KiB")
    wheel = await _build(tmp_path, "huge", "1.0", payload_size=200 * 1024)
    status, body = await _post(http, proxy.upload_url(), wheel)
    assert status == 413
    assert "max_upload_size" in str(body["message"])
    assert await asyncio.to_thread(temp_files, proxy.data_dir) == []
