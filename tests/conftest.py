"""Shared fixtures: real distributions, a fake PyPI upstream, and the proxy running in-process.

Every async test runs under ``blockbuster``: a blocking call on the event loop (file I/O,
``time.sleep``, a synchronous socket) fails the test. The proxy is the real application built by
``build_app`` and served on 127.0.0.1; clients are real (aiohttp here, pip and uv as subprocesses
in the client tests).
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from blockbuster import BlockBuster, blockbuster_ctx

from proxy.app import PIPELINE, build_app
from proxy.config import Config, Overrides, parse_config
from proxy.observability import AccessLogger
from proxy.pipeline.services import Pipeline
from tests.fakes.dists import build_sdist, build_wheel
from tests.fakes.pypi import FakePyPI

# The fault suite's report hooks, here so that an xdist controller (which collects nothing) has them.
pytest_plugins = ["tests.faults.plugin", "tests.postgres", "tests.cluster"]

# ``serve`` runs one worker per CPU by default; proxies the tests start as processes stay single
# processes (their crash and signal semantics) unless a test asks for ``--workers`` itself.
os.environ.setdefault("ARTIFACT_PROXY_WORKERS", "1")


@pytest.fixture(autouse=True)
def blockbuster() -> Iterator[BlockBuster]:
    """Fail any test whose event loop makes a blocking call (sync code outside a loop is fine)."""
    with blockbuster_ctx() as bb:
        # asyncpg reads ~/.pgpass and TLS files when it opens a connection: once per pooled
        # connection, which lives for the process, so not worth a thread hop.
        for function in bb.functions.values():
            function.can_block_in("asyncpg/connect_utils.py", "_parse_connect_dsn_and_args")
        yield bb


@dataclass(frozen=True)
class Dists:
    """Distributions built once per session: a package with a dependency, a big file, an sdist."""

    root: Path
    alpha: Path  # alpha 1.0, requires beta
    beta: Path  # beta 1.0
    beta_sdist: Path
    gamma_nometa: Path  # a wheel published without PEP 658 metadata upstream
    big: Path  # ~20 MB wheel


@pytest.fixture(scope="session")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    root = tmp_path_factory.mktemp("dists")
    return Dists(
        root=root,
        alpha=build_wheel(root, "alpha", "1.0", requires=["beta>=1.0"]),
        beta=build_wheel(root, "beta", "1.0"),
        beta_sdist=build_sdist(root, "beta", "1.0"),
        gamma_nometa=build_wheel(root, "gamma", "2.0"),
        big=build_wheel(root, "bigpkg", "1.0", payload_size=20 * 2**20),
    )


@pytest.fixture
async def pypi(dists: Dists) -> AsyncIterator[FakePyPI]:
    """A fake upstream with alpha (→ beta), beta (wheel + sdist), gamma (no metadata), bigpkg."""
    async with FakePyPI() as fake:
        await fake.add_file_async("alpha", dists.alpha)
        await fake.add_file_async("beta", dists.beta)
        await fake.add_file_async("beta", dists.beta_sdist)
        await fake.add_file_async("gamma", dists.gamma_nometa, with_metadata=False)
        await fake.add_file_async("bigpkg", dists.big)
        yield fake


@dataclass
class RunningProxy:
    """A proxy served on 127.0.0.1 by the test's event loop."""

    url: str
    config: Config
    runner: web.AppRunner

    @property
    def data_dir(self) -> Path:
        return self.config.server.data_dir

    @property
    def pipeline(self) -> Pipeline:
        """The app's services, for tests that arrange state the API would (rules, statuses)."""
        return self.runner.app[PIPELINE]

    def upload_url(self, repo: str = "public") -> str:
        return f"{self.url}/default/pypi/{repo}/"

    def simple(self, repo: str = "public", domain: str = "default") -> str:
        return f"{self.url}/{domain}/pypi/{repo}/simple/"

    def files(self, project: str, filename: str, repo: str = "public") -> str:
        return f"{self.url}/default/pypi/{repo}/files/{project}/{filename}"

    async def stop(self) -> None:
        await self.runner.cleanup()


def proxy_config(
    data_dir: Path, upstream_url: str, *, fmt: str = "pypi", connection: str = "fake", **server: Any
) -> dict[str, Any]:
    """A config with one upstream connection behind ``public`` and the chain ``team`` → ``public``.

    ``server`` keys go to [server]; ``upstream_*`` keys go to the connection.
    """
    upstream: dict[str, Any] = {
        "format": fmt,
        "url": upstream_url,
        "metadata_ttl": "10m",
        "connect_timeout": "2s",
        "read_timeout": "5s",
        "metadata_timeout": "5s",
        "retries": 1,
    }
    for key in list(server):
        if key.startswith("upstream_"):
            upstream[key.removeprefix("upstream_")] = server.pop(key)
    return {
        # Access control has its own tests (test_security.py); elsewhere it is off unless asked for.
        "server": {"data_dir": str(data_dir), "soft_deadline": "2s", "auth": False, **server},
        "upstreams": {connection: upstream},
        "domains": [
            {
                "name": "default",
                "repositories": [
                    {"name": "public", "upstreams": [connection]},
                    {"name": "team", "upstreams": ["public"]},
                ],
            }
        ],
    }


