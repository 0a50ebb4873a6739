"""The fake nuget.org feed against the real NuGet client (NuGet.exe 5.8 on Mono), no proxy involved.

These pin down two things the NuGet proxy tests will build on: that :class:`FakeNuGetFeed` is
faithful enough for the real client to install, search, push and delete against it, and what the
client actually sends (which service-index resources it reads, which documents it fetches, which
headers and multipart fields a push carries). Skipped as a whole where Mono or NuGet.exe is
missing (``scripts/install-nuget`` installs both).
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDict

from tests.fakes.nuget import (
    FakeNuGetFeed,
    build_nupkg,
    is_semver2,
    normalize_range,
    normalize_version,
    nupkg_filename,
    version_key,
)
from tests.fakes.server import Fault
from tests.nuget_clients import NUGET_MISSING, nuget, write_nuget_config

pytestmark = pytest.mark.skipif(NUGET_MISSING is not None, reason=NUGET_MISSING or "")

API_KEY = "test-key"


@dataclass(frozen=True)
class Nupkgs:
    """Packages built once per session: Alpha depends on Beta (1.0.0 or later)."""

    alpha: Path  # Acme.Alpha 1.0.0 -> Acme.Beta [1.0.0, )
    beta: Path  # Acme.Beta 1.0.0
    beta_11: Path  # Acme.Beta 1.1.0
    beta_rc: Path  # Acme.Beta 2.0.0-rc.1 (SemVer 2.0.0: a dotted pre-release label)
    gamma: Path  # Acme.Gamma 2.0.0, pushed by the tests


@pytest.fixture(scope="session")
def nupkgs(tmp_path_factory: pytest.TempPathFactory) -> Nupkgs:
    root = tmp_path_factory.mktemp("nupkgs")
    return Nupkgs(
        alpha=build_nupkg(root, "Acme.Alpha", "1.0.0", [("Acme.Beta", "1.0.0")]),
        beta=build_nupkg(root, "Acme.Beta", "1.0.0"),
        beta_11=build_nupkg(root, "Acme.Beta", "1.1.0"),
        beta_rc=build_nupkg(root, "Acme.Beta", "2.0.0-rc.1"),
        gamma=build_nupkg(root, "Acme.Gamma", "2.0.0", description="pushed by a test"),
    )


@pytest.fixture
async def feed(nupkgs: Nupkgs) -> AsyncIterator[FakeNuGetFeed]:
    """A feed with Acme.Alpha 1.0.0 and Acme.Beta 1.0.0; pushes need :data:`API_KEY`."""
    async with FakeNuGetFeed(api_key=API_KEY) as fake:
        await fake.add_package_async(nupkgs.alpha)
        await fake.add_package_async(nupkgs.beta)
        yield fake


def _sha512_b64(path: Path) -> str:
    return base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


async def _exists(path: Path) -> bool:
    return await asyncio.to_thread(path.is_file)


def _paths(feed: FakeNuGetFeed, since: int = 0) -> list[str]:
    return [f"{r.method} {r.path}" for r in feed.requests[since:]]


# ------------------------------------------------------------------------ install


async def test_install_resolves_the_dependency_through_the_registration(
    feed: FakeNuGetFeed, tmp_path: Path
) -> None:
    config = await write_nuget_config(tmp_path / "NuGet.Config", feed.url)
    out = tmp_path / "out"
    args = ["install", "Acme.Alpha", "-Version", "1.0.0", "-OutputDirectory", str(out), "-Source", feed.url]
    run = await nuget(args, cwd=tmp_path, config_file=config)
    assert run.ok, run.output
    for name in ("Acme.Alpha.1.0.0", "Acme.Beta.1.0.0"):
        assert await _exists(out / name / f"{name}.nupkg"), run.output
    installed = await asyncio.to_thread(_sha512_b64, out / "Acme.Beta.1.0.0" / "Acme.Beta.1.0.0.nupkg")
    beta = feed.get("Acme.Beta", "1.0.0")
    assert beta is not None and installed == beta.sha512
    # NuGet.exe 5.8: service index, then the SemVer 2.0.0 registration hive (gzipped) for the
    # dependency graph, then the flat container for the bytes (both at once, in either order).
    # Never the flat container's version list, nor search.
    seen = _paths(feed)
    assert seen[:3] == [
        "GET /v3/index.json",
        "GET /v3/registration5-gz-semver2/acme.alpha/index.json",
        "GET /v3/registration5-gz-semver2/acme.beta/index.json",
    ]
    assert sorted(seen[3:]) == [
        "GET /v3-flatcontainer/acme.alpha/1.0.0/acme.alpha.1.0.0.nupkg",
        "GET /v3-flatcontainer/acme.beta/1.0.0/acme.beta.1.0.0.nupkg",
    ]
    headers = feed.requests[1].headers
    assert headers["User-Agent"].startswith("NuGet Command Line/5.8.0")
    assert headers["X-NuGet-Client-Version"] == "5.8.0"
    assert "gzip" in headers["Accept-Encoding"]
    assert "X-NuGet-Session-Id" in headers


async def test_install_follows_linked_registration_pages(nupkgs: Nupkgs, tmp_path: Path) -> None:
    """Beyond ``inline_threshold`` versions the index only links its pages (nuget.org: 128)."""
    async with FakeNuGetFeed(inline_threshold=2, page_size=2) as feed:
        for path in (nupkgs.alpha, nupkgs.beta, nupkgs.beta_11, nupkgs.beta_rc):
            await feed.add_package_async(path)
        config = await write_nuget_config(tmp_path / "NuGet.Config", feed.url)
        out = tmp_path / "out"
        run = await nuget(
            ["install", "Acme.Alpha", "-Version", "1.0.0", "-OutputDirectory", str(out)],
            cwd=tmp_path,
            config_file=config,
        )
        assert run.ok, run.output
        # DependencyBehavior Lowest: Beta [1.0.0, ) resolves to 1.0.0, found on a linked page.
        assert await _exists(out / "Acme.Beta.1.0.0" / "Acme.Beta.1.0.0.nupkg"), run.output
        seen = _paths(feed)
        assert "GET /v3/registration5-gz-semver2/acme.beta/page/1.0.0/1.1.0.json" in seen
        assert "GET /v3/registration5-gz-semver2/acme.beta/page/2.0.0-rc.1/2.0.0-rc.1.json" in seen
        assert not any("/page/" in p for p in seen if "acme.alpha" in p)  # one version: inlined

        # No version asked: the highest listed stable version.
        run = await nuget(
            ["install", "Acme.Beta", "-OutputDirectory", str(tmp_path / "latest")],
            cwd=tmp_path,
            config_file=config,
        )
        assert run.ok, run.output
        assert await _exists(tmp_path / "latest" / "Acme.Beta.1.1.0" / "Acme.Beta.1.1.0.nupkg"), run.output


async def test_packages_config_restore_downloads_straight_from_the_flat_container(
    feed: FakeNuGetFeed, tmp_path: Path
) -> None:
    """An exact version needs no metadata: only the service index and the .nupkg."""
    project = tmp_path / "project" / "packages.config"
    text = (
        '<?xml version="1.0" encoding="utf-8"?>\n<packages>\n'
        '  <package id="Acme.Beta" version="1.0.0" targetFramework="net48" />\n</packages>\n'
    )
    await asyncio.to_thread(project.parent.mkdir)
    await asyncio.to_thread(project.write_text, text)
    config = await write_nuget_config(tmp_path / "NuGet.Config", feed.url)
    out = tmp_path / "packages"
    run = await nuget(
        ["restore", str(project), "-PackagesDirectory", str(out)], cwd=tmp_path, config_file=config
    )
    assert run.ok, run.output
    assert await _exists(out / "Acme.Beta.1.0.0" / "Acme.Beta.1.0.0.nupkg"), run.output
    assert _paths(feed) == [
        "GET /v3/index.json",
        "GET /v3-flatcontainer/acme.beta/1.0.0/acme.beta.1.0.0.nupkg",
    ]


async def test_a_broken_download_fails_the_install(feed: FakeNuGetFeed, tmp_path: Path) -> None:
    """The fake's faults reach the client: a truncated .nupkg is not installed."""
    feed.faults[feed.nupkg_path("Acme.Beta", "1.0.0")] = Fault("truncate")
    config = await write_nuget_config(tmp_path / "NuGet.Config", feed.url)
    out = tmp_path / "out"
    run = await nuget(
        ["install", "Acme.Beta", "-Version", "1.0.0", "-OutputDirectory", str(out)],
        cwd=tmp_path,
        config_file=config,
    )
    assert not run.ok, run.output
    assert not await _exists(out / "Acme.Beta.1.0.0" / "Acme.Beta.1.0.0.nupkg")


