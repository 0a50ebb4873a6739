"""Fault group 6: injection and traversal.

Every route that takes a name gets a matrix of traversal spellings sent on a raw socket (aiohttp's
client would normalise most of them away); names are checked to have one canonical identity per
format wherever routing, origin controls and cache keys look at them, and unicode confusables
must not fold into ASCII names; query parameters carry SQL and LIKE metacharacters; XML with
external entities, archives with ``../`` members, CR/LF in paths and headers, and Host-header
tricks are each sent where the proxy reads them. The promises (DESIGN.md invariants 8, 12, 13,
15; README "Errors"): a JSON 400/404, never a 2xx with bytes from elsewhere, never a 500, nothing
written outside the data directory, and no header a client or upstream smuggled in.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from proxy.formats import FORMATS
from tests.conftest import Dists, ProxyFactory, RunningProxy, index_rows
from tests.fakes.dists import build_wheel
from tests.fakes.npm import FakeNpmRegistry
from tests.fakes.nuget import FakeNuGetFeed, build_nupkg
from tests.fakes.pypi import FakePyPI
from tests.faults.hostile import Exchange, HostileUpstream, answer, mutated
from tests.faults.report import GroupLedger
from tests.npm_clients import npm_publish_doc

GROUP = "6 injection/traversal"

SENTINEL = b"TOP-SECRET-SENTINEL-0x5eed"

# Values that fill a route's placeholders when another placeholder carries the attack.
SAMPLE = {
    "domain": "default",
    "repo": "public",
    "format": "pypi",
    "project": "alpha",
    "filename": "alpha-1.0-py3-none-any.whl",
    "package": "alpha",
    "version": "1.0.0",
    "name": "widget",
    "scope": "@acme",
    "scoped": "@acme%2fwidget",
    "id": "acme.widget",
    "leaf": "1.0.0.json",
    "path": "org/example/widget/1.0/widget-1.0.jar",
    "tag": "latest",
    "rev": "1-abc",
    "tail": "x",
}

# Each spelling replaces one placeholder's value as it goes on the wire.
TRAVERSALS = (
    "..",
    "../../../secret.txt",
    "%2e%2e",
    "%2e%2e/%2e%2e/%2e%2e/secret.txt",
    "%2E%2E%2F%2E%2E%2Fsecret.txt",
    ".%2e/.%2e/.%2e/secret.txt",
    "%252e%252e%252f%252e%252e%252fsecret.txt",
    "..%2f..%2f..%2fsecret.txt",
    "..%252f..%252fsecret.txt",
    "..%5c..%5c..%5csecret.txt",
    "..\\..\\..\\secret.txt",
    "alpha%00.whl",
    "alpha%2500.whl",
    "%c0%ae%c0%ae/%c0%ae%c0%ae/secret.txt",
    "..%c0%af..%c0%afsecret.txt",
    "%e0%80%ae%e0%80%ae/secret.txt",
    "..;/..;/secret.txt",
    "%u002e%u002e/secret.txt",
    "%2fetc%2fpasswd",
    "%5c%5c127.0.0.1%5cshare",
)


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    head: bytes
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def json(self) -> Any:
        return json.loads(self.body)


async def raw_request(origin: str, request: bytes, *, timeout: float = 15) -> RawResponse:
    """Send ``request`` as written (no normalisation at all) and read the answer to EOF."""
    host, port = origin.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
    if any(k.lower() == "transfer-encoding" and "chunked" in v for k, v in headers):
        body = _dechunk(body)
    return RawResponse(status, headers, head, body)


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return bytes(out)


def get(target: str, *, method: str = "GET", host: str = "127.0.0.1", extra: str = "") -> bytes:
    return (
        f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n"
    ).encode("latin-1")


def name_routes(proxy: RunningProxy) -> list[tuple[str, str, list[str]]]:
    """(method, path template, placeholders) for every route that takes a name, from the router."""
    out: list[tuple[str, str, list[str]]] = []
    for route in proxy.runner.app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        template = str(info.get("formatter") or "")
        slots = re.findall(r"\{(\w+)\}", template)
        if slots and route.method != "HEAD":
            out.append((route.method.replace("*", "GET"), template, slots))
    return out


def fill(template: str, attack_slot: str, attack: str) -> str:
    def value(m: re.Match[str]) -> str:
        slot = m.group(1)
        return attack if slot == attack_slot else SAMPLE.get(slot, "x")

    return re.sub(r"\{(\w+)\}", value, template)


def tree(root: Path, skip: Path | None = None) -> set[str]:
    """Every path under ``root`` (as text), except below ``skip``."""
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if skip is None or (p != skip and skip not in p.parents)
    }


_DATA_LAYOUT = re.compile(
    r"^(index\.sqlite3(-wal|-shm|-journal)?|blobs(/sha256(/[0-9a-f]{2}(/[0-9a-f]{64})?)?)?"
    r"|tmp|pages(/.*)?|quarantine|audit.*)$"
)


def strange_data_files(data_dir: Path, before: set[str]) -> list[str]:
    """New files in the data directory outside its documented layout (a name that became a path)."""
    return sorted(p for p in tree(data_dir) - before if not _DATA_LAYOUT.match(p))


def _escapes_upper(path: str) -> str:
    return re.sub(r"%[0-9a-fA-F]{2}", lambda m: m.group(0).upper(), path)


def _no_op(method: str, target: str, resp: RawResponse) -> bool:
    """npm's unpublish step two (DELETE of a tarball) answers ``{"ok": true}`` whatever the file:
    the tarball went with its version in step one. A 2xx that touches and carries nothing."""
    npm_tarball = "/npm/" in target and "/-/" in target and "/-rev/" in target
    return method == "DELETE" and npm_tarball and json.loads(resp.body or b"null") == {"ok": True}


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    path = tmp_path / "secret.txt"
    path.write_bytes(SENTINEL + b"\n")
    return path


async def test_traversal_matrix_on_every_route_that_takes_a_name(
    proxy_factory: ProxyFactory, pypi: FakePyPI, tmp_path: Path, sentinel: Path, faults: GroupLedger
) -> None:
    """Every route from the router x every placeholder x every spelling: a JSON 400/404 (or 405),
    never a 2xx carrying a file from elsewhere, never a 500, and nothing new on disk outside."""
    proxy = await proxy_factory(pypi.url)
    before = await asyncio.to_thread(tree, tmp_path, tmp_path / "data")
    data_before = await asyncio.to_thread(tree, proxy.data_dir)
    routes = name_routes(proxy)
    # The router grows with every format; the matrix must see each one.
    templates = {t for _, t, _ in routes}
    for cls in FORMATS:
        assert any(f"/{cls.name}/" in t for t in templates), cls.name
    cases = [
        (method, fill(template, slot, attack), slot)
        for method, template, slots in routes
        for slot in slots
        for attack in TRAVERSALS
    ]
    faults.inject("traversal request", len(cases))
    gate = asyncio.Semaphore(8)

    async def one(method: str, target: str) -> RawResponse:
        async with gate:
            return await raw_request(proxy.url, get(target, method=method))

    answers = await asyncio.gather(*(one(m, t) for m, t, _ in cases))
    leaked, errors, not_json, served, redirects = [], [], [], [], []
    for (method, target, _), resp in zip(cases, answers, strict=True):
        where = f"{method} {target} -> {resp.status}"
        if SENTINEL in resp.body or resp.body.startswith(b"SQLite format 3") or b"root:x:0:0" in resp.body:
            leaked.append(where)
        if resp.status >= 500:
            errors.append(where)
        elif 200 <= resp.status < 300:
            if not _no_op(method, target, resp):
                served.append(where)
        elif resp.status in (301, 308):
            # Adding a slash is fine, but only to the raw path: a Location built from the
            # decoded path hands the client a second decoding (``%252e`` -> ``%2e``).
            if _escapes_upper(resp.header("Location") or "") != _escapes_upper(target + "/"):
                redirects.append(f"{where} Location {resp.header('Location')}")
        elif resp.status not in (400, 404, 405):
            errors.append(where)
        if resp.status >= 400 and "json" not in (resp.header("Content-Type") or ""):
            not_json.append(where)
    faults.zero("corrupt_served", len(leaked), f"responses carried a file from outside: {leaked[:5]}")
    faults.zero("unauthorized_ok", len(served), f"traversal requests answered 2xx: {served[:5]}")
    assert not errors, f"{len(errors)} answers not 400/404/405: {errors[:10]}"
    assert not redirects, f"{len(redirects)} redirects that decode the path: {redirects[:5]}"
    assert not not_json, f"{len(not_json)} errors not JSON: {not_json[:10]}"
    after = await asyncio.to_thread(tree, tmp_path, tmp_path / "data")
    strange = await asyncio.to_thread(strange_data_files, proxy.data_dir, data_before)
    faults.zero(
        "partial_commits", len(after - before), f"files created outside the data dir: {after - before}"
    )
    faults.zero("partial_commits", len(strange), f"files in the data dir outside its layout: {strange}")


# CR/LF where a path segment lands in a header (a redirect's Location), raw CR/LF in the request
# line, and obs-folded header values: none may add a header to the proxy's answer.
CRLF_TARGETS = (
    "/default/pypi/public/simple/alpha%0d%0aX-Injected:%20yes",
    "/default/pypi/public/simple/Alpha%0d%0aX-Injected:%20yes/",
    "/default%0aX-Injected:%20yes/pypi/public/simple/Alpha/",
    "/default/pypi/public%0aX-Injected:%20yes/simple/Alpha/",
    "/default/pypi/public%0a/simple/Alpha/",
    "/default/pypi/public/simple/alpha%0a/",
    "/default/pypi/public/files/alpha/alpha-1.0-py3-none-any.whl%0a",
    "/default/pypi/public/files/alpha%0d%0aX-Injected:%20yes/x.whl",
    "/default/npm/public/left%0a",
    "/default/npm/public/left%0d%0aX-Injected:%20yes",
    "/default/nuget/public/v3-flatcontainer/acme.alpha%0a/index.json",
    "/default/maven/public%0aX-Injected:%20yes",
    "/default/maven/public/org/example/lib%0d%0aX-Injected:%20yes/",
    "/-/api/v1/domains/default%0aX-Injected:%20yes/repositories",
)


def _injected(resp: RawResponse) -> bool:
    return any(k.lower() in {"x-injected", "set-cookie"} for k, _ in resp.headers)


async def test_crlf_in_paths_and_client_headers_splits_no_response(
    proxy: RunningProxy, faults: GroupLedger
) -> None:
    requests = [get(t) for t in CRLF_TARGETS]
    page, close = b"GET /default/pypi/public/simple/alpha/", b"Connection: close\r\n\r\n"
    requests += [
        page + b"\r\nX-Injected: yes HTTP/1.1\r\nHost: a\r\n\r\n",
        page + b"\rX-Injected: yes HTTP/1.1\r\nHost: a\r\n" + close,
        page + b" HTTP/1.1\r\nHost: a\r\n X-Injected: yes\r\n" + close,  # obs-fold
        page + b" HTTP/1.1\r\nHost: a\rX-Injected: yes\r\n" + close,
        page + b" HTTP/1.1\r\nHost: a\nX-Injected: yes\r\n" + close,
        b"GET /default/pypi/public/simple/Alpha/ HTTP/1.1\r\nHost: a\r\nX-Forwarded-Host: b\r\n"
        b" X-Injected: yes\r\n" + close,
    ]
    faults.inject("CR/LF in request", len(requests))
    answers = [await raw_request(proxy.url, r) for r in requests]
    split = [(r[:80], a.head) for r, a in zip(requests, answers, strict=True) if _injected(a)]
    faults.zero("unauthorized_ok", len(split), f"responses carrying a smuggled header: {split}")
    print([(r[:70], a.status, a.header("Location")) for r, a in zip(requests, answers, strict=True)])
    bad = [(r[:80], a.status) for r, a in zip(requests, answers, strict=True) if a.status >= 500]
    assert not bad, bad
    for a in answers:
        assert b"\r\n\r\n" not in a.head and re.findall(rb"(?m)^HTTP/", a.head) == [b"HTTP/"]


# --------------------------------------------------------------------------- canonical identity

ADMIN = "/-/api/v1/domains/default/repositories/public"


async def call(
    http: aiohttp.ClientSession, method: str, url: str, body: Any = None
) -> tuple[int, Any, dict[str, str]]:
    async with http.request(method, url, json=body, allow_redirects=False) as resp:
        raw = await resp.read()
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = raw
        return resp.status, data, dict(resp.headers)


async def test_pypi_name_spellings_are_one_identity_and_confusables_are_not_folded(
    proxy_factory: ProxyFactory,
    pypi: FakePyPI,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    faults: GroupLedger,
) -> None:
    """PEP 503: ``Foo.Bar``, ``foo_bar``, ``FOO--bar`` ... are one project for routing, the cache
    (one upstream fetch, one package row) and origin rules; a rule written in any spelling binds
    every spelling. Unicode confusables (Kelvin sign, long s, Cyrillic, fullwidth) are not names:
    refused, never folded into the ASCII project they look like, in URLs or in rules."""
    wheel = await asyncio.to_thread(build_wheel, tmp_path / "w", "foo_bar", "1.0")
    kiss = await asyncio.to_thread(build_wheel, tmp_path / "w", "kiss", "1.0")
    await pypi.add_file_async("Foo.Bar", wheel)
    await pypi.add_file_async("kiss", kiss)
    proxy = await proxy_factory(pypi.url)
    base = f"{proxy.url}/default/pypi/public"
    data = await asyncio.to_thread(wheel.read_bytes)
    spellings = ["Foo.Bar", "foo_bar", "foo-bar", "FOO--bar", "foo._-BAR"]
    faults.inject("name spelling", len(spellings))
    for name in spellings:
        status, _, headers = await call(http, "GET", f"{base}/simple/{name}/")
        if name == "foo-bar":
            assert status == 200
        else:
            assert status == 301 and headers["Location"].endswith("/simple/foo-bar/"), (name, status)
        async with http.get(f"{base}/files/{name}/{wheel.name}") as resp:
            assert resp.status == 200 and await resp.read() == data, name
    assert pypi.hits[f"/files/{wheel.name}"] == 1  # one cache key for every spelling
    status, listed, _ = await call(http, "GET", f"{proxy.url}{ADMIN}/packages?format=pypi")
    names = {p["package"] for p in listed["packages"]} if isinstance(listed, dict) else set()
    assert status == 200 and names == {"foo-bar"}, listed

    # A rule written in one spelling binds them all.
    status, rule, _ = await call(
        http,
        "PUT",
        f"{proxy.url}{ADMIN}/origin-rules/pypi",
        {"pattern": "FOO_bar", "publish": "ALLOW", "upstream": "BLOCK"},
    )
    assert status == 200 and rule["pattern"] == "foo-bar", rule
    bypassed = []
    for name in spellings:
        status, body, _ = await call(http, "GET", f"{base}/files/{name}/{wheel.name}")
        if status != 404 or body.get("error") != "blocked_by_origin":
            bypassed.append(f"{name} -> {status}")
    faults.zero("unauthorized_ok", len(bypassed), f"spellings that bypassed a block rule: {bypassed}")

    # Confusables of "kiss": Kelvin sign K, long s, Cyrillic i and s, fullwidth k.
    confusables = ["\u212aiss", "ki\u017fs", "k\u0456ss", "\uff4biss", "kis\u0455", "KI\u017fS"]
    faults.inject("unicode confusable name", len(confusables) * 3)
    folded = []
    for name in confusables:
        quoted = quote(name)
        for url in (f"{base}/simple/{quoted}/", f"{base}/files/{quoted}/{kiss.name}"):
            status, body, headers = await call(http, "GET", url)
            if status != 400 or "kiss" in headers.get("Location", ""):
                folded.append(
                    f"{name!r} {url.rsplit('/pypi/', 1)[1]} -> {status} {headers.get('Location', '')}"
                )
        status, body, _ = await call(
            http,
            "PUT",
            f"{proxy.url}{ADMIN}/origin-rules/pypi",
            {"pattern": name, "publish": "ALLOW", "upstream": "BLOCK"},
        )
        if status != 400:
            folded.append(f"rule {name!r} -> {status} {body}")
    faults.zero("unauthorized_ok", len(folded), f"confusables taken as names: {folded}")
    async with http.get(f"{base}/files/kiss/{kiss.name}") as resp:
        assert resp.status == 200  # no confusable rule caught the real project
    rows = await asyncio.to_thread(index_rows, proxy.data_dir, "SELECT DISTINCT package FROM assets")
    assert {r[0] for r in rows} <= {"foo-bar", "kiss"}, rows


# --------------------------------------------------------------------------- Host-header poisoning

POISON = (
    ("Host: evil.example\r\n", "127.0.0.1"),
    ("X-Forwarded-Host: evil.example\r\nX-Forwarded-Proto: https\r\n", "127.0.0.1"),
    ("Forwarded: host=evil.example;proto=https\r\n", "127.0.0.1"),
    ("X-Forwarded-Host: evil.example\r\nX-Original-Host: evil.example\r\n", "127.0.0.1:1"),
)


async def poisoned_then_clean(origin: str, path: str, accept: str) -> tuple[list[bytes], bytes]:
    """Ask for ``path`` with each Host trick (and in absolute form), then as a plain client."""
    extra = f"Accept: {accept}\r\n"
    bodies = []
    for header, host in POISON:
        if header.startswith("Host:"):
            request = f"GET {path} HTTP/1.1\r\n{header}{extra}Connection: close\r\n\r\n".encode()
        else:
            request = get(path, host=host, extra=header + extra)
        bodies.append((await raw_request(origin, request)).body)
    absolute = (
        f"GET http://evil.example{path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}Connection: close\r\n\r\n"
    )
    bodies.append((await raw_request(origin, absolute.encode())).body)
    clean = await raw_request(origin, get(path, extra=extra))
    assert clean.status == 200, clean.body[:300]
    return bodies, clean.body


async def test_host_header_tricks_do_not_poison_cached_documents(
    proxy_factory: ProxyFactory, pypi: FakePyPI, tmp_path: Path, faults: GroupLedger
) -> None:
    """README: document URLs come from ``public_url``, else from the request's own Host; forwarded
    headers count only with ``trust_forwarded``. So a poisoned request may see its own host in its
    own answer, but the page kept in the cache and sent to the next client never does."""
    proxy = await proxy_factory(pypi.url)
    poisoned = 0
    for accept in ("application/vnd.pypi.simple.v1+json", "text/html"):
        bodies, clean = await poisoned_then_clean(proxy.url, "/default/pypi/public/simple/alpha/", accept)
        assert b"evil.example" in bodies[0]  # the request's own Host, for that request (README)
        poisoned += int(b"evil.example" in clean)
        # Without trust_forwarded, the forwarded headers are ignored outright.
        poisoned += sum(b"evil.example" in b for b in bodies[1:4])
    faults.inject("Host-header trick", 2 * (len(POISON) + 1))
    faults.zero("corrupt_served", poisoned, "documents carrying a client-chosen host")

    # With public_url set, no request can choose the host at all.
    fixed = await proxy_factory(pypi.url, data_dir=tmp_path / "fixed", public_url="https://proxy.example")
    bodies, clean = await poisoned_then_clean(fixed.url, "/default/pypi/public/simple/alpha/", "text/html")
    faults.inject("Host-header trick", len(POISON) + 1)
    leaked = sum(b"evil.example" in b for b in [*bodies, clean])
    faults.zero("corrupt_served", leaked, "documents with public_url set carrying a client-chosen host")
    assert b"https://proxy.example/default/pypi/public/files/alpha/" in clean


# --------------------------------------------------------------------------- SQL and LIKE metacharacters

SQL_NAMES = (
    "%",
    "_",
    "a%",
    "_lpha",
    "%lpha%",
    "'",
    "alpha'",
    "' OR '1'='1",
    "alpha';--",
    'x";--',
    "%00",
    "\\",
)


async def test_sql_and_like_metacharacters_in_every_query(
    proxy_factory: ProxyFactory,
    pypi: FakePyPI,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    faults: GroupLedger,
) -> None:
    """Names with ``%``, ``_``, quotes and ``;--`` in the admin API's lists, the audit query, package
    paths and NuGet search: never a 500, and never more than the literal name matches (a LIKE
    wildcard or an injected OR would list other packages)."""
    proxy = await proxy_factory(pypi.url)
    base = proxy.url
    async with http.get(
        f"{base}/default/pypi/public/files/alpha/{Path(pypi.files('alpha')[0].filename)}"
    ) as resp:
        assert resp.status == 200
    status, issued, _ = await call(
        http,
        "POST",
        f"{base}/-/api/v1/tokens",
        {"domain": "default", "principal": "alpha", "permissions": ["read"]},
    )
    assert status in (200, 201), issued
    status, listed, _ = await call(http, "GET", f"{base}/-/api/v1/tokens?domain=default")
    assert status == 200 and len(listed["tokens"]) == 1, listed
    over, errors = [], []
    for name in SQL_NAMES:
        q = quote(name, safe="")
        checks: list[tuple[str, Any]] = [
            (f"{base}{ADMIN}/packages?format={q}", None),
            (f"{base}{ADMIN}/packages/pypi/{q}", None),
            (f"{base}{ADMIN}/packages/pypi/alpha/versions/{q}", None),
            (f"{base}/-/api/v1/audit?package={q}", "records"),
            (f"{base}/-/api/v1/audit?principal={q}", "records"),
            (f"{base}/-/api/v1/audit?action={q}", "records"),
            (f"{base}/-/api/v1/tokens?domain={q}", "tokens"),
            (f"{base}/default/pypi/public/simple/{q}/", None),
        ]
        for url, key in checks:
            status, body, _ = await call(http, "GET", url)
            if status >= 500:
                errors.append(f"{url} -> {status}")
            elif key and status == 200 and body[key]:
                over.append(f"{url} matched {len(body[key])}")
            elif not key and status == 200:
                over.append(f"{url} -> 200")
    faults.inject("SQL/LIKE metacharacters in a query", len(SQL_NAMES) * 8)

    # NuGet search matches substrings of ids: a term may only return ids that contain it literally.
    nupkg = await asyncio.to_thread(build_nupkg, tmp_path / "pk", "Acme.Alpha", "1.0.0")
    feed = FakeNuGetFeed()
    await feed.start()
    try:
        await feed.add_package_async(nupkg)
        nuget = await proxy_factory(feed.url, fmt="nuget", connection="nugetfake", data_dir=tmp_path / "n")
        nbase = f"{nuget.url}/default/nuget/public"
        async with http.get(f"{nbase}/v3-flatcontainer/acme.alpha/1.0.0/acme.alpha.1.0.0.nupkg") as resp:
            assert resp.status == 200
        status, found, _ = await call(http, "GET", f"{nbase}/v3/query?q=alpha")
        assert status == 200 and [d["id"].lower() for d in found["data"]] == ["acme.alpha"]
        for name in SQL_NAMES:
            for path in ("v3/query?q=", "v3/autocomplete?q="):
                status, body, _ = await call(http, "GET", f"{nbase}/{path}{quote(name, safe='')}")
                if status >= 500:
                    errors.append(f"{path}{name} -> {status}")
                    continue
                ids = [d["id"] if isinstance(d, dict) else d for d in body.get("data", [])]
                wrong = [i for i in ids if name.lower() not in i.lower()]
                if wrong:
                    over.append(f"{path}{name!r} matched {wrong}")
        faults.inject("SQL/LIKE metacharacters in a search", len(SQL_NAMES) * 2)
    finally:
        await feed.close()
    faults.zero("unauthorized_ok", len(over), f"queries that matched more than the literal name: {over}")
    assert not errors, errors


# --------------------------------------------------------------------------- XML entities, archives


def xxe(sentinel: Path, root: str, inner: str) -> bytes:
    """An XML document whose ``&x;`` is the sentinel file, and whose ``&lol9;`` is a billion laughs."""
    laughs = '<!ENTITY lol0 "lol">' + "".join(
        f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, 10)
    )
    return (
        f'<?xml version="1.0"?>\n<!DOCTYPE {root} [<!ENTITY x SYSTEM "file://{sentinel}">{laughs}]>\n'
        f"<{root}>{inner}</{root}>"
    ).encode()


def nuspec(package_id: str, version: str, description: str = "d") -> str:
    return (
        f"<metadata><id>{package_id}</id><version>{version}</version><authors>a</authors>"
        f"<description>{description}</description></metadata>"
    )


def zip_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, data in members:
            archive.writestr(zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0)), data)
    return buf.getvalue()


def tgz_bytes(members: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                tar.addfile(info, io.BytesIO(member[1]))
    return buf.getvalue()


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


async def test_archives_with_traversal_members_and_xml_entities(
    proxy_factory: ProxyFactory,
    pypi: FakePyPI,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    sentinel: Path,
    faults: GroupLedger,
) -> None:
    """Where the proxy opens archives (npm tarball's package.json, a wheel's METADATA, a nupkg's
    nuspec) members named ``../``, absolute, backslashed or linked outside are never written or
    followed; nuspecs with external entities or a billion laughs are refused, never expanded; and
    no answer or document ever carries the sentinel file's bytes."""
    proxy = await proxy_factory(pypi.url)
    before = await asyncio.to_thread(tree, tmp_path, tmp_path / "data")
    absolute = f"/tmp/fault-abs-{tmp_path.name}"
    escapes = [
        ("../../evil-up", b"x"),
        ("package/../../../evil-inner", b"x"),
        (absolute, b"x"),
        ("..\\..\\evil-back", b"x"),
    ]
    answers: list[tuple[str, int, bytes]] = []

    async def send(label: str, method: str, url: str, **kwargs: Any) -> int:
        async with http.request(method, url, **kwargs) as resp:
            answers.append((label, resp.status, await resp.read()))
            return resp.status

    npm_base = f"{proxy.url}/default/npm/team"
    pkg = json.dumps({"name": "trav", "version": "1.0.0"}).encode()
    npm_cases = {
        "escaping members": tgz_bytes([("package/package.json", pkg), *escapes]),
        "package.json symlinked outside": tgz_bytes(
            [_link("package/package.json", str(sentinel), tarfile.SYMTYPE)]
        ),
        "package.json symlinked up": tgz_bytes(
            [_link("package/package.json", "../../../secret.txt", tarfile.SYMTYPE)]
        ),
        "package.json hard-linked outside": tgz_bytes(
            [_link("package/package.json", str(sentinel), tarfile.LNKTYPE)]
        ),
    }
    for i, (label, data) in enumerate(npm_cases.items()):
        version = f"1.0.{i}"
        body = (
            tgz_bytes(
                [
                    ("package/package.json", json.dumps({"name": "trav", "version": version}).encode()),
                    *escapes,
                ]
            )
            if i == 0
            else data
        )
        status = await send(
            f"npm {label}", "PUT", f"{npm_base}/trav", json=npm_publish_doc("trav", version, body)
        )
        if i:
            assert status == 400, (label, status, answers[-1][2][:200])  # no readable package.json

    wheel_meta = b"Metadata-Version: 2.1\nName: trav\nVersion: 1.0\n"
    wheel = zip_bytes(
        [
            ("trav-1.0.dist-info/METADATA", wheel_meta),
            ("trav-1.0.dist-info/WHEEL", b"Wheel-Version: 1.0\n"),
            *escapes,
        ]
    )
    form = aiohttp.FormData()
    for key, value in {":action": "file_upload", "name": "trav", "version": "1.0"}.items():
        form.add_field(key, value)
    form.add_field("content", wheel, filename="trav-1.0-py3-none-any.whl")
    if await send("wheel escaping members", "POST", f"{proxy.url}/default/pypi/team/", data=form) == 201:
        async with http.get(
            f"{proxy.url}/default/pypi/team/files/trav/trav-1.0-py3-none-any.whl.metadata"
        ) as resp:
            assert resp.status == 200 and await resp.read() == wheel_meta

    nuget_cases = {
        "nupkg escaping members": zip_bytes(
            [("Trav.Nu.nuspec", f"<package>{nuspec('Trav.Nu', '1.0.0')}</package>".encode()), *escapes]
        ),
        "nupkg backslash nuspec": zip_bytes(
            [
                ("Trav.Nu.nuspec", f"<package>{nuspec('Trav.Nu', '1.0.1')}</package>".encode()),
                ("..\\x.nuspec", b"<a/>"),
            ]
        ),
        "nuspec external entity": zip_bytes(
            [("Trav.Nu.nuspec", xxe(sentinel, "package", nuspec("Trav.Nu", "1.0.2", "&x;")))]
        ),
        "nuspec billion laughs": zip_bytes(
            [("Trav.Nu.nuspec", xxe(sentinel, "package", nuspec("Trav.Nu", "1.0.3", "&lol9;")))]
        ),
    }
    for label, data in nuget_cases.items():
        form = aiohttp.FormData()
        form.add_field("package", data, filename="package.nupkg", content_type="application/octet-stream")
        status = await send(label, "PUT", f"{proxy.url}/default/nuget/team/api/v2/package", data=form)
        if "nuspec" in label:
            assert status == 400, (label, status)  # DTDs are refused, never expanded
        else:
            assert status == 201, (label, answers[-1])  # the members are never extracted

    # Maven deploys: metadata is parsed (and must refuse entities); a POM is kept as sent.
    maven = f"{proxy.url}/default/maven/team/org/trav/lib"
    meta = xxe(sentinel, "metadata", "<groupId>org.trav</groupId><artifactId>&x;</artifactId>")
    status = await send("maven-metadata external entity", "PUT", f"{maven}/maven-metadata.xml", data=meta)
    assert status == 400
    await send(
        "pom external entity",
        "PUT",
        f"{maven}/1.0/lib-1.0.pom",
        data=xxe(sentinel, "project", "<name>&x;</name>"),
    )

    # Read everything back: documents, search, nuspec, metadata.
    for label, url in (
        ("packument", f"{npm_base}/trav"),
        ("simple page", f"{proxy.url}/default/pypi/team/simple/trav/"),
        ("nuget search", f"{proxy.url}/default/nuget/team/v3/query?q=trav"),
        ("nuget versions", f"{proxy.url}/default/nuget/team/v3-flatcontainer/trav.nu/index.json"),
        ("nuget registration", f"{proxy.url}/default/nuget/team/v3/registration/trav.nu/index.json"),
        ("maven metadata", f"{maven}/maven-metadata.xml"),
        ("pom", f"{maven}/1.0/lib-1.0.pom"),
    ):
        await send(label, "GET", url)
    faults.inject("malicious archive or XML", len(npm_cases) + 1 + len(nuget_cases) + 2)
    leaked = [label for label, _, body in answers if SENTINEL in body or b"lollollol" in body]
    faults.zero(
        "corrupt_served", leaked.__len__(), f"answers carrying the sentinel or an expansion: {leaked}"
    )
    errors = [(label, status) for label, status, _ in answers if status >= 500]
    assert not errors, errors
    after = await asyncio.to_thread(tree, tmp_path, tmp_path / "data")
    outside = (after - before) | ({absolute} if await asyncio.to_thread(Path(absolute).exists) else set())
    faults.zero("partial_commits", len(outside), f"archive members written outside: {outside}")


