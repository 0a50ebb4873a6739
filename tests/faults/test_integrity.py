"""Fault group 1, integrity: bad bytes from upstreams or the disk are never served nor kept.

Every format (PyPI, npm, Maven, NuGet) runs behind a :class:`HostileUpstream` relaying to its
real fake registry, which declares the artifact's digest the way that registry does (``#sha256``
/ ``hashes``, ``dist.integrity`` + ``dist.shasum``, the ``.sha1`` file, the registration's
``packageHash``). The hostile server then lies about the artifact's bytes: cut short with and
without Content-Length, chunked and cut (with and without the closing chunk), one byte flipped,
another complete file, nothing at all. The promises checked (DESIGN.md invariants 1-3 and 14):

* a response that completes with a 2xx never carries other bytes than the declared ones
  (``corrupt_served``);
* no index row or blob ever refers to incomplete or wrong bytes (``partial_commits``);
* a cached version is immutable: an upstream that changes it is logged as a mutation and the
  cached bytes keep being served, under a digest that describes them;
* a blob corrupted or lost on disk is detected when read, never served, and fetched again;
* bytes shared by two repositories survive deleting the version from one of them;
* artifact bytes do not vary with ``Accept-Encoding``, and rewriting URLs in documents leaves
  their integrity fields as the upstream wrote them.

The worlds built here (one proxy, one hostile upstream, one fake registry, one artifact) are
reused by the content-type group (test_content_types.py).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import hashlib
import json
import logging
import re
import sqlite3
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from proxy.storage.lifecycle import gc
from tests.conftest import Dists, ProxyFactory, RunningProxy, temp_files
from tests.fakes.dists import build_wheel, sha256_file
from tests.fakes.maven import FakeMavenRepo, artifact_path, build_jar
from tests.fakes.npm import FakeNpmRegistry, build_tarball
from tests.fakes.nuget import FakeNuGetFeed, build_nupkg
from tests.fakes.pypi import FakePyPI
from tests.faults.hostile import (
    Exchange,
    HostileUpstream,
    Rule,
    chunked_cut,
    decoded,
    mutated,
    truncated,
)
from tests.faults.report import GroupLedger

GROUP = "1 integrity"

FORMATS = ("pypi", "npm", "maven", "nuget")
NPM_NAME, NPM_VERSION = "integ-pkg", "1.0.0"
MAVEN_GROUP, MAVEN_ARTIFACT, MAVEN_VERSION = "org.integ", "lib", "1.0"
NUGET_ID, NUGET_VERSION = "Acme.Integ", "1.0.0"
JSON_PAGE = {"Accept": "application/vnd.pypi.simple.v1+json"}
HTML_PAGE = {"Accept": "text/html"}
ABBREVIATED = {"Accept": "application/vnd.npm.install-v1+json"}


# --- artifacts, built once per session -----------------------------------------------------------


@dataclass(frozen=True)
class Artifacts:
    """One real artifact per format, plus a same-named twin with other bytes (an upstream
    that rewrites a release), and an unrelated file of each format (a complete, wrong body)."""

    wheel_twin: Path  # beta-1.0-py3-none-any.whl again, other bytes
    tarball: Path
    tarball_twin: Path  # integ-pkg-1.0.0.tgz again, other bytes
    jar: bytes
    jar_other: bytes
    nupkg: Path
    nupkg_other: Path


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Artifacts:
    root = tmp_path_factory.mktemp("integrity")
    with ThreadPoolExecutor(max_workers=2) as pool:  # npm pack takes ~0.5 s each
        tarball = pool.submit(build_tarball, root / "npm", NPM_NAME, NPM_VERSION)
        twin = pool.submit(
            build_tarball, root / "npm-twin", NPM_NAME, NPM_VERSION, dependencies={"left": "^1.0.0"}
        )
        return Artifacts(
            wheel_twin=build_wheel(root / "twin", "beta", "1.0", summary="rewritten upstream"),
            tarball=tarball.result(),
            tarball_twin=twin.result(),
            jar=build_jar({"lib.properties": b"groupId=org.integ\nartifactId=lib\nversion=1.0\n"}),
            jar_other=build_jar({"other.properties": b"not the jar the .sha1 describes\n" * 50}),
            nupkg=build_nupkg(root / "nuget", NUGET_ID, NUGET_VERSION, payload_size=64 * 1024),
            nupkg_other=build_nupkg(root / "nuget-other", "Acme.Other", "9.9.9"),
        )


# --- one world per format: fake registry, hostile upstream in front, proxy behind -----------------


@dataclass
class World:
    """A proxy whose one upstream is a hostile relay to a real fake registry of ``fmt``."""

    fmt: str
    proxy: RunningProxy
    hostile: HostileUpstream
    backend: FakePyPI | FakeNpmRegistry | FakeMavenRepo | FakeNuGetFeed
    upstream_path: str  # the artifact's raw path on the hostile upstream (the rules' key)
    package: str  # as the index names it
    filename: str  # as the index names it
    data: bytes  # the artifact's true bytes
    other: bytes  # another complete artifact of the same format
    content_type: str  # the registry's type for the artifact

    def url(self, repo: str = "public", proxy: RunningProxy | None = None) -> str:
        """The artifact through the proxy (or another proxy on the same upstream)."""
        base = (proxy or self.proxy).url
        if self.fmt == "pypi":
            return f"{base}/default/pypi/{repo}/files/{self.package}/{self.filename}"
        if self.fmt == "npm":
            return f"{base}/default/npm/{repo}/{NPM_NAME}/-/{self.filename}"
        if self.fmt == "maven":
            jar = artifact_path(MAVEN_GROUP, MAVEN_ARTIFACT, MAVEN_VERSION)
            return f"{base}/default/maven/{repo}/{jar}"
        lid, ver = NUGET_ID.lower(), NUGET_VERSION
        return f"{base}/default/nuget/{repo}/v3-flatcontainer/{lid}/{ver}/{lid}.{ver}.nupkg"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@contextlib.asynccontextmanager
async def open_world(
    fmt: str,
    proxy_factory: ProxyFactory,
    dists: Dists,
    artifacts: Artifacts,
    tmp_path: Path,
    **server: Any,
) -> AsyncIterator[World]:
    """Start ``fmt``'s fake registry, a hostile relay in front of it and a proxy behind that."""
    settings: dict[str, Any] = {"upstream_breaker_threshold": 1000, **server}
    async with contextlib.AsyncExitStack() as stack:
        if fmt == "pypi":
            pypi = await stack.enter_async_context(FakePyPI())
            await pypi.add_file_async("beta", dists.beta)
            await pypi.add_file_async("alpha", dists.alpha)
            hostile = await stack.enter_async_context(HostileUpstream(pypi.origin))
            proxy = await proxy_factory(hostile.url("/simple/"), **settings)
            data, other = await _read(dists.beta), await _read(dists.alpha)
            yield World(
                fmt,
                proxy,
                hostile,
                pypi,
                f"/files/{dists.beta.name}",
                "beta",
                dists.beta.name,
                data=data,
                other=other,
                content_type="application/octet-stream",
            )
        elif fmt == "npm":
            npm = await stack.enter_async_context(FakeNpmRegistry())
            entry = await npm.add_version_async(NPM_NAME, artifacts.tarball, version=NPM_VERSION)
            hostile = await stack.enter_async_context(HostileUpstream(npm.origin))
            proxy = await proxy_factory(hostile.url("/"), fmt="npm", connection="npmfake", **settings)
            data, other = await _read(artifacts.tarball), await _read(artifacts.tarball_twin)
            path = npm.tarball_path(NPM_NAME, NPM_VERSION)
            yield World(
                fmt,
                proxy,
                hostile,
                npm,
                path,
                NPM_NAME,
                entry.filename,
                data=data,
                other=other,
                content_type="application/octet-stream",
            )
        elif fmt == "maven":
            root = tmp_path / "m2-empty"
            await asyncio.to_thread(root.mkdir, exist_ok=True)
            maven = await stack.enter_async_context(FakeMavenRepo(root=root))
            maven.add_version(MAVEN_GROUP, MAVEN_ARTIFACT, MAVEN_VERSION, jar=artifacts.jar)
            hostile = await stack.enter_async_context(HostileUpstream(maven.origin))
            proxy = await proxy_factory(
                hostile.url("/maven2/"), fmt="maven", connection="central", **settings
            )
            jar = artifact_path(MAVEN_GROUP, MAVEN_ARTIFACT, MAVEN_VERSION)
            name = f"{MAVEN_VERSION}/{jar.rsplit('/', 1)[1]}"
            yield World(
                fmt,
                proxy,
                hostile,
                maven,
                f"/maven2/{jar}",
                f"{MAVEN_GROUP}:{MAVEN_ARTIFACT}",
                name,
                data=artifacts.jar,
                other=artifacts.jar_other,
                content_type="application/java-archive",
            )
        elif fmt == "nuget":
            feed = FakeNuGetFeed(hash_in_registration=True)
            await stack.enter_async_context(feed)
            await feed.add_package_async(artifacts.nupkg)
            hostile = await stack.enter_async_context(HostileUpstream(feed.origin))
            # nuget.org's SemVer 2 hive is gzip only: decode it so its links lead through the relay.
            hostile.rules["/v3/registration5-gz-semver2/*"] = decoded()
            proxy = await proxy_factory(
                hostile.url("/v3/index.json"), fmt="nuget", connection="nugetfake", **settings
            )
            lid = NUGET_ID.lower()
            data, other = await _read(artifacts.nupkg), await _read(artifacts.nupkg_other)
            path = feed.nupkg_path(NUGET_ID, NUGET_VERSION)
            yield World(
                fmt,
                proxy,
                hostile,
                feed,
                path,
                lid,
                f"{lid}.{NUGET_VERSION}.nupkg",
                data=data,
                other=other,
                content_type="application/octet-stream",
            )
        else:
            raise ValueError(fmt)