# ------------------------------------------------------------------------ search and list


async def test_search_uses_the_search_service(feed: FakeNuGetFeed, nupkgs: Nupkgs, tmp_path: Path) -> None:
    await feed.add_package_async(nupkgs.beta_rc)
    config = await write_nuget_config(tmp_path / "NuGet.Config", feed.url)
    run = await nuget(["search", "acme", "-Source", feed.url], cwd=tmp_path, config_file=config)
    assert run.ok, run.output
    assert "> Acme.Alpha | 1.0.0" in run.output
    assert "> Acme.Beta | 1.0.0" in run.output
    search = [r for r in feed.requests if r.path == "/query"]
    assert [r.query for r in search] == ["q=acme&skip=0&take=20&prerelease=false&semVerLevel=2.0.0"]

    # search has no -ConfigFile option: nuget() puts the config in the run's own user config,
    # so a search without -Source still asks the feed under test only.
    run = await nuget(["search", "beta", "-PreRelease"], cwd=tmp_path, config_file=config)
    assert run.ok, run.output
    assert "> Acme.Beta | 2.0.0-rc.1" in run.output


async def test_list_is_unsupported_on_a_v3_only_feed(feed: FakeNuGetFeed, tmp_path: Path) -> None:
    """NuGet.exe's ``list`` needs the V2 (OData) feed, which nuget.org lists as LegacyGallery; the
    fake serves only v3, so the client declines without asking anything but the service index."""
    config = await write_nuget_config(tmp_path / "NuGet.Config", feed.url)
    run = await nuget(["list", "acme", "-Source", feed.url], cwd=tmp_path, config_file=config)
    assert run.ok, run.output
    assert "does not support listing packages" in run.output
    assert _paths(feed) == ["GET /v3/index.json"]


