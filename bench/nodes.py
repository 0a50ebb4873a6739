"""Scale-out on one machine (issue #12): 1, 2 and 3 nodes, and what S3 + PostgreSQL cost per request.

    python bench/nodes.py [--rounds 3] [--duration 5] [--quick] [--json FILE] [--no-balancer] [--keep-data]

Starts, all on 127.0.0.1: a throw-away PostgreSQL (tests/postgres.py's PostgresServer), moto's
standalone S3 server (as tests/s3_server.py starts it), a fake PyPI upstream (the test suite's
FakePyPI, bench/nodes_upstream.py) serving real wheels (a ~200 KB one whose page is the small
page, a ~10 MB one, small ones for cold-page samples, and one 10 MB wheel per cold-miss round),
then four real proxies, ``python -m proxy serve --workers 1`` each with its own port and data
directory:

- ``s1``, ``s2``, ``s3``: one cluster, ``[storage] backend = "s3"`` (one bucket) and ``[index]
  url`` = the PostgreSQL database;
- ``local``: the single-node configuration, ``backend = "local"`` and the SQLite index in its data
  directory.

With nginx installed (Debian's; apt-get installs it when root), one nginx (1 worker, keep-alive
to the nodes) balances round-robin over 1, 2 or 3 of the cluster's nodes on three ports; without
it (or with ``--no-balancer``), one wrk per node runs at the same time, the 16 connections split
between them, and the figures are added up (the output says which).

Measured, interleaved round by round (each round runs every case once; the figure is the median
of the rounds, latencies are pooled over the rounds):

1. warm page hits (pip's ``Accept``, JSON) through the balancer to 1, 2 and 3 nodes, the same 16
   wrk connections in every case: requests/s, p50, p99, CPU% of each node, nginx and wrk;
2. the same for warm 200 KB file hits;
3. one node, local+SQLite against s3+PostgreSQL, direct (no balancer):
   a. warm page and 200 KB hits under wrk (a file on the node's disk either way: sendfile);
   b. one request at a time over a keep-alive connection, time to last byte: a hit on the local
      node's disk, a hit on the s3 node's disk, and the s3 node after its copy was deleted from
      its disk (so the blob comes back from the bucket), for the 200 KB and the 10 MB files;
   c. page requests right after a restart (memory caches empty, so the stored upstream listing
      comes from SQLite or PostgreSQL), each of K pages once, then the same pages again (warm);
4. a cold miss through the cluster: 3 curl clients per node, all at once, for one 10 MB file no
   node has seen (its page already fetched): time to last byte, and the upstream GETs it caused.

Everything is bounded: fixed wrk durations, fixed sample counts, per-request timeouts. Every
process started is stopped by PID on the way out, Ctrl-C included. The machine's load average is
printed and recorded: this runs on whatever else the machine is doing.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from dataset import _load_manifest, _reusable
from harness import BenchError, Processes, child_pids, free_port, http_get, run_guarded, wait_http
from loadgen import WrkResult, run_wrk
from peers import Unavailable, ensure_debian
from servers import BENCH, REPO, _read_line, python_env

sys.path.insert(0, str(REPO))  # tests: the PostgreSQL launcher, moto's command, the TOML writer
from tests.cluster import s3_storage, to_toml
from tests.fakes.dists import build_wheel
from tests.postgres import PostgresServer, create_database, find_bindir, missing_reason, run_sync
from tests.s3_server import FAKE_ENV, moto_command

KB = 1024
MIB = 2**20
PIP_ACCEPT = (
    "application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html; q=0.1, text/html; q=0.01"
)
PAGE_PROJECT = "bench-nodes-200k"  # its page is "the small page"; its wheel the 200 KB file
BIG_PROJECT = "bench-nodes-10m"
BUCKET = "bench-nodes"
CONNS = 16
TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Plan:
    """How much to measure: the default run (<= 6 min) or ``--quick`` (<= 90 s)."""

    rounds: int
    duration: float
    small_samples: int  # 3b: requests per round and case, 200 KB file
    big_samples: int  # 3b: the same, 10 MB file
    cold_pages: int  # 3c: K distinct pages per round
    miss_rounds: int  # 4: one fresh 10 MB wheel each

    @classmethod
    def make(cls, args: argparse.Namespace) -> Plan:
        if args.quick:
            plan = cls(rounds=1, duration=2.0, small_samples=10, big_samples=3, cold_pages=10, miss_rounds=1)
        else:
            plan = cls(rounds=3, duration=5.0, small_samples=20, big_samples=5, cold_pages=25, miss_rounds=3)
        if args.rounds is not None:
            plan = cls(**{**asdict(plan), "rounds": args.rounds, "miss_rounds": args.rounds})
        if args.duration is not None:
            plan = cls(**{**asdict(plan), "duration": args.duration})
        return plan


# ------------------------------------------------------------------------------------ the wheels


@dataclass(frozen=True)
class Wheel:
    """One published wheel; its digest names its blob in the nodes' caches and the bucket."""

    project: str
    path: Path
    size: int
    sha256: str


