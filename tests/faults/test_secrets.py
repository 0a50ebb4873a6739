"""Fault group 8: secrets. Canary credentials are used through a whole run, then looked for.

The promises (README "Security" → Hygiene, "Upstream credentials"; DESIGN invariants 10, 15):
a client token appears in no log line, audit record, metric, error body or file of the data
directory (the index keeps only its SHA-256), and never travels upstream; an upstream credential
goes only to its connection's own origin — scheme, host and port — never to a host a document
names, never across a redirect, and never back to a client or into the logs.

Each secret is looked for in every form it could take on the way: as written, percent-encoded,
base64 alone, and base64 inside a Basic ``user:secret`` pair.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from proxy.observability import JsonFormatter
from tests.conftest import Dists, ProxyFactory, RunningProxy, serve_config
from tests.fakes.dists import build_wheel
from tests.fakes.maven import FakeMavenRepo, build_jar
from tests.fakes.npm import FakeNpmRegistry
from tests.fakes.nuget import FakeNuGetFeed, build_nupkg
from tests.fakes.pypi import FakePyPI
from tests.faults.hostile import Exchange, HostileUpstream
from tests.faults.report import GroupLedger
from tests.faults.test_auth_matrix import ADMIN, basic, bearer, npm_tarball
from tests.maven_clients import pom_xml
from tests.npm_clients import npm_publish_doc

GROUP = "8 secrets"

# Upstream credential canaries, one per connection: recognisable, and nothing else contains them.
UPSTREAM_CANARIES = {
    "pypi-up": ("svc-pypi", "upcanary-pypi-" + "p" * 24),
    "npm-up": ("", "upcanary-npm-" + "n" * 24),  # bearer
    "maven-up": ("svc-maven", "upcanary-maven-" + "m" * 24),
    "nuget-up": ("svc-nuget", "upcanary-nuget-" + "g" * 24),
}


def forms(secret: str, users: Iterable[str] = ("aws",)) -> set[bytes]:
    """The shapes a secret takes on the wire and in careless code."""
    out = {secret, quote(secret, safe=""), base64.b64encode(secret.encode()).decode()}
    out |= {base64.b64encode(f"{user}:{secret}".encode()).decode() for user in users}
    return {f.encode() for f in out}


@dataclass
class Haystack:
    """Everything a secret must not be found in, by place."""

    places: dict[str, list[bytes]] = field(default_factory=dict)

    def add(self, place: str, data: bytes) -> None:
        self.places.setdefault(place, []).append(data)

    def find(self, needles: set[bytes]) -> list[str]:
        return sorted(
            {place for place, items in self.places.items() for data in items for n in needles if n in data}
        )


@dataclass
class Client:
    """A session whose every answer (status, headers, body) goes into the haystack."""

    http: aiohttp.ClientSession
    hay: Haystack
    exempt: list[bytes] = field(default_factory=list)  # the answers that rightly show a secret
    watched: list[str] = field(default_factory=list)  # client secrets whose uses are counted
    uses: int = 0  # requests that carried one of them

    async def call(self, method: str, url: str, *, exempt: bool = False, **kwargs: Any) -> tuple[int, bytes]:
        sent = repr(kwargs.get("headers", {})).encode()
        self.uses += any(f in sent for secret in self.watched for f in forms(secret))
        async with self.http.request(method, url, allow_redirects=False, **kwargs) as resp:
            body = await resp.read()
            record = f"{resp.status} {dict(resp.headers)}\n".encode() + body
            if exempt:
                self.exempt.append(record)
            else:
                self.hay.add(f"answer to {method} {url.split('?')[0]}", record)
            return resp.status, body


async def files_under(root: Path) -> dict[str, bytes]:
    def read() -> dict[str, bytes]:
        return (
            {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} if root.exists() else {}
        )

    return await asyncio.to_thread(read)


def log_text(records: Iterable[logging.LogRecord]) -> bytes:
    """Every record as the JSON log would write it, plus its raw fields (args, extras)."""
    formatter = JsonFormatter()
    lines = []
    for record in records:
        lines.append(formatter.format(record))
        lines.append(repr({k: v for k, v in record.__dict__.items() if k != "exc_info"}))
    return "\n".join(lines).encode()


@pytest.fixture
async def upstreams(dists: Dists, tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    """One fake registry per format, with a package each."""
    async with (
        FakePyPI() as pypi,
        FakeNpmRegistry() as npm,
        FakeMavenRepo(root=tmp_path / "m2-empty") as maven,
        FakeNuGetFeed() as nuget,
    ):
        await pypi.add_file_async("alpha", dists.alpha)
        await pypi.add_file_async("beta", dists.beta)
        left = tmp_path / "left-1.0.0.tgz"
        await asyncio.to_thread(left.write_bytes, npm_tarball("left", "1.0.0", "left"))
        await npm.add_version_async("left", left, version="1.0.0")
        maven.add_version("com.acme", "lib", "1.0")
        nupkg = await asyncio.to_thread(build_nupkg, tmp_path / "nupkgs", "Acme.Alpha", "1.0.0")
        await nuget.add_package_async(nupkg)
        yield {"pypi-up": pypi, "npm-up": npm, "maven-up": maven, "nuget-up": nuget}


def _seen_requests(fake: Any) -> bytes:
    """What a fake received (paths, headers), serialised for searching."""
    return repr(list(fake.requests)).encode()


async def test_canary_tokens_leak_nowhere_in_a_whole_run(
    upstreams: dict[str, Any],
    dists: Dists,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    faults: GroupLedger,
) -> None:
    caplog.set_level(logging.DEBUG)
    secrets_dir = tmp_path / "secrets"
    await asyncio.to_thread(secrets_dir.mkdir)
    admin_file = secrets_dir / "admin"
    await asyncio.to_thread(admin_file.write_text, ADMIN + "\n")
    connections: dict[str, Any] = {}
    urls = {
        "pypi-up": upstreams["pypi-up"].url,
        "npm-up": upstreams["npm-up"].url,
        "maven-up": upstreams["maven-up"].url,
        "nuget-up": upstreams["nuget-up"].url,
    }
    for name, (user, secret) in UPSTREAM_CANARIES.items():
        path = secrets_dir / name
        await asyncio.to_thread(path.write_text, secret + "\n")
        creds = (
            {"type": "bearer", "token_file": str(path)}
            if not user
            else {"type": "basic", "username": user, "password_file": str(path)}
        )
        connections[name] = {
            "format": name.removesuffix("-up"),
            "url": urls[name],
            "metadata_ttl": "10m",
            "retries": 0,
            "credentials": creds,
        }
    data_dir = tmp_path / "data"
    audit_file = tmp_path / "audit" / "trail.jsonl"
    raw = {
        "server": {
            "data_dir": str(data_dir),
            "soft_deadline": "2s",
            "auth": True,
            "admin_token_file": str(admin_file),
            "token_min_duration": "1s",
            "audit_fetches": "all",
            "audit_file": str(audit_file),
        },
        "upstreams": connections,
        "domains": [
            {
                "name": "default",
                "repositories": [
                    {"name": "public", "upstreams": list(connections)},
                    {"name": "team", "upstreams": ["public"]},
                ],
            }
        ],
    }
    config, runner, url = await serve_config(raw)
    proxy = RunningProxy(url=url, config=config, runner=runner)
    hay = Haystack()
    client = Client(http, hay)
    stopped = False
    try:
        # 1. A token, issued once (its answer is the one place it may appear).
        status, body = await client.call(
            "POST",
            url + "/-/api/v1/tokens",
            exempt=True,
            json={
                "domain": "default",
                "repository": "team",
                "principal": "canary",
                "permissions": ["read", "publish", "delete"],
            },
            headers=bearer(ADMIN),
        )
        assert status == 201, body
        issued = json.loads(body)
        canary, canary_id = str(issued["token"]), str(issued["id"])
        client.watched.append(canary)
        team = f"{url}/default"
        b, br = basic(canary), bearer(canary)

        # 2. Reads in every format, each the way its client authenticates.
        wheel = dists.alpha.name
        reads = [
            (f"{team}/pypi/team/simple/alpha/", b),
            (f"{team}/pypi/team/files/alpha/{wheel}", b),
            (f"{team}/npm/team/left", br),
            (f"{team}/npm/team/left/-/left-1.0.0.tgz", br),
            (f"{team}/maven/team/com/acme/lib/1.0/lib-1.0.pom", b),
            (f"{team}/maven/team/com/acme/lib/1.0/lib-1.0.jar", b),
            (f"{team}/maven/team/com/acme/lib/maven-metadata.xml", b),
            (f"{team}/nuget/team/v3/index.json", b),
            (f"{team}/nuget/team/v3-flatcontainer/acme.alpha/index.json", b),
            (f"{team}/nuget/team/v3-flatcontainer/acme.alpha/1.0.0/acme.alpha.1.0.0.nupkg", b),
            (f"{team}/npm/team/-/whoami", br),
        ]
        for read_url, headers in reads:
            status, body = await client.call("GET", read_url, headers=headers)
            assert status == 200, (read_url, status, body[:300])
        status, _ = await client.call(
            "POST",
            f"{team}/npm/team/-/npm/v1/security/audits/quick",
            data=b'{"name":"app","version":"1.0.0","requires":{"left":"1.0.0"}}',
            headers={**br, "Content-Type": "application/json"},
        )
        assert status < 500 or status in (502, 504)  # passed through; what matters is what it carried

        # 3. Publishes in every format.
        new_wheel = await asyncio.to_thread(build_wheel, tmp_path / "w", "canarylib", "1.0")
        form = aiohttp.FormData()
        for key, value in ((":action", "file_upload"), ("name", "canarylib"), ("version", "1.0")):
            form.add_field(key, value)
        form.add_field("content", await asyncio.to_thread(new_wheel.read_bytes), filename=new_wheel.name)
        status, body = await client.call("POST", f"{team}/pypi/team/", data=form, headers=b)
        assert status in (200, 201), body
        tgz = npm_tarball("@acme/canary", "1.0.0", "canary")
        status, body = await client.call(
            "PUT",
            f"{team}/npm/team/@acme%2fcanary",
            json=npm_publish_doc("@acme/canary", "1.0.0", tgz),
            headers=br,
        )
        assert status in (200, 201), body
        for name, data in (
            ("canary-1.0.jar", build_jar({"c.properties": b"c=1\n"})),
            ("canary-1.0.pom", pom_xml("com.acme", "canary", "1.0")),
        ):
            status, body = await client.call(
                "PUT", f"{team}/maven/team/com/acme/canary/1.0/{name}", data=data, headers=b
            )
            assert status in (200, 201), body
        nupkg = await asyncio.to_thread(build_nupkg, tmp_path / "push", "Acme.Canary", "1.0.0")
        push = aiohttp.FormData()
        push.add_field("package", await asyncio.to_thread(nupkg.read_bytes), filename=nupkg.name)
        status, body = await client.call(
            "PUT", f"{team}/nuget/team/api/v2/package", data=push, headers={"X-NuGet-ApiKey": canary}
        )
        assert status in (200, 201), body

        # 4. The CodeArtifact-style exchange: a second secret, shown once.
        status, body = await client.call(
            "POST", f"{url}/v1/authorization-token?domain=default&duration=900", exempt=True, headers=br
        )
        assert status == 200, body
        renewed = str(json.loads(body)["authorizationToken"])
        client.watched.append(renewed)
        status, _ = await client.call("GET", f"{team}/pypi/team/simple/canarylib/", headers=basic(renewed))
        assert status == 200

        # 5. Failed attempts: misused, mangled, out of scope, refused.
        failures: list[tuple[str, str, dict[str, str], int]] = [
            ("GET", f"{team}/pypi/team/simple/alpha/", {"Authorization": canary}, 401),
            ("GET", f"{team}/pypi/team/simple/alpha/", {"Authorization": f"Token {canary}"}, 401),
            ("GET", f"{team}/pypi/team/simple/alpha/", {"Authorization": f"{canary} {canary}"}, 401),
            ("GET", f"{team}/pypi/team/simple/alpha/", basic(canary + "x"), 401),
            ("GET", f"{team}/npm/team/left", bearer(canary[:-1]), 401),
            ("GET", f"{team}/pypi/public/simple/alpha/", b, 403),
            ("GET", f"{url}/-/api/v1/tokens?domain=default", br, 403),
            ("GET", f"{url}/-/api/v1/audit", br, 403),
            ("PUT", f"{team}/nuget/public/api/v2/package", {"X-NuGet-ApiKey": canary}, 403),
            ("GET", f"{team}/pypi/team/simple/nosuch-package/", b, 404),
            ("GET", f"{team}/pypi/team/files/alpha/not-a-file.whl", b, 404),
        ]
        for method, target, headers, expected in failures:
            status, body = await client.call(method, target, headers=headers)
            assert status == expected, (method, target, status, body[:300])
        # An upstream failure: the 502 names the connection, never its credential.
        await upstreams["pypi-up"].stop_listening()
        status, body = await client.call("GET", f"{team}/pypi/team/simple/beta/", headers=b)
        assert status in (502, 504), body
        await upstreams["pypi-up"].resume_listening()

        # 6. Revoked: used once more, and refused.
        status, _ = await client.call("DELETE", f"{url}/-/api/v1/tokens/{canary_id}", headers=bearer(ADMIN))
        assert status == 204
        status, _ = await client.call("GET", f"{team}/pypi/team/simple/alpha/", headers=b)
        assert status == 401

        # 7. What operators look at.
        for operator_path in (
            "/-/metrics",
            "/-/readyz",
            "/-/healthz",
            "/-/api/v1/audit",
            "/-/api/v1/tokens?domain=default",
        ):
            status, _ = await client.call("GET", url + operator_path, headers=bearer(ADMIN))
            assert status == 200, operator_path
        for name, data in (await files_under(data_dir)).items():  # WAL and all, while running
            hay.add(f"data dir (running): {name}", data)
        await proxy.stop()
        stopped = True
    finally:
        if not stopped:
            await proxy.stop()

    for name, data in (await files_under(data_dir)).items():
        hay.add(f"data dir: {name}", data)
    for name, data in (await files_under(audit_file.parent)).items():
        hay.add(f"audit file: {name}", data)
    hay.add("logs", log_text(caplog.records))
    trail = hay.places.get(f"audit file: {audit_file}", [b""])[0]
    assert b"token_revoke" in trail and b"auth_failure" in trail  # the trail was written, failures too

    # Client tokens: nowhere, upstream included.
    client_secrets = {"token": canary, "exchanged token": renewed, "bootstrap admin secret": ADMIN}
    for fake_name, fake in upstreams.items():
        hay.add(f"requests received by {fake_name}", _seen_requests(fake))
    leaks: list[str] = []
    for label, secret in client_secrets.items():
        needles = forms(secret)
        assert any(n in r for r in client.exempt for n in needles) or label == "bootstrap admin secret"
        leaks += [f"{label} in {place}" for place in hay.find(needles)]
    faults.inject("request carrying a client canary", client.uses)

    # Upstream credentials: only in the requests their own upstream received.
    for name, (user, secret) in UPSTREAM_CANARIES.items():
        needles = forms(secret, [user] if user else [])
        own = _seen_requests(upstreams[name])
        assert any(n in own for n in needles), f"{name}'s credential never reached its upstream"
        elsewhere = Haystack({k: v for k, v in hay.places.items() if k != f"requests received by {name}"})
        leaks += [f"{name} credential in {place}" for place in elsewhere.find(needles)]
    faults.inject("upstream credential in use", len(UPSTREAM_CANARIES))
    # The scan saw what it had to: the index (where the token's hash is, as it should be) and
    # the access log.
    digest = hashlib.sha256(canary.encode()).hexdigest().encode()
    assert any(digest in d for place, items in hay.places.items() if "index.sqlite3" in place for d in items)
    assert any(r.name == "aiohttp.access" for r in caplog.records)
    faults.zero("secrets_leaked", len(leaks), "\n".join(leaks))


# --- upstream credentials and other origins ------------------------------------------------------------


@dataclass
class Seen:
    host: str
    path: str
    authorization: str


async def test_upstream_credentials_go_only_to_their_exact_origin(
    pypi: FakePyPI,
    dists: Dists,
    tmp_path: Path,
    proxy_factory: ProxyFactory,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    faults: GroupLedger,
) -> None:
    """The connection is ``http://127.0.0.1:H``. Its documents point files at another port
    (``localhost:P``, allowed), and its file URLs redirect to the same server under another host
    name and on to another port; metadata redirects too. The credential reaches only H as
    127.0.0.1; what arrives anywhere else arrives without it, and the bytes are still right."""
    caplog.set_level(logging.DEBUG)
    user, secret = "svc", "upcanary-origin-" + "o" * 24
    needles = forms(secret, [user])
    secret_file = tmp_path / "upstream-secret"
    await asyncio.to_thread(secret_file.write_text, secret)
    await pypi.add_file_async("alpha", dists.alpha)
    await pypi.add_file_async("beta", dists.beta)
    await pypi.add_file_async("gamma", dists.gamma_nometa, with_metadata=False)
    direct = f"http://localhost:{pypi.port}"
    at_origin: list[Seen] = []

    async with HostileUpstream(pypi.origin) as hostile:
        other_name = hostile.origin.replace("127.0.0.1", "localhost")  # same server, another host

        async def record_and_relay(ex: Exchange) -> bool:
            """Note what arrived here, then relay without it (so the backend sees only what the
            proxy sends it directly), pointing alpha's files at the backend's other name."""
            at_origin.append(Seen(ex.headers.get("Host", ""), ex.path, ex.headers.get("Authorization", "")))
            headers = {k: v for k, v in ex.headers.items() if k.lower() != "authorization"}
            if ex.path.startswith("/files/beta"):  # → the same server under another host name
                await ex.reply(302, [("Location", other_name + "/hop" + ex.path)], b"")
                return True
            if ex.path.startswith("/hop/"):  # → another port
                await ex.reply(302, [("Location", direct + ex.path.removeprefix("/hop"))], b"")
                return True
            if ex.path.startswith("/simple/gamma"):  # metadata, redirected to another port
                await ex.reply(301, [("Location", direct + ex.path)], b"")
                return True
            relayed = await hostile.fetch_backend(ex.method, ex.path, headers, ex.body)
            body = relayed.body
            if ex.path.startswith("/simple/alpha"):
                body = body.replace(hostile.origin.encode(), direct.encode())
            await ex.reply(relayed.status, relayed.headers, body)
            return True

        hostile.rules["/*"] = record_and_relay
        proxy = await proxy_factory(
            hostile.url("/simple/"),
            upstream_allow_hosts=["localhost"],
            upstream_credentials={"type": "basic", "username": user, "password_file": str(secret_file)},
        )
        answers: list[bytes] = []
        for project, dist in (("alpha", dists.alpha), ("beta", dists.beta), ("gamma", dists.gamma_nometa)):
            async with http.get(proxy.simple() + f"{project}/") as resp:
                page = await resp.read()
                assert resp.status == 200, page
                answers.append(f"{dict(resp.headers)}".encode() + page)
            if project == "gamma":
                continue  # its page came from P, whose file links name 127.0.0.1: fenced (group 7)
            async with http.get(proxy.files(project, dist.name)) as resp:
                data = await resp.read()
                answers.append(f"{dict(resp.headers)}".encode())
                assert resp.status == 200 and data == await asyncio.to_thread(dist.read_bytes), project
        async with http.get(proxy.url + "/-/readyz") as resp:
            answers.append(await resp.read())
        async with http.get(proxy.url + "/-/metrics") as resp:
            answers.append(await resp.read())
        data_files = await files_under(proxy.data_dir)

    faults.inject("cross-origin file link", 1)
    faults.inject("redirect to another host name", 1)
    faults.inject("redirect to another port", 2)
    # Where it belongs: the configured origin (127.0.0.1:H) got it.
    origin_host = hostile.origin.removeprefix("http://")
    with_secret = [s for s in at_origin if any(n in s.authorization.encode() for n in needles)]
    assert with_secret and all(s.host == origin_host for s in with_secret), with_secret
    # The same server under another name, and the backend on its own port, never did; and each
    # detour was really taken (else this proves nothing).
    renamed = [s for s in at_origin if s.host != origin_host]
    assert renamed and all(s.path.startswith("/hop/") for s in renamed), renamed
    direct_hits = [path for path, _ in pypi.requests]
    assert any(p.startswith("/files/alpha") for p in direct_hits), direct_hits
    assert any(p.startswith("/files/beta") for p in direct_hits), direct_hits
    assert any(p.startswith("/simple/gamma") for p in direct_hits), direct_hits
    leaks = [f"to {s.host}{s.path}" for s in renamed if any(n in s.authorization.encode() for n in needles)]
    leaks += [
        f"to {direct}{path}"
        for path, headers in pypi.requests
        if any(n in repr(headers).encode() for n in needles)
    ]
    leaks += [
        f"in an answer to the client ({i})" for i, a in enumerate(answers) if any(n in a for n in needles)
    ]
    leaks += [f"in {name}" for name, data in data_files.items() if any(n in data for n in needles)]
    if any(n in log_text(caplog.records) for n in needles):
        leaks.append("in the logs")
    faults.zero("secrets_leaked", len(leaks), "\n".join(leaks))


async def test_a_password_written_into_an_upstream_url_is_never_shown(
    pypi: FakePyPI,
    dists: Dists,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    faults: GroupLedger,
) -> None:
    """``PIP_INDEX_URL=https://user:password@mirror/simple/`` is how many machines are set up, and
    the embedded default reads pip's index URL. The README says secrets are only referenced,
    never written into the config: such a URL is refused at load, without repeating the secret;
    were it accepted, the secret must still appear in no log, answer or file."""
    from proxy.config import ConfigError, Overrides, parse_config
    from tests.conftest import proxy_config

    caplog.set_level(logging.DEBUG)
    secret = "upcanary-inline-" + "i" * 24
    needles = forms(secret, ["svc"])
    await pypi.add_file_async("alpha", dists.alpha)
    inline = pypi.url.replace("http://", f"http://svc:{secret}@")
    raw = proxy_config(tmp_path / "data", inline)
    faults.inject("password inside an upstream URL", 1)
    leaks: list[str] = []
    try:
        parse_config(raw, Overrides(), {})
    except ConfigError as exc:
        if any(n in str(exc).encode() for n in needles):
            leaks.append("in the configuration error")
        assert "credentials" in str(exc)  # says what to do instead
    else:
        config, runner, url = await serve_config(raw)
        try:
            answers = []
            for path in ("/simple/alpha/", f"/files/alpha/{dists.alpha.name}", "/simple/nosuch/", "/simple/"):
                async with http.get(f"{url}/default/pypi/public{path}") as resp:
                    answers.append(f"{dict(resp.headers)}".encode() + await resp.read())
            await pypi.stop_listening()  # and the errors that name the upstream
            for path in ("/simple/beta/", "/simple/gamma/"):
                async with http.get(f"{url}/default/pypi/public{path}") as resp:
                    answers.append(f"{dict(resp.headers)}".encode() + await resp.read())
            for path in ("/-/readyz", "/-/metrics"):
                async with http.get(url + path) as resp:
                    answers.append(await resp.read())
        finally:
            await runner.cleanup()
        leaks += [f"in answer {i}" for i, a in enumerate(answers) if any(n in a for n in needles)]
        files = await files_under(config.server.data_dir)
        leaks += [f"in {name}" for name, data in files.items() if any(n in data for n in needles)]
    if any(n in log_text(caplog.records) for n in needles):
        leaks.append("in the logs")
    faults.zero("secrets_leaked", len(leaks), "\n".join(leaks))


async def test_a_password_in_pips_index_url_goes_only_to_that_origin(
    pypi: FakePyPI,
    dists: Dists,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    faults: GroupLedger,
) -> None:
    """``aws codeartifact login --tool pip`` writes the token into pip's index URL, and the
    embedded default reads that URL: the proxy must keep working with it, send the password to
    that origin only (as Basic), and show it nowhere (logs, answers, the data directory)."""
    from tests.conftest import proxy_config

    caplog.set_level(logging.DEBUG)
    secret = "upcanary-pipurl-" + "p" * 24
    needles = forms(secret, ["svc"])
    await pypi.add_file_async("alpha", dists.alpha)
    monkeypatch.setenv("PIP_INDEX_URL", pypi.url.replace("http://", f"http://svc:{secret}@"))
    raw = proxy_config(tmp_path / "data", "pip:index-url")
    faults.inject("password inside pip's index URL", 1)
    config, runner, url = await serve_config(raw)
    answers: list[bytes] = []
    try:
        assert config.upstreams["fake"].url == pypi.url  # the URL kept without its userinfo
        for path in ("/simple/alpha/", f"/files/alpha/{dists.alpha.name}", "/simple/nosuch/"):
            async with http.get(f"{url}/default/pypi/public{path}") as resp:
                answers.append(f"{resp.status} {dict(resp.headers)}".encode() + await resp.read())
        assert answers[0].startswith(b"200") and answers[1].startswith(b"200")
        await pypi.stop_listening()  # the 502 names the upstream: without the password
        async with http.get(f"{url}/default/pypi/public/simple/beta/") as resp:
            answers.append(f"{resp.status} {dict(resp.headers)}".encode() + await resp.read())
    finally:
        await runner.cleanup()
    sent = [headers.get("Authorization") for _, headers in pypi.requests]
    assert sent and all(h == basic(secret, "svc")["Authorization"] for h in sent)
    leaks = [f"in answer {i}" for i, a in enumerate(answers) if any(n in a for n in needles)]
    files = await files_under(config.server.data_dir)
    leaks += [f"in {name}" for name, data in files.items() if any(n in data for n in needles)]
    if any(n in log_text(caplog.records) for n in needles):
        leaks.append("in the logs")
    faults.zero("secrets_leaked", len(leaks), "\n".join(leaks))
