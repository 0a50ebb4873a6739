"""Self-tests of the Maven test harness, without the proxy: the fake Central and the real ``mvn``.

The Maven proxy tests trust :class:`tests.fakes.maven.FakeMavenRepo` to act like a remote
repository (checksums, metadata, conditional requests, HEAD) and :mod:`tests.maven_clients` to run
a hermetic ``mvn``; a bug in either would make those tests pass or fail for the wrong reason.
So here the real ``mvn`` builds the tiny project from the fake directly, cold, and the fake's
made-up parts (checksums, ``maven-metadata.xml``, version order) are checked against hashlib and
Maven's documented ``ComparableVersion`` order.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

from tests.fakes.maven import (
    CHECKSUMS,
    DEFAULT_ROOT,
    FakeMavenRepo,
    Fault,
    artifact_path,
    compare_versions,
    metadata_path,
    sort_versions,
)
from tests.maven_clients import (
    MvnRun,
    mvn,
    requires_local_repository,
    requires_mvn,
    write_project,
    write_settings,
)

# A tree in the maven2 layout with known bytes and times, written by a sync fixture.
GROUP = "org.example.lib"
ARTIFACT = "widget"
VERSIONS = ("1.0", "1.10", "1.9", "2.0-rc1", "2.0-SNAPSHOT")
MTIME = 1_700_000_000  # 2023-11-14 22:13:20 UTC
JUNIT_JAR = artifact_path("junit", "junit", "4.13.2")


@dataclass(frozen=True)
class Tree:
    """The tmp repository root and the bytes of each file in it (read before the loop runs)."""

    root: Path
    files: dict[str, bytes]
    extra: Path  # a file outside the tree, to serve as an override


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    root = tmp_path / "repo"
    files: dict[str, bytes] = {}
    for i, version in enumerate(VERSIONS):
        for ext in ("pom", "jar"):
            rel = artifact_path(GROUP, ARTIFACT, version, ext)
            files[rel] = f"{ext} of {ARTIFACT} {version}\n".encode() * (50 + i)
    files[artifact_path(GROUP, "other", "3.0", "pom")] = b"<project/>\n"
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, (MTIME, MTIME))
    # Local-repository bookkeeping that a remote repository never serves.
    (root / "org/example/lib/widget/1.0/_remote.repositories").write_text("widget-1.0.jar>central=\n")
    (root / "org/example/lib/widget/9.9").mkdir()  # an empty version directory is no version
    extra = tmp_path / "extra.jar"
    extra.write_bytes(b"an override served from its own file\n")
    return Tree(root, files, extra)


@pytest.fixture
async def fake(tree: Tree) -> AsyncIterator[FakeMavenRepo]:
    async with FakeMavenRepo(tree.root) as repo:
        yield repo


async def fetch(
    http: aiohttp.ClientSession, url: str | URL, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, CIMultiDict[str], bytes]:
    async with http.request(method, url, headers=headers or {}) as resp:
        return resp.status, CIMultiDict(resp.headers), await resp.read()


def test_version_order_is_mavens() -> None:
    """The order of Maven's ComparableVersion documentation and its well-known edge cases."""
    ordered = ["1-alpha-1", "1-alpha2", "1-beta", "1-m1", "1-rc1", "1-SNAPSHOT", "1", "1-sp", "1-foo", "1.1"]
    assert sort_versions(reversed(ordered)) == ordered
    assert sort_versions(["1.10", "1.9", "1.9.1", "1.0"]) == ["1.0", "1.9", "1.9.1", "1.10"]
    assert sort_versions(["2.0-SNAPSHOT", "2.0", "2.0-rc1", "1.99"]) == [
        "1.99",
        "2.0-rc1",
        "2.0-SNAPSHOT",
        "2.0",
    ]
    for same in (
        ("1", "1.0"),
        ("1.0.0", "1"),
        ("1-ga", "1"),
        ("1-final", "1.0"),
        ("1-cr1", "1-rc1"),
        ("1a1", "1-alpha-1"),
    ):
        assert compare_versions(*same) == 0, same
    assert compare_versions("4.13.2", "4.13.1") > 0
    assert compare_versions("5.10.0-M1", "5.10.0") < 0