def build_wheels(root: Path, plan: Plan) -> dict[str, Wheel]:
    """Build (or reuse, by dataset.py's manifest) every wheel; random payloads, real metadata."""
    specs = [(PAGE_PROJECT, 200 * KB), (BIG_PROJECT, 10 * MIB)]
    specs += [(f"bench-nodes-p{i:02d}", 2 * KB) for i in range(max(plan.cold_pages, 25))]
    specs += [(f"bench-nodes-miss-{i}", 10 * MIB) for i in range(max(plan.miss_rounds, 3))]
    root.mkdir(parents=True, exist_ok=True)
    manifest_path = root / "manifest.json"
    manifest = _load_manifest(manifest_path)
    wheels: dict[str, Wheel] = {}
    for project, payload in specs:
        dist = _reusable(manifest.get(project), payload)
        if dist is None:
            print(f"  building {project} ({payload / KB:,.0f} KiB payload) ...", flush=True)
            path = build_wheel(root / project, project, "1.0", payload_size=payload)
            size = path.stat().st_size
            manifest[project] = {"project": project, "path": str(path), "size": size, "payload": payload}
            manifest_path.write_text(json.dumps(manifest, indent=1))
        else:
            path, size = dist.path, dist.size
        wheels[project] = Wheel(project, path, size, hashlib.sha256(path.read_bytes()).hexdigest())
    return wheels


# ------------------------------------------------------------------------------------ processes


def proc_cpu_ticks(pid: int) -> int:
    """utime + stime of one process, all its threads (the sendfile pool included); 0 if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, IndexError):
        return 0
    return int(fields[11]) + int(fields[12])


@dataclass
class Node:
    """One ``python -m proxy serve --workers 1``: its own port, data directory and log per start."""

    name: str
    root: Path
    document: dict[str, Any]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def log(self) -> Path:
        return self.root / f"node-{max(self.starts - 1, 0)}.log"

    def write_config(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        server = {
            **self.document["server"],
            "listen": f"127.0.0.1:{self.port}",
            "data_dir": str(self.data_dir),
        }
        config = self.root / "proxy.toml"
        config.write_text(to_toml({**self.document, "server": server}))
        return config

    def launch(self, procs: Processes, env: dict[str, str]) -> None:
        config = self.root / "proxy.toml"
        argv = [sys.executable, "-m", "proxy", "serve", "--config", str(config)]
        argv += ["--log-level", "WARNING", "--workers", "1"]
        self.starts += 1
        self.proc = procs.start(argv, log=self.log, env=env, cwd=REPO)

    def wait(self) -> None:
        assert self.proc is not None
        try:
            wait_http(f"{self.origin}/-/readyz", self.proc, f"node {self.name}", self.log, timeout=90)
        except BenchError as exc:
            raise BenchError(f"{exc}\n--- {self.log} ---\n{tail(self.log)}") from None

    def restart(self, procs: Processes, env: dict[str, str]) -> None:
        """SIGTERM (graceful), then start again on the same data directory and port."""
        assert self.proc is not None
        procs.stop(self.proc)
        self.launch(procs, env)
        self.wait()


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return "(no log)"


def node_env() -> dict[str, str]:
    """The nodes' environment: moto's fake keys, and none of our own ARTIFACT_PROXY_* overrides
    (``ARTIFACT_PROXY_INDEX_URL`` would win over each node's ``[index]``)."""
    env = {k: v for k, v in python_env().items() if not k.startswith(("ARTIFACT_PROXY_", "AWS_"))}
    return {**env, **FAKE_ENV}


def node_document(upstream: str, storage: dict[str, Any] | None, index_url: str | None) -> dict[str, Any]:
    """The config every node shares (listen and data_dir are each node's): bench/servers.py's,
    access control on with anonymous reads of ``public``, listings fresh for an hour."""
    doc: dict[str, Any] = {
        "server": {"data_dir": "", "listen": ""},
        "upstreams": {"fake": {"format": "pypi", "url": upstream, "metadata_ttl": "1h"}},
        "domains": [
            {
                "name": "default",
                "repositories": [{"name": "public", "anonymous_read": True, "upstreams": ["fake"]}],
            }
        ],
    }
    if storage is not None:
        doc["storage"] = storage
    if index_url is not None:
        doc["index"] = {"url": index_url}
    return doc


LB_CONFIG = """\
daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 1000000;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host $http_host;
    proxy_buffers 8 64k;
    proxy_max_temp_file_size 0;
{upstreams}
{servers}
}}
"""


def start_balancer(procs: Processes, nginx: str, tmp: Path, nodes: Sequence[Node]) -> tuple[list[str], int]:
    """One nginx, one port per cluster size n (round-robin over the first n nodes); its URLs and PID."""
    tmp.mkdir(parents=True, exist_ok=True)
    ports = [free_port() for _ in nodes]
    upstreams, servers = [], []
    for n, port in enumerate(ports, start=1):
        members = " ".join(f"server 127.0.0.1:{node.port};" for node in nodes[:n])
        upstreams.append(f"    upstream nodes{n} {{ {members} keepalive 32; keepalive_requests 1000000; }}")
        servers.append(
            f"    server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://nodes{n}; }} }}"
        )
    config = tmp / "nginx.conf"
    config.write_text(LB_CONFIG.format(tmp=tmp, upstreams="\n".join(upstreams), servers="\n".join(servers)))
    log = tmp / "error.log"
    proc = procs.start([nginx, "-p", str(tmp), "-c", str(config), "-e", str(log)], log=tmp / "stderr.log")
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    for url in urls:
        wait_http(f"{url}/-/readyz", proc, "nginx", log)
    for pid in child_pids(proc.pid):
        procs.adopt(pid, "nginx worker")
    return urls, proc.pid


def start_moto(procs: Processes, work: Path) -> str:
    """moto's S3 server as tests/s3_server.py starts it, but registered with ``procs``."""
    command = moto_command()
    if command is None:
        raise BenchError("moto's server is not installed: pip install 'moto[server]' (the 'test' extra)")
    port = free_port()
    env = {**os.environ, "S3_UPLOAD_PART_MIN_SIZE": str(5 * MIB)}
    proc = procs.start([*command, "-H", "127.0.0.1", "-p", str(port)], log=work / "moto.log", env=env)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            http_get(endpoint + "/", timeout=2)
            return endpoint
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"moto did not start; see {work / 'moto.log'}") from None
            time.sleep(0.1)


