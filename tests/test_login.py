"""``artifact-proxy login`` writes each tool's own config, and the tool then works with it.

The proxy runs with access control on; ``login`` runs as a real subprocess on the same data
directory (the way an operator runs it on the proxy's host), issues a token there and writes
the tool's config file, which the real client then uses against the proxy.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.clients import ClientRun, _clean_env, installed
from tests.conftest import Dists, ProxyFactory, RunningProxy
from tests.fakes.dists import build_wheel
from tests.fakes.maven import FakeMavenRepo
from tests.fakes.npm import FakeNpmRegistry, build_tarball
from tests.fakes.nuget import FakeNuGetFeed, build_nupkg
from tests.fakes.pypi import FakePyPI
from tests.maven_clients import mvn, requires_local_repository, requires_mvn, write_project
from tests.npm_clients import npm
from tests.nuget_clients import NUGET_MISSING, nuget


async def login(proxy: RunningProxy, *args: str) -> str:
    """Run ``artifact-proxy login`` on the proxy's data directory; its output."""
    cmd = [
        sys.executable,
        "-c",
        "import sys; from proxy.cli import main; sys.exit(main())",
        "login",
        "--data-dir",
        str(proxy.data_dir),
        "--endpoint",
        proxy.url,
        "--domain",
        "default",
        *args,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARTIFACT_PROXY_")}
    done = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


async def run(*cmd: str, env: dict[str, str]) -> ClientRun:
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 180)
    return ClientRun(proc.returncode or 0, out.decode(errors="replace"))


async def secured(factory: ProxyFactory, upstream: str, fmt: str = "pypi") -> RunningProxy:
    return await factory(upstream, fmt=fmt, connection="up", auth=True)


async def test_login_for_pip_uv_and_twine(
    proxy_factory: ProxyFactory, pypi: FakePyPI, dists: Dists, tmp_path: Path
) -> None:
    proxy = await secured(proxy_factory, pypi.url)
    pip_conf = tmp_path / "pip.conf"
    out = await login(proxy, "--tool", "pip", "--repo", "team", "--config-file", str(pip_conf))
    assert "index-url" in out and "expires at" in out
    text = await asyncio.to_thread(pip_conf.read_text)
    assert "/default/pypi/team/simple/" in text and "aws:apt_" in text
    assert oct((await asyncio.to_thread(pip_conf.stat)).st_mode & 0o777) == "0o600"
    env = {**_clean_env(), "PIP_CONFIG_FILE": str(pip_conf)}
    done = await run(
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-cache-dir",
        "--target",
        str(tmp_path / "t"),
        "alpha",
        env=env,
    )
    assert done.ok, done.output
    assert await installed(tmp_path / "t") == {"alpha", "beta"}

    # --extra keeps the main index and adds ours; a second login replaces our entry, not others.
    await asyncio.to_thread(
        pip_conf.write_text, "[global]\nindex-url = https://example.invalid/simple/\ntimeout = 7\n"
    )
    await login(proxy, "--tool", "pip", "--repo", "team", "--extra", "--config-file", str(pip_conf))
    await login(proxy, "--tool", "pip", "--repo", "team", "--extra", "--config-file", str(pip_conf))
    text = await asyncio.to_thread(pip_conf.read_text)
    assert "index-url = https://example.invalid/simple/" in text and "timeout = 7" in text
    assert text.count("/default/pypi/team/simple/") == 1

    uv_toml = tmp_path / "uv.toml"
    await login(proxy, "--tool", "uv", "--repo", "team", "--config-file", str(uv_toml))
    from uv import find_uv_bin

    uv = await asyncio.to_thread(find_uv_bin)
    env = {**_clean_env()}
    env.pop("UV_NO_CONFIG", None)
    done = await run(
        uv,
        "pip",
        "install",
        "--config-file",
        str(uv_toml),
        "--no-cache",
        "--python",
        sys.executable,
        "--target",
        str(tmp_path / "u"),
        "alpha",
        env=env,
    )
    assert done.ok, done.output

    pypirc = tmp_path / ".pypirc"
    await login(proxy, "--tool", "twine", "--repo", "team", "--config-file", str(pypirc))
    wheel = await asyncio.to_thread(build_wheel, tmp_path / "w", "logged-in", "1.0")
    done = await run(
        sys.executable,
        "-m",
        "twine",
        "upload",
        "--config-file",
        str(pypirc),
        "-r",
        "artifact-proxy",
        "--non-interactive",
        "--disable-progress-bar",
        str(wheel),
        env=_clean_env(),
    )
    assert done.ok, done.output


