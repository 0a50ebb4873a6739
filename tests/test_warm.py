"""``artifact-proxy warm``: lockfiles in, a cache that installs them with every upstream gone."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from pathlib import Path

from tests.clients import _clean_env, installed
from tests.conftest import Dists, ProxyFactory, RunningProxy
from tests.fakes.npm import FakeNpmRegistry, build_tarball
from tests.fakes.pypi import FakePyPI
from tests.npm_clients import npm


async def warm(proxy: RunningProxy, *files: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c", "import sys; from proxy.cli import main; sys.exit(main())", "warm"]
    cmd += ["--domain", "default", "--repo", "public", "--endpoint", proxy.url, *map(str, files)]
    return await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, check=False)


async def test_warm_from_requirements_then_pip_installs_with_the_upstream_down(
    proxy_factory: ProxyFactory, pypi: FakePyPI, dists: Dists, tmp_path: Path
) -> None:
    proxy = await proxy_factory(pypi.url)
    beta_sha = hashlib.sha256(await asyncio.to_thread(dists.beta.read_bytes)).hexdigest()
    alpha_sha = hashlib.sha256(await asyncio.to_thread(dists.alpha.read_bytes)).hexdigest()
    requirements = tmp_path / "requirements.txt"
    await asyncio.to_thread(
        requirements.write_text,
        f"alpha==1.0 --hash=sha256:{alpha_sha}\nbeta==1.0 \\\n    --hash=sha256:{beta_sha}\n# a comment\n",
    )
    done = await warm(proxy, requirements)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "warmed 2 of 2" in done.stdout
    await pypi.stop_listening()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-cache-dir",
        "--target",
        str(tmp_path / "t"),
        "--index-url",
        f"{proxy.url}/default/pypi/public/simple/",
        "-r",
        str(requirements),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=_clean_env(),
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()
    assert await installed(tmp_path / "t") == {"alpha", "beta"}
    await pypi.resume_listening()

    # A pin nobody has fails with a reason, and the exit status says so.
    await asyncio.to_thread(requirements.write_text, "nosuchthing==9.9\n")
    done = await warm(proxy, requirements)
    assert done.returncode == 1 and "failed: pypi nosuchthing 9.9: 404" in done.stderr


async def test_warm_from_package_lock_then_npm_ci_with_the_upstream_down(
    proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    root = tmp_path / "tgz"
    right = await asyncio.to_thread(build_tarball, root, "right", "1.0.0")
    left = await asyncio.to_thread(build_tarball, root, "left", "1.0.0", dependencies={"right": "^1.0.0"})
    async with FakeNpmRegistry() as upstream:
        await upstream.add_version_async("right", right, version="1.0.0")
        await upstream.add_version_async("left", left, version="1.0.0", dependencies={"right": "^1.0.0"})
        # The lockfile, made through the proxy as a team would make it...
        first = await proxy_factory(upstream.url, fmt="npm", connection="up", data_dir=tmp_path / "d1")
        port = int(first.url.rsplit(":", 1)[1])
        registry = f"{first.url}/default/npm/public/"
        app = tmp_path / "app"
        await asyncio.to_thread(app.mkdir)
        manifest = {"name": "app", "version": "1.0.0", "private": True, "dependencies": {"left": "^1.0.0"}}
        await asyncio.to_thread((app / "package.json").write_text, json.dumps(manifest))
        run = await npm("install", cwd=app, registry=registry, cache=tmp_path / "c1")
        assert run.ok, run.output
        await first.stop()
        # ...then a fresh proxy at the same address is warmed from it, and the upstream goes away.
        second = await proxy_factory(
            upstream.url, fmt="npm", connection="up", data_dir=tmp_path / "d2", port=port
        )
        done = await warm(second, app / "package-lock.json")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "warmed 2 of 2" in done.stdout
        await upstream.stop_listening()
        await asyncio.to_thread(lambda: __import__("shutil").rmtree(app / "node_modules"))
        run = await npm("ci", cwd=app, registry=registry, cache=tmp_path / "c2")
        assert run.ok, run.output
        await upstream.resume_listening()


def test_lockfile_readers() -> None:
    import tempfile

    from proxy.warm import read_pins

    a64, b64 = "a" * 64, "b" * 64
    samples = {
        "poetry.lock": (
            '[[package]]\nname = "Foo_Bar"\nversion = "1.2"\n'
            f'files = [{{file = "x.whl", hash = "sha256:{a64}"}}]\n'
        ),
        "pylock.toml": (
            '[[packages]]\nname = "baz"\nversion = "3.0"\n[[packages.wheels]]\n'
            f'name = "baz-3.0-py3-none-any.whl"\nhashes = {{sha256 = "{b64}"}}\n'
        ),
        "pnpm-lock.yaml": (
            "lockfileVersion: '9.0'\n\npackages:\n\n  left@1.0.0:\n    resolution: {integrity: sha512-x}\n\n"
            "  '@acme/util@2.1.0':\n    resolution: {integrity: sha512-y}\n\nsnapshots: {}\n"
        ),
        "yarn.lock": (
            '# yarn lockfile v1\n\n"@acme/util@^2.0.0":\n  version "2.1.0"\n  resolved "https://r/x.tgz"\n\n'
            'left@^1.0.0, left@^1.0.1:\n  version "1.0.0"\n'
        ),
        "deps.maven": "junit:junit:4.13.2\norg.example:lib:1.0:jar:sources\n",
        "packages.lock.json": json.dumps(
            {
                "version": 1,
                "dependencies": {"net6.0": {"Acme.Alpha": {"type": "Direct", "resolved": "1.0.0"}}},
            }
        ),
    }
    with tempfile.TemporaryDirectory() as root:
        found = {}
        for name, text in samples.items():
            path = Path(root) / name
            path.write_text(text, encoding="utf-8")
            found[name] = read_pins(path)
    assert [(p.name, p.version, sorted(p.hashes)) for p in found["poetry.lock"]] == [
        ("foo-bar", "1.2", ["a" * 64])
    ]
    assert [(p.name, p.version, sorted(p.hashes)) for p in found["pylock.toml"]] == [
        ("baz", "3.0", ["b" * 64])
    ]
    assert [(p.name, p.version) for p in found["pnpm-lock.yaml"]] == [
        ("@acme/util", "2.1.0"),
        ("left", "1.0.0"),
    ]
    assert [(p.name, p.version) for p in found["yarn.lock"]] == [("@acme/util", "2.1.0"), ("left", "1.0.0")]
    assert [(p.name, p.filename) for p in found["deps.maven"]] == [
        ("junit:junit", "junit-4.13.2.jar"),
        ("org.example:lib", "lib-1.0-sources.jar"),
    ]
    assert [(p.fmt, p.name, p.version) for p in found["packages.lock.json"]] == [
        ("nuget", "acme.alpha", "1.0.0")
    ]