async def test_upstream_maven_metadata_with_external_entities_is_refused(
    proxy_factory: ProxyFactory,
    pypi: FakePyPI,
    http: aiohttp.ClientSession,
    sentinel: Path,
    faults: GroupLedger,
) -> None:
    """README: every maven-metadata.xml is parsed with defusedxml; a malformed one is a 502 naming
    the upstream and never served. An entity naming a local file, or a billion laughs, included."""
    async with HostileUpstream(pypi.origin) as hostile:
        docs = {
            "x": xxe(sentinel, "metadata", "<groupId>org.evil</groupId><artifactId>&x;</artifactId>"),
            "lol": xxe(sentinel, "metadata", "<groupId>org.evil</groupId><artifactId>&lol9;</artifactId>"),
        }
        for name, doc in docs.items():
            hostile.rules[f"/maven2/org/evil/{name}/maven-metadata.xml"] = answer(
                200, doc, [("Content-Type", "application/xml")]
            )
        proxy = await proxy_factory(hostile.url("/maven2/"), fmt="maven", connection="mvn")
        answers = []
        for name in docs:
            async with http.get(
                f"{proxy.url}/default/maven/public/org/evil/{name}/maven-metadata.xml"
            ) as resp:
                answers.append((name, resp.status, await resp.read()))
        assert all(hostile.hits[f"/maven2/org/evil/{n}/maven-metadata.xml"] >= 1 for n in docs)
    faults.inject("upstream XML with entities", len(docs))
    leaked = [n for n, _, body in answers if SENTINEL in body or b"lollol" in body]
    faults.zero("corrupt_served", len(leaked), f"entity expansions served: {leaked}")
    assert [s for _, s, _ in answers] == [502, 502], answers


