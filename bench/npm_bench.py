"""Benchmark of the proxy's npm side against Verdaccio 6 (and nginx for raw tarball bytes).

    python bench/npm_bench.py [--quick] [--work DIR]

Builds ~15 small packages forming a dependency tree, one package with 2,000 versions (a packument
of several MB) and one ~50 MB tarball with ``npm pack``, serves them from the test suite's
FakeNpmRegistry in its own process, and puts the proxy and Verdaccio in front of it. After one
warm-up install through each it measures: (a) the abbreviated packument of the big package under
wrk, (b) one cached ~50 MB tarball over one curl connection, (c) a warm ``npm install`` of the
tree with a fresh npm cache each run. Prints a table and writes WORK/npm-results.json.

Only 127.0.0.1 is contacted, apart from npm's registry when Verdaccio has to be installed. Every
process started is stopped by PID on the way out, Ctrl-C included. Exit status: 0 all targets
met, 3 a target missed, 1 an error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness import BenchError, Processes, ensure_debian_tool, free_port, http_get, run_guarded, wait_http
from loadgen import WrkResult, curl_download, run_wrk
from servers import BENCH, REPO, Server, start_fake, start_nginx, start_proxy

sys.path.insert(0, str(REPO))  # tests.fakes / tests.npm_clients: npm pack and an isolated npm env
from tests.fakes.npm import ABBREVIATED, build_tarball, pack_name
from tests.npm_clients import npm_env

MIB = 1024 * 1024
TREE = [f"bench-tree-{i:02d}" for i in range(15)]
HUGE = "bench-huge"
BIG = "bench-big"
HUGE_VERSIONS = 2000
FILLER_DEPS = 40  # per version of HUGE, so its packument weighs several MB like real popular ones
VERDACCIO_DIR = BENCH / ".work" / "verdaccio"


# ------------------------------------------------------------------------------------ report


@dataclass
class Row:
    """One figure, proxy beside Verdaccio; ``ratio`` is proxy / Verdaccio whatever the unit."""

    metric: str
    unit: str
    proxy: float
    verdaccio: float
    target: tuple[str, float] | None = None  # (">=" or "<=", limit) on the ratio
    nginx: float | None = None

    @property
    def ratio(self) -> float:
        return self.proxy / self.verdaccio if self.verdaccio else float("nan")

    @property
    def passed(self) -> bool | None:
        if self.target is None:
            return None
        op, limit = self.target
        return self.ratio >= limit if op == ">=" else self.ratio <= limit

    def cells(self) -> tuple[str, ...]:
        target = f"ratio {self.target[0]} {self.target[1]:g}" if self.target else "-"
        verdict = {True: "pass", False: "FAIL", None: "info"}[self.passed]
        nginx = _fmt(self.nginx) if self.nginx is not None else "-"
        return (
            self.metric,
            self.unit,
            _fmt(self.proxy),
            _fmt(self.verdaccio),
            nginx,
            f"{self.ratio:.2f}",
            target,
            verdict,
        )


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def table(rows: list[Row]) -> str:
    """Fixed-width table of every row."""
    header = ("metric", "unit", "proxy", "verdaccio", "nginx", "ratio", "target", "result")
    lines = [header, *(row.cells() for row in rows)]
    widths = [max(len(cell) for cell in column) for column in zip(*lines, strict=True)]
    out = ["  ".join(f"{c:<{w}}" for c, w in zip(line, widths, strict=True)) for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


@dataclass
class Results:
    """Rows plus raw details, written as JSON at the end even after a failure."""

    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print(f"    {row.metric}: proxy {_fmt(row.proxy)}, verdaccio {_fmt(row.verdaccio)} {row.unit}")

    def write(self, path: Path, settings: dict[str, Any]) -> None:
        rows = [asdict(r) | {"ratio": r.ratio, "passed": r.passed} for r in self.rows]
        data = {"settings": settings, "rows": rows, "details": self.details}
        path.write_text(json.dumps(data, indent=2, default=str) + "\n")


# ----------------------------------------------------------------------------------- dataset


def _pack_big(dest: Path, size: int) -> Path:
    """A package holding ``size`` random bytes (incompressible, so the .tgz is ~size too)."""
    path = dest / pack_name(BIG, "1.0.0")
    if path.is_file() and path.stat().st_size > size * 0.9:
        return path
    with tempfile.TemporaryDirectory(prefix="npm-pack-big-") as tmp:
        src = Path(tmp) / "package"
        src.mkdir()
        manifest = {"name": BIG, "version": "1.0.0", "main": "index.js", "license": "MIT"}
        (src / "package.json").write_text(json.dumps(manifest))
        (src / "index.js").write_text("module.exports = {};\n")
        with open(src / "blob.bin", "wb") as fh:
            for _ in range(size // MIB):
                fh.write(os.urandom(MIB))
        subprocess.run(
            ["npm", "pack", "--pack-destination", str(dest.resolve())],
            cwd=src,
            env=npm_env(Path(tmp) / "cache"),
            capture_output=True,
            timeout=300,
            check=True,
        )
    return path


def _tree_deps(i: int) -> dict[str, str]:
    """A binary tree: package i depends on 2i+1 and 2i+2, so TREE[0] pulls in all 15."""
    return {TREE[c]: "^1.0.0" for c in (2 * i + 1, 2 * i + 2) if c < len(TREE)}


def _tarball(dest: Path, name: str, deps: dict[str, str] | None = None) -> Path:
    """``npm pack`` once; later runs reuse the file (packing 16 packages takes ~10 s)."""
    path = dest / pack_name(name, "1.0.0")
    return path if path.is_file() else build_tarball(dest, name, "1.0.0", dependencies=deps)


def build_manifest(work: Path, big_size: int) -> tuple[Path, Path]:
    """Tarballs and the upstream's manifest; returns (manifest, big tarball)."""
    dest = work / "npm-dists"
    entries: list[dict[str, Any]] = []
    for i, name in enumerate(TREE):
        deps = _tree_deps(i)
        entries.append(
            {"name": name, "version": "1.0.0", "path": str(_tarball(dest, name, deps)), "dependencies": deps}
        )
    huge = _tarball(dest, HUGE)
    fillers = {f"bench-filler-dependency-{k:02d}": "^1.0.0" for k in range(FILLER_DEPS)}
    for v in range(HUGE_VERSIONS):
        version = f"1.{v // 100}.{v % 100}"
        entries.append({"name": HUGE, "version": version, "path": str(huge), "dependencies": fillers})
    big = _pack_big(dest, big_size)
    entries.append({"name": BIG, "version": "1.0.0", "path": str(big)})
    manifest = work / "npm-upstream.json"
    manifest.write_text(json.dumps(entries))
    return manifest, big


