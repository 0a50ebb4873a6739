"""Work done once for all processes sharing an index (issue #12): leases, gc/verify, credentials.

Leases (storage/leases.py) are checked on both backends with two index connections standing for
two processes. Credentials: two in-process proxies share one PostgreSQL index and one
FakeCodeArtifact whose tokens live two seconds; the fake counts GetAuthorizationToken calls and
accepts only unexpired tokens it issued. gc and verify: a lease held by "another node" makes the
automatic gc skip and the CLI refuse (or wait); on a shared moto bucket, a blob uploaded without
its row yet survives gc, and verify --repair on a node without the blob in its cache keeps the row.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import itertools
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.config import Overrides, parse_config
from proxy.errors import UpstreamUnavailable
from proxy.model import Digest
from proxy.storage import lifecycle
from proxy.storage.index import Index
from proxy.storage.leases import PID_NAMESPACE, LeaseBusy, Leases, node_id
from proxy.storage.postgres import PostgresIndex
from proxy.storage.s3 import S3Client
from proxy.upstream import credentials
from proxy.upstream.credentials import SharedCredentials
from tests.cluster import bucket_keys, s3_storage, to_toml, use_fake_aws
from tests.conftest import proxy_config, serve_config
from tests.fakes.codeartifact import FakeCodeArtifact
from tests.fakes.pypi import FakePyPI
from tests.postgres import connect
from tests.s3_server import FAKE_ENV, MotoServer

ROOT = Path(__file__).resolve().parent.parent
KEY_ENV = "TEST_CLUSTER_LEASES_KEY"
LIFETIME = 2.0  # the fake's tokens: renewed after 1.5 s (75 %), dead after 2 s
PERIOD = credentials.REFRESH_RATIO * LIFETIME
PROJECTS = ("alpha", "beta")

# --- (a) leases on both backends -----------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str | None:
    """None for SQLite, else the DSN of a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return None
    return str(request.getfixturevalue("postgres_dsn"))


@pytest.fixture
async def two(backend: str | None, tmp_path: Path) -> AsyncIterator[tuple[Index, Index]]:
    """Two connections to one index, as two processes (workers, nodes) have."""
    if backend is None:
        a, b = Index(tmp_path / "index.sqlite3"), Index(tmp_path / "index.sqlite3")
    else:
        a, b = PostgresIndex(backend, 2), PostgresIndex(backend, 2)
    await a.open()
    await b.open()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def test_a_lease_has_one_holder_until_released_or_lapsed(two: tuple[Index, Index]) -> None:
    a, b = Leases(two[0]), Leases(two[1])
    assert await a.acquire("gc", "node-a", 30)
    assert not await b.acquire("gc", "node-b", 30)  # exclusive
    assert await a.acquire("gc", "node-a", 30)  # ours: taken again (extended)
    info = await b.holder("gc")
    assert info is not None and info.holder == "node-a" and info.until > time.time() + 25
    assert not await b.renew("gc", "node-b", 30)  # not b's to renew ...
    await b.release("gc", "node-b")  # ... nor to release
    assert (await a.holder("gc") or pytest.fail("released by a non-holder")).holder == "node-a"
    await a.release("gc", "node-a")
    assert await b.holder("gc") is None
    assert await b.acquire("gc", "node-b", 30)  # free again

    # Lapsed: a holder that died without releasing frees the lease when its time is up.
    assert await a.acquire("credential:ca", "node-a", 0.3)
    assert not await b.acquire("credential:ca", "node-b", 30)
    await asyncio.sleep(0.4)
    assert await b.holder("credential:ca") is None
    assert await b.acquire("credential:ca", "node-b", 30)
    assert not await a.renew("credential:ca", "node-a", 30)  # a lost it: renewing says so
    assert (await a.holder("credential:ca") or pytest.fail("no holder")).holder == "node-b"

    # Renewed in time, a short lease is never taken over.
    assert await a.acquire("renewed", "node-a", 0.3)
    for _ in range(3):
        await asyncio.sleep(0.15)
        assert await a.renew("renewed", "node-a", 0.3)
        assert not await b.acquire("renewed", "node-b", 30)

    # Many at once, from both connections: exactly one wins.
    wins = await asyncio.gather(*(Leases(two[i % 2]).acquire("race", f"node-{i}", 30) for i in range(8)))
    assert wins.count(True) == 1