async def test_npm_names_are_case_sensitive_and_scoped_and_nuget_ids_are_not(
    proxy_factory: ProxyFactory, http: aiohttp.ClientSession, tmp_path: Path, faults: GroupLedger
) -> None:
    """npm: ``left`` and ``Left`` are different packages (separate cache keys), a scope rule
    ``@acme/*`` binds ``@acme/left`` but not ``@acme-x/left``; Cyrillic look-alikes are refused.
    NuGet: ids are case-insensitive everywhere: one cache key, one rule for every casing."""
    served = []
    async with FakeNpmRegistry() as registry:
        for name in ("left", "@acme/left", "@acme-x/left"):
            path = tmp_path / f"{name.replace('/', '_')}.tgz"
            data = tgz_bytes(
                [("package/package.json", json.dumps({"name": name, "version": "1.0.0"}).encode())]
            )
            await asyncio.to_thread(path.write_bytes, data)
            await registry.add_version_async(name, path, version="1.0.0")
        proxy = await proxy_factory(registry.url, fmt="npm", connection="npmfake")
        base = f"{proxy.url}/default/npm/public"
        status, doc, _ = await call(http, "GET", f"{base}/left")
        assert status == 200 and doc["name"] == "left"
        for name in ("Left", "LEFT"):
            status, doc, _ = await call(http, "GET", f"{base}/{name}")
            if status == 200:
                served.append(f"{name} served {doc.get('name')}")
        assert registry.hits["/Left"] == 1 and registry.hits["/left"] == 1  # separate keys
        for name in ("l\u0435ft", "\uff4ceft", "@\u0430cme/left"):
            status, _, _ = await call(http, "GET", f"{base}/{quote(name, safe='@/')}")
            if status != 400:
                served.append(f"{name!r} -> {status}")
        status, rule, _ = await call(
            http,
            "PUT",
            f"{proxy.url}{ADMIN}/origin-rules/npm",
            {"pattern": "@acme/*", "publish": "ALLOW", "upstream": "BLOCK"},
        )
        assert status == 200, rule
        blocked = {
            n: (await call(http, "GET", f"{base}/{n.replace('/', '%2f')}"))[0]
            for n in ("@acme/left", "@acme-x/left", "left")
        }
        assert blocked["@acme-x/left"] == 200 and blocked["left"] == 200  # the rule catches no other scope
        if blocked["@acme/left"] != 404:
            served.append(f"@acme/left under a BLOCK rule -> {blocked['@acme/left']}")

    nupkg = await asyncio.to_thread(build_nupkg, tmp_path / "pk", "Acme.Alpha", "1.0.0")
    feed = FakeNuGetFeed()
    await feed.start()
    try:
        await feed.add_package_async(nupkg)
        nuget = await proxy_factory(feed.url, fmt="nuget", connection="nugetfake", data_dir=tmp_path / "n")
        nbase = f"{nuget.url}/default/nuget/public/v3-flatcontainer"
        spellings = ("Acme.Alpha", "acme.alpha", "ACME.ALPHA", "aCmE.aLpHa")
        data = await asyncio.to_thread(nupkg.read_bytes)
        for name in spellings:
            async with http.get(f"{nbase}/{name}/1.0.0/acme.alpha.1.0.0.nupkg") as resp:
                assert resp.status == 200 and await resp.read() == data, name
        assert sum(n for p, n in feed.hits.items() if p.endswith(".nupkg")) == 1  # one cache key
        status, rule, _ = await call(
            http,
            "PUT",
            f"{nuget.url}{ADMIN}/origin-rules/nuget",
            {"pattern": "ACME.ALPHA", "publish": "ALLOW", "upstream": "BLOCK"},
        )
        assert status == 200 and rule["pattern"] == "acme.alpha", rule
        for name in spellings:
            async with http.get(f"{nbase}/{name}/1.0.0/acme.alpha.1.0.0.nupkg") as resp:
                if resp.status != 404:
                    served.append(f"nuget {name} under a BLOCK rule -> {resp.status}")
        for name in ("Acme.\u0410lpha", "\uff21cme.Alpha", "Acme.Alpha\u200b"):
            async with http.get(f"{nbase}/{quote(name)}/index.json") as resp:
                if resp.status != 400:
                    served.append(f"nuget {name!r} -> {resp.status}")
    finally:
        await feed.close()
    faults.inject("name spelling or confusable", 5 + 3 + 3 + 2 * len(spellings) + 3)
    faults.zero("unauthorized_ok", len(served), f"identity mix-ups: {served}")


