"""Several proxy nodes as one registry (issue #12): real processes, one PostgreSQL, one bucket.

Every node here is ``python -m proxy serve`` on its own port and data directory
(:mod:`tests.cluster`), all sharing one PostgreSQL index (``[index] url``) and one S3 bucket
(moto's server); the clients are the real ones (twine, pip, uv, npm, mvn) run as subprocesses.
What a load balancer in front of such nodes promises its users, and what the tests prove:

* what is published through one node installs through any other at once, byte for byte;
* a change made through one node (a quarantine, a deletion, a revoked token) holds on every other
  by its next request, allowing only the NOTIFY's delivery (measured, bounded to 2 s);
* a hundred concurrent misses for one file, spread over three nodes, cost one upstream download;
* a node killed mid-download costs only its own clients: the others still get the file whole,
  the bucket never holds a wrong object, and a later request is a HIT with the right bytes.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hashlib
import itertools
import json
import time
import uuid
import zipfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.config import StorageConfig
from proxy.storage.s3 import S3Client
from tests.clients import installed, pip_download, pip_install, twine_upload, uv_install
from tests.cluster import Cluster, ClusterNode, StartCluster, bucket_keys, s3_storage, use_fake_aws
from tests.conftest import Dists
from tests.fakes.dists import build_wheel, dist_name, sha256_file
from tests.fakes.maven import FakeMavenRepo
from tests.fakes.npm import FakeNpmRegistry
from tests.fakes.pypi import FakePyPI
from tests.fakes.server import Fault
from tests.maven_clients import mvn, requires_local_repository, requires_mvn, write_project, write_settings
from tests.npm_clients import npm
from tests.s3_server import FAKE_ENV, MotoServer
from tests.test_nuget import Nupkgs, install, push, start_feed
from tests.test_nuget import installed as nuget_installed
from tests.test_nuget import needs_nuget as requires_nuget
from tests.test_nuget import nupkgs as nupkgs  # the session fixture of built nupkgs

ADMIN = "cluster-bootstrap-admin-" + "k" * 40
API = "/-/api/v1"
TEAM = f"{API}/domains/default/repositories/team"
NOTIFY_BOUND = 2.0  # seconds a change made on one node may take to hold on another


@dataclass(frozen=True)
class Shared:
    """What the nodes of one test share: the PostgreSQL database and the bucket."""

    dsn: str
    storage: dict[str, Any]
    endpoint: str
    bucket: str
    prefix: str


@pytest.fixture
async def shared(postgres_dsn: str, moto_s3: MotoServer, monkeypatch: pytest.MonkeyPatch) -> Shared:
    use_fake_aws(monkeypatch)
    bucket = "cluster-" + uuid.uuid4().hex[:12]  # moto is one server per session: a bucket per test
    storage = await s3_storage(moto_s3.endpoint, bucket)
    return Shared(postgres_dsn, storage, moto_s3.endpoint, bucket, storage["prefix"])


@pytest.fixture
async def admin_file(tmp_path: Path) -> Path:
    path = tmp_path / "admin-token"
    await asyncio.to_thread(path.write_text, ADMIN + "\n")
    return path


async def start(
    cluster_factory: StartCluster, n: int, upstream_url: str, shared: Shared, **kwargs: Any
) -> Cluster:
    return await cluster_factory(
        n, upstream_url=upstream_url, index_url=shared.dsn, storage=shared.storage, **kwargs
    )


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def get(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[int, bytes, str]:
    """Status, body and X-Cache of one GET."""
    async with http.get(url, headers=headers or {}) as resp:
        return resp.status, await resp.read(), resp.headers.get("X-Cache", "")


async def api(
    http: aiohttp.ClientSession,
    node: ClusterNode,
    method: str,
    path: str,
    body: Any = None,
) -> tuple[int, Any]:
    """An admin API call on ``node`` with the bootstrap administrator's token."""
    async with http.request(method, node.url + path, json=body, headers=bearer(ADMIN)) as resp:
        text = await resp.text()
        return resp.status, json.loads(text) if text else None


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def with_token(url: str, token: str) -> str:
    return url.replace("http://", f"http://aws:{token}@", 1)


