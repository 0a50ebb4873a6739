"""Encryption at rest: no plaintext of an artifact on disk, Range still right, rekey still serves.

The proxy runs with ``server.encryption_key_env``; a Maven deploy carries a known marker, a
wheel comes through the cache from the fake PyPI (streamed to a client while it is written,
PEP 658 metadata derived from it), and then every file under the data directory is searched.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import secrets
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import Dists, ProxyFactory
from tests.fakes.pypi import FakePyPI

MARKER = b"PLAINTEXT-MARKER-" + b"7" * 16
KEYS = "TEST_ENCRYPTION_KEYS"


def new_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def everything_under(root: Path) -> list[bytes]:
    return [p.read_bytes() for p in root.rglob("*") if p.is_file()]


async def test_no_plaintext_on_disk_ranges_and_rekey(
    proxy_factory: ProxyFactory,
    pypi: FakePyPI,
    dists: Dists,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    old = new_key()
    monkeypatch.setenv(KEYS, old)
    proxy = await proxy_factory(pypi.url, encryption_key_env=KEYS)
    jar = MARKER + os.urandom(200_000) + MARKER
    url = f"{proxy.url}/default/maven/team/com/acme/secret/1.0/secret-1.0.jar"
    async with http.put(url, data=jar) as resp:
        assert resp.status == 201, await resp.text()

    # Through the cache: a wheel streamed while it downloads, and one whose metadata is derived.
    for project, dist in (("bigpkg", dists.big), ("gamma", dists.gamma_nometa)):
        async with http.get(f"{proxy.url}/default/pypi/public/files/{project}/{dist.name}") as resp:
            assert resp.status == 200
            assert await resp.read() == await asyncio.to_thread(dist.read_bytes)
    async with http.get(
        f"{proxy.url}/default/pypi/public/files/gamma/{dists.gamma_nometa.name}.metadata"
    ) as resp:
        assert resp.status == 200 and b"Name: gamma" in await resp.read()

    # Served back whole, by range, by suffix range, and HEAD.
    async with http.get(url) as resp:
        assert resp.status == 200 and await resp.read() == jar
    async with http.get(url, headers={"Range": "bytes=100000-100099"}) as resp:
        assert resp.status == 206 and await resp.read() == jar[100000:100100]
        assert resp.headers["Content-Range"] == f"bytes 100000-100099/{len(jar)}"
    async with http.get(url, headers={"Range": "bytes=-50"}) as resp:
        assert resp.status == 206 and await resp.read() == jar[-50:]
    async with http.get(url, headers={"Range": f"bytes={len(jar)}-"}) as resp:
        assert resp.status == 416
    async with http.head(url) as resp:
        assert resp.status == 200 and int(resp.headers["Content-Length"]) == len(jar)
    async with http.get(url + ".sha1") as resp:
        assert (await resp.read()).decode() == hashlib.sha1(jar).hexdigest()

    # Nothing on disk holds the plaintext: not the marker, not a slice of the big wheel.
    big = await asyncio.to_thread(dists.big.read_bytes)
    probe = big[len(big) // 2 : len(big) // 2 + 64]
    contents = await asyncio.to_thread(everything_under, proxy.data_dir)
    assert contents and not any(MARKER in c or probe in c for c in contents)

    # Rekey: a new current key, the old one still listed to open what it sealed.
    await proxy.stop()
    new = new_key()
    env = {**os.environ, KEYS: f"{new},{old}"}
    cmd = [sys.executable, "-c", "import sys; from proxy.cli import main; sys.exit(main())", "rekey"]
    config_path = tmp_path / "rekey.toml"
    await asyncio.to_thread(
        config_path.write_text,
        f'[server]\ndata_dir = "{proxy.data_dir}"\nauth = false\nencryption_key_env = "{KEYS}"\n',
    )
    done = await asyncio.to_thread(
        subprocess.run,
        [*cmd, "--config", str(config_path)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "sealed" in done.stdout and " 0 already" in done.stdout, done.stdout
    monkeypatch.setenv(KEYS, new)  # the old key is gone: everything must open with the new one
    again = await proxy_factory(pypi.url, data_dir=proxy.data_dir, encryption_key_env=KEYS)
    async with http.get(f"{again.url}/default/maven/team/com/acme/secret/1.0/secret-1.0.jar") as resp:
        assert resp.status == 200 and await resp.read() == jar
    async with http.get(
        f"{again.url}/default/pypi/public/files/bigpkg/{dists.big.name}", headers={"Range": "bytes=0-9"}
    ) as resp:
        assert resp.status == 206 and await resp.read() == big[:10]