# ------------------------------------------------------------------------------------ measuring


@dataclass
class Load:
    """One wrk run and the CPU each watched process used meanwhile (percent of one core)."""

    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu: dict[str, float]
    node_us: float  # the nodes' CPU time per request, microseconds: what the load cannot skew much


def wrk_with_cpu(
    procs: Processes,
    wrk: str,
    urls: Sequence[str],
    duration: float,
    watch: dict[str, int],
    headers: dict[str, str] | None,
) -> Load:
    """wrk against each URL at once (one URL: the balancer or a node; several: one wrk per node,
    the connections split between them and the figures added up)."""
    before = {name: proc_cpu_ticks(pid) for name, pid in watch.items()}
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.monotonic()
    if len(urls) == 1:
        results = [run_wrk(wrk, urls[0], connections=CONNS, duration=duration, headers=headers)]
    else:
        results = parallel_wrk(procs, wrk, urls, duration, headers)
    wall = time.monotonic() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = {name: 100 * (proc_cpu_ticks(pid) - before[name]) / TICK / wall for name, pid in watch.items()}
    cpu["wrk"] = 100 * (after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime) / wall
    total = sum(r.requests for r in results)
    rps = sum(r.rps for r in results)
    return Load(
        rps=rps,
        # a request-weighted mean of the per-node percentiles: an approximation, said in the notes
        p50_ms=sum(r.p50_ms * r.requests for r in results) / max(total, 1),
        p99_ms=max(r.p99_ms for r in results),
        errors=sum(r.errors + r.non_2xx for r in results),
        cpu=cpu,
        node_us=sum(v for k, v in cpu.items() if k not in ("nginx", "wrk")) / 100 * 1e6 / max(rps, 1.0),
    )


def parallel_wrk(
    procs: Processes, wrk: str, urls: Sequence[str], duration: float, headers: dict[str, str] | None
) -> list[WrkResult]:
    """One wrk per URL, started together, CONNS split between them (no balancer installed)."""
    from loadgen import parse_wrk

    running = []
    for i, url in enumerate(urls):
        share = CONNS // len(urls) + (1 if i < CONNS % len(urls) else 0)  # 16 = 6 + 5 + 5
        argv = [wrk, "-t1", f"-c{share}", f"-d{duration:g}s", "--latency", "--timeout", "10s"]
        for name, value in (headers or {}).items():
            argv += ["-H", f"{name}: {value}"]
        running.append(procs.start([*argv, url], stdout=subprocess.PIPE, session=False))
    out = []
    for proc in running:
        stdout, _ = proc.communicate(timeout=duration + 60)
        if proc.returncode != 0:
            raise BenchError(f"wrk failed ({proc.returncode}): {stdout.decode(errors='replace')}")
        out.append(parse_wrk(stdout.decode()))
    return out


class Client:
    """One keep-alive connection for one-request-at-a-time latencies (time to last byte)."""

    def __init__(self, origin: str) -> None:
        parts = urlsplit(origin)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, int, float, str]:
        """Status, body bytes, seconds to the last byte, X-Cache."""
        began = time.perf_counter()
        try:
            self.conn.request("GET", path, headers=headers or {})
            response = self.conn.getresponse()
        except (http.client.HTTPException, OSError):  # a node restarted under a kept connection
            self.conn.close()
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
            began = time.perf_counter()
            self.conn.request("GET", path, headers=headers or {})
            response = self.conn.getresponse()
        size = 0
        while chunk := response.read(MIB):
            size += len(chunk)
        took = time.perf_counter() - began
        return response.status, size, took, response.getheader("X-Cache") or "-"

    def close(self) -> None:
        self.conn.close()


def summary(samples: Sequence[float]) -> dict[str, float]:
    """Median and p90 (ms) of latencies in seconds; n for context."""
    ms = sorted(s * 1000 for s in samples)
    if not ms:
        return {"n": 0}
    p90 = ms[min(len(ms) - 1, round(0.9 * (len(ms) - 1)))]
    return {"n": len(ms), "p50_ms": statistics.median(ms), "p90_ms": p90, "min_ms": ms[0], "max_ms": ms[-1]}


def upstream_hits(hits_url: str) -> dict[str, int]:
    status, _, body = http_get(hits_url, timeout=10)
    if status != 200:
        raise BenchError(f"the fake upstream's hit counts: HTTP {status}")
    counts: dict[str, int] = json.loads(body)
    return counts


# ------------------------------------------------------------------------------------ the run


