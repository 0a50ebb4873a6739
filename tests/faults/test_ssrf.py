"""Fault group 7: SSRF.

An upstream (or whoever controls its documents) names URLs the proxy then fetches: PyPI file
links, npm ``dist.tarball``, NuGet service-index resources and registration ``packageContent``,
and HTTP redirects. DESIGN.md invariant 11 and the README's "Outbound fence": only configured
origins; redirect and metadata targets are checked after DNS resolution against loopback,
link-local (cloud metadata), private ranges and non-HTTP schemes; redirects have a hop limit and
never downgrade https to http.

Whether the proxy *connected* is observed, not inferred: decoy listeners on other loopback ports
and addresses (127.0.0.1, 127.0.0.2 — all of 127/8 is loopback on Linux — and ::1) count every
accepted connection. A positive control shows a decoy does count when a host is explicitly trusted.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import ssl
import subprocess
import tarfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import Dists, ProxyFactory
from tests.fakes.npm import FakeNpmRegistry
from tests.fakes.nuget import FakeNuGetFeed, build_nupkg
from tests.fakes.pypi import FakePyPI
from tests.faults.hostile import Exchange, HostileUpstream, answer, mutated
from tests.faults.report import GroupLedger

GROUP = "7 SSRF"

DECOY_BODY = b"DECOY-INTERNAL-SECRET"


@dataclass
class Decoy:
    """A listener standing for an internal service: counts connections, answers a secret."""

    host: str
    accepted: int = 0
    port: int = 0
    _server: asyncio.Server | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def start(self) -> bool:
        try:
            self._server = await asyncio.start_server(self._conn, self.host, 0)
        except OSError:
            return False  # no such address here (IPv6 off)
        self.port = self._server.sockets[0].getsockname()[1]
        return True

    @property
    def netloc(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        with contextlib.suppress(Exception):
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: "
                + str(len(DECOY_BODY)).encode()
                + b"\r\nConnection: close\r\n\r\n"
                + DECOY_BODY
            )
            await writer.drain()
        writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def decoys() -> AsyncIterator[list[Decoy]]:
    started = []
    for host in ("127.0.0.1", "127.0.0.2", "::1"):
        decoy = Decoy(host)
        if await decoy.start():
            started.append(decoy)
    yield started
    for decoy in started:
        await decoy.close()


def internal_targets(decoys: list[Decoy], path: str) -> list[str]:
    """URLs that reach the inside: decoys by every spelling, metadata, private ranges, schemes."""
    p = decoys[0].port
    urls = [f"http://{d.netloc}{path}" for d in decoys]
    urls += [
        f"http://localhost:{p}{path}",
        f"http://0x7f000001:{p}{path}",
        f"http://2130706433:{p}{path}",
        f"http://127.1:{p}{path}",
        f"http://0177.0.0.1:{p}{path}",
        f"http://[::ffff:127.0.0.1]:{p}{path}",
        f"http://evil.example@127.0.0.1:{p}{path}",
        f"http://169.254.169.254{path}",
        f"http://[fd00:ec2::254]{path}",
        f"http://10.0.0.1{path}",
        f"http://172.16.0.1{path}",
        f"http://192.168.0.1{path}",
        f"http://100.64.0.1{path}",
        f"http://0.0.0.0:{p}{path}",
        f"file://{path}",
        f"file:///etc/passwd#{path}",
        f"gopher://127.0.0.1:{p}/_GET%20{path}",
        f"ftp://127.0.0.1:{p}{path}",
    ]
    return urls


def connected(decoys: list[Decoy]) -> int:
    return sum(d.accepted for d in decoys)


def refused(status: int, body: bytes) -> bool:
    """A refusal: an error status and nothing of the internal service in the body."""
    return status >= 400 and DECOY_BODY not in body


async def fetch(http: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    try:
        async with http.get(url, timeout=aiohttp.ClientTimeout(total=20)) as resp:
            return resp.status, await resp.read()
    except aiohttp.ClientPayloadError:
        return 599, b""  # a transfer cut mid-body: not a success


def pypi_page(project: str, files: list[tuple[str, str, str]]) -> bytes:
    """A PEP 691 project page listing (filename, url, sha256)."""
    return json.dumps(
        {
            "meta": {"api-version": "1.1"},
            "name": project,
            "versions": [],
            "files": [{"filename": f, "url": u, "hashes": {"sha256": h}} for f, u, h in files],
        }
    ).encode()


PYPI_JSON = [("Content-Type", "application/vnd.pypi.simple.v1+json")]


async def ssrf_pypi_round(
    proxy_factory: ProxyFactory,
    pypi: FakePyPI,
    dists: Dists,
    decoys: list[Decoy],
    http: aiohttp.ClientSession,
    **upstream: Any,
) -> tuple[list[str], int, int]:
    """Links on a PyPI page to every internal target: (URLs served, decoy connections, control status)."""
    async with HostileUpstream(pypi.origin) as hostile:
        wheel = await asyncio.to_thread(dists.beta.read_bytes)
        digest = hashlib.sha256(wheel).hexdigest()
        targets = internal_targets(decoys, "/files/evil.whl")
        files = [(f"evil-1.{i}.tar.gz", url, digest) for i, url in enumerate(targets)]
        # A control: the same page may link the upstream's own origin, which keeps working.
        files.append((dists.beta.name, hostile.url(f"/files/{dists.beta.name}"), digest))
        hostile.rules["/simple/evil/"] = answer(200, pypi_page("evil", files), PYPI_JSON)
        proxy = await proxy_factory(hostile.url("/simple/"), **upstream)
        base = f"{proxy.url}/default/pypi/public/files/evil/"
        served = []
        for name, url, _ in files[:-1]:
            status, body = await fetch(http, base + name)
            if not refused(status, body):
                served.append(f"{url} -> {status}")
        control, body = await fetch(http, base + dists.beta.name)
        assert body == wheel or control != 200, body[:300]
        assert control == 200, body[:400]
        return served, connected(decoys), control


async def test_pypi_file_links_to_internal_targets_are_refused(
    proxy_factory: ProxyFactory,
    pypi: FakePyPI,
    dists: Dists,
    decoys: list[Decoy],
    http: aiohttp.ClientSession,
    faults: GroupLedger,
) -> None:
    served, hits, control = await ssrf_pypi_round(proxy_factory, pypi, dists, decoys, http)
    faults.inject("metadata URL to an internal target", len(internal_targets(decoys, "/")))
    faults.zero("ssrf_connected", hits, "decoy connections from PyPI file links")
    faults.zero("unauthorized_ok", len(served), f"internal links served: {served}")
    assert control == 200  # the configured origin itself stays reachable


async def test_allow_hosts_patterns_are_checked_after_dns_resolution(
    proxy_factory: ProxyFactory,
    pypi: FakePyPI,
    dists: Dists,
    decoys: list[Decoy],
    http: aiohttp.ClientSession,
    faults: GroupLedger,
) -> None:
    """``allow_hosts = ["*"]`` lets any *name* pass the first check; what it resolves to (localhost,
    127.1, 0x7f000001 ...) is still refused at connect time, and IP literals never pass."""
    served, hits, control = await ssrf_pypi_round(
        proxy_factory, pypi, dists, decoys, http, upstream_allow_hosts=["*"]
    )
    faults.inject("metadata URL to an internal target, any host allowed", len(internal_targets(decoys, "/")))
    faults.zero("ssrf_connected", hits, "decoy connections with allow_hosts=['*']")
    faults.zero("unauthorized_ok", len(served), f"internal links served: {served}")
    assert control == 200


async def test_positive_control_an_exactly_named_host_may_be_internal(
    proxy_factory: ProxyFactory,
    pypi: FakePyPI,
    dists: Dists,
    decoys: list[Decoy],
    http: aiohttp.ClientSession,
    faults: GroupLedger,
) -> None:
    """README "Hosts": a host named exactly in allow_hosts may resolve inside. This shows the decoy
    counter sees a connection when one is made, so its zeros above mean something."""
    async with HostileUpstream(pypi.origin) as hostile:
        url = f"http://localhost:{decoys[0].port}/files/evil.whl"
        digest = hashlib.sha256(DECOY_BODY).hexdigest()
        hostile.rules["/simple/evil/"] = answer(
            200, pypi_page("evil", [("evil-1.0.tar.gz", url, digest)]), PYPI_JSON
        )
        proxy = await proxy_factory(hostile.url("/simple/"), upstream_allow_hosts=["localhost"])
        status, body = await fetch(http, f"{proxy.url}/default/pypi/public/files/evil/evil-1.0.tar.gz")
    assert connected(decoys) == 1 and status == 200 and body == DECOY_BODY


async def test_redirects_to_internal_targets_are_refused_and_hops_bounded(
    proxy_factory: ProxyFactory,
    pypi: FakePyPI,
    dists: Dists,
    decoys: list[Decoy],
    http: aiohttp.ClientSession,
    faults: GroupLedger,
) -> None:
    """The upstream's own file URL answers 30x to an internal target (every status code in turn);
    a redirect loop on the upstream's own origin ends after a bounded number of hops with a 502."""
    wheel = await asyncio.to_thread(dists.beta.read_bytes)
    digest = hashlib.sha256(wheel).hexdigest()
    async with HostileUpstream(pypi.origin) as hostile:
        targets = internal_targets(decoys, "/files/evil.whl")
        codes = (301, 302, 303, 307, 308)
        files = [(f"evil-1.{i}.tar.gz", hostile.url(f"/redir/{i}"), digest) for i in range(len(targets))]
        files.append(("evil-9.0.tar.gz", hostile.url("/loop/0"), digest))

        async def redirect(ex: Exchange) -> bool:
            i = int(ex.path.rsplit("/", 1)[1])
            await ex.reply(codes[i % len(codes)], [("Location", targets[i])], b"")
            return True

        async def loop(ex: Exchange) -> bool:
            i = int(ex.path.rsplit("/", 1)[1])
            await ex.reply(302, [("Location", f"/loop/{i + 1}")], b"")
            return True

        hostile.rules["/simple/evil/"] = answer(200, pypi_page("evil", files), PYPI_JSON)
        hostile.rules["/redir/*"] = redirect
        hostile.rules["/loop/*"] = loop
        proxy = await proxy_factory(hostile.url("/simple/"), upstream_allow_hosts=["*"])
        base = f"{proxy.url}/default/pypi/public/files/evil/"
        served = []
        for (name, _, _), url in zip(files, targets, strict=False):
            status, body = await fetch(http, base + name)
            if not refused(status, body):
                served.append(f"{url} -> {status}")
        faults.inject("redirect to an internal target", len(targets))
        faults.zero("ssrf_connected", connected(decoys), "decoy connections through redirects")
        faults.zero("unauthorized_ok", len(served), f"redirects followed inside: {served}")
        assert sum(hostile.hits[f"/redir/{i}"] for i in range(len(targets))) == len(targets)

        status, _ = await fetch(http, base + "evil-9.0.tar.gz")
        faults.inject("redirect loop")
        hops = sum(n for path, n in hostile.hits.items() if path.startswith("/loop/"))
        assert status == 502
        retries = proxy.config.upstreams["fake"].retries
        assert 0 < hops <= 10 * (retries + 1), hops