async def test_files_and_their_checksums(
    fake: FakeMavenRepo, tree: Tree, http: aiohttp.ClientSession
) -> None:
    jar = artifact_path(GROUP, ARTIFACT, "1.0")
    status, headers, body = await fetch(http, fake.file_url(jar))
    assert (status, body) == (200, tree.files[jar])
    assert headers["Content-Type"] == "application/java-archive"
    assert headers["ETag"] == f'"{hashlib.sha1(body).hexdigest()}"'
    assert headers["Last-Modified"] == "Tue, 14 Nov 2023 22:13:20 GMT"
    for algo in CHECKSUMS:
        status, headers, text = await fetch(http, fake.file_url(f"{jar}.{algo}"))
        assert status == 200
        assert text.decode() == hashlib.new(algo, body).hexdigest()
        assert headers["Content-Type"].startswith("text/plain")
    pom = artifact_path(GROUP, ARTIFACT, "1.0", "pom")
    status, headers, _ = await fetch(http, fake.file_url(pom))
    assert (status, headers["Content-Type"].split(";")[0]) == (200, "text/xml")
    # No checksum of a checksum, nothing for a missing file.
    assert (await fetch(http, fake.file_url(f"{jar}.sha1.sha1")))[0] == 404
    assert (await fetch(http, fake.file_url(artifact_path(GROUP, ARTIFACT, "7.0") + ".sha1")))[0] == 404
    assert fake.hits[jar] == 1

    # An override backed by a file is served in place, checksums and all.
    added = artifact_path(GROUP, ARTIFACT, "3.0")
    fake.add_file(added, tree.extra)
    status, _, body = await fetch(http, fake.file_url(added))
    assert (status, body) == (200, b"an override served from its own file\n")
    assert (await fetch(http, fake.file_url(added + ".sha1")))[2].decode() == hashlib.sha1(body).hexdigest()


async def test_head_and_conditional_requests(
    fake: FakeMavenRepo, tree: Tree, http: aiohttp.ClientSession
) -> None:
    jar = artifact_path(GROUP, ARTIFACT, "1.9")
    status, headers, body = await fetch(http, fake.file_url(jar), "HEAD")
    assert (status, body) == (200, b"")
    assert int(headers["Content-Length"]) == len(tree.files[jar])
    etag = headers["ETag"]
    assert (await fetch(http, fake.file_url(jar + ".sha1"), "HEAD"))[0] == 200
    assert (await fetch(http, fake.file_url(artifact_path(GROUP, ARTIFACT, "7.0")), "HEAD"))[0] == 404

    status, headers, body = await fetch(http, fake.file_url(jar), headers={"If-None-Match": etag})
    assert (status, body, headers["ETag"]) == (304, b"", etag)
    assert (await fetch(http, fake.file_url(jar), headers={"If-None-Match": '"other"'}))[0] == 200
    since = {"If-Modified-Since": "Tue, 14 Nov 2023 22:13:20 GMT"}
    assert (await fetch(http, fake.file_url(jar), headers=since))[0] == 304
    before = {"If-Modified-Since": "Tue, 14 Nov 2023 22:13:19 GMT"}
    assert (await fetch(http, fake.file_url(jar), headers=before))[0] == 200
    assert [r.method for r in fake.requests[:2]] == ["HEAD", "HEAD"]


async def test_metadata_is_generated_from_version_directories(
    fake: FakeMavenRepo, http: aiohttp.ClientSession
) -> None:
    url = fake.file_url(metadata_path(GROUP, ARTIFACT))
    status, headers, body = await fetch(http, url)
    assert status == 200
    assert headers["Content-Type"] == "text/xml"
    doc = ET.fromstring(body)
    assert doc.findtext("groupId") == GROUP
    assert doc.findtext("artifactId") == ARTIFACT
    assert [v.text for v in doc.iterfind("versioning/versions/version")] == [
        "1.0",
        "1.9",
        "1.10",
        "2.0-rc1",
        "2.0-SNAPSHOT",
    ]
    assert doc.findtext("versioning/latest") == "2.0-SNAPSHOT"
    assert doc.findtext("versioning/release") == "2.0-rc1"
    assert doc.findtext("versioning/lastUpdated") == "20231114221320"
    for algo in CHECKSUMS:
        status, _, text = await fetch(http, f"{url}.{algo}")
        assert (status, text.decode()) == (200, hashlib.new(algo, body).hexdigest())

    # A new version shows up at once; an override does not touch the source tree.
    added = fake.add_version(GROUP, ARTIFACT, "2.0", dependencies=[("junit", "junit", "4.13.2", "test")])
    assert set(added) == {"pom", "jar"}
    doc = ET.fromstring((await fetch(http, url))[2])
    assert (doc.findtext("versioning/latest"), doc.findtext("versioning/release")) == ("2.0", "2.0")
    status, _, pom = await fetch(http, fake.file_url(added["pom"]))
    assert status == 200
    assert b"<artifactId>junit</artifactId>" in pom

    # Removing every file of a version removes the version.
    fake.remove_file(artifact_path(GROUP, ARTIFACT, "1.0", "pom"))
    fake.remove_file(artifact_path(GROUP, ARTIFACT, "1.0", "jar"))
    doc = ET.fromstring((await fetch(http, url))[2])
    assert "1.0" not in [v.text for v in doc.iterfind("versioning/versions/version")]
    listed = [v.text for v in doc.iterfind("versioning/versions/version")]
    assert await asyncio.to_thread(fake.versions, GROUP, ARTIFACT) == listed


