"""The servers ``compare.py`` measures: the proxy, the peers a user would pick instead, and nginx.

Peers are installed on first use into a scratch directory outside the repository
(``~/.cache/artifact-proxy-bench`` unless ``--scratch`` says otherwise): one venv for devpi-server,
proxpi, gunicorn (proxpi's container runs under it) and uv, and an npm prefix for Verdaccio 6.8.0
with node-fetch pinned to 2.7.0 (newer node-fetch releases need Node 22). pip and npm take their
index from their own configuration; nothing here names a registry. nginx and wrk come from Debian's
packages, installed only when running as root.

A peer that cannot be installed or started is not dropped: :class:`Unavailable` carries the reason,
and the table prints "n/a (reason)" in its column.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from harness import BenchError, Processes, child_pids, free_port, wait_http
from servers import REPO, python_env

VERDACCIO_VERSION = "6.8.0"
PY_PEERS = ("devpi-server", "proxpi", "gunicorn", "uv")
DEVPI_PASSWORD = "bench-root"  # a throwaway devpi on 127.0.0.1, deleted after the run


class Unavailable(Exception):
    """A peer could not be installed or started; ``str()`` is the reason shown in the table."""


@dataclass
class Server:
    """One server under measurement: its root process (for RSS) and the URLs it serves.

    ``pypi`` is a simple index URL ending in ``/``, ``npm`` a registry URL ending in ``/``,
    ``static`` the root of nginx's static files. A server has the ones it speaks.
    """

    name: str
    pid: int
    pypi: str | None = None
    npm: str | None = None
    static: str | None = None
    info: dict[str, object] = field(default_factory=dict)


# ----------------------------------------------------------------------------------- install


def _run(argv: list[str], cwd: Path | None = None, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def _tail(done: subprocess.CompletedProcess[str]) -> str:
    text = (done.stderr or done.stdout or "").strip().splitlines()
    return text[-1][:160] if text else f"exit status {done.returncode}"


@dataclass
class PythonPeers:
    """The scratch venv holding devpi-server, proxpi, gunicorn and uv, or why it could not be made."""

    venv: Path
    versions: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    def bin(self, name: str) -> Path:
        return self.venv / "bin" / name


def ensure_python_peers(scratch: Path) -> PythonPeers:
    """Create the venv and ``pip install`` the peers into it once; later runs reuse it."""
    peers = PythonPeers(scratch / "venv")
    python = peers.bin("python")
    if not python.exists():
        print(f"  creating venv {peers.venv} ...", flush=True)
        done = _run([sys.executable, "-m", "venv", str(peers.venv)], timeout=300)
        if done.returncode != 0:
            peers.error = f"venv failed: {_tail(done)}"
            return peers
    script = (
        "import importlib.metadata as m,json,sys;print(json.dumps({p:m.version(p) for p in sys.argv[1:]}))"
    )
    done = _run([str(python), "-c", script, *PY_PEERS], timeout=60)
    if done.returncode != 0:  # one of them is not installed yet
        print(f"  installing {', '.join(PY_PEERS)} (pip, into {peers.venv}) ...", flush=True)
        done = _run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *PY_PEERS])
        if done.returncode != 0:
            peers.error = f"pip install failed: {_tail(done)}"
            return peers
        done = _run([str(python), "-c", script, *PY_PEERS], timeout=60)
    if done.returncode == 0:
        peers.versions = json.loads(done.stdout)
    else:
        peers.error = f"installed peers do not import: {_tail(done)}"
    return peers
    script = (
        "import importlib.metadata as m,json,sys;print(json.dumps({p:m.version(p) for p in sys.argv[1:]}))"
    )
    done = _run([str(python), "-c", script, *PY_PEERS], timeout=60)
    if done.returncode == 0:
        peers.versions = json.loads(done.stdout)
    return peers


def ensure_verdaccio(scratch: Path) -> Path:
    """Verdaccio's entry point, ``npm install``-ed into SCRATCH/verdaccio on first use."""
    prefix = scratch / "verdaccio"
    entry = prefix / "node_modules" / "verdaccio" / "bin" / "verdaccio"
    meta = prefix / "node_modules" / "verdaccio" / "package.json"
    if entry.is_file() and json.loads(meta.read_text()).get("version") == VERDACCIO_VERSION:
        return entry
    if shutil.which("npm") is None or shutil.which("node") is None:
        raise Unavailable("node/npm not installed")
    prefix.mkdir(parents=True, exist_ok=True)
    package = {
        "private": True,
        "dependencies": {"verdaccio": VERDACCIO_VERSION},
        "overrides": {"node-fetch": "2.7.0"},
    }
    (prefix / "package.json").write_text(json.dumps(package, indent=2) + "\n")
    print(f"  installing verdaccio@{VERDACCIO_VERSION} (npm, into {prefix}) ...", flush=True)
    done = _run(["npm", "install", "--no-audit", "--no-fund"], cwd=prefix)
    if done.returncode != 0 or not entry.is_file():
        raise Unavailable(f"npm install verdaccio failed: {_tail(done)}")
    return entry


