"""The admin API (/-/api/v1): domains, repositories, packages and versions, origin rules, quarantine.

Against the in-process proxy of ``conftest.py``: domain ``default`` with ``public`` (upstream: the
fake index) and ``team`` (upstream: ``public``). Errors are JSON bodies with ``error``,
``message`` and ``request_id``, rendered by the one error middleware.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Dists, RunningProxy
from tests.fakes.dists import build_wheel, sha256_file

JSON_PAGE = {"Accept": "application/vnd.pypi.simple.v1+json"}


class Api:
    """A small client for the admin API of one proxy."""

    def __init__(self, http: aiohttp.ClientSession, proxy: RunningProxy) -> None:
        self.http = http
        self.base = f"{proxy.url}/-/api/v1"

    async def call(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        async with self.http.request(method, self.base + path, json=body, **kw) as resp:
            if resp.status == 204:
                assert await resp.read() == b""
                return 204, None
            assert resp.content_type == "application/json", await resp.text()
            return resp.status, await resp.json()

    async def error(self, method: str, path: str, status: int, body: Any = None, **kw: Any) -> str:
        """Call, expect ``status`` with a JSON error body, and return its message."""
        got, doc = await self.call(method, path, body, **kw)
        assert got == status, doc
        assert set(doc) >= {"error", "message", "request_id"}, doc
        assert doc["request_id"] not in ("", "-")
        message: str = doc["message"]
        return message


@pytest.fixture
async def api(http: aiohttp.ClientSession, proxy: RunningProxy) -> Api:
    return Api(http, proxy)


REPOS = "/domains/default/repositories"


async def _wheel(root: Path, name: str, version: str) -> Path:
    return await asyncio.to_thread(build_wheel, root, name, version)


async def publish(http: aiohttp.ClientSession, proxy: RunningProxy, repo: str, wheel: Path) -> None:
    """Upload a wheel the way twine does (the legacy multipart API)."""
    data = await asyncio.to_thread(wheel.read_bytes)
    name, version = wheel.name.split("-")[:2]
    form = aiohttp.FormData()
    for key, value in {
        ":action": "file_upload",
        "protocol_version": "1",
        "name": name,
        "version": version,
        "filetype": "bdist_wheel",
        "pyversion": "py3",
        "metadata_version": "2.1",
        "sha256_digest": hashlib.sha256(data).hexdigest(),
    }.items():
        form.add_field(key, value)
    form.add_field("content", data, filename=wheel.name, content_type="application/octet-stream")
    async with http.post(f"{proxy.url}/default/pypi/{repo}/", data=form) as resp:
        assert resp.status == 201, await resp.text()


async def _page_files(http: aiohttp.ClientSession, proxy: RunningProxy, repo: str, project: str) -> list[str]:
    async with http.get(proxy.simple(repo) + f"{project}/", headers=JSON_PAGE) as resp:
        if resp.status == 404:
            return []
        assert resp.status == 200, await resp.text()
        page = await resp.json(content_type=None)
    return [f["filename"] for f in page["files"]]


async def _download(http: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with http.get(url) as resp:
        return resp.status, await resp.read()


# --- domains -----------------------------------------------------------------------------------


async def test_domains_are_listed_created_and_deleted(api: Api) -> None:
    status, doc = await api.call("GET", "/domains")
    assert status == 200
    assert doc == {"domains": [{"name": "default", "repositories": ["public", "team"]}]}

    status, created = await api.call("POST", "/domains", {"name": "acme"})
    assert status == 201
    assert created == {"name": "acme", "repositories": []}
    assert "already exists" in await api.error("POST", "/domains", 409, {"name": "acme"})
    assert (await api.call("GET", "/domains/acme")) == (200, created)
    assert "'name'" in await api.error("POST", "/domains", 400, {})
    assert "invalid domain name" in await api.error("POST", "/domains", 400, {"name": "Not_Valid"})
    assert "still has repositories" in await api.error("DELETE", "/domains/default", 409)

    assert (await api.call("DELETE", "/domains/acme")) == (204, None)
    assert "'acme' does not exist" in await api.error("GET", "/domains/acme", 404)
    assert "'acme' does not exist" in await api.error("DELETE", "/domains/acme", 404)


# --- repositories ------------------------------------------------------------------------------


async def test_repositories_are_created_described_changed_and_deleted(api: Api, proxy: RunningProxy) -> None:
    body = {"name": "ml", "upstreams": ["public"], "description": "ML team", "min_release_age": "3d"}
    async with api.http.post(f"{api.base}{REPOS}", json=body) as resp:
        assert resp.status == 201
        created = await resp.json()
        assert resp.headers["Location"] == f"/-/api/v1{REPOS}/ml"
    assert created == {
        "domain": "default",
        "name": "ml",
        "description": "ML team",
        "upstreams": ["public"],
        "min_release_age": 3 * 86400,
        "allow_redeploy": False,
        "anonymous_read": False,
        "downstreams": [],
        "from_config": False,
    }
    assert "already exists" in await api.error("POST", REPOS, 409, {"name": "ml"})

    status, listing = await api.call("GET", REPOS)
    assert status == 200
    assert [r["name"] for r in listing["repositories"]] == ["ml", "public", "team"]
    status, public = await api.call("GET", f"{REPOS}/public")
    assert status == 200
    assert public["upstreams"] == ["fake"]
    assert public["downstreams"] == ["ml", "team"]
    assert public["from_config"] is True

    status, changed = await api.call("PUT", f"{REPOS}/ml/upstreams", {"upstreams": ["team", "fake"]})
    assert status == 200
    assert changed["upstreams"] == ["team", "fake"]
    assert changed["description"] == "ML team"  # the rest is kept
    assert (await api.call("GET", f"{REPOS}/ml"))[1] == changed

    # The new repository serves at once, through its chain.
    async with api.http.get(proxy.simple("ml") + "beta/", headers=JSON_PAGE) as resp:
        assert resp.status == 200

    assert (await api.call("DELETE", f"{REPOS}/ml")) == (204, None)
    assert "'ml' does not exist" in await api.error("GET", f"{REPOS}/ml", 404)
    async with api.http.get(proxy.simple("ml") + "beta/") as resp:
        assert resp.status == 404


async def test_a_repository_without_settings_gets_the_defaults(api: Api) -> None:
    status, created = await api.call("POST", REPOS, {"name": "scratch", "min_release_age": 90})
    assert status == 201
    assert created["upstreams"] == []
    assert created["description"] == ""
    assert created["min_release_age"] == 90


async def test_an_upstream_cycle_is_refused_naming_it(api: Api) -> None:
    message = await api.error("PUT", f"{REPOS}/public/upstreams", 400, {"upstreams": ["team"]})
    assert "cycle" in message
    assert "public -> team -> public" in message or "team -> public -> team" in message
    assert "own upstream" in await api.error("PUT", f"{REPOS}/team/upstreams", 400, {"upstreams": ["team"]})
    assert (await api.call("GET", f"{REPOS}/public"))[1]["upstreams"] == ["fake"]  # nothing changed


async def test_concurrent_changes_cannot_form_a_cycle_together(api: Api) -> None:
    for name in ("aa", "bb"):
        assert (await api.call("POST", REPOS, {"name": name}))[0] == 201
    results = await asyncio.gather(
        api.call("PUT", f"{REPOS}/aa/upstreams", {"upstreams": ["bb"]}),
        api.call("PUT", f"{REPOS}/bb/upstreams", {"upstreams": ["aa"]}),
    )
    assert sorted(status for status, _ in results) == [200, 400]
    aa = (await api.call("GET", f"{REPOS}/aa"))[1]["upstreams"]
    bb = (await api.call("GET", f"{REPOS}/bb"))[1]["upstreams"]
    assert [] in (aa, bb)


async def test_an_unknown_upstream_is_refused(api: Api) -> None:
    message = await api.error("POST", REPOS, 400, {"name": "new", "upstreams": ["nowhere"]})
    assert "'nowhere'" in message
    message = await api.error("POST", REPOS, 400, {"name": "new", "upstreams": ["public", "public"]})
    assert "listed twice" in message
    assert "'new' does not exist" in await api.error("GET", f"{REPOS}/new", 404)


async def test_a_repository_that_is_an_upstream_cannot_be_deleted(api: Api) -> None:
    message = await api.error("DELETE", f"{REPOS}/public", 409)
    assert "upstream of team" in message
    assert (await api.call("GET", f"{REPOS}/public"))[0] == 200
    assert (await api.call("DELETE", f"{REPOS}/team")) == (204, None)
    assert (await api.call("DELETE", f"{REPOS}/public")) == (204, None)
    assert (await api.call("GET", REPOS)) == (200, {"repositories": []})


async def test_unknown_names_are_json_404s(api: Api) -> None:
    status, doc = await api.call("GET", "/domains/nope/repositories")
    assert status == 404
    assert doc["error"] == "not_found"
    assert doc["domain"] == "nope"
    assert "domain 'nope' does not exist" in doc["message"]

    status, doc = await api.call("GET", f"{REPOS}/nope")
    assert status == 404
    assert doc["repository"] == "nope"
    assert "'nope' does not exist in domain 'default'" in doc["message"]

    for path in (
        f"{REPOS}/nope/packages",
        f"{REPOS}/nope/origin-rules",
        f"{REPOS}/nope/quarantine",
        f"{REPOS}/nope/packages/pypi/beta",
        "/domains/nope/repositories/team/packages",
    ):
        assert "does not exist" in await api.error("GET", path, 404)
    assert "unknown format 'cargo'" in await api.error("GET", f"{REPOS}/team/packages/cargo/beta", 404)
    assert "unknown format 'cargo'" in await api.error("GET", f"{REPOS}/team/packages?format=cargo", 404)
    assert "no admin endpoint" in await api.error("GET", "/nothing/here", 404)
    assert "not a valid Python project name" in await api.error(
        "GET", f"{REPOS}/team/packages/pypi/-bad-", 400
    )


async def test_a_wrong_method_is_a_405_naming_the_allowed_ones(api: Api) -> None:
    async with api.http.patch(f"{api.base}{REPOS}/team") as resp:
        assert resp.status == 405
        assert set(resp.headers["Allow"].split(",")) == {"GET", "HEAD", "DELETE"}
        assert (await resp.json())["error"] == "method_not_allowed"


@pytest.mark.parametrize(
    ("data", "said"),
    [
        (b"", "JSON object body"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"upstreams": ["public"]}', "field 'name' is required"),
        (b'{"name": 7}', "field 'name' must be a string"),
        (b'{"name": "x1", "upstreams": "public"}', "field 'upstreams' must be a list"),
        (b'{"name": "x1", "upstream": ["public"]}', "unknown field 'upstream'"),
        (b'{"name": "x1", "min_release_age": "3 days"}', "min_release_age"),
        (b'{"name": "x1", "min_release_age": -1}', "min_release_age"),
        (b'{"name": "x1", "description": ["a"]}', "field 'description' must be a string"),
    ],
)
async def test_bad_bodies_are_400s_saying_which_field(api: Api, data: bytes, said: str) -> None:
    headers = {"Content-Type": "application/json"}
    async with api.http.post(f"{api.base}{REPOS}", data=data, headers=headers) as resp:
        assert resp.status == 400
        doc = await resp.json()
    assert doc["error"] == "bad_request"
    assert said in doc["message"]


# --- origin rules and quarantine ---------------------------------------------------------------


async def test_origin_rules_are_set_listed_and_deleted(api: Api, proxy: RunningProxy) -> None:
    rules = f"{REPOS}/public/origin-rules"
    status, rule = await api.call(
        "PUT", f"{rules}/pypi", {"pattern": "Acme_Corp.*", "publish": "ALLOW", "upstream": "BLOCK"}
    )
    assert status == 200
    assert rule == {"format": "pypi", "pattern": "acme-corp-*", "publish": "ALLOW", "upstream": "BLOCK"}
    status, beta = await api.call(
        "PUT", f"{rules}/pypi", {"pattern": "Beta", "publish": "BLOCK", "upstream": "BLOCK"}
    )
    assert beta["pattern"] == "beta"

    assert (await api.call("GET", f"{rules}?format=pypi")) == (200, {"rules": [rule, beta]})
    assert (await api.call("GET", rules)) == (200, {"rules": [rule, beta]})
    assert (await api.call("GET", f"{REPOS}/team/origin-rules")) == (200, {"rules": []})

    # The rule takes effect at once: beta's upstream versions are hidden in public, saying why.
    async with api.http.get(proxy.simple() + "beta/") as resp:
        assert resp.status == 404
        assert "origin rule 'beta'" in (await resp.json())["message"]

    bad = {"pattern": "x", "publish": "MAYBE", "upstream": "ALLOW"}
    assert "ALLOW or BLOCK" in await api.error("PUT", f"{rules}/pypi", 400, bad)
    bad = {"pattern": "a*b*", "publish": "ALLOW", "upstream": "ALLOW"}
    assert "pattern" in await api.error("PUT", f"{rules}/pypi", 400, bad)
    assert "'upstream'" in await api.error("PUT", f"{rules}/pypi", 400, {"pattern": "x", "publish": "ALLOW"})
    assert "unknown format" in await api.error("PUT", f"{rules}/cargo", 404, {**bad, "pattern": "x"})

    assert "'pattern' is required" in await api.error("DELETE", f"{rules}/pypi", 400)
    assert (await api.call("DELETE", f"{rules}/pypi", params={"pattern": "beta"})) == (204, None)
    assert "no origin rule" in await api.error("DELETE", f"{rules}/pypi", 404, params={"pattern": "beta"})
    assert (await api.call("DELETE", f"{rules}/pypi", params={"pattern": "ACME_corp-*"})) == (204, None)
    assert (await api.call("GET", rules)) == (200, {"rules": []})
    async with api.http.get(proxy.simple() + "beta/") as resp:
        assert resp.status == 200


async def test_quarantine_is_set_listed_and_lifted(api: Api, proxy: RunningProxy, dists: Dists) -> None:
    quarantine = f"{REPOS}/public/quarantine"
    url = proxy.files("beta", dists.beta.name)
    status, entry = await api.call("PUT", f"{quarantine}/pypi", {"pattern": "Beta@1.0", "reason": "CVE-0"})
    assert status == 200
    # The answer also says which held versions depend on what was quarantined (none held here).
    assert entry.pop("dependents") == {"versions": ["1.0"], "dependents": []}
    assert entry == {"format": "pypi", "pattern": "beta@1.0", "reason": "CVE-0"}
    status, wild = await api.call("PUT", f"{quarantine}/pypi", {"pattern": "evil*@6.6.*"})
    assert wild.pop("dependents")["dependents"] == []
    assert wild == {"format": "pypi", "pattern": "evil*@6.6.*", "reason": ""}
    assert (await api.call("GET", f"{quarantine}?format=pypi")) == (200, {"entries": [entry, wild]})

    async with api.http.get(url) as resp:
        assert resp.status == 404
        doc = await resp.json()
    assert doc["error"] == "blocked_by_origin"
    assert "quarantined" in doc["message"] and "CVE-0" in doc["message"]

    assert "pattern" in await api.error("PUT", f"{quarantine}/pypi", 400, {"pattern": "@1.0"})
    assert "pattern" in await api.error("PUT", f"{quarantine}/pypi", 400, {"pattern": "beta@"})
    assert "'pattern' is required" in await api.error("PUT", f"{quarantine}/pypi", 400, {"reason": "x"})

    assert (await api.call("DELETE", f"{quarantine}/pypi", params={"pattern": "BETA@1.0"})) == (204, None)
    assert "no quarantine entry" in await api.error(
        "DELETE", f"{quarantine}/pypi", 404, params={"pattern": "beta@1.0"}
    )
    assert (await api.call("GET", quarantine)) == (200, {"entries": [wild]})
    status, body = await _download(api.http, url)
    assert status == 200
    assert hashlib.sha256(body).hexdigest() == await asyncio.to_thread(sha256_file, dists.beta)


# --- packages and versions ---------------------------------------------------------------------


async def test_a_cached_package_is_listed_and_described(api: Api, proxy: RunningProxy, dists: Dists) -> None:
    assert (await api.call("GET", f"{REPOS}/public/packages")) == (200, {"packages": []})
    status, _ = await _download(api.http, proxy.files("beta", dists.beta.name))
    assert status == 200

    cached = {"format": "pypi", "package": "beta", "origin": "cached"}
    assert (await api.call("GET", f"{REPOS}/public/packages")) == (200, {"packages": [cached]})
    assert (await api.call("GET", f"{REPOS}/public/packages?format=pypi")) == (200, {"packages": [cached]})

    status, doc = await api.call("GET", f"{REPOS}/public/packages/pypi/BETA")  # names are normalized
    assert status == 200
    assert doc["package"] == "beta"
    assert doc["format"] == "pypi"
    assert doc["origin"] == {"rule": None, "upstream_blocked": None, "publish_blocked": None}
    [version] = doc["versions"]
    assert version["version"] == "1.0"
    assert version["status"] == "Cached"
    [asset] = version["assets"]
    assert asset["filename"] == dists.beta.name
    assert asset["sha256"] == await asyncio.to_thread(sha256_file, dists.beta)
    assert asset["size"] == (await asyncio.to_thread(dists.beta.stat)).st_size
    assert asset["hosted"] is False
    assert asset["upstream"] == "fake"

    assert "no versions" in await api.error("GET", f"{REPOS}/public/packages/pypi/alpha", 404)


async def test_a_published_version_is_unlisted_archived_copied_and_deleted(
    api: Api, proxy: RunningProxy, tmp_path: Path
) -> None:
    wheel = await _wheel(tmp_path, "internal-lib", "1.0")
    digest = await asyncio.to_thread(sha256_file, wheel)
    await publish(api.http, proxy, "team", wheel)
    version = f"{REPOS}/team/packages/pypi/internal-lib/versions/1.0"
    file_url = proxy.files("internal-lib", wheel.name, repo="team")

    status, listed = await api.call("GET", f"{REPOS}/team/packages")
    assert listed == {"packages": [{"format": "pypi", "package": "internal-lib", "origin": "published"}]}
    status, doc = await api.call("GET", f"{REPOS}/team/packages/pypi/Internal_Lib")
    assert status == 200
    [entry] = doc["versions"]
    assert entry["status"] == "Published"
    assets = {a["filename"]: a for a in entry["assets"]}
    assert set(assets) == {wheel.name, f"{wheel.name}.metadata"}  # the wheel and its PEP 658 metadata
    assert assets[wheel.name]["sha256"] == digest
    assert assets[wheel.name]["hosted"] is True
    assert await _page_files(api.http, proxy, "team", "internal-lib") == [wheel.name]

    # Unlisted: gone from the index page, still downloadable by its URL.
    status, changed = await api.call("PUT", f"{version}/status", {"status": "Unlisted"})
    assert status == 200
    assert changed == {
        "domain": "default",
        "repository": "team",
        "format": "pypi",
        "package": "internal-lib",
        "version": "1.0",
        "status": "Unlisted",
    }
    assert wheel.name not in await _page_files(api.http, proxy, "team", "internal-lib")
    status, body = await _download(api.http, file_url)
    assert status == 200
    assert hashlib.sha256(body).hexdigest() == digest

    # Archived: kept, but not installable.
    assert (await api.call("PUT", f"{version}/status", {"status": "Archived"}))[0] == 200
    assert (await _download(api.http, file_url))[0] == 404
    status, doc = await api.call("GET", f"{REPOS}/team/packages/pypi/internal-lib")
    assert doc["versions"][0]["status"] == "Archived"

    assert "status must be one of" in await api.error("PUT", f"{version}/status", 400, {"status": "Gone"})
    assert "'status' is required" in await api.error("PUT", f"{version}/status", 400, {})
    missing = f"{REPOS}/team/packages/pypi/internal-lib/versions/9.9"
    assert "not a version" in await api.error("PUT", f"{missing}/status", 404, {"status": "Unlisted"})

    # Copy (promotion) into a repository without upstreams: visible and downloadable there.
    assert (await api.call("PUT", f"{version}/status", {"status": "Published"}))[0] == 200
    assert (await api.call("POST", REPOS, {"name": "release"}))[0] == 201
    async with api.http.post(f"{api.base}{version}/copy", json={"to": "release"}) as resp:
        assert resp.status == 201
        copied = await resp.json()
        assert resp.headers["Location"] == f"/-/api/v1{REPOS}/release/packages/pypi/internal-lib"
    assert copied["repository"] == "release"
    assert copied["status"] == "Published"
    assert copied["copied_from"] == "team"
    assert await _page_files(api.http, proxy, "release", "internal-lib") == [wheel.name]
    status, body = await _download(api.http, proxy.files("internal-lib", wheel.name, repo="release"))
    assert status == 200
    assert hashlib.sha256(body).hexdigest() == digest
    assert "already has files" in await api.error("POST", f"{version}/copy", 409, {"to": "release"})
    assert "source repository" in await api.error("POST", f"{version}/copy", 400, {"to": "team"})
    assert "'elsewhere' does not exist" in await api.error(
        "POST", f"{version}/copy", 404, {"to": "elsewhere"}
    )
    assert "'to' is required" in await api.error("POST", f"{version}/copy", 400, {})

    # Delete: the version and its files leave team; the copy in release stays.
    assert (await api.call("DELETE", version)) == (204, None)
    assert "no versions" in await api.error("GET", f"{REPOS}/team/packages/pypi/internal-lib", 404)
    assert (await _download(api.http, file_url))[0] == 404
    assert "not a version" in await api.error("DELETE", version, 404)
    assert (await _download(api.http, proxy.files("internal-lib", wheel.name, repo="release")))[0] == 200


async def test_a_recreated_repository_does_not_serve_the_deleted_ones_files(
    api: Api, proxy: RunningProxy, tmp_path: Path
) -> None:
    assert (await api.call("POST", REPOS, {"name": "short-lived"}))[0] == 201
    wheel = await _wheel(tmp_path, "fleeting", "1.0")
    await publish(api.http, proxy, "short-lived", wheel)
    url = proxy.files("fleeting", wheel.name, repo="short-lived")
    assert (await _download(api.http, url))[0] == 200  # now remembered in memory

    assert (await api.call("DELETE", f"{REPOS}/short-lived")) == (204, None)
    assert (await api.call("POST", REPOS, {"name": "short-lived"}))[0] == 201
    assert (await _download(api.http, url))[0] == 404
    assert (await api.call("GET", f"{REPOS}/short-lived/packages")) == (200, {"packages": []})


# --- the description stays true ------------------------------------------------------------------


def _documented_operations() -> set[tuple[str, str]]:
    """(method, path) pairs of docs/openapi.yaml, read by its layout (no YAML parser needed)."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml").read_text(encoding="utf-8")
    found: set[tuple[str, str]] = set()
    path = None
    for line in text.splitlines():
        if match := re.match(r"^  (/\S*):$", line):
            path = "/-/api/v1" + match.group(1)
        elif line and not line.startswith(" "):
            path = None
        elif path and (match := re.match(r"^    (get|put|post|delete|patch):$", line)):
            found.add((match.group(1).upper(), path))
    return found


async def test_the_openapi_description_lists_exactly_the_endpoints(proxy: RunningProxy) -> None:
    served = {
        (route.method, resource.canonical)
        for resource in proxy.runner.app.router.resources()
        if resource.canonical.startswith("/-/api/v1/") and "{tail" not in resource.canonical
        for route in resource
        if route.method not in ("*", "HEAD")
    }
    assert len(served) == 30
    assert await asyncio.to_thread(_documented_operations) == served