async def test_what_a_remote_repository_does_not_serve(
    fake: FakeMavenRepo, http: aiohttp.ClientSession
) -> None:
    for rel in (
        "org/example/lib/maven-metadata.xml",  # group level: no plugins here
        "org/example/lib/widget/1.0/",
        "org/example/lib/widget/",
        "org/example/lib/widget/1.0/_remote.repositories",
        "org/example/lib/widget/9.9/widget-9.9.jar",
        "",
    ):
        assert (await fetch(http, fake.file_url(rel)))[0] == 404, rel
    # Clients normalize "..", so only an encoded one reaches the server; it must not escape.
    sneaky = URL(fake.file_url("org/example/%2E%2E/example/lib/widget/1.0/widget-1.0.jar"), encoded=True)
    assert (await fetch(http, sneaky))[0] == 404
    assert (await fetch(http, f"{fake.origin}/{artifact_path(GROUP, ARTIFACT, '1.0')}"))[
        0
    ] == 404  # no /maven2/
    status, headers, _ = await fetch(http, fake.file_url(artifact_path(GROUP, ARTIFACT, "1.0")), "PUT")
    assert (status, headers["Allow"]) == (405, "GET, HEAD")
    assert fake.misses["org/example/lib/maven-metadata.xml"] == 1


async def test_corrupt_sends_other_bytes_under_the_real_checksum(
    fake: FakeMavenRepo, tree: Tree, http: aiohttp.ClientSession
) -> None:
    jar = artifact_path(GROUP, ARTIFACT, "1.10")
    real = tree.files[jar]
    fake.corrupt(jar)
    status, headers, body = await fetch(http, fake.file_url(jar))
    assert status == 200
    assert len(body) == len(real)
    assert body != real
    assert headers["ETag"] == f'"{hashlib.sha1(real).hexdigest()}"'
    assert (await fetch(http, fake.file_url(jar + ".sha1")))[2].decode() == hashlib.sha1(real).hexdigest()
    fake.corrupt(jar, on=False)
    assert (await fetch(http, fake.file_url(jar)))[2] == real


async def test_remove_checksums(fake: FakeMavenRepo, http: aiohttp.ClientSession) -> None:
    jar = artifact_path(GROUP, ARTIFACT, "1.0")
    fake.remove_checksums(jar, ["sha1"])
    assert (await fetch(http, fake.file_url(jar + ".sha1")))[0] == 404
    assert (await fetch(http, fake.file_url(jar + ".md5")))[0] == 200
    fake.remove_checksums(jar)
    assert all([(await fetch(http, fake.file_url(f"{jar}.{a}")))[0] == 404 for a in CHECKSUMS])
    assert (await fetch(http, fake.file_url(jar)))[0] == 200
    fake.restore_checksums(jar)
    assert (await fetch(http, fake.file_url(jar + ".sha1")))[0] == 200
    with pytest.raises(ValueError, match="unknown"):
        fake.remove_checksums(jar, ["crc32"])


async def test_allow_list_limits_what_is_served(tree: Tree, http: aiohttp.ClientSession) -> None:
    async with FakeMavenRepo(tree.root, allow=[f"{GROUP}:other"]) as repo:
        assert (await fetch(http, repo.file_url(artifact_path(GROUP, "other", "3.0", "pom"))))[0] == 200
        assert (await fetch(http, repo.file_url(metadata_path(GROUP, "other"))))[0] == 200
        assert (await fetch(http, repo.file_url(artifact_path(GROUP, ARTIFACT, "1.0"))))[0] == 404
        assert (await fetch(http, repo.file_url(metadata_path(GROUP, ARTIFACT))))[0] == 404
        repo.add_file(artifact_path(GROUP, ARTIFACT, "5.0", "pom"), b"<project/>")  # overrides always
        assert (await fetch(http, repo.file_url(artifact_path(GROUP, ARTIFACT, "5.0", "pom"))))[0] == 200


