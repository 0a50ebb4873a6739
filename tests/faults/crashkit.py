"""Tools of the crash-consistency group: a proxy run as a real process, killed and restarted.

The proxy runs as ``python -m proxy serve`` on a data directory of the test. It is killed with
SIGKILL either by the test (after a client has moved a given number of bytes) or by ``strace``
attached to it, which delivers SIGKILL on entry to the n-th call of a system call (``-e inject=``),
optionally only calls on one path (``-P``: the index's WAL, a blob's directory). Attaching after
the proxy is ready keeps start-up's own calls out of the count. After each kill the proxy is
started again on the same directory and :func:`scan` checks what DESIGN.md invariant 6 promises.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import sqlite3
import sys
import tarfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

STRACE_MISSING = (
    "strace is not installed (Debian package `strace`): the system-call-boundary crash tests "
    "need it to deliver SIGKILL at a chosen system call"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write_config(path: Path, data_dir: Path, upstream_url: str, port: int, metadata_ttl: str) -> None:
    """One PyPI connection behind ``public``; ``team`` (publish target) chains to ``public``."""
    path.write_text(
        f"""[server]
listen = "127.0.0.1:{port}"
data_dir = "{data_dir}"
auth = false

[upstreams.fake]
format = "pypi"
url = "{upstream_url}"
metadata_ttl = "{metadata_ttl}"
retries = 0

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


@dataclass(frozen=True)
class Inject:
    """Where strace kills: on entry to the ``when``-th call of ``syscalls`` (per thread),
    counting only calls on ``path`` when given."""

    syscalls: str
    when: int = 1
    path: Path | None = None

    def args(self) -> list[str]:
        where = ["-P", str(self.path)] if self.path is not None else []
        return [
            *where,
            "-e",
            f"trace={self.syscalls}",
            "-e",
            f"inject={self.syscalls}:signal=KILL:when={self.when}",
        ]

    def __str__(self) -> str:
        on = f" on {self.path.name}" if self.path is not None else ""
        return f"{self.syscalls}#{self.when}{on}"


_strace_usable: dict[str, str | None] = {}


async def require_strace() -> str:
    """The strace binary, or skip: missing, or not allowed to attach (ptrace restricted)."""
    strace = await asyncio.to_thread(shutil.which, "strace")
    if strace is None:
        pytest.skip(STRACE_MISSING)
    if strace not in _strace_usable:
        victim = await asyncio.create_subprocess_exec(sys.executable, "-c", "import time; time.sleep(30)")
        probe = await asyncio.create_subprocess_exec(
            strace, "-o", os.devnull, "-p", str(victim.pid), stderr=asyncio.subprocess.PIPE
        )
        assert probe.stderr is not None
        line = await asyncio.wait_for(probe.stderr.readline(), 10)
        attached = b"attached" in line
        with contextlib.suppress(ProcessLookupError):
            probe.send_signal(signal.SIGINT)
        await probe.wait()
        victim.kill()
        await victim.wait()
        _strace_usable[strace] = None if attached else line.decode(errors="replace").strip()
    why = _strace_usable[strace]
    if why is not None:
        pytest.skip(f"strace cannot attach to a process here (ptrace restricted?): {why}")
    return strace


