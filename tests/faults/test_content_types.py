"""Fault group 9, content types and escaping: what a browser could be made to run, it never gets.

Artifacts go out as their registry's type (``application/octet-stream``, Maven's
``application/java-archive``) with ``X-Content-Type-Options: nosniff`` — on a miss and a hit, for
GET and HEAD, whatever type the upstream claimed (here a hostile upstream calls every artifact
``text/html``). Every HTML page the proxy renders (PyPI's PEP 503 pages and ``/simple/``, Maven's
directory listings) escapes what upstreams supplied: project files whose names, requires-python,
yanked reasons and metadata hashes carry ``<script>``, quotes and ``"onmouseover=``, from a JSON
(PEP 691) and an HTML (PEP 503) upstream, come back as the same text and never as markup. Errors
are JSON, never HTML, and never echo an upstream's error page.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from tests.conftest import Dists, ProxyFactory
from tests.fakes.pypi import FakePyPI
from tests.faults.hostile import Exchange, HostileUpstream, Rule, answer
from tests.faults.report import GroupLedger
from tests.faults.test_integrity import FORMATS, Artifacts, World, fetch, open_world

# The session fixture of the integrity module, shared (npm pack runs once).
from tests.faults.test_integrity import artifacts as artifacts

GROUP = "9 content types/escaping"

HTML_ACCEPTS = ("text/html", "application/vnd.pypi.simple.v1+html")
ALLOWED_TAGS = frozenset({"html", "head", "meta", "title", "body", "h1", "a", "br", "hr", "pre"})
ALLOWED_ATTRS = frozenset(
    {
        "href",
        "name",
        "content",
        "data-requires-python",
        "data-yanked",
        "data-core-metadata",
        "data-dist-info-metadata",
    }
)

# How open_world connects each format's proxy to its upstream.
UPSTREAM_PATHS = {"pypi": "/simple/", "npm": "/", "maven": "/maven2/", "nuget": "/v3/index.json"}
CONNECTIONS = {"pypi": "fake", "npm": "npmfake", "maven": "central", "nuget": "nugetfake"}

# What a hostile upstream puts where a page will show it.
SCRIPT = '"><script>alert(1)</script>'
HANDLER = '" onmouseover="alert(1)" x="'
FILENAME = 'evil-1.0.tar.gz"><script>alert(2)</script>'
REQUIRES = ">=3<script>alert(3)</script>"
YANKED = 'bad release" onmouseover="alert(4)" \'<img src=x onerror=alert(5)>'
META_HASH = '"><img src=x onerror=alert(6)>'


def typed_as(content_type: str) -> Rule:
    """Relay the artifact, but call it ``content_type`` (an upstream that wants it rendered)."""

    async def rule(ex: Exchange) -> bool:
        r = await ex.relay()
        await ex.reply(r.status, [*r.without("content-type"), ("Content-Type", content_type)], r.body)
        return True

    return rule


def _media(value: str | None) -> str:
    return (value or "").split(";")[0].strip().lower()


def _companions(world: World) -> list[str]:
    """Files served beside the artifact (PEP 658 metadata, Maven checksums and pom, .nuspec)."""
    url = world.url()
    if world.fmt == "pypi":
        return [url + ".metadata"]
    if world.fmt == "maven":
        return [url + ".sha1", url + ".sha256", url.removesuffix(".jar") + ".pom"]
    if world.fmt == "nuget":
        return [url.rsplit("/", 1)[0] + f"/{world.package}.nuspec"]
    return []


@pytest.mark.parametrize("fmt", FORMATS)
async def test_artifacts_keep_their_registry_type_with_nosniff(
    fmt: str,
    faults: GroupLedger,
    proxy_factory: ProxyFactory,
    dists: Dists,
    artifacts: Artifacts,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    async with open_world(fmt, proxy_factory, dists, artifacts, tmp_path) as world:
        world.hostile.rules[world.upstream_path] = typed_as("text/html; charset=utf-8")
        faults.inject(f"{fmt}: upstream calls the artifact text/html")
        # A second proxy on its own data directory sees the artifact first with HEAD.
        other = await proxy_factory(
            world.hostile.url(UPSTREAM_PATHS[fmt]),
            data_dir=tmp_path / "b",
            fmt=fmt,
            connection=CONNECTIONS[fmt],
        )
        steps = [
            ("GET miss", "GET", world.url()),
            ("GET hit", "GET", world.url()),
            ("HEAD hit", "HEAD", world.url()),
            ("HEAD miss", "HEAD", world.url(proxy=other)),
            ("GET hit after HEAD", "GET", world.url(proxy=other)),
        ]
        wrong: list[str] = []
        for label, method, url in steps:
            got = await fetch(http, method, url)
            assert got.status == 200 and got.headers is not None, f"{label}: {got.status}"
            if method == "GET":
                assert got.body == world.data, label
            if _media(got.headers.get("Content-Type")) != world.content_type:
                wrong.append(f"{label}: Content-Type {got.headers.get('Content-Type')}")
            if got.headers.get("X-Content-Type-Options", "").lower() != "nosniff":
                wrong.append(f"{label}: no X-Content-Type-Options: nosniff")
        for url in _companions(world):
            for method in ("GET", "HEAD"):
                got = await fetch(http, method, url)
                assert got.status == 200 and got.headers is not None, f"{method} {url}: {got.status}"
                if "html" in _media(got.headers.get("Content-Type")):
                    wrong.append(f"{method} {url}: served as {got.headers.get('Content-Type')}")
                if got.headers.get("X-Content-Type-Options", "").lower() != "nosniff":
                    wrong.append(f"{method} {url}: no X-Content-Type-Options: nosniff")
        assert not wrong, "; ".join(wrong)


# --- escaping in HTML pages ------------------------------------------------------------------------


class _Page(HTMLParser):
    """Every tag, attribute and anchor of a page, as a browser would see them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.anchors: list[tuple[dict[str, str | None], str]] = []
        self._anchor: dict[str, str | None] | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "a":
            self._anchor, self._text = dict(attrs), []

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        if self._anchor is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._anchor is not None:
            self.anchors.append((self._anchor, "".join(self._text)))
            self._anchor = None


