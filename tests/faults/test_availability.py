"""Fault group 2, availability: upstream trouble means stale-but-correct, never a wrong 404.

DESIGN.md invariant 4 and the README's caching rules, checked as a matrix of fault kind x format.
Every format runs behind a :class:`HostileUpstream` relaying to its real fake registry; the proxy's
connection has short timeouts (below) and ``metadata_ttl = 0s``, so every request for a page
revalidates it upstream and meets the fault. For each fault kind:

(a) **cold**: a page that was never cached fails with 502/503/504 whose JSON body names the
    upstream, within the configured timeouts (plus slack); a file of a cached page that was never
    fetched fails the same way or breaks off, never completes with wrong bytes;
(b) **warm**: a page cached while the upstream was healthy is served (``X-Cache: STALE``, with an
    ``X-Proxy-Warning``) with the cached content, within bounded latency; where the fault counts as
    an upstream failure, once ``breaker_threshold`` requests failed the upstream is skipped at once
    (no further upstream hit, answer within ``FAST``); a cached file is served as it was;
(c) **cleared**: once the fault is gone (and the breaker's cooldown passed) the cold page and file
    work: the failure was never remembered as "not found" (``negative_ttl`` is a minute).

Fault kinds: refused (nothing listens), NXDOMAIN (a ``.invalid`` host), blackhole (accepts, never
answers), 5xx, 429 with ``Retry-After`` in seconds and as an HTTP-date, a body that stalls midway,
a body that drips, malformed documents (invalid JSON, HTML, XML; gzip bytes without
``Content-Encoding``), and an upstream that flaps between up and down. PyPI and npm get every kind,
Maven and NuGet refused, 5xx and malformed. Counted: ``wrong_404`` (a 404 where a failure or the
content was due) and ``corrupt_served`` (a 2xx whose content is not what the healthy upstream said).
While the upstream fails, npm's packument lists only the versions whose tarballs are cached (README,
npm section); that narrowed document is what a stale npm page must carry.

Besides the matrix: the retry after a 429 waits for its ``Retry-After`` (seconds and HTTP-date,
timed at the upstream), and a Retry-After of an hour does not hold a warm page past the soft
deadline; a flapping upstream under bursts of concurrent clients sees a handful of requests per key
and round, not one per client; a SNAPSHOT's own ``maven-metadata.xml`` keeps its last good copy;
``max_staleness`` bounds the stale copy on the slow path and the failing path alike.

Deliberate bugs that turn this module red (tried on a copy of the tree): remembering an upstream
failure as a 404 (refused, blackhole, 5xx, flapping: 242 wrong 404s); no stale-if-error (15 of 17);
caching a document without the format's check (every malformed and gzip row, SNAPSHOT); ignoring
an HTTP-date ``Retry-After`` (the Retry-After test); a breaker that never opens (blackhole, 5xx,
nxdomain); no single-flight for refreshes and renderings (flapping: ~170 upstream requests for 180
asks); the soft-deadline path ignoring ``max_staleness``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from tests.conftest import Dists, ProxyFactory, RunningProxy
from tests.fakes.dists import sha256_file
from tests.fakes.maven import FakeMavenRepo
from tests.fakes.npm import FakeNpmRegistry, build_tarball
from tests.fakes.nuget import FakeNuGetFeed, build_nupkg
from tests.fakes.pypi import FakePyPI
from tests.faults.hostile import (
    HostileUpstream,
    Rule,
    answer,
    blackhole,
    decoded,
    drip,
    flapping,
    gzipped,
    limited,
    resume_listening,
    stalled,
    stop_listening,
    timed,
    unconditional,
)
from tests.faults.report import GroupLedger

GROUP = "2 availability"

UPSTREAM = "up"  # the connection's name: what error bodies must name
CONNECT, READ, METADATA_TIMEOUT = 0.5, 0.6, 1.2
SOFT_DEADLINE = 2.0
THRESHOLD, COOLDOWN = 2, 0.7
SLACK = 1.5  # scheduling on a shared 2-core machine
FAST = 0.6  # "skipped at once": well under any timeout above
SETTINGS: dict[str, Any] = {
    "upstream_metadata_ttl": "0s",
    "upstream_connect_timeout": f"{CONNECT}s",
    "upstream_read_timeout": f"{READ}s",
    "upstream_metadata_timeout": f"{METADATA_TIMEOUT}s",
    "upstream_retries": 0,
    "upstream_breaker_threshold": THRESHOLD,
    "upstream_breaker_cooldown": f"{COOLDOWN}s",
    "soft_deadline": f"{SOFT_DEADLINE}s",
    "negative_ttl": "60s",
}
NPM_WARM, NPM_COLD = "avail-warm", "avail-cold"
MAVEN_GROUP = "org.avail"
NUGET_WARM, NUGET_COLD = "Acme.Warm", "Acme.Cold"
JSON_PAGE = {"Accept": "application/vnd.pypi.simple.v1+json"}
NPM_FULL = {"Accept": "application/json"}


# --- artifacts, built once per session -----------------------------------------------------------


@dataclass(frozen=True)
class Artifacts:
    npm_warm: Path  # avail-warm 1.0.0 (cached while healthy)
    npm_warm_next: Path  # avail-warm 1.1.0 (listed, never fetched: the cold file)
    npm_cold: Path  # avail-cold 1.0.0 (never asked for before the fault)
    nuget_warm: Path
    nuget_warm_next: Path
    nuget_cold: Path


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Artifacts:
    root = tmp_path_factory.mktemp("availability")
    with ThreadPoolExecutor(max_workers=3) as pool:  # npm pack takes ~0.5 s each
        warm = pool.submit(build_tarball, root / "npm", NPM_WARM, "1.0.0")
        warm_next = pool.submit(build_tarball, root / "npm-next", NPM_WARM, "1.1.0")
        cold = pool.submit(build_tarball, root / "npm", NPM_COLD, "1.0.0")
        return Artifacts(
            npm_warm=warm.result(),
            npm_warm_next=warm_next.result(),
            npm_cold=cold.result(),
            nuget_warm=build_nupkg(root / "nuget", NUGET_WARM, "1.0.0"),
            nuget_warm_next=build_nupkg(root / "nuget", NUGET_WARM, "1.1.0"),
            nuget_cold=build_nupkg(root / "nuget", NUGET_COLD, "1.0.0"),
        )


# --- one target per format: fake registry, hostile relay in front, proxy behind ------------------


def _pypi_content(body: bytes) -> object:
    return {f["filename"]: f["hashes"]["sha256"] for f in json.loads(body)["files"]}


def _npm_content(body: bytes) -> object:
    doc = json.loads(body)
    return {v: m["dist"]["integrity"] for v, m in doc["versions"].items()}


def _maven_content(body: bytes) -> object:
    return [v.text for v in ET.fromstring(body).iterfind("versioning/versions/version")]


def _nuget_content(body: bytes) -> object:
    return json.loads(body)["versions"]


@dataclass
class Target:
    """One format's world and the keys the matrix asks for (paths relative to the proxy)."""

    fmt: str
    hostile: HostileUpstream
    upstream_url: str  # the connection URL, pointing at the hostile relay
    proxy: RunningProxy
    start_proxy: Callable[..., Awaitable[RunningProxy]]
    content_of: Callable[[bytes], object]
    headers: Mapping[str, str]
    warm_page: str
    cold_page: str
    expected: dict[str, object]  # page path -> content the healthy upstream gives
    warm_file: str
    cold_file: str  # a file of the warm package, never fetched before the fault
    cold_pkg_file: str  # a file of the cold package
    digests: dict[str, str]  # file path -> sha256
    doc_paths: tuple[str, ...]  # the upstream's raw paths of the warm and cold documents
    base_rules: dict[str, Rule] = field(default_factory=dict)
    # The warm page while the upstream fails, where it differs from the healthy one: npm lists
    # only versions whose tarballs are cached (README, npm), so that an install still works.
    stale_expected: object = None

    def url(self, path: str) -> str:
        return self.proxy.url + path

    def set_rules(self, rules: Mapping[str, Rule]) -> None:
        """The fault's rules first (the first matching prefix wins), then the standing ones."""
        self.hostile.rules.clear()
        self.hostile.rules.update(rules)
        for key, rule in self.base_rules.items():
            self.hostile.rules.setdefault(key, rule)

    @property
    def upstream_hits(self) -> int:
        return sum(self.hostile.hits.values())