async def _read(path: Path) -> bytes:
    return await asyncio.to_thread(path.read_bytes)


# --- observing what the proxy served and kept ----------------------------------------------------


@dataclass
class Outcome:
    """One response: its status, and its body if the transfer completed (None: it broke)."""

    status: int
    body: bytes | None
    headers: CIMultiDictProxy[str] | None

    def completed_wrong(self, expected: bytes) -> bool:
        """A 2xx that completed with other bytes than ``expected``: a corrupt artifact served."""
        return 200 <= self.status < 300 and self.body is not None and self.body != expected


async def fetch(
    http: aiohttp.ClientSession, method: str, url: str, headers: Mapping[str, str] | None = None, **kw: Any
) -> Outcome:
    """A request whose broken transfers are results, not errors (bounded in time)."""
    try:
        async with asyncio.timeout(30):
            async with http.request(method, url, headers=headers, **kw) as resp:
                try:
                    body = await resp.read()
                except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, ConnectionError):
                    return Outcome(resp.status, None, resp.headers)
                return Outcome(resp.status, body, resp.headers)
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
        return Outcome(0, None, None)


def store_problems(data_dir: Path) -> list[str]:
    """Index rows or blobs that refer to incomplete or wrong bytes (blocking; call in a thread)."""
    problems: list[str] = []
    root = data_dir / "blobs" / "sha256"
    for path in sorted(root.glob("*/*")):
        if path.is_file() and sha256_file(path) != path.name:
            problems.append(f"blob {path.name} does not hold the bytes its name says")
    with sqlite3.connect(data_dir / "index.sqlite3") as db:
        for repo, filename, digest in db.execute("SELECT repository, filename, digest FROM assets"):
            if not (root / digest[:2] / digest).is_file():
                problems.append(f"row {repo}/{filename} points at missing blob {digest}")
    return problems


