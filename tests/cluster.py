"""Several real proxy processes as one cluster (issue #12): one config, one index, one bucket.

Each node is ``python -m proxy serve`` (crashkit's :class:`ProxyProcess`: its start, readiness
wait, SIGKILL and SIGTERM) on its own loopback port and data directory; everything else in the
config is the same document, :func:`tests.conftest.proxy_config`'s, plus ``[index] url`` (the
shared PostgreSQL database, from :mod:`tests.postgres`) and a ``[storage]`` table (the shared
bucket: moto's server from :mod:`tests.s3_server`). Without an index URL each node keeps its own
SQLite index, which is what a launcher self-test needs and nothing more.

Nodes inherit this process's environment: S3 credentials come from the standard AWS variables
only (never from the config), so a test on S3 sets them first (:func:`use_fake_aws`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.config import StorageConfig
from proxy.storage.s3 import S3Client
from tests.conftest import proxy_config
from tests.faults.crashkit import ProxyProcess
from tests.s3_server import FAKE_ENV, MotoServer, moto_server

# --- a config document as a TOML file ---------------------------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value), ensure_ascii=False)  # a TOML basic string
    if isinstance(value, Sequence):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def _tables(doc: Mapping[str, Any], path: str, out: list[str]) -> None:
    def is_table_array(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(i, Mapping) for i in v)

    for key, value in doc.items():
        if value is not None and not isinstance(value, Mapping) and not is_table_array(value):
            out.append(f"{_key(key)} = {_value(value)}")
    for key, value in doc.items():
        name = f"{path}.{_key(key)}" if path else _key(key)
        if isinstance(value, Mapping):
            out.extend(["", f"[{name}]"])
            _tables(value, name, out)
        elif is_table_array(value):
            for item in value:
                out.extend(["", f"[[{name}]]"])
                _tables(item, name, out)


def to_toml(doc: Mapping[str, Any]) -> str:
    """The config document (tables, arrays of tables, strings, numbers, booleans) as TOML; it is
    read back and compared, so a shape this writer gets wrong fails here, not in the proxy."""
    out: list[str] = []
    _tables(doc, "", out)
    text = "\n".join(out).lstrip("\n") + "\n"
    back = tomllib.loads(text)
    expected = json.loads(json.dumps(doc, default=str))  # Paths as strings, None keys dropped below
    _drop_none(expected)
    if back != expected:
        raise AssertionError(f"TOML round trip differs:\n{text}")
    return text


def _drop_none(doc: Any) -> None:
    if isinstance(doc, dict):
        for key in [k for k, v in doc.items() if v is None]:
            del doc[key]
        for v in doc.values():
            _drop_none(v)
    elif isinstance(doc, list):
        for v in doc:
            _drop_none(v)


# --- S3 -----------------------------------------------------------------------------------------


def use_fake_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake keys moto accepts, in the environment the nodes inherit (and no session token)."""
    for key, value in FAKE_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """moto's S3 server for this pytest process's cluster tests (buckets keep them apart)."""
    with moto_server(tmp_path_factory.mktemp("moto-cluster") / "moto.log") as server:
        yield server


async def make_bucket(endpoint: str, bucket: str) -> None:
    """Create ``bucket`` on the (moto) server."""
    client = S3Client(StorageConfig(backend="s3", bucket=bucket, endpoint_url=endpoint), FAKE_ENV)
    try:
        response = await client.request("PUT", "")
        response.release()
    finally:
        await client.close()


async def s3_storage(endpoint: str, bucket: str, *, prefix: str = "cluster/", **keys: Any) -> dict[str, Any]:
    """Create ``bucket`` on the server and return the ``[storage]`` table that uses it."""
    await make_bucket(endpoint, bucket)
    return {"backend": "s3", "bucket": bucket, "prefix": prefix, "endpoint_url": endpoint, **keys}


async def bucket_keys(endpoint: str, bucket: str, prefix: str = "cluster/") -> set[str]:
    """Every key in ``bucket`` under ``prefix``: what the nodes have written to the shared store."""
    client = S3Client(StorageConfig(backend="s3", bucket=bucket, endpoint_url=endpoint), FAKE_ENV)
    try:
        return {key async for key, _, _ in client.list(prefix)}
    finally:
        await client.close()


# --- the cluster ----------------------------------------------------------------------------------


