"""What a cluster's nodes do when what they share goes away (issue #12, failure modes).

Real ``python -m proxy serve`` nodes (:mod:`tests.cluster`) on one PostgreSQL index and one S3
bucket (moto), with the shared service stopped under them by its PID, as an outage would:

* the object store down: each node still serves the blobs on its own disk, byte for byte; a blob
  it would have to fetch from the bucket is a 503 ``storage_unavailable`` saying so (not a 404,
  not a traceback), and readiness stays 200 but reports the bucket (every node is in the same
  position, so taking them all out of the load balancer would only make the outage total);
* the database down: readiness is 503 naming the index (the load balancer takes the node out),
  a request that needs the index is a 503 ``index_unavailable`` with neither a traceback nor the
  password of the database URL (nor is it in the node's log); once the database is back on the
  same address the node serves again by itself, without a restart;
* a node started before its database: it waits for it (``[index] startup_wait``) and becomes
  ready once the database answers; past the wait it exits with a message naming the database
  (without its password), not a traceback.

The database and the object store here are private to the test (the session's shared ones must
stay up for the other tests): :class:`PrivatePostgres` stops and restarts a server of its own on
the same port and data directory, which is what a database restart looks like to a node.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.cluster import ClusterNode, StartCluster, s3_storage, start_cluster, use_fake_aws
from tests.conftest import Dists
from tests.fakes.dists import sha256_file
from tests.fakes.pypi import FakePyPI
from tests.postgres import ENV_DSN, PostgresServer, connect, find_bindir, missing_reason
from tests.s3_server import FAKE_ENV, MotoServer, moto_server

ROLE = "cluster_node"
PASSWORD = "pg-secret-" + uuid.uuid4().hex  # what must never reach a client or a log
RECOVERY_BOUND = 20.0  # seconds a node may take to serve again once its database is back


class PrivatePostgres:
    """A PostgreSQL server this module may stop and start again on the same port and data dir."""

    def __init__(self, server: PostgresServer) -> None:
        self.server = server

    @property
    def port(self) -> int:
        return self.server.port

    def halt(self) -> None:
        """A fast shutdown (SIGINT) by PID: every session ends, the port closes (blocking)."""
        process = self.server.process
        assert process is not None and process.poll() is None
        os.kill(process.pid, signal.SIGINT)
        process.wait(timeout=30)

    def resume(self) -> None:
        """The same server again: same data directory, same port (blocking)."""
        assert self.server.process is not None and self.server.process.poll() is not None
        if not self.server._start_postgres(last=True):  # the harness's own start, minus initdb
            raise RuntimeError("postgres did not start again")

    @property
    def running(self) -> bool:
        return self.server.process is not None and self.server.process.poll() is None

    async def database(self, name: str) -> str:
        """A database owned by a role with a password; the DSN (password included) to reach it.

        The server trusts loopback connections, so the password is never checked: it is there
        to be looked for where it must not appear."""
        async with connect(self.server.dsn) as admin:
            exists = await admin.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", ROLE)
            if not exists:
                await admin.execute(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'")
            await admin.execute(
                f"CREATE DATABASE \"{name}\" OWNER {ROLE} TEMPLATE template0 ENCODING 'UTF8' "
                "LC_COLLATE 'C' LC_CTYPE 'C'"
            )
        return f"postgresql://{ROLE}:{PASSWORD}@127.0.0.1:{self.port}/{name}"


@pytest.fixture(scope="module")
def private_postgres() -> Iterator[PrivatePostgres]:
    """A server of this module's own (the session's is shared by every test of the process)."""
    if os.environ.get(ENV_DSN):
        pytest.skip(f"{ENV_DSN} names an external server, which these tests cannot stop and restart")
    why = missing_reason()
    if why is not None:
        pytest.skip(why)
    bindir = find_bindir()
    assert bindir is not None
    server = PostgresServer(bindir)
    server.start()
    private = PrivatePostgres(server)
    try:
        yield private
    finally:
        server.stop()


@pytest.fixture
def private_moto(tmp_path: Path) -> Iterator[MotoServer]:
    """A moto server this test may stop (the session's is shared)."""
    with moto_server(tmp_path / "moto.log") as server:
        yield server


@pytest.fixture
async def database(private_postgres: PrivatePostgres) -> AsyncIterator[str]:
    """A fresh database on the private server; the server is running again afterwards."""
    name = f"failures_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    dsn = await private_postgres.database(name)
    yield dsn
    if not private_postgres.running:
        await asyncio.to_thread(private_postgres.resume)


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, bytes, dict[str, str]]:
    async with http.get(url) as resp:
        return resp.status, await resp.read(), dict(resp.headers)


async def readiness(http: aiohttp.ClientSession, node: ClusterNode) -> tuple[int, dict[str, Any]]:
    async with http.get(node.url + "/-/readyz") as resp:
        return resp.status, await resp.json()


