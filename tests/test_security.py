"""Access control, tokens and the audit trail, through real clients and raw HTTP.

The proxy runs with ``server.auth`` on, a bootstrap administrator from a file, and a token
minimum lifetime lowered to one second so expiry can be tested. ``public`` (→ the fake
upstream) and ``team`` (→ public) need tokens for everything; tokens are issued through the
admin API as a deployment would. Every client path is tried with a good token and with bad
ones (none, expired, revoked, for another repository, without the permission).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.clients import installed, pip_install, twine_upload, uv_install
from tests.conftest import Dists, ProxyFactory, RunningProxy, index_rows, proxy_config, serve_config
from tests.fakes.maven import FakeMavenRepo
from tests.fakes.npm import FakeNpmRegistry, build_tarball
from tests.fakes.nuget import FakeNuGetFeed, build_nupkg
from tests.fakes.pypi import FakePyPI
from tests.maven_clients import (
    MvnRun,
    mvn,
    requires_local_repository,
    requires_mvn,
    write_project,
    write_settings,
)
from tests.npm_clients import npm
from tests.nuget_clients import NUGET_MISSING, nuget, write_nuget_config

ADMIN = "bootstrap-admin-secret-" + "z" * 40
CANARY_PREFIX = "apt_"


@pytest.fixture
async def admin_file(tmp_path: Path) -> Path:
    path = tmp_path / "admin-token"
    await asyncio.to_thread(path.write_text, ADMIN + "\n")
    return path


@pytest.fixture
async def secured(proxy_factory: ProxyFactory, pypi: FakePyPI, admin_file: Path) -> RunningProxy:
    return await proxy_factory(pypi.url, auth=True, admin_token_file=str(admin_file), token_min_duration="1s")


async def api(
    http: aiohttp.ClientSession,
    proxy: RunningProxy,
    method: str,
    path: str,
    body: Any = None,
    token: str = ADMIN,
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.request(method, proxy.url + path, json=body, headers=headers) as resp:
        text = await resp.text()
        return resp.status, json.loads(text) if text else None


async def issue(
    http: aiohttp.ClientSession,
    proxy: RunningProxy,
    *,
    repo: str | None = None,
    permissions: tuple[str, ...] = ("read",),
    duration: str = "1h",
    principal: str = "ci",
) -> tuple[str, str]:
    """(token id, secret) issued by the bootstrap administrator."""
    body = {"domain": "default", "repository": repo, "principal": principal, "permissions": list(permissions)}
    status, data = await api(http, proxy, "POST", "/-/api/v1/tokens", {**body, "duration": duration})
    assert status == 201, data
    return data["id"], data["token"]


def basic(token: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"aws:{token}".encode()).decode()}


def with_token(url: str, token: str) -> str:
    return url.replace("http://", f"http://aws:{token}@", 1)


# --- raw HTTP: every answer right ----------------------------------------------------------------


async def test_401_and_403_say_why(
    secured: RunningProxy, http: aiohttp.ClientSession, dists: Dists, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    page = secured.url + "/default/pypi/team/simple/alpha/"

    async def status_of(headers: dict[str, str]) -> tuple[int, str, str]:
        async with http.get(page, headers=headers) as resp:
            body = await resp.json() if resp.status >= 400 else {}
            return resp.status, body.get("message", ""), resp.headers.get("WWW-Authenticate", "")

    status, message, challenge = await status_of({})
    assert status == 401 and challenge.startswith("Basic realm=") and "needs a token" in message
    status, message, _ = await status_of(basic("apt_not-a-real-token"))
    assert status == 401 and "not valid" in message

    _, good = await issue(http, secured, repo="team")
    assert (await status_of(basic(good)))[0] == 200
    assert (await status_of({"Authorization": f"Bearer {good}"}))[0] == 200
    assert (await status_of({"X-NuGet-ApiKey": good}))[0] == 200

    _, short = await issue(http, secured, repo="team", duration="1s")
    await asyncio.sleep(1.2)
    status, message, _ = await status_of(basic(short))
    assert status == 401 and "expired at" in message

    revoked_id, revoked = await issue(http, secured, repo="team")
    assert (await status_of(basic(revoked)))[0] == 200
    assert (await api(http, secured, "DELETE", f"/-/api/v1/tokens/{revoked_id}"))[0] == 204
    status, message, _ = await status_of(basic(revoked))
    assert status == 401 and "was revoked" in message

    _, other = await issue(http, secured, repo="public")
    status, message, _ = await status_of(basic(other))
    assert status == 403 and "read permission on repository default/team" in message

    # Publishing needs publish; the admin API needs admin.
    data = await asyncio.to_thread(dists.beta.read_bytes)
    form = aiohttp.FormData()
    form.add_field(":action", "file_upload")
    form.add_field("name", "beta")
    form.add_field("version", "1.0")
    form.add_field("content", data, filename=dists.beta.name)
    async with http.post(secured.url + "/default/pypi/team/", data=form, headers=basic(good)) as resp:
        assert resp.status == 403 and "publish permission" in (await resp.json())["message"]
    status, body = await api(http, secured, "GET", "/-/api/v1/domains", token=good)
    assert status == 403 and "admin permission" in body["message"]
    assert (await api(http, secured, "GET", "/-/api/v1/domains", token=""))[0] == 401

    # Token listings never show secrets; the audit trail has the failures, never a token.
    status, listed = await api(http, secured, "GET", "/-/api/v1/tokens?domain=default")
    assert status == 200 and len(listed["tokens"]) == 4
    assert good not in json.dumps(listed)
    status, trail = await api(http, secured, "GET", "/-/api/v1/audit")
    actions = [(r["action"], r["result"]) for r in trail["records"]]
    assert ("auth_failure", "denied") in actions and ("denied", "denied") in actions
    assert ("token_issue", "ok") in actions and ("token_revoke", "ok") in actions
    assert all(good not in json.dumps(r) for r in trail["records"])
    # No token (nor the bootstrap secret) in any log line.
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert logged and all(secret not in logged for secret in (good, short, revoked, other, ADMIN))
    denial = next(r for r in trail["records"] if r["action"] == "denied")
    assert denial["principal"] == "ci" and denial["repository"] == "team" and denial["client"] == "127.0.0.1"


async def test_anonymous_read_is_per_repository(secured: RunningProxy, http: aiohttp.ClientSession) -> None:
    status, created = await api(
        http,
        secured,
        "POST",
        "/-/api/v1/domains/default/repositories",
        {"name": "open", "upstreams": ["public"], "anonymous_read": True},
    )
    assert status == 201 and created["anonymous_read"] is True
    async with http.get(secured.url + "/default/pypi/open/simple/alpha/") as resp:
        assert resp.status == 200
    async with http.post(secured.url + "/default/pypi/open/", data=b"x") as resp:
        assert resp.status == 401  # reading is open, publishing is not


async def test_codeartifact_token_call_exchanges_a_token(
    secured: RunningProxy, http: aiohttp.ClientSession
) -> None:
    _, first = await issue(http, secured, repo="team", permissions=("read", "publish"), principal="build-42")
    url = secured.url + "/v1/authorization-token?domain=default&duration=900"
    async with http.post(url, headers={"Authorization": f"Bearer {first}"}) as resp:
        assert resp.status == 200
        fresh = await resp.json()
    assert fresh["authorizationToken"].startswith(CANARY_PREFIX) and fresh["authorizationToken"] != first
    async with http.get(
        secured.url + "/default/pypi/team/simple/alpha/", headers=basic(fresh["authorizationToken"])
    ) as resp:
        assert resp.status == 200
    _, listed = await api(http, secured, "GET", "/-/api/v1/tokens?domain=default")
    exchanged = [t for t in listed["tokens"] if t["principal"] == "build-42"]
    assert len(exchanged) == 2 and {tuple(t["permissions"]) for t in exchanged} == {("publish", "read")}
    assert min(t["expires_at"] - t["created_at"] for t in exchanged) == pytest.approx(900, abs=2)
    async with http.post(url) as resp:
        assert resp.status == 401
    async with http.post(
        secured.url + "/v1/authorization-token?domain=default&duration=999999", headers=basic(first)
    ) as resp:
        assert resp.status == 400  # beyond the configured maximum lifetime


# --- real clients ------------------------------------------------------------------------------


async def test_pip_uv_and_twine_with_tokens(
    secured: RunningProxy, pypi: FakePyPI, http: aiohttp.ClientSession, dists: Dists, tmp_path: Path
) -> None:
    index = secured.url + "/default/pypi/team/simple/"
    reader_id, reader = await issue(http, secured, repo="team")
    _, publisher = await issue(
        http, secured, repo="team", permissions=("read", "publish"), principal="release"
    )
    _, elsewhere = await issue(http, secured, repo="public")

    run = await pip_install(with_token(index, reader), tmp_path / "pip", "alpha")
    assert run.ok, run.output
    assert await installed(tmp_path / "pip") == {"alpha", "beta"}
    run = await uv_install(with_token(index, reader), tmp_path / "uv", "alpha")
    assert run.ok, run.output

    for name, bad in (("none", ""), ("elsewhere", elsewhere), ("bogus", "apt_bogus")):
        url = with_token(index, bad) if bad else index
        run = await pip_install(url, tmp_path / f"pip-{name}", "alpha")
        assert not run.ok, run.output  # pip says "no matching distribution" (401/403 on the page)
        assert not await installed(tmp_path / f"pip-{name}")

    # twine: a read-only token is refused and nothing is published; a publish token works.
    upload = secured.url + "/default/pypi/team/"
    wheel = dists.root / "private"
    from tests.fakes.dists import build_wheel

    private = await asyncio.to_thread(build_wheel, wheel, "private-lib", "1.0")
    run = await twine_upload(upload, private, password=reader)
    assert not run.ok and "403" in run.output, run.output
    rows = await asyncio.to_thread(
        index_rows, secured.data_dir, "SELECT 1 FROM assets WHERE package='private-lib'"
    )
    assert rows == []
    run = await twine_upload(upload, private, password=publisher)
    assert run.ok, run.output

    # Revoked: pip fails from then on.
    assert (await api(http, secured, "DELETE", f"/-/api/v1/tokens/{reader_id}"))[0] == 204
    run = await pip_install(with_token(index, reader), tmp_path / "pip-revoked", "private-lib")
    assert not run.ok, run.output

    # The tokens never reached the upstream, nor the audit trail.
    for secret in (reader, publisher):
        assert all(secret not in json.dumps(headers) for _, headers in pypi.requests)
    _, trail = await api(http, secured, "GET", "/-/api/v1/audit?package=private-lib")
    published = [r for r in trail["records"] if r["action"] == "publish"]
    assert [(r["principal"], r["result"]) for r in published] == [("release", "ok")]


@pytest.fixture(scope="session")
def left_tarball(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tarball(tmp_path_factory.mktemp("npm-sec"), "left", "1.0.0")


@pytest.fixture
async def npm_upstream(left_tarball: Path) -> Any:
    tarball = left_tarball
    async with FakeNpmRegistry() as fake:
        await fake.add_version_async("left", tarball, version="1.0.0")
        yield fake


async def test_npm_install_and_publish_with_tokens(
    npm_upstream: FakeNpmRegistry, admin_file: Path, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    proxy = await _secured_proxy(tmp_path, npm_upstream.url, "npm", admin_file)
    url, runner = proxy.url, proxy.runner
    try:
        registry = f"{url}/default/npm/team/"
        _, writer = await issue(http, proxy, repo="team", permissions=("read", "publish"))
        _, reader = await issue(http, proxy, repo="team")

        async def with_npmrc(name: str, token: str | None) -> Path:
            cache = tmp_path / name
            await asyncio.to_thread(cache.mkdir, parents=True, exist_ok=True)
            line = f"{url.removeprefix('http:')}/default/npm/team/:_authToken={token}\n" if token else ""
            await asyncio.to_thread((cache / "npmrc").write_text, line)
            return cache

        app = tmp_path / "app"
        await asyncio.to_thread(app.mkdir)
        await asyncio.to_thread(
            (app / "package.json").write_text, '{"name":"app","version":"1.0.0","private":true}'
        )
        run = await npm(
            "install", "left@1.0.0", cwd=app, registry=registry, cache=await with_npmrc("c1", reader)
        )
        assert run.ok, run.output
        run = await npm(
            "install", "left@1.0.0", cwd=app, registry=registry, cache=await with_npmrc("c2", None)
        )
        assert not run.ok and "401" in run.output, run.output

        pkg = tmp_path / "pkg"
        await asyncio.to_thread(pkg.mkdir)
        manifest = {"name": "@acme/secret", "version": "1.0.0", "license": "MIT"}
        await asyncio.to_thread((pkg / "package.json").write_text, json.dumps(manifest))
        run = await npm("publish", cwd=pkg, registry=registry, cache=await with_npmrc("c3", reader))
        assert not run.ok and "403" in run.output, run.output
        run = await npm("publish", cwd=pkg, registry=registry, cache=await with_npmrc("c4", writer))
        assert run.ok, run.output
        run = await npm("whoami", cwd=pkg, registry=registry, cache=await with_npmrc("c5", writer))
        assert run.ok and "ci" in run.output, run.output
        assert all(writer not in json.dumps(headers) for _, headers in npm_upstream.requests)
    finally:
        await runner.cleanup()


async def test_audit_trail_is_complete_and_tamper_evident(
    secured: RunningProxy, http: aiohttp.ClientSession, dists: Dists, tmp_path: Path
) -> None:
    _, publisher = await issue(
        http, secured, repo="team", permissions=("read", "publish", "delete"), principal="rel"
    )
    wheel = await asyncio.to_thread(
        __import__("tests.fakes.dists", fromlist=["build_wheel"]).build_wheel, tmp_path, "audited", "1.0"
    )
    run = await twine_upload(secured.url + "/default/pypi/team/", wheel, password=publisher)
    assert run.ok, run.output
    async with http.get(
        secured.url + "/default/pypi/team/simple/nothere/", headers=basic("apt_wrong")
    ) as resp:
        assert resp.status == 401
    status, _ = await api(
        http,
        secured,
        "PUT",
        "/-/api/v1/domains/default/repositories/team/packages/pypi/audited/versions/1.0/status",
        {"status": "Unlisted"},
    )
    assert status == 200
    await secured.pipeline.audit.flush()

    def trail(*args: str) -> tuple[int, str]:
        import subprocess
        import sys

        cmd = [
            sys.executable,
            "-c",
            "import sys; from proxy.cli import main; sys.exit(main())",
            "audit",
            *args,
        ]
        done = subprocess.run(
            [*cmd, "--data-dir", str(secured.data_dir)], capture_output=True, text=True, check=False
        )
        return done.returncode, done.stdout + done.stderr

    code, out = await asyncio.to_thread(trail, "--package", "audited")
    assert code == 0, out
    lines = [line.split("  ")[1:4] for line in out.splitlines()]
    assert ["rel", "publish", "ok"] in lines and ["admin", "status", "ok"] in lines
    code, out = await asyncio.to_thread(trail, "verify")
    assert code == 0 and "intact" in out, out

    def tamper() -> None:
        with sqlite3.connect(secured.data_dir / "index.sqlite3") as db:
            try:
                db.execute("UPDATE audit SET principal='someone-else' WHERE action='publish'")
                raise AssertionError("the audit table accepted an UPDATE")
            except sqlite3.DatabaseError as exc:
                assert "append-only" in str(exc)
            db.execute("DROP TRIGGER audit_append_only_update")
            db.execute("UPDATE audit SET principal='someone-else' WHERE action='publish'")

    await asyncio.to_thread(tamper)
    code, out = await asyncio.to_thread(trail, "verify")
    assert code == 1 and "does not match its hash" in out, out


Check = Callable[[], Awaitable[None]]


async def _secured_proxy(
    tmp_path: Path, upstream_url: str, fmt: str, admin_file: Path, *, data: str = "data", **server: Any
) -> RunningProxy:
    """A proxy with access control on in front of one ``fmt`` upstream; stop it with ``stop()``."""
    raw = proxy_config(
        tmp_path / data,
        upstream_url,
        fmt=fmt,
        connection=f"{fmt}up",
        auth=True,
        admin_token_file=str(admin_file),
        **server,
    )
    config, runner, url = await serve_config(raw)
    return RunningProxy(url=url, config=config, runner=runner)


@requires_mvn
@requires_local_repository
@pytest.mark.timeout(300)
async def test_mvn_resolves_and_deploys_with_tokens(
    admin_file: Path, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async with FakeMavenRepo() as central:
        proxy = await _secured_proxy(tmp_path, central.url, "maven", admin_file)
        try:
            team = f"{proxy.url}/default/maven/team/"
            _, writer = await issue(
                http, proxy, repo="team", permissions=("read", "publish"), principal="deployer"
            )
            _, reader = await issue(http, proxy, repo="team")

            async def deploy(name: str, token: str | None) -> MvnRun:
                work = tmp_path / name
                settings = await asyncio.to_thread(
                    functools.partial(
                        write_settings,
                        work / "settings.xml",
                        team,
                        username="aws" if token else None,
                        password=token,
                    )
                )
                await asyncio.to_thread(
                    write_project, work / "p", "com.acme", name, "1.0", [], deploy_url=team, with_test=False
                )
                return await mvn(["deploy"], cwd=work / "p", settings=settings, local_repo=work / "m2")

            refused = await deploy("refused", reader)
            assert not refused.ok and "403" in refused.output, refused.explain()
            anonymous = await deploy("anonymous", None)
            assert not anonymous.ok and "401" in anonymous.output, anonymous.explain()
            deployed = await deploy("lib", writer)
            assert deployed.ok, deployed.explain()
            rows = await asyncio.to_thread(
                index_rows,
                proxy.data_dir,
                "SELECT DISTINCT package FROM assets WHERE package LIKE 'com.acme:%'",
            )
            assert rows == [("com.acme:lib",)]
            assert all(writer not in json.dumps(r.headers) for r in central.requests)
        finally:
            await proxy.stop()


@pytest.mark.skipif(NUGET_MISSING is not None, reason=NUGET_MISSING or "")
@pytest.mark.timeout(300)
async def test_nuget_installs_and_pushes_with_tokens(
    admin_file: Path, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    root = tmp_path / "nupkgs"
    alpha = await asyncio.to_thread(build_nupkg, root, "Acme.Alpha", "1.0.0")
    private = await asyncio.to_thread(build_nupkg, root, "Team.Private", "1.0.0")
    async with FakeNuGetFeed() as feed:
        await feed.add_package_async(alpha)
        proxy = await _secured_proxy(tmp_path, feed.url, "nuget", admin_file)
        try:
            source = f"{proxy.url}/default/nuget/team/v3/index.json"
            _, writer = await issue(
                http, proxy, repo="team", permissions=("read", "publish"), principal="pusher"
            )
            _, reader = await issue(http, proxy, repo="team")

            async def run(name: str, args: list[str], *, credentials: str | None, api_key: str | None) -> Any:
                work = tmp_path / name
                config = await write_nuget_config(
                    work / "NuGet.Config",
                    source,
                    api_key=api_key,
                    credentials=("aws", credentials) if credentials else None,
                )
                return await nuget(args, cwd=work, config_file=config)

            out = tmp_path / "out"
            done = await run(
                "install",
                ["install", "Acme.Alpha", "-Version", "1.0.0", "-OutputDirectory", str(out)],
                credentials=reader,
                api_key=None,
            )
            assert done.ok, done.output
            refused = await run(
                "anon",
                ["install", "Acme.Alpha", "-Version", "1.0.0", "-OutputDirectory", str(tmp_path / "o2")],
                credentials=None,
                api_key=None,
            )
            assert not refused.ok, refused.output
            push = ["push", str(private), "-Source", source]
            denied = await run("push-reader", push, credentials=reader, api_key=reader)
            assert not denied.ok and "403" in denied.output, denied.output
            pushed = await run("push-writer", push, credentials=writer, api_key=writer)
            assert pushed.ok, pushed.output
            assert all(writer not in json.dumps(r.headers) for r in feed.requests)
        finally:
            await proxy.stop()


def _make_tls(root: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a certificate for 127.0.0.1 signed by it: (ca.pem, cert.pem, key.pem)."""
    import subprocess

    root.mkdir(parents=True, exist_ok=True)
    ext = root / "san.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n", encoding="utf-8")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=root, check=True, capture_output=True)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-subj",
        "/CN=test CA",
        "-days",
        "2",
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "key.pem",
        "-out",
        "req.csr",
        "-subj",
        "/CN=127.0.0.1",
    )
    openssl(
        "x509",
        "-req",
        "-in",
        "req.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "cert.pem",
        "-days",
        "2",
        "-extfile",
        str(ext),
    )
    return root / "ca.pem", root / "cert.pem", root / "key.pem"


