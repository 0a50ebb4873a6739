"""Fault group 5: authentication and authorization, attacked route by route.

The documented model (README "Security", DESIGN invariant 9): every route that serves or changes
packages needs a permission on the repository (or, for the admin API, the domain or the proxy)
in its path; no credential, a malformed, unknown, expired or revoked one is a 401; a valid token
without the permission there is a 403; a repository you may not read answers the same whether a
package exists or not; and guessing tokens is rate-limited per client address.

The route matrix is built from the running application's router, not from a list in this file:
every route is classified (an adapter route needs the permission its format declares, the admin
API needs admin, a few system routes are open by design) and a route nobody classified fails
the test, so an endpoint added later is attacked without anyone remembering to add it here.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import io
import itertools
import json
import re
import tarfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yarl
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from proxy.app import PIPELINE
from proxy.formats import FORMATS
from proxy.security.access import DEFAULT_PERMISSION
from tests.conftest import Dists, RunningProxy, serve_config
from tests.fakes.maven import build_jar
from tests.fakes.nuget import build_nupkg
from tests.fakes.pypi import FakePyPI
from tests.faults.report import GroupLedger
from tests.maven_clients import pom_xml
from tests.npm_clients import npm_publish_doc

GROUP = "5 authn/authz"

ADMIN = "fault-suite-bootstrap-admin-" + "k" * 40
ALL = ("read", "publish", "delete", "admin")


# --- a secured proxy with two repositories and content of every format in one of them ----------


def secured_config(data_dir: Path, upstream_url: str, admin_file: Path, **server: Any) -> dict[str, Any]:
    """``default/secret`` (the fake PyPI upstream, plus what the tests publish) holds content;
    ``default/mine`` and ``elsewhere/mine`` are empty. Auth on; brute-force limit off unless asked."""
    return {
        "server": {
            "data_dir": str(data_dir),
            "soft_deadline": "2s",
            "auth": True,
            "admin_token_file": str(admin_file),
            "token_min_duration": "1s",
            "auth_failure_limit": 0,
            **server,
        },
        "upstreams": {
            "fake": {
                "format": "pypi",
                "url": upstream_url,
                "metadata_ttl": "10m",
                "connect_timeout": "2s",
                "read_timeout": "5s",
                "metadata_timeout": "5s",
                "retries": 0,
            }
        },
        "domains": [
            {
                "name": "default",
                "repositories": [
                    {"name": "secret", "upstreams": ["fake"]},
                    {"name": "mine"},
                    {"name": "open", "upstreams": ["fake"], "anonymous_read": True},
                ],
            },
            {"name": "elsewhere", "repositories": [{"name": "mine"}]},
        ],
    }


async def start_secured(tmp_path: Path, upstream_url: str, **server: Any) -> RunningProxy:
    admin_file = tmp_path / "admin-token"
    await asyncio.to_thread(admin_file.write_text, ADMIN + "\n")
    raw = secured_config(tmp_path / "data", upstream_url, admin_file, **server)
    config, runner, url = await serve_config(raw)
    return RunningProxy(url=url, config=config, runner=runner)


@pytest.fixture
async def secured(tmp_path: Path, pypi: FakePyPI) -> AsyncIterator[RunningProxy]:
    proxy = await start_secured(tmp_path, pypi.url)
    yield proxy
    await proxy.stop()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def basic(token: str, user: str = "aws") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()}


async def issue(
    http: aiohttp.ClientSession,
    proxy: RunningProxy,
    *,
    domain: str = "default",
    repo: str | None = None,
    permissions: tuple[str, ...] = ("read",),
    duration: str = "1h",
    principal: str = "ci",
) -> tuple[str, str]:
    """(token id, secret), issued through the admin API as a deployment would."""
    body = {
        "domain": domain,
        "repository": repo,
        "principal": principal,
        "permissions": list(permissions),
        "duration": duration,
    }
    async with http.post(proxy.url + "/-/api/v1/tokens", json=body, headers=bearer(ADMIN)) as resp:
        data = await resp.json()
        assert resp.status == 201, data
        return str(data["id"]), str(data["token"])


async def revoke(http: aiohttp.ClientSession, proxy: RunningProxy, token_id: str) -> None:
    async with http.delete(f"{proxy.url}/-/api/v1/tokens/{token_id}", headers=bearer(ADMIN)) as resp:
        assert resp.status == 204, await resp.text()


def npm_tarball(name: str, version: str, marker: str) -> bytes:
    """A real npm package tarball (``package/package.json`` inside a gzip'd tar), in memory."""
    manifest = json.dumps({"name": name, "version": version, "description": marker}).encode()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        for arcname, data in (
            ("package/package.json", manifest),
            ("package/index.js", b"module.exports=1\n"),
        ):
            info = tarfile.TarInfo(arcname)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tf.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)


