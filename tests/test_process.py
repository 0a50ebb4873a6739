"""The proxy as a real process: SIGKILL mid-download leaves nothing servable; SIGTERM is clean."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Dists, blob_files, index_rows, temp_files, write_config_file
from tests.fakes.dists import sha256_file
from tests.fakes.pypi import FakePyPI, Fault

Starter = Callable[[], Coroutine[Any, Any, asyncio.subprocess.Process]]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _wait_ready(url: str, proc: asyncio.subprocess.Process) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(200):
            if proc.returncode is not None:
                raise AssertionError(f"proxy exited early with {proc.returncode}")
            try:
                async with http.get(url + "/-/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError("proxy did not become ready")


@pytest.fixture
async def proxy_process(tmp_path: Path, pypi: FakePyPI) -> AsyncIterator[tuple[str, Path, Starter]]:
    """(url, data dir, start) for a proxy run as ``python -m proxy serve`` in a subprocess."""
    port = _free_port()
    data_dir = tmp_path / "data"
    config = tmp_path / "proxy.toml"
    await asyncio.to_thread(functools.partial(write_config_file, config, data_dir, pypi.url, port=port))
    url = f"http://127.0.0.1:{port}"
    procs: list[asyncio.subprocess.Process] = []

    async def start() -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "--config",
            str(config),
            "--log-level",
            "WARNING",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        procs.append(proc)
        await _wait_ready(url, proc)
        return proc

    yield url, data_dir, start
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_sigkill_mid_download_leaves_no_blob_or_row(
    proxy_process: tuple[str, Path, Starter], pypi: FakePyPI, dists: Dists
) -> None:
    url, data_dir, start = proxy_process
    name = dists.big.name
    file_url = f"{url}/default/pypi/public/files/bigpkg/{name}"
    pypi.faults[f"/files/{name}"] = Fault("slow", chunk=2**20, delay=0.1, times=1)
    proc = await start()
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientPayloadError):
            async with http.get(file_url) as resp:
                assert resp.status == 200
                await resp.content.readexactly(3 * 2**20)
                os.kill(proc.pid, signal.SIGKILL)
                await proc.wait()
                await resp.read()
    rows = await asyncio.to_thread(index_rows, data_dir, "SELECT * FROM assets WHERE filename=?", (name,))
    assert rows == []
    assert await asyncio.to_thread(blob_files, data_dir) == []

    await start()  # restart: leftovers of the crash are removed, the next request fetches it whole
    assert await asyncio.to_thread(temp_files, data_dir) == []
    async with aiohttp.ClientSession() as http, http.get(file_url) as resp:
        assert resp.status == 200
        body = await resp.read()
    assert hashlib.sha256(body).hexdigest() == await asyncio.to_thread(sha256_file, dists.big)
    assert pypi.hits[f"/files/{name}"] == 2


async def test_sigterm_shuts_down_cleanly(
    proxy_process: tuple[str, Path, Starter], pypi: FakePyPI, dists: Dists
) -> None:
    url, data_dir, start = proxy_process
    proc = await start()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/default/pypi/public/simple/alpha/") as resp:
            assert resp.status == 200
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    assert await asyncio.to_thread(temp_files, data_dir) == []
    rows = await asyncio.to_thread(index_rows, data_dir, "SELECT doc_key FROM documents")
    assert rows == [("pypi:alpha",)]


async def test_sigterm_during_a_large_download_never_ends_in_a_truncated_success(
    proxy_process: tuple[str, Path, Starter], pypi: FakePyPI, dists: Dists
) -> None:
    url, data_dir, start = proxy_process
    name = dists.big.name
    pypi.faults[f"/files/{name}"] = Fault("slow", chunk=2**20, delay=0.05, times=1)
    proc = await start()
    expected = await asyncio.to_thread(sha256_file, dists.big)
    outcome = ""
    async with aiohttp.ClientSession() as http:
        try:
            async with http.get(f"{url}/default/pypi/public/files/bigpkg/{name}") as resp:
                assert resp.status == 200
                head = await resp.content.readexactly(3 * 2**20)
                proc.send_signal(signal.SIGTERM)  # in-flight responses may finish within the grace
                body = head + await resp.read()
            assert hashlib.sha256(body).hexdigest() == expected  # whole, or ...
            outcome = "complete"
        except aiohttp.ClientPayloadError:
            outcome = "clean error"  # ... cut with an error the client sees, never short and "fine"
    assert outcome in {"complete", "clean error"}
    assert await asyncio.wait_for(proc.wait(), 40) == 0
    rows = await asyncio.to_thread(
        index_rows, data_dir, "SELECT digest FROM assets WHERE filename=?", (name,)
    )
    assert rows in ([], [(expected,)])  # committed whole, or not at all


async def test_sighup_reloads_repositories_from_the_config_file(
    proxy_process: tuple[str, Path, Starter], tmp_path: Path
) -> None:
    url, _, start = proxy_process
    proc = await start()
    config = tmp_path / "proxy.toml"
    text = await asyncio.to_thread(config.read_text)
    await asyncio.to_thread(
        config.write_text, text + '\n[[domains.repositories]]\nname = "added"\nupstreams = ["public"]\n'
    )
    proc.send_signal(signal.SIGHUP)
    async with aiohttp.ClientSession() as http:
        for _ in range(50):
            async with http.get(f"{url}/-/api/v1/domains/default/repositories/added") as resp:
                if resp.status == 200:
                    break
            await asyncio.sleep(0.1)
        assert resp.status == 200
        # A change to the connections is refused, and the running config stays.
        await asyncio.to_thread(
            config.write_text, text.replace('format = "pypi"', 'format = "pypi"\nretries = 5')
        )
        async with http.post(f"{url}/-/api/v1/reload") as resp:
            assert resp.status == 409 and "restart" in (await resp.json())["message"]
        async with http.get(f"{url}/-/api/v1/domains/default/repositories/added") as resp:
            assert resp.status == 200
    assert proc.returncode is None