@dataclass
class ProxyProcess:
    """The proxy as a child process on a fixed port and data directory."""

    root: Path
    upstream_url: str
    metadata_ttl: str = "10m"
    workers: int = 1  # 1: one process; more: a supervisor and its workers (server/workers.py)
    port: int = field(default_factory=free_port)
    proc: asyncio.subprocess.Process | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def config(self) -> Path:
        return self.root / "proxy.toml"

    @property
    def wal(self) -> Path:
        return self.data_dir / "index.sqlite3-wal"

    def blob_path(self, digest: str) -> Path:
        return self.data_dir / "blobs" / "sha256" / digest[:2] / digest

    def files_url(self, project: str, filename: str, repo: str = "public") -> str:
        return f"{self.url}/default/pypi/{repo}/files/{project}/{filename}"

    async def start(self) -> None:
        if not await asyncio.to_thread(self.config.exists):
            await asyncio.to_thread(
                functools.partial(
                    write_config, self.config, self.data_dir, self.upstream_url, self.port, self.metadata_ttl
                )
            )
        # Its log (warnings and tracebacks) goes to a file the test can show when it fails.
        log = await asyncio.to_thread(open, self.root / f"proxy-{self.starts}.log", "wb")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "proxy",
                "serve",
                "--config",
                str(self.config),
                "--log-level",
                "WARNING",
                "--workers",
                str(self.workers),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,  # its own process group: a kill takes every worker at once
            )
        finally:
            await asyncio.to_thread(log.close)
        self.starts += 1
        await self.wait_ready()

    async def wait_ready(self) -> None:
        """Until every worker answers ``/-/readyz`` (bounded)."""
        assert self.proc is not None
        seen: set[str] = set()  # X-Proxy-Worker of the answers: every worker must be serving
        # A new connection per probe, so that the kernel may hand each to another worker.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            for _ in range(600):
                if self.proc.returncode is not None:
                    log = self.root / f"proxy-{self.starts - 1}.log"
                    tail = (await asyncio.to_thread(log.read_text, errors="replace"))[-2000:]
                    raise AssertionError(f"proxy exited at start with {self.proc.returncode}:\n{tail}")
                try:
                    async with http.get(self.url + "/-/readyz") as resp:
                        if resp.status == 200:
                            seen.add(resp.headers.get("X-Proxy-Worker", "0"))
                            if len(seen) >= self.workers:
                                return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError(f"proxy did not become ready in 30 s (workers seen: {sorted(seen)})")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def kill(self) -> None:
        """SIGKILL now, to the whole process group (supervisor and workers alike: a crash)."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        await self.proc.wait()

    async def died_of_sigkill(self, timeout: float = 15.0) -> bool:
        """Wait for the proxy to die; True when SIGKILL ended it."""
        assert self.proc is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.proc.wait(), timeout)
        return self.proc.returncode == -signal.SIGKILL

    async def stop(self) -> None:
        """SIGTERM (a clean shutdown) and wait; the group is killed if anything is left of it."""
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self.proc.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        await self.proc.wait()

    @contextlib.asynccontextmanager
    async def traced(self, inject: Inject) -> AsyncIterator[Kill]:
        """strace attached to the running proxy (all threads) for the body of the block; the
        :class:`Kill` says, once the block is left, which call the SIGKILL interrupted."""
        strace = await require_strace()
        kill = Kill(self.root / f"strace-{self.starts}.log")
        tracer = await asyncio.create_subprocess_exec(
            strace,
            "-f",
            "-y",  # descriptors with their paths, so the log names the file of the killed call
            "-o",
            str(kill.log),
            *inject.args(),
            "-p",
            str(self.pid),
            stderr=asyncio.subprocess.PIPE,
        )
        assert tracer.stderr is not None
        try:
            line = await asyncio.wait_for(tracer.stderr.readline(), 10)
            assert b"attached" in line, f"strace did not attach: {line!r}"
            yield kill
        finally:
            if tracer.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    tracer.send_signal(signal.SIGINT)  # detach, the proxy runs on
            await asyncio.wait_for(tracer.communicate(), 15)
            await kill.read()


@dataclass
class Kill:
    """Where an injected SIGKILL landed, read from strace's log."""

    log: Path
    calls: str = ""  # the traced calls that never returned (interrupted by the kill)

    async def read(self) -> None:
        text = (
            await asyncio.to_thread(self.log.read_text, errors="replace")
            if await asyncio.to_thread(self.log.exists)
            else ""
        )
        unfinished = [ln for ln in text.splitlines() if ln.endswith(("= ?", "<unfinished ...>"))]
        self.calls = "\n".join(unfinished)

    def landed_on(self, fragment: str) -> bool:
        return fragment in self.calls