@dataclass
class Bench:
    plan: Plan
    procs: Processes
    work: Path
    wrk: str
    env: dict[str, str]
    wheels: dict[str, Wheel]
    upstream: str
    hits_url: str
    cluster: list[Node]
    local: Node
    balancer: list[str] | None  # URL per cluster size, or None: wrk per node
    nginx_pid: int | None
    page_path: str = ""
    file_paths: dict[str, str] = field(default_factory=dict)  # project -> /default/pypi/public/files/...
    samples: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        print(f"  WARNING: {message}", flush=True)

    def record(self, key: str, value: Any) -> None:
        self.samples.setdefault(key, []).append(value)

    @property
    def s1(self) -> Node:
        return self.cluster[0]


def page_path(project: str) -> str:
    return f"/default/pypi/public/simple/{project}/"


def discover_file(origin: str, project: str) -> str:
    """The file's path on a node, from the node's own page (JSON), fetching the page once."""
    status, _, body = http_get(origin + page_path(project), headers={"Accept": PIP_ACCEPT}, timeout=60)
    if status != 200:
        raise BenchError(f"page of {project} via {origin}: HTTP {status}: {body[:300]!r}")
    link = str(json.loads(body)["files"][0]["url"])
    return urlsplit(urljoin(origin + page_path(project), link).split("#", 1)[0]).path


def fetch_ok(origin: str, path: str, size: int | None = None, headers: dict[str, str] | None = None) -> None:
    status, _, body = http_get(origin + path, headers=headers, timeout=120)
    if status != 200 or (size is not None and len(body) != size):
        raise BenchError(f"GET {origin}{path}: HTTP {status}, {len(body)} bytes (expected {size})")


def warm_up(bench: Bench) -> None:
    """Every node fetches the page and both files (the first from the upstream, the others from
    the bucket), the local node its own; the cold-page projects are stored by s1 and by local."""
    print("warming the caches ...", flush=True)
    bench.page_path = page_path(PAGE_PROJECT)
    for project in (PAGE_PROJECT, BIG_PROJECT):
        bench.file_paths[project] = discover_file(bench.s1.origin, project)
    for node in [*bench.cluster, bench.local]:
        fetch_ok(node.origin, bench.page_path, headers={"Accept": PIP_ACCEPT})
        for project, path in bench.file_paths.items():
            fetch_ok(node.origin, path, bench.wheels[project].size)
            fetch_ok(node.origin, path, bench.wheels[project].size)  # a hit: vouched for on disk
    for i in range(bench.plan.cold_pages):
        for node in (bench.s1, bench.local):
            fetch_ok(node.origin, page_path(f"bench-nodes-p{i:02d}"), headers={"Accept": PIP_ACCEPT})
    if bench.balancer is not None:
        for url in bench.balancer:
            for _ in range(3):
                fetch_ok(url, bench.page_path, headers={"Accept": PIP_ACCEPT})


def cluster_loads(bench: Bench, round_no: int) -> None:
    """1 and 2: page and 200 KB hits through the balancer (or wrk per node) for n = 1, 2, 3."""
    sizes = [1, 2, 3]
    sizes = sizes[round_no % 3 :] + sizes[: round_no % 3]  # a different order each round
    for kind, path, headers in (
        ("page", bench.page_path, {"Accept": PIP_ACCEPT}),
        ("file", bench.file_paths[PAGE_PROJECT], None),
    ):
        for n in sizes:
            watch = {node.name: node.pid for node in bench.cluster[:n]}
            if bench.balancer is not None and bench.nginx_pid is not None:
                urls = [bench.balancer[n - 1] + path]
                watch["nginx"] = bench.nginx_pid
                for pid in child_pids(bench.nginx_pid):
                    watch["nginx"] = pid  # the one worker does the work; its master sleeps
            else:
                urls = [node.origin + path for node in bench.cluster[:n]]
            load = wrk_with_cpu(bench.procs, bench.wrk, urls, bench.plan.duration, watch, headers)
            if load.errors:
                bench.warn(f"{kind} hits, {n} node(s): {load.errors} errors or non-2xx answers")
            bench.record(f"{kind}_{n}", asdict(load))
            cpus = ", ".join(f"{k} {v:.0f}%" for k, v in load.cpu.items())
            print(
                f"  {kind} hits, {n} node(s): {load.rps:,.0f} req/s, p50 {load.p50_ms:.2f} ms,"
                f" p99 {load.p99_ms:.2f} ms; nodes {load.node_us:.0f} µs CPU/req; CPU {cpus}",
                flush=True,
            )


def direct_loads(bench: Bench) -> None:
    """3a: one node, no balancer: local+SQLite vs s3+PostgreSQL, page and 200 KB hits."""
    for kind, path, headers in (
        ("page", bench.page_path, {"Accept": PIP_ACCEPT}),
        ("file", bench.file_paths[PAGE_PROJECT], None),
    ):
        for node in (bench.local, bench.s1):
            label = "local" if node is bench.local else "s3"
            load = wrk_with_cpu(
                bench.procs, bench.wrk, [node.origin + path], bench.plan.duration, {"node": node.pid}, headers
            )
            if load.errors:
                bench.warn(f"direct {kind} hits on {label}: {load.errors} errors or non-2xx answers")
            bench.record(f"direct_{kind}_{label}", asdict(load))
            print(
                f"  direct {kind} hits, {label}: {load.rps:,.0f} req/s, p50 {load.p50_ms:.2f} ms,"
                f" p99 {load.p99_ms:.2f} ms; node CPU {load.cpu['node']:.0f}% ({load.node_us:.0f} µs/req)",
                flush=True,
            )


