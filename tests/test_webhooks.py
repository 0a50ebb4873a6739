"""Webhooks: package events POSTed, signed, retried after a failure, counted in the metrics."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import Dists, proxy_config, serve_config
from tests.fakes.pypi import FakePyPI

SECRET = "webhook-secret-for-tests"


async def test_events_are_delivered_signed_and_retried(
    pypi: FakePyPI, dists: Dists, http: aiohttp.ClientSession, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_WEBHOOK_SECRET", SECRET)
    received: list[tuple[dict[str, str], bytes]] = []
    failures = {"left": 1}

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        if failures["left"]:
            failures["left"] -= 1
            return web.Response(status=500)
        received.append((dict(request.headers), body))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    hook_url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"

    raw = proxy_config(tmp_path / "data", pypi.url)
    raw["webhooks"] = [
        {"url": hook_url, "secret_env": "TEST_WEBHOOK_SECRET", "events": ["publish", "status", "ingest"]},
        {"url": hook_url, "events": ["delete"], "repository": "elsewhere"},  # never matches here
    ]
    _, proxy_runner, url = await serve_config(raw)
    try:
        jar = b"PK" + b"x" * 100
        async with http.put(f"{url}/default/maven/team/com/acme/lib/1.0/lib-1.0.jar", data=jar) as resp:
            assert resp.status == 201
        async with http.get(f"{url}/default/pypi/public/files/beta/{dists.beta.name}") as resp:
            assert resp.status == 200 and await resp.read()
        team = f"{url}/-/api/v1/domains/default/repositories/team"
        status_url = f"{team}/packages/maven/com.acme:lib/versions/1.0/status"
        async with http.put(status_url, json={"status": "Unlisted"}) as resp:
            assert resp.status == 200, await resp.text()
        for _ in range(100):  # the first delivery is retried after a second
            if len(received) >= 3:
                break
            await asyncio.sleep(0.1)
        events = [json.loads(body) for _, body in received]
        kinds = sorted((e["event"], e["package"]) for e in events)
        assert kinds == [("ingest", "beta"), ("publish", "com.acme:lib"), ("status", "com.acme:lib")]
        publish = next(e for e in events if e["event"] == "publish")
        assert publish["repository"] == "team" and publish["version"] == "1.0"
        assert publish["digest"] == hashlib.sha256(jar).hexdigest()
        for headers, body in received:
            expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
            assert headers["X-Artifact-Proxy-Signature"] == expected
            assert headers["X-Artifact-Proxy-Event"] in {"publish", "status", "ingest"}
        async with http.get(f"{url}/-/metrics") as resp:
            text = await resp.text()
        assert 'artifact_proxy_webhook_deliveries{outcome="delivered"} 3.0' in text
    finally:
        await proxy_runner.cleanup()
        await runner.cleanup()
