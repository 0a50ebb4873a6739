"""npm through the proxy: the real npm client and raw HTTP against a fake npm registry upstream.

The upstream is :class:`tests.fakes.npm.FakeNpmRegistry` serving tarballs made by the real
``npm pack``; the proxy is the real application built by ``build_app`` with one npm connection
(``npmfake``) behind repository ``public`` and the chain ``team`` → ``public``. npm runs isolated
(tests/npm_clients.py) with a fresh cache per run, so every tarball it installs really comes
through the proxy. Nothing here needs the internet except the opt-in live test at the end.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy
from yarl import URL

from proxy.app import build_app
from proxy.config import Overrides, load_config
from tests.conftest import ProxyFactory, RunningProxy, index_rows, temp_files
from tests.fakes.npm import ABBREVIATED, FakeNpmRegistry, Fault, FaultKind, build_tarball
from tests.npm_clients import npm, npm_env

FULL = "application/json"
# What npm itself sends for packuments.
NPM_ACCEPT = "application/vnd.npm.install-v1+json; q=1.0, application/json; q=0.8, */*"
UPSTREAM = "npmfake"


# --- packages -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pkg:
    name: str
    version: str
    time: str
    dependencies: dict[str, str] = field(default_factory=dict)
    deprecated: str | None = None


PACKAGES = (
    Pkg("left", "0.9.0", "2024-01-01T00:00:00.000Z", deprecated="left 0.9 is unsupported; use 1.x"),
    Pkg("right", "1.0.0", "2024-01-02T00:00:00.000Z"),
    Pkg("right", "1.1.0", "2024-01-03T00:00:00.000Z"),
    Pkg("left", "1.0.0", "2024-01-04T00:00:00.000Z", {"right": "^1.0.0"}),
    Pkg("app", "1.0.0", "2024-01-05T00:00:00.000Z", {"left": "^1.0.0"}),
    Pkg("@acme/util", "1.0.0", "2024-01-06T00:00:00.000Z"),
    Pkg("lonely", "1.0.0", "2024-01-07T00:00:00.000Z"),  # never installed: the never-cached one
)
# What `npm install` of ROOT_DEPS puts into node_modules (right: the highest 1.x).
ROOT_DEPS = {"app": "^1.0.0", "@acme/util": "^1.0.0"}
INSTALLED = {"app": "1.0.0", "left": "1.0.0", "right": "1.1.0", "@acme/util": "1.0.0"}


@pytest.fixture(scope="session")
def npm_tarballs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """Every package of PACKAGES packed once per session (in parallel: npm pack takes ~0.5 s)."""
    root = tmp_path_factory.mktemp("npm-tarballs")
    with ThreadPoolExecutor(max_workers=len(PACKAGES)) as pool:
        futures = {
            (p.name, p.version): pool.submit(
                build_tarball, root, p.name, p.version, dependencies=p.dependencies
            )
            for p in PACKAGES
        }
        return {key: future.result() for key, future in futures.items()}


@pytest.fixture
async def registry(npm_tarballs: dict[tuple[str, str], Path]) -> AsyncIterator[FakeNpmRegistry]:
    async with FakeNpmRegistry() as fake:
        for p in PACKAGES:
            await fake.add_version_async(
                p.name,
                npm_tarballs[(p.name, p.version)],
                version=p.version,
                dependencies=p.dependencies,
                deprecated=p.deprecated,
                time=p.time,
            )
        yield fake


# --- the proxy ----------------------------------------------------------------------------------


@dataclass
class NpmProxy(RunningProxy):
    def registry(self, repo: str = "public") -> str:
        """The registry URL npm is given: ``http://HOST/default/npm/{repo}/``."""
        return f"{self.url}/default/npm/{repo}/"

    @property
    def port(self) -> int:
        return int(URL(self.url).port or 0)


NpmProxyFactory = Callable[..., Awaitable[NpmProxy]]


@pytest.fixture
def npm_proxy_factory(proxy_factory: ProxyFactory) -> NpmProxyFactory:
    """The shared proxy factory with one npm connection (``npmfake``) behind ``public``."""

    async def start(upstream_url: str, **kwargs: Any) -> NpmProxy:
        proxy = await proxy_factory(upstream_url, fmt="npm", connection=UPSTREAM, kind=NpmProxy, **kwargs)
        assert isinstance(proxy, NpmProxy)
        return proxy

    return start


@pytest.fixture
async def npm_proxy(npm_proxy_factory: NpmProxyFactory, registry: FakeNpmRegistry) -> NpmProxy:
    return await npm_proxy_factory(registry.url)


