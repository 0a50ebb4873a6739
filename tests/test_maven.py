"""Maven through the proxy: the real mvn and raw HTTP against a fake Maven Central.

The upstream is :class:`tests.fakes.maven.FakeMavenRepo` serving the machine's ``~/.m2`` in the
maven2 layout (with checksums and generated metadata); the proxy is the real application with one
Maven connection (``central``) behind ``public`` and the chain ``team`` → ``public``. mvn runs
with an empty local repository per build and a settings.xml whose mirror (``mirrorOf *``) is the
proxy, so everything it resolves really comes through the proxy.
"""

from __future__ import annotations

import asyncio
import hashlib
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from tests.conftest import ProxyFactory, RunningProxy, blob_files, index_rows
from tests.fakes.maven import FakeMavenRepo, artifact_path
from tests.maven_clients import (
    MvnRun,
    mvn,
    requires_local_repository,
    requires_mvn,
    write_project,
    write_settings,
)

UPSTREAM = "central"
JUNIT_JAR = artifact_path("junit", "junit", "4.13.2")
JUNIT_DEP = [("junit", "junit", "4.13.2", "test")]


@pytest.fixture
async def central() -> AsyncIterator[FakeMavenRepo]:
    async with FakeMavenRepo() as fake:
        yield fake


MavenProxyFactory = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture
def maven_proxy_factory(proxy_factory: ProxyFactory) -> MavenProxyFactory:
    async def start(upstream_url: str, **kwargs: Any) -> RunningProxy:
        return await proxy_factory(upstream_url, fmt="maven", connection=UPSTREAM, **kwargs)

    return start


@pytest.fixture
async def proxy(maven_proxy_factory: MavenProxyFactory, central: FakeMavenRepo) -> RunningProxy:
    return await maven_proxy_factory(central.url)


def repo_url(proxy: RunningProxy, repo: str = "public") -> str:
    return f"{proxy.url}/default/maven/{repo}/"


async def fetch(
    http: aiohttp.ClientSession, url: str, method: str = "GET", **kwargs: Any
) -> tuple[int, CIMultiDictProxy[str], bytes]:
    async with http.request(method, url, **kwargs) as resp:
        return resp.status, resp.headers, await resp.read()


async def build(
    tmp_path: Path, name: str, mirror: str, deps: list[tuple[str, str, str, str]], **project: Any
) -> MvnRun:
    """``mvn package`` of a fresh project with a fresh, empty local repository."""
    work = tmp_path / name
    settings = await asyncio.to_thread(write_settings, work / "settings.xml", mirror)
    await asyncio.to_thread(write_project, work / "project", "org.example", name, "1.0", deps, **project)
    return await mvn(["package"], cwd=work / "project", settings=settings, local_repo=work / "m2")


async def create_repository(
    http: aiohttp.ClientSession, proxy: RunningProxy, name: str, upstreams: list[str]
) -> None:
    url = f"{proxy.url}/-/api/v1/domains/default/repositories"
    async with http.post(url, json={"name": name, "upstreams": upstreams}) as resp:
        assert resp.status == 201, await resp.text()


# --- mvn builds --------------------------------------------------------------------------------


@requires_mvn
@requires_local_repository
@pytest.mark.timeout(300)
async def test_mvn_builds_cold_warm_and_with_the_upstream_down(
    proxy: RunningProxy, central: FakeMavenRepo, tmp_path: Path
) -> None:
    cold = await build(tmp_path, "cold", repo_url(proxy), JUNIT_DEP)
    assert cold.ok, cold.explain()
    assert "Tests run: 1, Failures: 0, Errors: 0" in cold.output
    assert all(url.startswith(repo_url(proxy)) for url in cold.downloads())
    upstream_requests = len(central.requests)
    assert central.hits[JUNIT_JAR] == 1

    warm = await build(tmp_path, "warm", repo_url(proxy), JUNIT_DEP)
    assert warm.ok, warm.explain()
    assert len(warm.downloads()) >= len(cold.downloads()) - 5  # everything again, from the proxy
    # Release artifacts and checksums are immutable: only 404s (remembered briefly) may be asked again.
    assert [
        r.path for r in central.requests[upstream_requests:] if not r.path.endswith((".pom", ".sha1"))
    ] == []
    assert central.hits[JUNIT_JAR] == 1

    await central.stop_listening()
    down = await build(tmp_path, "down", repo_url(proxy), JUNIT_DEP)
    assert down.ok, down.explain()
    await central.resume_listening()

    # The same through the team → public chain: served from public's copies.
    before = len(central.requests)
    chained = await build(tmp_path, "chained", repo_url(proxy, "team"), JUNIT_DEP)
    assert chained.ok, chained.explain()
    assert central.hits[JUNIT_JAR] == 1
    assert len(central.requests) - before <= 5