# ----------------------------------------------------------------------------------- servers

VERDACCIO_CONFIG = """\
storage: {storage}
auth:
  htpasswd:
    file: {storage}/htpasswd
    max_users: -1
uplinks:
  local:
    url: {upstream}
    maxage: 1h
    timeout: 60s
packages:
  '**':
    access: $all
    publish: $authenticated
    proxy: local
web:
  enable: false
log: {{ type: stdout, format: pretty, level: error }}
"""


def ensure_verdaccio() -> Path:
    """Verdaccio 6's entry point, installed under bench/.work on first use.

    The install pins node-fetch because some registry mirrors drop the ``cjs`` dist-tag
    Verdaccio's dependencies ask for, and the install then fails with ETARGET.
    """
    entry = VERDACCIO_DIR / "node_modules" / "verdaccio" / "bin" / "verdaccio"
    if entry.is_file():
        return entry
    VERDACCIO_DIR.mkdir(parents=True, exist_ok=True)
    package = {"private": True, "dependencies": {"verdaccio": "^6"}, "overrides": {"node-fetch": "2.7.0"}}
    (VERDACCIO_DIR / "package.json").write_text(json.dumps(package, indent=2))
    print("  installing verdaccio@6 (npm) ...", flush=True)
    subprocess.run(["npm", "install", "--no-audit", "--no-fund"], cwd=VERDACCIO_DIR, check=True, timeout=600)
    return entry