async def _sha(path: Path) -> str:
    return await asyncio.to_thread(sha256_file, path)


@contextlib.asynccontextmanager
async def open_target(
    fmt: str, proxy_factory: ProxyFactory, dists: Dists, artifacts: Artifacts, tmp_path: Path, **extra: Any
) -> AsyncIterator[Target]:
    """Start ``fmt``'s fake registry with a warm and a cold package, a relay, and a proxy."""
    settings = {**SETTINGS, **extra}

    async def start(url: str) -> RunningProxy:
        return await proxy_factory(url, fmt=fmt, connection=UPSTREAM, data_dir=tmp_path / fmt, **settings)

    async with contextlib.AsyncExitStack() as stack:
        if fmt == "pypi":
            pypi = await stack.enter_async_context(FakePyPI())
            for project, path in (("beta", dists.beta), ("beta", dists.beta_sdist), ("alpha", dists.alpha)):
                await pypi.add_file_async(project, path)
            hostile = await stack.enter_async_context(HostileUpstream(pypi.origin))
            url = hostile.url("/simple/")
            sha = {p.name: await _sha(p) for p in (dists.beta, dists.beta_sdist, dists.alpha)}
            files = "/default/pypi/public/files"
            yield Target(
                fmt, hostile, url, await start(url), start, _pypi_content, JSON_PAGE,
                warm_page="/default/pypi/public/simple/beta/",
                cold_page="/default/pypi/public/simple/alpha/",
                expected={
                    "/default/pypi/public/simple/beta/": {
                        n: sha[n] for n in (dists.beta.name, dists.beta_sdist.name)
                    },
                    "/default/pypi/public/simple/alpha/": {dists.alpha.name: sha[dists.alpha.name]},
                },
                warm_file=f"{files}/beta/{dists.beta.name}",
                cold_file=f"{files}/beta/{dists.beta_sdist.name}",
                cold_pkg_file=f"{files}/alpha/{dists.alpha.name}",
                digests={
                    f"{files}/beta/{dists.beta.name}": sha[dists.beta.name],
                    f"{files}/beta/{dists.beta_sdist.name}": sha[dists.beta_sdist.name],
                    f"{files}/alpha/{dists.alpha.name}": sha[dists.alpha.name],
                },
                doc_paths=("/simple/beta/", "/simple/alpha/"),
            )  # fmt: skip
        elif fmt == "npm":
            npm = await stack.enter_async_context(FakeNpmRegistry())
            w1 = await npm.add_version_async(NPM_WARM, artifacts.npm_warm, version="1.0.0")
            w2 = await npm.add_version_async(NPM_WARM, artifacts.npm_warm_next, version="1.1.0")
            c1 = await npm.add_version_async(NPM_COLD, artifacts.npm_cold, version="1.0.0")
            hostile = await stack.enter_async_context(HostileUpstream(npm.origin))
            url = hostile.url("/")
            base = "/default/npm/public"
            paths = {
                f"{base}/{e.name}/-/{e.filename}": await _sha(p)
                for e, p in (
                    (w1, artifacts.npm_warm),
                    (w2, artifacts.npm_warm_next),
                    (c1, artifacts.npm_cold),
                )
            }
            tarballs = list(paths)
            yield Target(
                fmt, hostile, url, await start(url), start, _npm_content, NPM_FULL,
                warm_page=f"{base}/{NPM_WARM}",
                cold_page=f"{base}/{NPM_COLD}",
                expected={
                    f"{base}/{NPM_WARM}": {"1.0.0": w1.integrity, "1.1.0": w2.integrity},
                    f"{base}/{NPM_COLD}": {"1.0.0": c1.integrity},
                },
                warm_file=tarballs[0], cold_file=tarballs[1], cold_pkg_file=tarballs[2], digests=paths,
                doc_paths=(f"/{NPM_WARM}", f"/{NPM_COLD}"),
                stale_expected={"1.0.0": w1.integrity},
            )  # fmt: skip
        elif fmt == "maven":
            root = tmp_path / "m2-empty"
            await asyncio.to_thread(root.mkdir, exist_ok=True)
            maven = await stack.enter_async_context(FakeMavenRepo(root=root))
            added = {a: maven.add_version(MAVEN_GROUP, a, "1.0") for a in ("warm", "cold")}
            hostile = await stack.enter_async_context(HostileUpstream(maven.origin))
            url = hostile.url("/maven2/")
            base = "/default/maven/public/"
            g = MAVEN_GROUP.replace(".", "/")
            digests = {}
            for a in ("warm", "cold"):
                for kind in ("jar", "pom"):
                    async with aiohttp.ClientSession() as s, s.get(maven.url + added[a][kind]) as r:
                        digests[base + added[a][kind]] = hashlib.sha256(await r.read()).hexdigest()
            yield Target(
                fmt, hostile, url, await start(url), start, _maven_content, {},
                warm_page=f"{base}{g}/warm/maven-metadata.xml",
                cold_page=f"{base}{g}/cold/maven-metadata.xml",
                expected={f"{base}{g}/{a}/maven-metadata.xml": ["1.0"] for a in ("warm", "cold")},
                warm_file=base + added["warm"]["jar"], cold_file=base + added["warm"]["pom"],
                cold_pkg_file=base + added["cold"]["jar"], digests=digests,
                doc_paths=(f"/maven2/{g}/warm/maven-metadata.xml", f"/maven2/{g}/cold/maven-metadata.xml"),
            )  # fmt: skip
        elif fmt == "nuget":
            feed = await stack.enter_async_context(FakeNuGetFeed(hash_in_registration=True))
            for path in (artifacts.nuget_warm, artifacts.nuget_warm_next, artifacts.nuget_cold):
                await feed.add_package_async(path)
            hostile = await stack.enter_async_context(HostileUpstream(feed.origin))
            # nuget.org's SemVer 2 hive is gzip only: decoded, so its links lead through the relay.
            base_rules: dict[str, Rule] = {"/v3/registration5-gz-semver2/*": decoded()}
            hostile.rules.update(base_rules)
            url = hostile.url("/v3/index.json")
            flat = "/default/nuget/public/v3-flatcontainer"
            w, c = NUGET_WARM.lower(), NUGET_COLD.lower()
            digests = {
                f"{flat}/{w}/1.0.0/{w}.1.0.0.nupkg": await _sha(artifacts.nuget_warm),
                f"{flat}/{w}/1.1.0/{w}.1.1.0.nupkg": await _sha(artifacts.nuget_warm_next),
                f"{flat}/{c}/1.0.0/{c}.1.0.0.nupkg": await _sha(artifacts.nuget_cold),
            }
            nupkgs = list(digests)
            yield Target(
                fmt, hostile, url, await start(url), start, _nuget_content, {},
                warm_page=f"{flat}/{w}/index.json",
                cold_page=f"{flat}/{c}/index.json",
                expected={f"{flat}/{w}/index.json": ["1.0.0", "1.1.0"], f"{flat}/{c}/index.json": ["1.0.0"]},
                warm_file=nupkgs[0], cold_file=nupkgs[1], cold_pkg_file=nupkgs[2], digests=digests,
                doc_paths=(feed.registration_path(NUGET_WARM), feed.registration_path(NUGET_COLD)),
                base_rules=base_rules,
            )  # fmt: skip
        else:
            raise ValueError(fmt)