# ------------------------------------------------------------------------ push and delete


async def test_push_then_install_and_duplicates(feed: FakeNuGetFeed, nupkgs: Nupkgs, tmp_path: Path) -> None:
    config = await write_nuget_config(tmp_path / "NuGet.Config", feed.url)
    run = await nuget(
        ["push", str(nupkgs.gamma), "-Source", feed.url, "-ApiKey", API_KEY], cwd=tmp_path, config_file=config
    )
    assert run.ok, run.output
    assert "Your package was pushed." in run.output
    push = feed.pushes[-1]
    assert (push.status, push.package) == (201, ("Acme.Gamma", "2.0.0"))
    # What NuGet.exe 5.8 sends: PUT {PackagePublish}/ (a trailing slash added), the key in
    # X-NuGet-ApiKey, a chunked multipart/form-data body with one part named "package".
    assert [r.path for r in feed.requests if r.method == "PUT"] == ["/api/v2/package/"]
    assert push.headers["X-NuGet-ApiKey"] == API_KEY
    assert push.headers["Content-Type"].startswith("multipart/form-data; boundary=")
    assert push.headers.get("Transfer-Encoding") == "chunked"
    size = (await asyncio.to_thread(nupkgs.gamma.stat)).st_size
    assert push.parts == (("package", "package.nupkg", "application/octet-stream", size),)

    out = tmp_path / "out"
    run = await nuget(
        ["install", "Acme.Gamma", "-Version", "2.0.0", "-OutputDirectory", str(out)],
        cwd=tmp_path,
        config_file=config,
    )
    assert run.ok, run.output
    assert await _exists(out / "Acme.Gamma.2.0.0" / "Acme.Gamma.2.0.0.nupkg")

    run = await nuget(["push", str(nupkgs.gamma), "-ApiKey", API_KEY], cwd=tmp_path, config_file=config)
    assert not run.ok and "409 (Conflict)" in run.output, run.output
    run = await nuget(
        ["push", str(nupkgs.gamma), "-ApiKey", API_KEY, "-SkipDuplicate"], cwd=tmp_path, config_file=config
    )
    assert run.ok and "already exists" in run.output, run.output