@requires_mvn
@requires_local_repository
@pytest.mark.timeout(300)
async def test_mvn_deploys_releases_and_snapshots_and_another_build_uses_them(
    proxy: RunningProxy, central: FakeMavenRepo, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    await create_repository(http, proxy, "consumers", ["team"])
    team = repo_url(proxy, "team")

    async def deploy(name: str, version: str, deps: list[tuple[str, str, str, str]] = JUNIT_DEP) -> MvnRun:
        work = tmp_path / f"deploy-{name}-{version}"
        settings = await asyncio.to_thread(
            write_settings, work / "settings.xml", team, server_id="proxy", username="ci", password="secret"
        )
        await asyncio.to_thread(
            write_project,
            work / "p",
            "com.acme",
            name,
            version,
            deps,
            deploy_url=team,
            deploy_snapshot_url=team,
        )
        return await mvn(["deploy"], cwd=work / "p", settings=settings, local_repo=work / "m2")

    release = await deploy("greeter", "1.0.0")
    assert release.ok, release.explain()
    for i in (1, 2):
        snapshot = await deploy("snappy", "2.0-SNAPSHOT")
        assert snapshot.ok, f"snapshot deploy {i}: {snapshot.explain()}"
        await asyncio.sleep(1.1)  # a new timestamp for the second deploy

    status, _, body = await fetch(http, team + "com/acme/greeter/maven-metadata.xml")
    assert status == 200
    doc = ET.fromstring(body)
    assert doc.findtext("versioning/release") == "1.0.0"
    assert [v.text for v in doc.iterfind("versioning/versions/version")] == ["1.0.0"]

    status, _, body = await fetch(http, team + "com/acme/snappy/2.0-SNAPSHOT/maven-metadata.xml")
    assert status == 200
    snap = ET.fromstring(body)
    assert snap.findtext("versioning/snapshot/buildNumber") == "2"
    values = {
        v.findtext("extension", ""): v.findtext("value", "")
        for v in snap.iterfind("versioning/snapshotVersions/snapshotVersion")
    }
    assert (
        values["jar"] == values["pom"] and values["jar"].startswith("2.0-") and values["jar"].endswith("-2")
    )

    # Every deployed file has checksums that match its bytes.
    jar_path = "com/acme/greeter/1.0.0/greeter-1.0.0.jar"
    _, _, jar = await fetch(http, team + jar_path)
    for algo in ("sha1", "md5", "sha256", "sha512"):
        _, _, digest = await fetch(http, f"{team}{jar_path}.{algo}")
        assert digest.decode() == hashlib.new(algo, jar).hexdigest()

    # Redeploying the release with other bytes is refused.
    central_before = len(central.requests)
    again = await deploy("greeter", "1.0.0", deps=[])
    assert not again.ok
    assert "409" in again.output, again.explain()

    # Another project uses both through a downstream repository.
    deps = [
        ("com.acme", "greeter", "1.0.0", "compile"),
        ("com.acme", "snappy", "2.0-SNAPSHOT", "compile"),
        *JUNIT_DEP,
    ]
    consumer = await build(tmp_path, "consumer", repo_url(proxy, "consumers"), deps)
    assert consumer.ok, consumer.explain()
    assert any(values["jar"] in url for url in consumer.downloads()), consumer.explain()
    # The internal group never reached the public upstream.
    assert not [r.path for r in central.requests[central_before:] if r.path.startswith("com/acme/")]


# --- raw HTTP ----------------------------------------------------------------------------------


@requires_local_repository
async def test_artifacts_checksums_and_head(
    proxy: RunningProxy, central: FakeMavenRepo, http: aiohttp.ClientSession
) -> None:
    url = repo_url(proxy) + JUNIT_JAR
    status, headers, jar = await fetch(http, url)
    assert status == 200 and headers["X-Cache"] == "MISS"
    assert headers["Content-Type"] == "application/java-archive"
    status, headers, _ = await fetch(http, url)
    assert headers["X-Cache"] == "HIT"
    status, headers, empty = await fetch(http, url, "HEAD")
    assert status == 200 and empty == b"" and int(headers["Content-Length"]) == len(jar)
    for algo in ("sha1", "md5", "sha256", "sha512"):
        status, _, digest = await fetch(http, f"{url}.{algo}")
        assert status == 200 and digest.decode() == hashlib.new(algo, jar).hexdigest()
    # A checksum asked first brings its artifact in.
    pom = repo_url(proxy) + artifact_path("junit", "junit", "4.13.2", "pom")
    status, _, digest = await fetch(http, pom + ".sha512")
    assert status == 200
    _, _, pom_bytes = await fetch(http, pom)
    assert digest.decode() == hashlib.sha512(pom_bytes).hexdigest()
    assert central.hits[artifact_path("junit", "junit", "4.13.2", "pom")] == 1


@requires_local_repository
async def test_a_corrupted_upstream_jar_is_never_cached(
    proxy: RunningProxy, central: FakeMavenRepo, http: aiohttp.ClientSession
) -> None:
    central.corrupt(JUNIT_JAR)
    with pytest.raises(aiohttp.ClientPayloadError):  # streamed as it arrived: the transfer is cut
        await fetch(http, repo_url(proxy) + JUNIT_JAR)
    rows = await asyncio.to_thread(
        index_rows,
        proxy.data_dir,
        "SELECT filename FROM assets WHERE filename LIKE ?",
        ("%junit-4.13.2.jar%",),
    )
    assert rows == []
    status, _, _ = await fetch(http, repo_url(proxy) + JUNIT_JAR + ".sha1")
    assert status == 502
    central.corrupt(JUNIT_JAR, on=False)
    status, _, jar = await fetch(http, repo_url(proxy) + JUNIT_JAR)
    assert status == 200
    assert (
        hashlib.sha1(jar).hexdigest()
        == (await fetch(http, central.file_url(JUNIT_JAR) + ".sha1"))[2].decode()
    )


@requires_local_repository
async def test_upstream_without_checksums_is_served_and_checksums_computed(
    proxy: RunningProxy, central: FakeMavenRepo, http: aiohttp.ClientSession
) -> None:
    central.remove_checksums(JUNIT_JAR)
    status, _, jar = await fetch(http, repo_url(proxy) + JUNIT_JAR)
    assert status == 200
    status, _, digest = await fetch(http, repo_url(proxy) + JUNIT_JAR + ".sha1")
    assert status == 200 and digest.decode() == hashlib.sha1(jar).hexdigest()


async def test_missing_artifacts_are_404_and_bad_paths_400(
    proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    status, _, body = await fetch(http, repo_url(proxy) + "org/nothing/here/1.0/here-1.0.jar")
    assert status == 404 and b"here-1.0.jar" in body
    status, _, body = await fetch(http, repo_url(proxy) + "org/nothing/here/1.0/other-1.0.jar")
    assert status == 400 and b"is not a file of org.nothing:here" in body
    status, _, body = await fetch(http, repo_url(proxy) + "org/nothing/here/maven-metadata.xml")
    assert status == 404
    status, _, body = await fetch(http, f"{proxy.url}/default/maven/nope/junit/junit/maven-metadata.xml")
    assert status == 404 and b"nope" in body


@requires_local_repository
async def test_metadata_merges_versions_along_the_chain(
    proxy: RunningProxy, central: FakeMavenRepo, http: aiohttp.ClientSession
) -> None:
    central.add_version("org.example", "mixed", "1.0")
    central.add_version("org.example", "mixed", "1.1")
    # team publishes 2.0 of the same artifact, and allows the upstream's versions too.
    async with http.put(
        f"{proxy.url}/-/api/v1/domains/default/repositories/team/origin-rules/maven",
        json={"pattern": "org.example:mixed", "publish": "ALLOW", "upstream": "ALLOW"},
    ) as resp:
        assert resp.status in {200, 201}, await resp.text()
    team = repo_url(proxy, "team")
    for name, data in (("mixed-2.0.pom", b"<project/>"), ("mixed-2.0.jar", b"PK\x05\x06" + b"\0" * 18)):
        async with http.put(f"{team}org/example/mixed/2.0/{name}", data=data) as resp:
            assert resp.status == 201, await resp.text()
    status, headers, body = await fetch(http, team + "org/example/mixed/maven-metadata.xml")
    assert status == 200 and headers["Content-Type"].startswith("text/xml")
    doc = ET.fromstring(body)
    assert [v.text for v in doc.iterfind("versioning/versions/version")] == ["1.0", "1.1", "2.0"]
    assert (doc.findtext("versioning/latest"), doc.findtext("versioning/release")) == ("2.0", "2.0")
    status, _, sha1 = await fetch(http, team + "org/example/mixed/maven-metadata.xml.sha1")
    assert sha1.decode() == hashlib.sha1(body).hexdigest()
    # public sees only the upstream's.
    _, _, body = await fetch(http, repo_url(proxy) + "org/example/mixed/maven-metadata.xml")
    assert [v.text for v in ET.fromstring(body).iterfind("versioning/versions/version")] == ["1.0", "1.1"]


async def test_malformed_upstream_metadata_is_reported_not_served(
    proxy: RunningProxy, central: FakeMavenRepo, http: aiohttp.ClientSession
) -> None:
    central.add_file(
        "org/bad/thing/maven-metadata.xml", b"<!DOCTYPE x [<!ENTITY a 'b'>]><metadata>&a;</metadata>"
    )
    status, _, body = await fetch(http, repo_url(proxy) + "org/bad/thing/maven-metadata.xml")
    assert status == 502
    assert b"malformed" in body and UPSTREAM.encode() in body


async def test_deploy_checks_checksums_metadata_and_immutability(
    proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    base = repo_url(proxy, "team") + "com/acme/lib/1.0/"
    jar = b"PK\x05\x06" + b"\0" * 18
    async with http.put(base + "lib-1.0.jar", data=jar) as resp:
        assert resp.status == 201
    async with http.put(base + "lib-1.0.jar.sha1", data=hashlib.sha1(jar).hexdigest()) as resp:
        assert resp.status == 201
    async with http.put(base + "lib-1.0.jar.md5", data="0" * 32) as resp:
        assert resp.status == 400 and "does not match" in (await resp.json())["message"]
    async with http.put(base + "lib-1.0.jar", data=jar) as resp:
        assert resp.status == 200  # the same bytes again: a retried upload, accepted
    async with http.put(base + "lib-1.0.jar", data=jar + b"x") as resp:
        assert resp.status == 409
    meta = repo_url(proxy, "team") + "com/acme/lib/maven-metadata.xml"
    async with http.put(meta, data=b"<metadata><groupId>org.other</groupId></metadata>") as resp:
        assert resp.status == 400
    async with http.put(
        meta, data=b"<metadata><groupId>com.acme</groupId><artifactId>lib</artifactId></metadata>"
    ) as resp:
        assert resp.status == 201
    async with http.put(base.replace("1.0/", "1.1-SNAPSHOT/") + "lib-1.1-SNAPSHOT.jar", data=jar) as resp:
        assert resp.status == 400 and "timestamped" in (await resp.json())["message"]
    # A publish-only rule by groupId prefix keeps upstream versions out of com.acme.*
    async with http.put(
        f"{proxy.url}/-/api/v1/domains/default/repositories/team/origin-rules/maven",
        json={"pattern": "com.acme*", "publish": "ALLOW", "upstream": "BLOCK"},
    ) as resp:
        assert resp.status in {200, 201}, await resp.text()
    status, _, body = await fetch(http, repo_url(proxy, "team") + "com/acme/tools/1.0/tools-1.0.jar")
    assert status == 404 and b"com.acme*" in body


async def test_redeploy_is_allowed_where_the_repository_says_so(
    proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    async with http.post(
        f"{proxy.url}/-/api/v1/domains/default/repositories",
        json={"name": "scratch", "upstreams": [], "allow_redeploy": True},
    ) as resp:
        assert resp.status == 201 and (await resp.json())["allow_redeploy"] is True
    url = repo_url(proxy, "scratch") + "com/acme/lib/1.0/lib-1.0.jar"
    for data in (b"first", b"second"):
        async with http.put(url, data=data) as resp:
            assert resp.status == 201
    assert (await fetch(http, url))[2] == b"second"


@requires_local_repository
async def test_directory_listings_show_what_the_repository_holds(
    proxy: RunningProxy, http: aiohttp.ClientSession
) -> None:
    await fetch(http, repo_url(proxy) + JUNIT_JAR)
    status, headers, body = await fetch(http, repo_url(proxy))
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'href="junit/"' in body
    _, _, body = await fetch(http, repo_url(proxy) + "junit/junit/")
    assert b'href="4.13.2/"' in body and b"maven-metadata.xml" in body
    _, _, body = await fetch(http, repo_url(proxy) + "junit/junit/4.13.2/")
    assert b'href="junit-4.13.2.jar"' in body and b'href="junit-4.13.2.jar.sha1"' in body
    status, _, _ = await fetch(http, repo_url(proxy) + "org/none/")
    assert status == 404
    blobs = await asyncio.to_thread(blob_files, proxy.data_dir)
    assert blobs