def npm_packument(name: str, versions: dict[str, str], shasum: str, integrity: str) -> bytes:
    return json.dumps(
        {
            "name": name,
            "dist-tags": {"latest": max(versions)},
            "versions": {
                v: {
                    "name": name,
                    "version": v,
                    "dist": {"tarball": url, "shasum": shasum, "integrity": integrity},
                }
                for v, url in versions.items()
            },
            "time": {},
        }
    ).encode()


def npm_tarball(name: str, version: str) -> bytes:
    """A minimal npm package tarball (package/package.json), built in memory."""
    manifest = json.dumps({"name": name, "version": version}).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("package/package.json")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
    return buf.getvalue()


async def test_npm_dist_tarball_to_internal_targets_is_refused(
    proxy_factory: ProxyFactory, decoys: list[Decoy], http: aiohttp.ClientSession, faults: GroupLedger
) -> None:
    data = npm_tarball("evil", "1.0.0")
    shasum = hashlib.sha1(data).hexdigest()
    integrity = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
    async with FakeNpmRegistry() as registry, HostileUpstream(registry.origin) as hostile:
        targets = {f"1.0.{i + 1}": u for i, u in enumerate(internal_targets(decoys, "/evil/-/evil-X.tgz"))}
        versions = {v: u.replace("evil-X.tgz", f"evil-{v}.tgz") for v, u in targets.items()}
        versions["1.0.0"] = hostile.url("/evil/-/evil-1.0.0.tgz")  # the control, on the origin
        hostile.rules["/evil"] = answer(
            200, npm_packument("evil", versions, shasum, integrity), [("Content-Type", "application/json")]
        )
        hostile.rules["/evil/-/evil-1.0.0.tgz"] = answer(
            200, data, [("Content-Type", "application/octet-stream")]
        )
        proxy = await proxy_factory(
            hostile.url("/"), fmt="npm", connection="npmfake", upstream_allow_hosts=["*"]
        )
        base = f"{proxy.url}/default/npm/public/evil/-/"
        served = []
        for version, url in versions.items():
            if version == "1.0.0":
                continue
            status, body = await fetch(http, f"{base}evil-{version}.tgz")
            if not refused(status, body):
                served.append(f"{url} -> {status}")
        control, body = await fetch(http, f"{base}evil-1.0.0.tgz")
    faults.inject("npm dist.tarball to an internal target", len(versions) - 1)
    faults.zero("ssrf_connected", connected(decoys), "decoy connections from dist.tarball")
    faults.zero("unauthorized_ok", len(served), f"internal tarballs served: {served}")
    assert control == 200 and body == data