async def test_push_with_a_wrong_key_is_forbidden(
    feed: FakeNuGetFeed, nupkgs: Nupkgs, tmp_path: Path
) -> None:
    config = await write_nuget_config(tmp_path / "NuGet.Config", feed.url)
    run = await nuget(["push", str(nupkgs.gamma), "-ApiKey", "wrong"], cwd=tmp_path, config_file=config)
    assert not run.ok and "403 (Forbidden)" in run.output, run.output
    assert feed.get("Acme.Gamma", "2.0.0") is None
    assert len(feed.pushes) == 1  # a 4xx is not retried (a 5xx is, twice)


async def test_api_key_from_the_config(feed: FakeNuGetFeed, nupkgs: Nupkgs, tmp_path: Path) -> None:
    """``write_nuget_config(api_key=...)`` stores the key (encrypted, via ``nuget setApiKey``)."""
    config = await write_nuget_config(tmp_path / "NuGet.Config", feed.url, api_key=API_KEY)
    run = await nuget(["push", str(nupkgs.gamma)], cwd=tmp_path, config_file=config)
    assert run.ok, run.output
    assert feed.pushes[-1].headers["X-NuGet-ApiKey"] == API_KEY


async def test_delete_unlists_like_nuget_org(feed: FakeNuGetFeed, tmp_path: Path) -> None:
    config = await write_nuget_config(tmp_path / "NuGet.Config", feed.url)
    run = await nuget(
        ["delete", "Acme.Beta", "1.0.0", "-Source", feed.url, "-ApiKey", API_KEY],
        cwd=tmp_path,
        config_file=config,
    )
    assert run.ok, run.output
    deletes = [r for r in feed.requests if r.method == "DELETE"]
    assert [r.path for r in deletes] == ["/api/v2/package/Acme.Beta/1.0.0"]  # id as typed
    assert deletes[0].headers["X-NuGet-ApiKey"] == API_KEY
    beta = feed.get("Acme.Beta", "1.0.0")
    assert beta is not None and not beta.listed

    # Unlisted: gone from search, still installable by exact version (so Alpha still installs).
    run = await nuget(["search", "acme", "-Source", feed.url], cwd=tmp_path, config_file=config)
    assert run.ok and "Acme.Beta" not in run.output, run.output
    out = tmp_path / "out"
    run = await nuget(
        ["install", "Acme.Alpha", "-Version", "1.0.0", "-OutputDirectory", str(out)],
        cwd=tmp_path,
        config_file=config,
    )
    assert run.ok, run.output
    assert await _exists(out / "Acme.Beta.1.0.0" / "Acme.Beta.1.0.0.nupkg")

    run = await nuget(["delete", "Acme.Nope", "1.0.0", "-ApiKey", API_KEY], cwd=tmp_path, config_file=config)
    assert not run.ok and "404 (Not Found)" in run.output, run.output


# ------------------------------------------------------------------------ the documents themselves