@dataclass
class Content:
    """What ``default/secret`` holds: per format, the paths of an existing and a missing package
    (read routes), and the bytes and names no unauthorized answer may contain."""

    existing: dict[str, list[str]] = field(default_factory=dict)
    missing: dict[str, list[str]] = field(default_factory=dict)
    assets: list[bytes] = field(default_factory=list)
    markers: list[bytes] = field(default_factory=list)

    def leaks(self, body: bytes) -> bool:
        return any(m in body for m in self.markers) or any(a and a in body for a in self.assets)


async def populate(
    http: aiohttp.ClientSession, proxy: RunningProxy, dists: Dists, tmp_path: Path, auth: Mapping[str, str]
) -> Content:
    """Fill ``default/secret`` through the proxy: PyPI through its upstream (cached), npm, Maven
    and NuGet published, so every format has content another repository must never reach."""
    base = f"{proxy.url}/default"
    content = Content()
    wheel_name = dists.alpha.name
    wheel = await asyncio.to_thread(dists.alpha.read_bytes)
    async with http.get(f"{base}/pypi/secret/simple/alpha/", headers=auth) as resp:
        assert resp.status == 200, await resp.text()
    async with http.get(f"{base}/pypi/secret/files/alpha/{wheel_name}", headers=auth) as resp:
        assert resp.status == 200 and await resp.read() == wheel
    content.assets.append(wheel)
    content.markers += [hashlib.sha256(wheel).hexdigest().encode(), wheel_name.encode()]
    content.existing["pypi"] = ["simple/alpha/", f"files/alpha/{wheel_name}", "simple/alpha"]
    content.missing["pypi"] = ["simple/nosuch/", "files/nosuch/nosuch-1.0-py3-none-any.whl", "simple/nosuch"]

    tgz = npm_tarball("@acme/hidden", "1.0.0", "npm-marker-7c1e")
    async with http.put(
        f"{base}/npm/secret/@acme%2fhidden", json=npm_publish_doc("@acme/hidden", "1.0.0", tgz), headers=auth
    ) as resp:
        assert resp.status in (200, 201), await resp.text()
    content.assets.append(tgz)
    content.markers += [b"hidden-1.0.0.tgz", hashlib.sha1(tgz).hexdigest().encode()]
    content.existing["npm"] = [
        "@acme%2fhidden",
        "@acme/hidden",
        "@acme%2fhidden/1.0.0",
        "@acme/hidden/-/hidden-1.0.0.tgz",
        "-/package/@acme%2fhidden/dist-tags",
    ]
    content.missing["npm"] = [
        "@acme%2fnosuch",
        "@acme/nosuch",
        "@acme%2fnosuch/1.0.0",
        "@acme/nosuch/-/nosuch-1.0.0.tgz",
        "-/package/@acme%2fnosuch/dist-tags",
    ]

    jar = build_jar({"hidden.properties": b"maven-marker-51aa\n"})
    pom = pom_xml("com.acme", "hidden", "1.0")
    for name, data in (("hidden-1.0.jar", jar), ("hidden-1.0.pom", pom)):
        async with http.put(
            f"{base}/maven/secret/com/acme/hidden/1.0/{name}", data=data, headers=auth
        ) as resp:
            assert resp.status in (200, 201), await resp.text()
    content.assets.append(jar)
    content.markers += [b"hidden-1.0.jar", hashlib.sha1(jar).hexdigest().encode()]
    content.existing["maven"] = [
        "com/acme/hidden/1.0/hidden-1.0.jar",
        "com/acme/hidden/1.0/hidden-1.0.pom",
        "com/acme/hidden/maven-metadata.xml",
        "com/acme/hidden/1.0/hidden-1.0.jar.sha1",
    ]
    content.missing["maven"] = [
        "com/acme/nosuch/1.0/nosuch-1.0.jar",
        "com/acme/nosuch/1.0/nosuch-1.0.pom",
        "com/acme/nosuch/maven-metadata.xml",
        "com/acme/nosuch/1.0/nosuch-1.0.jar.sha1",
    ]

    nupkg_path = await asyncio.to_thread(build_nupkg, tmp_path / "nupkgs", "Acme.Hidden", "1.0.0")
    nupkg = await asyncio.to_thread(nupkg_path.read_bytes)
    form = aiohttp.FormData()
    form.add_field("package", nupkg, filename=nupkg_path.name, content_type="application/octet-stream")
    async with http.put(f"{base}/nuget/secret/api/v2/package", data=form, headers=auth) as resp:
        assert resp.status in (200, 201), await resp.text()
    content.assets.append(nupkg)
    content.markers += [b"acme.hidden.1.0.0.nupkg", b"Acme.Hidden"]
    content.existing["nuget"] = [
        "v3-flatcontainer/acme.hidden/index.json",
        "v3-flatcontainer/acme.hidden/1.0.0/acme.hidden.1.0.0.nupkg",
        "v3/registration/acme.hidden/index.json",
        "v3/registration/acme.hidden/1.0.0.json",
    ]
    content.missing["nuget"] = [
        "v3-flatcontainer/acme.nosuch/index.json",
        "v3-flatcontainer/acme.nosuch/1.0.0/acme.nosuch.1.0.0.nupkg",
        "v3/registration/acme.nosuch/index.json",
        "v3/registration/acme.nosuch/1.0.0.json",
    ]
    # Positive control: with the right credential every existing path answers 200 with content.
    for fmt, paths in content.existing.items():
        for path in paths:
            async with http.get(f"{base}/{fmt}/secret/{path}", headers=auth, allow_redirects=False) as resp:
                body = await resp.read()
                assert resp.status in (200, 301), (fmt, path, resp.status, body[:300])
    return content