async def test_crlf_from_a_hostile_upstream_splits_no_response(
    proxy_factory: ProxyFactory, pypi: FakePyPI, dists: Dists, faults: GroupLedger
) -> None:
    """An upstream's values that could end up in the proxy's headers: a declared hash (the ETag of
    a streamed miss), a redirect's Location, an obs-folded header line. None adds a header, none
    is a 500."""
    async with HostileUpstream(pypi.origin) as hostile:
        injected_hash = "0" * 64 + "\r\nX-Injected: yes"

        def bad_hash(body: bytes) -> bytes:
            doc = json.loads(body)
            for f in doc["files"]:
                f["hashes"] = {"sha256": injected_hash}
                f["core-metadata"] = f["dist-info-metadata"] = False
            return json.dumps(doc).encode()

        async def location(ex: Exchange) -> bool:
            head = f"HTTP/1.1 302 Found\r\nLocation: /files/{dists.beta.name}%0d%0aX-Injected:%20yes\r\n"
            await ex.send((head + "X-Upstream: a\r\n X-Injected: yes\r\nContent-Length: 0\r\n\r\n").encode())
            return True

        hostile.rules["/simple/beta/"] = mutated(bad_hash)
        hostile.rules["/simple/alpha/"] = mutated(lambda b: b.replace(b"/files/", b"/redir/"))
        hostile.rules["/redir/*"] = location
        proxy = await proxy_factory(hostile.url("/simple/"))
        targets = [
            f"/default/pypi/public/files/beta/{dists.beta.name}",
            f"/default/pypi/public/files/alpha/{dists.alpha.name}",
            "/default/pypi/public/simple/beta/",
        ]
        answers = [await raw_request(proxy.url, get(t)) for t in targets]
        assert hostile.hits[f"/redir/{dists.alpha.name}"] >= 1
    faults.inject("CR/LF from the upstream", len(targets))
    split = [(t, a.head[:300]) for t, a in zip(targets, answers, strict=True) if _injected(a)]
    faults.zero("unauthorized_ok", len(split), f"upstream header smuggled to the client: {split}")
    statuses = [(a.status, a.body[:200]) for a in answers]
    assert all(a.status != 500 for a in answers), statuses
    # A file whose declared hash is unusable is never served (nothing could verify it).
    faults.zero(
        "corrupt_served", int(answers[0].status == 200), f"served against a malformed hash: {statuses[0]}"
    )
    assert answers[0].status == 502 and "upstream" in answers[0].json()["error"], statuses[0]