def _injections(body: bytes, proxy_url: str) -> tuple[_Page, list[str]]:
    """Parse a page; list every tag, attribute or link that is not the page's own markup."""
    page = _Page()
    page.feed(body.decode())
    page.close()
    found = [f"<{tag}>" for tag, _ in page.tags if tag not in ALLOWED_TAGS]
    for tag, attrs in page.tags:
        found += [f"<{tag} {name}=...>" for name in attrs if name not in ALLOWED_ATTRS]
        href = attrs.get("href")
        if href is not None and urlsplit(href).scheme and not href.startswith(proxy_url + "/"):
            found.append(f"link to {href!r}")
    if b"<script" in body.lower():
        found.append("a raw <script")
    return page, found


def _json_page(files: Sequence[dict[str, object]]) -> bytes:
    return json.dumps({"meta": {"api-version": "1.1"}, "name": "evil", "files": list(files)}).encode()


def _hostile_files(origin: str) -> list[dict[str, object]]:
    sha = "0" * 64
    return [
        {
            "filename": FILENAME,
            "url": f"{origin}/files/evil-1.0.tar.gz",
            "hashes": {"sha256": sha},
            "requires-python": REQUIRES,
            "yanked": YANKED,
            "size": 10,
            "upload-time": "2024-01-01T00:00:00.000000Z",
        },
        {
            "filename": "evil-2.0-py3-none-any.whl",
            "url": f"{origin}/files/evil-2.0-py3-none-any.whl",
            "hashes": {"sha256": sha},
            "requires-python": HANDLER,
            "yanked": SCRIPT,
            "core-metadata": {"sha256": META_HASH},
            "size": 10,
        },
        {  # a link that would run script if it were passed through
            "filename": "evil-3.0.tar.gz",
            "url": "javascript:alert(7)//evil-3.0.tar.gz",
            "hashes": {"sha256": sha},
            "size": 10,
        },
    ]


def _html_page(origin: str) -> bytes:
    """The same hostile files as a PEP 503 page (attribute values entity-escaped, as they must
    be for the upstream's own page to parse: the proxy decodes them and must escape again)."""
    esc = html.escape
    rows = [
        f'<a href="{origin}/files/evil-1.0.tar.gz#sha256={"0" * 64}" data-requires-python="{esc(REQUIRES)}" '
        f'data-yanked="{esc(YANKED)}">{esc(FILENAME)}</a><br/>',
        f'<a href="{origin}/files/evil-2.0-py3-none-any.whl#sha256={"0" * 64}" '
        f'data-requires-python="{esc(HANDLER)}" data-yanked="{esc(SCRIPT)}" '
        f'data-core-metadata="sha256={esc(META_HASH)}">evil-2.0-py3-none-any.whl</a><br/>',
    ]
    return ("<!DOCTYPE html><html><body>\n" + "\n".join(rows) + "\n</body></html>\n").encode()