def which(binary: str) -> str | None:
    """``which``, also looking in sbin (nginx lives there)."""
    return shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/usr/bin:/sbin")


def ensure_debian(binary: str, package: str) -> str:
    """Path of ``binary``; installs ``package`` with apt-get only when running as root."""
    found = which(binary)
    if found:
        return found
    if os.geteuid() != 0:
        raise Unavailable(f"{binary} missing (apt-get install {package} as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package],
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package],
    ):
        print(f"  {' '.join(argv)} ...", flush=True)
        subprocess.run(argv, env=env, check=False, timeout=900, capture_output=True)
        found = which(binary)
        if found:
            return found
    raise Unavailable(f"apt-get could not install {package}")


# ------------------------------------------------------------------------------------ servers

PROXY_CONFIG = """\
[server]
listen = "127.0.0.1:{port}"
data_dir = "{data_dir}"

[upstreams.fakepypi]
format = "pypi"
url = "{pypi}"
metadata_ttl = "1h"

[upstreams.fakenpm]
format = "npm"
url = "{npm}"
metadata_ttl = "1h"

[[domains]]
name = "default"

[[domains.repositories]]
name = "py"
anonymous_read = true
upstreams = ["fakepypi"]

[[domains.repositories]]
name = "js"
anonymous_read = true
upstreams = ["fakenpm"]
"""


def proxy_workers_flag() -> bool:
    """Whether this checkout's ``serve`` has ``--workers`` (it is being added as this is written)."""
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--help"],
        capture_output=True,
        text=True,
        env=python_env(),
        cwd=REPO,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"python -m proxy serve --help failed: {_tail(done)}")
    return "--workers" in done.stdout