def asset_digests(data_dir: Path, filename: str) -> list[tuple[str, str]]:
    """(repository, digest) of every row for ``filename`` (blocking; call in a thread)."""
    with sqlite3.connect(data_dir / "index.sqlite3") as db:
        rows = db.execute("SELECT repository, digest FROM assets WHERE filename=?", (filename,))
        return [(str(r), str(d)) for r, d in rows]


async def partial_commits(world: World, *, expect_row: bool) -> list[str]:
    """What the store holds that it should not: wrong rows for the artifact, broken blobs, and
    temp files left behind once the fetch settled."""
    data_dir = world.proxy.data_dir
    found = await asyncio.to_thread(store_problems, data_dir)
    for repo, digest in await asyncio.to_thread(asset_digests, data_dir, world.filename):
        if digest != world.sha256:
            found.append(f"row {repo}/{world.filename} -> {digest}, not the declared {world.sha256}")
    rows = await asyncio.to_thread(asset_digests, data_dir, world.filename)
    if rows and not expect_row:
        found.append(f"{world.filename} was indexed from a failed transfer: {rows}")
    for _ in range(50):  # a flight that failed removes its temp file just after the response
        leftovers = await asyncio.to_thread(temp_files, data_dir)
        if not leftovers:
            break
        await asyncio.sleep(0.05)
    found += [f"temp file left: {p.name}" for p in leftovers]
    return found


def flip(data: bytes) -> bytes:
    """The same length with one byte changed in the middle."""
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]


def upstream_gzip() -> Rule:
    """Relay the artifact gzipped with ``Content-Encoding: gzip``, although the proxy asks for
    identity: the declared digest is of the plain bytes, the wire carries others."""

    async def rule(ex: Exchange) -> bool:
        r = await ex.relay()
        body = gzip.compress(r.body, mtime=0)
        await ex.reply(r.status, [*r.without("content-encoding"), ("Content-Encoding", "gzip")], body)
        return True

    return rule