async def run_traced(inject: Inject, log: Path, *cmd: str) -> tuple[int, Kill]:
    """Run a command under strace with the injection: its exit code (-9: killed) and the kill."""
    strace = await require_strace()
    kill = Kill(log)
    proc = await asyncio.create_subprocess_exec(
        strace,
        "-f",
        "-qq",  # (no --seccomp-bpf: with it, -P and inject miss the calls of other threads)
        "-y",
        "-o",
        str(kill.log),
        *inject.args(),
        *cmd,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    code = await asyncio.wait_for(proc.wait(), 60)
    await kill.read()
    return code, kill


# --- what a crash may leave ------------------------------------------------------------------


@dataclass
class Scan:
    """The data directory right after a restart."""

    integrity: str = ""
    rows: int = 0
    bad_rows: list[str] = field(default_factory=list)  # row → missing, misnamed or wrong-size blob
    bad_blobs: list[str] = field(default_factory=list)  # blob file whose bytes are not its name
    leftovers: list[str] = field(default_factory=list)  # tmp/, pages/, locks/ files after start-up


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def scan(data_dir: Path) -> Scan:
    """Check invariant 6 on disk (blocking: call through ``asyncio.to_thread``)."""
    out = Scan()
    with contextlib.closing(sqlite3.connect(data_dir / "index.sqlite3")) as db:
        out.integrity = ";".join(str(r[0]) for r in db.execute("PRAGMA integrity_check"))
        rows = list(db.execute("SELECT repository, filename, digest, size FROM assets"))
    out.rows = len(rows)
    hashes: dict[Path, str] = {}
    for path in (data_dir / "blobs").rglob("*"):
        if path.is_file():
            hashes[path] = _sha256(path)
            if hashes[path] != path.name or path.parent.name != path.name[:2]:
                out.bad_blobs.append(str(path.relative_to(data_dir)))
    for repo, filename, digest, size in rows:
        blob = data_dir / "blobs" / "sha256" / str(digest)[:2] / str(digest)
        if hashes.get(blob) != digest or blob.stat().st_size != size:
            out.bad_rows.append(f"{repo}/{filename} -> {digest}")
    for sub in ("tmp", "pages", "locks"):
        folder = data_dir / sub
        if folder.exists():
            out.leftovers += [str(p.relative_to(data_dir)) for p in folder.rglob("*") if p.is_file()]
    return out


async def fetch(http: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with http.get(url) as resp:
        return resp.status, await resp.read()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- uploads built by hand, so a test can stop them at any byte ------------------------------

BOUNDARY = "crashkit-boundary-7d1f"


def multipart_upload(path: Path, data: bytes, name: str, version: str) -> bytes:
    """The multipart body twine sends for one wheel (fields, then the file)."""
    fields = {
        ":action": "file_upload",
        "protocol_version": "1",
        "name": name,
        "version": version,
        "filetype": "bdist_wheel",
        "pyversion": "py3",
        "metadata_version": "2.1",
        "sha256_digest": sha(data),
    }
    out = io.BytesIO()
    for key, value in fields.items():
        out.write(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
    out.write(
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="content"; filename="{path.name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode()
    )
    out.write(data)
    out.write(f"\r\n--{BOUNDARY}--\r\n".encode())
    return out.getvalue()


def npm_tarball(name: str, version: str, payload: int = 0) -> bytes:
    """A package tarball as ``npm pack`` lays it out (``package/package.json`` first)."""
    manifest = json.dumps({"name": name, "version": version, "main": "index.js", "license": "MIT"}).encode()
    files = {
        "package/package.json": manifest,
        "package/index.js": b"module.exports = 1;\n" + os.urandom(payload),
    }
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for arcname, body in files.items():
            info = tarfile.TarInfo(arcname)
            info.size = len(body)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(body))
    return gzip.compress(raw.getvalue(), mtime=0)


def listed_files(body: bytes) -> dict[str, str]:
    """filename → sha256 of a PEP 691 JSON project page."""
    page: Mapping[str, list[dict[str, object]]] = json.loads(body)
    out: dict[str, str] = {}
    for entry in page["files"]:
        hashes = entry["hashes"]
        assert isinstance(hashes, dict)
        out[str(entry["filename"])] = str(hashes["sha256"])
    return out