async def test_login_for_npm_and_dry_run(proxy_factory: ProxyFactory, tmp_path: Path) -> None:
    tarball = await asyncio.to_thread(build_tarball, tmp_path / "tgz", "left", "1.0.0")
    async with FakeNpmRegistry() as upstream:
        await upstream.add_version_async("left", tarball, version="1.0.0")
        proxy = await secured(proxy_factory, upstream.url, "npm")
        cache = tmp_path / "cache"
        npmrc = cache / "npmrc"
        out = await login(proxy, "--tool", "npm", "--repo", "team", "--config-file", str(npmrc), "--dry-run")
        assert "would write" in out and "<token>" in out and "apt_" not in out
        assert not await asyncio.to_thread(npmrc.exists)
        await login(proxy, "--tool", "npm", "--repo", "team", "--config-file", str(npmrc))
        app = tmp_path / "app"
        await asyncio.to_thread(app.mkdir)
        await asyncio.to_thread(
            (app / "package.json").write_text, '{"name":"a","version":"1.0.0","private":true}'
        )
        registry = f"{proxy.url}/default/npm/team/"
        done = await npm("install", "left@1.0.0", cwd=app, registry=registry, cache=cache)
        assert done.ok, done.output
        pkg = tmp_path / "pkg"
        await asyncio.to_thread(pkg.mkdir)
        await asyncio.to_thread(
            (pkg / "package.json").write_text, json.dumps({"name": "@acme/x", "version": "1.0.0"})
        )
        done = await npm("publish", cwd=pkg, registry=registry, cache=cache)
        assert done.ok, done.output


@requires_mvn
@requires_local_repository
@pytest.mark.timeout(300)
async def test_login_for_maven(proxy_factory: ProxyFactory, tmp_path: Path) -> None:
    async with FakeMavenRepo() as central:
        proxy = await secured(proxy_factory, central.url, "maven")
        settings = tmp_path / "settings.xml"
        await login(proxy, "--tool", "maven", "--repo", "team", "--config-file", str(settings))
        team = f"{proxy.url}/default/maven/team/"
        await asyncio.to_thread(
            write_project,
            tmp_path / "p",
            "com.acme",
            "logged",
            "1.0",
            [("junit", "junit", "4.13.2", "test")],
            deploy_url=team,
            with_test=False,
            repository_id="artifact-proxy",
        )
        done = await mvn(["deploy"], cwd=tmp_path / "p", settings=settings, local_repo=tmp_path / "m2")
        assert done.ok, done.explain()


@pytest.mark.skipif(NUGET_MISSING is not None, reason=NUGET_MISSING or "")
@pytest.mark.timeout(300)
async def test_login_for_nuget(proxy_factory: ProxyFactory, tmp_path: Path) -> None:
    alpha = await asyncio.to_thread(build_nupkg, tmp_path / "n", "Acme.Alpha", "1.0.0")
    async with FakeNuGetFeed() as feed:
        await feed.add_package_async(alpha)
        proxy = await secured(proxy_factory, feed.url, "nuget")
        config = tmp_path / "NuGet.Config"
        await asyncio.to_thread(
            config.write_text,
            '<?xml version="1.0"?>\n<configuration><packageSources>'
            '<add key="nuget.org" value="https://api.nuget.org/v3/index.json" />'
            "</packageSources></configuration>\n",
        )
        out = await login(proxy, "--tool", "nuget", "--repo", "team", "--config-file", str(config))
        assert "removed source nuget.org" in out
        done = await nuget(
            ["install", "Acme.Alpha", "-Version", "1.0.0", "-OutputDirectory", str(tmp_path / "out")],
            cwd=tmp_path,
            config_file=config,
        )
        assert done.ok, done.output