def start_verdaccio(procs: Processes, entry: Path, upstream: str, work: Path) -> Server:
    """Verdaccio with a config of its own: storage in WORK, the fake as its only uplink.

    ``maxage: 1h`` matches the proxy's metadata_ttl, so neither revalidates during the run.
    """
    port = free_port()
    storage = work / "verdaccio-storage"
    shutil.rmtree(storage, ignore_errors=True)
    storage.mkdir(parents=True)
    config = work / "verdaccio.yaml"
    config.write_text(VERDACCIO_CONFIG.format(storage=storage, upstream=upstream))
    log = work / "verdaccio.log"
    argv = ["node", str(entry), "--config", str(config), "--listen", f"127.0.0.1:{port}"]
    proc = procs.start(argv, log=log, cwd=work)
    origin = f"http://127.0.0.1:{port}"
    wait_http(f"{origin}/-/ping", proc, "verdaccio", log)
    return Server(proc, f"{origin}/", log)


# ---------------------------------------------------------------------------------- measures


def npm_install(registry: str, project: Path, timeout: float = 180.0) -> float:
    """One ``npm install`` from scratch (no node_modules, no lock, empty cache); wall seconds."""
    shutil.rmtree(project / "node_modules", ignore_errors=True)
    (project / "package-lock.json").unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="npm-cache-") as cache:
        argv = ["npm", "install", "--no-audit", "--no-fund", "--prefer-online"]
        env = npm_env(Path(cache), registry=registry)
        start = time.perf_counter()
        done = subprocess.run(
            argv, cwd=project, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
        wall = time.perf_counter() - start
    if done.returncode != 0:
        raise BenchError(f"npm install via {registry} failed:\n{done.stdout[-1500:]}{done.stderr[-1500:]}")
    if not (project / "node_modules" / TREE[-1] / "package.json").is_file():
        raise BenchError(f"npm install via {registry} did not install {TREE[-1]}")
    return wall


def make_project(work: Path, name: str) -> Path:
    """A project depending on the root of the tree (which pulls in the other 14)."""
    project = work / f"npm-project-{name}"
    project.mkdir(parents=True, exist_ok=True)
    manifest = {"name": f"bench-project-{name}", "version": "1.0.0", "private": True}
    manifest["dependencies"] = {TREE[0]: "^1.0.0"}
    (project / "package.json").write_text(json.dumps(manifest, indent=2))
    return project


def tarball_url(server: Server, name: str) -> str:
    """The tarball URL the server itself advertises for ``name@1.0.0`` (each rewrites it)."""
    status, _, body = http_get(server.base + name, {"Accept": ABBREVIATED})
    if status != 200:
        raise BenchError(f"packument of {name} from {server.base}: HTTP {status}")
    url: str = json.loads(body)["versions"]["1.0.0"]["dist"]["tarball"]
    return url


def check_packument(server: Server, what: str) -> dict[str, Any]:
    """Fetch the huge abbreviated packument twice (the second should be a hit); its vitals."""
    info: dict[str, Any] = {}
    for attempt in ("first", "second"):
        start = time.perf_counter()
        status, headers, body = http_get(server.base + HUGE, {"Accept": ABBREVIATED})
        if status != 200:
            raise BenchError(f"{what}: packument of {HUGE} HTTP {status}")
        doc = json.loads(body)
        info[attempt] = {
            "seconds": round(time.perf_counter() - start, 4),
            "bytes": len(body),
            "versions": len(doc["versions"]),
            "content_type": headers.get("content-type"),
            "x_cache": headers.get("x-cache"),
            "has_time_or_readme": "readme" in doc or "time" in doc,
        }
    return info


def warm_up(name: str, server: Server, project: Path, big_size: int, results: Results) -> str:
    """One install, the huge packument, the big tarball: all cached afterwards. Returns its URL."""
    cold = npm_install(server.base, project)
    info = check_packument(server, name)
    url = tarball_url(server, BIG)
    for _ in range(2):
        got = curl_download(url)
        if got.status != 200 or got.size != big_size:
            raise BenchError(f"{name}: {BIG} tarball HTTP {got.status}, {got.size}/{big_size} bytes")
    results.details[f"warmup_{name}"] = {"cold_install_s": cold, "packument": info, "tarball_url": url}
    print(f"  {name}: cold install {cold:.2f}s, packument {info['second']}", flush=True)
    return url


def wrk_packument(wrk: str, server: Server, seconds: float, gzip: bool = False) -> WrkResult:
    headers = {"Accept": ABBREVIATED} | ({"Accept-Encoding": "gzip"} if gzip else {})
    result = run_wrk(wrk, server.base + HUGE, connections=8, duration=seconds, headers=headers)
    if result.errors or result.non_2xx:
        raise BenchError(f"wrk against {server.base}: {result.errors} errors, {result.non_2xx} non-2xx")
    return result


def measure_packument(wrk: str, proxy: Server, verdaccio: Server, seconds: float, results: Results) -> None:
    """(a) abbreviated packument of the 2,000-version package, wrk -t1 -c8.

    Plain first (the target), then with ``Accept-Encoding: gzip`` as npm itself sends it, for
    information: compressing per request is where an on-the-fly server spends its CPU.
    """
    p = wrk_packument(wrk, proxy, seconds)
    v = wrk_packument(wrk, verdaccio, seconds)
    pz = wrk_packument(wrk, proxy, seconds, gzip=True)
    vz = wrk_packument(wrk, verdaccio, seconds, gzip=True)
    results.details["a_wrk"] = {
        key: asdict(r) | {"raw": None}
        for key, r in {"proxy": p, "verdaccio": v, "proxy_gzip": pz, "verdaccio_gzip": vz}.items()
    }
    results.add(Row("(a) huge abbreviated packument", "req/s", p.rps, v.rps, (">=", 3.0)))
    results.add(Row("(a) huge abbreviated packument p99", "ms", p.p99_ms, v.p99_ms))
    results.add(Row("(a) same, Accept-Encoding: gzip", "req/s", pz.rps, vz.rps))
    results.add(Row("(a) same, gzip, p99", "ms", pz.p99_ms, vz.p99_ms))


TARBALL_RUNS = 7


def mib_s(url: str) -> float:
    got = curl_download(url)
    if got.status != 200:
        raise BenchError(f"{url}: HTTP {got.status}")
    return float(got.speed / MIB)


def measure_tarball(urls: dict[str, str], results: Results) -> None:
    """(b) one cached ~50 MB tarball over one connection: servers interleaved run by run (so a
    drift of the machine hits all of them alike), median of TARBALL_RUNS each."""
    samples: dict[str, list[float]] = {name: [] for name in urls}
    for _ in range(TARBALL_RUNS):
        for name, url in urls.items():
            samples[name].append(mib_s(url))
    speeds = {name: statistics.median(values) for name, values in samples.items()}
    results.details["b_mib_s"] = samples
    row = Row(
        "(b) ~50 MB tarball, 1 conn", "MiB/s", speeds["proxy"], speeds["verdaccio"], nginx=speeds.get("nginx")
    )
    results.add(row)


def measure_install(
    registries: dict[str, str], projects: dict[str, Path], runs: int, results: Results
) -> None:
    """(c) warm npm install, fresh cache each run; proxy and Verdaccio interleaved against drift."""
    walls: dict[str, list[float]] = {name: [] for name in registries}
    for _ in range(runs):
        for name, registry in registries.items():
            walls[name].append(npm_install(registry, projects[name]))
    results.details["c_install_s"] = walls
    medians = {name: statistics.median(w) for name, w in walls.items()}
    results.add(
        Row(
            f"(c) warm npm install, median of {runs}",
            "s",
            medians["proxy"],
            medians["verdaccio"],
            ("<=", 1.0),
        )
    )


# -------------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 s wrk runs, 3 installs")
    parser.add_argument("--work", type=Path, default=BENCH / ".work", help="work directory")
    return parser.parse_args()


def run(args: argparse.Namespace, procs: Processes, results: Results, nginx_tmp: Path) -> dict[str, Any]:
    """Set up, warm, measure; returns the settings recorded with the results."""
    work: Path = args.work
    wrk_seconds = 2.0 if args.quick else 5.0
    installs = 3 if args.quick else 5
    big_size = 50 * MIB
    wrk = ensure_debian_tool("wrk", ["wrk"])
    nginx = ensure_debian_tool("nginx", ["nginx-light", "nginx"])
    verdaccio_entry = ensure_verdaccio()
    print("packing tarballs (cached in WORK/npm-dists) ...", flush=True)
    manifest, big = build_manifest(work, big_size)
    big_size = big.stat().st_size

    upstream = start_fake(procs, "npm", manifest, work / "npm-upstream.log", timeout=120)
    proxy = start_proxy(procs, upstream.base, work, fmt="npm")
    proxy = Server(proxy.proc, proxy.base + "/", proxy.log)  # npm's registry URL ends in /
    verdaccio = start_verdaccio(procs, verdaccio_entry, upstream.base, work)
    nginx_root = work / "npm-nginx-root"
    nginx_root.mkdir(exist_ok=True)
    shutil.copyfile(big, nginx_root / big.name)
    ref = start_nginx(procs, nginx, nginx_root, nginx_tmp, big.name)
    print(f"  upstream {upstream.base}, proxy {proxy.base}, verdaccio {verdaccio.base}, nginx {ref.base}")

    print("warm-up (one install, packument, tarball through each):", flush=True)
    projects = {"proxy": make_project(work, "proxy"), "verdaccio": make_project(work, "verdaccio")}
    urls = {
        "proxy": warm_up("proxy", proxy, projects["proxy"], big_size, results),
        "verdaccio": warm_up("verdaccio", verdaccio, projects["verdaccio"], big_size, results),
        "nginx": f"{ref.base}/{big.name}",
    }
    steps: list[tuple[str, Callable[[], None]]] = [
        ("(a) wrk -t1 -c8", lambda: measure_packument(wrk, proxy, verdaccio, wrk_seconds, results)),
        (f"(b) curl, interleaved, median of {TARBALL_RUNS}", lambda: measure_tarball(urls, results)),
        (
            "(c) npm install",
            lambda: measure_install(
                {"proxy": proxy.base, "verdaccio": verdaccio.base}, projects, installs, results
            ),
        ),
    ]
    for title, step in steps:
        print(title, flush=True)
        step()
    return {
        "quick": args.quick,
        "wrk_seconds": wrk_seconds,
        "installs": installs,
        "cpus": os.cpu_count(),
        "big_tarball_bytes": big_size,
        "huge_versions": HUGE_VERSIONS,
    }


def main() -> int:
    args = parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    procs = Processes()
    results = Results()
    nginx_tmp = Path(tempfile.mkdtemp(prefix="bench-npm-nginx-"))
    settings: dict[str, Any] = {}

    def body() -> None:
        settings.update(run(args, procs, results, nginx_tmp))

    def cleanup() -> None:
        procs.stop_all()
        shutil.rmtree(nginx_tmp, ignore_errors=True)

    status = run_guarded(body, cleanup, (BenchError, subprocess.SubprocessError))
    out = args.work / "npm-results.json"
    results.write(out, {**settings, "complete": status == 0})
    if results.rows:
        print()
        print(table(results.rows))
        print(f"\n{os.cpu_count()} CPUs shared by servers and clients; ratio = proxy / verdaccio")
    print(f"results written to {out}")
    if status == 0 and any(row.passed is False for row in results.rows):
        status = 3
    return status


if __name__ == "__main__":
    sys.exit(main())