async def until_ready_is(
    http: aiohttp.ClientSession, node: ClusterNode, status: int, bound: float
) -> dict[str, Any]:
    """Poll /-/readyz until it answers ``status`` (the body), failing after ``bound`` seconds."""
    deadline = time.monotonic() + bound
    seen: tuple[int, dict[str, Any]] = (0, {})
    while time.monotonic() < deadline:
        seen = await readiness(http, node)
        if seen[0] == status:
            return seen[1]
        await asyncio.sleep(0.1)
    raise AssertionError(f"/-/readyz still {seen} after {bound} s:\n{await node.log_tail()}")


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def no_traceback(text: str) -> None:
    assert "Traceback (most recent call last)" not in text, text[-3000:]


# --- the object store down ------------------------------------------------------------------------


@pytest.mark.timeout(90)
async def test_object_store_down_cached_blobs_serve_others_are_503(
    cluster_factory: StartCluster,
    postgres_dsn: str,
    private_moto: MotoServer,
    pypi: FakePyPI,
    dists: Dists,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_fake_aws(monkeypatch)
    storage = await s3_storage(private_moto.endpoint, "store-down", prefix="down/")
    cluster = await cluster_factory(2, upstream_url=pypi.url, index_url=postgres_dsn, storage=storage)
    a, b = cluster
    alpha_sha, beta_sha = [await asyncio.to_thread(sha256_file, p) for p in (dists.alpha, dists.beta)]
    async with aiohttp.ClientSession() as http:
        # Node A fetches both (its disk and the bucket hold them); node B alpha only.
        for node, dist in ((a, dists.alpha), (a, dists.beta), (b, dists.alpha)):
            project = dist.name.split("-")[0]
            status, body, _ = await get(http, node.files_url(project, dist.name))
            assert status == 200, await node.log_tail()
        assert await asyncio.to_thread(node_has, b, alpha_sha)
        assert not await asyncio.to_thread(node_has, b, beta_sha)
        for node in cluster:
            status, ready = await readiness(http, node)
            assert (status, ready.get("object_store")) == (200, "ok"), ready

        # The bucket goes away (its server stopped by PID).
        private_moto.process.terminate()
        await asyncio.to_thread(private_moto.process.wait, 10)
        upstream_hits = dict(pypi.hits)

        # What each node has on disk still serves, byte for byte.
        for node, dist, sha in (
            (a, dists.alpha, alpha_sha),
            (a, dists.beta, beta_sha),
            (b, dists.alpha, alpha_sha),
        ):
            status, body, _ = await get(http, node.files_url(dist.name.split("-")[0], dist.name))
            assert status == 200, (node.name, dist.name, body[:300])
            assert hashlib.sha256(body).hexdigest() == sha

        # A blob the index knows (node A stored it) but node B would have to fetch from the
        # bucket: a 503 that names the object store, not a 404 and not a 500.
        status, body, headers = await get(http, b.files_url("beta", dists.beta.name))
        assert status == 503, body[:500]
        assert headers["Content-Type"].startswith("application/json")
        error = json.loads(body)
        assert error["error"] == "storage_unavailable", error
        assert private_moto.endpoint in error["message"] and "unreachable" in error["message"]
        assert FAKE_ENV["AWS_SECRET_ACCESS_KEY"] not in body.decode()
        # ... and it was not fetched upstream again behind the bucket's back.
        assert dict(pypi.hits) == upstream_hits
        # A file no node has yet: it cannot be stored, so it is not served either (a blob the
        # index pointed at would be in no bucket); the same 503, while its page still lists it.
        status, body, _ = await get(http, a.files_url("gamma", dists.gamma_nometa.name))
        assert status == 503 and json.loads(body)["error"] == "storage_unavailable", body[:500]
        status, body, _ = await get(http, f"{a.url}/default/pypi/public/simple/gamma/")
        assert status == 200 and dists.gamma_nometa.name in body.decode()

        # Readiness: still ready (the node serves its disk), but it says the bucket is down.
        for node in cluster:
            status, ready = await readiness(http, node)
            assert status == 200 and ready["status"] == "ready", ready
            assert ready["checks"]["index"] == "ok"
            assert (
                ready["object_store"].startswith("failed: ")
                and private_moto.endpoint in ready["object_store"]
            )
            assert FAKE_ENV["AWS_SECRET_ACCESS_KEY"] not in str(ready)
    for node in cluster:
        no_traceback(await node.log_tail(20_000))


def node_has(node: ClusterNode, digest: str) -> bool:
    return node.blob_path(digest).is_file()


# --- the database down ------------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_database_down_fails_readiness_503s_and_recovers_without_restart(
    cluster_factory: StartCluster,
    private_postgres: PrivatePostgres,
    database: str,
    pypi: FakePyPI,
    dists: Dists,
) -> None:
    cluster = await cluster_factory(1, upstream_url=pypi.url, index_url=database)
    (node,) = cluster
    pid = node.pid
    async with aiohttp.ClientSession() as http:
        status, _, _ = await get(http, f"{node.url}/default/pypi/public/simple/alpha/")
        assert status == 200, await node.log_tail()
        status, ready = await readiness(http, node)
        assert status == 200 and ready["checks"]["index"] == "ok"

        await asyncio.to_thread(private_postgres.halt)

        # Readiness fails, naming the index: the load balancer's cue to take the node out.
        ready = await until_ready_is(http, node, 503, 15)
        assert ready["status"] == "not ready"
        assert ready["checks"]["index"].startswith("failed"), ready
        assert {k for k, v in ready["checks"].items() if v != "ok"} == {"index"}
        assert PASSWORD not in str(ready)

        # A request that needs the index (a project never asked for): a 503 that says the index
        # database is unavailable. No traceback, no password, not a 500 nor a 502.
        for path in (
            "/default/pypi/public/simple/beta/",
            f"/default/pypi/public/files/beta/{dists.beta.name}",
        ):
            status, body, headers = await get(http, node.url + path)
            text = body.decode(errors="replace")
            assert status == 503, (path, text[:500])
            assert headers["Content-Type"].startswith("application/json"), text[:300]
            assert '"error": "index_unavailable"' in text or '"error":"index_unavailable"' in text, text
            assert re.search(r"index database", text), text
            assert PASSWORD not in text and "Traceback" not in text

        # The database comes back on the same address: the node serves again by itself.
        await asyncio.to_thread(private_postgres.resume)
        ready = await until_ready_is(http, node, 200, RECOVERY_BOUND)
        assert ready["checks"]["index"] == "ok"
        status, body, _ = await get(http, f"{node.url}/default/pypi/public/simple/beta/")
        assert status == 200, body[:500]
        assert dists.beta.name in body.decode()
        status, body, _ = await get(http, node.files_url("beta", dists.beta.name))
        assert status == 200
        assert hashlib.sha256(body).hexdigest() == await asyncio.to_thread(sha256_file, dists.beta)
    assert node.proc is not None and node.proc.returncode is None and node.pid == pid  # no restart
    log = await node.log_tail(50_000)
    assert PASSWORD not in log
    no_traceback(log)


