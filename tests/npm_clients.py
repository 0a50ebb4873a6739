"""The real npm client, run as a subprocess against the proxy, isolated from this machine.

The machine's own npm setup (``~/.npmrc``, the global npmrc, ``npm_config_*`` variables, its
cache, HTTP proxy variables) must not leak into a test: every run gets its own cache directory,
a user and global config inside it, and only the settings below. ``fetch-retries`` is 0 because
the registry is a local process: a retry could only hide a failure (and npm's back-off would make
the failure tests take a minute).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from pathlib import Path

from tests.clients import ClientRun

__all__ = ["npm", "npm_env"]

_PROXY_VARS = frozenset({"http_proxy", "https_proxy", "all_proxy", "no_proxy"})


def npm_env(cache: Path, *, registry: str | None = None) -> dict[str, str]:
    """The environment of an isolated npm run using ``cache`` (created by npm on demand)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.lower().startswith("npm_config_") and k.lower() not in _PROXY_VARS
    }
    env.update(
        {
            "npm_config_cache": str(cache),
            "npm_config_userconfig": str(cache / "npmrc"),
            "npm_config_globalconfig": str(cache / "global-npmrc"),
            "npm_config_update_notifier": "false",
            "npm_config_fund": "false",
            "npm_config_audit": "false",
            "npm_config_progress": "false",
            "npm_config_color": "false",
            "npm_config_fetch_retries": "0",
            "npm_config_fetch_timeout": "60000",
            "NO_PROXY": "127.0.0.1,localhost",
            "NO_COLOR": "1",
        }
    )
    if registry is not None:
        env["npm_config_registry"] = registry
    return env


async def npm(*args: str, cwd: Path, registry: str, cache: Path, timeout: float = 90.0) -> ClientRun:
    """``npm ARGS`` in ``cwd`` against ``registry`` only; exit code and combined output.

    Installs get ``--no-audit --no-fund`` (no calls to audit endpoints the proxy does not serve).
    """
    extra = ["--no-audit", "--no-fund"] if args and args[0] in {"install", "i", "ci", "update"} else []
    proc = await asyncio.create_subprocess_exec(
        "npm",
        *args,
        *extra,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=npm_env(cache, registry=registry),
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return ClientRun(proc.returncode or 0, out.decode(errors="replace"))


def npm_publish_doc(name: str, version: str, data: bytes, **dist: str) -> dict[str, object]:
    """The document ``npm publish`` PUTs: the manifest (``dist`` fields override the computed
    integrity and shasum) and the tarball as an attachment named after the unscoped name."""
    integrity = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
    manifest = {
        "name": name,
        "version": version,
        "dist": {"integrity": integrity, "shasum": hashlib.sha1(data).hexdigest(), **dist},
    }
    basename = name.rsplit("/", 1)[-1]
    return {
        "name": name,
        "dist-tags": {"latest": version},
        "versions": {version: manifest},
        "_attachments": {
            f"{basename}-{version}.tgz": {
                "content_type": "application/octet-stream",
                "data": base64.b64encode(data).decode(),
                "length": len(data),
            }
        },
    }
