"""npm as a private registry: npm publish, dist-tag, deprecate, unpublish; dependency confusion."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy.app import PIPELINE
from proxy.model import RepoRef
from proxy.storage.catalog import OriginRule
from tests.conftest import proxy_config, serve_config, temp_files
from tests.fakes.npm import FakeNpmRegistry, build_tarball
from tests.npm_clients import npm, npm_publish_doc

TEAM = RepoRef("default", "team")


class Registry:
    """An in-process proxy with repos public (-> fake npm upstream) and team (-> public)."""

    def __init__(self, url: str, runner: web.AppRunner, data_dir: Path) -> None:
        self.url = url
        self.runner = runner
        self.data_dir = data_dir

    def repo(self, name: str) -> str:
        return f"{self.url}/default/npm/{name}/"


@pytest.fixture
async def upstream() -> AsyncIterator[FakeNpmRegistry]:
    async with FakeNpmRegistry() as fake:
        yield fake


@pytest.fixture
async def registry(tmp_path: Path, upstream: FakeNpmRegistry) -> AsyncIterator[Registry]:
    raw = proxy_config(tmp_path / "data", upstream.url, fmt="npm", connection="npmfake", upstream_retries=0)
    _, runner, url = await serve_config(raw)
    yield Registry(url, runner, tmp_path / "data")
    await runner.cleanup()


def _write_package(root: Path, name: str, version: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    manifest = {"name": name, "version": version, "main": "index.js", "license": "MIT"}
    (root / "package.json").write_text(json.dumps(manifest), encoding="utf-8")
    (root / "index.js").write_text(
        f"module.exports = {json.dumps(name + '@' + version)};\n", encoding="utf-8"
    )
    return root


async def _package(root: Path, name: str, version: str) -> Path:
    return await asyncio.to_thread(_write_package, root, name, version)


async def _login(cache: Path, registry: Registry, *repos: str) -> None:
    """npm refuses to publish without a token; any token will do until access control lands."""
    host = registry.url.removeprefix("http:")
    lines = [f"{host}/default/npm/{repo}/:_authToken=placeholder" for repo in repos]
    await asyncio.to_thread(cache.mkdir, parents=True, exist_ok=True)
    await asyncio.to_thread((cache / "npmrc").write_text, "\n".join(lines) + "\n")


async def _installed_version(app: Path, name: str) -> str:
    text = await asyncio.to_thread((app / "node_modules" / name / "package.json").read_text)
    return str(json.loads(text)["version"])


async def test_publish_plain_and_scoped_then_install_downstream(registry: Registry, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    await _login(cache, registry, "public", "team")
    for name in ("plain-lib", "@acme/util"):
        pkg = await _package(tmp_path / name.replace("/", "_"), name, "1.0.0")
        run = await npm("publish", cwd=pkg, registry=registry.repo("public"), cache=cache)
        assert run.ok, run.output
        again = await npm("publish", cwd=pkg, registry=registry.repo("public"), cache=cache)
        assert not again.ok
        assert "cannot publish over the previously published versions" in again.output

    app = await _package(tmp_path / "app", "app", "1.0.0")
    run = await npm(
        "install", "plain-lib", "@acme/util", cwd=app, registry=registry.repo("team"), cache=cache
    )
    assert run.ok, run.output
    assert await _installed_version(app, "plain-lib") == "1.0.0"
    assert await _installed_version(app, "@acme/util") == "1.0.0"
    lock = json.loads(await asyncio.to_thread((app / "package-lock.json").read_text))
    resolved = lock["packages"]["node_modules/@acme/util"]["resolved"]
    assert resolved.startswith(registry.repo("team"))


async def test_dist_tags_deprecate_and_unpublish(registry: Registry, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    await _login(cache, registry, "team")
    repo = registry.repo("team")
    pkg = await _package(tmp_path / "pkg", "@acme/tool", "1.0.0")
    assert (await npm("publish", cwd=pkg, registry=repo, cache=cache)).ok
    await _package(tmp_path / "pkg", "@acme/tool", "2.0.0-rc.1")
    assert (await npm("publish", "--tag", "next", cwd=pkg, registry=repo, cache=cache)).ok

    tags = await npm("dist-tag", "ls", "@acme/tool", cwd=pkg, registry=repo, cache=cache)
    assert "latest: 1.0.0" in tags.output and "next: 2.0.0-rc.1" in tags.output
    assert (
        await npm("dist-tag", "add", "@acme/tool@2.0.0-rc.1", "beta", cwd=pkg, registry=repo, cache=cache)
    ).ok
    assert (await npm("dist-tag", "rm", "@acme/tool", "next", cwd=pkg, registry=repo, cache=cache)).ok
    tags = await npm("dist-tag", "ls", "@acme/tool", cwd=pkg, registry=repo, cache=cache)
    assert "beta: 2.0.0-rc.1" in tags.output and "next" not in tags.output

    run = await npm("deprecate", "@acme/tool@1.0.0", "use 2.x", cwd=pkg, registry=repo, cache=cache)
    assert run.ok, run.output
    view = await npm("view", "@acme/tool@1.0.0", "deprecated", cwd=pkg, registry=repo, cache=cache)
    assert "use 2.x" in view.output
    run = await npm("deprecate", "@acme/tool@1.0.0", "", cwd=pkg, registry=repo, cache=cache)  # undeprecate
    assert run.ok, run.output
    view = await npm("view", "@acme/tool@1.0.0", "deprecated", cwd=pkg, registry=repo, cache=cache)
    assert "use 2.x" not in view.output, view.output

    run = await npm("unpublish", "@acme/tool@2.0.0-rc.1", cwd=pkg, registry=repo, cache=cache)
    assert run.ok, run.output
    versions = await npm("view", "@acme/tool", "versions", "--json", cwd=pkg, registry=repo, cache=cache)
    assert json.loads(versions.output) in ("1.0.0", ["1.0.0"])
    run = await npm("unpublish", "@acme/tool", "--force", cwd=pkg, registry=repo, cache=cache)
    assert run.ok, run.output
    gone = await npm("view", "@acme/tool", cwd=pkg, registry=repo, cache=cache)
    assert not gone.ok and "404" in gone.output


async def test_internal_scope_is_never_replaced_by_a_public_one(
    registry: Registry, upstream: FakeNpmRegistry, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    evil = await asyncio.to_thread(build_tarball, tmp_path / "evil", "@acme/x", "9.9.9")
    await upstream.add_version_async("@acme/x", evil, version="9.9.9")
    cache = tmp_path / "cache"
    await _login(cache, registry, "team")
    pkg = await _package(tmp_path / "ours", "@acme/x", "1.0.0")
    # Before the first publish the public 9.9.9 is still visible, and npm 11 refuses to tag a
    # lower version latest implicitly: the tag is given (or an origin rule is set first).
    run = await npm("publish", "--tag", "latest", cwd=pkg, registry=registry.repo("team"), cache=cache)
    assert run.ok, run.output

    app = await _package(tmp_path / "app", "app", "1.0.0")
    run = await npm("install", "@acme/x", cwd=app, registry=registry.repo("team"), cache=cache)
    assert run.ok, run.output
    assert await _installed_version(app, "@acme/x") == "1.0.0"
    async with http.get(registry.repo("team") + "@acme%2fx") as resp:
        doc = await resp.json()
    assert list(doc["versions"]) == ["1.0.0"]
    async with http.get(registry.repo("team") + "@acme/x/-/x-9.9.9.tgz") as resp:
        assert resp.status == 404
        body = await resp.json()
    assert body["error"] == "blocked_by_origin"


async def test_scope_rule_blocks_upstream_before_anything_is_published(
    registry: Registry, upstream: FakeNpmRegistry, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    lure = await asyncio.to_thread(build_tarball, tmp_path / "lure", "@corp/secret", "1.0.0")
    await upstream.add_version_async("@corp/secret", lure, version="1.0.0")
    packages = registry.runner.app[PIPELINE].packages
    await packages.put_origin_rule(TEAM, "npm", OriginRule("@corp/*", "ALLOW", "BLOCK"))
    async with http.get(registry.repo("team") + "@corp%2fsecret") as resp:
        assert resp.status == 404
        assert "@corp/*" in (await resp.json())["message"]
    async with http.get(registry.repo("public") + "@corp%2fsecret") as resp:
        assert resp.status == 200  # the rule belongs to team only


async def _put(http: aiohttp.ClientSession, url: str, doc: dict[str, object]) -> tuple[int, str]:
    async with http.put(url, json=doc) as resp:
        return resp.status, await resp.text()


async def test_bad_publishes_are_400_and_keep_nothing(
    registry: Registry, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    tarball = await asyncio.to_thread(build_tarball, tmp_path / "t", "good-pkg", "1.0.0")
    data = await asyncio.to_thread(tarball.read_bytes)
    url = registry.repo("team") + "good-pkg"
    cases: list[tuple[dict[str, object], str]] = [
        (npm_publish_doc("good-pkg", "1.0.0", data, integrity="sha512-" + "A" * 86 + "=="), "integrity"),
        (npm_publish_doc("other-pkg", "1.0.0", data), "the URL"),
        (npm_publish_doc("good-pkg", "2.0.0", data), "package.json says"),
        ({"name": "good-pkg", "versions": {}}, "_attachments"),
        # A dist-tag npm would refuse: refused before the version is committed, not after.
        ({**npm_publish_doc("good-pkg", "1.0.0", data), "dist-tags": {"1.x": "1.0.0"}}, "invalid tag"),
    ]
    for doc, message in cases:
        status, text = await _put(http, url, doc)
        assert status == 400, text
        assert message in text
    async with http.put(url, data=b"{not json") as resp:
        assert resp.status == 400
    assert await asyncio.to_thread(temp_files, registry.data_dir) == []
    async with http.get(url) as resp:  # nothing of good-pkg was kept (its name is not upstream)
        assert resp.status == 404, await resp.text()
    status, text = await _put(http, url, npm_publish_doc("good-pkg", "1.0.0", data))
    assert status == 201, text
