"""Real package clients (pip, uv) run as subprocesses against the proxy, isolated from this machine.

The machine's own pip configuration (find-links, extra indexes, constraints) must not leak into
a test: pip gets ``PIP_CONFIG_FILE=/dev/null`` and no ``PIP_*`` variables, uv gets
``UV_NO_CONFIG`` and no ``UV_*`` variables, and both run without a cache so every file really
comes through the proxy.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from uv import find_uv_bin


@dataclass(frozen=True)
class ClientRun:
    returncode: int
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "UV_", "TWINE_"))}
    # A machine-wide CA bundle in these would win over pip's own --cert (requests reads them).
    env.pop("REQUESTS_CA_BUNDLE", None)
    env.pop("CURL_CA_BUNDLE", None)
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    env["UV_NO_CONFIG"] = "1"
    env["NO_COLOR"] = "1"
    return env


async def _run(*cmd: str, timeout: float = 120.0) -> ClientRun:
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=_clean_env(),
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return ClientRun(proc.returncode or 0, out.decode(errors="replace"))


async def pip_install(index_url: str, target: Path, *requirements: str) -> ClientRun:
    """``pip install --target`` from the proxy only."""
    return await _run(
        sys.executable,
        "-m",
        "pip",
        "install",
        "-v",
        "--no-cache-dir",
        "--index-url",
        index_url,
        "--target",
        str(target),
        *requirements,
    )


async def pip_download(index_url: str, dest: Path, *requirements: str) -> ClientRun:
    return await _run(
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-cache-dir",
        "--index-url",
        index_url,
        "--dest",
        str(dest),
        *requirements,
    )


async def uv_install(index_url: str, target: Path, *requirements: str) -> ClientRun:
    """``uv pip install --target`` from the proxy only."""
    uv = await asyncio.to_thread(find_uv_bin)
    return await _run(
        uv,
        "pip",
        "install",
        "--no-cache",
        "--index-url",
        index_url,
        "--python",
        sys.executable,
        "--target",
        str(target),
        *requirements,
    )


async def installed(target: Path) -> set[str]:
    """Names of the distributions in a ``--target`` directory (from their dist-info folders)."""

    def scan() -> set[str]:
        return {p.name.split("-")[0].lower() for p in target.glob("*.dist-info")}

    return await asyncio.to_thread(scan)


async def twine_upload(
    repository_url: str, *files: Path, skip_existing: bool = False, password: str = "placeholder"
) -> ClientRun:
    """``twine upload`` to the proxy; ``password`` is the token (any value with auth off)."""
    flags = ["--skip-existing"] if skip_existing else []
    return await _run(
        sys.executable,
        "-m",
        "twine",
        "upload",
        "--repository-url",
        repository_url,
        "-u",
        "ci",
        "-p",
        password,
        "--non-interactive",
        "--disable-progress-bar",
        *flags,
        *(str(f) for f in files),
    )


def upload_form(path: Path, data: bytes, *, name: str, version: str, **extra: str) -> Any:
    """The multipart form twine sends (fields first, then the file), for tests that bend it."""
    form = aiohttp.FormData()
    fields = {
        ":action": "file_upload",
        "protocol_version": "1",
        "name": name,
        "version": version,
        "filetype": "bdist_wheel" if path.name.endswith(".whl") else "sdist",
        "pyversion": "py3" if path.name.endswith(".whl") else "source",
        "metadata_version": "2.1",
        "sha256_digest": hashlib.sha256(data).hexdigest(),
        **extra,
    }
    for key, value in fields.items():
        if value != "":
            form.add_field(key, value)
    form.add_field("content", data, filename=path.name, content_type="application/octet-stream")
    return form