async def until(check: Callable[[], Awaitable[bool]], bound: float = NOTIFY_BOUND, what: str = "") -> float:
    """Seconds until ``check`` holds (polled every 10 ms); fails past ``bound``."""
    began = time.monotonic()
    while not await check():
        waited = time.monotonic() - began
        assert waited < bound, f"not within {bound} s: {what or 'a change made on another node'}"
        await asyncio.sleep(0.01)
    return time.monotonic() - began


def wheel_member(wheel: Path, name: str) -> bytes:
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(name)


# --- publish on one node, install through another ----------------------------------------------


async def test_two_nodes_a_wheel_twined_to_one_is_downloaded_from_the_other(
    shared: Shared, cluster_factory: StartCluster, pypi: FakePyPI, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """The fast smoke test: two nodes, twine through A, ``pip download`` through B."""
    a, b = await start(cluster_factory, 2, pypi.url, shared)
    wheel = await asyncio.to_thread(build_wheel, tmp_path / "dist", "cluster-lib", "1.0")
    digest = await asyncio.to_thread(sha256_file, wheel)
    page = f"{b.url}/default/pypi/team/simple/cluster-lib/"
    # B is asked first: nobody has it yet (B may remember the upstream's "no such project").
    assert (await get(http, page))[0] == 404

    run = await twine_upload(f"{a.url}/default/pypi/team/", wheel)
    assert run.ok, run.output

    async def listed() -> bool:
        status, body, _ = await get(http, page)
        return status == 200 and f"{wheel.name}#sha256={digest}" in body.decode()

    delay = await until(listed, what="B listing what A published")
    print(f"published on A, listed on B after {delay:.3f} s")
    run = await pip_download(f"{b.url}/default/pypi/team/simple/", tmp_path / "got", "cluster-lib==1.0")
    assert run.ok, run.output + await b.log_tail()
    got = tmp_path / "got" / wheel.name
    assert await asyncio.to_thread(sha256_file, got) == digest
    # One copy of the file, in the shared bucket, under its digest.
    assert f"{shared.prefix}sha256/{digest}" in await bucket_keys(shared.endpoint, shared.bucket)


async def test_three_nodes_with_tokens_publish_install_and_changes_hold_everywhere(
    shared: Shared,
    cluster_factory: StartCluster,
    pypi: FakePyPI,
    dists: Dists,
    admin_file: Path,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """Tokens issued on A work on B and C; twine through A, pip through B, uv through C; then a
    quarantine, a deletion and a revocation made on one node hold on the others by their next
    request (within the NOTIFY's delivery, measured)."""
    cluster = await start(cluster_factory, 3, pypi.url, shared, auth=True, admin_token_file=str(admin_file))
    a, b, c = cluster
    _, publisher = await issue(http, a, permissions=("read", "publish"), principal="release")
    reader_id, reader = await issue(http, a, permissions=("read",), principal="ci")

    # shared-lib needs beta, which comes from the upstream through public: one hosted file and
    # one cached file for the changes below to act on.
    wheel = await asyncio.to_thread(
        build_wheel, tmp_path / "dist", "shared-lib", "1.0", requires=["beta>=1.0"]
    )
    digest = await asyncio.to_thread(sha256_file, wheel)
    module = await asyncio.to_thread(wheel_member, wheel, f"{dist_name('shared-lib')}/__init__.py")
    run = await twine_upload(f"{a.url}/default/pypi/team/", wheel, password=publisher)
    assert run.ok, run.output

    run = await pip_install(
        with_token(f"{b.url}/default/pypi/team/simple/", reader), tmp_path / "pip", "shared-lib"
    )
    assert run.ok, run.output + await b.log_tail()
    run = await uv_install(
        with_token(f"{c.url}/default/pypi/team/simple/", reader), tmp_path / "uv", "shared-lib"
    )
    assert run.ok, run.output + await c.log_tail()
    for target in (tmp_path / "pip", tmp_path / "uv"):
        assert await installed(target) == {"shared_lib", "beta"}
        path = target / dist_name("shared-lib") / "__init__.py"
        assert await asyncio.to_thread(path.read_bytes) == module
    hosted = f"/default/pypi/team/files/shared-lib/{wheel.name}"
    cached = f"/default/pypi/team/files/beta/{dists.beta.name}"
    for node in cluster:  # every node serves the very bytes twine sent, and lists their digest
        status, body, _ = await get(http, node.url + hosted, bearer(reader))
        assert status == 200 and sha256(body) == digest
        status, page, _ = await get(http, f"{node.url}/default/pypi/team/simple/shared-lib/", bearer(reader))
        assert status == 200 and f"#sha256={digest}" in page.decode()
        assert (await get(http, node.url + cached, bearer(reader)))[0] == 200

    async def answers(node: ClusterNode, path: str, want: int) -> bool:
        return (await get(http, node.url + path, bearer(reader)))[0] == want

    async def everywhere(nodes: tuple[ClusterNode, ...], path: str, want: int) -> float:
        """The longest wait, over ``nodes``, for ``path`` to answer ``want``."""
        waits = [
            until(functools.partial(answers, node, path, want), what=f"{node.name}: {want} for {path}")
            for node in nodes
        ]
        return max(await asyncio.gather(*waits))

    delays: dict[str, float] = {}
    # Quarantined on A: the cached file B and C have just served is refused there.
    quarantine = {"pattern": "beta@1.0", "reason": "CVE-1"}
    assert (await api(http, a, "PUT", f"{TEAM}/quarantine/pypi", quarantine))[0] == 200
    assert await answers(a, cached, 404)  # the node that made the change: no delay at all
    delays["quarantine"] = await everywhere((b, c), cached, 404)
    # Lifted on B: served again on A and C.
    async with http.delete(
        f"{b.url}{TEAM}/quarantine/pypi", params={"pattern": "beta@1.0"}, headers=bearer(ADMIN)
    ) as resp:
        assert resp.status == 204
    delays["lift"] = await everywhere((a, c), cached, 200)
    # The published version deleted on C: gone from A and B.
    assert (await api(http, c, "DELETE", f"{TEAM}/packages/pypi/shared-lib/versions/1.0"))[0] == 204
    delays["delete"] = await everywhere((a, b), hosted, 404)
    # The token revoked on A: refused on B and C, which have verified (and may cache) it.
    assert (await api(http, a, "DELETE", f"{API}/tokens/{reader_id}"))[0] == 204
    delays["revoke"] = await everywhere((b, c), "/default/pypi/team/simple/beta/", 401)
    print(f"cross-node invalidation delays (s): { {k: round(v, 3) for k, v in delays.items()} }")


async def issue(
    http: aiohttp.ClientSession, node: ClusterNode, *, permissions: tuple[str, ...], principal: str
) -> tuple[str, str]:
    """(token id, secret) for ``team``, issued on ``node`` by the bootstrap administrator."""
    body = {
        "domain": "default",
        "repository": "team",
        "principal": principal,
        "permissions": list(permissions),
        "duration": "1h",
    }
    status, data = await api(http, node, "POST", f"{API}/tokens", body)
    assert status == 201, data
    return data["id"], data["token"]


@requires_nuget
@pytest.mark.timeout(240)
async def test_nuget_pushed_through_one_node_installs_through_another(
    shared: Shared, cluster_factory: StartCluster, nupkgs: Nupkgs, tmp_path: Path
) -> None:
    """``nuget push`` (NuGet.exe on Mono) through A, ``nuget install`` through B: B resolves the
    pushed package from the shared index and its dependencies from the upstream feed, downloading
    the pushed nupkg from the bucket."""
    feed = await start_feed(nupkgs, hash_in_registration=True)
    try:
        a, b = await start(cluster_factory, 2, feed.url, shared, fmt="nuget", connection="nugetfake")
        ok, output = await push(tmp_path, a, "team", nupkgs.gamma)  # type: ignore[arg-type]
        assert ok, output + await a.log_tail()
        source = f"{b.url}/default/nuget/team/v3/index.json"
        ok, output, out = await install(tmp_path, "on-b", source, "Team.Gamma", "2.0.0")
        assert ok, output + await b.log_tail()
        assert await nuget_installed(out) == {"Team.Gamma.2.0.0", "Acme.Alpha.1.0.0", "Acme.Beta.1.0.0"}
        pushed = await asyncio.to_thread(nupkgs.gamma.read_bytes)
        got = await asyncio.to_thread((out / "Team.Gamma.2.0.0" / "Team.Gamma.2.0.0.nupkg").read_bytes)
        assert sha256(got) == sha256(pushed)
        keys = await bucket_keys(shared.endpoint, shared.bucket, shared.prefix)
        assert any(key.endswith(sha256(pushed)) for key in keys), keys
    finally:
        await feed.close()


async def test_npm_published_through_one_node_installs_through_another(
    shared: Shared, cluster_factory: StartCluster, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """``npm publish`` through A, ``npm install`` through B: B's lock file records the
    integrity A accepted (npm checked the tarball against it) and the package is installed."""
    async with FakeNpmRegistry() as upstream:
        a, b = await start(cluster_factory, 2, upstream.url, shared, fmt="npm", upstream_retries=0)
        pkg = tmp_path / "pkg"
        await asyncio.to_thread(pkg.mkdir)
        manifest = {"name": "@acme/shared", "version": "1.0.0", "main": "index.js", "license": "MIT"}
        await asyncio.to_thread((pkg / "package.json").write_text, json.dumps(manifest))
        await asyncio.to_thread((pkg / "index.js").write_text, "module.exports = 'shared';\n")
        cache = tmp_path / "cache"
        await asyncio.to_thread(cache.mkdir)
        lines = [f"{n.url.removeprefix('http:')}/default/npm/team/:_authToken=placeholder" for n in (a, b)]
        await asyncio.to_thread((cache / "npmrc").write_text, "\n".join(lines) + "\n")

        run = await npm("publish", cwd=pkg, registry=f"{a.url}/default/npm/team/", cache=cache)
        assert run.ok, run.output + await a.log_tail()
        # What A stored: the tarball npm sent, by its integrity.
        status, doc, _ = await get(http, f"{a.url}/default/npm/team/@acme%2fshared")
        assert status == 200
        integrity = json.loads(doc)["versions"]["1.0.0"]["dist"]["integrity"]

        app = tmp_path / "app"
        await asyncio.to_thread(app.mkdir)
        await asyncio.to_thread(
            (app / "package.json").write_text, '{"name":"app","version":"1.0.0","private":true}'
        )
        run = await npm(
            "install",
            "@acme/shared@1.0.0",
            cwd=app,
            registry=f"{b.url}/default/npm/team/",
            cache=tmp_path / "cache-b",
        )
        assert run.ok, run.output + await b.log_tail()
        lock = json.loads(await asyncio.to_thread((app / "package-lock.json").read_text))
        entry = lock["packages"]["node_modules/@acme/shared"]
        assert entry["integrity"] == integrity and entry["resolved"].startswith(b.url)
        index_js = app / "node_modules" / "@acme" / "shared" / "index.js"
        assert await asyncio.to_thread(index_js.read_text) == "module.exports = 'shared';\n"


DEPLOY_FILE = "org.apache.maven.plugins:maven-deploy-plugin:3.1.1:deploy-file"


def write_jar(path: Path) -> bytes:
    """A small jar (a manifest and one resource): what ``deploy-file`` publishes as it is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as jar:
        jar.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\r\nCreated-By: test_cluster\r\n\r\n")
        jar.writestr("zz/cluster/greeting.txt", "hello from the cluster\n")
    return path.read_bytes()


@requires_mvn
@requires_local_repository
@pytest.mark.timeout(300)
async def test_mvn_deployed_through_one_node_resolves_through_another(
    shared: Shared, cluster_factory: StartCluster, tmp_path: Path
) -> None:
    """``mvn deploy:deploy-file`` through A, then a project built through B depends on it: B
    resolves the release (the pom the deploy generated, the jar) with the very bytes deployed,
    and, the package being published, never asks the upstream about it."""
    async with FakeMavenRepo() as central:
        a, b = await start(cluster_factory, 2, central.url, shared, fmt="maven")
        team_a, team_b = (f"{n.url}/default/maven/team/" for n in (a, b))
        work = tmp_path / "deploy"
        jar = await asyncio.to_thread(write_jar, work / "lib-1.0.jar")
        settings = await asyncio.to_thread(write_settings, work / "settings.xml", team_a, server_id="proxy")
        coordinates = ["-DgroupId=zz.cluster", "-DartifactId=lib", "-Dversion=1.0", "-Dpackaging=jar"]
        args = [
            DEPLOY_FILE,
            f"-Dfile={work / 'lib-1.0.jar'}",
            *coordinates,
            f"-Durl={team_a}",
            "-DrepositoryId=proxy",
        ]
        deployed = await mvn(args, cwd=work, settings=settings, local_repo=work / "m2")
        assert deployed.ok, deployed.explain() + await a.log_tail()

        # Published now: B must not ask the upstream about that package any more.
        asked = {path for path in central.hits if "zz/cluster" in path}
        use = tmp_path / "use"
        settings = await asyncio.to_thread(write_settings, use / "settings.xml", team_b)
        dep = [("zz.cluster", "lib", "1.0", "compile")]
        await asyncio.to_thread(write_project, use / "p", "zz.cluster", "app", "1.0", dep, with_test=False)
        built = await mvn(["compile"], cwd=use / "p", settings=settings, local_repo=use / "m2")
        assert built.ok, built.explain() + await b.log_tail()
        assert f"{team_b}zz/cluster/lib/1.0/lib-1.0.jar" in built.downloads(), built.explain()
        resolved = use / "m2" / "zz" / "cluster" / "lib" / "1.0" / "lib-1.0.jar"
        assert sha256(await asyncio.to_thread(resolved.read_bytes)) == sha256(jar)
        assert {path for path in central.hits if "zz/cluster" in path} == asked


# --- one upstream download for the whole cluster ----------------------------------------------


async def slow_big_upstream(pypi: FakePyPI, root: Path, *, size: int, seconds: float) -> Path:
    """A wheel of about ``size`` bytes that the fake sends over about ``seconds``."""
    wheel = await asyncio.to_thread(build_wheel, root, "slowpkg", "1.0", payload_size=size)
    await pypi.add_file_async("slowpkg", wheel)
    chunks = 20
    total = (await asyncio.to_thread(wheel.stat)).st_size
    pypi.faults[f"/files/{wheel.name}"] = Fault("slow", chunk=total // chunks + 1, delay=seconds / chunks)
    return wheel


async def fetch_whole(http: aiohttp.ClientSession, url: str) -> tuple[int, str, str, str]:
    """Status, sha256 of the body, X-Cache, and which node's worker answered; a cut connection
    is status 0."""
    try:
        async with http.get(url) as resp:
            digest = hashlib.sha256()
            async for chunk in resp.content.iter_chunked(1 << 20):
                digest.update(chunk)
            worker = f"{resp.url.port}/{resp.headers.get('X-Proxy-Worker', '-')}"
            return resp.status, digest.hexdigest(), resp.headers.get("X-Cache", ""), worker
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, aiohttp.ServerDisconnectedError):
        return 0, "", "", ""


@pytest.mark.timeout(180)
async def test_a_hundred_misses_over_three_nodes_cost_one_upstream_download(
    shared: Shared, cluster_factory: StartCluster, pypi: FakePyPI, tmp_path: Path
) -> None:
    """A 3 MB file the upstream takes 3 s to send, asked for 100 times at once round-robin over
    three nodes of two worker processes each: one worker of one node downloads it, its sibling
    tails its staging file (flock), the other nodes wait for it in the cluster (advisory lock)
    and serve it from the bucket; every client gets the right bytes."""
    wheel = await slow_big_upstream(pypi, tmp_path / "dist", size=3 * 2**20, seconds=3.0)
    digest = await asyncio.to_thread(sha256_file, wheel)
    cluster = await start(cluster_factory, 3, pypi.url, shared, workers=2, upstream_read_timeout="30s")
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=90)) as http:
        for node in cluster:  # each node learns the file's upstream URL from the page
            assert (await get(http, f"{node.url}/default/pypi/public/simple/slowpkg/"))[0] == 200
        urls = itertools.cycle(node.files_url("slowpkg", wheel.name) for node in cluster)
        results = await asyncio.gather(*(fetch_whole(http, next(urls)) for _ in range(100)))
    gets = pypi.hits[f"/files/{wheel.name}"]
    caches = collections.Counter(r[2] for r in results)
    workers = collections.Counter(r[3] for r in results)
    print(f"100 misses over 3 nodes x 2 workers: {gets} upstream GET(s); X-Cache {dict(caches)}; {workers}")
    assert [r for r in results if r[:2] != (200, digest)] == []
    assert gets == 1, f"{gets} upstream downloads of one file"
    # They were concurrent misses (a HIT would have come after the download was committed).
    assert caches["MISS"] >= 90, caches
    assert len(workers) == 6, f"not every worker of every node answered: {workers}"


@pytest.mark.timeout(180)
async def test_a_node_killed_mid_download_costs_only_its_own_clients(
    shared: Shared, cluster_factory: StartCluster, pypi: FakePyPI, tmp_path: Path
) -> None:
    """A downloads a file the upstream sends slowly, B and C wait for it in the cluster, and A
    is SIGKILLed mid-download: A's clients are cut, B's and C's get the whole file all the same
    (one of them takes the download over: one more upstream GET, not two), the bucket holds
    nothing under a wrong name, and afterwards every node, A restarted too, answers a HIT."""
    wheel = await slow_big_upstream(pypi, tmp_path / "dist", size=3 * 2**20, seconds=3.0)
    digest = await asyncio.to_thread(sha256_file, wheel)
    cluster = await start(cluster_factory, 3, pypi.url, shared, upstream_read_timeout="30s")
    a, b, c = cluster
    upstream_path = f"/files/{wheel.name}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=90)) as http:
        for node in cluster:
            assert (await get(http, f"{node.url}/default/pypi/public/simple/slowpkg/"))[0] == 200
        # A starts the download; once the upstream is sending it, B and C are asked too.
        on_a = [asyncio.create_task(fetch_whole(http, a.files_url("slowpkg", wheel.name))) for _ in range(3)]

        async def upstream_sending() -> bool:
            return pypi.hits[upstream_path] >= 1

        await until(upstream_sending, bound=10, what="A asking the upstream")
        await asyncio.sleep(0.5)
        others = [
            asyncio.create_task(fetch_whole(http, node.files_url("slowpkg", wheel.name)))
            for node in (b, c)
            for _ in range(3)
        ]
        await asyncio.sleep(0.5)
        # B and C wait for A's download rather than start their own.
        assert pypi.hits[upstream_path] == 1 and not any(t.done() for t in on_a + others)
        await a.kill()
        killed = await asyncio.gather(*on_a)
        survived = await asyncio.gather(*others)
        gets = pypi.hits[upstream_path]
        seen = [r[0] for r in killed], [r[0] for r in survived]
        print(f"kill mid-download: statuses of A's and of B's/C's clients {seen}, {gets} upstream GETs")
        # The kill landed mid-download: A's clients were cut (or told 5xx), none got a 200.
        assert all(status == 0 or status >= 500 for status, *_ in killed), killed
        # B's and C's clients, in flight on the nodes that live, got the whole file.
        assert [r[:2] for r in survived] == [(200, digest)] * 6, (survived, await b.log_tail())
        # A's cut download, then one more by whichever of B and C took the key over.
        assert gets == 2, f"{gets} upstream GETs"
        # The bucket holds no object under a digest that is not its content's.
        await assert_bucket_objects_match_their_names(shared)
        # Later requests are HITs with the right bytes, on A started again as well, and A's
        # restart cleared what its cut download had left in its staging directory.
        await a.start()
        for node in cluster:
            status, got, cache, _ = await fetch_whole(http, node.files_url("slowpkg", wheel.name))
            assert (status, got, cache) == (200, digest, "HIT"), await node.log_tail()
        assert pypi.hits[upstream_path] == 2
        assert await asyncio.to_thread(files_under, a.data_dir / "tmp") == []


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


async def assert_bucket_objects_match_their_names(shared: Shared) -> None:
    """Every blob object in the bucket holds the bytes its name (a sha256) says."""
    client = S3Client(
        StorageConfig(backend="s3", bucket=shared.bucket, endpoint_url=shared.endpoint), FAKE_ENV
    )
    try:
        keys = {key async for key, _, _ in client.list(shared.prefix)}
        blobs = [k for k in keys if k.startswith(f"{shared.prefix}sha256/")]
        assert blobs
        for key in blobs:
            response = await client.get(key)
            assert response is not None, key
            try:
                digest = hashlib.sha256()
                async for chunk in response.content.iter_chunked(1 << 20):
                    digest.update(chunk)
            finally:
                response.release()
            assert key.rsplit("/", 1)[1] == digest.hexdigest(), key
    finally:
        await client.close()