@dataclass
class ClusterNode(ProxyProcess):
    """One node: a proxy process with its own port and data directory (``root``/data)."""

    name: str = ""

    def log_files(self) -> list[Path]:
        return sorted(self.root.glob("proxy-*.log"))

    async def log_tail(self, chars: int = 3000) -> str:
        """The node's stderr (every start), for a failing test's message."""

        def read() -> str:
            return "".join(p.read_text(errors="replace") for p in self.log_files())[-chars:]

        return await asyncio.to_thread(read)


@dataclass
class Cluster:
    nodes: list[ClusterNode]
    document: dict[str, Any]  # the shared config (the nodes' files differ in listen/data_dir only)

    def __getitem__(self, index: int) -> ClusterNode:
        return self.nodes[index]

    def __iter__(self) -> Iterator[ClusterNode]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    async def stop(self) -> None:
        """SIGTERM every node that runs, at once, and wait (SIGKILL for what is left after 20 s)."""
        await asyncio.gather(*(node.stop() for node in self.nodes), return_exceptions=True)

    async def kill(self) -> None:
        """SIGKILL every node still running."""
        for node in self.nodes:
            if node.proc is not None and node.proc.returncode is None:
                await node.kill()


async def start_cluster(
    n: int,
    *,
    tmp_path: Path,
    upstream_url: str,
    index_url: str | None = None,
    storage: Mapping[str, Any] | None = None,
    fmt: str = "pypi",
    connection: str = "fake",
    workers: int = 1,
    together: bool = False,
    edit: Callable[[dict[str, Any]], None] | None = None,
    **server: Any,
) -> Cluster:
    """Start ``n`` nodes under ``tmp_path``/node-<i>; returns once every one answers /-/readyz.

    ``index_url`` becomes ``[index] url`` (None: each node its own SQLite index), ``storage`` the
    ``[storage]`` table; ``server`` keys go to ``[server]`` and ``upstream_*`` keys to the
    connection (as in :func:`tests.conftest.proxy_config`); ``edit`` may change the document
    further. Nodes start one after another (the first runs the migrations alone) unless
    ``together``, which races their start-ups (migrations included) on purpose. If any node fails
    to start, those already running are stopped before the error propagates.
    """
    if storage is not None and storage.get("backend") == "s3":
        missing = [k for k in FAKE_ENV if k not in os.environ]
        if missing:
            raise RuntimeError(f"S3 storage: set {missing} for the nodes first (use_fake_aws(monkeypatch))")
    document = proxy_config(
        tmp_path / "node-0" / "data", upstream_url, fmt=fmt, connection=connection, **server
    )
    if index_url is not None:
        document["index"] = {"url": index_url}
    if storage is not None:
        document["storage"] = dict(storage)
    if edit is not None:
        edit(document)
    nodes: list[ClusterNode] = []
    for i in range(n):
        node = ClusterNode(
            root=tmp_path / f"node-{i}", upstream_url=upstream_url, workers=workers, name=f"node-{i}"
        )
        listen = {"data_dir": str(node.data_dir), "listen": f"127.0.0.1:{node.port}"}
        own = {**document, "server": {**document["server"], **listen}}
        text = to_toml(own)
        await asyncio.to_thread(node.root.mkdir, parents=True, exist_ok=True)
        await asyncio.to_thread(node.config.write_text, text, encoding="utf-8")
        nodes.append(node)
    cluster = Cluster(nodes, document)
    try:
        if together:
            await asyncio.gather(*(node.start() for node in nodes))
        else:
            for node in nodes:
                await node.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await cluster.kill()
        raise
    return cluster


StartCluster = Callable[..., Awaitable[Cluster]]


@pytest.fixture
async def cluster_factory(tmp_path: Path) -> AsyncIterator[StartCluster]:
    """``await cluster_factory(n, upstream_url=…, index_url=…, storage=…)``: every cluster it
    started is stopped (SIGTERM, then SIGKILL) when the test ends, failed or not."""
    started: list[Cluster] = []

    async def start(n: int, **kwargs: Any) -> Cluster:
        kwargs.setdefault("tmp_path", tmp_path / f"cluster-{len(started)}")
        cluster = await start_cluster(n, **kwargs)
        started.append(cluster)
        return cluster

    yield start
    for cluster in started:
        await cluster.stop()