# --- a raw HTTP/1.1 client: paths go out byte for byte, never normalised ---------------------------


@dataclass
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: bytes


async def raw_request(
    origin: str,
    method: str,
    target: str,
    headers: Mapping[str, str] | None = None,
    *,
    local_host: str | None = None,
    timeout: float = 15.0,
) -> RawAnswer:
    """Send ``target`` exactly as written (``..``, ``//``, ``%2e`` and all) and read the answer."""
    host_port = origin.removeprefix("http://")
    host, port = host_port.rsplit(":", 1)
    local = (local_host, 0) if local_host else None
    reader, writer = await asyncio.open_connection(host, int(port), local_addr=local)
    try:
        lines = [f"{method} {target} HTTP/1.1", f"Host: {host_port}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {}
    for line in header_lines:
        key, _, value = line.partition(":")
        parsed[key.strip().lower()] = value.strip()
    if "chunked" in parsed.get("transfer-encoding", "").lower():
        body = _dechunk(body)
    return RawAnswer(int(status_line.split(" ")[1]), parsed, body)


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


# --- the route matrix ------------------------------------------------------------------------------

_PARAM = re.compile(r"\{(\w+)(?::[^{}]*)?\}")
OPEN_BY_DESIGN = {"/-/healthz", "/-/readyz", "/-/metrics"}  # documented: probes and Prometheus
# Admin API routes whose handler (not the middleware) checks admin on the domain in the body/query.
HANDLER_CHECKED = {"/-/api/v1/tokens", "/-/api/v1/tokens/{id}", "/-/api/v1/audit"}
EXCHANGE = "/v1/authorization-token"  # any valid token of the domain gets one of its own scope


@dataclass(frozen=True)
class RouteCase:
    """One route of the router, how to reach it and what it needs."""

    method: str  # the method sent ("*" routes get PATCH)
    template: str
    path: str
    kind: str  # repository | admin | exchange | open
    permission: str


def template_of(route: web.AbstractRoute) -> str:
    info = route.resource.get_info() if route.resource is not None else {}
    return str(info.get("formatter") or info.get("path") or "")


def adapter_permissions(app: web.Application) -> dict[tuple[str, str], str]:
    """(method, template) -> permission, from the adapters' own route declarations."""
    out: dict[tuple[str, str], str] = {}
    for cls in FORMATS:
        for spec in cls(app[PIPELINE]).routes():
            template = _PARAM.sub(r"{\1}", f"/{{domain}}/{cls.name}/{{repo}}{spec.suffix}")
            permission = spec.permission or DEFAULT_PERMISSION[spec.method]
            out[(spec.method, template)] = permission
            if spec.method == "GET":
                out[("HEAD", template)] = permission
    return out


async def route_matrix(app: web.Application, values: Mapping[str, list[str]]) -> list[RouteCase]:
    """Every route of ``app`` with a concrete path that the router resolves to that very route."""
    permissions = adapter_permissions(app)
    formats = {cls.name for cls in FORMATS}
    cases: list[RouteCase] = []
    unclassified: list[str] = []
    for route in app.router.routes():
        template = template_of(route)
        method = "PATCH" if route.method == "*" else route.method
        segments = template.split("/")
        if route.method == "*":
            kind, permission = "open", ""  # 404/405 answers for what no route serves
        elif template in OPEN_BY_DESIGN:
            kind, permission = "open", ""
        elif len(segments) > 3 and segments[1] == "{domain}" and segments[2] in formats:
            found = permissions.get((route.method, template))
            if found is None:
                unclassified.append(f"{route.method} {template} (not declared by its adapter)")
                continue
            kind, permission = "repository", found
        elif template == EXCHANGE and route.method == "POST":
            kind, permission = "exchange", "read"
        elif template.startswith("/-/api/v1/"):
            kind, permission = "admin", "admin"
        else:
            unclassified.append(f"{route.method} {template}")
            continue
        path = await _concrete_path(app, route, method, template, values)
        if path is None:
            unclassified.append(f"{route.method} {template} (no value set reaches it: add one)")
            continue
        cases.append(RouteCase(method, template, path, kind, permission))
    assert not unclassified, "routes missing from the auth matrix:\n" + "\n".join(unclassified)
    return cases


async def _concrete_path(
    app: web.Application,
    route: web.AbstractRoute,
    method: str,
    template: str,
    values: Mapping[str, list[str]],
) -> str | None:
    names = _PARAM.findall(template)
    for combo in itertools.product(*(values.get(n, ["x"]) for n in names)):
        path = template.format(**dict(zip(names, combo, strict=True)))
        match = await app.router.resolve(make_mocked_request(method, path, app=app))
        if match.route is route:
            return path
    return None


@dataclass(frozen=True)
class Credential:
    name: str
    headers: dict[str, str]
    status: int  # what the README says it gets on a route it does not open
    applies: frozenset[str]  # route kinds it is refused on (elsewhere it may be legitimate)


async def credentials(http: aiohttp.ClientSession, proxy: RunningProxy) -> tuple[list[Credential], str]:
    """Every kind of bad credential, and the id of a token the admin routes may name."""
    every = frozenset({"repository", "admin", "exchange"})
    _, expired = await issue(http, proxy, repo="secret", permissions=ALL, duration="1s")
    revoked_id, revoked = await issue(http, proxy, repo="secret", permissions=ALL)
    # Used first, so it sits in the verified-token cache: a revocation must still act at once.
    async with http.get(proxy.url + "/default/pypi/secret/simple/", headers=basic(revoked)) as resp:
        assert resp.status == 200
    await revoke(http, proxy, revoked_id)
    _, wrong_repo = await issue(http, proxy, repo="mine", permissions=ALL)
    _, wrong_domain = await issue(http, proxy, domain="elsewhere", permissions=ALL)
    _, read_only = await issue(http, proxy, repo="secret", permissions=("read",))
    _, no_admin = await issue(http, proxy, permissions=("read", "publish", "delete"))
    victim_id, _ = await issue(http, proxy, repo="secret", principal="victim")
    _, no_delete = await issue(http, proxy, repo="secret", permissions=("read", "publish"))
    # A domain-wide token with every permission whose principal the domain's policy narrows to
    # reading ``mine``: the policy, not the token, has the last word (README "Policies").
    _, narrowed = await issue(http, proxy, permissions=ALL, principal="narrowed")
    grants = [
        {"principal": "ci", "permissions": list(ALL)},
        {"principal": "victim", "permissions": ["read"]},
        {"principal": "narrowed", "repository": "mine", "permissions": ["read"]},
    ]
    async with http.put(
        proxy.url + "/-/api/v1/domains/default/policy", json={"grants": grants}, headers=bearer(ADMIN)
    ) as resp:
        assert resp.status == 200, await resp.text()
    await asyncio.sleep(1.1)  # the short one expires
    creds = [
        Credential("none", {}, 401, every),
        Credential("malformed basic", {"Authorization": "Basic %%%not-base64"}, 401, every),
        Credential(
            "basic, not utf-8",
            {"Authorization": "Basic " + base64.b64encode(b"\xff:\xfe").decode()},
            401,
            every,
        ),
        Credential("bearer without value", {"Authorization": "Bearer"}, 401, every),
        Credential("unknown bearer", bearer("apt_" + "A" * 43), 401, every),
        Credential("unknown basic", basic("apt_" + "B" * 43), 401, every),
        Credential("unknown nuget key", {"X-NuGet-ApiKey": "apt_" + "C" * 43}, 401, every),
        Credential("token without scheme", {"Authorization": read_only}, 401, every),
        Credential("other scheme", {"Authorization": f"Token {read_only}"}, 401, every),
        Credential("expired", basic(expired), 401, every),
        Credential("revoked", bearer(revoked), 401, every),
        Credential("revoked as nuget key", {"X-NuGet-ApiKey": revoked}, 401, every),
        Credential("other repository", basic(wrong_repo), 403, frozenset({"repository", "admin"})),
        Credential("other domain", bearer(wrong_domain), 403, every),
        Credential("read-only", basic(read_only), 403, frozenset({"admin", "repository-write"})),
        Credential("domain token without admin", bearer(no_admin), 403, frozenset({"admin"})),
        Credential("publish, not delete", basic(no_delete), 403, frozenset({"repository-delete"})),
        Credential("narrowed by policy", bearer(narrowed), 403, frozenset({"repository", "admin"})),
    ]
    return creds, victim_id


def _applies(cred: Credential, case: RouteCase) -> bool:
    if case.kind == "repository" and case.permission != "read" and "repository-write" in cred.applies:
        return True
    if case.kind == "repository" and case.permission == "delete" and "repository-delete" in cred.applies:
        return True
    return case.kind in cred.applies


QUERIES = {EXCHANGE: "?domain=default&duration=900", "/-/api/v1/tokens": "?domain=default"}
QUERIES["/-/api/v1/audit"] = "?domain=default"


def _body(case: RouteCase) -> tuple[bytes | None, dict[str, str]]:
    """A body that would be accepted if the caller were allowed (so a refusal is the auth's)."""
    if case.method not in ("POST", "PUT"):
        return None, {}
    if case.template == "/-/api/v1/tokens":
        doc = {"domain": "default", "repository": "secret", "principal": "x", "permissions": ALL}
        return json.dumps(doc).encode(), {"Content-Type": "application/json"}
    if case.template.startswith("/-/") or case.kind == "exchange":
        return b"{}", {"Content-Type": "application/json"}
    return b"x", {"Content-Type": "application/octet-stream"}


async def test_every_route_refuses_every_bad_credential(
    secured: RunningProxy, http: aiohttp.ClientSession, dists: Dists, tmp_path: Path, faults: GroupLedger
) -> None:
    content = await populate(http, secured, dists, tmp_path, bearer(ADMIN))
    creds, victim_id = await credentials(http, secured)
    values = {
        "domain": ["default"],
        "repo": ["secret"],
        "project": ["alpha"],
        "filename": [dists.alpha.name, "hidden-1.0.0.tgz"],
        "scope": ["@acme"],
        "name": ["hidden"],
        "scoped": ["@acme%2fhidden"],
        "tag": ["latest"],
        "rev": ["1-0"],
        "version": ["1.0.0", "1.0"],
        "path": ["com/acme/hidden/1.0/hidden-1.0.jar"],
        "id": [victim_id, "acme.hidden"],
        "leaf": ["1.0.0.json"],
        "format": ["pypi", "nope"],
        "package": ["alpha"],
        "tail": ["x", "nothing/here"],
    }
    cases = await route_matrix(secured.runner.app, values)
    kinds = {c.kind for c in cases}
    assert {"repository", "admin", "exchange", "open"} <= kinds, kinds
    assert sum(c.kind == "repository" for c in cases) >= 60  # four formats' routes, GET and HEAD

    limit = asyncio.Semaphore(8)
    successes: list[str] = []
    wrong_status: list[str] = []
    leaked: list[str] = []

    async def attempt(case: RouteCase, cred: Credential) -> None:
        data, extra = _body(case)
        url = secured.url + case.path + QUERIES.get(case.template, "")
        async with (
            limit,
            http.request(
                case.method,
                yarl_url(url),
                data=data,
                headers={**extra, **cred.headers},
                allow_redirects=False,
            ) as resp,
        ):
            body = await resp.read()
        where = f"{case.method} {case.path} [{cred.name}] -> {resp.status}"
        if resp.status < 400:
            successes.append(where)
        elif resp.status != cred.status:
            wrong_status.append(where)
        if content.leaks(body):
            leaked.append(where)

    attempts = [
        (case, cred) for case in cases if case.kind != "open" for cred in creds if _applies(cred, case)
    ]
    # A repository with anonymous reads opens its reads only: every other route still needs a token.
    anonymous = creds[0]
    attempts += [
        (
            RouteCase(c.method, c.template, c.path.replace("/secret", "/open", 1), c.kind, c.permission),
            anonymous,
        )
        for c in cases
        if c.kind == "repository" and c.permission != "read"
    ]
    faults.inject("bad credential x route", len(attempts))
    await asyncio.gather(*(attempt(case, cred) for case, cred in attempts))

    # Open routes: the probes answer, the catch-alls never serve content, with any credential.
    for case in (c for c in cases if c.kind == "open"):
        async with http.request(
            case.method, yarl_url(secured.url + case.path), allow_redirects=False
        ) as resp:
            body = await resp.read()
        if content.leaks(body):
            leaked.append(f"{case.method} {case.path} (open) -> {resp.status}")
        if case.template not in OPEN_BY_DESIGN and resp.status < 400:
            successes.append(f"{case.method} {case.path} (catch-all) -> {resp.status}")

    faults.zero("unauthorized_ok", len(successes) + len(leaked), f"{successes[:10]} {leaked[:10]}")
    assert not wrong_status, "\n".join(wrong_status[:40])
    # No refused DELETE /-/api/v1/tokens/{id} took effect: the victim token is still valid.
    async with http.get(secured.url + "/-/api/v1/tokens?domain=default", headers=bearer(ADMIN)) as resp:
        listed = {t["id"]: t for t in (await resp.json())["tokens"]}
    assert listed[victim_id]["revoked_at"] is None


def yarl_url(url: str) -> yarl.URL:
    """The URL as written: aiohttp must not re-encode ``%2f`` in npm scoped names."""
    return yarl.URL(url, encoded=True)


# --- the same path spelled differently --------------------------------------------------------------


def spellings(fmt: str, rest: str) -> list[str]:
    """Ways to write ``/default/{fmt}/secret/{rest}`` (or to climb to it from ``mine``)."""
    out = [
        f"/default/{fmt}/secret/{rest}",
        f"/default/{fmt}/%73ecret/{rest}",
        f"/default/{fmt}/%73%65%63%72%65%74/{rest}",
        f"/default/{fmt}/SECRET/{rest}",
        f"/default/{fmt}/Secret/{rest}",
        f"/DEFAULT/{fmt}/secret/{rest}",
        f"/default/{fmt.upper()}/secret/{rest}",
        f"//default/{fmt}/secret/{rest}",
        f"/default//{fmt}/secret/{rest}",
        f"/default/{fmt}//secret/{rest}",
        f"/default/{fmt}/secret//{rest}",
        f"/default/{fmt}/secret/{rest}/",
        f"/default/{fmt}/secret/{rest}//",
        f"/default/{fmt}/secret/{rest.rstrip('/')}",
        f"/default/{fmt}/secret/./{rest}",
        f"/default/{fmt}/mine/{rest}",
        f"/default/{fmt}/mine/../secret/{rest}",
        f"/default/{fmt}/mine/%2e%2e/secret/{rest}",
        f"/default/{fmt}/mine/%2E%2E/secret/{rest}",
        f"/default/{fmt}/mine/.%2e/secret/{rest}",
        f"/default/{fmt}/mine/%252e%252e/secret/{rest}",
        f"/default/{fmt}/mine%2f..%2fsecret/{rest}",
        f"/default/{fmt}/mine%2F%2E%2E%2Fsecret/{rest}",
        f"/default/{fmt}/mine/..%2fsecret/{rest}",
        f"/default/{fmt}/mine/..%5csecret/{rest}",
        f"/default/{fmt}/mine/..\\secret/{rest}",
        f"/default/{fmt}/mine;/../secret/{rest}",
        f"/default/{fmt}/mine//../secret/{rest}",
        f"/default/{fmt}/mine/{rest}?repo=secret",
        f"/default/{fmt}/mine/{rest}%3F/../../secret/{rest}",
        f"/default/{fmt}/mine/%00/../secret/{rest}",
        f"/default/{fmt}/%EF%BD%93ecret/{rest}",  # fullwidth s
        f"/default/{fmt}/secret%20/{rest}",
        f"/default/{fmt}/secret%09/{rest}",
        f"/default/{fmt}/@mine%2f..%2fsecret/{rest}",
        f"/elsewhere/{fmt}/mine/../../default/{fmt}/secret/{rest}",
        f"/default/{fmt}/mine/{fmt}/secret/{rest}",
    ]
    if fmt == "npm":
        out += [
            "/default/npm/mine/@acme%2f..%2f..%2fsecret%2f@acme%2fhidden",
            "/default/npm/mine/@acme%2F..%2F..%2Fsecret/@acme%2fhidden",
            "/default/npm/mine/%40acme%2fhidden",
            "/default/npm/mine/@acme%2fhidden%2f..%2f..%2f..%2fsecret%2f@acme%2fhidden",
            "/default/npm/@acme%2f..%2fsecret/@acme/hidden",
            "/default/npm/secret/%40acme%2Fhidden",
            "/default/npm/mine/-/package/@acme%2f..%2f..%2fsecret/dist-tags",
        ]
    return out


async def test_other_spellings_never_reach_another_repository(
    secured: RunningProxy, http: aiohttp.ClientSession, dists: Dists, tmp_path: Path, faults: GroupLedger
) -> None:
    """With ``mine``'s token (every permission there), ``secret``'s content stays out of reach
    however the path is written, including the very same asset path in ``mine`` (its blob is in
    the shared store: a lookup by digest alone would serve it)."""
    content = await populate(http, secured, dists, tmp_path, bearer(ADMIN))
    _, mine = await issue(http, secured, repo="mine", permissions=("read", "publish", "delete"))
    targets = [(fmt, rest) for fmt, rests in content.existing.items() for rest in rests]
    requests = [
        (path, h) for fmt, rest in targets for path in spellings(fmt, rest) for h in (basic(mine), {})
    ]
    requests += [(f"{secured.url}/default/pypi/secret/simple/alpha/", basic(mine))]  # absolute-form target
    faults.inject("path spelling", len(requests))
    limit = asyncio.Semaphore(8)
    leaks: list[str] = []
    served: list[str] = []

    async def one(target: str, headers: dict[str, str]) -> None:
        async with limit:
            answer = await raw_request(secured.url, "GET", target, headers)
        if 200 <= answer.status < 300 and content.leaks(answer.body):
            leaks.append(f"{target} -> {answer.status}")
        elif 200 <= answer.status < 300 or "secret" in answer.headers.get("location", "").split("?")[0]:
            served.append(f"{target} -> {answer.status} {answer.headers.get('location', '')}")

    await asyncio.gather(*(one(target, headers) for target, headers in requests))
    faults.zero("unauthorized_ok", len(leaks), "\n".join(leaks[:20]))
    # Nothing in ``mine`` exists, so nothing should succeed (a redirect may add the slash, in mine).
    assert not served, "\n".join(served[:20])
    # Positive control: the token does work in its own repository.
    answer = await raw_request(secured.url, "GET", "/default/pypi/mine/simple/", basic(mine))
    assert answer.status == 200


# --- no existence oracle -----------------------------------------------------------------------------

_VOLATILE = {"date", "x-request-id", "content-length"}


def _normalised(answer: RawAnswer) -> tuple[int, dict[str, str], object]:
    headers = {k: v for k, v in answer.headers.items() if k not in _VOLATILE}
    try:
        doc = json.loads(answer.body)
    except ValueError:
        return answer.status, headers, answer.body
    if isinstance(doc, dict):
        doc.pop("request_id", None)
    return answer.status, headers, doc


async def test_a_repository_you_may_not_read_answers_the_same_for_any_package(
    secured: RunningProxy, http: aiohttp.ClientSession, dists: Dists, tmp_path: Path, faults: GroupLedger
) -> None:
    content = await populate(http, secured, dists, tmp_path, bearer(ADMIN))
    _, mine = await issue(http, secured, repo="mine", permissions=ALL)
    _, elsewhere = await issue(http, secured, domain="elsewhere", permissions=ALL)
    _, reader = await issue(http, secured, repo="secret", permissions=("read",))
    callers: dict[str, dict[str, str]] = {
        "anonymous": {},
        "unknown token": basic("apt_" + "D" * 43),
        "other repository": basic(mine),
        "other domain": bearer(elsewhere),
    }
    pairs = [
        ("GET", f"/default/{fmt}/secret/{have}", f"/default/{fmt}/secret/{lack}")
        for fmt in content.existing
        for have, lack in zip(content.existing[fmt], content.missing[fmt], strict=True)
    ]
    pairs += [("HEAD", a, b) for _, a, b in list(pairs)]
    # Changes, refused to a read-only token: the refusal must not depend on existence either.
    writes = [
        (
            "DELETE",
            "/default/npm/secret/@acme%2fhidden/-rev/1-0",
            "/default/npm/secret/@acme%2fnosuch/-rev/1-0",
        ),
        (
            "DELETE",
            "/default/nuget/secret/api/v2/package/Acme.Hidden/1.0.0",
            "/default/nuget/secret/api/v2/package/Acme.Nosuch/1.0.0",
        ),
        (
            "PUT",
            "/default/maven/secret/com/acme/hidden/1.0/hidden-1.0.jar",
            "/default/maven/secret/com/acme/nosuch/1.0/nosuch-1.0.jar",
        ),
        (
            "PUT",
            "/default/npm/secret/-/package/@acme%2fhidden/dist-tags/beta",
            "/default/npm/secret/-/package/@acme%2fnosuch/dist-tags/beta",
        ),
    ]
    callers_for_writes = {**callers, "read-only": basic(reader)}
    differing: list[str] = []
    compared = 0
    for method, have, lack in pairs:
        for who, headers in callers.items():
            a = await raw_request(secured.url, method, have, headers)
            b = await raw_request(secured.url, method, lack, headers)
            compared += 1
            assert a.status in (401, 403), (method, have, who, a.status)
            if _normalised(a) != _normalised(b) or len(a.body) != len(b.body):
                differing.append(f"{who}: {method} {have} {a.status} vs {lack} {b.status}")
    for method, have, lack in writes:
        for who, headers in callers_for_writes.items():
            a = await raw_request(secured.url, method, have, {**headers, "Content-Length": "0"})
            b = await raw_request(secured.url, method, lack, {**headers, "Content-Length": "0"})
            compared += 1
            assert a.status in (401, 403), (method, have, who, a.status)
            if _normalised(a) != _normalised(b) or len(a.body) != len(b.body):
                differing.append(f"{who}: {method} {have} {a.status} vs {lack} {b.status}")
    # Nor whether a repository (or a domain) exists: a private one and one that does not exist
    # answer alike, the name the caller wrote aside; the catch-all route included.
    probes = [f"/{{d}}/{fmt}/{{r}}/{paths[0]}" for fmt, paths in content.existing.items()]
    probes += ["/{d}/npm/{r}/@acme%2fhidden/-rev/1-0", "/{d}/nope/{r}/x", "/{d}/pypi/{r}/nothing/here"]
    for template in probes:
        for who, headers in callers.items():
            method = "DELETE" if "-rev" in template else "GET"
            real = await raw_request(secured.url, method, template.format(d="default", r="secret"), headers)
            answers = [
                (other, await raw_request(secured.url, method, template.format(d=d, r=r), headers))
                for other, d, r in (("nosuch", "default", "nosuch"), ("nodomain", "nodomain", "secret"))
            ]
            compared += 1
            for other, answer in answers:
                answer.body = answer.body.replace(
                    other.encode(), b"default" if other == "nodomain" else b"secret"
                )
                if _normalised(real) != _normalised(answer):
                    differing.append(
                        f"{who}: {method} {template} secret {real.status} vs {other} {answer.status}"
                    )
    faults.inject("existence probe", compared * 2)
    faults.zero("unauthorized_ok", len(differing), "existence oracle: " + "\n".join(differing[:20]))


# --- brute force ---------------------------------------------------------------------------------------


async def _get(
    url: str, headers: Mapping[str, str], *, local_host: str = "127.0.0.1"
) -> tuple[int, dict[str, str]]:
    connector = aiohttp.TCPConnector(local_addr=(local_host, 0), force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(url, headers=headers) as resp,
    ):
        await resp.read()
        return resp.status, dict(resp.headers)


async def test_guessing_is_rate_limited_per_client_and_forwarded_for_is_not_trusted(
    tmp_path: Path, pypi: FakePyPI, http: aiohttp.ClientSession, faults: GroupLedger
) -> None:
    limit, window = 8, 5.0  # generous: the lockout checks must all fall inside one window
    proxy = await start_secured(
        tmp_path, pypi.url, auth_failure_limit=limit, auth_failure_window=f"{window}s"
    )
    try:
        _, good = await issue(http, proxy, repo="secret")
        page = proxy.url + "/default/pypi/secret/simple/alpha/"
        guesses = [basic(f"apt_guess{i:039d}") for i in range(limit * 3)]
        faults.inject("token guess", len(guesses))
        statuses = []
        for n, guess in enumerate(guesses):
            # Each guess claims a different X-Forwarded-For: not trusted, so it changes nothing.
            status, headers = await _get(page, {**guess, "X-Forwarded-For": f"10.9.{n}.1"})
            statuses.append(status)
        guessed_ok = sum(s < 400 for s in statuses)
        assert statuses[:limit] == [401] * limit, statuses
        assert statuses[limit:] == [429] * (len(guesses) - limit), statuses
        assert 1 <= int(headers["Retry-After"]) <= window + 1
        # Locked out: even a valid token from this address is not looked at now.
        assert (await _get(page, basic(good)))[0] == 429
        # Another client is unaffected; an anonymous request from the locked address is a plain 401.
        assert (await _get(page, basic(good), local_host="127.0.0.2"))[0] == 200
        assert (await _get(page, {}))[0] == 401
        # The window ends: the locked address may authenticate again.
        await asyncio.sleep(window + 0.3)
        assert (await _get(page, basic(good)))[0] == 200
        faults.zero("unauthorized_ok", guessed_ok, "guesses answered 2xx")
    finally:
        await proxy.stop()


async def test_behind_a_trusted_proxy_the_limit_is_per_forwarded_client(
    tmp_path: Path, pypi: FakePyPI, http: aiohttp.ClientSession, faults: GroupLedger
) -> None:
    """With ``trust_forwarded`` the client is the address the reverse proxy appended (the last
    ``X-Forwarded-For`` entry): what the attacker writes before it does not give it new tries."""
    limit = 6
    proxy = await start_secured(
        tmp_path, pypi.url, auth_failure_limit=limit, auth_failure_window="30s", trust_forwarded=True
    )
    try:
        _, good = await issue(http, proxy, repo="secret")
        page = proxy.url + "/default/pypi/secret/simple/alpha/"
        attacker, bystander = "203.0.113.7", "203.0.113.8"
        statuses = []
        for n in range(limit * 2):
            forwarded = f"10.0.{n}.{n}, {attacker}"  # the attacker's own spoofed entry first
            status, _ = await _get(page, {**basic(f"apt_guess{n:039d}"), "X-Forwarded-For": forwarded})
            statuses.append(status)
        faults.inject("token guess behind a proxy", len(statuses))
        assert statuses == [401] * limit + [429] * limit, statuses
        assert (await _get(page, {**basic(good), "X-Forwarded-For": attacker}))[0] == 429
        # Another forwarded client, over the very same TCP peer (the reverse proxy), is unaffected.
        assert (await _get(page, {**basic(good), "X-Forwarded-For": f"{attacker}, {bystander}"}))[0] == 200
        async with http.get(proxy.url + "/-/api/v1/audit?action=auth_failure", headers=bearer(ADMIN)) as resp:
            records = (await resp.json())["records"]
        assert records and {r["client"] for r in records} == {attacker}
        faults.zero("unauthorized_ok", sum(s < 400 for s in statuses), "guesses answered 2xx")
    finally:
        await proxy.stop()