# --- helpers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Got:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def get(
    http: aiohttp.ClientSession,
    url: str,
    *,
    accept: str = FULL,
    raw: bool = False,
    headers: dict[str, str] | None = None,
) -> Got:
    """GET and read the whole body; ``raw`` sends the URL exactly as written (no re-quoting)."""
    target: str | URL = URL(url, encoded=True) if raw else url
    async with http.get(target, headers={"Accept": accept, **(headers or {})}) as resp:
        return Got(resp.status, resp.headers, await resp.read())


async def write_project(path: Path, deps: dict[str, str], *, lockfile: Path | None = None) -> Path:
    """A private project depending on ``deps``; with ``lockfile``, that lock copied in."""

    def write() -> None:
        path.mkdir(parents=True, exist_ok=True)
        manifest = {"name": "proj", "version": "1.0.0", "private": True, "dependencies": deps}
        (path / "package.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if lockfile is not None:
            (path / "package-lock.json").write_bytes(lockfile.read_bytes())

    await asyncio.to_thread(write)
    return path


async def installed(project: Path) -> dict[str, str]:
    """``{name: version}`` of everything in the project's top-level node_modules."""

    def scan() -> dict[str, str]:
        found: dict[str, str] = {}
        modules = project / "node_modules"
        dirs = [d for d in modules.iterdir() if d.is_dir() and not d.name.startswith(".")]
        for d in dirs:
            for pkg in sorted(d.iterdir()) if d.name.startswith("@") else [d]:
                manifest = json.loads((pkg / "package.json").read_text(encoding="utf-8"))
                found[manifest["name"]] = manifest["version"]
        return found

    return await asyncio.to_thread(scan)


async def read_json(path: Path) -> Any:
    return json.loads(await asyncio.to_thread(path.read_text, encoding="utf-8"))


async def read_bytes(path: Path) -> bytes:
    return await asyncio.to_thread(path.read_bytes)


async def asset_rows(proxy: NpmProxy, package: str, filename: str) -> list[tuple[Any, ...]]:
    return await asyncio.to_thread(
        index_rows,
        proxy.data_dir,
        "SELECT repository, digest FROM assets WHERE package=? AND filename=?",
        (package, filename),
    )


def tarball_hits(registry: FakeNpmRegistry, versions: dict[str, str] = INSTALLED) -> dict[str, int]:
    return {name: registry.hits[registry.tarball_path(name, v)] for name, v in versions.items()}


def proxy_tarball(
    proxy: NpmProxy, registry: FakeNpmRegistry, name: str, version: str, repo: str = "public"
) -> str:
    return f"{proxy.registry(repo)}{name}/-/{registry.versions(name)[version].filename}"


def sri(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


async def check_lockfile(
    project: Path, proxy: NpmProxy, registry: FakeNpmRegistry, repo: str = "public"
) -> None:
    """Every installed package is locked to the proxy's tarball URL with the upstream's integrity."""
    lock = await read_json(project / "package-lock.json")
    for name, version in INSTALLED.items():
        entry = lock["packages"][f"node_modules/{name}"]
        assert entry["version"] == version
        assert entry["resolved"] == proxy_tarball(proxy, registry, name, version, repo)
        assert entry["integrity"] == registry.versions(name)[version].integrity


# --- npm install, cold and warm -----------------------------------------------------------------


async def test_npm_install_cold_then_warm(
    npm_proxy: NpmProxy, registry: FakeNpmRegistry, tmp_path: Path
) -> None:
    cold = await write_project(tmp_path / "cold", ROOT_DEPS)
    run = await npm("install", cwd=cold, registry=npm_proxy.registry(), cache=tmp_path / "cache-cold")
    assert run.ok, run.output
    assert await installed(cold) == INSTALLED
    assert tarball_hits(registry) == dict.fromkeys(INSTALLED, 1)
    await check_lockfile(cold, npm_proxy, registry)
    # The proxy asks the upstream for full packuments (it renders the abbreviated form itself).
    packument_requests = [h for p, h in registry.requests if p == registry.packument_path("@acme/util")]
    assert [h.get("Accept") for h in packument_requests] == [FULL]

    warm = await write_project(tmp_path / "warm", ROOT_DEPS)
    run = await npm("install", cwd=warm, registry=npm_proxy.registry(), cache=tmp_path / "cache-warm")
    assert run.ok, run.output
    assert await installed(warm) == INSTALLED
    # Nothing more from the upstream: tarballs are cached, packuments fresh within their TTL.
    assert tarball_hits(registry) == dict.fromkeys(INSTALLED, 1)
    assert {n: registry.hits[registry.packument_path(n)] for n in INSTALLED} == dict.fromkeys(INSTALLED, 1)
    assert registry.hits[registry.tarball_path("right", "1.0.0")] == 0
    await check_lockfile(warm, npm_proxy, registry)


# --- pnpm and yarn (classic) -------------------------------------------------------------------

# scripts/test installs both from the npm registry into .venv/node-tools (npm install --prefix).
NODE_TOOLS = Path(
    os.environ.get("ARTIFACT_PROXY_NODE_TOOLS", Path(__file__).parent.parent / ".venv" / "node-tools")
)


async def _tool(name: str) -> Path:
    path = NODE_TOOLS / "node_modules" / ".bin" / name
    if not await asyncio.to_thread(path.exists):
        pytest.skip(f"{name} is not installed in {NODE_TOOLS} (scripts/test installs it)")
    return path


async def _run_tool(tool: Path, *args: str, cwd: Path, cache: Path) -> tuple[int, str]:
    env = npm_env(cache)
    proc = await asyncio.create_subprocess_exec(
        str(tool), *args, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 90)
    return proc.returncode or 0, out.decode(errors="replace")


@pytest.mark.parametrize("client", ["pnpm", "yarn"])
async def test_pnpm_and_yarn_install_cold_then_warm(
    client: str, npm_proxy: NpmProxy, registry: FakeNpmRegistry, tmp_path: Path
) -> None:
    tool = await _tool(client)
    for attempt in ("cold", "warm"):
        project = await write_project(tmp_path / attempt, ROOT_DEPS)
        cache = tmp_path / f"cache-{attempt}"
        if client == "pnpm":
            args = [
                "install",
                "--registry",
                npm_proxy.registry(),
                "--store-dir",
                str(cache / "store"),
                "--config.node-linker=hoisted",
                "--reporter=append-only",
            ]
        else:
            args = [
                "install",
                "--registry",
                npm_proxy.registry(),
                "--cache-folder",
                str(cache / "yarn"),
                "--non-interactive",
                "--no-progress",
            ]
        code, output = await _run_tool(tool, *args, cwd=project, cache=cache)
        assert code == 0, output
        assert await installed(project) == INSTALLED
        # Both runs together fetched each tarball from the upstream exactly once.
        assert tarball_hits(registry) == dict.fromkeys(INSTALLED, 1)


# --- the registry API ---------------------------------------------------------------------------


async def test_abbreviated_and_full_packuments(
    npm_proxy: NpmProxy, registry: FakeNpmRegistry, http: aiohttp.ClientSession
) -> None:
    url = npm_proxy.registry() + "left"
    abbreviated = await get(http, url, accept=NPM_ACCEPT)
    assert abbreviated.status == 200
    assert abbreviated.headers["Content-Type"].startswith(ABBREVIATED)
    assert abbreviated.headers["X-Cache"] == "MISS"
    short = abbreviated.json()
    assert "readme" not in short
    assert short["time"]["1.0.0"] == "2024-01-04T00:00:00.000Z"  # kept for age-gating clients
    assert short["name"] == "left"
    assert short["dist-tags"] == {"latest": "1.0.0"}
    assert set(short["versions"]) == {"0.9.0", "1.0.0"}
    assert short["versions"]["0.9.0"]["deprecated"] == "left 0.9 is unsupported; use 1.x"
    assert short["versions"]["1.0.0"]["dependencies"] == {"right": "^1.0.0"}
    assert "readme" not in short["versions"]["1.0.0"] and "_id" not in short["versions"]["1.0.0"]

    full = await get(http, url, accept=FULL)
    assert full.status == 200
    assert full.headers["Content-Type"].startswith(FULL)
    assert full.headers["X-Cache"] in {"HIT", "MISS"}
    long = full.json()
    assert long["_id"] == "left" and long["name"] == "left"
    assert long["readme"].startswith("# left")
    assert long["time"]["1.0.0"] == "2024-01-04T00:00:00.000Z"
    assert long["time"]["0.9.0"] == "2024-01-01T00:00:00.000Z"
    assert {"created", "modified"} <= set(long["time"])
    assert long["versions"]["1.0.0"]["_id"] == "left@1.0.0"

    for doc in (short, long):
        for version, entry in registry.versions("left").items():
            dist = doc["versions"][version]["dist"]
            assert dist["integrity"] == entry.integrity
            assert dist["shasum"] == entry.shasum
            assert dist["tarball"] == proxy_tarball(npm_proxy, registry, "left", version)
            assert dist["tarball"].startswith(f"{npm_proxy.url}/default/npm/public/")
    assert registry.hits["/left"] == 1  # both renderings come from one upstream document

    again = await get(http, url, accept=NPM_ACCEPT)
    assert again.headers["X-Cache"] == "HIT" and again.body == abbreviated.body
    etag = abbreviated.headers["ETag"]
    assert full.headers["ETag"] != etag and "Accept" in abbreviated.headers["Vary"]
    not_modified = await get(http, url, accept=NPM_ACCEPT, headers={"If-None-Match": etag})
    assert not_modified.status == 304 and not_modified.body == b""


async def test_versions_tags_ping_and_tarballs(
    npm_proxy: NpmProxy, registry: FakeNpmRegistry, http: aiohttp.ClientSession
) -> None:
    base = npm_proxy.registry()
    for spec, version in (("latest", "1.1.0"), ("1.1.0", "1.1.0"), ("1.0.0", "1.0.0")):
        got = await get(http, f"{base}right/{spec}")
        assert got.status == 200, got.body
        assert "X-Cache" in got.headers
        doc = got.json()
        assert doc["name"] == "right" and doc["version"] == version
        assert doc["dist"]["tarball"] == proxy_tarball(npm_proxy, registry, "right", version)
        assert doc["dist"]["integrity"] == registry.versions("right")[version].integrity
    missing = await get(http, f"{base}right/9.9.9")
    assert missing.status == 404 and missing.json()["error"] == "not_found"

    tags = await get(http, f"{base}-/package/right/dist-tags")
    assert tags.status == 200 and tags.json() == {"latest": "1.1.0"}

    ping = await get(http, f"{base}-/ping")
    assert ping.status == 200 and ping.json() == {}

    entry = registry.versions("right")["1.1.0"]
    url = proxy_tarball(npm_proxy, registry, "right", "1.1.0")
    first = await get(http, url, accept="*/*")
    assert first.status == 200 and first.headers["X-Cache"] == "MISS"
    assert first.body == await read_bytes(entry.path)
    assert sri(first.body) == entry.integrity
    second = await get(http, url, accept="*/*")
    assert second.status == 200 and second.headers["X-Cache"] == "HIT" and second.body == first.body
    assert registry.hits[registry.tarball_path("right", "1.1.0")] == 1
    unknown = await get(http, f"{base}right/-/right-7.0.0.tgz", accept="*/*")
    assert unknown.status == 404 and unknown.json()["error"] == "not_found"


async def test_dist_tags_say_x_cache(npm_proxy: NpmProxy, http: aiohttp.ClientSession) -> None:
    tags = await get(http, f"{npm_proxy.registry()}-/package/right/dist-tags")
    assert tags.status == 200
    assert tags.headers.get("X-Cache") in {"HIT", "MISS", "STALE", "REVALIDATED"}


@pytest.mark.parametrize("form", ["@acme%2futil", "@acme%2Futil", "@acme/util"])
async def test_scoped_names_in_both_forms(
    form: str, npm_proxy: NpmProxy, registry: FakeNpmRegistry, http: aiohttp.ClientSession
) -> None:
    base = npm_proxy.registry()
    entry = registry.versions("@acme/util")["1.0.0"]
    tarball = f"{base}@acme/util/-/util-1.0.0.tgz"
    for accept in (NPM_ACCEPT, FULL):
        got = await get(http, base + form, accept=accept, raw=True)
        assert got.status == 200, got.body
        doc = got.json()
        assert doc["name"] == "@acme/util"
        dist = doc["versions"]["1.0.0"]["dist"]
        assert dist["tarball"] == tarball
        assert dist["integrity"] == entry.integrity and dist["shasum"] == entry.shasum
    version = await get(http, f"{base}{form}/latest", raw=True)
    assert version.status == 200 and version.json()["version"] == "1.0.0"
    tags = await get(http, f"{base}-/package/{form}/dist-tags", raw=True)
    assert tags.status == 200 and tags.json() == {"latest": "1.0.0"}
    body = await get(http, f"{base}{form}/-/util-1.0.0.tgz", accept="*/*", raw=True)
    assert body.status == 200 and body.body == await read_bytes(entry.path)
    assert registry.hits[registry.packument_path("@acme/util")] == 1
    assert registry.hits["/@acme/util/-/util-1.0.0.tgz"] == 1


async def test_unknown_package_is_a_json_404(
    npm_proxy: NpmProxy, registry: FakeNpmRegistry, http: aiohttp.ClientSession
) -> None:
    for path in ("nosuch", "@acme%2fnosuch", "@nobody/nosuch", "nosuch/-/nosuch-1.0.0.tgz"):
        got = await get(http, npm_proxy.registry() + path, accept=NPM_ACCEPT, raw=True)
        assert got.status == 404, (path, got.body)
        assert got.headers["Content-Type"].startswith("application/json")
        assert got.json()["error"] == "not_found"
    # The upstream's 404 is remembered briefly: asking again does not ask the upstream again.
    await get(http, npm_proxy.registry() + "nosuch", accept=NPM_ACCEPT)
    assert registry.hits["/nosuch"] == 1


@pytest.mark.parametrize(
    "path",
    [
        "..%2f",
        "..%2f..%2fetc%2fpasswd",
        "%2e%2e",
        "%2e%2e/%2e%2e/-/ping",
        "@acme%2f..",
        "@acme%2f..%2f..",
        "left%2f..%2fright",
        "Bad%20Name",
        ".hidden",
        "_private",
        "@ACME/util",
        "a%00b",
        "x" * 215,
        "-/package/Bad%20Name/dist-tags",
        "left/-/..%2f..%2fleft-1.0.0.tgz",
        "left/-/left-1.0.0.zip",
    ],
)
async def test_invalid_names_and_paths_are_400(
    path: str, npm_proxy: NpmProxy, registry: FakeNpmRegistry, http: aiohttp.ClientSession
) -> None:
    got = await get(http, npm_proxy.registry() + path, raw=True)
    assert got.status == 400, got.body
    assert got.json()["error"] == "bad_request"
    assert sum(registry.hits.values()) == 0  # nothing of it reached the upstream


# --- upstream down, offline ---------------------------------------------------------------------


async def test_npm_ci_with_upstream_down_and_offline(
    npm_proxy_factory: NpmProxyFactory, registry: FakeNpmRegistry, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    proxy = await npm_proxy_factory(registry.url)
    first = await write_project(tmp_path / "first", ROOT_DEPS)
    run = await npm("install", cwd=first, registry=proxy.registry(), cache=tmp_path / "cache-1")
    assert run.ok, run.output
    lockfile = first / "package-lock.json"

    await registry.stop_listening()
    down = await write_project(tmp_path / "down", ROOT_DEPS, lockfile=lockfile)
    run = await npm("ci", cwd=down, registry=proxy.registry(), cache=tmp_path / "cache-2")
    assert run.ok, run.output
    assert await installed(down) == INSTALLED
    # What was never cached fails with a 502 naming the upstream, never a 404.
    got = await get(http, proxy.registry() + "lonely", accept=NPM_ACCEPT)
    assert got.status == 502
    assert got.json()["error"] == "upstream_unavailable" and got.json()["upstream"] == UPSTREAM
    lonely = await write_project(tmp_path / "lonely-down", {"lonely": "^1.0.0"})
    run = await npm("install", cwd=lonely, registry=proxy.registry(), cache=tmp_path / "cache-3")
    assert not run.ok
    assert "502" in run.output and UPSTREAM in run.output and "Traceback" not in run.output

    # Restarted offline on the same address (the lockfile's URLs), with the same data.
    await proxy.stop()
    offline = await npm_proxy_factory(registry.url, data_dir=proxy.data_dir, port=proxy.port, offline=True)
    assert offline.url == proxy.url
    await registry.resume_listening()  # offline mode must not use it even when it is there
    before = sum(registry.hits.values())
    ci = await write_project(tmp_path / "offline", ROOT_DEPS, lockfile=lockfile)
    run = await npm("ci", cwd=ci, registry=offline.registry(), cache=tmp_path / "cache-4")
    assert run.ok, run.output
    assert await installed(ci) == INSTALLED
    got = await get(http, offline.registry() + "lonely", accept=NPM_ACCEPT)
    assert got.status == 503
    assert got.json()["error"] == "offline" and got.json()["upstream"] == UPSTREAM
    lonely = await write_project(tmp_path / "lonely-offline", {"lonely": "^1.0.0"})
    run = await npm("install", cwd=lonely, registry=offline.registry(), cache=tmp_path / "cache-5")
    assert not run.ok
    assert "503" in run.output and "never cached" in run.output and "Traceback" not in run.output
    assert sum(registry.hits.values()) == before


async def test_stale_packument_offers_the_cached_versions_while_the_upstream_is_down(
    npm_proxy_factory: NpmProxyFactory, registry: FakeNpmRegistry, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    proxy = await npm_proxy_factory(registry.url, upstream_metadata_ttl="1s")
    url = proxy.registry() + "right"
    fresh = await get(http, url, accept=NPM_ACCEPT)
    assert fresh.status == 200 and set(fresh.json()["versions"]) == {"1.0.0", "1.1.0"}
    cached = await get(http, proxy_tarball(proxy, registry, "right", "1.0.0"), accept="*/*")
    assert cached.status == 200
    await registry.stop_listening()
    await asyncio.sleep(1.2)  # past metadata_ttl: the packument needs the (gone) upstream

    stale = await get(http, url, accept=NPM_ACCEPT)
    assert stale.status == 200
    assert stale.headers["X-Cache"] == "STALE"
    doc = stale.json()
    # Only what can be installed is offered; latest falls back to the newest of it.
    assert set(doc["versions"]) == {"1.0.0"} and doc["dist-tags"] == {"latest": "1.0.0"}
    assert doc["versions"]["1.0.0"]["dist"]["integrity"] == registry.versions("right")["1.0.0"].integrity
    project = await write_project(tmp_path / "project", {"right": "*"})
    run = await npm("install", cwd=project, registry=proxy.registry(), cache=tmp_path / "cache")
    assert run.ok, run.output
    assert await installed(project) == {"right": "1.0.0"}


async def test_stale_packument_says_why(
    npm_proxy_factory: NpmProxyFactory, registry: FakeNpmRegistry, http: aiohttp.ClientSession
) -> None:
    proxy = await npm_proxy_factory(registry.url, upstream_metadata_ttl="1s")
    url = proxy.registry() + "right"
    assert (await get(http, url, accept=NPM_ACCEPT)).status == 200
    assert (await get(http, proxy_tarball(proxy, registry, "right", "1.1.0"), accept="*/*")).status == 200
    await registry.stop_listening()
    await asyncio.sleep(1.2)
    stale = await get(http, url, accept=NPM_ACCEPT)
    assert stale.status == 200 and stale.headers["X-Cache"] == "STALE"
    assert UPSTREAM in stale.headers.get("X-Proxy-Warning", "")


@pytest.mark.parametrize("outage", ["down", "offline"])
async def test_stale_packument_without_cached_tarballs_names_the_upstream(
    outage: str, npm_proxy_factory: NpmProxyFactory, registry: FakeNpmRegistry, http: aiohttp.ClientSession
) -> None:
    proxy = await npm_proxy_factory(registry.url, upstream_metadata_ttl="1s")
    url = proxy.registry() + "right"
    assert (await get(http, url, accept=NPM_ACCEPT)).status == 200  # packument cached, no tarball
    if outage == "down":
        await registry.stop_listening()
        expected = (502, "upstream_unavailable")
    else:
        await proxy.stop()
        proxy = await npm_proxy_factory(registry.url, data_dir=proxy.data_dir, offline=True)
        url = proxy.registry() + "right"
        expected = (503, "offline")
    await asyncio.sleep(1.2)  # past metadata_ttl
    got = await get(http, url, accept=NPM_ACCEPT)
    assert (got.status, got.json().get("error")) == expected, got.body
    assert got.json()["upstream"] == UPSTREAM


async def test_offline_packument_offers_only_cached_versions(
    npm_proxy_factory: NpmProxyFactory, registry: FakeNpmRegistry, http: aiohttp.ClientSession
) -> None:
    proxy = await npm_proxy_factory(registry.url)
    assert (await get(http, proxy.registry() + "right", accept=NPM_ACCEPT)).status == 200
    assert (await get(http, proxy_tarball(proxy, registry, "right", "1.0.0"), accept="*/*")).status == 200
    await proxy.stop()
    offline = await npm_proxy_factory(registry.url, data_dir=proxy.data_dir, offline=True)
    got = await get(http, offline.registry() + "right", accept=NPM_ACCEPT)
    assert got.status == 200
    doc = got.json()
    assert set(doc["versions"]) == {"1.0.0"} and doc["dist-tags"] == {"latest": "1.0.0"}


# --- integrity and single-flight ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["wrong_bytes", "truncate"])
async def test_bad_tarball_bytes_are_never_cached(
    kind: FaultKind,
    npm_proxy: NpmProxy,
    registry: FakeNpmRegistry,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    # A raw client: the transfer breaks, nothing is kept, the next request gets the right bytes.
    entry = registry.versions("right")["1.1.0"]
    registry.faults[registry.tarball_path("right", "1.1.0")] = Fault(kind, times=1)
    url = proxy_tarball(npm_proxy, registry, "right", "1.1.0")
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.get(url) as resp:
            await resp.read()
    await asyncio.sleep(0.05)
    assert await asset_rows(npm_proxy, "right", entry.filename) == []
    assert await asyncio.to_thread(temp_files, npm_proxy.data_dir) == []
    good = await get(http, url, accept="*/*")
    assert good.status == 200 and sri(good.body) == entry.integrity
    assert registry.hits[registry.tarball_path("right", "1.1.0")] == 2
    assert len(await asset_rows(npm_proxy, "right", entry.filename)) == 1

    # npm: the install fails cleanly, and succeeds once the upstream behaves.
    left = registry.versions("left")["1.0.0"]
    registry.faults[registry.tarball_path("left", "1.0.0")] = Fault(kind, times=1)
    project = await write_project(tmp_path / "project", ROOT_DEPS)
    run = await npm("install", cwd=project, registry=npm_proxy.registry(), cache=tmp_path / "cache-1")
    assert not run.ok, run.output
    assert "Traceback" not in run.output
    assert "EINTEGRITY" not in run.output  # a broken transfer, never a complete-looking wrong file
    assert await asset_rows(npm_proxy, "left", left.filename) == []
    assert await asyncio.to_thread(temp_files, npm_proxy.data_dir) == []
    run = await npm("install", cwd=project, registry=npm_proxy.registry(), cache=tmp_path / "cache-2")
    assert run.ok, run.output
    assert await installed(project) == INSTALLED
    assert registry.hits[registry.tarball_path("left", "1.0.0")] == 2


async def test_concurrent_misses_cause_one_upstream_fetch(
    npm_proxy: NpmProxy, registry: FakeNpmRegistry, http: aiohttp.ClientSession
) -> None:
    entry = registry.versions("@acme/util")["1.0.0"]
    path = registry.tarball_path("@acme/util", "1.0.0")
    # ~250 bytes in 32-byte chunks 50 ms apart: every request overlaps the one fetch.
    registry.faults[path] = Fault("slow", chunk=32, delay=0.05)
    url = proxy_tarball(npm_proxy, registry, "@acme/util", "1.0.0")
    replies = await asyncio.gather(*(get(http, url, accept="*/*") for _ in range(20)))
    assert {r.status for r in replies} == {200}
    assert {r.headers["X-Cache"] for r in replies} == {"MISS"}  # all joined the download
    assert {r.body for r in replies} == {await read_bytes(entry.path)}
    assert sri(replies[0].body) == entry.integrity
    assert registry.hits[path] == 1
    assert registry.hits[registry.packument_path("@acme/util")] == 1
    assert len(await asset_rows(npm_proxy, "@acme/util", entry.filename)) == 1


# --- the chain ----------------------------------------------------------------------------------


async def test_team_chain_serves_the_same_packages(
    npm_proxy: NpmProxy, registry: FakeNpmRegistry, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    public = await write_project(tmp_path / "public", ROOT_DEPS)
    run = await npm("install", cwd=public, registry=npm_proxy.registry("public"), cache=tmp_path / "cache-1")
    assert run.ok, run.output

    team = await write_project(tmp_path / "team", ROOT_DEPS)
    run = await npm("install", cwd=team, registry=npm_proxy.registry("team"), cache=tmp_path / "cache-2")
    assert run.ok, run.output
    assert await installed(team) == INSTALLED
    await check_lockfile(team, npm_proxy, registry, repo="team")
    # team took the files public had cached (and keeps its own rows), asking the upstream nothing.
    assert tarball_hits(registry) == dict.fromkeys(INSTALLED, 1)
    for name, version in INSTALLED.items():
        rows = await asset_rows(npm_proxy, name, registry.versions(name)[version].filename)
        assert sorted(r[0] for r in rows) == ["public", "team"]

    doc = (await get(http, npm_proxy.registry("team") + "@acme%2futil", accept=NPM_ACCEPT, raw=True)).json()
    assert doc["versions"]["1.0.0"]["dist"]["tarball"] == proxy_tarball(
        npm_proxy, registry, "@acme/util", "1.0.0", "team"
    )


# --- opt-in: the real public registry -----------------------------------------------------------


@pytest.fixture
async def live_npm_registry(tmp_path: Path) -> AsyncIterator[str]:
    """The embedded default config (its npm upstream: the registry npm here uses) on a free port."""
    overrides = Overrides(data_dir=tmp_path / "data", listen="127.0.0.1:0")
    config = await asyncio.to_thread(load_config, overrides, os.environ)
    if "npm" not in config.upstreams:
        pytest.skip("; ".join(config.notes) or "the default config has no npm upstream here")
    runner = web.AppRunner(build_app(config))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}/default/npm/public/"
    await runner.cleanup()


@pytest.mark.live
@pytest.mark.skipif(
    os.environ.get("ARTIFACT_PROXY_LIVE_TESTS") != "1",
    reason="talks to the public npm registry; set ARTIFACT_PROXY_LIVE_TESTS=1 to run",
)
async def test_live_npm_install_through_the_default_config(live_npm_registry: str, tmp_path: Path) -> None:
    project = await write_project(tmp_path / "live", {"is-number": "*", "@types/node": "20"})
    run = await npm("install", cwd=project, registry=live_npm_registry, cache=tmp_path / "cache-1")
    assert run.ok, run.output
    found = await installed(project)
    assert "is-number" in found and found["@types/node"].startswith("20.")
    lock = await read_json(project / "package-lock.json")
    assert lock["packages"]["node_modules/@types/node"]["resolved"].startswith(live_npm_registry)
    again = await write_project(tmp_path / "again", {"is-number": "*", "@types/node": "20"})
    run = await npm("install", cwd=again, registry=live_npm_registry, cache=tmp_path / "cache-2")
    assert run.ok, run.output


# --- pass-through calls ---------------------------------------------------------------------------


async def test_audit_and_search_are_passed_to_the_upstream_without_client_credentials(
    npm_proxy_factory: NpmProxyFactory, registry: FakeNpmRegistry, http: aiohttp.ClientSession
) -> None:
    proxy = await npm_proxy_factory(registry.url)
    audit = proxy.registry() + "-/npm/v1/security/advisories/bulk"
    async with http.post(audit, json={"left": ["1.0.0"]}, headers={"Authorization": "Bearer secret"}) as resp:
        assert resp.status == 405  # the fake has no audit endpoint: its own answer comes back
        assert resp.headers["X-Cache"] == "MISS"
    path, headers = registry.requests[-1]
    assert path == "/-/npm/v1/security/advisories/bulk"
    assert "Authorization" not in headers
    async with http.get(proxy.registry() + "-/v1/search?text=left") as resp:
        assert resp.status == 404
    assert registry.requests[-1][0] == "/-/v1/search"
    await proxy.stop()

    offline = await npm_proxy_factory(registry.url, data_dir=proxy.data_dir, offline=True)
    before = len(registry.requests)
    async with http.post(offline.registry() + "-/npm/v1/security/advisories/bulk", json={}) as resp:
        assert resp.status == 503
        assert (await resp.json())["error"] == "offline"
    assert len(registry.requests) == before


async def test_big_packuments_go_out_compressed_to_clients_that_take_it(
    npm_proxy: NpmProxy, registry: FakeNpmRegistry, npm_tarballs: dict[tuple[str, str], Path]
) -> None:
    tarball = npm_tarballs[("left", "1.0.0")]
    for i in range(400):  # a packument of a few hundred versions: tens of kilobytes
        await registry.add_version_async("manyver", tarball, version=f"1.0.{i}")
    url = npm_proxy.registry() + "manyver"
    async with aiohttp.ClientSession() as client:  # decompresses, as npm does
        async with client.get(url, headers={"Accept-Encoding": "gzip"}) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Encoding"] == "gzip"
            zipped = await resp.json()
        async with client.get(url, headers={"Accept-Encoding": "gzip, deflate, br"}) as resp:
            assert resp.headers["Content-Encoding"] == "br"
            brotlied = await resp.json()
        async with client.get(url, headers={"Accept-Encoding": "identity"}) as resp:
            assert "Content-Encoding" not in resp.headers
            plain = await resp.json()
    assert zipped == plain == brotlied
    assert len(plain["versions"]) == 400


async def test_huge_packuments_are_rendered_once_per_upstream_change_and_sent_from_files(
    npm_proxy_factory: NpmProxyFactory, registry: FakeNpmRegistry, npm_tarballs: dict[tuple[str, str], Path]
) -> None:
    tarball = npm_tarballs[("left", "1.0.0")]
    for i in range(400):  # long deprecation messages: a packument of about a megabyte
        await registry.add_version_async("huge", tarball, version=f"1.0.{i}", deprecated=f"{i} " + "x" * 2500)
    proxy = await npm_proxy_factory(registry.url, upstream_metadata_ttl="1s")
    url = proxy.registry() + "huge"
    pages_dir = proxy.data_dir / "pages"
    key, variant = ("default", "npm", "huge"), ("public", FULL, proxy.url)

    async with aiohttp.ClientSession() as client:
        async with client.get(url, headers={"Accept-Encoding": "identity"}) as resp:
            assert resp.headers["X-Cache"] == "MISS"
            plain = await resp.read()
        assert len(plain) > 1024 * 1024
        for encoding in ("gzip", "br"):
            async with client.get(url, headers={"Accept-Encoding": encoding}) as resp:
                assert resp.headers["Content-Encoding"] == encoding
                assert resp.headers["X-Cache"] == "HIT"
                assert await resp.read() == plain  # decompressed by the client
        page = proxy.pipeline.hot.page_entry(key, variant)
        assert page is not None and page.body == b"" and len(page.files) == 1  # the plain one on disk
        on_disk = sorted(p.name for p in await asyncio.to_thread(lambda: list(pages_dir.iterdir())))
        assert on_disk == sorted(Path(path).name for _, path, _ in page.files)

        # Expired, the upstream answers 304: the page is renewed, not rendered again.
        await asyncio.sleep(1.2)
        async with client.get(url, headers={"Accept-Encoding": "identity"}) as resp:
            assert resp.headers["X-Cache"] == "REVALIDATED"
            assert await resp.read() == plain
        renewed = proxy.pipeline.hot.page_entry(key, variant)
        assert renewed is not None and renewed.files == page.files

        # Expired and changed upstream: twenty clients at once cause one rendering.
        await registry.add_version_async("huge", tarball, version="2.0.0")
        await asyncio.sleep(1.2)

        async def fetch() -> dict[str, Any]:
            async with client.get(url, headers={"Accept-Encoding": "gzip"}) as resp:
                assert resp.status == 200
                doc: dict[str, Any] = await resp.json()
                return doc

        docs = await asyncio.gather(*(fetch() for _ in range(20)))
    assert all(doc["dist-tags"]["latest"] == "2.0.0" and len(doc["versions"]) == 401 for doc in docs)
    files = await asyncio.to_thread(lambda: list(pages_dir.iterdir()))
    assert len(files) == 2  # the new page's file, and the old one awaiting deletion
    fresh = proxy.pipeline.hot.page_entry(key, variant)
    assert fresh is not None and fresh.files != page.files