def start_proxy(procs: Processes, work: Path, pypi: str, npm: str, workers: int | None) -> Server:
    """The proxy under test (``python -m proxy serve``) serving both formats.

    ``workers`` is passed as ``--workers`` (whose default is the number of CPUs); None when this
    checkout's CLI has no such flag. The caller records which.
    """
    port = free_port()
    data_dir = work / "proxy-data"
    shutil.rmtree(data_dir, ignore_errors=True)
    config = work / "proxy.toml"
    config.write_text(PROXY_CONFIG.format(port=port, data_dir=data_dir, pypi=pypi, npm=npm))
    log = work / "proxy.log"
    log.unlink(missing_ok=True)  # one run per log
    argv = [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--log-level", "WARNING"]
    if workers is not None:
        argv += ["--workers", str(workers)]
    proc = procs.start(argv, log=log, env=python_env(), cwd=REPO)
    origin = f"http://127.0.0.1:{port}"
    wait_http(f"{origin}/-/readyz", proc, "proxy", log)
    return Server(
        "proxy",
        proc.pid,
        pypi=f"{origin}/default/pypi/py/simple/",
        npm=f"{origin}/default/npm/js/",
        info={"argv": argv[1:], "workers": workers},
    )


def start_devpi(procs: Processes, peers: PythonPeers, work: Path, upstream: str) -> Server:
    """devpi-server with a mirror index ``root/fake`` of the fake upstream (no root/pypi).

    The mirror is made through devpi's HTTP API (log in as root, PUT the index), which is what
    ``devpi index -c root/fake type=mirror mirror_url=…`` does, without needing devpi-client.
    """
    if peers.error:
        raise Unavailable(peers.error)
    serverdir = work / "devpi"
    shutil.rmtree(serverdir, ignore_errors=True)
    init = _run(
        [
            str(peers.bin("devpi-init")),
            "--serverdir",
            str(serverdir),
            "--no-root-pypi",
            "--root-passwd",
            DEVPI_PASSWORD,
        ],
        timeout=120,
    )
    if init.returncode != 0:
        raise Unavailable(f"devpi-init failed: {_tail(init)}")
    port = free_port()
    log = work / "devpi.log"
    log.unlink(missing_ok=True)  # one run per log
    argv = [
        str(peers.bin("devpi-server")),
        "--serverdir",
        str(serverdir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--mirror-cache-expiry",
        "3600",
    ]
    proc = procs.start(argv, log=log)
    origin = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{origin}/+api", proc, "devpi-server", log, timeout=120)
    except BenchError as exc:
        raise Unavailable(str(exc)) from exc
    login = json.dumps({"user": "root", "password": DEVPI_PASSWORD}).encode()
    status, _, body = _post(f"{origin}/+login", login, {"Content-Type": "application/json"}, "POST")
    if status != 200:
        raise Unavailable(f"devpi login HTTP {status}")
    token = json.loads(body)["result"]["password"]
    auth = base64.b64encode(f"root:{token}".encode()).decode()
    index = {"type": "mirror", "mirror_url": upstream, "mirror_cache_expiry": 3600}
    headers = {"Content-Type": "application/json", "X-Devpi-Auth": auth, "Accept": "application/json"}
    status, _, body = _post(f"{origin}/root/fake", json.dumps(index).encode(), headers, "PUT")
    if status not in (200, 201):
        raise Unavailable(f"devpi mirror index HTTP {status}: {body[:200]!r}")
    return Server("devpi", proc.pid, pypi=f"{origin}/root/fake/+simple/", info={"argv": argv[1:]})


def _post(url: str, data: bytes, headers: dict[str, str], method: str) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


PROXPI_THREADS = 16


def start_proxpi(procs: Processes, peers: PythonPeers, work: Path, upstream: str) -> Server:
    """proxpi as its container runs it (``gunicorn --preload proxpi.server:app``), with threads.

    One gunicorn worker (proxpi keeps its index cache in process memory) and
    ``--threads PROXPI_THREADS`` so concurrent clients are not served one at a time. Its other
    settings are its defaults, including ``PROXPI_DOWNLOAD_TIMEOUT`` (0.9 s): a file not cached
    by then is answered with a redirect to the upstream, which shows in the miss figures.
    """
    if peers.error:
        raise Unavailable(peers.error)
    cache = work / "proxpi-cache"
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    port = free_port()
    env = {
        **os.environ,
        "PROXPI_INDEX_URL": upstream,
        "PROXPI_EXTRA_INDEX_URLS": "",
        "PROXPI_CACHE_DIR": str(cache),
        "PROXPI_INDEX_TTL": "3600",
        "PROXPI_LOGGING_LEVEL": "WARNING",
    }
    argv = [
        str(peers.bin("gunicorn")),
        "--preload",
        "--bind",
        f"127.0.0.1:{port}",
        "--threads",
        str(PROXPI_THREADS),
        "--timeout",
        "600",
        "proxpi.server:app",
    ]
    log = work / "proxpi.log"
    log.unlink(missing_ok=True)  # one run per log
    proc = procs.start(argv, log=log, env=env, cwd=work)
    origin = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{origin}/health", proc, "proxpi", log, timeout=120)
    except BenchError as exc:
        raise Unavailable(str(exc)) from exc
    for pid in child_pids(proc.pid):
        procs.adopt(pid, "proxpi gunicorn worker")
    return Server(
        "proxpi", proc.pid, pypi=f"{origin}/index/", info={"argv": argv[1:], "threads": PROXPI_THREADS}
    )


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
    timeout: 600s
packages:
  '**':
    access: $all
    publish: $authenticated
    proxy: local
web:
  enable: false
log: {{ type: stdout, format: pretty, level: error }}
"""


def start_verdaccio(procs: Processes, entry: Path, work: Path, upstream: str) -> Server:
    """Verdaccio with the fake npm registry as its only uplink, storage in WORK."""
    port = free_port()
    storage = work / "verdaccio-storage"
    shutil.rmtree(storage, ignore_errors=True)
    storage.mkdir(parents=True)
    config = work / "verdaccio.yaml"
    config.write_text(VERDACCIO_CONFIG.format(storage=storage, upstream=upstream))
    log = work / "verdaccio.log"
    log.unlink(missing_ok=True)  # one run per log
    argv = ["node", str(entry), "--config", str(config), "--listen", f"127.0.0.1:{port}"]
    proc = procs.start(argv, log=log, cwd=work)
    origin = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{origin}/-/ping", proc, "verdaccio", log, timeout=120)
    except BenchError as exc:
        raise Unavailable(str(exc)) from exc
    return Server("verdaccio", proc.pid, npm=f"{origin}/", info={"version": VERDACCIO_VERSION})


NGINX_CONFIG = """\
daemon off;
worker_processes {workers};
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
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
    gzip on;  # as a user would, for the JSON documents (npm asks for gzip)
    gzip_types application/vnd.pypi.simple.v1+json application/vnd.npm.install-v1+json application/json;
    proxy_cache_path {tmp}/cache levels=1:2 keys_zone=bench:32m max_size=20g inactive=1d use_temp_path=off;

    upstream fakepypi {{ server {pypi_hostport}; keepalive 32; }}
    upstream fakenpm {{ server {npm_hostport}; keepalive 32; }}

    # The pull-through cache a user would configure: lock so concurrent misses share one
    # upstream fetch, the Accept header in the key (pages and packuments vary on it), and the
    # upstream's absolute file URLs rewritten to this server so files are fetched through it.
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Accept-Encoding "";
    proxy_cache bench;
    proxy_cache_key "$scheme$proxy_host$request_uri|$http_accept";
    proxy_cache_valid 200 1h;
    proxy_cache_lock on;
    proxy_cache_lock_timeout 10m;
    proxy_cache_lock_age 10m;
    proxy_ignore_headers Vary;
    proxy_read_timeout 600s;
    sub_filter_once off;
    sub_filter_types application/vnd.pypi.simple.v1+json application/vnd.pypi.simple.v1+html
                     application/vnd.npm.install-v1+json application/json;

    server {{
        listen 127.0.0.1:{pypi_port};
        location / {{
            proxy_pass http://fakepypi;
            sub_filter "{pypi_origin}" "http://127.0.0.1:{pypi_port}";
            add_header X-Cache $upstream_cache_status;
        }}
    }}
    server {{
        listen 127.0.0.1:{npm_port};
        location / {{
            proxy_pass http://fakenpm;
            sub_filter "{npm_origin}" "http://127.0.0.1:{npm_port}";
            add_header X-Cache $upstream_cache_status;
        }}
    }}
    server {{
        listen 127.0.0.1:{static_port};
        root {root};
        location / {{ }}
    }}
}}
"""


def _origin(url: str) -> str:
    parts = url.split("/")
    return "/".join(parts[:3])


def start_nginx(
    procs: Processes, nginx: str, tmp: Path, root: Path, pypi: str, npm: str, workers: int
) -> tuple[Server, Server]:
    """One nginx: proxy_cache in front of each fake, plus a static root serving the same bytes.

    Returns (the proxy_cache server, the static server); both are the same processes, so RSS
    is reported once, on the proxy_cache column.
    """
    ports = {k: free_port() for k in ("pypi", "npm", "static")}
    pypi_origin, npm_origin = _origin(pypi), _origin(npm)
    config = tmp / "nginx.conf"
    config.write_text(
        NGINX_CONFIG.format(
            workers=workers,
            tmp=tmp,
            root=root,
            pypi_hostport=pypi_origin.split("//")[1],
            npm_hostport=npm_origin.split("//")[1],
            pypi_origin=pypi_origin,
            npm_origin=npm_origin,
            pypi_port=ports["pypi"],
            npm_port=ports["npm"],
            static_port=ports["static"],
        )
    )
    log = tmp / "error.log"
    proc = procs.start([nginx, "-p", str(tmp), "-c", str(config), "-e", str(log)], log=tmp / "stderr.log")
    static = f"http://127.0.0.1:{ports['static']}"
    (root / "ping").write_text("ok\n")
    try:
        wait_http(f"{static}/ping", proc, "nginx", log)
    except BenchError as exc:
        raise Unavailable(str(exc)) from exc
    for pid in child_pids(proc.pid):
        procs.adopt(pid, "nginx worker")
    version = subprocess.run([nginx, "-v"], capture_output=True, text=True, check=False, timeout=10)
    info: dict[str, object] = {"version": version.stderr.strip(), "workers": workers}
    cache = Server(
        "nginx",
        proc.pid,
        pypi=pypi.replace(pypi_origin, f"http://127.0.0.1:{ports['pypi']}"),
        npm=npm.replace(npm_origin, f"http://127.0.0.1:{ports['npm']}"),
        info=info,
    )
    return cache, Server("nginx-static", proc.pid, static=static, info=info)