def bucket_fetches(bench: Bench) -> None:
    """3b: time to last byte of a disk hit (local node, s3 node) and of a fetch from the bucket."""
    local, s1 = Client(bench.local.origin), Client(bench.s1.origin)
    try:
        for project, count in (
            (PAGE_PROJECT, bench.plan.small_samples),
            (BIG_PROJECT, bench.plan.big_samples),
        ):
            wheel = bench.wheels[project]
            path = bench.file_paths[project]
            blobs = sorted(bench.s1.data_dir.glob(f"blobs/**/{wheel.sha256}"))
            if len(blobs) != 1:
                raise BenchError(
                    f"s1's copy of {project}'s blob: found {blobs} under {bench.s1.data_dir}/blobs"
                )
            upstream_before = upstream_hits(bench.hits_url).get(upstream_file(path), 0)
            for _ in range(count):
                for client, key in ((local, "disk_local"), (s1, "disk_s3")):
                    status, size, took, _ = client.get(path)
                    check_body(bench, key, status, size, wheel.size)
                    bench.record(f"{key}_{project}", took)
                blobs[0].unlink()
                status, size, took, _ = s1.get(path)
                check_body(bench, "bucket", status, size, wheel.size)
                if not blobs[0].exists():
                    bench.warn(f"{project}: s1 served it without putting it back on its disk")
                bench.record(f"bucket_{project}", took)
            upstream_after = upstream_hits(bench.hits_url).get(upstream_file(path), 0)
            if upstream_after != upstream_before:
                bench.warn(
                    f"{project}: {upstream_after - upstream_before} upstream GETs"
                    " while fetching it back from the bucket"
                )
            for key in ("disk_local", "disk_s3", "bucket"):
                got = summary(bench.samples[f"{key}_{project}"][-count:])
                print(
                    f"  {project} {key}: p50 {got['p50_ms']:.2f} ms, p90 {got['p90_ms']:.2f} ms", flush=True
                )
    finally:
        local.close()
        s1.close()


def upstream_file(path: str) -> str:
    """The fake upstream's path for a proxy file path (…/files/{project}/{filename})."""
    return "/files/" + path.rsplit("/", 1)[1]


def check_body(bench: Bench, what: str, status: int, size: int, expected: int) -> None:
    if status != 200 or size != expected:
        raise BenchError(f"{what}: HTTP {status}, {size} bytes (expected {expected})")


def cold_pages(bench: Bench) -> None:
    """3c: restart both single nodes, then each page once (from the index) and once more (memory)."""
    for node in (bench.local, bench.s1):
        node.restart(bench.procs, bench.env)
    clients = {"sqlite": Client(bench.local.origin), "postgresql": Client(bench.s1.origin)}
    headers = {"Accept": PIP_ACCEPT}
    try:
        for client in clients.values():  # the first request opens connections, imports, ...
            status, _, _, _ = client.get(bench.page_path, headers)
            if status != 200:
                raise BenchError(f"page after restart: HTTP {status}")
        projects = [f"bench-nodes-p{i:02d}" for i in range(bench.plan.cold_pages)]
        for phase in ("cold", "warm"):
            for project in projects:
                for name, client in clients.items():
                    status, _, took, _ = client.get(page_path(project), headers)
                    if status != 200:
                        raise BenchError(f"{phase} page {project} on {name}: HTTP {status}")
                    bench.record(f"page_{phase}_{name}", took)
        for phase in ("cold", "warm"):
            for name in clients:
                got = summary(bench.samples[f"page_{phase}_{name}"][-len(projects) :])
                print(
                    f"  page {phase} ({name}): p50 {got['p50_ms']:.2f} ms, p90 {got['p90_ms']:.2f} ms",
                    flush=True,
                )
    finally:
        for client in clients.values():
            client.close()


def cold_miss(bench: Bench, index: int) -> None:
    """4: 3 clients per node at once for a 10 MB file none has (its page stored); then the same
    file through the single local node (its own index and disk), 9 clients, for reference."""
    project = f"bench-nodes-miss-{index}"
    wheel = bench.wheels[project]
    path = discover_file(bench.s1.origin, project)  # the page: fetched once, into the shared index
    fake_origin = bench.upstream.split("/simple/", 1)[0]
    direct = run_curls(bench.procs, [fake_origin + upstream_file(path)])[0]
    cases = (
        ("miss", [node.origin + path for node in bench.cluster for _ in range(3)]),
        ("miss_local", [bench.local.origin + path for _ in range(9)]),
    )
    for key, urls in cases:
        if key == "miss_local":
            discover_file(bench.local.origin, project)  # its page, as the cluster's was
        before = upstream_hits(bench.hits_url).get(upstream_file(path), 0)
        results = run_curls(bench.procs, urls)
        gets = upstream_hits(bench.hits_url).get(upstream_file(path), 0) - before
        bad = [r for r in results if r[0] != 200 or r[1] != wheel.size]
        if bad:
            bench.warn(
                f"cold miss {project} ({key}): {len(bad)} of {len(results)} transfers failed: {bad[:3]}"
            )
        last = max(r[2] for r in results)
        bench.record(f"{key}_last_byte_s", last)
        bench.record(f"{key}_first_done_s", min(r[2] for r in results))
        bench.record(f"{key}_upstream_gets", gets)
        if key == "miss":
            per_node = {
                node.name: max(r[2] for r in results[3 * i : 3 * i + 3])
                for i, node in enumerate(bench.cluster)
            }
            bench.record("miss_per_node_s", per_node)
            where = ", ".join(f"{k} {v:.3f}" for k, v in per_node.items())
            print(
                f"  cold miss {project} ({wheel.size / MIB:.1f} MiB), 9 clients on 3 nodes: last byte"
                f" {last:.3f} s ({where}), upstream GETs {gets}",
                flush=True,
            )
        else:
            print(
                f"  the same file, 9 clients on the local node: last byte {last:.3f} s, upstream GETs {gets};"
                f" one client straight from the fake: {direct[2]:.3f} s",
                flush=True,
            )
    bench.record("miss_direct_s", direct[2])


