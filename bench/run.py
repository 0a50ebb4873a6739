"""Benchmark of the caching proxy's warm path against nginx serving the same files.

    python bench/run.py [--quick] [--out results.json] [--work DIR]

Builds the test wheels, starts a fake upstream, the proxy (one process) and nginx (one worker,
sendfile), warms the proxy's cache, then measures: (a) cached simple pages under wrk, (b) a
cached 10 MiB wheel under wrk, (c) one big download over one connection, (d) peak RSS while 20
clients stream a 200 MiB file, (e) an installer-like fetch of 30 pages + 30 wheels. Prints a
table (proxy, nginx, ratio, target) and writes it as JSON. Every process it starts is stopped
by PID on the way out, Ctrl-C included.

Exit status: 0 all targets met, 3 a target missed, 1 an error, 130 interrupted. Only 127.0.0.1 is
contacted, apart from apt-get when nginx or wrk has to be installed.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from dataset import build_dataset
from harness import Processes, ensure_debian_tool, run_guarded
from measures import (
    Bench,
    cold_fetch,
    measure_concurrent_rss,
    measure_install_fetch,
    measure_pages,
    measure_single_stream,
    measure_ten,
    save_nginx_pages,
    warm_up,
)
from report import Report
from servers import REPO, nginx_root, nginx_version, start_nginx, start_proxy, start_upstream


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="100 MiB / 50 MiB big files, 2 s wrk runs")
    parser.add_argument("--work", type=Path, default=REPO / "bench" / ".work", help="work directory")
    parser.add_argument("--out", type=Path, help="results JSON (default: WORK/results.json)")
    parser.add_argument("--wrk-seconds", type=float, help="duration of each wrk run (default 5, quick 2)")
    parser.add_argument("--keep-data", action="store_true", help="keep the proxy's data directory")
    return parser.parse_args()


def run(args: argparse.Namespace, procs: Processes, report: Report, nginx_tmp: Path) -> dict[str, Any]:
    """Set up, warm, measure; returns the settings recorded with the results."""
    work: Path = args.work
    print("tools:", flush=True)
    nginx = ensure_debian_tool("nginx", ["nginx-light", "nginx"])
    wrk = ensure_debian_tool("wrk", ["wrk"])
    curl = ensure_debian_tool("curl", ["curl"])
    print(f"  {nginx}, {wrk}, {curl}", flush=True)
    print("test files:", flush=True)
    data = build_dataset(work / "dists", args.quick)
    shutil.rmtree(work / "proxy-data", ignore_errors=True)

    print("starting fake upstream (hashes every file first) ...", flush=True)
    upstream = start_upstream(procs, data, work)
    proxy = start_proxy(procs, upstream.base, work)
    print(f"  upstream {upstream.base} pid {upstream.pid}; proxy {proxy.base} pid {proxy.pid}", flush=True)
    wrk_seconds = args.wrk_seconds or (2.0 if args.quick else 5.0)
    bench = Bench(procs, proxy, None, data, report, wrk, wrk_seconds, {})

    print("cold fetch + warm-up through the proxy:", flush=True)
    cold_fetch(bench, work)
    warm_up(bench)
    root = nginx_root(work, data)
    save_nginx_pages(bench, root)
    bench.nginx = start_nginx(procs, nginx, root, nginx_tmp, f"files/{data.ten.filename}")
    print(f"  nginx {bench.nginx.base} pid {bench.nginx.pid}", flush=True)

    steps = [
        ("(a) cached simple pages, wrk -t1 -c16", measure_pages),
        ("(b) cached 10 MiB wheel, wrk -t1 -c4", measure_ten),
        ("(c) single-connection download, curl, median of 3", measure_single_stream),
        ("(d) 20 concurrent streams, curl, peak RSS", measure_concurrent_rss),
    ]
    for title, step in steps:
        print(title, flush=True)
        step(bench)
    print("(e) 30 pages + 30 wheels, aiohttp client, 8 connections, median of 5", flush=True)
    measure_install_fetch(bench, work)

    report.notes += [
        f"{os.cpu_count()} CPUs shared by server and load generator (wrk/curl/aiohttp run on the same cores)",
        "ratio = proxy / nginx; nginx: 1 worker, sendfile, tcp_nopush, keep-alive, same files and page bytes",
    ]
    return {
        "quick": args.quick,
        "wrk_seconds": wrk_seconds,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "nginx": nginx_version(nginx),
        "files": {d.project: d.size for d in data.all()},
    }


def main() -> int:
    args = parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))  # tests.fakes builds the wheels
    procs = Processes()
    report = Report()
    nginx_tmp = Path(tempfile.mkdtemp(prefix="bench-nginx-"))
    settings: dict[str, Any] = {}

    def body() -> None:
        settings.update(run(args, procs, report, nginx_tmp))

    def cleanup() -> None:
        procs.stop_all()
        shutil.rmtree(nginx_tmp, ignore_errors=True)
        if not args.keep_data:
            shutil.rmtree(args.work / "proxy-data", ignore_errors=True)

    status = run_guarded(body, cleanup)
    if report.rows:
        print()
        print(report.table())
        out = args.out or args.work / "results.json"
        report.write_json(out, {**settings, "complete": status == 0})
        print(f"\nresults written to {out}")
    if status == 0 and any(row.passed is False for row in report.rows):
        status = 3
    return status


if __name__ == "__main__":
    sys.exit(main())