async def test_a_dead_holder_on_this_machine_is_taken_over_at_once(two: tuple[Index, Index]) -> None:
    """A killed gc must not block the next one on the same machine for the lease's lifetime; a
    holder elsewhere (another host, another pid namespace) or still alive keeps its lease."""
    a, b = (Leases(index) for index in two)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await proc.wait()  # a pid that existed on this machine and is gone now
    host = node_id().split(":", 1)[0]
    dead = f"{host}:{proc.pid}:00000000@{PID_NAMESPACE}"
    elsewhere = f"{host}:{proc.pid}:00000000@1"
    alive = f"{host}:{os.getppid()}:00000000@{PID_NAMESPACE}"
    for holder, taken in ((elsewhere, False), (alive, False), (dead, True)):
        assert await a.acquire("gc", holder, 60)
        assert await b.acquire("gc", "node-b", 60) is taken, holder
        info = await a.holder("gc")
        assert info is not None and info.holder == ("node-b" if taken else holder)
        await a.release("gc", info.holder)


async def test_hold_renews_names_the_holder_and_can_wait(two: tuple[Index, Index]) -> None:
    a, b = Leases(two[0]), Leases(two[1])
    async with a.hold("gc", "node-a", 0.45):
        await asyncio.sleep(0.7)  # longer than the ttl: kept alive by renewals every 0.15 s
        with pytest.raises(LeaseBusy) as busy:
            async with b.hold("gc", "node-b", 30):
                pytest.fail("two holders at once")
        assert busy.value.info.holder == "node-a"
        waiter = asyncio.create_task(_hold_briefly(b, wait=10))
        await asyncio.sleep(0.3)
        assert not waiter.done()  # b waits for a ...
    assert await asyncio.wait_for(waiter, 10) == "node-b"  # ... and gets it once a lets go
    assert await a.holder("gc") is None  # released at the end of the body


async def _hold_briefly(leases: Leases, *, wait: float) -> str:
    async with leases.hold("gc", "node-b", 30, wait=wait, poll=0.05):
        info = await leases.holder("gc")
        assert info is not None
        return info.holder


# --- (b) upstream credentials renewed once for the cluster ---------------------------------------


@pytest.fixture
async def gate(pypi: FakePyPI, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeCodeArtifact]:
    use_fake_aws(monkeypatch)  # what the proxy signs GetAuthorizationToken with
    fake = FakeCodeArtifact(pypi_url=pypi.origin, lifetime=LIFETIME)
    await fake.start()
    yield fake
    await fake.close()


def ca_node(data: Path, gate: FakeCodeArtifact, dsn: str, *, key: bool) -> dict[str, Any]:
    server: dict[str, Any] = {"data_dir": str(data), "soft_deadline": "2s", "auth": False}
    if key:
        server["encryption_key_env"] = KEY_ENV
    upstream = {
        "format": "pypi",
        "url": f"{gate.origin}/pypi/myrepo/simple/",
        "metadata_ttl": "100ms",  # every page request past 100 ms goes upstream with the token
        "retries": 0,
        "credentials": {
            "type": "codeartifact",
            "domain": "mydomain",
            "domain_owner": "111122223333",
            "region": "us-east-1",
            "duration": "15m",
            "endpoint_url": gate.origin,
        },
    }
    return {
        "server": server,
        "index": {"url": dsn},
        "upstreams": {"ca": upstream},
        "domains": [{"name": "default", "repositories": [{"name": "public", "upstreams": ["ca"]}]}],
    }


async def page(http: aiohttp.ClientSession, url: str, project: str = "alpha") -> int:
    async with http.get(f"{url}/default/pypi/public/simple/{project}/") as resp:
        await resp.read()
        return resp.status