async def test_nuget_resources_and_package_content_to_internal_targets_are_refused(
    proxy_factory: ProxyFactory,
    decoys: list[Decoy],
    http: aiohttp.ClientSession,
    tmp_path: Path,
    faults: GroupLedger,
) -> None:
    """A service index whose RegistrationsBaseUrl points inside, and registrations whose
    ``packageContent`` points inside: every one refused; the feed's own URLs keep working."""
    nupkg = await asyncio.to_thread(build_nupkg, tmp_path / "pk", "Acme.Alpha", "1.0.0")
    feed = FakeNuGetFeed()
    await feed.start()
    try:
        await feed.add_package_async(nupkg)
        # A sample of the spellings (a proxy per target: the service index is per connection).
        targets = internal_targets(decoys, "/v3/registration/")[::3]
        served: list[str] = []
        statuses: list[int] = []
        async with HostileUpstream(feed.origin) as hostile:
            # 1. The service index names an internal registration hive: one proxy per target.
            for i, target in enumerate(targets):
                index = {
                    "version": "3.0.0",
                    "resources": [
                        {"@id": target, "@type": "RegistrationsBaseUrl/3.6.0"},
                        {"@id": target.replace("registration", "flat"), "@type": "PackageBaseAddress/3.0.0"},
                    ],
                }
                hostile.rules[f"/idx{i}/index.json"] = answer(
                    200, json.dumps(index).encode(), [("Content-Type", "application/json")]
                )
                proxy = await proxy_factory(
                    hostile.url(f"/idx{i}/index.json"),
                    fmt="nuget",
                    connection="nugetfake",
                    data_dir=tmp_path / f"d{i}",
                    upstream_allow_hosts=["*"],
                )
                feed_base = f"{proxy.url}/default/nuget/public"
                for url in (
                    f"{feed_base}/v3/registration/acme.alpha/index.json",
                    f"{feed_base}/v3-flatcontainer/acme.alpha/index.json",
                    f"{feed_base}/v3-flatcontainer/acme.alpha/1.0.0/acme.alpha.1.0.0.nupkg",
                ):
                    status, body = await fetch(http, url)
                    statuses.append(status)
                    if not refused(status, body) and DECOY_BODY in body:
                        served.append(f"{target}: {url} -> {status}")
                    if status == 200 and url.endswith(".nupkg"):
                        served.append(f"{target}: {url} -> {status}")
                await proxy.stop()
            faults.inject("NuGet service resource to an internal target", len(targets))

            # 2. The registration's packageContent points inside (the real index, mutated leaves).
            current = {"url": ""}

            def swap(body: bytes) -> bytes:
                doc = json.loads(body)
                for page in doc.get("items", []):
                    for leaf in page.get("items", []):
                        leaf["packageContent"] = current["url"]
                        leaf["catalogEntry"]["packageContent"] = current["url"]
                return json.dumps(doc).encode()

            hostile.rules["/registration*"] = mutated(swap)
            hostile.rules["/v3/registration*"] = mutated(swap)
            contents = internal_targets(decoys, "/pkg/acme.alpha.1.0.0.nupkg")[1::3]
            for i, target in enumerate(contents):
                current["url"] = target
                proxy = await proxy_factory(
                    hostile.url("/v3/index.json"),
                    fmt="nuget",
                    connection="nugetfake",
                    data_dir=tmp_path / f"e{i}",
                    upstream_allow_hosts=["*"],
                )
                flat = f"{proxy.url}/default/nuget/public/v3-flatcontainer"
                url = f"{flat}/acme.alpha/1.0.0/acme.alpha.1.0.0.nupkg"
                status, body = await fetch(http, url)
                statuses.append(status)
                if not refused(status, body):
                    served.append(f"{target}: nupkg -> {status}")
                await proxy.stop()
            faults.inject("NuGet packageContent to an internal target", len(contents))
            registration_hits = sum(n for p, n in hostile.hits.items() if "registration" in p)
            assert registration_hits > 0  # the mutated documents were really read
    finally:
        await feed.close()
    assert set(statuses) == {502}, statuses  # refused, naming the upstream (README "Errors")
    faults.zero("ssrf_connected", connected(decoys), "decoy connections from NuGet documents")
    faults.zero("unauthorized_ok", len(served), f"internal NuGet URLs served: {served}")


