"""Opt-in: real packages from the real public index through the proxy's embedded default config.

Skipped unless ``ARTIFACT_PROXY_LIVE_TESTS=1``; the default suite never needs the internet.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from proxy.app import build_app
from proxy.config import Overrides, load_config
from tests.clients import installed, pip_install, uv_install

pytestmark = [
    pytest.mark.live,
    pytest.mark.skipif(
        os.environ.get("ARTIFACT_PROXY_LIVE_TESTS") != "1",
        reason="talks to the public index; set ARTIFACT_PROXY_LIVE_TESTS=1 to run",
    ),
]


@pytest.fixture
async def live_proxy(tmp_path: Path) -> AsyncIterator[str]:
    """The embedded default config (upstream: the index pip here uses) on a free port."""
    overrides = Overrides(data_dir=tmp_path / "data", listen="127.0.0.1:0")
    config = await asyncio.to_thread(load_config, overrides, os.environ)
    runner = web.AppRunner(build_app(config))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}/default/pypi/public/simple/"
    await runner.cleanup()


async def test_real_packages_install_through_the_proxy(live_proxy: str, tmp_path: Path) -> None:
    cold = await pip_install(live_proxy, tmp_path / "pip", "requests", "six")
    assert cold.ok, cold.output
    assert await installed(tmp_path / "pip") >= {"requests", "six", "idna", "urllib3", "certifi"}
    warm = await uv_install(live_proxy, tmp_path / "uv", "requests", "six")
    assert warm.ok, warm.output
    assert await installed(tmp_path / "uv") >= {"requests", "six"}