def run_curls(procs: Processes, urls: Sequence[str]) -> list[tuple[int, int, float]]:
    """One curl per URL, all started at once: (status, bytes, seconds to the last byte) each."""
    fmt = r"%{http_code} %{size_download} %{time_total}\n"
    argv = ["curl", "-s", "-o", "/dev/null", "--max-time", "120", "-w", fmt]
    running = [procs.start([*argv, url], stdout=subprocess.PIPE, session=False) for url in urls]
    out = []
    for proc in running:
        stdout, _ = proc.communicate(timeout=150)
        code, size, seconds = stdout.decode().split()
        out.append((int(code), int(size), float(seconds)))
    return out


# ------------------------------------------------------------------------------------ output


def med(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def load_row(bench: Bench, key: str) -> dict[str, Any] | None:
    runs = bench.samples.get(key)
    if not runs:
        return None
    cpu_names = runs[0]["cpu"].keys()
    return {
        "rps": med([r["rps"] for r in runs]),
        "p50_ms": med([r["p50_ms"] for r in runs]),
        "p99_ms": med([r["p99_ms"] for r in runs]),
        "cpu": {name: med([r["cpu"].get(name, 0.0) for r in runs]) for name in cpu_names},
        "errors": sum(r["errors"] for r in runs),
        "node_us": med([r["node_us"] for r in runs]),
    }


def render(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(row) for row in lines)])


def tables(bench: Bench) -> tuple[str, dict[str, Any]]:
    """The printed tables and the same figures as a dict for the JSON."""
    figures: dict[str, Any] = {}
    out = []
    via = "nginx round-robin (1 worker)" if bench.balancer is not None else "one wrk per node, added up"
    lines = []
    for kind, label in (("page", "page hit"), ("file", "200 KB file hit")):
        for n in (1, 2, 3):
            row = load_row(bench, f"{kind}_{n}")
            if row is None:
                continue
            figures[f"{kind}_{n}"] = row
            nodes = " ".join(f"{row['cpu'][f's{i}']:.0f}" for i in range(1, n + 1))
            others = ", ".join(f"{k} {v:.0f}" for k, v in row["cpu"].items() if not k.startswith("s"))
            lines.append(
                [
                    f"{label}, {n} node(s)",
                    f"{row['rps']:,.0f}",
                    f"{row['p50_ms']:.2f}",
                    f"{row['p99_ms']:.2f}",
                    f"{row['node_us']:.0f}",
                    nodes,
                    others,
                ]
            )
    out.append(f"1-2. warm hits via {via}, {CONNS} wrk connections in total (median of rounds)")
    out.append(
        render(
            ["case", "req/s", "p50 ms", "p99 ms", "node CPU µs/req", "CPU% per node", "CPU% others"], lines
        )
    )
    lines = []
    for kind, label in (("page", "page hit"), ("file", "200 KB file hit")):
        for backend in ("local", "s3"):
            row = load_row(bench, f"direct_{kind}_{backend}")
            if row is None:
                continue
            figures[f"direct_{kind}_{backend}"] = row
            name = "local + SQLite" if backend == "local" else "s3 + PostgreSQL"
            lines.append(
                [
                    f"{label}, {name}",
                    f"{row['rps']:,.0f}",
                    f"{row['p50_ms']:.2f}",
                    f"{row['p99_ms']:.2f}",
                    f"{row['node_us']:.0f}",
                    f"{row['cpu']['node']:.0f}",
                    f"{row['cpu']['wrk']:.0f}",
                ]
            )
    idle = {
        name: bench.samples.get(f"idle_{name}", [float("nan")])[0] for name in ("s1", "s2", "s3", "local")
    }
    figures["idle_cpu_percent"] = idle
    out.append("idle CPU% per node: " + ", ".join(f"{k} {v:.1f}" for k, v in idle.items()))
    out += ["", f"3a. one node, direct, warm hits, {CONNS} wrk connections (median of rounds)"]
    out.append(
        render(["case", "req/s", "p50 ms", "p99 ms", "node CPU µs/req", "node CPU%", "wrk CPU%"], lines)
    )
    lines = []
    for project, label in ((PAGE_PROJECT, "200 KB"), (BIG_PROJECT, "10 MB")):
        for key, what in (
            ("disk_local", "hit on disk, local + SQLite node"),
            ("disk_s3", "hit on disk, s3 + PostgreSQL node"),
            ("bucket", "not on this node's disk: from the bucket"),
        ):
            got = summary(bench.samples.get(f"{key}_{project}", []))
            if not got["n"]:
                continue
            figures[f"{key}_{project}"] = got
            lines.append(
                [f"{label} {what}", f"{got['n']:.0f}", f"{got['p50_ms']:.2f}", f"{got['p90_ms']:.2f}"]
            )
    out += ["", "3b. one request at a time, time to last byte (samples pooled over rounds)"]
    out.append(render(["case", "n", "p50 ms", "p90 ms"], lines))
    lines = []
    for phase, what in (
        ("cold", "first request after a restart (listing from the index)"),
        ("warm", "the same page again (memory)"),
    ):
        for name in ("sqlite", "postgresql"):
            got = summary(bench.samples.get(f"page_{phase}_{name}", []))
            if not got["n"]:
                continue
            figures[f"page_{phase}_{name}"] = got
            lines.append(
                [f"page {what}, {name}", f"{got['n']:.0f}", f"{got['p50_ms']:.2f}", f"{got['p90_ms']:.2f}"]
            )
    out += ["", "3c. page requests, one at a time (samples pooled over rounds)"]
    out.append(render(["case", "n", "p50 ms", "p90 ms"], lines))
    if bench.samples.get("miss_last_byte_s"):
        lines = []
        for key, label in (
            ("miss", "s3 + PostgreSQL, 3 nodes x 3 clients"),
            ("miss_local", "local + SQLite, 1 node x 9 clients"),
        ):
            figures[key] = {
                "rounds": len(bench.samples[f"{key}_last_byte_s"]),
                "last_byte_s": med(bench.samples[f"{key}_last_byte_s"]),
                "first_done_s": med(bench.samples[f"{key}_first_done_s"]),
                "upstream_gets": bench.samples[f"{key}_upstream_gets"],
            }
            m = figures[key]
            lines.append(
                [
                    label,
                    f"{m['last_byte_s']:.3f}",
                    f"{m['first_done_s']:.3f}",
                    "/".join(str(g) for g in m["upstream_gets"]),
                ]
            )
        per_node = bench.samples["miss_per_node_s"]
        figures["miss"]["last_byte_per_node_s"] = {k: med([p[k] for p in per_node]) for k in per_node[0]}
        figures["miss_direct_s"] = med(bench.samples["miss_direct_s"])
        out += ["", "4. cold miss, one 10 MB file, 9 curl clients at once (median of rounds)"]
        out.append(render(["case", "last byte s", "first done s", "upstream GETs"], lines))
        out.append(
            "last byte per node (s): "
            + ", ".join(f"{k} {v:.3f}" for k, v in figures["miss"]["last_byte_per_node_s"].items())
            + f"; one client straight from the fake: {figures['miss_direct_s']:.3f} s"
        )
    return "\n".join(out), figures


