"""export/import: a repository moved through an air gap, every digest checked on arrival."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from tests.clients import installed, pip_install
from tests.conftest import ProxyFactory
from tests.fakes.pypi import FakePyPI

KEY_ENV = "TEST_BUNDLE_KEY"


async def cli(*args: str, key: str = "s3cret-bundle-key") -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c", "import sys; from proxy.cli import main; sys.exit(main())", *args]
    env = {**os.environ, KEY_ENV: key}
    return await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, env=env, check=False)


def tamper(source: Path, target: Path) -> str:
    """A copy of the bundle with one byte of its first blob flipped; returns that blob's digest."""
    with tarfile.open(source) as src, tarfile.open(target, "w") as out:
        flipped = ""
        for member in src.getmembers():
            data = src.extractfile(member).read()  # type: ignore[union-attr]
            if member.name.startswith("blobs/") and not flipped:
                flipped = member.name.removeprefix("blobs/")
                mid = len(data) // 2
                data = data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :]
            out.addfile(member, io.BytesIO(data))
    return flipped


async def test_export_import_round_trip_then_offline_installs(
    proxy_factory: ProxyFactory, pypi: FakePyPI, tmp_path: Path
) -> None:
    source = await proxy_factory(pypi.url, data_dir=tmp_path / "source")
    run = await pip_install(f"{source.url}/default/pypi/public/simple/", tmp_path / "t1", "alpha")
    assert run.ok, run.output
    bundle = tmp_path / "public.tar"
    done = await cli(
        "export",
        "--data-dir",
        str(source.data_dir),
        "--domain",
        "default",
        "--repo",
        "public",
        "--sign-key-env",
        KEY_ENV,
        str(bundle),
    )
    assert done.returncode == 0, done.stderr
    assert "signed" in done.stdout

    # The receiving side: a fresh data directory, no upstream at all.
    await pypi.stop_listening()
    target = tmp_path / "target"
    config = tmp_path / "target.toml"
    await asyncio.to_thread(
        config.write_text,
        f'[server]\ndata_dir = "{target}"\nauth = false\noffline = true\n\n'
        f'[upstreams.fake]\nformat = "pypi"\nurl = "{pypi.url}"\n\n[[domains]]\nname = "default"\n\n'
        '[[domains.repositories]]\nname = "public"\nupstreams = ["fake"]\n',
    )
    bad = tmp_path / "tampered.tar"
    flipped = await asyncio.to_thread(tamper, bundle, bad)
    done = await cli("import", "--config", str(config), "--verify-key-env", KEY_ENV, str(bad))
    assert done.returncode == 1 and flipped in done.stderr and "rejected" in done.stderr, done.stderr
    done = await cli("import", "--config", str(config), "--verify-key-env", KEY_ENV, str(bundle), key="wrong")
    assert done.returncode == 1 and "signature does not match" in done.stderr, done.stderr
    done = await cli("import", "--config", str(config), "--verify-key-env", KEY_ENV, str(bundle))
    assert done.returncode == 0, done.stderr
    assert "every digest checked" in done.stdout

    offline = await proxy_factory(pypi.url, data_dir=target, offline=True)
    run = await pip_install(f"{offline.url}/default/pypi/public/simple/", tmp_path / "t2", "alpha")
    assert run.ok, run.output
    assert await installed(tmp_path / "t2") == {"alpha", "beta"}
    await pypi.resume_listening()
