"""The proxy against the servers a user would pick instead, in one run on loopback.

    python bench/compare.py [--quick] [--json out.json] [--work DIR] [--scratch DIR]

Installs the peers into a scratch directory outside the repository (``--scratch``, default
``~/.cache/artifact-proxy-bench``): devpi-server and proxpi for PyPI, Verdaccio 6.8.0 for npm, and
takes nginx and wrk from Debian's packages (installed with apt-get only when running as root).
Builds real wheels and npm tarballs with the test suite's builders, serves them from the test
suite's fakes (FakePyPI, FakeNpmRegistry) in processes of their own, and points every server at
those same two fakes: the proxy (``python -m proxy serve``, ``--workers 2`` when the CLI has it),
devpi (mirror index), proxpi, Verdaccio (uplink) and nginx ``proxy_cache`` (the close-to-the-limit
reference); nginx also serves the same bytes as static files. Then, interleaved (each round runs
every server once, round-robin; the figure is the median of the rounds):

  A. warm ``pip download`` and ``uv pip install`` of 30 pinned wheels, warm ``npm ci`` of a
     15-package lockfile: wall time (client caches empty every run, server caches warm);
  B. cache-hit requests/s, p50 and p99 under wrk for a simple page, a large packument (2,000
     versions; plain, and gzip as npm asks) and a 10 MB wheel, each also against nginx serving
     the same bytes statically;
  C. cold ``uv pip install`` of 30 other wheels through each server vs straight from the fake
     upstream (the overhead of caching);
  D. N concurrent misses for one big file (100 x 100 MB; ``--quick``: 20 x 20 MB), for PyPI and
     npm: upstream downloads it caused, time to last byte, peak RSS (and PSS, and growth over the
     RSS before the burst) of the server's whole process tree. One round by default: each moves
     10 GB per server (``--miss-rounds 3`` for a median).

Run it with the project's Python (the fakes need aiohttp and the test suite's builders). The
wheels are built once into ``bench/.work/dists`` (shared with ``run.py``), the servers' caches
live in ``bench/.work/compare`` and are removed after the run unless ``--keep-data``.

Prints one table (the proxy's value, then each peer's value with the ratio proxy/peer) and writes
it all as JSON. A peer that cannot be installed or started shows as "n/a" with the reason listed
under the table. Only 127.0.0.1 is contacted, apart from the package installs; every process
started is stopped by PID on the way out, Ctrl-C included. Exit status: 0 done, 1 error, 130
interrupted.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urldefrag, urljoin

from dataset import SMALL_PAYLOAD, Dist, _load_manifest, _reusable
from harness import (
    BenchError,
    Processes,
    _status_kib,
    child_pids,
    http_get,
    reset_peak_rss,
    rss_kib,
    run_guarded,
)
from loadgen import CURL_FORMAT, Download, WrkResult, _parse_curl, run_wrk
from peers import (
    PROXPI_THREADS,
    VERDACCIO_VERSION,
    Server,
    Unavailable,
    ensure_debian,
    ensure_python_peers,
    ensure_verdaccio,
    proxy_workers_flag,
    start_devpi,
    start_nginx,
    start_proxpi,
    start_proxy,
    start_verdaccio,
)
from servers import BENCH, REPO, _read_line, python_env

sys.path.insert(0, str(REPO))  # tests.fakes: the wheel and tarball builders, npm's isolated env
from tests.fakes.dists import build_wheel
from tests.fakes.npm import build_tarball, pack_name
from tests.npm_clients import npm_env

MIB = 2**20
MB = 1e6
SMALL_COUNT = 30
TREE = [f"bench-tree-{i:02d}" for i in range(15)]
HUGE = "bench-huge"
HUGE_VERSIONS = 2000
FILLER_DEPS = 40
PIP_ACCEPT = (
    "application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html; q=0.1, text/html; q=0.01"
)
NPM_ACCEPT = "application/vnd.npm.install-v1+json; q=1.0, application/json; q=0.8, */*"
PYPI_SERVERS = ("proxy", "devpi", "proxpi", "nginx")
NPM_SERVERS = ("proxy", "verdaccio", "nginx")
COLUMNS = ("proxy", "devpi", "proxpi", "verdaccio", "nginx", "nginx-static", "upstream")
CACHES = ("proxy-data", "devpi", "proxpi-cache", "verdaccio-storage", "nginx/cache")
HEADINGS = {"nginx": "nginx proxy_cache", "nginx-static": "nginx static", "upstream": "fake upstream"}


@dataclass(frozen=True)
class Plan:
    """How much to measure: the full run or the ``--quick`` smoke run."""

    rounds: int
    wrk_seconds: float
    miss_clients: int
    miss_mib: int
    miss_rounds: int  # D moves 10 GB per server and round in the full run: once by default

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:
            return cls(rounds=1, wrk_seconds=2.0, miss_clients=20, miss_mib=20, miss_rounds=1)
        return cls(rounds=3, wrk_seconds=5.0, miss_clients=100, miss_mib=100, miss_rounds=1)


# ------------------------------------------------------------------------------------ results


@dataclass
class Row:
    """One figure for every column that applies; ``why`` holds the reason a column is n/a."""

    metric: str
    unit: str
    better: str  # "lower" or "higher"
    values: dict[str, float | None] = field(default_factory=dict)
    why: dict[str, str] = field(default_factory=dict)

    def ratio(self, peer: str) -> float | None:
        """proxy / peer, whatever the unit (so for req/s above 1 is better, for seconds below)."""
        mine, theirs = self.values.get("proxy"), self.values.get(peer)
        if mine is None or not theirs:
            return None
        return mine / theirs

    def as_dict(self) -> dict[str, Any]:
        ratios = {c: self.ratio(c) for c in self.values if c != "proxy"}
        return asdict(self) | {"ratio_proxy_over": ratios}


@dataclass
class Results:
    """The rows, every raw sample, settings, and anything odd seen on the way."""

    rows: list[Row] = field(default_factory=list)
    samples: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        print(f"  WARNING: {message}", flush=True)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        cells = ", ".join(f"{c} {_num(v)}" for c, v in row.values.items())
        print(f"    {row.metric}: {cells} {row.unit}", flush=True)

    def columns(self) -> list[str]:
        used = {c for row in self.rows for c in (*row.values, *row.why)}
        return [c for c in COLUMNS if c in used]

    def table(self) -> str:
        """Fixed-width table: proxy's value, then each peer's value and the ratio proxy/peer."""
        columns = self.columns()
        header = ["metric", "unit", "better", *(HEADINGS.get(c, c) for c in columns)]
        lines: list[list[str]] = []
        for row in self.rows:
            cells = [row.metric, row.unit, row.better]
            for column in columns:
                if column in row.why:
                    cells.append("n/a")
                elif column not in row.values:
                    cells.append("-")
                elif column == "proxy":
                    cells.append(_num(row.values[column]))
                else:
                    ratio = row.ratio(column)
                    shown = f"x{ratio:.2f}" if ratio is not None else "x?"
                    cells.append(f"{_num(row.values[column])} ({shown})")
            lines.append(cells)
        widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]

        def render(cells: list[str]) -> str:
            pairs = enumerate(zip(cells, widths, strict=True))
            return "  ".join(f"{c:<{w}}" if i < 3 else f"{c:>{w}}" for i, (c, w) in pairs)

        out = [render(header), render(["-" * w for w in widths])]
        out += [render(line) for line in lines]
        out.append(
            "peer cells: the peer's value (proxy / peer); 'better' says which way the proxy's ratio is good"
        )
        reasons = dict(self.unavailable)
        for row in self.rows:
            for column, why in row.why.items():
                reasons.setdefault(column, why)
        out += [f"n/a {HEADINGS.get(c, c)}: {why}" for c, why in reasons.items()]
        out += [f"note: {n}" for n in self.notes]
        out += [f"WARNING: {w}" for w in self.warnings]
        return "\n".join(out)

    def write(self, path: Path, settings: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "settings": settings,
            "rows": [row.as_dict() for row in self.rows],
            "unavailable": self.unavailable,
            "notes": self.notes,
            "warnings": self.warnings,
            "samples": self.samples,
        }
        path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def _num(value: float | None) -> str:
    if value is None:
        return "?"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}"


# ------------------------------------------------------------------------------------ dataset


@dataclass(frozen=True)
class Data:
    """What the fakes publish, grouped by the measurement that uses it."""

    small: tuple[Dist, ...]  # A and B: the 30 pinned wheels, the simple page
    ten: Dist  # B: the 10 MB wheel
    cold: tuple[tuple[Dist, ...], ...]  # C: one set of 30 per round
    miss: tuple[Dist, ...]  # D: one big wheel per miss round
    npm_miss: tuple[tuple[str, Path, int], ...]  # D: (name, tarball, size) per miss round
    npm_manifest: Path | None
    pypi_manifest: Path


def _wheels(root: Path, specs: list[tuple[str, int]]) -> list[Dist]:
    """Build (or reuse, by the manifest ``dataset.py`` also uses) one wheel per (project, payload)."""
    root.mkdir(parents=True, exist_ok=True)
    manifest_path = root / "manifest.json"
    manifest = _load_manifest(manifest_path)
    dists: list[Dist] = []
    for project, payload in specs:
        dist = _reusable(manifest.get(project), payload)
        if dist is None:
            print(f"  building {project} ({payload / MIB:.1f} MiB payload) ...", flush=True)
            path = build_wheel(root / project, project, "1.0", payload_size=payload)
            dist = Dist(project, path, path.stat().st_size)
            manifest[project] = {**asdict(dist), "path": str(path), "payload": payload}
            manifest_path.write_text(json.dumps(manifest, indent=1))
        dists.append(dist)
    return dists


def _random_tarball(dest: Path, name: str, size: int) -> Path:
    """An npm package tarball (``package/`` prefix, package.json) holding ``size`` random bytes.

    Written with tarfile at gzip level 1 rather than ``npm pack`` (which compresses 100 MB of
    incompressible bytes at level 9 for a minute): the layout is the same.
    """
    path = dest / pack_name(name, "1.0.0")
    if path.is_file() and path.stat().st_size > size:
        return path
    dest.mkdir(parents=True, exist_ok=True)
    print(f"  building {path.name} ({size / MIB:.0f} MiB) ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="npm-big-", dir=dest) as tmp:
        src = Path(tmp)
        manifest = {"name": name, "version": "1.0.0", "main": "index.js", "license": "MIT"}
        (src / "package.json").write_text(json.dumps(manifest))
        (src / "index.js").write_text("module.exports = {};\n")
        with open(src / "blob.bin", "wb") as fh:
            for _ in range(size // MIB):
                fh.write(os.urandom(MIB))
        part = dest / (path.name + ".part")
        with tarfile.open(part, "w:gz", compresslevel=1) as tar:
            for member in ("package.json", "index.js", "blob.bin"):
                tar.add(src / member, arcname=f"package/{member}")
        part.rename(path)
    return path


def build_data(dists: Path, work: Path, plan: Plan, npm_ok: bool) -> Data:
    """Every wheel and tarball, reused across runs, and the two fakes' manifests."""
    print("test packages (reused when already built):", flush=True)
    small_specs = [(f"bench-small-{i:02d}", SMALL_PAYLOAD) for i in range(SMALL_COUNT)]
    small = _wheels(dists, small_specs)
    ten = _wheels(dists, [("bench-ten-10m", 10 * MIB)])[0]
    cold = [
        tuple(_wheels(dists, [(f"bench-cold{r}-{i:02d}", SMALL_PAYLOAD) for i in range(SMALL_COUNT)]))
        for r in range(plan.rounds)
    ]
    miss = _wheels(
        dists, [(f"bench-miss{r}-{plan.miss_mib}m", plan.miss_mib * MIB) for r in range(plan.miss_rounds)]
    )
    every = [*small, ten, *(d for s in cold for d in s), *miss]
    pypi_manifest = work / "pypi-upstream.json"
    pypi_manifest.write_text(json.dumps([{"project": d.project, "path": str(d.path)} for d in every]))

    npm_manifest: Path | None = None
    npm_miss: list[tuple[str, Path, int]] = []
    if npm_ok:
        dest = dists.parent / "npm-dists"  # npm_bench.py's directory: same names, same tarballs
        entries: list[dict[str, Any]] = []
        for i, name in enumerate(TREE):
            deps = {TREE[c]: "^1.0.0" for c in (2 * i + 1, 2 * i + 2) if c < len(TREE)}
            path = dest / pack_name(name, "1.0.0")
            if not path.is_file():
                path = build_tarball(dest, name, "1.0.0", dependencies=deps)
            entries.append({"name": name, "version": "1.0.0", "path": str(path), "dependencies": deps})
        huge = dest / pack_name(HUGE, "1.0.0")
        if not huge.is_file():
            huge = build_tarball(dest, HUGE, "1.0.0")
        fillers = {f"bench-filler-dependency-{k:02d}": "^1.0.0" for k in range(FILLER_DEPS)}
        for v in range(HUGE_VERSIONS):
            version = f"1.{v // 100}.{v % 100}"
            entries.append({"name": HUGE, "version": version, "path": str(huge), "dependencies": fillers})
        for r in range(plan.miss_rounds):
            name = f"bench-miss{r}-{plan.miss_mib}m"
            path = _random_tarball(dest, name, plan.miss_mib * MIB)
            entries.append({"name": name, "version": "1.0.0", "path": str(path)})
            npm_miss.append((name, path, path.stat().st_size))
        npm_manifest = work / "npm-upstream.json"
        npm_manifest.write_text(json.dumps(entries))
    return Data(tuple(small), ten, tuple(cold), tuple(miss), tuple(npm_miss), npm_manifest, pypi_manifest)