# --- truncation and wrong bytes, every format ------------------------------------------------------


def broken_bodies(world: World) -> list[tuple[str, Rule]]:
    return [
        ("truncated, Content-Length declared", truncated(keep=0.5, declare_length=True)),
        ("truncated, no Content-Length (close-delimited)", truncated(keep=0.5, declare_length=False)),
        ("truncated to nothing, Content-Length declared", truncated(keep=0.0, declare_length=True)),
        ("chunked, cut mid-body", chunked_cut(keep=0.5)),
        ("chunked, short but properly terminated", chunked_cut(keep=0.5, terminate=True)),
        ("one byte flipped, honest length", mutated(flip)),
        ("another complete artifact", mutated(lambda _: world.other)),
        ("one byte appended", mutated(lambda body: body + b"\0")),
        ("empty body", mutated(lambda _: b"")),
    ]


@pytest.mark.parametrize("fmt", FORMATS)
async def test_truncated_or_wrong_bytes_are_never_served_nor_kept(
    fmt: str,
    faults: GroupLedger,
    proxy_factory: ProxyFactory,
    dists: Dists,
    artifacts: Artifacts,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    async with open_world(fmt, proxy_factory, dists, artifacts, tmp_path) as world:
        url = world.url()
        corrupt: list[str] = []
        partial: list[str] = []
        for label, rule in broken_bodies(world):
            world.hostile.rules[world.upstream_path] = rule
            before = world.hostile.hits[world.upstream_path]
            # Two clients join the one download, a third asks with HEAD: all see the same fate.
            outcomes = await asyncio.gather(
                fetch(http, "GET", url), fetch(http, "GET", url), fetch(http, "HEAD", url)
            )
            assert world.hostile.hits[world.upstream_path] > before, f"{label}: the fault never ran"
            faults.inject(f"{fmt}: {label}")
            corrupt += [f"{label}: GET -> {o.status}" for o in outcomes[:2] if o.completed_wrong(world.data)]
            head = outcomes[2]
            if 200 <= head.status < 300:  # a HEAD that says OK vouches for bytes now stored
                corrupt.append(f"{label}: HEAD -> {head.status} for bytes never verified")
            partial += [f"{label}: {p}" for p in await partial_commits(world, expect_row=False)]
        faults.zero("corrupt_served", len(corrupt), "; ".join(corrupt))
        faults.zero("partial_commits", len(partial), "; ".join(partial))

        # Once the upstream behaves, the same URL gives the declared bytes, and they are kept.
        world.hostile.rules.pop(world.upstream_path)
        good = await fetch(http, "GET", url)
        assert good.status == 200 and good.body == world.data
        hit = await fetch(http, "GET", url)
        assert hit.status == 200 and hit.body == world.data
        assert hit.headers is not None and hit.headers["X-Cache"] == "HIT"
        assert await partial_commits(world, expect_row=True) == []
        assert [
            d for _, d in await asyncio.to_thread(asset_digests, world.proxy.data_dir, world.filename)
        ] == [world.sha256]


# --- an upstream rewrites a cached release ---------------------------------------------------------


async def _declared(http: aiohttp.ClientSession, world: World) -> dict[str, str]:
    """What the proxy's documents declare for the artifact (algorithm -> value), checked for
    agreement across the representations it serves."""
    proxy = world.proxy
    if world.fmt == "pypi":
        async with http.get(proxy.simple() + "beta/", headers=JSON_PAGE) as resp:
            assert resp.status == 200, await resp.text()
            page = json.loads(await resp.read())
        as_json = next(f["hashes"]["sha256"] for f in page["files"] if f["filename"] == world.filename)
        async with http.get(proxy.simple() + "beta/", headers=HTML_PAGE) as resp:
            text = (await resp.read()).decode()
        found = re.search(re.escape(world.filename) + r"#sha256=([0-9a-f]{64})", text)
        assert found is not None, text
        assert found.group(1) == as_json, "the HTML and JSON pages declare different digests"
        return {"sha256": as_json}
    assert world.fmt == "npm"
    dists: list[dict[str, Any]] = []
    for accept in ({"Accept": "application/json"}, ABBREVIATED):
        async with http.get(f"{proxy.url}/default/npm/public/{NPM_NAME}", headers=accept) as resp:
            assert resp.status == 200, await resp.text()
            dists.append(json.loads(await resp.read())["versions"][NPM_VERSION]["dist"])
    assert dists[0]["integrity"] == dists[1]["integrity"] and dists[0]["shasum"] == dists[1]["shasum"]
    return {"integrity": dists[0]["integrity"], "shasum": dists[0]["shasum"]}


def _describes(declared: Mapping[str, str], body: bytes) -> bool:
    """Whether a document's integrity fields describe ``body``."""
    if "sha256" in declared:
        return declared["sha256"] == hashlib.sha256(body).hexdigest()
    sri = "sha512-" + base64.b64encode(hashlib.sha512(body).digest()).decode()
    return declared["integrity"] == sri and declared["shasum"] == hashlib.sha1(body).hexdigest()


async def _rewrite_upstream_release(world: World, artifacts: Artifacts) -> bytes:
    """The upstream replaces the cached release with other bytes (and declares their digest)."""
    if isinstance(world.backend, FakePyPI):
        await world.backend.add_file_async("beta", artifacts.wheel_twin)
        return await _read(artifacts.wheel_twin)
    assert isinstance(world.backend, FakeNpmRegistry)
    await world.backend.add_version_async(NPM_NAME, artifacts.tarball_twin, version=NPM_VERSION)
    return await _read(artifacts.tarball_twin)


@pytest.mark.parametrize("fmt", ["pypi", "npm"])
async def test_an_upstream_rewriting_a_cached_release_is_reported_not_followed(
    fmt: str,
    faults: GroupLedger,
    proxy_factory: ProxyFactory,
    dists: Dists,
    artifacts: Artifacts,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    async with open_world(
        fmt, proxy_factory, dists, artifacts, tmp_path, upstream_metadata_ttl="0s"
    ) as world:
        first = await fetch(http, "GET", world.url())
        assert first.status == 200 and first.body == world.data
        assert _describes(await _declared(http, world), world.data)
        upstream_hits = world.hostile.hits[world.upstream_path]

        rewritten = await _rewrite_upstream_release(world, artifacts)
        assert rewritten != world.data
        faults.inject(f"{fmt}: upstream rewrote a cached release")
        declared = await _declared(http, world)  # the proxy reads the upstream's new document
        served = [
            await fetch(http, "GET", world.url()),
            await fetch(http, "GET", world.url("team")),  # a repository that never had it
        ]
        # The cached release stands: its bytes, under a digest that describes them (a client
        # that checks the page's digest against the bytes it gets must not be refused).
        wrong = [f"{o.status}" for o in served if o.completed_wrong(world.data)]
        if not _describes(declared, world.data):
            wrong.append(f"the documents now declare {declared}, the proxy serves the cached bytes")
        faults.zero("corrupt_served", len(wrong), "; ".join(wrong))
        assert all(o.status == 200 for o in served)
        assert world.hostile.hits[world.upstream_path] == upstream_hits, "the rewritten bytes were fetched"
        rows = await asyncio.to_thread(asset_digests, world.proxy.data_dir, world.filename)
        bad_rows = [f"{repo} -> {digest}" for repo, digest in rows if digest != world.sha256]
        faults.zero("partial_commits", len(bad_rows), "; ".join(bad_rows))

        # ... and the mutation is reported: a warning or error naming the file.
        reported = [
            r
            for r in caplog.records
            if r.levelno >= logging.WARNING
            and world.filename in r.getMessage()
            and re.search(r"mutat|chang|rewr", r.getMessage(), re.IGNORECASE)
        ]
        assert reported, "no log record reports the upstream's mutation of " + world.filename


# --- on-disk corruption and missing blobs ----------------------------------------------------------


def _blob_path(world: World) -> Path:
    return world.proxy.data_dir / "blobs" / "sha256" / world.sha256[:2] / world.sha256


def _corrupt_file(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(flip(data))


@pytest.mark.parametrize("fmt", ["pypi", "npm"])
async def test_a_blob_corrupted_or_lost_on_disk_is_never_served_and_fetched_again(
    fmt: str,
    faults: GroupLedger,
    proxy_factory: ProxyFactory,
    dists: Dists,
    artifacts: Artifacts,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    async with open_world(fmt, proxy_factory, dists, artifacts, tmp_path) as world:
        url = world.url()
        first = await fetch(http, "GET", url)
        assert first.status == 200 and first.body == world.data
        blob = _blob_path(world)
        corrupt: list[str] = []
        wrong_404: list[str] = []

        for label, damage in (
            ("one byte flipped on disk", _corrupt_file),
            ("blob file deleted", Path.unlink),
        ):
            await asyncio.to_thread(damage, blob)
            faults.inject(f"{fmt}: {label}")
            hits = world.hostile.hits[world.upstream_path]
            outcomes = [
                await fetch(http, "GET", url),
                await fetch(http, "GET", url, headers={"Range": "bytes=0-99"}),
                await fetch(http, "GET", url),
            ]
            corrupt += [f"{label}: {o.status}" for o in outcomes[::2] if o.completed_wrong(world.data)]
            ranged = outcomes[1]
            if ranged.status == 206 and ranged.body != world.data[:100]:
                corrupt.append(f"{label}: a Range request got other bytes")
            wrong_404 += [f"{label}: 404" for o in outcomes if o.status == 404]
            # Detected on read and fetched again: the last answer is the true file, stored again.
            last = outcomes[-1]
            assert last.status == 200 and last.body == world.data, f"{label}: {last.status}"
            assert world.hostile.hits[world.upstream_path] > hits, f"{label}: never fetched again"
            partial = await partial_commits(world, expect_row=True)
            faults.zero("partial_commits", len(partial), f"{label}: " + "; ".join(partial))
        faults.zero("corrupt_served", len(corrupt), "; ".join(corrupt))
        faults.zero("wrong_404", len(wrong_404), "; ".join(wrong_404))


# --- the same bytes in two repositories ------------------------------------------------------------


async def _publish(http: aiohttp.ClientSession, world: World, repo: str) -> None:
    """Publish the world's artifact, unchanged, into ``repo`` (twine's or npm's upload)."""
    base = world.proxy.url
    if world.fmt == "pypi":
        name, version = world.filename.split("-")[:2]
        form = aiohttp.FormData()
        for key, value in {
            ":action": "file_upload",
            "protocol_version": "1",
            "name": name,
            "version": version,
            "filetype": "bdist_wheel",
            "pyversion": "py3",
            "metadata_version": "2.1",
            "sha256_digest": world.sha256,
        }.items():
            form.add_field(key, value)
        form.add_field(
            "content", world.data, filename=world.filename, content_type="application/octet-stream"
        )
        async with http.post(f"{base}/default/pypi/{repo}/", data=form) as resp:
            assert resp.status == 201, await resp.text()
        return
    integrity = "sha512-" + base64.b64encode(hashlib.sha512(world.data).digest()).decode()
    doc = {
        "name": NPM_NAME,
        "dist-tags": {"latest": NPM_VERSION},
        "versions": {
            NPM_VERSION: {
                "name": NPM_NAME,
                "version": NPM_VERSION,
                "dist": {"integrity": integrity, "shasum": hashlib.sha1(world.data).hexdigest()},
            }
        },
        "_attachments": {
            world.filename: {
                "content_type": "application/octet-stream",
                "data": base64.b64encode(world.data).decode(),
                "length": len(world.data),
            }
        },
    }
    async with http.put(f"{base}/default/npm/{repo}/{NPM_NAME}", json=doc) as resp:
        assert resp.status == 201, await resp.text()


@pytest.mark.parametrize("fmt", ["pypi", "npm"])
async def test_deleting_shared_bytes_from_one_repository_never_breaks_another(
    fmt: str,
    faults: GroupLedger,
    proxy_factory: ProxyFactory,
    dists: Dists,
    artifacts: Artifacts,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    async with open_world(fmt, proxy_factory, dists, artifacts, tmp_path) as world:
        api = f"{world.proxy.url}/-/api/v1/domains/default/repositories"
        for name in ("hosted-a", "hosted-b"):
            async with http.post(api, json={"name": name, "upstreams": []}) as resp:
                assert resp.status == 201, await resp.text()
        # The same bytes: cached in public, reached through team's chain, published twice.
        for repo in ("public", "team"):
            got = await fetch(http, "GET", world.url(repo))
            assert got.status == 200 and got.body == world.data
        for repo in ("hosted-a", "hosted-b"):
            await _publish(http, world, repo)
        rows = await asyncio.to_thread(asset_digests, world.proxy.data_dir, world.filename)
        assert sorted(rows) == [(r, world.sha256) for r in ("hosted-a", "hosted-b", "public", "team")]
        version = dists.beta.name.split("-")[1] if fmt == "pypi" else NPM_VERSION
        upstream_hits = world.hostile.hits[world.upstream_path]

        lost: list[str] = []  # hosted-b's acknowledged publish, gone
        missing: list[str] = []  # a cached copy that now answers 404
        corrupt: list[str] = []

        async def survivors(repos: tuple[str, ...], step: str) -> None:
            for repo in repos:
                got = await fetch(http, "GET", world.url(repo))
                if got.completed_wrong(world.data):
                    corrupt.append(f"after {step}, {repo} serves other bytes")
                elif got.status != 200 or got.body != world.data:
                    where = lost if repo.startswith("hosted") else missing
                    where.append(f"after {step}, {repo} answers {got.status}")

        # Delete the version from one hosted repository (the admin API), then collect garbage.
        path = f"{api}/hosted-a/packages/{fmt}/{world.package}/versions/{version}"
        async with http.delete(path) as resp:
            assert resp.status in (200, 204), await resp.text()
        faults.inject(f"{fmt}: version deleted from one of four repositories sharing a blob")
        await survivors(("public", "team", "hosted-b"), "the delete")
        async with http.get(world.url("hosted-a")) as resp:
            assert resp.status == 404, "the deleted version is still served"
        report = await gc(world.proxy.pipeline.resolver.index, world.proxy.pipeline.blobs, 2**40)
        assert report.blobs_deleted == 0
        await survivors(("public", "team", "hosted-b"), "gc")
        # Evict every cached copy (a zero budget): the hosted one keeps the bytes.
        report = await gc(world.proxy.pipeline.resolver.index, world.proxy.pipeline.blobs, 0)
        faults.inject(f"{fmt}: every cached copy evicted while a hosted copy shares the blob")
        assert report.evicted, "gc with a zero budget evicted nothing"
        await survivors(("hosted-b",), "evicting the cached copies")
        faults.zero("writes_lost", len(lost), "; ".join(lost))
        faults.zero("wrong_404", len(missing), "; ".join(missing))
        faults.zero("corrupt_served", len(corrupt), "; ".join(corrupt))
        assert world.hostile.hits[world.upstream_path] == upstream_hits, "a kept copy was fetched again"
        partial = await partial_commits(world, expect_row=True)
        faults.zero("partial_commits", len(partial), "; ".join(partial))


# --- Accept-Encoding, and integrity fields through URL rewriting -----------------------------------


ENCODINGS: tuple[dict[str, str], ...] = (
    {"Accept-Encoding": "gzip"},
    {"Accept-Encoding": "br"},
    {"Accept-Encoding": "gzip, deflate, br, zstd"},
    {"Accept-Encoding": "*"},
    {"Accept-Encoding": "identity"},
    {"Accept-Encoding": "identity;q=0, gzip"},
)


@pytest.mark.parametrize("fmt", FORMATS)
async def test_artifact_bytes_never_vary_with_accept_encoding(
    fmt: str,
    faults: GroupLedger,
    proxy_factory: ProxyFactory,
    dists: Dists,
    artifacts: Artifacts,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    async with open_world(fmt, proxy_factory, dists, artifacts, tmp_path) as world:
        url = world.url()
        corrupt: list[str] = []
        # An upstream that compresses although asked for identity: its wire bytes are not the
        # declared ones; the proxy may decode and verify them, or refuse, never pass them on.
        world.hostile.rules[world.upstream_path] = upstream_gzip()
        faults.inject(f"{fmt}: upstream sent Content-Encoding: gzip unasked")
        squeezed = await fetch(http, "GET", url, headers={"Accept-Encoding": "gzip"})
        if squeezed.completed_wrong(world.data):
            corrupt.append(f"upstream gzip: {squeezed.status} with other bytes")
        if squeezed.headers is not None and "Content-Encoding" in squeezed.headers:
            corrupt.append("upstream gzip: the artifact went out with a Content-Encoding")
        world.hostile.rules.pop(world.upstream_path)
        partial = await partial_commits(world, expect_row=squeezed.status == 200)
        faults.zero("partial_commits", len(partial), "; ".join(partial))

        for index, headers in enumerate(ENCODINGS):  # the first is a miss (unless gzip was decoded)
            for method in ("GET", "HEAD"):
                got = await fetch(http, method, url, headers=headers)
                assert got.status == 200 and got.headers is not None, f"{method} {headers}: {got.status}"
                faults.inject(f"{fmt}: Accept-Encoding {headers['Accept-Encoding']!r}")
                if "Content-Encoding" in got.headers:
                    corrupt.append(f"{method} {headers}: Content-Encoding {got.headers['Content-Encoding']}")
                if method == "GET" and got.body != world.data:
                    corrupt.append(f"GET {headers} (request {index}): other bytes")
                length = got.headers.get("Content-Length")
                if length is not None and int(length) != len(world.data):
                    corrupt.append(f"{method} {headers}: Content-Length {length}")
        got = await fetch(http, "GET", url, skip_auto_headers=["Accept-Encoding"])
        if got.body != world.data or (got.headers is not None and "Content-Encoding" in got.headers):
            corrupt.append("no Accept-Encoding: other bytes")
        faults.zero("corrupt_served", len(corrupt), "; ".join(corrupt))


async def _upstream_and_proxy_integrity(
    http: aiohttp.ClientSession, world: World
) -> list[tuple[str, object, object]]:
    """(field, as the upstream declares it, as the proxy's document declares it) for every
    integrity field of the artifact in every document the proxy rewrites."""
    proxy, up = world.proxy, world.hostile
    pairs: list[tuple[str, object, object]] = []

    async def both(upstream_url: str, proxy_url: str, headers: Mapping[str, str]) -> tuple[Any, Any]:
        bodies = []
        for target in (upstream_url, proxy_url):
            async with http.get(target, headers=headers) as resp:
                assert resp.status == 200, f"{target}: {resp.status}"
                raw = await resp.read()
                if resp.headers.get("Content-Encoding") == "gzip":
                    raw = gzip.decompress(raw)
                bodies.append(raw)
        return bodies[0], bodies[1]

    if world.fmt == "pypi":
        a, b = await both(up.url("/simple/beta/"), proxy.simple() + "beta/", JSON_PAGE)
        for doc_a, doc_b in [(json.loads(a), json.loads(b))]:
            fa = {f["filename"]: f for f in doc_a["files"]}
            for f in doc_b["files"]:
                pairs.append((f"json {f['filename']} hashes", fa[f["filename"]]["hashes"], f["hashes"]))
                meta = fa[f["filename"]].get("core-metadata")
                if meta:
                    pairs.append((f"json {f['filename']} core-metadata", meta, f.get("core-metadata")))
        a, b = await both(up.url("/simple/beta/"), proxy.simple() + "beta/", HTML_PAGE)
        frag = re.compile(r'href="[^"#]*/([^/"#]+)#(sha256=[0-9a-f]+)"')
        up_frags, proxy_frags = dict(frag.findall(a.decode())), dict(frag.findall(b.decode()))
        for name, value in up_frags.items():
            pairs.append((f"html {name} #fragment", value, proxy_frags.get(name)))
    elif world.fmt == "npm":
        for accept in ({"Accept": "application/json"}, ABBREVIATED):
            a, b = await both(up.url(f"/{NPM_NAME}"), f"{proxy.url}/default/npm/public/{NPM_NAME}", accept)
            for version, manifest in json.loads(a)["versions"].items():
                theirs, ours = manifest["dist"], json.loads(b)["versions"][version]["dist"]
                for key in ("integrity", "shasum"):
                    pairs.append((f"{accept['Accept']} {version} dist.{key}", theirs[key], ours.get(key)))
    elif world.fmt == "maven":
        jar = artifact_path(MAVEN_GROUP, MAVEN_ARTIFACT, MAVEN_VERSION)
        for algo in ("sha1", "md5", "sha256", "sha512"):
            a, b = await both(up.url(f"/maven2/{jar}.{algo}"), f"{world.url()}.{algo}", {})
            pairs.append((f".{algo}", a.decode().split()[0], b.decode().split()[0]))
    else:
        lid = NUGET_ID.lower()
        a, b = await both(
            up.url(f"/v3/registration5-gz-semver2/{lid}/index.json"),
            f"{proxy.url}/default/nuget/public/v3/registration/{lid}/index.json",
            {"Accept-Encoding": "gzip"},
        )

        def entries(doc: Any) -> dict[str, Any]:
            return {
                leaf["catalogEntry"]["version"]: leaf["catalogEntry"]
                for page in doc["items"]
                for leaf in page.get("items", [])
            }

        theirs, ours = entries(json.loads(a)), entries(json.loads(b))
        for version, entry in theirs.items():
            for key in ("packageHash", "packageHashAlgorithm", "packageSize"):
                if key in ours.get(version, {}):  # rendered or not, never changed
                    pairs.append((f"{version} {key}", entry[key], ours[version][key]))
        assert pairs, "the proxy's registration declares no package hash"
    return pairs


@pytest.mark.parametrize("fmt", FORMATS)
async def test_url_rewriting_never_touches_integrity_fields(
    fmt: str,
    faults: GroupLedger,
    proxy_factory: ProxyFactory,
    dists: Dists,
    artifacts: Artifacts,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    async with open_world(fmt, proxy_factory, dists, artifacts, tmp_path) as world:
        for when in ("before the artifact is cached", "after"):
            pairs = await _upstream_and_proxy_integrity(http, world)
            faults.inject(f"{fmt}: documents rewritten {when}", len(pairs))
            changed = [f"{name}: {a!r} became {b!r}" for name, a, b in pairs if a != b]
            faults.zero("corrupt_served", len(changed), "; ".join(changed))
            got = await fetch(http, "GET", world.url())
            assert got.status == 200 and got.body == world.data