async def test_documents_as_nuget_org_serves_them(feed: FakeNuGetFeed, nupkgs: Nupkgs) -> None:
    """What a proxy will see upstream: gzip on the gz hives, linked pages, hashes, ETags, 404s."""
    await feed.add_package_async(nupkgs.beta_rc)
    async with aiohttp.ClientSession(auto_decompress=False) as http:

        async def get(path: str, **headers: str) -> tuple[int, CIMultiDict[str], bytes]:
            async with http.get(feed.origin + path, headers=headers) as resp:
                return resp.status, CIMultiDict(resp.headers), await resp.read()

        status, _, body = await get("/v3/index.json")
        assert status == 200
        types = {r["@type"]: r["@id"] for r in json.loads(body)["resources"]}
        assert types["PackageBaseAddress/3.0.0"] == feed.flat_container
        assert types["RegistrationsBaseUrl/3.6.0"] == feed.registration_base()
        assert types["RegistrationsBaseUrl/Versioned"] == feed.registration_base()
        assert types["PackagePublish/2.0.0"] == feed.publish_url
        assert types["SearchQueryService/3.5.0"] == f"{feed.origin}/query"

        # gz hives are gzipped even for a client that does not ask; semver1 hides 2.0.0-rc.1.
        status, headers, body = await get(
            feed.registration_path("Acme.Beta"), **{"Accept-Encoding": "identity"}
        )
        assert (status, headers["Content-Encoding"]) == (200, "gzip")
        index = json.loads(gzip.decompress(body))
        versions = [leaf["catalogEntry"]["version"] for leaf in index["items"][0]["items"]]
        assert versions == ["1.0.0", "2.0.0-rc.1"]
        status, headers, body = await get(feed.registration_path("Acme.Beta", "registration5-semver1"))
        assert status == 200 and "Content-Encoding" not in headers
        assert [leaf["catalogEntry"]["version"] for leaf in json.loads(body)["items"][0]["items"]] == [
            "1.0.0"
        ]

        # ETag revalidation.
        etag = headers["ETag"]
        status, _, _ = await get(
            feed.registration_path("Acme.Beta", "registration5-semver1"), **{"If-None-Match": etag}
        )
        assert status == 304

        # The catalog leaf carries the package's SHA-512.
        leaf_url = index["items"][0]["items"][0]["catalogEntry"]["@id"]
        status, _, body = await get(leaf_url.removeprefix(feed.origin))
        leaf = json.loads(body)
        expected = await asyncio.to_thread(_sha512_b64, nupkgs.beta)
        assert (leaf["packageHash"], leaf["packageHashAlgorithm"]) == (expected, "SHA512")

        # Flat container: lower-case only, like the blob store behind nuget.org.
        status, _, body = await get(feed.versions_path("Acme.Beta"))
        assert json.loads(body) == {"versions": ["1.0.0", "2.0.0-rc.1"]}
        assert (await get("/v3-flatcontainer/Acme.Beta/index.json"))[0] == 404
        status, headers, _ = await get(feed.nuspec_path("Acme.Beta", "1.0.0"))
        assert status == 200 and headers["Content-Type"] == "text/xml"


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("1.0", "1.0.0"),
        ("01.002.0003", "1.2.3"),
        ("1.2.3.0", "1.2.3"),
        ("1.2.3.4", "1.2.3.4"),
        ("1.0.0-Beta.01", "1.0.0-Beta.01"),
        ("1.0.0+build.5", "1.0.0"),
        ("2", "2.0.0"),
    ],
)
def test_version_normalization(raw: str, normalized: str) -> None:
    assert normalize_version(raw) == normalized


def test_version_helpers() -> None:
    assert nupkg_filename("Acme.Beta", "1.0.0-RC.1+meta") == "acme.beta.1.0.0-rc.1.nupkg"
    assert normalize_range("1.0") == "[1.0.0, )"
    assert normalize_range("[1.0,2.0)") == "[1.0.0, 2.0.0)"
    assert normalize_range("[1.5]") == "[1.5.0]"
    assert is_semver2("1.0.0-rc.1") and is_semver2("1.0.0+git") and not is_semver2("1.0.0-rc1")
    ordered = ["1.0.0-alpha", "1.0.0-alpha.2", "1.0.0-alpha.10", "1.0.0-beta", "1.0.0", "1.0.0.1", "1.1.0"]
    assert sorted(ordered[4:] + ordered[:4], key=version_key) == ordered