# ---------------------------------------------------------------------------------- upstreams


@dataclass(frozen=True)
class Upstream:
    """A fake upstream process: its index/registry URL and where to read its hit counter."""

    url: str
    stats: str
    pid: int

    def hits(self, path: str) -> int:
        status, _, body = http_get(self.stats, timeout=30)
        if status != 200:
            raise BenchError(f"upstream stats {self.stats}: HTTP {status}")
        return int(json.loads(body).get(path, 0))

    def total(self) -> int:
        """Every request the fake has answered so far."""
        status, _, body = http_get(self.stats, timeout=30)
        return sum(int(v) for v in json.loads(body).values()) if status == 200 else -1


def start_upstream(procs: Processes, fmt: str, manifest: Path, work: Path) -> Upstream:
    log = work / f"upstream-{fmt}.log"
    log.unlink(missing_ok=True)
    argv = [sys.executable, str(BENCH / "compare_upstream.py"), fmt, str(manifest)]
    proc = procs.start(argv, log=log, stdout=subprocess.PIPE, env=python_env(), cwd=REPO)
    line = json.loads(_read_line(proc, 900, f"fake {fmt} upstream", log))
    return Upstream(line["url"], line["stats"], proc.pid)


# ------------------------------------------------------------------------------------ clients


@dataclass(frozen=True)
class Clients:
    """The client programs, each isolated from this machine's own configuration."""

    python: str  # with pip
    uv: str | None
    wrk: str | None
    npm: str | None

    def pip_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "UV_"))}
        # No config file at all: the index comes only from the command line.
        return env | {"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INPUT": "1", "UV_NO_CONFIG": "1"}


