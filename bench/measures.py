"""The measurements (a)-(e), each proxy first and then nginx on the same bytes.

All of them run against a warm cache: :func:`warm_up` fetches every page and file through the
proxy once (timing the first, cold fetch of the 30 projects as information) and checks that a
second request is answered as a cache hit.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dataset import MIB, Dataset, Dist
from harness import BenchError, Processes, RssSampler, http_get, process_tree, reset_peak_rss, rss_kib
from loadgen import WrkResult, curl_download, curl_parallel, run_wrk
from report import Report, Row, Target
from servers import BENCH, Server, python_env

JSON_ACCEPT = "application/vnd.pypi.simple.v1+json"
HTML_ACCEPT = "text/html"
MB = 1e6


@dataclass
class Bench:
    """Everything the measurements need: servers, files, tools, sizes and the report."""

    procs: Processes
    proxy: Server
    nginx: Server | None
    data: Dataset
    report: Report
    wrk: str
    wrk_seconds: float
    file_urls: dict[str, str]  # filename -> proxy URL, as the proxy's own pages list it

    @property
    def ref(self) -> Server:
        assert self.nginx is not None, "nginx is started after warm-up"
        return self.nginx

    def page_url(self, project: str) -> str:
        return f"{self.proxy.base}/simple/{project}/"

    def proxy_file(self, dist: Dist) -> str:
        return self.file_urls[dist.filename]

    def nginx_file(self, dist: Dist) -> str:
        return f"{self.ref.base}/files/{dist.filename}"

    def nginx_page(self, project: str, kind: str) -> str:
        return f"{self.ref.base}/pages/{project}.{kind}"


# ------------------------------------------------------------------------------------ warm-up


def fetch_all(job: dict[str, Any], work: Path) -> dict[str, Any]:
    """Run bench/fetch_all.py in its own process and return its JSON result."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=work, delete=False) as fh:
        json.dump(job, fh)
        job_path = Path(fh.name)
    try:
        done = subprocess.run(
            [sys.executable, str(BENCH / "fetch_all.py"), str(job_path)],
            capture_output=True,
            text=True,
            env=python_env(),
            timeout=900,
            check=False,
        )
    finally:
        job_path.unlink(missing_ok=True)
    if done.returncode != 0:
        raise BenchError(f"fetch_all.py failed: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def cold_fetch(bench: Bench, work: Path) -> None:
    """First fetch of the 30 pages + wheels through the proxy: fills the cache, timed as info."""
    items = [{"page": bench.page_url(d.project), "file": None, "size": d.size} for d in bench.data.small]
    job = {"items": items, "runs": 1, "concurrency": 8, "accept": JSON_ACCEPT}
    run = fetch_all(job, work)["runs"][0]
    for error in run["errors"]:
        bench.report.warn(f"cold fetch: {error}")
    for dist, url in zip(bench.data.small, run["files"], strict=True):
        if url:
            bench.file_urls[dist.filename] = url
    bench.report.details["e_cold"] = run | {"files": None}
    bench.report.add(Row("e", "cold fetch 30 pages+wheels (fills cache)", "s", run["wall"], None))


def _page_file_url(bench: Bench, dist: Dist) -> str:
    """Fetch ``dist``'s JSON page through the proxy and return the file URL it lists."""
    status, _, body = http_get(bench.page_url(dist.project), {"Accept": JSON_ACCEPT})
    if status != 200:
        raise BenchError(f"page of {dist.project}: HTTP {status}")
    url: str = json.loads(body)["files"][0]["url"].split("#", 1)[0]
    return url


def warm_up(bench: Bench) -> None:
    """Fetch the remaining pages and files once, check sizes, then check that each now hits."""
    for dist in (bench.data.ten, bench.data.huge, bench.data.big):
        bench.file_urls[dist.filename] = _page_file_url(bench, dist)
        got = curl_download(bench.proxy_file(dist))
        if got.status != 200 or got.size != dist.size:
            raise BenchError(f"warm-up of {dist.filename}: HTTP {got.status}, {got.size}/{dist.size} bytes")
    small = bench.data.small[0].project
    http_get(bench.page_url(small), {"Accept": HTML_ACCEPT})
    for dist in bench.data.all():
        expect_hit(bench, bench.page_url(dist.project), JSON_ACCEPT)
        expect_hit(bench, bench.proxy_file(dist), None)
    expect_hit(bench, bench.page_url(small), HTML_ACCEPT)


def expect_hit(bench: Bench, url: str, accept: str | None) -> None:
    """Warn unless the proxy answers ``url`` with 200 and ``X-Cache: HIT`` (HEAD for files)."""
    headers = {"Accept": accept} if accept else {}
    method = "GET" if accept else "HEAD"
    status, resp_headers, _ = http_get(url, headers, method=method)
    cache = resp_headers.get("x-cache", "-")
    if status != 200 or cache != "HIT":
        bench.report.warn(f"{method} {url}: HTTP {status}, X-Cache {cache} (expected 200 HIT)")


def save_nginx_pages(bench: Bench, root: Path) -> None:
    """Give nginx the proxy's own rendered pages, so both serve the same bytes."""
    for dist in bench.data.small:
        _, _, body = http_get(bench.page_url(dist.project), {"Accept": JSON_ACCEPT})
        (root / "pages" / f"{dist.project}.json").write_bytes(body)
    project = bench.data.small[0].project
    _, _, body = http_get(bench.page_url(project), {"Accept": HTML_ACCEPT})
    (root / "pages" / f"{project}.html").write_bytes(body)


# ------------------------------------------------------------------------------- measurements


def _wrk_pair(
    bench: Bench, proxy_url: str, nginx_url: str, connections: int, accept: str | None
) -> tuple[WrkResult, WrkResult]:
    """The same wrk run against the proxy and nginx, each after a 1 s warm-up run."""
    headers = {"Accept": accept} if accept else {}
    results = []
    for url in (proxy_url, nginx_url):
        run_wrk(bench.wrk, url, connections=connections, duration=1, headers=headers)
        result = run_wrk(bench.wrk, url, connections=connections, duration=bench.wrk_seconds, headers=headers)
        if result.errors or result.non_2xx:
            bench.report.warn(f"wrk {url}: {result.errors} socket errors, {result.non_2xx} non-2xx")
        results.append(result)
    return results[0], results[1]


def _wrk_rows(bench: Bench, section: str, label: str, proxy: WrkResult, nginx: WrkResult) -> None:
    bench.report.add(Row(section, f"{label} req/s", "req/s", proxy.rps, nginx.rps))
    bench.report.add(Row(section, f"{label} p50", "ms", proxy.p50_ms, nginx.p50_ms))
    bench.report.add(Row(section, f"{label} p99", "ms", proxy.p99_ms, nginx.p99_ms))
    bench.report.details[f"{section}_{label}"] = {
        "proxy": {k: v for k, v in vars(proxy).items() if k != "raw"},
        "nginx": {k: v for k, v in vars(nginx).items() if k != "raw"},
    }


def measure_pages(bench: Bench) -> None:
    """(a) a cached simple page, JSON and HTML, 16 connections; nginx serves the same bytes."""
    project = bench.data.small[0].project
    for kind, accept in (("json", JSON_ACCEPT), ("html", HTML_ACCEPT)):
        url = bench.page_url(project)
        expect_hit(bench, url, accept)
        proxy, nginx = _wrk_pair(bench, url, bench.nginx_page(project, kind), 16, accept)
        expect_hit(bench, url, accept)
        _wrk_rows(bench, "a", f"{kind.upper()} page", proxy, nginx)


def measure_ten(bench: Bench) -> None:
    """(b) a cached 10 MiB wheel, 4 connections."""
    dist = bench.data.ten
    expect_hit(bench, bench.proxy_file(dist), None)
    proxy, nginx = _wrk_pair(bench, bench.proxy_file(dist), bench.nginx_file(dist), 4, None)
    _wrk_rows(bench, "b", "10MiB wheel", proxy, nginx)
    bench.report.add(
        Row("b", "10MiB wheel throughput", "MiB/s", proxy.rps * dist.size / MIB, nginx.rps * dist.size / MIB)
    )


def _downloads(bench: Bench, url: str, dist: Dist, runs: int) -> list[float]:
    """``runs`` single-connection downloads of ``dist``; speeds in MiB/s, sizes verified."""
    speeds = []
    for _ in range(runs):
        got = curl_download(url)
        if got.status != 200 or got.size != dist.size:
            bench.report.warn(f"{url}: HTTP {got.status}, {got.size} of {dist.size} bytes")
        if url.startswith(bench.proxy.base) and got.cache != "HIT":
            bench.report.warn(f"{url}: X-Cache {got.cache} (expected HIT)")
        speeds.append(got.speed / MIB)
    return speeds


def measure_single_stream(bench: Bench) -> None:
    """(c) one big asset over one connection, median of 3, proxy vs nginx."""
    dist = bench.data.huge
    proxy = _downloads(bench, bench.proxy_file(dist), dist, 3)
    nginx = _downloads(bench, bench.nginx_file(dist), dist, 3)
    bench.report.details["c_single_stream_mib_s"] = {"proxy": proxy, "nginx": nginx}
    label = f"{dist.size / MIB:,.0f}MiB single connection"
    bench.report.add(
        Row(
            "c",
            label,
            "MiB/s",
            statistics.median(proxy),
            statistics.median(nginx),
            Target("ratio", ">=", 0.9),
        )
    )


def _concurrent(bench: Bench, server: Server, url: str, dist: Dist, clients: int) -> dict[str, Any]:
    """``clients`` curls streaming ``dist`` at once while the server's RSS is sampled."""
    pids = process_tree(server.pid)
    before_kib = sum(rss_kib(p) for p in pids)
    hwm_reset = reset_peak_rss(pids)
    start = time.perf_counter()
    with RssSampler(server.pid) as sampler:
        downloads = curl_parallel(bench.procs, url, clients)
    wall = time.perf_counter() - start
    bad = [d for d in downloads if d.status != 200 or d.size != dist.size]
    if bad:
        bench.report.warn(f"{url}: {len(bad)} of {clients} downloads incomplete or failed")
    if server is bench.proxy and any(d.cache != "HIT" for d in downloads):
        bench.report.warn(f"{url}: not every concurrent download was a cache HIT")
    hwm = sampler.peak_hwm_kib() if hwm_reset else 0
    peak_kib = max(sampler.max_kib, hwm)
    return {
        "peak_rss_mb": peak_kib * 1024 / MB,
        "rss_before_mb": before_kib * 1024 / MB,
        "sampled_max_kib": sampler.max_kib,
        "hwm_kib": hwm if hwm_reset else None,
        "processes": len(pids),
        "wall_s": wall,
        "aggregate_mib_s": sum(d.size for d in downloads) / MIB / wall,
    }


def measure_concurrent_rss(bench: Bench) -> None:
    """(d) peak RSS while 20 clients stream the big asset at once."""
    dist = bench.data.big
    proxy = _concurrent(bench, bench.proxy, bench.proxy_file(dist), dist, 20)
    nginx = _concurrent(bench, bench.ref, bench.nginx_file(dist), dist, 20)
    bench.report.details["d_concurrent"] = {"proxy": proxy, "nginx": nginx}
    label = f"peak RSS, 20 x {dist.size / MIB:,.0f}MiB streams"
    bench.report.add(
        Row("d", label, "MB", proxy["peak_rss_mb"], nginx["peak_rss_mb"], Target("proxy", "<", 100))
    )
    bench.report.add(Row("d", "RSS before the streams", "MB", proxy["rss_before_mb"], nginx["rss_before_mb"]))
    bench.report.add(
        Row("d", "20 streams aggregate", "MiB/s", proxy["aggregate_mib_s"], nginx["aggregate_mib_s"])
    )


def measure_install_fetch(bench: Bench, work: Path) -> None:
    """(e) the 30 pages + 30 wheels over 8 keep-alive connections, median of 5 warm runs."""
    runs = 5
    proxy_items = [
        {"page": bench.page_url(d.project), "file": bench.proxy_file(d), "size": d.size}
        for d in bench.data.small
    ]
    nginx_items = [
        {"page": bench.nginx_page(d.project, "json"), "file": bench.nginx_file(d), "size": d.size}
        for d in bench.data.small
    ]
    walls: dict[str, list[float]] = {}
    for name, items in (("proxy", proxy_items), ("nginx", nginx_items)):
        job = {"items": items, "runs": runs, "concurrency": 8, "accept": JSON_ACCEPT}
        result = fetch_all(job, work)
        walls[name] = [run["wall"] for run in result["runs"]]
        for run in result["runs"]:
            for error in run["errors"]:
                bench.report.warn(f"(e) {name}: {error}")
            if name == "proxy" and set(run["cache"]) != {"HIT"}:
                bench.report.warn(f"(e) proxy cache statuses {run['cache']} (expected only HIT)")
    bench.report.details["e_warm_walls_s"] = walls
    total = sum(d.size for d in bench.data.small) / MB
    bench.report.add(
        Row(
            "e",
            f"warm 30 pages+wheels ({total:.0f} MB), 8 conns",
            "s",
            statistics.median(walls["proxy"]),
            statistics.median(walls["nginx"]),
            Target("proxy", "<", 0.35),
        )
    )