# --- a node started before its database ------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_node_started_before_its_database_waits_for_it(
    private_postgres: PrivatePostgres, database: str, pypi: FakePyPI, tmp_path: Path
) -> None:
    await asyncio.to_thread(private_postgres.halt)

    def wait_long(doc: dict[str, Any]) -> None:
        doc["index"]["startup_wait"] = "60s"

    starting = asyncio.create_task(
        start_cluster(1, tmp_path=tmp_path / "c", upstream_url=pypi.url, index_url=database, edit=wait_long)
    )
    log_file = tmp_path / "c" / "node-0" / "proxy-0.log"
    try:
        # The node says it waits, and does: it is running but not serving yet.
        for _ in range(300):
            if "not reachable yet" in await asyncio.to_thread(_read, log_file):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"the node never said it waits:\n{await asyncio.to_thread(_read, log_file)}")
        await asyncio.sleep(1.0)  # a second more, still down: it keeps waiting rather than exit
        assert not starting.done(), starting.exception() if starting.done() else None
        await asyncio.to_thread(private_postgres.resume)
        cluster = await asyncio.wait_for(starting, 40)
    except BaseException:
        starting.cancel()  # start_cluster kills the node it started on its way out
        with contextlib.suppress(BaseException):
            await starting
        raise
    try:
        (node,) = cluster
        async with aiohttp.ClientSession() as http:
            status, body, _ = await get(http, f"{node.url}/default/pypi/public/simple/alpha/")
            assert status == 200, body[:500]
        log = await node.log_tail(20_000)
        assert "not reachable yet" in log and PASSWORD not in log, log
        no_traceback(log)
    finally:
        await cluster.stop()


@pytest.mark.timeout(60)
async def test_node_gives_up_on_an_unreachable_database_with_a_clear_message(
    private_postgres: PrivatePostgres, database: str, pypi: FakePyPI, tmp_path: Path
) -> None:
    await asyncio.to_thread(private_postgres.halt)

    def wait_briefly(doc: dict[str, Any]) -> None:
        doc["index"]["startup_wait"] = "2s"

    began = time.monotonic()
    with pytest.raises(AssertionError, match="proxy exited at start") as failed:
        await start_cluster(
            1, tmp_path=tmp_path / "c", upstream_url=pypi.url, index_url=database, edit=wait_briefly
        )
    waited = time.monotonic() - began
    message = str(failed.value)
    assert 2 <= waited < 30, waited
    assert f"127.0.0.1:{private_postgres.port}" in message and "unreachable" in message, message
    assert PASSWORD not in message and f"{ROLE}:***@" in message  # named, its password masked
    no_traceback(message)
    code = re.search(r"exited at start with (-?\d+)", message)
    assert code is not None and int(code.group(1)) != 0