# --- observing answers ---------------------------------------------------------------------------


@dataclass
class Answer:
    """One response: status, headers, body (None: the transfer broke off), seconds it took."""

    status: int
    headers: CIMultiDictProxy[str] | None
    body: bytes | None
    seconds: float

    def error_body(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.body or b"")
        except ValueError:
            return {}
        return doc if isinstance(doc, dict) else {}

    def names_upstream(self) -> bool:
        doc = self.error_body()
        named = re.search(rf"(?<![\w.-]){UPSTREAM}(?![\w-])", str(doc.get("message", "")))
        return doc.get("upstream") == UPSTREAM or named is not None


async def ask(http: aiohttp.ClientSession, url: str, headers: Mapping[str, str] | None = None) -> Answer:
    """A GET whose broken transfers are results, not errors (bounded in time)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(30):
        try:
            async with http.get(url, headers=headers) as resp:
                try:
                    body: bytes | None = await resp.read()
                except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, ConnectionError):
                    body = None
                return Answer(resp.status, resp.headers, body, loop.time() - started)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            return Answer(0, None, None, loop.time() - started)


@dataclass
class Tally:
    """What the zero-counters saw, and every other broken promise as a sentence."""

    wrong_404: int = 0
    corrupt: int = 0
    problems: list[str] = field(default_factory=list)

    def content_ok(self, t: Target, path: str, answer: Answer, *, stale: bool = False) -> bool:
        """A 2xx page must carry what the healthy upstream said; a file, its exact bytes."""
        if answer.body is None:
            return False
        if path in t.digests:
            return hashlib.sha256(answer.body).hexdigest() == t.digests[path]
        narrowed = stale and path == t.warm_page and t.stale_expected is not None
        expected = t.stale_expected if narrowed else t.expected[path]
        try:
            return t.content_of(answer.body) == expected
        except (ValueError, KeyError, TypeError, ET.ParseError):
            return False

    def failure(self, t: Target, path: str, answer: Answer, bound: float, what: str) -> None:
        """A cold request under the fault: 502/503/504 naming the upstream, in time; a file may
        also break off mid-transfer (its 200 was sent before the upstream failed)."""
        if answer.status == 404:
            self.wrong_404 += 1
            self.problems.append(f"{what}: 404 {answer.body!r:.200}")
        elif 200 <= answer.status < 300:
            if answer.body is None and path in t.digests:
                pass  # a download that broke off: the client knows it failed
            elif self.content_ok(t, path, answer):
                self.problems.append(f"{what}: answered 2xx with the old content where a failure was due")
            else:
                self.corrupt += 1
                self.problems.append(f"{what}: 2xx with wrong content {answer.body!r:.200}")
        elif answer.status not in (502, 503, 504):
            self.problems.append(f"{what}: status {answer.status} {answer.body!r:.300}")
        elif not answer.names_upstream():
            self.problems.append(
                f"{what}: the error does not name upstream {UPSTREAM!r}: {answer.body!r:.300}"
            )
        if answer.seconds > bound:
            self.problems.append(f"{what}: took {answer.seconds:.2f}s, bound {bound:.2f}s")

    def served(self, t: Target, path: str, answer: Answer, bound: float, what: str, *, stale: bool) -> None:
        """Content that must be served: right content, marked stale when ``stale``, in time."""
        if answer.status == 404:
            self.wrong_404 += 1
            self.problems.append(f"{what}: 404 {answer.body!r:.200}")
        elif not 200 <= answer.status < 300:
            self.problems.append(f"{what}: status {answer.status} {answer.body!r:.300}")
        elif not self.content_ok(t, path, answer, stale=stale):
            self.corrupt += 1
            self.problems.append(f"{what}: wrong content {answer.body!r:.200}")
        elif stale and answer.headers is not None and not _marked_stale(answer.headers):
            self.problems.append(f"{what}: not marked stale: X-Cache={answer.headers.get('X-Cache')}")
        if answer.seconds > bound:
            self.problems.append(f"{what}: took {answer.seconds:.2f}s, bound {bound:.2f}s")

    def report(self, faults: GroupLedger) -> None:
        faults.zero("wrong_404", self.wrong_404, "; ".join(self.problems))
        faults.zero("corrupt_served", self.corrupt, "; ".join(self.problems))
        assert not self.problems, "\n".join(self.problems)


def _marked_stale(headers: CIMultiDictProxy[str]) -> bool:
    """The documented marker: ``X-Cache: STALE`` with an ``X-Proxy-Warning`` saying why."""
    return headers.get("X-Cache") == "STALE" and bool(headers.get("X-Proxy-Warning"))


async def warm_up(t: Target, http: aiohttp.ClientSession) -> None:
    """While the upstream is healthy: the warm page and one of its files are cached."""
    tally = Tally()
    tally.served(
        t, t.warm_page, await ask(http, t.url(t.warm_page), t.headers), 10, "healthy page", stale=False
    )
    tally.served(t, t.warm_file, await ask(http, t.url(t.warm_file)), 10, "healthy file", stale=False)
    assert not tally.problems, tally.problems


# --- fault kinds ---------------------------------------------------------------------------------


def _http_date(ahead: float) -> Callable[[], str]:
    return lambda: format_datetime(datetime.now(UTC) + timedelta(seconds=ahead), usegmt=True)


# Documents a format's upstream cannot parse, by format; each with the Content-Type it is sent as.
MALFORMED: dict[str, dict[str, tuple[str, bytes]]] = {
    "pypi": {
        "json": (
            "application/vnd.pypi.simple.v1+json",
            b'{"meta": {"api-version": "1.1"}, "files": [{"filena',
        ),
        "html-cut": (
            "text/html",
            b'<!DOCTYPE html>\n<html><body><h1>Links for beta</h1>\n<a href="../../files/beta-1.0-py3-none-a',
        ),
        "html-binary": ("text/html", bytes(range(256)) * 4),
    },
    "npm": {"json": ("application/json", b'{"name": "avail-warm", "versions": {"1.0.0": {"dist": ')},
    "maven": {
        "xml": ("text/xml", b"<?xml version='1.0'?><metadata><groupId>org.avail</groupId><versioning><ver")
    },
    "nuget": {"json": ("application/json", b'{"count": 1, "items": [{"@id": ')},
}


@dataclass(frozen=True)
class Kind:
    """A fault: how to start and clear it, and what it costs at most."""

    name: str
    rules: Callable[[Target], dict[str, Rule]] | None = None  # None: special handling
    opens_breaker: bool = True  # an upstream failure the breaker counts
    files_fail: bool = True  # False: only documents misbehave, files come as they should
    retries: int = 0
    wait: float = 0.0  # the longest the proxy should wait between attempts (Retry-After)

    @property
    def cold_bound(self) -> float:
        return (self.retries + 1) * METADATA_TIMEOUT + self.retries * self.wait + SLACK

    @property
    def warm_bound(self) -> float:
        return min(SOFT_DEADLINE, self.cold_bound - SLACK) + SLACK


def _everything(rule: Callable[[], Rule]) -> Callable[[Target], dict[str, Rule]]:
    return lambda t: {"/*": rule()}


def _documents(make: Callable[[Target], Rule]) -> Callable[[Target], dict[str, Rule]]:
    return lambda t: {path: make(t) for path in t.doc_paths}


def _malformed(variant: str) -> Callable[[Target], dict[str, Rule]]:
    def rules(t: Target) -> dict[str, Rule]:
        ctype, body = MALFORMED[t.fmt][variant]
        return {path: answer(200, body, [("Content-Type", ctype)]) for path in t.doc_paths}

    return rules


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("refused"),
        Kind("nxdomain"),
        Kind("blackhole", _everything(blackhole)),
        Kind("5xx", _everything(lambda: answer(503, b"upstream maintenance"))),
        # Persistent 429s (a 429 is no outage: the breaker does not count it); one retry, after
        # the Retry-After the upstream asked for. Its pacing is checked in its own test below.
        Kind(
            "429-seconds", _everything(lambda: limited(lambda: "1")), opens_breaker=False, retries=1, wait=1.0
        ),
        Kind(
            "429-date", _everything(lambda: limited(_http_date(1))), opens_breaker=False, retries=1, wait=1.0
        ),
        Kind("stall", _everything(lambda: stalled(keep=0.5)), opens_breaker=False),
        # Documents only: a file that trickles is a slow download, streamed as it comes.
        Kind(
            "drip",
            _documents(lambda t: unconditional(drip(chunk=8, delay=0.25))),
            opens_breaker=False,
            files_fail=False,
        ),
        Kind("malformed-json", _malformed("json"), opens_breaker=False, files_fail=False),
        Kind("malformed-html-cut", _malformed("html-cut"), opens_breaker=False, files_fail=False),
        Kind("malformed-html-binary", _malformed("html-binary"), opens_breaker=False, files_fail=False),
        Kind("malformed-xml", _malformed("xml"), opens_breaker=False, files_fail=False),
        Kind("gzip-no-encoding", _documents(lambda t: gzipped()), opens_breaker=False, files_fail=False),
    )
}
# Which formats meet which fault (PyPI and npm: all; Maven and NuGet: refused, 5xx, malformed).
MATRIX: dict[str, tuple[str, ...]] = {
    "refused": ("pypi", "npm", "maven", "nuget"),
    "nxdomain": ("pypi", "npm"),
    "blackhole": ("pypi", "npm"),
    "5xx": ("pypi", "npm", "maven", "nuget"),
    "429-seconds": ("pypi", "npm"),
    "429-date": ("pypi", "npm"),
    "stall": ("pypi", "npm"),
    "drip": ("pypi", "npm"),
    "malformed-json": ("pypi", "npm", "nuget"),  # PEP 691 JSON, packument, registration index
    "malformed-html-cut": ("pypi",),
    "malformed-html-binary": ("pypi",),
    "malformed-xml": ("maven",),
    "gzip-no-encoding": ("pypi", "npm", "maven", "nuget"),
}


async def begin(kind: Kind, t: Target) -> None:
    if kind.name == "refused":
        await stop_listening(t.hostile)
    elif kind.name == "nxdomain":
        # The same connection (same name, same cache), its host no longer resolving.
        await t.proxy.stop()
        t.proxy = await t.start_proxy(t.upstream_url.replace("127.0.0.1", "upstream-gone.invalid"))
    else:
        assert kind.rules is not None
        t.set_rules(kind.rules(t))


async def end(kind: Kind, t: Target) -> None:
    if kind.name == "refused":
        await resume_listening(t.hostile)
    elif kind.name == "nxdomain":
        await t.proxy.stop()
        t.proxy = await t.start_proxy(t.upstream_url)
    else:
        t.set_rules({})


# --- the matrix ----------------------------------------------------------------------------------


async def one_case(
    fmt: str,
    kind: Kind,
    proxy_factory: ProxyFactory,
    dists: Dists,
    artifacts: Artifacts,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> Tally:
    """(a), (b) and (c) of the module docstring for one format under one fault."""
    tally = Tally()
    loop = asyncio.get_running_loop()
    async with open_target(
        fmt, proxy_factory, dists, artifacts, tmp_path, upstream_retries=kind.retries
    ) as t:
        await warm_up(t, http)
        await begin(kind, t)

        # (a) cold: a page never cached.
        cold = await ask(http, t.url(t.cold_page), t.headers)
        tally.failure(t, t.cold_page, cold, kind.cold_bound, f"{fmt}: cold page")
        # (b) warm: the cached page, stale; its cached file as it was; a file it lists that was
        # never fetched fails like a cold page, unless only documents misbehave (then the stale
        # page still leads to the right file).
        warm = await ask(http, t.url(t.warm_page), t.headers)
        tally.served(t, t.warm_page, warm, kind.warm_bound, f"{fmt}: warm page", stale=True)
        opened = loop.time()  # THRESHOLD (2) failed asks are behind us: cold page, warm page
        if kind.opens_breaker:
            # The upstream is now skipped at once until the cooldown: no upstream request, no wait.
            for what, path in (("warm page", t.warm_page), ("cold page", t.cold_page)):
                if loop.time() - opened > COOLDOWN / 2:  # a slow machine: a probe may rightly go out
                    break
                hits = t.upstream_hits
                answer = await ask(http, t.url(path), t.headers)
                label = f"{fmt}: {what}, breaker open"
                if path == t.warm_page:
                    tally.served(t, path, answer, FAST, label, stale=True)
                else:
                    tally.failure(t, path, answer, FAST, label)
                if t.upstream_hits != hits:
                    tally.problems.append(f"{label}: {t.upstream_hits - hits} upstream requests went out")
        warm_file = await ask(http, t.url(t.warm_file))
        tally.served(t, t.warm_file, warm_file, FAST + SLACK, f"{fmt}: warm file", stale=False)
        cold_file = await ask(http, t.url(t.cold_file))
        if kind.files_fail:
            tally.failure(t, t.cold_file, cold_file, kind.cold_bound, f"{fmt}: cold file of the warm page")
        else:
            tally.served(t, t.cold_file, cold_file, kind.cold_bound, f"{fmt}: cold file", stale=False)

        # (c) the fault clears: the same cold keys work, nothing was remembered as "not found".
        await end(kind, t)
        if kind.opens_breaker and kind.name != "nxdomain":  # (a new proxy has a new breaker)
            await asyncio.sleep(COOLDOWN + 0.1)
        for path, headers in ((t.cold_page, t.headers), (t.cold_file, {}), (t.cold_pkg_file, {})):
            answer = await ask(http, t.url(path), headers)
            tally.served(t, path, answer, 10, f"{fmt}: after the fault, {path}", stale=False)
    return tally


@pytest.mark.parametrize("kind_name", list(MATRIX))
async def test_upstream_fault_is_stale_or_fails_fast_never_404(
    kind_name: str,
    proxy_factory: ProxyFactory,
    dists: Dists,
    artifacts: Artifacts,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    faults: GroupLedger,
) -> None:
    """Every format of the row at once (each its own fake, relay, proxy and data directory)."""
    kind = KINDS[kind_name]
    formats = MATRIX[kind_name]
    faults.inject(kind_name, len(formats))
    tallies = await asyncio.gather(
        *(one_case(fmt, kind, proxy_factory, dists, artifacts, tmp_path, http) for fmt in formats)
    )
    total = Tally()
    for tally in tallies:
        total.wrong_404 += tally.wrong_404
        total.corrupt += tally.corrupt
        total.problems += tally.problems
    total.report(faults)


# --- Retry-After ---------------------------------------------------------------------------------


async def retry_after_case(
    fmt: str,
    form: str,
    proxy_factory: ProxyFactory,
    dists: Dists,
    artifacts: Artifacts,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> Tally:
    """One 429, then the document: the retry comes after the Retry-After the upstream asked for
    (``1`` second, or an HTTP-date two seconds ahead: 1-2 s at the header's 1 s resolution)."""
    tally = Tally()
    retry_after, low, high = {"seconds": (lambda: "1", 0.9, 1.0), "date": (_http_date(2), 0.9, 2.0)}[form]
    stamps: list[float] = []
    where = tmp_path / form
    async with open_target(fmt, proxy_factory, dists, artifacts, where, upstream_retries=1) as t:
        t.set_rules({t.doc_paths[1]: timed(limited(retry_after, times=1), stamps)})
        answer = await ask(http, t.url(t.cold_page), t.headers)
        tally.served(
            t, t.cold_page, answer, high + METADATA_TIMEOUT + SLACK, f"{fmt}/{form}: page", stale=False
        )
        if len(stamps) != 2:
            tally.problems.append(
                f"{fmt}/{form}: {len(stamps)} upstream requests, expected the 429 and one retry"
            )
        elif not low <= stamps[1] - stamps[0] <= high + SLACK:
            tally.problems.append(
                f"{fmt}/{form}: retried after {stamps[1] - stamps[0]:.2f}s, Retry-After asked {low}-{high}s"
            )
    return tally


async def patient_case(
    fmt: str,
    proxy_factory: ProxyFactory,
    dists: Dists,
    artifacts: Artifacts,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> Tally:
    """A Retry-After far beyond the soft deadline: the warm page does not wait for it."""
    tally = Tally()
    async with open_target(
        fmt, proxy_factory, dists, artifacts, tmp_path / "patient", upstream_retries=1
    ) as t:
        await warm_up(t, http)
        t.set_rules({"/*": limited(lambda: "3600")})
        answer = await ask(http, t.url(t.warm_page), t.headers)
        tally.served(
            t, t.warm_page, answer, SOFT_DEADLINE + SLACK, f"{fmt}: warm page, 429 for an hour", stale=True
        )
    return tally


async def test_retry_after_is_honoured_in_seconds_and_as_http_date(
    proxy_factory: ProxyFactory,
    dists: Dists,
    artifacts: Artifacts,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    faults: GroupLedger,
) -> None:
    cases = [
        *(retry_after_case(f, form, proxy_factory, dists, artifacts, tmp_path, http)
          for f in ("pypi", "npm") for form in ("seconds", "date")),
        *(patient_case(f, proxy_factory, dists, artifacts, tmp_path, http) for f in ("pypi", "npm")),
    ]  # fmt: skip
    faults.inject("429-retry-after", len(cases))
    total = Tally()
    for tally in await asyncio.gather(*cases):
        total.wrong_404 += tally.wrong_404
        total.corrupt += tally.corrupt
        total.problems += tally.problems
    total.report(faults)


# --- flapping ------------------------------------------------------------------------------------

ROUNDS = 4
PER_ROUND = {"warm page": 20, "cold page": 20, "cold file": 5}


async def flapping_case(
    fmt: str,
    proxy_factory: ProxyFactory,
    dists: Dists,
    artifacts: Artifacts,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> Tally:
    """Up, down, up, down across requests, under bursts of concurrent clients."""
    tally = Tally()
    async with open_target(fmt, proxy_factory, dists, artifacts, tmp_path, upstream_retries=1) as t:
        await warm_up(t, http)
        before = t.upstream_hits
        paths = {"warm page": t.warm_page, "cold page": t.cold_page, "cold file": t.cold_pkg_file}
        served = 0
        for r in range(ROUNDS):
            if r % (ROUNDS // 2) == 0:  # first up/down by turns (the breaker stays closed), then
                period = 1 + 2 * r // ROUNDS  # down twice in a row (it opens, and half-opens)
                t.set_rules({"/*": flapping(answer(503, b"flap"), period=period)})
            batch = [(what, paths[what]) for what, n in PER_ROUND.items() for _ in range(n)]
            answers = await asyncio.gather(
                *(ask(http, t.url(path), {} if what == "cold file" else t.headers) for what, path in batch)
            )
            for (what, path), a in zip(batch, answers, strict=True):
                label = f"{fmt}: round {r + 1}, {what}"
                if 200 <= a.status < 300 and a.body is not None:
                    served += 1
                    stale = a.headers is not None and a.headers.get("X-Cache") == "STALE"
                    tally.served(t, path, a, METADATA_TIMEOUT * 2 + SLACK * 2, label, stale=stale)
                elif what == "warm page":  # cached: never a failure
                    tally.served(t, path, a, 0, label, stale=True)
                else:
                    tally.failure(t, path, a, METADATA_TIMEOUT * 2 + SLACK * 2, label)
        hits = t.upstream_hits - before
        # Concurrent asks of one key share one upstream request (and its one retry): the upstream
        # sees a handful per key and round (16 or so in all), not one or two per ask (over 200).
        bound = ROUNDS * len(PER_ROUND) * 2 * 2
        if hits > bound:
            tally.problems.append(
                f"{fmt}: {hits} upstream requests for {ROUNDS * sum(PER_ROUND.values())} asks"
            )
        if served < ROUNDS * PER_ROUND["warm page"]:
            tally.problems.append(f"{fmt}: only {served} answers served while flapping")
        t.set_rules({})
        await asyncio.sleep(COOLDOWN + 0.1)  # the breaker may have opened on two downs in a row
        for path in (t.cold_page, t.cold_pkg_file):
            answer_ = await ask(http, t.url(path), t.headers if path == t.cold_page else {})
            tally.served(t, path, answer_, 10, f"{fmt}: after flapping, {path}", stale=False)
    return tally


async def test_flapping_upstream_never_404_never_corrupt_no_storm(
    proxy_factory: ProxyFactory,
    dists: Dists,
    artifacts: Artifacts,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    faults: GroupLedger,
) -> None:
    formats = ("pypi", "npm")
    faults.inject("flapping", len(formats))
    total = Tally()
    for tally in await asyncio.gather(
        *(flapping_case(f, proxy_factory, dists, artifacts, tmp_path, http) for f in formats)
    ):
        total.wrong_404 += tally.wrong_404
        total.corrupt += tally.corrupt
        total.problems += tally.problems
    total.report(faults)


# --- a Maven SNAPSHOT's own metadata -------------------------------------------------------------

SNAPSHOT_META = b"""<?xml version="1.0" encoding="UTF-8"?>
<metadata modelVersion="1.1.0">
  <groupId>org.avail</groupId>
  <artifactId>ARTIFACT</artifactId>
  <version>1.0-SNAPSHOT</version>
  <versioning>
    <snapshot><timestamp>20240101.120000</timestamp><buildNumber>3</buildNumber></snapshot>
    <lastUpdated>20240101120000</lastUpdated>
    <snapshotVersions>
      <snapshotVersion><extension>jar</extension><value>1.0-20240101.120000-3</value>
        <updated>20240101120000</updated></snapshotVersion>
    </snapshotVersions>
  </versioning>
</metadata>
"""


async def test_malformed_snapshot_metadata_is_stale_or_502_never_404(
    proxy_factory: ProxyFactory,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    faults: GroupLedger,
) -> None:
    """A version's ``maven-metadata.xml`` (a SNAPSHOT's builds) is a document like the
    artifact's: a malformed refresh keeps the cached copy, and a cold one is the upstream's
    failure (502), not a 404."""
    root = tmp_path / "m2-empty"
    await asyncio.to_thread(root.mkdir)
    async with FakeMavenRepo(root=root) as maven, HostileUpstream(maven.origin) as hostile:
        proxy = await proxy_factory(hostile.url("/maven2/"), fmt="maven", connection=UPSTREAM, **SETTINGS)
        key = {a: f"org/avail/{a}/1.0-SNAPSHOT/maven-metadata.xml" for a in ("warm", "cold")}
        for artifact, path in key.items():
            maven.add_file(path, SNAPSHOT_META.replace(b"ARTIFACT", artifact.encode()))
        url = {a: f"{proxy.url}/default/maven/public/{path}" for a, path in key.items()}
        healthy = await ask(http, url["warm"])
        assert healthy.status == 200 and b"1.0-20240101.120000-3" in (healthy.body or b""), healthy
        _, bad = MALFORMED["maven"]["xml"]
        for path in key.values():
            hostile.rules[f"/maven2/{path}"] = answer(200, bad, [("Content-Type", "text/xml")])
        faults.inject("malformed-xml", 2)
        warm, cold = await ask(http, url["warm"]), await ask(http, url["cold"])
        wrong_404 = [a.status for a in (warm, cold)].count(404)
        faults.zero("wrong_404", wrong_404, f"warm {warm.status}, cold {cold.status} {cold.body!r:.300}")
        corrupt = int(warm.status == 200 and b"1.0-20240101.120000-3" not in (warm.body or b""))
        faults.zero("corrupt_served", corrupt, f"{warm.body!r:.300}")
        assert warm.status == 200 and warm.headers is not None and warm.headers["X-Cache"] == "STALE", warm
        assert cold.status == 502 and cold.names_upstream(), cold
        hostile.rules.clear()
        again = await ask(http, url["cold"])
        assert again.status == 200 and b"1.0-20240101.120000-3" in (again.body or b""), again


# --- max_staleness -------------------------------------------------------------------------------


async def test_stale_copy_is_served_only_within_max_staleness(
    proxy_factory: ProxyFactory,
    dists: Dists,
    artifacts: Artifacts,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    faults: GroupLedger,
) -> None:
    """``max_staleness`` bounds what stands in for a failing upstream, on both paths: the slow
    upstream (stale at the soft deadline) and the failed one (stale at once). Past it, the page
    is the upstream's failure (502/504 naming it), never a 404 and never the old copy."""
    settings = {"max_staleness": "1s", "soft_deadline": "0.3s"}
    async with open_target("pypi", proxy_factory, dists, artifacts, tmp_path, **settings) as t:
        await warm_up(t, http)
        tally = Tally()
        t.set_rules({"/*": blackhole()})
        faults.inject("blackhole")
        young = await ask(http, t.url(t.warm_page), t.headers)
        tally.served(t, t.warm_page, young, 0.3 + SLACK, "slow upstream, copy under 1 s old", stale=True)
        await asyncio.sleep(1.2)
        old = await ask(http, t.url(t.warm_page), t.headers)
        tally.failure(t, t.warm_page, old, READ + SLACK, "slow upstream, copy over 1 s old")
        t.set_rules({"/*": answer(503, b"down")})
        faults.inject("5xx")
        failed = await ask(http, t.url(t.warm_page), t.headers)
        tally.failure(t, t.warm_page, failed, FAST + SLACK, "failing upstream, copy over 1 s old")
        tally.report(faults)