async def ca_status(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(f"{url}/-/readyz") as resp:
        status: dict[str, Any] = (await resp.json())["credentials"]["ca"]
        return status


async def traffic(http: aiohttp.ClientSession, urls: list[str], seconds: float) -> list[int]:
    statuses: list[int] = []
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        # A project per node: each revalidates its own page upstream, with its token, every 100 ms.
        statuses += await asyncio.gather(
            *(page(http, url, project) for url, project in zip(urls, PROJECTS, strict=False))
        )
        await asyncio.sleep(0.05)
    return statuses


@pytest.mark.timeout(60)
async def test_two_nodes_renew_each_token_once_and_the_survivor_takes_over(
    gate: FakeCodeArtifact,
    postgres_dsn: str,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(KEY_ENV, base64.b64encode(os.urandom(32)).decode())
    _, runner_a, url_a = await serve_config(ca_node(tmp_path / "a", gate, postgres_dsn, key=True))
    _, runner_b, url_b = await serve_config(ca_node(tmp_path / "b", gate, postgres_dsn, key=True))
    try:
        assert await page(http, url_a) == 200
        await asyncio.sleep(0.3)  # a's page in the shared index is stale: b goes upstream too
        assert await page(http, url_b) == 200
        assert len(gate.calls) == 1  # b took a's token from the index

        started = time.monotonic()
        statuses = await traffic(http, [url_a, url_b], 2.5 * PERIOD)
        elapsed = time.monotonic() - started
        assert set(statuses) == {200} and gate.rejected == 0  # both nodes sent valid tokens
        times = [call.at for call in gate.calls]
        # One call per renewal period for both nodes together: never two close together (two
        # nodes renewing each for itself call in pairs, a few milliseconds apart).
        assert len(times) >= 2, "no renewal happened"
        assert len(times) <= 2 + elapsed / PERIOD
        assert min(b - a for a, b in itertools.pairwise(times)) > PERIOD / 2, times
        # Both nodes say the same process asked for the token they use: the one the index names.
        async with connect(postgres_dsn) as db:
            row = await db.fetchrow("SELECT sealed, renewed_by FROM shared_credentials WHERE upstream = 'ca'")
        assert row is not None
        a_status, b_status = await ca_status(http, url_a), await ca_status(http, url_b)
        assert a_status["shared"] and b_status["shared"]
        assert a_status["renewed_by"] == b_status["renewed_by"] == row["renewed_by"]
        # ... and both hold the newest token the fake issued.
        assert a_status["expires_at"] == b_status["expires_at"] == max(gate.tokens.values())
        # The index holds the token sealed, never in the clear (invariant 15).
        assert gate.tokens and not any(token.encode() in bytes(row["sealed"]) for token in gate.tokens)

        # Node a goes away: b keeps renewing alone (tokens live 2 s, so 3 s of 200s need new ones).
        await runner_a.cleanup()
        calls = len(gate.calls)
        statuses = await traffic(http, [url_b], LIFETIME + PERIOD)
        assert set(statuses) == {200} and gate.rejected == 0
        assert len(gate.calls) > calls
        assert gate.calls[-1].at > time.time() - LIFETIME - PERIOD
    finally:
        await runner_b.cleanup()
        await runner_a.cleanup()


async def test_without_an_encryption_key_each_node_renews_for_itself(
    gate: FakeCodeArtifact,
    postgres_dsn: str,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="proxy.credentials")
    _, runner_a, url_a = await serve_config(ca_node(tmp_path / "a", gate, postgres_dsn, key=False))
    _, runner_b, url_b = await serve_config(ca_node(tmp_path / "b", gate, postgres_dsn, key=False))
    try:
        assert await page(http, url_a) == 200
        await asyncio.sleep(0.3)  # a's page in the shared index is stale: b goes upstream too
        assert await page(http, url_b) == 200
        assert len(gate.calls) == 2  # nothing shared: each node asked for its own token
        said = [r.getMessage() for r in caplog.records if "renewed by each process" in r.getMessage()]
        assert len(said) == 2 and "encryption_key" in said[0]  # once per node, saying why
        assert not (await ca_status(http, url_a))["shared"]
        async with connect(postgres_dsn) as db:
            assert await db.fetchval("SELECT count(*) FROM shared_credentials") == 0
    finally:
        await runner_b.cleanup()
        await runner_a.cleanup()


async def test_a_renewer_that_died_holds_the_others_up_only_until_its_lease_lapses(
    two: tuple[Index, Index], monkeypatch: pytest.MonkeyPatch
) -> None:
    from proxy.storage.crypto import Sealer, StaticKeys

    monkeypatch.setattr(credentials, "CREDENTIAL_LEASE_TTL", 1.0)
    sealer = Sealer(StaticKeys([base64.b64encode(os.urandom(32)).decode()], "test"))
    # The dead node took the lease to renew, and died before it stored anything.
    assert await Leases(two[0]).acquire("credential:ca", "dead-node", 1.0)
    fetched: list[float] = []

    async def fetch() -> tuple[str, float]:
        fetched.append(time.monotonic())
        return f"token-{len(fetched)}", time.time() + 60

    alive = SharedCredentials(two[1], sealer, "live-node")
    started = time.monotonic()
    got = await asyncio.wait_for(alive.obtain("ca", fetch), 10)
    assert got.token == "token-1" and got.renewed_by == "live-node" and len(fetched) == 1
    assert 0.8 < fetched[0] - started < 5  # waited for the lapse, no longer
    # The other process takes the stored row; a 401 (newer_than) makes it renew again.
    other = SharedCredentials(two[0], sealer, "other-node")
    again = await other.obtain("ca", fetch)
    assert (again.token, again.renewed_by, len(fetched)) == ("token-1", "live-node", 1)
    renewed = await other.obtain("ca", fetch, newer_than=again.issued_at)
    assert (renewed.token, renewed.renewed_by, len(fetched)) == ("token-2", "other-node", 2)
    # A key this process lacks cannot open the row: it renews for itself rather than fail.
    stranger = SharedCredentials(two[1], Sealer(StaticKeys([base64.b64encode(os.urandom(32)).decode()], "x")))
    assert (await stranger.obtain("ca", fetch)).token == "token-3"
    # A renewer that lives but never finishes: the wait is bounded, and says who.
    monkeypatch.setattr(credentials, "CREDENTIAL_LEASE_TTL", 0.5)
    async with Leases(two[0]).hold("credential:slow", "stuck-node", 0.5):
        with pytest.raises(UpstreamUnavailable, match="stuck-node has been renewing"):
            await asyncio.wait_for(alive.obtain("slow", fetch), 10)
    assert len(fetched) == 3


async def test_processes_due_at_once_fetch_one_token(two: tuple[Index, Index]) -> None:
    """``serve --workers N`` on one SQLite file, or nodes on PostgreSQL: one fetch for all."""
    from proxy.storage.crypto import Sealer, StaticKeys

    sealer = Sealer(StaticKeys([base64.b64encode(os.urandom(32)).decode()], "test"))
    fetched: list[str] = []

    async def fetch() -> tuple[str, float]:
        fetched.append("call")
        await asyncio.sleep(0.2)  # slow enough for every process to arrive meanwhile
        return f"token-{len(fetched)}", time.time() + 60

    processes = [SharedCredentials(two[i % 2], sealer) for i in range(4)]
    got = await asyncio.wait_for(asyncio.gather(*(p.obtain("ca", fetch) for p in processes)), 10)
    assert fetched == ["call"] and {g.token for g in got} == {"token-1"}
    assert len({g.renewed_by for g in got}) == 1


# --- (c) gc and verify with several nodes ----------------------------------------------------------


def cli_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("ARTIFACT_PROXY_")}


async def run_cli(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        *args,
        cwd=ROOT,
        env=cli_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode() + err.decode()


@pytest.mark.timeout(60)
async def test_gc_runs_on_one_node_at_a_time(
    pypi: FakePyPI,
    postgres_dsn: str,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO, logger="proxy")
    raw = proxy_config(tmp_path / "node", pypi.url, gc_max_size="1", gc_interval="1s")
    raw["index"] = {"url": postgres_dsn}
    config_file = tmp_path / "node.toml"
    await asyncio.to_thread(config_file.write_text, to_toml(raw), encoding="utf-8")
    other = PostgresIndex(postgres_dsn, 2)
    await other.open()
    assert await Leases(other).acquire("gc", "node-b:42:cafe", 60)
    _, runner, url = await serve_config(raw)
    try:
        filename = pypi.files("alpha")[0].filename
        async with http.get(f"{url}/default/pypi/public/files/alpha/{filename}") as resp:
            assert resp.status == 200
            await resp.read()
        # "Another node" runs gc: this node's automatic gc skips its rounds, the CLI refuses;
        # with --wait (started alongside) it runs once the other lets go.
        refused = asyncio.create_task(run_cli("gc", "--max-size", "1", "--config", str(config_file)))
        waiting = asyncio.create_task(
            run_cli("gc", "--max-size", "1GiB", "--wait", "30s", "--config", str(config_file))
        )
        finished: list[float] = []
        waiting.add_done_callback(lambda _: finished.append(time.monotonic()))
        await _until(lambda: any("skipped this round" in r.getMessage() for r in caplog.records), 10)
        assert any("node-b:42:cafe" in r.getMessage() for r in caplog.records)
        assert await _rows(other) == 1  # the budget of 1 byte was not enforced
        code, said = await refused
        assert code == 1 and "another node is running gc" in said and "node-b:42:cafe" in said, said
        await asyncio.sleep(0.5)  # the waiting one started with the refused one: it is waiting now
        released = time.monotonic()
        await Leases(other).release("gc", "node-b:42:cafe")
        code, said = await waiting
        assert finished[0] > released  # it waited for the lease
        assert code == 0 and "blob store:" in said, said
        # And the node's own gc runs again, now that nobody else holds the lease.
        await _until(lambda: _rows(other), 10, want=0)
    finally:
        await runner.cleanup()
        await other.close()


async def _rows(index: Index) -> int:
    async with index.db.execute("SELECT COUNT(*) FROM assets") as cur:
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def _until(check: Any, seconds: float, want: Any = True) -> None:
    deadline = time.monotonic() + seconds
    while True:
        got = check()
        if asyncio.iscoroutine(got):
            got = await got
        if got == want:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"still {got!r} after {seconds}s")
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def node_services(raw: dict[str, Any]) -> AsyncIterator[Any]:
    """Another node's services (the CLI's wiring) over the shared index and bucket."""
    from proxy.cli_admin import open_services

    config = parse_config(raw, Overrides(), os.environ)
    async with open_services(config) as pipeline:
        await asyncio.to_thread(pipeline.blobs.prepare)
        yield pipeline


@pytest.mark.timeout(60)
async def test_gc_and_verify_on_another_node_keep_what_the_bucket_holds(
    pypi: FakePyPI,
    postgres_dsn: str,
    moto_s3: MotoServer,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_fake_aws(monkeypatch)
    storage = await s3_storage(moto_s3.endpoint, "leases-gc")
    raw_a = proxy_config(tmp_path / "a", pypi.url)
    raw_a["index"], raw_a["storage"] = {"url": postgres_dsn}, storage
    raw_b = {**raw_a, "server": {**raw_a["server"], "data_dir": str(tmp_path / "b")}}
    _, runner, url = await serve_config(raw_a)
    try:
        # Node a caches a file: its row, its object in the bucket, its copy in a's cache.
        wheel = pypi.files("alpha")[0]
        async with http.get(f"{url}/default/pypi/public/files/alpha/{wheel.filename}") as resp:
            assert resp.status == 200
            await resp.read()
        cached = f"cluster/sha256/{wheel.sha256}"
        # Node a is uploading another blob: in the bucket, its row not written yet.
        body = b"an upload whose row is about to be written\n"
        fresh = hashlib.sha256(body).hexdigest()
        staged = tmp_path / "upload"
        await asyncio.to_thread(staged.write_bytes, body)
        client = S3Client(parse_config(raw_a, Overrides(), os.environ).storage, FAKE_ENV)
        try:
            await client.put_file(f"cluster/sha256/{fresh}", staged, {"plain-size": str(len(body))}, 2**20)
        finally:
            await client.close()

        async with node_services(raw_b) as b:
            index, blobs = b.resolver.index, b.blobs
            in_cache = blobs.local_path(Digest(wheel.sha256))
            assert not await asyncio.to_thread(in_cache.exists)  # not in b's cache
            report = await lifecycle.gc(index, blobs, 2**40)
            assert report.blobs_deleted == 0  # the fresh upload is inside the grace period
            assert {cached, f"cluster/sha256/{fresh}"} <= await bucket_keys(moto_s3.endpoint, "leases-gc")

            # verify --repair on b: the row's blob is in the bucket, not in b's cache: kept.
            checked = await lifecycle.verify(index, blobs, tmp_path / "b", repair=True)
            assert (checked.missing, checked.corrupt, checked.rows_removed) == ([], [], 0)
            assert checked.checked == 2 and await _rows(index) == 1
            # A listing taken before the blob was stored (a row written since): still not missing.
            real = blobs.inventory

            async def stale_listing() -> dict[str, Any]:
                return {k: v for k, v in (await real()).items() if k != wheel.sha256}

            await asyncio.to_thread(blobs.local_path(Digest(wheel.sha256)).unlink)  # only in the bucket
            monkeypatch.setattr(blobs, "inventory", stale_listing)
            checked = await lifecycle.verify(index, blobs, tmp_path / "b", repair=True)
            assert (checked.missing, checked.rows_removed) == ([], 0) and await _rows(index) == 1
            monkeypatch.setattr(blobs, "inventory", real)
            # b's cached copy rots: replaced from the bucket, the object and the row stay.
            rotten = blobs.local_path(Digest(wheel.sha256))
            await asyncio.to_thread(rotten.write_bytes, b"bit rot")
            checked = await lifecycle.verify(index, blobs, tmp_path / "b", repair=True)
            assert (checked.corrupt, checked.replaced, checked.rows_removed) == ([], [wheel.sha256], 0)
            assert await _rows(index) == 1 and cached in await bucket_keys(moto_s3.endpoint, "leases-gc")
            assert hashlib.sha256(await asyncio.to_thread(rotten.read_bytes)).hexdigest() == wheel.sha256

            # Control: without the grace period the same gc deletes the upload (and only it).
            monkeypatch.setattr(lifecycle, "GRACE_SECONDS", 0.0)
            report = await lifecycle.gc(index, blobs, 2**40)
            assert report.blobs_deleted == 1
            keys = await bucket_keys(moto_s3.endpoint, "leases-gc")
            assert cached in keys and f"cluster/sha256/{fresh}" not in keys
    finally:
        await runner.cleanup()