def _timed(argv: list[str], env: dict[str, str], cwd: Path | None, what: str, timeout: float = 600) -> float:
    start = time.perf_counter()
    done = subprocess.run(
        argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        raise BenchError(f"{what} failed (exit {done.returncode}): {' | '.join(lines[-3:])[-600:]}")
    return wall


def pip_download(clients: Clients, index: str, dists: tuple[Dist, ...], work: Path) -> float:
    """``pip download`` of the pinned wheels into an empty directory, no pip cache; wall seconds."""
    with tempfile.TemporaryDirectory(prefix="pip-dl-", dir=work) as dest:
        argv = [clients.python, "-m", "pip", "download", "--no-deps", "--no-cache-dir"]
        argv += ["--disable-pip-version-check", "-q", "--index-url", index, "-d", dest]
        argv += [f"{d.project}==1.0" for d in dists]
        wall = _timed(argv, clients.pip_env(), None, f"pip download via {index}")
        got = len(list(Path(dest).glob("*.whl")))
    if got != len(dists):
        raise BenchError(f"pip download via {index}: {got} of {len(dists)} wheels")
    return wall


def uv_install(clients: Clients, index: str, dists: tuple[Dist, ...], work: Path) -> float:
    """``uv pip install --target`` of the pinned wheels, empty uv cache; wall seconds."""
    assert clients.uv is not None
    with tempfile.TemporaryDirectory(prefix="uv-", dir=work) as tmp:
        argv = [clients.uv, "pip", "install", "--no-deps", "--no-cache", "-q", "--python", clients.python]
        argv += ["--target", f"{tmp}/site", "--index-url", index]
        argv += [f"{d.project}==1.0" for d in dists]
        wall = _timed(argv, clients.pip_env() | {"UV_CACHE_DIR": f"{tmp}/cache"}, None, f"uv via {index}")
        got = len(list(Path(tmp, "site").glob("*.dist-info")))
    if got != len(dists):
        raise BenchError(f"uv pip install via {index}: {got} of {len(dists)} installed")
    return wall


def npm_project(work: Path, server: str) -> Path:
    project = work / f"npm-project-{server}"
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir(parents=True)
    manifest = {"name": f"bench-{server}", "version": "1.0.0", "private": True}
    manifest["dependencies"] = {TREE[0]: "^1.0.0"}
    (project / "package.json").write_text(json.dumps(manifest, indent=2))
    return project


def npm_run(clients: Clients, command: str, registry: str, project: Path) -> float:
    """``npm install`` (writes the lockfile) or ``npm ci`` with an empty npm cache; wall seconds."""
    assert clients.npm is not None
    with tempfile.TemporaryDirectory(prefix="npm-cache-", dir=project.parent) as cache:
        argv = [clients.npm, command, "--no-audit", "--no-fund"]
        wall = _timed(argv, npm_env(Path(cache), registry=registry), project, f"npm {command} via {registry}")
    if not (project / "node_modules" / TREE[-1] / "package.json").is_file():
        raise BenchError(f"npm {command} via {registry} did not install {TREE[-1]}")
    return wall


# ------------------------------------------------------------------------------- URL discovery


def page_url(server: Server, project: str) -> str:
    assert server.pypi is not None
    return f"{server.pypi}{project}/"


def wheel_url(server: Server, dist: Dist) -> str:
    """The URL ``server``'s own simple page gives for ``dist`` (each server rewrites it)."""
    url = page_url(server, dist.project)
    status, headers, body = http_get(url, {"Accept": PIP_ACCEPT}, timeout=120)
    if status != 200:
        raise BenchError(f"{server.name}: page {url} HTTP {status}")
    href: str | None = None
    if "json" in headers.get("content-type", ""):
        for entry in json.loads(body)["files"]:
            if entry["filename"] == dist.filename:
                href = entry["url"]
    else:
        for m in re.finditer(r'<a\s[^>]*href="([^"]+)"[^>]*>([^<]+)</a>', body.decode()):
            if html.unescape(m.group(2)).strip() == dist.filename:
                href = html.unescape(m.group(1))
    if href is None:
        raise BenchError(f"{server.name}: {dist.filename} not listed on {url}")
    return urldefrag(urljoin(url, href)).url


def tarball_url(server: Server, name: str) -> str:
    assert server.npm is not None
    status, _, body = http_get(server.npm + name, {"Accept": NPM_ACCEPT}, timeout=120)
    if status != 200:
        raise BenchError(f"{server.name}: packument of {name} HTTP {status}")
    url: str = json.loads(body)["versions"]["1.0.0"]["dist"]["tarball"]
    return url


def curl(url: str, headers: dict[str, str] | None = None) -> Download:
    argv = ["curl", "-sL", "-o", "/dev/null", "--max-time", "600", "-w", CURL_FORMAT]
    for name, value in (headers or {}).items():
        argv += ["-H", f"{name}: {value}"]
    done = subprocess.run([*argv, url], capture_output=True, text=True, timeout=660, check=False)
    return _parse_curl(done.stdout)


# -------------------------------------------------------------------------------------- bench


@dataclass
class Bench:
    """Servers (by column name), clients, data, plan and results shared by the measurements."""

    procs: Processes
    servers: dict[str, Server]
    clients: Clients
    data: Data
    plan: Plan
    results: Results
    work: Path
    pypi_up: Upstream
    npm_up: Upstream | None
    static_root: Path
    urls: dict[str, dict[str, str]] = field(default_factory=dict)  # server -> key -> URL

    def pypi(self) -> list[Server]:
        return [self.servers[n] for n in PYPI_SERVERS if n in self.servers and self.servers[n].pypi]

    def npm(self) -> list[Server]:
        return [self.servers[n] for n in NPM_SERVERS if n in self.servers and self.servers[n].npm]

    def why(self, names: tuple[str, ...]) -> dict[str, str]:
        """n/a reasons for the columns of a row that could not run."""
        return {n: self.results.unavailable[n] for n in names if n in self.results.unavailable}


def _short(exc: BaseException) -> str:
    """One line for the table's n/a list (the full text is in the warnings)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= 240 else text[:120] + " … " + text[-115:]


def _interleave(
    bench: Bench,
    key: str,
    servers: list[Server],
    measure: Callable[[Server, int], float],
    rounds: int,
    *,
    warm: bool = True,
) -> dict[str, float | None]:
    """Run ``measure`` round-robin over ``servers`` for ``rounds`` rounds; median per server.

    A server whose measurement fails is reported (warning, value None), not dropped. With
    ``warm``, a request reaching a fake upstream during a measurement (they are always
    counted) is warned about: a warm figure that went upstream measured the wrong thing.
    """
    samples: dict[str, list[float]] = {s.name: [] for s in servers}
    failed: dict[str, str] = {}
    upstream_requests: dict[str, list[int]] = {s.name: [] for s in servers}
    fakes = [u for u in (bench.pypi_up, bench.npm_up) if u is not None]
    for r in range(rounds):
        for server in servers:
            if server.name in failed:
                continue
            before = sum(u.total() for u in fakes)
            try:
                samples[server.name].append(measure(server, r))
            except (BenchError, subprocess.SubprocessError, OSError, ValueError, KeyError) as exc:
                failed[server.name] = _short(exc)
                bench.results.warn(f"{key} {server.name}: {exc}")
            went = sum(u.total() for u in fakes) - before
            upstream_requests[server.name].append(went)
            if warm and went:
                bench.results.warn(f"{key} {server.name}: {went} request(s) reached the upstream")
    bench.results.samples[key] = samples | {"failed": failed, "upstream_requests": upstream_requests}
    return {n: statistics.median(v) if v else None for n, v in samples.items()}


# ------------------------------------------------------------------------------------- warm-up


def warm_up(bench: Bench) -> None:
    """Fill every server's cache with what the warm measurements use, and check it answers.

    Also writes the static copies nginx serves: the proxy's own bytes for the page and the
    packument, and the 10 MB wheel itself.
    """
    data, clients = bench.data, bench.clients
    for server in bench.pypi():
        urls = bench.urls.setdefault(server.name, {})
        try:
            cold = pip_download(clients, server.pypi or "", data.small, bench.work)
            if clients.uv:  # uv asks with another Accept header: a cache keyed on it must see it once
                uv_install(clients, server.pypi or "", data.small, bench.work)
            urls["ten"] = wheel_url(server, data.ten)
            got = curl(urls["ten"])
            if got.status != 200 or got.size != data.ten.size:
                raise BenchError(f"10 MB wheel HTTP {got.status}, {got.size}/{data.ten.size} bytes")
            urls["page"] = page_url(server, data.small[0].project)
            http_get(urls["page"], {"Accept": PIP_ACCEPT}, timeout=120)
            bench.results.samples.setdefault("warmup_pip_download_s", {})[server.name] = cold
            print(f"  {server.name}: first pip download {cold:.2f}s", flush=True)
        except (BenchError, subprocess.SubprocessError, OSError, ValueError, KeyError) as exc:
            _drop(bench, server.name, f"warm-up failed: {_short(exc)}")
    for server in bench.npm():
        urls = bench.urls.setdefault(server.name, {})
        try:
            project = npm_project(bench.work, server.name)
            urls["project"] = str(project)
            if clients.npm is None:
                raise BenchError("npm missing")
            first = npm_run(clients, "install", server.npm or "", project)
            lock = json.loads((project / "package-lock.json").read_text())
            resolved = {p.get("resolved", "") for p in lock["packages"].values() if p.get("resolved")}
            origin = "/".join((server.npm or "").split("/")[:3])
            if not resolved or not all(r.startswith(origin) for r in resolved):
                bench.results.warn(
                    f"{server.name}: lockfile resolves outside {origin}: {sorted(resolved)[:2]}"
                )
            urls["packument"] = f"{server.npm}{HUGE}"
            for _ in range(2):
                status, _, body = http_get(urls["packument"], {"Accept": NPM_ACCEPT}, timeout=300)
                if status != 200:
                    raise BenchError(f"packument HTTP {status}")
            bench.results.samples.setdefault("packument_bytes", {})[server.name] = len(body)
            print(
                f"  {server.name}: first npm install {first:.2f}s, packument {len(body):,} bytes", flush=True
            )
        except (BenchError, subprocess.SubprocessError, OSError, ValueError, KeyError) as exc:
            _drop_npm(bench, server.name, f"npm warm-up failed: {_short(exc)}")
    _static_copies(bench)


def _drop(bench: Bench, name: str, why: str) -> None:
    bench.results.warn(f"{name}: {why}")
    if name in ("proxy", "nginx"):
        bench.servers[name].pypi = None  # keeps its npm side
        bench.results.unavailable[f"{name}-pypi"] = why
    else:
        bench.servers.pop(name, None)
        bench.results.unavailable[name] = why


def _drop_npm(bench: Bench, name: str, why: str) -> None:
    bench.results.warn(f"{name}: {why}")
    if name in ("proxy", "nginx"):
        bench.servers[name].npm = None
        bench.results.unavailable[f"{name}-npm"] = why
    else:
        bench.servers.pop(name, None)
        bench.results.unavailable[name] = why


def _static_copies(bench: Bench) -> None:
    """nginx's static root: the same bytes the proxy serves, as plain files."""
    root = bench.static_root
    static = bench.servers.get("nginx-static")
    proxy = bench.servers["proxy"]
    if static is None or static.static is None:
        return
    urls = bench.urls.setdefault("nginx-static", {})
    link = root / bench.data.ten.filename
    link.unlink(missing_ok=True)
    try:
        os.link(bench.data.ten.path, link)
    except OSError:
        shutil.copyfile(bench.data.ten.path, link)
    urls["ten"] = f"{static.static}/{link.name}"
    if proxy.pypi:
        _, _, body = http_get(bench.urls["proxy"]["page"], {"Accept": PIP_ACCEPT})
        (root / "page.json").write_bytes(body)
        urls["page"] = f"{static.static}/page.json"
    if proxy.npm:
        _, _, body = http_get(bench.urls["proxy"]["packument"], {"Accept": NPM_ACCEPT})
        (root / "packument.json").write_bytes(body)
        urls["packument"] = f"{static.static}/packument.json"


# -------------------------------------------------------------------------------- measurements


def measure_installs(bench: Bench) -> None:
    """A. Warm client installs: pip download, uv pip install, npm ci; rounds interleaved."""
    data, clients, plan = bench.data, bench.clients, bench.plan
    rounds = plan.rounds
    print(f"A. warm installs, {rounds} round(s), servers round-robin", flush=True)
    servers = bench.pypi()
    values = _interleave(
        bench,
        "warm_pip_download",
        servers,
        lambda s, r: pip_download(clients, s.pypi or "", data.small, bench.work),
        rounds,
    )
    _add(bench, "warm pip download, 30 wheels", "s", "lower", values, PYPI_SERVERS, "warm_pip_download")
    if clients.uv:
        values = _interleave(
            bench,
            "warm_uv_install",
            servers,
            lambda s, r: uv_install(clients, s.pypi or "", data.small, bench.work),
            rounds,
        )
        _add(bench, "warm uv pip install, 30 wheels", "s", "lower", values, PYPI_SERVERS, "warm_uv_install")
    if clients.npm and bench.npm():
        values = _interleave(
            bench,
            "warm_npm_ci",
            bench.npm(),
            lambda s, r: npm_run(clients, "ci", s.npm or "", Path(bench.urls[s.name]["project"])),
            rounds,
        )
        _add(
            bench,
            f"warm npm ci, {len(TREE)}-package lockfile",
            "s",
            "lower",
            values,
            NPM_SERVERS,
            "warm_npm_ci",
        )


def _add(
    bench: Bench,
    metric: str,
    unit: str,
    better: str,
    values: dict[str, float | None],
    names: tuple[str, ...],
    key: str,
) -> None:
    """Add a row: the measured values, and n/a reasons for every column that has none."""
    failed: dict[str, str] = bench.results.samples.get(key, {}).get("failed", {})
    why = {
        n: bench.results.unavailable[n] for n in names if n in bench.results.unavailable and n not in values
    }
    for n in names:
        for suffix in ("-pypi", "-npm"):
            if f"{n}{suffix}" in bench.results.unavailable and n not in values:
                why[n] = bench.results.unavailable[f"{n}{suffix}"]
    why |= {n: f"failed: {w}" for n, w in failed.items()}
    bench.results.add(Row(metric, unit, better, {k: v for k, v in values.items() if k not in failed}, why))


def _wrk(bench: Bench, url: str, connections: int, headers: dict[str, str]) -> WrkResult:
    assert bench.clients.wrk is not None
    result = run_wrk(
        bench.clients.wrk, url, connections=connections, duration=bench.plan.wrk_seconds, headers=headers
    )
    if result.errors or result.non_2xx:
        raise BenchError(f"wrk {url}: {result.errors} socket errors, {result.non_2xx} non-2xx")
    return result


@dataclass(frozen=True)
class HitTarget:
    """One wrk measurement: which URL of each server, with which headers, over how many conns."""

    title: str
    key: str  # samples key
    url: str  # key in Bench.urls
    servers: list[Server]
    names: tuple[str, ...]
    connections: int
    headers: dict[str, str]


def measure_hits(bench: Bench) -> None:
    """B. Cache hits under wrk: page (-c16), packument (-c8, plain and gzip as npm asks), 10 MB
    wheel (-c4); each also against nginx serving the same bytes statically."""
    if bench.clients.wrk is None:
        return
    print(f"B. cache hits, wrk -t1, {bench.plan.wrk_seconds:g}s per run, servers round-robin", flush=True)
    gzip = {"Accept": NPM_ACCEPT, "Accept-Encoding": "gzip, deflate"}  # npm's own request headers
    targets = [
        HitTarget("simple page", "page", "page", bench.pypi(), PYPI_SERVERS, 16, {"Accept": PIP_ACCEPT}),
        HitTarget(
            f"packument {HUGE_VERSIONS} versions",
            "packument",
            "packument",
            bench.npm(),
            NPM_SERVERS,
            8,
            {"Accept": NPM_ACCEPT},
        ),
        HitTarget(
            f"packument {HUGE_VERSIONS} versions, gzip",
            "packument_gzip",
            "packument",
            bench.npm(),
            NPM_SERVERS,
            8,
            gzip,
        ),
        # curl's Accept, as in the warm-up: nginx's cache key includes it
        HitTarget("10 MB wheel", "ten", "ten", bench.pypi(), PYPI_SERVERS, 4, {"Accept": "*/*"}),
    ]
    static = bench.servers.get("nginx-static")
    for target in targets:
        runs = list(target.servers)
        if static is not None and target.url in bench.urls.get("nginx-static", {}):
            runs.append(static)
        found: dict[str, list[WrkResult]] = {s.name: [] for s in runs}

        def one(
            server: Server, r: int, t: HitTarget = target, found: dict[str, list[WrkResult]] = found
        ) -> float:
            result = _wrk(bench, bench.urls[server.name][t.url], t.connections, t.headers)
            if result.requests:
                found[server.name].append(result)  # its latencies mean something
            else:
                bench.results.warn(f"{server.name}: no {t.title} answered within {bench.plan.wrk_seconds:g}s")
            return result.rps

        key = f"wrk_{target.key}"
        rps = _interleave(bench, key, runs, one, bench.plan.rounds)
        bench.results.samples[key]["wrk"] = {
            n: [asdict(r) | {"raw": None} for r in rs] for n, rs in found.items()
        }
        bench.results.samples[key]["response"] = {
            s.name: _response_shape(bench.urls[s.name][target.url], target.headers) for s in runs
        }
        cols = (*target.names, "nginx-static")
        title = f"hit {target.title}, -c{target.connections}"
        _add(bench, title, "req/s", "higher", rps, cols, key)
        for pct in ("p50", "p99"):
            lat = {
                n: statistics.median(getattr(r, f"{pct}_ms") for r in rs) if rs else None
                for n, rs in found.items()
            }
            _add(bench, f"{title} {pct}", "ms", "lower", lat, cols, key)


def _response_shape(url: str, headers: dict[str, str]) -> dict[str, Any]:
    """What one such request gets back (body size, encoding, cache status), for the JSON."""
    try:
        status, got, body = http_get(url, headers, timeout=60)
    except OSError as exc:
        return {"error": str(exc)}
    return {
        "status": status,
        "bytes": len(body),
        "content_encoding": got.get("content-encoding"),
        "x_cache": got.get("x-cache"),
    }


def measure_cold(bench: Bench) -> None:
    """C. Cold ``uv pip install`` of a fresh set of 30 wheels per round: each server vs the fake."""
    clients, data = bench.clients, bench.data
    if clients.uv is None:
        return
    print(
        f"C. cold uv pip install, {bench.plan.rounds} round(s), a new set of 30 wheels per round", flush=True
    )
    direct = Server("upstream", bench.pypi_up.pid, pypi=bench.pypi_up.url)
    servers = [*bench.pypi(), direct]
    values = _interleave(
        bench,
        "cold_uv_install",
        servers,
        lambda s, r: uv_install(clients, s.pypi or "", data.cold[r], bench.work),
        bench.plan.rounds,
        warm=False,
    )
    _add(
        bench,
        "cold uv pip install, 30 wheels",
        "s",
        "lower",
        values,
        (*PYPI_SERVERS, "upstream"),
        "cold_uv_install",
    )


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (gunicorn and proxy workers, nginx's workers)."""
    found = [pid]
    for parent in found:  # grows while iterating: a breadth-first walk
        found.extend(child_pids(parent))
    return found


def _pss_kib(pid: int) -> int:
    """Proportional set size: shared pages split among the processes sharing them."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (FileNotFoundError, PermissionError, ProcessLookupError):
        return 0
    return 0


class TreeSampler:
    """Peak summed RSS and PSS of a process tree, sampled every ``interval`` in a thread.

    RSS is what the figure reports (as ``ps`` would); PSS is kept beside it because a
    multi-process server (nginx, gunicorn, the proxy's workers) shares pages that summed RSS
    counts once per process.
    """

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.max_rss_kib = 0
        self.max_pss_kib = 0
        self.processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rss-{pid}", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = descendants(self.pid)
            self.processes = max(self.processes, len(pids))
            self.max_rss_kib = max(self.max_rss_kib, sum(rss_kib(p) for p in pids))
            self.max_pss_kib = max(self.max_pss_kib, sum(_pss_kib(p) for p in pids))
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def curl_burst(procs: Processes, url: str, clients: int) -> list[Download]:
    """``clients`` curls (following redirects) fetching ``url`` at once; all waited for."""
    argv = ["curl", "-sL", "-o", "/dev/null", "--max-time", "900", "-w", CURL_FORMAT, url]
    running = [procs.start(argv, stdout=subprocess.PIPE, session=False) for _ in range(clients)]
    out: list[Download] = []
    for proc in running:
        stdout, _ = proc.communicate(timeout=960)
        try:
            out.append(_parse_curl(stdout.decode()))
        except ValueError:
            out.append(Download(0, 0, 0.0, "-"))
    return out


def _burst(
    bench: Bench, server: Server, url: str, size: int, upstream: Upstream, path: str
) -> dict[str, Any]:
    """One burst of concurrent misses against ``server``: wall, upstream GETs, peak RSS."""
    clients = bench.plan.miss_clients
    before = upstream.hits(path)
    pids = descendants(server.pid)
    rss_before = sum(rss_kib(p) for p in pids)
    hwm_ok = reset_peak_rss(pids)
    start = time.perf_counter()
    with TreeSampler(server.pid) as sampler:
        downloads = curl_burst(bench.procs, url, clients)
    wall = time.perf_counter() - start
    time.sleep(0.5)  # a server may still be finishing its own upstream fetch
    gets = upstream.hits(path) - before
    hwm = sum(_status_kib(p, "VmHWM") for p in descendants(server.pid)) if hwm_ok else 0
    complete = sum(1 for d in downloads if d.status == 200 and d.size == size)
    if complete != clients:
        bench.results.warn(f"{server.name} {url}: {clients - complete} of {clients} downloads incomplete")
    return {
        "wall_s": wall,
        "upstream_gets": gets,
        "peak_rss_mb": max(sampler.max_rss_kib, hwm) * 1024 / MB,
        "peak_pss_mb": sampler.max_pss_kib * 1024 / MB,
        "processes": sampler.processes,
        "rss_before_mb": rss_before * 1024 / MB,
        "rss_growth_mb": (max(sampler.max_rss_kib, hwm) - rss_before) * 1024 / MB,
        "complete": complete,
        "clients": clients,
    }


def measure_misses(bench: Bench) -> None:
    """D. Concurrent misses for one big file: a new file per round, PyPI then npm."""
    plan, data = bench.plan, bench.data
    print(
        f"D. {plan.miss_clients} concurrent misses of one {plan.miss_mib} MiB file,"
        f" {plan.miss_rounds} round(s)",
        flush=True,
    )
    kinds: list[tuple[str, list[Server], tuple[str, ...], Upstream | None]] = [
        ("wheel", bench.pypi(), PYPI_SERVERS, bench.pypi_up),
        ("npm tarball", bench.npm() if data.npm_miss else [], NPM_SERVERS, bench.npm_up),
    ]
    for kind, servers, names, upstream in kinds:
        if not servers or upstream is None:
            continue
        bursts: dict[str, dict[str, Any]] = {}

        def one(
            server: Server,
            r: int,
            kind: str = kind,
            upstream: Upstream = upstream,
            bursts: dict[str, dict[str, Any]] = bursts,
        ) -> float:
            if kind == "wheel":
                dist = data.miss[r]
                url, size, path = wheel_url(server, dist), dist.size, f"/files/{dist.filename}"
            else:
                name, tarball, size = data.npm_miss[r]
                url, path = tarball_url(server, name), f"/{name}/-/{pack_name(name, '1.0.0')}"
                del tarball
            result = _burst(bench, server, url, size, upstream, path)
            bursts[f"{server.name}#{r}"] = result
            print(
                f"    {server.name}: {result['wall_s']:.2f}s, {result['upstream_gets']} upstream GET(s), "
                f"peak {result['peak_rss_mb']:.0f} MB, {result['complete']}/{result['clients']} complete",
                flush=True,
            )
            return float(result["wall_s"])

        key = f"miss_{kind.replace(' ', '_')}"
        walls = _interleave(bench, key, servers, one, plan.miss_rounds, warm=False)
        bench.results.samples[key] |= {"bursts": bursts}

        def med(field_name: str, bursts: dict[str, dict[str, Any]] = bursts) -> dict[str, float | None]:
            by: dict[str, list[float]] = {}
            for label, burst in bursts.items():
                by.setdefault(label.split("#")[0], []).append(float(burst[field_name]))
            return {n: statistics.median(v) for n, v in by.items()}

        label = f"{plan.miss_clients} misses, {plan.miss_mib} MiB {kind}"
        _add(bench, f"{label}: time to last byte", "s", "lower", walls, names, key)
        _add(bench, f"{label}: upstream GETs", "GETs", "lower", med("upstream_gets"), names, key)
        _add(bench, f"{label}: peak RSS", "MB", "lower", med("peak_rss_mb"), names, key)
        _add(bench, f"{label}: peak PSS", "MB", "lower", med("peak_pss_mb"), names, key)
        _add(bench, f"{label}: RSS growth", "MB", "lower", med("rss_growth_mb"), names, key)


# ----------------------------------------------------------------------------------------- run


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one round, 2 s wrk runs, 20 x 20 MiB misses")
    parser.add_argument("--json", type=Path, help="results JSON (default: WORK/compare.json)")
    parser.add_argument("--work", type=Path, default=BENCH / ".work" / "compare", help="work directory")
    parser.add_argument(
        "--dists", type=Path, default=BENCH / ".work" / "dists", help="built wheels (shared with run.py)"
    )
    parser.add_argument(
        "--scratch",
        type=Path,
        default=Path.home() / ".cache" / "artifact-proxy-bench",
        help="where the peers are installed (outside the repository)",
    )
    parser.add_argument("--workers", type=int, default=2, help="proxy workers, when `serve --workers` exists")
    parser.add_argument("--rounds", type=int, help="override the number of interleaved rounds")
    parser.add_argument("--miss-rounds", type=int, help="rounds of D (default 1: 10 GB per server and round)")
    parser.add_argument("--keep-data", action="store_true", help="keep the servers' caches in WORK")
    return parser.parse_args()


def _try(results: Results, name: str, start: Callable[[], Server]) -> Server | None:
    """Start one peer; on failure record "n/a (why)" for its column instead of stopping the run."""
    try:
        server = start()
    except Unavailable as exc:
        results.unavailable[name] = str(exc)
        print(f"  {name}: n/a ({exc})", flush=True)
        return None
    print(
        f"  {name}: pid {server.pid} {server.pypi or ''} {server.npm or ''} {server.static or ''}", flush=True
    )
    return server


def run(args: argparse.Namespace, procs: Processes, results: Results, tmp: Path) -> dict[str, Any]:
    """Install, build, start, warm, measure; returns the settings recorded with the results."""
    plan = Plan.make(args.quick)
    if args.rounds:
        plan = replace(plan, rounds=args.rounds)
    if args.miss_rounds:
        plan = replace(plan, miss_rounds=args.miss_rounds)
    work: Path = args.work
    scratch: Path = args.scratch.expanduser()
    scratch.mkdir(parents=True, exist_ok=True)
    print(f"peers (installed under {scratch}):", flush=True)
    py_peers = ensure_python_peers(scratch)
    tools: dict[str, str | None] = {}
    for binary, package in (("nginx", "nginx-light"), ("wrk", "wrk"), ("curl", "curl")):
        try:
            tools[binary] = ensure_debian(binary, package)
        except Unavailable as exc:
            tools[binary] = None
            results.unavailable[binary] = str(exc)
    if tools["curl"] is None:
        raise BenchError("curl is required (apt-get install curl)")
    if tools["wrk"] is None:
        results.warn(f"no wrk: cache-hit rates not measured ({results.unavailable['wrk']})")
    verdaccio_entry: Path | None = None
    try:
        verdaccio_entry = ensure_verdaccio(scratch)
    except Unavailable as exc:
        results.unavailable["verdaccio"] = str(exc)
    npm_bin = shutil.which("npm")
    uv_bin = (
        str(py_peers.bin("uv")) if not py_peers.error and py_peers.bin("uv").exists() else shutil.which("uv")
    )
    python = str(py_peers.bin("python")) if not py_peers.error else sys.executable
    clients = Clients(python=python, uv=uv_bin, wrk=tools["wrk"], npm=npm_bin)

    data = build_data(args.dists, work, plan, npm_ok=npm_bin is not None)
    print("fake upstreams (hashing every file first) ...", flush=True)
    pypi_up = start_upstream(procs, "pypi", data.pypi_manifest, work)
    npm_up = start_upstream(procs, "npm", data.npm_manifest, work) if data.npm_manifest else None
    print(f"  pypi {pypi_up.url} pid {pypi_up.pid}; npm {npm_up.url if npm_up else 'n/a'}", flush=True)

    has_workers = proxy_workers_flag()
    workers = args.workers if has_workers else 1
    proxy_workers = workers if has_workers else None
    if not has_workers:
        results.warn("`python -m proxy serve` has no --workers: the proxy runs as one process")
    print("servers:", flush=True)
    servers: dict[str, Server] = {}
    npm_url = npm_up.url if npm_up else pypi_up.url  # the proxy needs some npm URL to start
    proxy = start_proxy(procs, work, pypi_up.url, npm_url, proxy_workers)
    if npm_up is None:
        proxy.npm = None
    servers["proxy"] = proxy
    print(f"  proxy: pid {proxy.pid} {proxy.pypi} {proxy.npm} (workers {workers})", flush=True)
    for name, starter in (
        ("devpi", lambda: start_devpi(procs, py_peers, work, pypi_up.url)),
        ("proxpi", lambda: start_proxpi(procs, py_peers, work, pypi_up.url)),
    ):
        if (server := _try(results, name, starter)) is not None:
            servers[name] = server
    if verdaccio_entry is not None and npm_up is not None:
        entry = verdaccio_entry
        if (
            server := _try(results, "verdaccio", lambda: start_verdaccio(procs, entry, work, npm_up.url))
        ) is not None:
            servers["verdaccio"] = server
    elif npm_up is None:
        results.unavailable.setdefault("verdaccio", "npm not installed")
    static_root = work / "nginx-static"
    shutil.rmtree(static_root, ignore_errors=True)
    static_root.mkdir(parents=True)
    nginx_workers = workers
    if tools["nginx"] is not None:
        nginx = tools["nginx"]
        try:
            cache, static = start_nginx(
                procs,
                nginx,
                tmp,
                static_root,
                pypi_up.url,
                npm_up.url if npm_up else pypi_up.url,
                nginx_workers,
            )
            if npm_up is None:
                cache.npm = None
            servers["nginx"], servers["nginx-static"] = cache, static
            print(f"  nginx: pid {cache.pid} {cache.pypi} {cache.npm} {static.static}", flush=True)
        except Unavailable as exc:
            results.unavailable["nginx"] = results.unavailable["nginx-static"] = str(exc)
    else:
        results.unavailable["nginx-static"] = results.unavailable["nginx"]
    bench = Bench(procs, servers, clients, data, plan, results, work, pypi_up, npm_up, static_root)

    print("warm-up (first install through each server):", flush=True)
    warm_up(bench)
    if bench.servers["proxy"].pypi is None and bench.servers["proxy"].npm is None:
        raise BenchError("the proxy failed its warm-up; see the warnings and " + str(work / "proxy.log"))
    measure_installs(bench)
    measure_hits(bench)
    measure_cold(bench)
    measure_misses(bench)
    rss_end = {name: sum(rss_kib(p) for p in descendants(s.pid)) * 1024 / MB for name, s in servers.items()}
    results.samples["rss_at_end_mb"] = rss_end
    results.notes += _notes(bench, proxy_workers, nginx_workers)
    return {
        "quick": args.quick,
        "plan": asdict(plan),
        "proxy_workers": workers,
        "proxy_workers_flag": has_workers,
        "proxy_argv": servers["proxy"].info.get("argv"),
        "nginx_workers": nginx_workers,
        "proxpi": {"gunicorn_threads": servers["proxpi"].info.get("threads")}
        if "proxpi" in servers
        else None,
        "versions": py_peers.versions
        | {
            "verdaccio": "6.8.0" if verdaccio_entry else None,
            "nginx": servers["nginx"].info.get("version") if "nginx" in servers else None,
        },
        "tools": tools,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "note": "servers, clients and fakes share this machine's CPUs; each fake runs in its own process",
    }


def _notes(bench: Bench, proxy_workers: int | None, nginx_workers: int) -> list[str]:
    """How each server was set up, printed under the table so no figure is read out of context."""
    sizes = bench.results.samples.get("packument_bytes", {})
    notes = [
        f"proxy: python -m proxy serve --workers {proxy_workers}"
        if proxy_workers is not None
        else "proxy: one process (this checkout's serve has no --workers)",
        f"nginx: worker_processes {nginx_workers}; proxy_cache with proxy_cache_lock, the key includes"
        " Accept, and sub_filter rewrites the upstream's URLs in every page/packument it serves (a"
        " per-hit cost that shows on the packument), gzip on for JSON (level 1, per request);"
        " nginx static serves the proxy's own bytes",
        f"proxpi: gunicorn --preload --threads {PROXPI_THREADS} (its container's command, plus threads),"
        " defaults otherwise: a miss not downloaded within 0.9 s is redirected to the upstream",
        "devpi: devpi-server defaults (50 threads), a mirror index of the fake upstream",
        f"verdaccio {VERDACCIO_VERSION}: defaults, the fake as its uplink",
        "wrk -t1; servers, clients (wrk, curl, pip, uv, npm) and the fakes share this machine's"
        f" {os.cpu_count()} CPUs; median of {bench.plan.rounds} interleaved round(s),"
        f" misses {bench.plan.miss_rounds} round(s)",
    ]
    if sizes:
        shown = ", ".join(f"{n} {v:,}" for n, v in sizes.items())
        notes.append(f"packument bytes served (Accept as npm sends it): {shown}")
    return notes


def main() -> int:
    args = parse_args()
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    procs = Processes()
    results = Results()
    tmp = args.work / "nginx"  # its config and logs stay for a look after the run
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    settings: dict[str, Any] = {}
    started = time.monotonic()

    def body() -> None:
        settings.update(run(args, procs, results, tmp))

    def cleanup() -> None:
        procs.stop_all()
        if not args.keep_data:  # the servers' caches: up to a few GB
            for cache in CACHES:
                shutil.rmtree(args.work / cache, ignore_errors=True)

    status = run_guarded(body, cleanup)
    settings["wall_s"] = round(time.monotonic() - started, 1)
    settings["complete"] = status == 0
    out = args.json or args.work / "compare.json"
    if results.rows:
        print()
        print(results.table())
    results.write(out, settings)
    print(f"\nresults written to {out} ({settings['wall_s']:.0f}s)")
    return status


if __name__ == "__main__":
    sys.exit(main())