async def _serve_tls(raw: dict[str, Any], cert: Path, key: Path) -> tuple[web.AppRunner, str]:
    import ssl

    from proxy.app import build_app
    from proxy.config import Overrides, parse_config

    config = parse_config(raw, Overrides(), {})
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    await asyncio.to_thread(context.load_cert_chain, cert, key)
    runner = web.AppRunner(build_app(config))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"https://127.0.0.1:{port}"


async def test_https_listener_and_verified_upstream_tls(
    pypi: FakePyPI, left_tarball: Path, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    ca, cert, key = await asyncio.to_thread(_make_tls, tmp_path / "tls")
    front, front_url = await _serve_tls(proxy_config(tmp_path / "front", pypi.url), cert, key)
    runners = [front]
    try:
        index = f"{front_url}/default/pypi/public/simple/"
        run = await pip_install(index, tmp_path / "t1", "alpha")
        assert not run.ok  # pip does not trust the test CA by itself
        run = await pip_install(index, tmp_path / "t2", "--cert", str(ca), "alpha")
        assert run.ok, run.output
        assert await installed(tmp_path / "t2") == {"alpha", "beta"}

        # npm against the HTTPS listener, trusting the CA with --cafile.
        async with FakeNpmRegistry() as npm_up:
            await npm_up.add_version_async("left", left_tarball, version="1.0.0")
            npm_runner, npm_url = await _serve_tls(
                proxy_config(tmp_path / "npm", npm_up.url, fmt="npm", connection="n"), cert, key
            )
            runners.append(npm_runner)
            app = tmp_path / "app"
            await asyncio.to_thread(app.mkdir)
            await asyncio.to_thread(
                (app / "package.json").write_text, '{"name":"a","version":"1.0.0","private":true}'
            )
            run = await npm(
                "install",
                "left@1.0.0",
                "--cafile",
                str(ca),
                cwd=app,
                registry=f"{npm_url}/default/npm/public/",
                cache=tmp_path / "npm-cache",
            )
            assert run.ok, run.output

        # A proxy whose upstream is HTTPS: verified, against the connection's own CA bundle.
        for name, bundle, works in (("trusting", str(ca), True), ("default", None, False)):
            raw = proxy_config(tmp_path / name, index, upstream_retries=0)
            if bundle:
                raw["upstreams"]["fake"]["ca_bundle"] = bundle
            _, back, back_url = await serve_config(raw)
            runners.append(back)
            async with http.get(f"{back_url}/default/pypi/public/simple/alpha/") as resp:
                assert (resp.status == 200) is works, await resp.text()
    finally:
        for runner in runners:
            await runner.cleanup()


async def test_a_domain_policy_narrows_what_tokens_give(
    secured: RunningProxy, http: aiohttp.ClientSession, dists: Dists
) -> None:
    _, ci = await issue(http, secured, repo="team", permissions=("read", "publish"), principal="ci")
    data = await asyncio.to_thread(dists.beta.read_bytes)

    async def upload() -> tuple[int, str]:
        form = aiohttp.FormData()
        for key, value in ((":action", "file_upload"), ("name", "beta"), ("version", "1.0")):
            form.add_field(key, value)
        form.add_field("content", data, filename=dists.beta.name)
        async with http.post(secured.url + "/default/pypi/team/", data=form, headers=basic(ci)) as resp:
            return resp.status, (await resp.text())

    policy = "/-/api/v1/domains/default/policy"
    status, body = await api(
        http,
        secured,
        "PUT",
        policy,
        {"grants": [{"principal": "ci", "repository": "team", "permissions": ["read"]}]},
    )
    assert status == 200 and body["grants"] == [
        {"principal": "ci", "repository": "team", "permissions": ["read"]}
    ]
    status, text = await upload()
    assert status == 403 and "access policy of domain default does not give ci the publish" in text
    async with http.get(secured.url + "/default/pypi/team/simple/alpha/", headers=basic(ci)) as resp:
        assert resp.status == 200  # read is still granted
    _, other = await issue(http, secured, repo="team", principal="someone-else")
    async with http.get(secured.url + "/default/pypi/team/simple/alpha/", headers=basic(other)) as resp:
        assert resp.status == 403  # no grant for this principal in a governed domain
    assert (await api(http, secured, "PUT", policy, {"grants": []}))[0] == 200
    assert (await upload())[0] in {200, 201}
    status, body = await api(http, secured, "GET", policy)
    assert status == 200 and body["grants"] == []


async def bad_tokens(http: aiohttp.ClientSession, proxy: RunningProxy) -> dict[str, str]:
    """An expired, a revoked and another repository's token, each with every permission."""
    everything = ("read", "publish", "delete")
    _, expired = await issue(http, proxy, repo="team", permissions=everything, duration="1s")
    revoked_id, revoked = await issue(http, proxy, repo="team", permissions=everything)
    assert (await api(http, proxy, "DELETE", f"/-/api/v1/tokens/{revoked_id}"))[0] == 204
    _, elsewhere = await issue(http, proxy, repo="public", permissions=everything)
    await asyncio.sleep(1.2)
    return {"expired": expired, "revoked": revoked, "other repository": elsewhere}


async def test_every_publishing_client_is_refused_with_bad_tokens_and_nothing_is_published(
    secured: RunningProxy, http: aiohttp.ClientSession, dists: Dists, tmp_path: Path
) -> None:
    """twine and npm publish with an expired, a revoked and another repository's token."""
    from tests.fakes.dists import build_wheel

    wheel = await asyncio.to_thread(build_wheel, tmp_path / "w", "refused-lib", "1.0")
    tokens = await bad_tokens(http, secured)
    for kind, token in tokens.items():
        run = await twine_upload(secured.url + "/default/pypi/team/", wheel, password=token)
        expected = "403" if kind == "other repository" else "401"
        assert not run.ok and expected in run.output, f"{kind}: {run.output}"
        run = await pip_install(
            with_token(secured.url + "/default/pypi/team/simple/", token), tmp_path / kind, "alpha"
        )
        assert not run.ok, f"{kind}: {run.output}"
    rows = await asyncio.to_thread(
        index_rows, secured.data_dir, "SELECT 1 FROM assets WHERE package='refused-lib'"
    )
    assert rows == []


async def test_npm_publish_is_refused_with_bad_tokens(
    npm_upstream: FakeNpmRegistry, admin_file: Path, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    proxy = await _secured_proxy(tmp_path, npm_upstream.url, "npm", admin_file, token_min_duration="1s")
    url, runner = proxy.url, proxy.runner
    try:
        pkg = tmp_path / "pkg"
        await asyncio.to_thread(pkg.mkdir)
        manifest = {"name": "@acme/refused", "version": "1.0.0", "license": "MIT"}
        await asyncio.to_thread((pkg / "package.json").write_text, json.dumps(manifest))
        for kind, token in (await bad_tokens(http, proxy)).items():
            cache = tmp_path / f"c-{kind}"
            await asyncio.to_thread(cache.mkdir)
            line = f"{url.removeprefix('http:')}/default/npm/team/:_authToken={token}\n"
            await asyncio.to_thread((cache / "npmrc").write_text, line)
            run = await npm("publish", cwd=pkg, registry=f"{url}/default/npm/team/", cache=cache)
            expected = "403" if kind == "other repository" else "401"
            assert not run.ok and expected in run.output, f"{kind}: {run.output}"
        rows = await asyncio.to_thread(
            index_rows, proxy.data_dir, "SELECT 1 FROM assets WHERE package='@acme/refused'"
        )
        assert rows == []
    finally:
        await runner.cleanup()


@requires_mvn
@requires_local_repository
@pytest.mark.timeout(300)
async def test_mvn_deploy_and_nuget_push_are_refused_with_bad_tokens(
    admin_file: Path, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async with FakeMavenRepo() as central:
        proxy = await _secured_proxy(tmp_path, central.url, "maven", admin_file, token_min_duration="1s")
        url, runner = proxy.url, proxy.runner
        try:
            team = f"{url}/default/maven/team/"
            for kind, token in (await bad_tokens(http, proxy)).items():
                work = tmp_path / kind.replace(" ", "-")
                settings = await asyncio.to_thread(
                    functools.partial(
                        write_settings, work / "settings.xml", team, username="aws", password=token
                    )
                )
                await asyncio.to_thread(
                    write_project,
                    work / "p",
                    "com.acme",
                    "refused",
                    "1.0",
                    [],
                    deploy_url=team,
                    with_test=False,
                )
                run = await mvn(["deploy"], cwd=work / "p", settings=settings, local_repo=work / "m2")
                expected = "403" if kind == "other repository" else "401"
                assert not run.ok and expected in run.output, f"{kind}: {run.explain()}"
            rows = await asyncio.to_thread(
                index_rows, proxy.data_dir, "SELECT 1 FROM assets WHERE package='com.acme:refused'"
            )
            assert rows == []
        finally:
            await runner.cleanup()

    if NUGET_MISSING is not None:
        return
    private = await asyncio.to_thread(build_nupkg, tmp_path / "n", "Team.Refused", "1.0.0")
    async with FakeNuGetFeed() as feed:
        proxy = await _secured_proxy(
            tmp_path, feed.url, "nuget", admin_file, data="ndata", token_min_duration="1s"
        )
        url, runner = proxy.url, proxy.runner
        try:
            source = f"{url}/default/nuget/team/v3/index.json"
            for kind, token in (await bad_tokens(http, proxy)).items():
                work = tmp_path / f"nuget-{kind.replace(' ', '-')}"
                cfg = await write_nuget_config(
                    work / "NuGet.Config", source, api_key=token, credentials=("aws", token)
                )
                pushed = await nuget(["push", str(private), "-Source", source], cwd=work, config_file=cfg)
                expected = "403" if kind == "other repository" else "401"
                assert not pushed.ok and expected in pushed.output, f"{kind}: {pushed.output}"
            rows = await asyncio.to_thread(
                index_rows, proxy.data_dir, "SELECT 1 FROM assets WHERE package='team.refused'"
            )
            assert rows == []
        finally:
            await runner.cleanup()
