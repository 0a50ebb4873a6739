"""Load generators driven by the benchmark: wrk for request rates, curl for raw downloads.

Both are C programs, so the client side costs as little CPU as possible: on a two-core machine
the client and the server share the cores, and a Python client would measure itself.
"""

from __future__ import annotations

import re
import statistics
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from harness import Processes

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


@dataclass(frozen=True)
class WrkResult:
    """Requests per second and latency percentiles (ms) from one wrk run."""

    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    non_2xx: int
    raw: str


def _ms(value: str) -> float:
    """wrk's ``635.91us`` / ``1.23ms`` / ``2.00s`` as milliseconds."""
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", value.strip())
    if not m:
        raise ValueError(f"unparseable wrk duration {value!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(output: str) -> WrkResult:
    """Pull the figures out of ``wrk --latency`` output; raises if the run produced none."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.MULTILINE)
    total = re.search(r"(\d+) requests in", output)
    if not (rps and p50 and p99 and total):
        raise ValueError(f"wrk output not understood:\n{output}")
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return WrkResult(
        rps=float(rps.group(1)),
        p50_ms=_ms(p50.group(1)),
        p99_ms=_ms(p99.group(1)),
        requests=int(total.group(1)),
        errors=sum(int(g) for g in sock.groups()) if sock else 0,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        raw=output,
    )


def run_wrk(
    wrk: str,
    url: str,
    *,
    connections: int,
    duration: float,
    headers: Mapping[str, str] | None = None,
    threads: int = 1,
) -> WrkResult:
    """One wrk run against ``url``; bounded by ``duration`` plus a generous timeout."""
    argv = [wrk, f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--latency", "--timeout", "10s"]
    for name, value in (headers or {}).items():
        argv += ["-H", f"{name}: {value}"]
    argv.append(url)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse_wrk(done.stdout)


@dataclass(frozen=True)
class Download:
    """One curl transfer: status, bytes received, speed (bytes/s) and the X-Cache header."""

    status: int
    size: int
    speed: float
    cache: str


CURL_FORMAT = r"%{http_code} %{size_download} %{speed_download} %header{x-cache}\n"


def _parse_curl(line: str) -> Download:
    parts = line.split()
    if len(parts) < 3:
        raise ValueError(f"curl output not understood: {line!r}")
    return Download(
        status=int(parts[0]),
        size=int(parts[1]),
        speed=float(parts[2]),
        cache=parts[3] if len(parts) > 3 else "-",
    )


def curl_download(url: str, timeout: float = 600.0) -> Download:
    """Download ``url`` once over one connection into /dev/null."""
    done = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "--max-time", f"{timeout:g}", "-w", CURL_FORMAT, url],
        capture_output=True,
        text=True,
        timeout=timeout + 30,
        check=False,
    )
    return _parse_curl(done.stdout)


def median_speed(downloads: Sequence[Download]) -> float:
    return statistics.median(d.speed for d in downloads)


def curl_parallel(procs: Processes, url: str, clients: int, timeout: float = 900.0) -> list[Download]:
    """``clients`` curl processes downloading ``url`` at once; every one is waited for or stopped."""
    argv = ["curl", "-s", "-o", "/dev/null", "--max-time", f"{timeout:g}", "-w", CURL_FORMAT, url]
    running = [procs.start(argv, stdout=subprocess.PIPE, session=False) for _ in range(clients)]
    results: list[Download] = []
    for proc in running:
        out, _ = proc.communicate(timeout=timeout + 30)
        results.append(_parse_curl(out.decode()))
    return results