def write_config_file(path: Path, data_dir: Path, upstream_url: str, *, port: int | None = None) -> None:
    """The document of :func:`proxy_config` as a TOML file, for proxies run as processes."""
    listen = f'listen = "127.0.0.1:{port}"\n' if port is not None else ""
    path.write_text(
        f"""[server]
{listen}data_dir = "{data_dir}"
auth = false

[upstreams.fake]
format = "pypi"
url = "{upstream_url}"

[[domains]]
name = "default"

[[domains.repositories]]
name = "public"
upstreams = ["fake"]

[[domains.repositories]]
name = "team"
upstreams = ["public"]
""",
        encoding="utf-8",
    )


ALL_ON_POSTGRES = "ARTIFACT_PROXY_TEST_ALL_ON_POSTGRES"


def postgres_index_url(data_dir: Path | str) -> str | None:
    """With ``ARTIFACT_PROXY_TEST_ALL_ON_POSTGRES=postgresql://…/postgres`` set, the DSN of the
    index database of ``data_dir``, else None. One database per data directory, named by its
    path, so that a restart on the same directory, the tests' own look at the index
    (:func:`index_rows`) and a CLI run on it (``ARTIFACT_PROXY_INDEX_URL``) all find the same one."""
    server_url = os.environ.get(ALL_ON_POSTGRES)
    if not server_url:
        return None
    # Imported here: tests.postgres is a plugin (pytest_plugins), which pytest must import first.
    from tests.postgres import dsn_for

    name = "t_" + hashlib.sha256(str(data_dir).encode()).hexdigest()[:20]
    return dsn_for(server_url, name)


async def on_postgres(raw: dict[str, Any]) -> dict[str, Any]:
    """With ``ARTIFACT_PROXY_TEST_ALL_ON_POSTGRES=postgresql://…/postgres`` set, the proxies of the
    in-process tests keep their index in PostgreSQL: one database per data directory
    (:func:`postgres_index_url`). A way to run any test module against the cluster's index
    backend; tests that read the SQLite file directly, or run the CLI on the data directory
    without :func:`cli_env`, do not apply then."""
    url = postgres_index_url(raw["server"]["data_dir"])
    if url is None or "index" in raw:
        return raw
    import asyncpg

    name = url.rsplit("/", 1)[1]
    conn = await asyncpg.connect(os.environ[ALL_ON_POSTGRES])
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname=$1", name):
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return {**raw, "index": {"url": url}}


def cli_env(data_dir: Path | str) -> dict[str, str] | None:
    """The environment for a CLI process on ``data_dir``: this process's, plus the index URL of
    :func:`on_postgres` when the proxies keep their index in PostgreSQL (None: inherit)."""
    url = postgres_index_url(data_dir)
    return None if url is None else {**os.environ, "ARTIFACT_PROXY_INDEX_URL": url}


async def serve_config(raw: dict[str, Any], *, port: int = 0) -> tuple[Config, web.AppRunner, str]:
    """The real application for a config document, served on 127.0.0.1 by this event loop."""
    raw = await on_postgres(raw)
    config = parse_config(raw, Overrides(), os.environ)
    runner = web.AppRunner(build_app(config), access_log_class=AccessLogger)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    host, bound = runner.addresses[0][:2]
    return config, runner, f"http://{host}:{bound}"


ProxyFactory = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture
async def proxy_factory(tmp_path: Path) -> AsyncIterator[ProxyFactory]:
    """Start proxies for this test (stopped at its end); the data dir is shared unless given."""
    started: list[RunningProxy] = []

    async def start(
        upstream_url: str,
        *,
        data_dir: Path | None = None,
        port: int = 0,
        fmt: str = "pypi",
        connection: str = "fake",
        kind: type[RunningProxy] = RunningProxy,
        **server: Any,
    ) -> RunningProxy:
        data = data_dir or tmp_path / "data"
        raw = proxy_config(data, upstream_url, fmt=fmt, connection=connection, **server)
        config, runner, url = await serve_config(raw, port=port)
        proxy = kind(url=url, config=config, runner=runner)
        started.append(proxy)
        return proxy

    yield start
    for proxy in reversed(started):
        if proxy.runner.server is not None:
            await proxy.stop()


@pytest.fixture
async def proxy(proxy_factory: ProxyFactory, pypi: FakePyPI) -> RunningProxy:
    return await proxy_factory(pypi.url)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


def index_rows(data_dir: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read the index directly (sync: call through ``asyncio.to_thread`` in async tests): the
    SQLite file, or with :func:`on_postgres` in force the data directory's PostgreSQL database
    (the same SQL, ``?`` placeholders translated as the proxy translates them)."""
    url = postgres_index_url(data_dir)
    if url is None:
        with sqlite3.connect(data_dir / "index.sqlite3") as db:
            return list(db.execute(sql, params))

    import asyncpg

    from proxy.storage.postgres import to_postgres
    from tests.postgres import run_sync

    async def fetch(dsn: str) -> list[tuple[Any, ...]]:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            return [tuple(row) for row in await conn.fetch(to_postgres(sql), *params)]
        finally:
            await conn.close()

    return run_sync(fetch(url))


def blob_files(data_dir: Path) -> list[Path]:
    return sorted(p for p in (data_dir / "blobs").rglob("*") if p.is_file())


def temp_files(data_dir: Path) -> list[Path]:
    tmp = data_dir / "tmp"
    return sorted(tmp.iterdir()) if tmp.exists() else []
