"""Upstream credentials: CodeArtifact tokens renewed under load, failures, redirects, providers.

Upstreams are :class:`tests.fakes.codeartifact.FakeCodeArtifact` gates in front of the usual
fakes: they accept only unexpired tokens they issued, and issue tokens that live two seconds.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.clients import installed, pip_install
from tests.conftest import Dists, serve_config
from tests.fakes.codeartifact import FakeCodeArtifact
from tests.fakes.npm import FakeNpmRegistry, build_tarball
from tests.fakes.pypi import FakePyPI
from tests.npm_clients import npm

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
}


@pytest.fixture(autouse=True)
def aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
async def gate(pypi: FakePyPI) -> AsyncIterator[FakeCodeArtifact]:
    fake = FakeCodeArtifact(pypi_url=pypi.origin, lifetime=2.0)
    await fake.start()
    yield fake
    await fake.close()


def codeartifact(endpoint: str) -> dict[str, Any]:
    return {
        "type": "codeartifact",
        "domain": "mydomain",
        "domain_owner": "111122223333",
        "region": "us-east-1",
        "duration": "15m",
        "endpoint_url": endpoint,
    }


def config(data: Path, upstreams: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "server": {"data_dir": str(data), "soft_deadline": "2s", "auth": False},
        "upstreams": upstreams,
        "domains": [{"name": "default", "repositories": [{"name": "public", "upstreams": list(upstreams)}]}],
    }


def pypi_upstream(gate: FakeCodeArtifact, credentials: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "format": "pypi",
        "url": f"{gate.origin}/pypi/myrepo/simple/",
        "metadata_ttl": "200ms",
        "retries": 0,
        "credentials": credentials,
        **extra,
    }


async def serve(raw: dict[str, Any]) -> tuple[Any, str]:
    _, runner, url = await serve_config(raw)
    return runner, url


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, str, bytes]:
    async with http.get(url) as resp:
        return resp.status, resp.headers.get("X-Cache", ""), await resp.read()


@pytest.mark.timeout(120)
async def test_tokens_renew_under_load_without_a_failed_request(
    pypi: FakePyPI, gate: FakeCodeArtifact, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    tarball = await asyncio.to_thread(build_tarball, tmp_path / "tgz", "left", "1.0.0")
    async with FakeNpmRegistry() as npm_inner:
        await npm_inner.add_version_async("left", tarball, version="1.0.0")
        npm_gate = FakeCodeArtifact(npm_url=npm_inner.origin, lifetime=2.0)
        await npm_gate.start()
        npm_conn = {
            "format": "npm",
            "url": f"{npm_gate.origin}/npm/myrepo/",
            "metadata_ttl": "200ms",
            "retries": 0,
            "credentials": codeartifact(npm_gate.origin),
        }
        raw = config(
            tmp_path / "data", {"ca-pypi": pypi_upstream(gate, codeartifact(gate.origin)), "ca-npm": npm_conn}
        )
        runner, url = await serve(raw)
        try:
            base = f"{url}/default"
            status, _, page = await get(http, f"{base}/pypi/public/simple/alpha/")
            assert status == 200, page
            files = [f"{base}/pypi/public/files/alpha/{pypi.files('alpha')[0].filename}"]
            failures: list[str] = []
            count = 0
            deadline = time.monotonic() + 20.0

            async def worker(urls: list[str]) -> None:
                nonlocal count
                while time.monotonic() < deadline:
                    for target in urls:
                        status, _, body = await get(http, target)
                        count += 1
                        if status != 200:
                            failures.append(f"{status} {target}: {body[:200]!r}")
                    await asyncio.sleep(0.01)

            npm_urls = [f"{base}/npm/public/left", f"{base}/npm/public/left/-/left-1.0.0.tgz"]

            async def real_clients() -> None:
                # pip and npm themselves, while tokens expire underneath them.
                await asyncio.sleep(5)
                run = await pip_install(f"{base}/pypi/public/simple/", tmp_path / "pip", "alpha")
                if not run.ok:
                    failures.append(f"pip: {run.output[-500:]}")
                app = tmp_path / "app"
                await asyncio.to_thread(app.mkdir)
                await asyncio.to_thread((app / "package.json").write_text, '{"name":"a","version":"1.0.0"}')
                run = await npm(
                    "install", "left@1.0.0", cwd=app, registry=f"{base}/npm/public/", cache=tmp_path / "c"
                )
                if not run.ok:
                    failures.append(f"npm: {run.output[-500:]}")

            await asyncio.gather(
                worker([f"{base}/pypi/public/simple/alpha/", *files]),
                worker([f"{base}/pypi/public/simple/beta/"]),
                worker(npm_urls),
                worker(npm_urls[:1]),
                real_clients(),
            )
            assert failures == [], failures[:5]
            assert count > 200
            for fake in (gate, npm_gate):
                assert all(call.signed for call in fake.calls)
                assert fake.calls[0].query == {
                    "domain": "mydomain",
                    "domain-owner": "111122223333",
                    "duration": "900",
                }
                assert 8 <= len(fake.calls) <= 20, len(fake.calls)  # about 20 s / (0.75 x 2 s)
                assert fake.max_in_flight == 1  # one refresh at a time, however many requests wait
                assert fake.rejected == 0
            async with http.get(f"{url}/-/readyz") as resp:
                state = (await resp.json())["credentials"]
            assert set(state) == {"ca-pypi", "ca-npm"} and state["ca-pypi"]["expires_at"] > time.time()
            assert "ca" not in json.dumps(state).replace("ca-pypi", "").replace("ca-npm", "")  # no token
        finally:
            await runner.cleanup()
            await npm_gate.close()


async def test_token_endpoint_down_then_expired(
    pypi: FakePyPI, gate: FakeCodeArtifact, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    gate.lifetime = 3.0
    runner, url = await serve(
        config(tmp_path / "data", {"ca": pypi_upstream(gate, codeartifact(gate.origin))})
    )
    try:
        page = f"{url}/default/pypi/public/simple/alpha/"
        file = f"{url}/default/pypi/public/files/alpha/{pypi.files('alpha')[0].filename}"
        assert (await get(http, page))[0] == 200 and (await get(http, file))[0] == 200
        gate.token_endpoint_down = True
        until = time.time() + 2.0
        while time.time() < until:  # still valid: renewal fails quietly, requests do not
            assert (await get(http, page))[0] == 200
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)  # now expired
        status, cache, _ = await get(http, page)
        assert (status, cache) == (200, "STALE")
        assert (await get(http, file))[:2] == (200, "HIT")
        async with http.get(f"{url}/default/pypi/public/simple/gamma/") as resp:
            assert resp.status == 502
            assert "credentials for upstream ca" in (await resp.json())["message"]
        gate.token_endpoint_down = False
        await asyncio.sleep(1.1)  # past the retry backoff
        assert (await get(http, f"{url}/default/pypi/public/simple/gamma/"))[0] == 200
    finally:
        await runner.cleanup()


async def test_a_revoked_token_is_replaced_once_and_the_request_retried(
    pypi: FakePyPI, gate: FakeCodeArtifact, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    gate.lifetime = 60.0
    runner, url = await serve(
        config(tmp_path / "data", {"ca": pypi_upstream(gate, codeartifact(gate.origin))})
    )
    try:
        page = f"{url}/default/pypi/public/simple/alpha/"
        assert (await get(http, page))[0] == 200
        calls = len(gate.calls)
        gate.revoke_all()
        await asyncio.sleep(0.3)  # past the metadata TTL
        status, cache, _ = await get(http, page)
        assert (status, cache) == (200, "MISS") or (status, cache) == (200, "REVALIDATED")
        assert len(gate.calls) == calls + 1 and gate.rejected == 1
    finally:
        await runner.cleanup()


async def test_credentials_never_follow_a_redirect_to_another_host(
    pypi: FakePyPI, gate: FakeCodeArtifact, tmp_path: Path, http: aiohttp.ClientSession, dists: Dists
) -> None:
    gate.redirect_files = True
    upstream = pypi_upstream(gate, codeartifact(gate.origin), allow_hosts=["localhost"])
    runner, url = await serve(config(tmp_path / "data", {"ca": upstream}))
    try:
        run = await pip_install(f"{url}/default/pypi/public/simple/", tmp_path / "t", "alpha")
        assert run.ok, run.output
        assert await installed(tmp_path / "t") == {"alpha", "beta"}
        file_requests = [headers for path, headers in pypi.requests if path.startswith("/files/")]
        assert file_requests and all("Authorization" not in h for h in file_requests)
        assert all(h.get("Host", "").startswith("localhost") for h in file_requests)
    finally:
        await runner.cleanup()


async def test_command_and_basic_file_providers(
    pypi: FakePyPI, gate: FakeCodeArtifact, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    # command: a script printing a short-lived token (registered with the gate by the script's
    # counter), re-run ahead of expiry.
    counter = tmp_path / "count"
    script = tmp_path / "token.py"
    code = (
        "import json, pathlib, datetime\n"
        f"p = pathlib.Path({str(counter)!r}); n = int(p.read_text()) + 1 if p.exists() else 1\n"
        "p.write_text(str(n))\n"
        "exp = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=2)\n"
        "print(json.dumps({'token': f'cmd-{n}', 'expiration': exp.isoformat()}))\n"
    )
    await asyncio.to_thread(script.write_text, code)
    for n in range(1, 50):
        gate.tokens[f"cmd-{n}"] = time.time() + 3600
    command = {"type": "command", "command": [sys.executable, str(script)]}
    runner, url = await serve(config(tmp_path / "cmd", {"cmd": pypi_upstream(gate, command)}))
    try:
        page = f"{url}/default/pypi/public/simple/alpha/"
        until = time.time() + 4.0
        while time.time() < until:
            assert (await get(http, page))[0] == 200
            await asyncio.sleep(0.2)
        runs = int(await asyncio.to_thread(counter.read_text))
        assert 2 <= runs <= 5, runs
    finally:
        await runner.cleanup()

    # basic from a file that is rewritten while the proxy runs (a rotated Kubernetes secret).
    secret = tmp_path / "password"
    await asyncio.to_thread(secret.write_text, "first-secret\n")
    gate.tokens["first-secret"] = time.time() + 3600
    basic = {"type": "basic", "username": "aws", "password_file": str(secret)}
    runner, url = await serve(config(tmp_path / "basic", {"file": pypi_upstream(gate, basic)}))
    try:
        page = f"{url}/default/pypi/public/simple/alpha/"
        assert (await get(http, page))[0] == 200
        await asyncio.to_thread(secret.write_text, "second-secret\n")
        gate.tokens.pop("first-secret")
        gate.tokens["second-secret"] = time.time() + 3600
        await asyncio.sleep(0.3)
        assert (await get(http, f"{url}/default/pypi/public/simple/beta/"))[0] == 200
    finally:
        await runner.cleanup()