async def test_upstream_metadata_is_escaped_in_every_html_page(
    faults: GroupLedger,
    proxy_factory: ProxyFactory,
    dists: Dists,
    http: aiohttp.ClientSession,
) -> None:
    async with FakePyPI() as pypi, HostileUpstream(pypi.origin) as hostile:
        await pypi.add_file_async("beta", dists.beta)
        hostile.rules["/simple/evil/"] = answer(
            200,
            _json_page(_hostile_files(hostile.origin)),
            [("Content-Type", "application/vnd.pypi.simple.v1+json")],
        )
        hostile.rules["/simple/evil-html/"] = answer(
            200, _html_page(hostile.origin), [("Content-Type", "text/html; charset=utf-8")]
        )
        proxy = await proxy_factory(hostile.url("/simple/"))
        async with http.get(proxy.files("beta", dists.beta.name)) as resp:  # /simple/ lists beta
            assert resp.status == 200

        injected: list[str] = []
        pages = [proxy.simple()] + [proxy.simple() + f"{p}/" for p in ("evil", "evil-html", "beta")]
        for url in pages:
            for accept in HTML_ACCEPTS:
                async with http.get(url, headers={"Accept": accept}) as resp:
                    assert resp.status == 200, f"{url}: {resp.status} {await resp.text()}"
                    assert "html" in _media(resp.headers.get("Content-Type"))
                    body = await resp.read()
                page, found = _injections(body, proxy.url)
                injected += [f"{url} ({accept}): {f}" for f in found]
                if not url.endswith(("/evil/", "/evil-html/")):
                    continue
                faults.inject("hostile upstream fields rendered into a PEP 503 page", 8)
                # Escaped, not dropped: a browser (and pip) reads back exactly what the upstream said.
                by_text = {text: attrs for attrs, text in page.anchors}
                expected = {FILENAME, "evil-2.0-py3-none-any.whl"}
                if url.endswith("/evil/"):
                    expected.add("evil-3.0.tar.gz")
                assert set(by_text) == expected, by_text
                first, second = by_text[FILENAME], by_text["evil-2.0-py3-none-any.whl"]
                assert first.get("data-requires-python") == REQUIRES
                assert first.get("data-yanked") == YANKED
                assert second.get("data-requires-python") == HANDLER
                assert second.get("data-yanked") == SCRIPT
                assert second.get("data-core-metadata") == f"sha256={META_HASH.lower()}" or (
                    second.get("data-core-metadata") == f"sha256={META_HASH}"
                )
        faults.zero("corrupt_served", len(injected), "; ".join(injected))


async def test_maven_directory_listing_escapes_names(
    faults: GroupLedger,
    proxy_factory: ProxyFactory,
    dists: Dists,
    artifacts: Artifacts,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    async with open_world("maven", proxy_factory, dists, artifacts, tmp_path) as world:
        assert (await fetch(http, "GET", world.url())).status == 200
        base = world.url().rsplit("/", 3)[0]  # .../default/maven/public/org/integ
        injected: list[str] = []
        for url in (f"{base}/", f"{base}/lib/", f"{base}/lib/1.0/", world.url().split("/org/")[0] + "/"):
            got = await fetch(http, "GET", url)
            assert got.status == 200 and got.headers is not None and got.body is not None, url
            assert "html" in _media(got.headers.get("Content-Type"))
            _, found = _injections(got.body, world.proxy.url)
            injected += [f"{url}: {f}" for f in found]
        faults.inject("maven directory listings parsed for foreign markup", 4)
        faults.zero("corrupt_served", len(injected), "; ".join(injected))


async def test_errors_are_json_and_never_echo_an_upstream_page(
    faults: GroupLedger,
    proxy_factory: ProxyFactory,
    dists: Dists,
    http: aiohttp.ClientSession,
) -> None:
    evil_page = b"<html><body><script>alert('upstream')</script></body></html>"
    async with FakePyPI() as pypi, HostileUpstream(pypi.origin) as hostile:
        hostile.rules["/simple/broken/"] = answer(500, evil_page, [("Content-Type", "text/html")])
        hostile.rules["/simple/gone/"] = answer(404, evil_page, [("Content-Type", "text/html")])
        proxy = await proxy_factory(hostile.url("/simple/"), upstream_retries=0)
        echoed: list[str] = []
        cases = [
            proxy.simple() + "broken/",
            proxy.simple() + "gone/",
            proxy.simple() + "%3Cscript%3Ealert(1)%3C%2Fscript%3E/",
            proxy.files("beta", "<script>alert(1)</script>.whl"),
            f"{proxy.url}/default/npm/public/%3Cscript%3E",
        ]
        for url in cases:
            for accept in ("text/html", "*/*"):
                async with http.get(url, headers={"Accept": accept}) as resp:
                    body = await resp.read()
                    assert resp.status >= 400, url
                    ctype = _media(resp.headers.get("Content-Type"))
                faults.inject("error page provoked")
                if "html" in ctype:
                    echoed.append(f"{url}: an error as {ctype}")
                if b"alert('upstream')" in body:
                    echoed.append(f"{url}: the upstream's page echoed")
        faults.zero("corrupt_served", len(echoed), "; ".join(echoed))