NOTES = [
    "all nodes, nginx, wrk, moto, PostgreSQL and the fake share this machine's {cpus} CPUs: more"
    " nodes cannot add capacity here, so 2 and 3 nodes show what the extra processes and the"
    " balancer cost, not how a cluster scales over machines (per-node scaling needs a core per node)",
    "CPU% is of one core (100 = one core busy), from /proc over the wrk run; 'others' are nginx's"
    " worker and wrk; node CPU µs/req is all the nodes' CPU time over the requests served: the"
    " figure that other load on the machine moves least (req/s and latency move with it)",
    "without nginx, the wrk runs' p50 is a request-weighted mean of the per-node p50s, p99 their maximum",
    "the bucket is moto (a Python server): a real S3 adds its own network latency; a bucket fetch"
    " also writes, fsyncs and hashes the blob before the node sends it (invariant 1)",
]


# ------------------------------------------------------------------------------------ main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3, --quick 1)")
    parser.add_argument("--duration", type=float, help="seconds per wrk run (default 5, --quick 2)")
    parser.add_argument("--quick", action="store_true", help="a smoke run (<= 90 s)")
    parser.add_argument("--json", type=Path, help="results file (default bench/.work/nodes.json)")
    parser.add_argument("--work", type=Path, default=BENCH / ".work" / "nodes")
    parser.add_argument(
        "--no-balancer", action="store_true", help="one wrk per node (added up) even when nginx is installed"
    )
    parser.add_argument("--keep-data", action="store_true", help="keep the nodes' data directories")
    return parser.parse_args()


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def setup(
    args: argparse.Namespace, plan: Plan, procs: Processes, pg: PostgresServer, settings: dict[str, Any]
) -> Bench:
    work: Path = args.work
    try:
        wrk = ensure_debian("wrk", "wrk")
        ensure_debian("curl", "curl")  # the cold-miss clients
    except Unavailable as exc:
        raise BenchError(str(exc)) from None
    nginx: str | None = None
    if not args.no_balancer:
        try:
            nginx = ensure_debian("nginx", "nginx-light")
        except Unavailable as exc:
            print(f"  nginx unavailable ({exc}): wrk runs once per node instead", flush=True)
    print("building wheels ...", flush=True)
    wheels = build_wheels(BENCH / ".work" / "nodes-dists", plan)
    print("starting PostgreSQL, moto and the fake upstream ...", flush=True)
    pg.start()
    index_url = run_sync(create_database(pg.dsn, "bench_nodes"))
    endpoint = start_moto(procs, work)
    storage = run_sync(s3_storage(endpoint, BUCKET, prefix="bench/"))
    manifest = work / "upstream-files.json"
    manifest.write_text(json.dumps([{"project": w.project, "path": str(w.path)} for w in wheels.values()]))
    up_log = work / "upstream.log"
    up = procs.start(
        [sys.executable, str(BENCH / "nodes_upstream.py"), str(manifest)],
        log=up_log,
        stdout=subprocess.PIPE,
        env=python_env(),
        cwd=REPO,
    )
    announced = json.loads(_read_line(up, 120, "fake upstream", up_log))
    env = node_env()
    cluster_doc = node_document(announced["url"], storage, index_url)
    cluster = [Node(f"s{i}", work / f"s{i}", cluster_doc) for i in range(1, 4)]
    local = Node("local", work / "local", node_document(announced["url"], None, None))
    print("starting 4 nodes (s1 first: it runs the PostgreSQL migrations) ...", flush=True)
    for node in [*cluster, local]:
        node.write_config()
    cluster[0].launch(procs, env)
    cluster[0].wait()
    for node in [*cluster[1:], local]:
        node.launch(procs, env)
    for node in [*cluster[1:], local]:
        node.wait()
    balancer, nginx_pid = (None, None)
    if nginx is not None:
        balancer, nginx_pid = start_balancer(procs, nginx, work / "nginx", cluster)
        settings["nginx"] = subprocess.run(
            [nginx, "-v"], capture_output=True, text=True, check=False, timeout=10
        ).stderr.strip()
    settings.update(
        balancer="nginx round-robin, 1 worker, keep-alive to the nodes"
        if balancer
        else "none: one wrk per node, figures added up",
        wrk=wrk,
        postgresql=str(pg.bindir),
        moto=endpoint,
    )
    return Bench(
        plan,
        procs,
        work,
        wrk,
        env,
        wheels,
        announced["url"],
        announced["hits"],
        cluster,
        local,
        balancer,
        nginx_pid,
    )


