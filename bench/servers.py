"""Starting the three servers: the fake upstream, the proxy under test, and nginx as reference.

Each runs as its own process with its own log file in the work directory, on a port of its own
on 127.0.0.1, and is registered with :class:`harness.Processes` so it is stopped by PID.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dataset import Dataset
from harness import BenchError, Processes, child_pids, free_port, wait_http

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"


@dataclass(frozen=True)
class Server:
    """A running server: its process, base URL and log."""

    proc: subprocess.Popen[bytes]
    base: str
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


def python_env() -> dict[str, str]:
    """Environment for our Python children: the repository importable, output unbuffered."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def _read_line(proc: subprocess.Popen[bytes], timeout: float, what: str, log: Path) -> str:
    """The first stdout line of ``proc``, waiting at most ``timeout`` seconds."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with status {proc.returncode}; see {log}")
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline().decode()
            if line:
                return line
    raise BenchError(f"{what} did not start within {timeout:.0f}s; see {log}")


def start_upstream(procs: Processes, data: Dataset, work: Path) -> Server:
    """FakePyPI publishing every benchmark wheel, in its own process (it hashes 1.3 GB first)."""
    manifest = work / "upstream-files.json"
    manifest.write_text(json.dumps([{"project": d.project, "path": str(d.path)} for d in data.all()]))
    return start_fake(procs, "pypi", manifest, work / "upstream.log", timeout=600)


def start_fake(procs: Processes, fmt: str, manifest: Path, log: Path, *, timeout: float) -> Server:
    """bench/upstream.py serving ``manifest`` as a fake ``fmt`` upstream, in its own process."""
    argv = [sys.executable, str(BENCH / "upstream.py"), fmt, str(manifest)]
    proc = procs.start(argv, log=log, stdout=subprocess.PIPE, env=python_env(), cwd=REPO)
    url = json.loads(_read_line(proc, timeout, f"fake {fmt} upstream", log))["url"]
    return Server(proc, url, log)


PROXY_CONFIG = """\
[server]
listen = "127.0.0.1:{port}"
data_dir = "{data_dir}"

[upstreams.fake]
format = "{fmt}"
url = "{upstream}"
metadata_ttl = "1h"

[[domains]]
name = "default"

[[domains.repositories]]
name = "public"
anonymous_read = true
upstreams = ["fake"]
"""


def start_proxy(procs: Processes, upstream_url: str, work: Path, *, fmt: str = "pypi") -> Server:
    """The proxy under test: one process, access log off, a fresh data directory.

    The server's base is the repository root for ``fmt``: ``…/default/pypi/public`` or
    ``…/default/npm/public``.
    """
    prefix = "" if fmt == "pypi" else f"{fmt}-"
    port = free_port()
    data_dir = work / f"{prefix}proxy-data"
    shutil.rmtree(data_dir, ignore_errors=True)
    config = work / f"{prefix}proxy.toml"
    config.write_text(PROXY_CONFIG.format(port=port, data_dir=data_dir, upstream=upstream_url, fmt=fmt))
    log = work / f"{prefix}proxy.log"
    argv = [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--log-level", "WARNING"]
    proc = procs.start(argv, log=log, env=python_env(), cwd=REPO)
    origin = f"http://127.0.0.1:{port}"
    wait_http(f"{origin}/-/readyz", proc, "proxy", log)
    return Server(proc, f"{origin}/default/{fmt}/public", log)


NGINX_CONFIG = """\
daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 65;
    keepalive_requests 1000000;
    default_type application/octet-stream;
    types {{ application/json json; text/html html; }}
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ }}
    }}
}}
"""


def nginx_root(work: Path, data: Dataset) -> Path:
    """nginx's document root: the same wheel files (hard links), pages are added later."""
    root = work / "nginx-root"
    (root / "files").mkdir(parents=True, exist_ok=True)
    (root / "pages").mkdir(parents=True, exist_ok=True)
    for dist in data.all():
        link = root / "files" / dist.filename
        if link.exists() and link.stat().st_ino != dist.path.stat().st_ino:
            link.unlink()
        if not link.exists():
            try:
                os.link(dist.path, link)
            except OSError:
                link.symlink_to(dist.path)
    return root


def start_nginx(procs: Processes, nginx: str, root: Path, tmp: Path, probe: str) -> Server:
    """nginx in the foreground with one worker and a config of its own in ``tmp``."""
    port = free_port()
    config = tmp / "nginx.conf"
    config.write_text(NGINX_CONFIG.format(tmp=tmp, port=port, root=root))
    log = tmp / "error.log"
    proc = procs.start([nginx, "-p", str(tmp), "-c", str(config), "-e", str(log)], log=tmp / "stderr.log")
    origin = f"http://127.0.0.1:{port}"
    wait_http(f"{origin}/{probe}", proc, "nginx", log)
    for pid in child_pids(proc.pid):
        procs.adopt(pid, "nginx worker")
    return Server(proc, origin, log)


def nginx_version(nginx: str) -> str:
    done = subprocess.run([nginx, "-v"], capture_output=True, text=True, check=False, timeout=10)
    return (done.stderr or done.stdout).strip()