async def test_faults_and_outage_from_the_base(fake: FakeMavenRepo, http: aiohttp.ClientSession) -> None:
    jar = artifact_path(GROUP, ARTIFACT, "1.0")
    fake.faults[jar] = Fault("status", times=1, status=502)
    assert (await fetch(http, fake.file_url(jar)))[0] == 502
    assert (await fetch(http, fake.file_url(jar)))[0] == 200
    await fake.stop_listening()
    with pytest.raises(aiohttp.ClientConnectionError):
        await fetch(http, fake.file_url(jar))
    await fake.resume_listening()
    assert (await fetch(http, fake.file_url(jar)))[0] == 200


@requires_local_repository
async def test_serves_the_machines_local_repository(http: aiohttp.ClientSession) -> None:
    """The real ~/.m2 files, in place, with checksums computed off the loop (blockbuster is on)."""
    data = await asyncio.to_thread((DEFAULT_ROOT / JUNIT_JAR).read_bytes)
    async with FakeMavenRepo() as central:
        status, _, body = await fetch(http, central.file_url(JUNIT_JAR))
        assert (status, body) == (200, data)
        _, _, sha1 = await fetch(http, central.file_url(JUNIT_JAR + ".sha1"))
        assert sha1.decode() == hashlib.sha1(data).hexdigest()
        doc = ET.fromstring((await fetch(http, central.file_url(metadata_path("junit", "junit"))))[2])
        versions = [v.text for v in doc.iterfind("versioning/versions/version")]
        assert "4.13.2" in versions
        assert versions == sort_versions(v for v in versions if v)


# ---------------------------------------------------------------- the real mvn


@requires_mvn
@requires_local_repository
@pytest.mark.timeout(300)
async def test_mvn_package_cold_straight_from_the_fake(tmp_path: Path) -> None:
    """``mvn package`` with an empty local repository and every download from the fake.

    The junit dependency is a version range, so Maven must read the generated metadata.
    """
    async with FakeMavenRepo() as central:
        settings = await asyncio.to_thread(write_settings, tmp_path / "settings.xml", central.url)
        project = tmp_path / "project"
        deps = [("junit", "junit", "[4.13,4.14)", "test")]
        await asyncio.to_thread(write_project, project, "org.example", "demo", "1.0", deps)
        run: MvnRun = await mvn(["package"], cwd=project, settings=settings, local_repo=tmp_path / "m2")
        assert run.ok, run.explain()
        assert "Tests run: 1, Failures: 0, Errors: 0" in run.output, run.explain()
        assert await asyncio.to_thread((project / "target" / "demo-1.0.jar").is_file)
        assert central.hits[metadata_path("junit", "junit")] >= 1
        assert central.hits[JUNIT_JAR] == 1
        # Maven 3.8 only GETs, and asks for .sha1 alone while it is there (.md5 is its fallback).
        assert {r.method for r in central.requests} == {"GET"}
        assert not [r.path for r in central.requests if r.path.endswith(".md5")]
        assert run.downloads(), run.explain()
        assert all(url.startswith(central.url) for url in run.downloads())


@requires_mvn
@requires_local_repository
@pytest.mark.timeout(300)
async def test_mvn_refuses_a_corrupted_artifact_with_strict_checksums(tmp_path: Path) -> None:
    """Real Maven notices :meth:`FakeMavenRepo.corrupt` (with ``-C``; by default it only warns)."""
    async with FakeMavenRepo() as central:
        lib = central.add_version("org.example.fake", "lib", "1.0")
        central.corrupt(lib["jar"])
        settings = await asyncio.to_thread(write_settings, tmp_path / "settings.xml", central.url)
        project = tmp_path / "project"
        deps = [("org.example.fake", "lib", "1.0", "compile")]
        await asyncio.to_thread(write_project, project, "org.example", "user", "1.0", deps, with_test=False)
        run = await mvn(
            ["compile"], cwd=project, settings=settings, local_repo=tmp_path / "m2", strict_checksums=True
        )
        assert not run.ok, run.explain()
        assert "Checksum validation failed" in run.output, run.explain()