def scan_logs(bench: Bench) -> None:
    """A node's log at WARNING holds only what went wrong: say so under the results."""
    for node in [*bench.cluster, bench.local]:
        for log in sorted(node.root.glob("node-*.log")):
            text = log.read_text(errors="replace")
            if "Traceback" in text or " ERROR " in text or "CRITICAL" in text:
                bench.warn(f"{node.name}: errors in {log}:\n{text[-1500:]}")


def idle_cpu(bench: Bench, seconds: float) -> None:
    """Each node's CPU while nobody asks anything: its background work (the cluster's change
    watch and leases, the gc), which the per-request figures under load include."""
    nodes = [*bench.cluster, bench.local]
    before = {node.name: proc_cpu_ticks(node.pid) for node in nodes}
    began = time.monotonic()
    time.sleep(seconds)
    wall = time.monotonic() - began
    for node in nodes:
        bench.record(f"idle_{node.name}", 100 * (proc_cpu_ticks(node.pid) - before[node.name]) / TICK / wall)
    shown = ", ".join(f"{node.name} {bench.samples[f'idle_{node.name}'][-1]:.1f}%" for node in nodes)
    print(f"  idle CPU over {wall:.1f} s: {shown}", flush=True)


def run(bench: Bench) -> None:
    plan = bench.plan
    warm_up(bench)
    idle_cpu(bench, min(plan.duration, 3.0))
    for r in range(plan.rounds):
        print(f"round {r + 1}/{plan.rounds} (load average {loadavg()})", flush=True)
        cluster_loads(bench, r)
        direct_loads(bench)
        bucket_fetches(bench)
        cold_pages(bench)
        if r < plan.miss_rounds:
            cold_miss(bench, r)


def main() -> int:
    args = parse_args()
    args.work = args.work.resolve()
    plan = Plan.make(args)
    shutil.rmtree(args.work, ignore_errors=True)  # the previous run's data directories
    args.work.mkdir(parents=True, exist_ok=True)
    why = missing_reason()
    bindir = find_bindir()
    if why is not None or bindir is None:
        print(f"cannot run: {why}", file=sys.stderr)
        return 1
    procs = Processes()
    pg = PostgresServer(bindir)
    settings: dict[str, Any] = {
        "plan": asdict(plan),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_start": loadavg(),
        "connections": CONNS,
    }
    benches: list[Bench] = []  # set up, even if a run was cut short: its figures still print
    started = time.monotonic()

    def body() -> None:
        benches.append(setup(args, plan, procs, pg, settings))
        run(benches[0])

    def cleanup() -> None:
        procs.stop_all()
        pg.stop()

    status = run_guarded(body, cleanup)
    bench = benches[0] if benches else None
    settings["load_average_end"] = loadavg()
    settings["wall_s"] = round(time.monotonic() - started, 1)
    settings["complete"] = status == 0
    if bench is None:
        return status
    scan_logs(bench)
    text, figures = tables(bench)
    notes = [n.format(cpus=os.cpu_count()) for n in NOTES]
    print()
    print(text)
    for note in notes:
        print(f"note: {note}")
    print(
        f"load average (1, 5, 15 min): start {settings['load_average_start']},"
        f" end {settings['load_average_end']}"
    )
    for warning in bench.warnings:
        print(f"WARNING: {warning}")
    out = args.json or args.work.parent / "nodes.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "settings": settings,
                "figures": figures,
                "notes": notes,
                "warnings": bench.warnings,
                "samples": bench.samples,
            },
            indent=2,
            default=str,
        )
        + "\n"
    )
    if not args.keep_data:
        for node in [*bench.cluster, bench.local]:
            shutil.rmtree(node.data_dir, ignore_errors=True)
    print(f"\nresults written to {out} ({settings['wall_s']:.0f}s)")
    return status


if __name__ == "__main__":
    sys.exit(main())
