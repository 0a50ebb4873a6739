"""Dependency tracking (issue 13): what a held version declares, and who depends on ``evil``.

Each format gets the same small graph, built as real artifacts: upstream ``evil`` 6.6.5 and
6.6.6; upstream ``lib`` 1.0 (its range admits evil 6.6.6) and 2.0 (its range does not), pulled
through the proxy; published into ``team``: ``app`` 1.0 (depends on lib 1.x, so on evil
6.6.6 through lib 1.0) and ``tool`` 1.0 (depends on evil with a range that excludes 6.6.6).
The answers are checked exactly, through the admin API and through the CLI.
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.formats.deps_maven import MavenDependencies
from proxy.formats.deps_npm import NpmDependencies
from proxy.formats.deps_nuget import NuGetDependencies
from proxy.formats.deps_pypi import PyPIDependencies
from tests.clients import upload_form
from tests.conftest import ProxyFactory, RunningProxy, cli_env, index_rows
from tests.fakes.dists import build_wheel
from tests.fakes.maven import FakeMavenRepo, artifact_path
from tests.fakes.npm import FakeNpmRegistry
from tests.fakes.nuget import FakeNuGetFeed, build_nupkg
from tests.fakes.pypi import FakePyPI
from tests.npm_clients import npm_publish_doc

API = "/-/api/v1/domains/default/repositories"


class Queries:
    """The dependency queries of one proxy, by API and by CLI (over its data directory)."""

    def __init__(self, proxy: RunningProxy, http: aiohttp.ClientSession, fmt: str) -> None:
        self.proxy, self.http, self.fmt = proxy, http, fmt

    async def get(self, path: str, **params: str) -> tuple[int, Any]:
        async with self.http.get(f"{self.proxy.url}{path}", params=params) as resp:
            return resp.status, await resp.json()

    async def deps(self, package: str, version: str, repo: str = "team") -> tuple[int, Any]:
        return await self.get(f"{API}/{repo}/packages/{self.fmt}/{package}/versions/{version}/dependencies")

    async def dependents(self, name: str, spec: str, repo: str = "team") -> tuple[int, Any]:
        return await self.get(f"{API}/{repo}/dependents/{self.fmt}", name=name, range=spec)

    async def cli(self, *args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "package",
            *args,
            "--data-dir",
            str(self.proxy.data_dir),
            env=cli_env(self.proxy.data_dir),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()


def path_of(answer: Mapping[str, Any]) -> dict[str, tuple[str, bool, list[str]]]:
    """``{package@version: (repository origin, direct, path)}`` of a dependents answer."""
    return {
        f"{e['package']}@{e['version']}": (e["origin"], e["direct"], e["path"]) for e in answer["dependents"]
    }


async def check_answers(
    q: Queries,
    *,
    evil: str,
    lib: str,
    app: str,
    lib_v: str,
    app_v: str,
    evil_v: str = "6.6.6",
    prose: bool = False,
) -> None:
    """The checks every format shares: direct lib, transitive app, nothing else; API == CLI."""
    status, answer = await q.dependents(evil, evil_v)
    assert status == 200, answer
    assert path_of(answer) == {
        f"{lib}@{lib_v}": ("cached", True, [f"{lib}@{lib_v}", f"{evil}@{evil_v}"]),
        f"{app}@{app_v}": ("published", False, [f"{app}@{app_v}", f"{lib}@{lib_v}", f"{evil}@{evil_v}"]),
    }
    code, out, err = await q.cli("dependents", "--format", q.fmt, "--name", evil, "--range", evil_v, "--json")
    assert code == 0, err
    cli_answer = json.loads(out)
    assert cli_answer["dependents"] == answer["dependents"]
    if not prose:
        return
    code, out, err = await q.cli(
        "dependents", "--repo", "team", "--format", q.fmt, "--name", evil, "--range", evil_v
    )
    assert code == 0, err
    assert (
        f"{app} {app_v}" in out
        and " -> ".join([f"{app}@{app_v}", f"{lib}@{lib_v}", f"{evil}@{evil_v}"]) in out
    )


# --- PyPI --------------------------------------------------------------------------------------


async def test_pypi_dependencies_and_dependents(
    proxy_factory: ProxyFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    pypi = FakePyPI()
    await pypi.start()
    try:
        files = tmp_path / "dists"
        for version in ("6.6.5", "6.6.6"):
            await pypi.add_file_async("evil", await asyncio.to_thread(build_wheel, files, "evil", version))
        lib1 = await asyncio.to_thread(
            build_wheel,
            files,
            "Lib",
            "1.0",
            requires=['evil[fast]>=6.0,<7; extra == "speed"', 'colorama; sys_platform == "win32"'],
        )
        lib2 = await asyncio.to_thread(build_wheel, files, "Lib", "2.0", requires=["evil<6.6.6"])
        await pypi.add_file_async("lib", lib1, with_metadata=False)  # the proxy extracts METADATA
        await pypi.add_file_async("lib", lib2)
        proxy = await proxy_factory(pypi.url)
        q = Queries(proxy, http, "pypi")
        evil5 = files / "evil-6.6.5-py3-none-any.whl"
        for project, path in (("lib", lib1), ("lib", lib2), ("evil", evil5)):
            async with http.get(proxy.files(project, path.name, repo="team")) as resp:
                assert resp.status == 200
                await resp.read()
        for name, requires in (("app", ["lib>=1.0,<2"]), ("tool", ["evil<6"])):
            wheel = await asyncio.to_thread(build_wheel, files / "own", name, "1.0", requires=requires)
            data = await asyncio.to_thread(wheel.read_bytes)
            form = upload_form(wheel, data, name=name, version="1.0")
            async with http.post(proxy.upload_url("team"), data=form) as resp:
                assert resp.status == 201, await resp.text()

        status, answer = await q.deps("Lib", "1.0")
        assert status == 200, answer
        assert answer["version"] == "1.0" and answer["source"]["origin"] == "cached"
        assert answer["dependencies"] == [
            {
                "package": "evil",
                "range": "<7,>=6.0",
                "kind": "runtime",
                "extras": "fast",
                "condition": 'extra == "speed"',
            },
            {
                "package": "colorama",
                "range": "",
                "kind": "runtime",
                "extras": "",
                "condition": 'sys_platform == "win32"',
            },
        ]
        status, answer = await q.deps("app", "1.0.0")  # PEP 440: 1.0.0 is 1.0
        assert status == 200 and answer["version"] == "1.0"
        assert [(d["package"], d["range"]) for d in answer["dependencies"]] == [("lib", "<2,>=1.0")]
        await check_answers(q, evil="evil", lib="lib", app="app", lib_v="1.0", app_v="1.0", prose=True)

        # A range rather than a version: every held evil it admits is a target.
        status, answer = await q.dependents("evil", "<6.6.6")
        assert status == 200 and answer["versions"] == ["6.6.5"]
        assert set(path_of(answer)) == {"lib@1.0", "lib@2.0", "app@1.0"}  # tool wants evil<6
        # public's chain does not include team, where the files pulled through team are held.
        status, answer = await q.dependents("evil", "6.6.6", repo="public")
        assert status == 200 and answer["dependents"] == []
    finally:
        await pypi.close()


# --- npm ---------------------------------------------------------------------------------------


def npm_tarball(dest: Path, name: str, version: str, **fields: dict[str, str]) -> Path:
    """A package tarball as ``npm pack`` lays it out (``package/package.json``); blocking."""
    manifest = {"name": name, "version": version, "main": "index.js", **fields}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for member, data in (
            ("package/package.json", json.dumps(manifest).encode()),
            ("package/index.js", b"module.exports = {};\n"),
        ):
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"{name}-{version}.tgz"
    path.write_bytes(buf.getvalue())
    return path


async def test_npm_dependencies_and_dependents(
    proxy_factory: ProxyFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    registry = FakeNpmRegistry()
    await registry.start()
    try:
        upstream: list[tuple[str, str, dict[str, dict[str, str]]]] = [
            ("evil", "6.6.5", {}),
            ("evil", "6.6.6", {}),
            ("lib", "1.0.0", {"dependencies": {"evil": "^6.0.0"}, "peerDependencies": {"react": ">=16"}}),
            (
                "lib",
                "2.0.0",
                {"dependencies": {"evil": "~6.6.0 <6.6.6"}, "optionalDependencies": {"fsevents": "^2"}},
            ),
            ("lib", "3.0.0-beta.1", {"dependencies": {"evil": ">=6.6.6-beta.0"}}),  # never pulled
        ]
        for name, version, fields in upstream:
            path = await asyncio.to_thread(npm_tarball, tmp_path / "up", name, version, **fields)
            await registry.add_version_async(
                name, path, version=version, dependencies=fields.get("dependencies")
            )
        proxy = await proxy_factory(registry.url, fmt="npm")
        q = Queries(proxy, http, "npm")
        for name, version in (("lib", "1.0.0"), ("lib", "2.0.0"), ("evil", "6.6.5")):
            async with http.get(f"{proxy.url}/default/npm/team/{name}/-/{name}-{version}.tgz") as resp:
                assert resp.status == 200
                await resp.read()
        own = {
            "app": {"dependencies": {"lib": "1.x || >=4", "alias-evil": "npm:evil@>=7.0.0"}},
            "tool": {"dependencies": {"evil": "<6.0.0 || 6.6.7 - 7"}},
        }
        for name, fields in own.items():
            path = await asyncio.to_thread(npm_tarball, tmp_path / "own", name, "1.0.0", **fields)
            doc = npm_publish_doc(name, "1.0.0", await asyncio.to_thread(path.read_bytes))
            async with http.put(f"{proxy.url}/default/npm/team/{name}", json=doc) as resp:
                assert resp.status in (200, 201), await resp.text()

        # Recorded when cached or published, before anyone asks (the five tarballs' digests).
        for _ in range(100):
            rows = await asyncio.to_thread(
                index_rows, proxy.data_dir, "SELECT digest FROM dependency_sources"
            )
            if len(rows) == 5:
                break
            await asyncio.sleep(0.1)
        assert len(rows) == 5
        status, answer = await q.deps("lib", "2.0.0")
        assert status == 200, answer
        assert answer["dependencies"] == [
            {
                "package": "evil",
                "range": "~6.6.0 <6.6.6",
                "kind": "dependencies",
                "extras": "",
                "condition": "",
            },
            {
                "package": "fsevents",
                "range": "^2",
                "kind": "optionalDependencies",
                "extras": "",
                "condition": "",
            },
        ]
        status, answer = await q.deps("app", "1.0.0")
        assert status == 200 and answer["source"]["origin"] == "published"
        assert [(d["package"], d["range"], d["condition"]) for d in answer["dependencies"]] == [
            ("lib", "1.x || >=4", ""),
            ("evil", ">=7.0.0", "alias alias-evil"),  # an alias is a dependency on the aliased package
        ]
        await check_answers(q, evil="evil", lib="lib", app="app", lib_v="1.0.0", app_v="1.0.0")
        # Pre-releases: ^6.0.0 does not admit 6.6.6-rc.1; nothing held asks for a pre-release.
        status, answer = await q.dependents("evil", "6.6.6-rc.1")
        assert status == 200 and answer["dependents"] == []
        status, answer = await q.dependents("evil", "6.6.5")
        assert set(path_of(answer)) == {"lib@1.0.0", "lib@2.0.0", "app@1.0.0"}
        # A range names the held versions it admits (6.6.6 was never pulled, 6.6.5 was).
        status, answer = await q.dependents("evil", ">=6.6.6 <7")
        assert (status, answer["versions"], answer["dependents"]) == (200, [], [])
        status, answer = await q.dependents("evil", "6.6.x")
        assert answer["versions"] == ["6.6.5"] and len(answer["dependents"]) == 3
    finally:
        await registry.close()


# --- Maven -------------------------------------------------------------------------------------


def pom(group: str, artifact: str, version: str, body: str = "") -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<project xmlns="http://maven.apache.org/POM/4.0.0">\n'
        "  <modelVersion>4.0.0</modelVersion>\n"
        f"  <groupId>{group}</groupId><artifactId>{artifact}</artifactId><version>{version}</version>\n"
        f"{body}</project>\n"
    ).encode()


def dependency(coords: str, version: str, scope: str = "", extra: str = "") -> str:
    group, artifact = coords.split(":")
    scoped = f"<scope>{scope}</scope>" if scope else ""
    return (
        f"<dependency><groupId>{group}</groupId><artifactId>{artifact}</artifactId>"
        f"<version>{version}</version>{scoped}{extra}</dependency>"
    )


async def test_maven_dependencies_and_dependents(
    proxy_factory: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    async with FakeMavenRepo() as central:
        for version in ("6.6.5", "6.6.6"):
            central.add_version("org.evil", "evil", version)
        lib1 = (
            "<parent><groupId>com.lib</groupId><artifactId>parent</artifactId><version>3</version></parent>"
            "<properties><evil.range>[6.0,7.0)</evil.range></properties><dependencies>"
            + dependency("org.evil:evil", "${evil.range}")
            + dependency("junit:junit", "4.13.2", "test", "<optional>true</optional>")
            + dependency("com.lib:lib-core", "${project.version}", "runtime")
            + "</dependencies>"
        )
        central.add_file(artifact_path("com.lib", "lib", "1.0", "pom"), pom("com.lib", "lib", "1.0", lib1))
        lib2 = f"<dependencies>{dependency('org.evil:evil', '(,6.6.6),[6.6.7,)')}</dependencies>"
        central.add_file(artifact_path("com.lib", "lib", "2.0", "pom"), pom("com.lib", "lib", "2.0", lib2))
        proxy = await proxy_factory(central.url, fmt="maven")
        q = Queries(proxy, http, "maven")
        team = f"{proxy.url}/default/maven/team/"
        for coords in (("com.lib", "lib", "1.0"), ("com.lib", "lib", "2.0"), ("org.evil", "evil", "6.6.5")):
            async with http.get(team + artifact_path(*coords, "pom")) as resp:
                assert resp.status == 200
                await resp.read()
        app = f"<dependencies>{dependency('com.lib:lib', '[1.0]')}</dependencies>"
        tool = f"<dependencies>{dependency('org.evil:evil', '6.6.5')}</dependencies>"  # soft: 6.6.5 only
        for artifact, body in (("app", app), ("tool", tool)):
            async with http.put(
                team + artifact_path("com.acme", artifact, "1.0", "pom"),
                data=pom("com.acme", artifact, "1.0", body),
            ) as resp:
                assert resp.status == 201, await resp.text()

        status, answer = await q.deps("com.lib:lib", "1.0")
        assert status == 200, answer
        assert [(d["package"], d["range"], d["kind"], d["condition"]) for d in answer["dependencies"]] == [
            ("com.lib:parent", "3", "parent", ""),
            ("org.evil:evil", "[6.0,7.0)", "compile", ""),
            ("junit:junit", "4.13.2", "test", "optional"),
            ("com.lib:lib-core", "1.0", "runtime", ""),
        ]
        await check_answers(
            q, evil="org.evil:evil", lib="com.lib:lib", app="com.acme:app", lib_v="1.0", app_v="1.0"
        )
        status, answer = await q.dependents("org.evil:evil", "6.6.5")
        assert set(path_of(answer)) == {
            "com.lib:lib@1.0",
            "com.lib:lib@2.0",
            "com.acme:tool@1.0",
            "com.acme:app@1.0",
        }
        status, answer = await q.dependents("org.evil:evil", "6.6.7")  # not held, named exactly
        assert set(path_of(answer)) == {"com.lib:lib@1.0", "com.lib:lib@2.0", "com.acme:app@1.0"}


# --- NuGet -------------------------------------------------------------------------------------


async def test_nuget_dependencies_and_dependents(
    proxy_factory: ProxyFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    feed = FakeNuGetFeed()
    await feed.start()
    try:
        up = tmp_path / "up"
        for package_id, version, deps in (
            ("Evil", "6.6.5", []),
            ("Evil", "6.6.6", []),
            ("Lib", "1.0.0", [("Evil", "[6.0.0, 7.0.0)")]),
            ("Lib", "2.0.0", [("Evil", "(, 6.6.6)")]),
        ):
            await feed.add_package_async(await asyncio.to_thread(build_nupkg, up, package_id, version, deps))
        proxy = await proxy_factory(feed.url, fmt="nuget")
        q = Queries(proxy, http, "nuget")
        flat = f"{proxy.url}/default/nuget/team/v3-flatcontainer"
        for lower, version in (("lib", "1.0.0"), ("lib", "2.0.0"), ("evil", "6.6.5")):
            async with http.get(f"{flat}/{lower}/{version}/{lower}.{version}.nupkg") as resp:
                assert resp.status == 200
                await resp.read()
        for package_id, deps in (("App", [("Lib", "1.0.0")]), ("Tool", [("Evil", "[6.6.7,)")])):
            path = await asyncio.to_thread(build_nupkg, tmp_path / "own", package_id, "1.0.0", deps)
            form = aiohttp.FormData()
            data = await asyncio.to_thread(path.read_bytes)
            form.add_field("package", data, filename=path.name, content_type="application/octet-stream")
            async with http.put(f"{proxy.url}/default/nuget/team/api/v2/package", data=form) as resp:
                assert resp.status == 201, await resp.text()

        status, answer = await q.deps("Lib", "1.0.0")
        assert status == 200, answer
        assert answer["dependencies"] == [
            {
                "package": "evil",
                "range": "[6.0.0, 7.0.0)",
                "kind": "runtime",
                "extras": "",
                "condition": ".NETStandard2.0",
            }
        ]
        where = ("--domain", "default", "--repo", "team", "--format", "nuget")
        code, out, err = await q.cli("deps", *where, "--package", "Lib", "--version", "1.0", "--json")
        assert code == 0, err
        assert json.loads(out) == answer  # the CLI prints the API's answer (1.0 is NuGet's 1.0.0)
        code, out, err = await q.cli("deps", *where, "--package", "Lib", "--version", "1.0.0")
        assert out.splitlines()[1:] == ["  evil [6.0.0, 7.0.0)  runtime  (.NETStandard2.0)"], out + err
        # "1.0.0" is NuGet's "1.0.0 or later": App admits Lib 1.0.0 (and 2.0.0, which is safe).
        await check_answers(q, evil="evil", lib="lib", app="app", lib_v="1.0.0", app_v="1.0.0")
        status, answer = await q.dependents("Evil", "6.6.5")
        assert path_of(answer) == {
            "lib@1.0.0": ("cached", True, ["lib@1.0.0", "evil@6.6.5"]),
            "lib@2.0.0": ("cached", True, ["lib@2.0.0", "evil@6.6.5"]),
            "app@1.0.0": ("published", False, ["app@1.0.0", "lib@1.0.0", "evil@6.6.5"]),
        }
    finally:
        await feed.close()


# --- bad input, quarantine ----------------------------------------------------------------------


async def test_bad_queries_are_400_or_404_with_a_message(
    proxy_factory: ProxyFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    pypi = FakePyPI()
    await pypi.start()
    try:
        wheel = await asyncio.to_thread(build_wheel, tmp_path, "lib", "1.0", requires=["evil>=6"])
        await pypi.add_file_async("lib", wheel)
        proxy = await proxy_factory(pypi.url)
        q = Queries(proxy, http, "pypi")
        async with http.get(proxy.files("lib", wheel.name, repo="team")) as resp:
            assert resp.status == 200
            await resp.read()
        cases: list[tuple[str, dict[str, str], int, str]] = [
            (f"{API}/team/packages/pypi/nothere/versions/1.0/dependencies", {}, 404, "is not held"),
            (f"{API}/team/packages/pypi/lib/versions/9.9/dependencies", {}, 404, "lib 9.9 is not held"),
            (f"{API}/nope/packages/pypi/lib/versions/1.0/dependencies", {}, 404, "repository 'nope'"),
            (f"{API}/team/packages/cobol/lib/versions/1.0/dependencies", {}, 404, "unknown format"),
            (f"{API}/team/dependents/pypi", {"name": "evil", "range": "=>6"}, 400, "not a PEP 440"),
            (f"{API}/team/dependents/pypi", {"name": "evil"}, 400, "'range' is required"),
            (f"{API}/team/dependents/pypi", {"name": "-bad-", "range": "1"}, 400, "not a valid Python"),
            (f"{API}/team/dependents/npm", {"name": "evil", "range": "^^6"}, 400, "not a version"),
            (f"{API}/team/dependents/maven", {"name": "g:a", "range": "[1.0,2.0"}, 400, "not a Maven"),
            (f"{API}/team/dependents/nuget", {"name": "Evil", "range": "[1.0"}, 400, "not a NuGet"),
        ]
        for path, params, status, message in cases:
            got, body = await q.get(path, **params)
            assert (got, message in body.get("message", "")) == (status, True), (path, body)
        status, answer = await q.dependents("evil", ">=6")  # nothing named evil is held: no targets
        assert (status, answer["versions"], answer["dependents"]) == (200, [], [])
        status, answer = await q.dependents("evil", "6.6.6")  # ... but an exact version always is one
        assert status == 200 and path_of(answer) == {"lib@1.0": ("cached", True, ["lib@1.0", "evil@6.6.6"])}
        code, _, err = await q.cli(
            "deps",
            "--domain",
            "default",
            "--repo",
            "team",
            "--format",
            "pypi",
            "--package",
            "x",
            "--version",
            "1",
        )
        assert code == 1 and "is not held" in err
    finally:
        await pypi.close()


async def test_quarantine_answers_with_the_versions_that_depend_on_it(
    proxy_factory: ProxyFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    registry = FakeNpmRegistry()
    await registry.start()
    try:
        for name, version, deps in (("evil", "6.6.6", {}), ("lib", "1.0.0", {"evil": "^6.6.0"})):
            path = await asyncio.to_thread(npm_tarball, tmp_path, name, version, dependencies=deps)
            await registry.add_version_async(name, path, version=version, dependencies=deps)
        proxy = await proxy_factory(registry.url, fmt="npm")
        for repo in ("public", "team"):
            async with http.get(f"{proxy.url}/default/npm/{repo}/lib/-/lib-1.0.0.tgz") as resp:
                assert resp.status == 200
                await resp.read()
        url = f"{proxy.url}{API}/public/quarantine/npm"
        async with http.put(url, json={"pattern": "evil@6.6.6", "reason": "malware"}) as resp:
            assert resp.status == 200
            answer = await resp.json()
        # Quarantined in public: lib is held in public and in team (which resolves through public).
        assert answer["pattern"] == "evil@6.6.6" and answer["dependents"]["versions"] == ["6.6.6"]
        held = sorted(
            (e["repository"], e["package"], e["version"], e["direct"])
            for e in answer["dependents"]["dependents"]
        )
        assert held == [("public", "lib", "1.0.0", True)]  # one entry per version: the nearest copy
        async with http.put(url, json={"pattern": "evil@7.*"}) as resp:
            assert (await resp.json())["dependents"] == {"versions": [], "dependents": []}
        # The CLI twin says the same in prose.
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "quarantine",
            "add",
            *("--domain", "default", "--repo", "team", "--format", "npm", "--pattern", "evil@6.6.6"),
            *("--data-dir", str(proxy.data_dir)),
            env=cli_env(proxy.data_dir),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        assert out.decode().splitlines()[:3] == [
            "quarantined npm  evil@6.6.6",
            "held versions that depend on it:",
            "  lib 1.0.0  [team, cached, direct]  lib@1.0.0 -> evil@6.6.6  (declares ^6.6.0)",
        ]
    finally:
        await registry.close()


# --- each format's range semantics ---------------------------------------------------------------

RANGES = [
    # npm: caret, tilde, x-ranges, hyphen, ||, comparators, and the pre-release rule
    (NpmDependencies(), "^1.2.3", {"1.9.9": True, "2.0.0": False, "1.2.2": False, "1.3.0-beta.1": False}),
    (NpmDependencies(), "^0.2.3", {"0.2.9": True, "0.3.0": False}),
    (NpmDependencies(), "^0.0.3", {"0.0.3": True, "0.0.4": False}),
    (NpmDependencies(), "~1.2", {"1.2.9": True, "1.3.0": False}),
    (NpmDependencies(), "1.x || >=3.0.0 <3.1.0", {"1.0.0": True, "2.0.0": False, "3.0.5": True}),
    (NpmDependencies(), "1.2.3 - 2", {"1.2.3": True, "2.9.9": True, "3.0.0": False}),
    (NpmDependencies(), "1.2 - 2.3.4", {"1.2.0": True, "2.3.4": True, "2.3.5": False}),
    (NpmDependencies(), ">1.2", {"1.2.9": False, "1.3.0": True}),
    (NpmDependencies(), "<=1.2", {"1.2.9": True, "1.3.0": False}),
    (NpmDependencies(), "*", {"6.6.6": True, "6.6.6-rc.1": False}),
    (NpmDependencies(), ">=6.6.6-beta.1", {"6.6.6-beta.2": True, "6.6.7-beta.1": False, "7.0.0": True}),
    # PEP 440 specifier sets; a pre-release within the bounds counts (PEP 440 lets installers take one)
    (PyPIDependencies(), ">=6,<7", {"6.6.6": True, "7.0": False, "6.6.6rc1": True, "7.0rc1": False}),
    (PyPIDependencies(), "~=6.6.0", {"6.6.9": True, "6.7.0": False}),
    (PyPIDependencies(), "==6.6.*", {"6.6.6": True, "6.7": False}),
    (PyPIDependencies(), ">=6.6.6rc1", {"6.6.6rc2": True}),
    # Maven ranges and soft requirements, in Maven's order (1.0 == 1.0.0, 1.0-rc1 < 1.0)
    (MavenDependencies(), "[1.0,2.0)", {"1.0.0": True, "1.5": True, "2.0": False, "1.0-rc1": False}),
    (MavenDependencies(), "(,1.0],[1.2,)", {"1.0": True, "1.1": False, "1.2": True}),
    (MavenDependencies(), "[1.5]", {"1.5": True, "1.5.1": False}),
    (MavenDependencies(), "1.5", {"1.5": True, "1.6": False}),
    # NuGet: a bare version is a minimum; brackets inclusive, parentheses exclusive
    (NuGetDependencies(), "1.0.0", {"0.9.0": False, "1.0.0": True, "9.0.0": True}),
    (NuGetDependencies(), "(1.0,2.0]", {"1.0.0": False, "2.0.0": True, "2.0.1": False}),
    (NuGetDependencies(), "[1.0.0]", {"1.0.0": True, "1.0.1": False}),
    (NuGetDependencies(), "(,6.6.6)", {"6.6.5": True, "6.6.6": False}),
]


@pytest.mark.parametrize(
    ("reader", "spec", "versions"), RANGES, ids=[f"{r.format} {spec}" for r, spec, _ in RANGES]
)
def test_ranges_admit_what_the_format_says(reader: Any, spec: str, versions: dict[str, bool]) -> None:
    assert {v: reader.admits(spec, v) for v in versions} == versions