def _make_tls(root: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a certificate for 127.0.0.1 and localhost: (ca, cert, key). Blocking."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n", encoding="utf-8")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=root, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-subj", "/CN=fault CA", "-days", "2")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "key.pem", "-out", "req.csr",
            "-subj", "/CN=127.0.0.1")  # fmt: skip
    openssl("x509", "-req", "-in", "req.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "cert.pem", "-days", "2", "-extfile", "san.cnf")  # fmt: skip
    return root / "ca.pem", root / "cert.pem", root / "key.pem"


async def test_redirect_from_https_to_http_is_refused(
    proxy_factory: ProxyFactory,
    decoys: list[Decoy],
    http: aiohttp.ClientSession,
    tmp_path: Path,
    faults: GroupLedger,
) -> None:
    """An https upstream redirects a file to plain http on a host it may otherwise use
    (``localhost``, named exactly in allow_hosts): the downgrade is refused; https to https works."""
    ca, cert, key = await asyncio.to_thread(_make_tls, tmp_path / "tls")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    await asyncio.to_thread(context.load_cert_chain, cert, key)
    digest = hashlib.sha256(DECOY_BODY).hexdigest()
    plain = f"http://localhost:{decoys[0].port}/files/evil-1.0.tar.gz"

    async def page(request: web.Request) -> web.Response:
        origin = f"https://127.0.0.1:{request.url.port}"
        files = [
            ("evil-1.0.tar.gz", f"{origin}/files/down", digest),
            ("evil-1.1.tar.gz", f"{origin}/files/up", digest),
        ]
        return web.Response(body=pypi_page("evil", files), content_type=PYPI_JSON[0][1])

    async def down(request: web.Request) -> web.Response:
        raise web.HTTPFound(plain)

    async def up(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"https://localhost:{request.url.port}/files/real")

    async def real(request: web.Request) -> web.Response:
        return web.Response(body=DECOY_BODY)

    app = web.Application()
    app.router.add_get("/simple/evil/", page)
    app.router.add_get("/files/down", down)
    app.router.add_get("/files/up", up)
    app.router.add_get("/files/real", real)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    try:
        port = runner.addresses[0][1]
        proxy = await proxy_factory(
            f"https://127.0.0.1:{port}/simple/",
            upstream_ca_bundle=str(ca),
            upstream_allow_hosts=["localhost"],
        )
        base = f"{proxy.url}/default/pypi/public/files/evil/"
        status, body = await fetch(http, base + "evil-1.0.tar.gz")
        faults.inject("https to http redirect")
        faults.zero("ssrf_connected", connected(decoys), "plain-http connections after an https redirect")
        faults.zero("unauthorized_ok", int(not refused(status, body)), f"downgrade followed: {status}")
        assert status == 502
        status, body = await fetch(http, base + "evil-1.1.tar.gz")
        assert status == 200 and body == DECOY_BODY  # https -> https on an allowed host still works
    finally:
        await runner.cleanup()
