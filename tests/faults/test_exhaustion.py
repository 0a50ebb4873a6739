"""Fault group 4, resource exhaustion: every input has a size and a time bound, enforced while
streaming, memory does not grow with payload size, and a full disk gives errors, never corruption
(DESIGN.md invariant 7; invariants 2 and 6 for what a full disk must not leave behind).

The hostile inputs are generated as they are sent (an upstream that declares 2 GiB, a 300 MiB
packument, a 1 GiB gzip bomb in a 1 MiB body, endless headers, a thousand slowloris clients), the
limits are set small so the tests stay fast, and memory is read from the proxy process itself
(``VmHWM`` in ``/proc/<pid>/status``) where a subprocess runs it. A small tmpfs as the data
directory fills up for real (root only: skipped elsewhere), and 64 mixed clients run against
an index that other processes write to at the same time, as the CLI and other workers do.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import io
import json
import resource
import socket
import sqlite3
import struct
import sys
import tarfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.clients import upload_form
from tests.conftest import Dists, ProxyFactory, blob_files, index_rows, temp_files, write_config_file
from tests.fakes.dists import build_wheel
from tests.fakes.maven import build_jar
from tests.fakes.npm import FakeNpmRegistry
from tests.fakes.nuget import build_nupkg
from tests.fakes.pypi import FakePyPI
from tests.faults.hostile import Exchange, HostileUpstream, Rule, answer, endless, header_flood
from tests.faults.report import GroupLedger
from tests.npm_clients import npm_publish_doc

GROUP = "4 resource exhaustion"

KiB = 2**10
MiB = 2**20
GiB = 2**30
LIMIT = 4 * MiB  # max_metadata_size and max_asset_size of the proxies here
# What may leave a hostile sender before the proxy hangs up: the limit plus socket buffers and
# the HTTP reader's buffer. Hundreds of MiB (the payloads offered) mean the limit was not applied.
SENT_BOUND = LIMIT + 48 * MiB
# How far the proxy's peak resident memory may rise while refusing those payloads.
MEMORY_BOUND = 96 * MiB
JSON_SIMPLE = "application/vnd.pypi.simple.v1+json"


# ----------------------------------------------------------------------------- helpers


def gzip_bomb(inflated: int) -> bytes:
    """A valid gzip member of ``inflated`` zero bytes (a multiple of 1 MiB) in about a thousandth
    of that: fully flushed deflate segments of one MiB each are byte-identical, so one is repeated
    instead of compressing a gigabyte."""
    zeros = bytes(MiB)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    again = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    count = inflated // MiB
    crc = 0
    for _ in range(count):
        crc = zlib.crc32(zeros, crc)
    head = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    tail = deflate.flush(zlib.Z_FINISH) + struct.pack("<II", crc, inflated & 0xFFFFFFFF)
    return head + first + again * (count - 1) + tail


@dataclass
class Outcome:
    """What a client saw: the status, and whether a 2xx body arrived complete (and its bytes)."""

    status: int
    complete: bool
    body: bytes

    @property
    def served(self) -> bool:
        """A 2xx whose body the client received in full: bytes it would use."""
        return 200 <= self.status < 300 and self.complete


async def get(http: aiohttp.ClientSession, url: str, **kw: Any) -> Outcome:
    """GET, reading the whole body; a transfer the proxy aborts is ``complete=False``, not a raise."""
    async with asyncio.timeout(30):
        async with http.get(url, **kw) as resp:
            try:
                body = await resp.read()
            except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, ConnectionError):
                return Outcome(resp.status, False, b"")
            return Outcome(resp.status, True, body)


def json_error(outcome: Outcome) -> dict[str, Any]:
    """The proxy's documented error body (a JSON object naming a code), or an assertion."""
    doc = json.loads(outcome.body)
    assert isinstance(doc, dict) and isinstance(doc.get("error"), str), outcome.body[:200]
    assert "Traceback" not in outcome.body.decode("utf-8", "replace")
    return doc


def vm_kib(pid: int, field: str) -> int:
    """A ``VmHWM``/``VmRSS`` line of /proc/<pid>/status in KiB (sync: call through a thread)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def open_fds(pid: int) -> int:
    return sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())


def integrity(data_dir: Path) -> tuple[str, int]:
    """(``PRAGMA integrity_check``, asset rows whose blob is missing or not named by its bytes)."""
    with sqlite3.connect(data_dir / "index.sqlite3") as db:
        check = str(db.execute("PRAGMA integrity_check").fetchone()[0])
        digests = {str(r[0]) for r in db.execute("SELECT digest FROM assets")}
    bad = 0
    for digest in digests:
        path = data_dir / "blobs" / "sha256" / digest[:2] / digest
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            bad += 1
    return check, bad


def misnamed_blobs(data_dir: Path) -> int:
    """Blob files whose name is not the SHA-256 of their bytes (a partial file made reachable)."""
    return sum(1 for p in blob_files(data_dir) if hashlib.sha256(p.read_bytes()).hexdigest() != p.name)


@dataclass
class ProxyProcess:
    """The proxy as ``python -m proxy serve``: memory and descriptors are its own, not the test's."""

    url: str
    proc: asyncio.subprocess.Process
    data_dir: Path
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


Spawner = Callable[..., Awaitable[ProxyProcess]]


@pytest.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Spawner]:
    """Start proxy processes from a config body ([upstreams]/[[domains]]) plus [server] keys;
    every one is killed (by its pid) at the end of the test."""
    procs: list[asyncio.subprocess.Process] = []

    async def start(body: str, **server: str) -> ProxyProcess:
        port = _free_port()
        data_dir = tmp_path / f"data-{port}"
        log = tmp_path / f"proxy-{port}.log"
        settings = {"listen": f"127.0.0.1:{port}", "data_dir": str(data_dir), "auth": False, **server}
        lines = [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
        config = tmp_path / f"proxy-{port}.toml"
        text = "[server]\n" + "\n".join(lines) + "\n\n" + body
        await asyncio.to_thread(config.write_text, text, encoding="utf-8")
        with await asyncio.to_thread(log.open, "wb") as sink:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "proxy",
                "serve",
                "--config",
                str(config),
                "--log-level",
                "WARNING",
                stdout=asyncio.subprocess.DEVNULL,
                stderr=sink,
            )
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            for _ in range(300):
                if proc.returncode is not None:
                    text = await asyncio.to_thread(log.read_text)
                    raise AssertionError(f"proxy exited with {proc.returncode}: {text[-2000:]}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(url + "/-/readyz") as resp:
                        if resp.status == 200:
                            return ProxyProcess(url, proc, data_dir, log)
                await asyncio.sleep(0.05)
        raise AssertionError("proxy did not become ready")

    yield start
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def _upstream(name: str, fmt: str, url: str) -> str:
    return (
        f'[upstreams.{name}]\nformat = "{fmt}"\nurl = "{url}"\nretries = 0\n'
        'connect_timeout = "2s"\nread_timeout = "5s"\nmetadata_timeout = "10s"\nbreaker_threshold = 1000\n\n'
    )


def _repos(upstreams: list[str]) -> str:
    listed = ", ".join(f'"{u}"' for u in upstreams)
    return (
        '[[domains]]\nname = "default"\n\n'
        f'[[domains.repositories]]\nname = "public"\nupstreams = [{listed}]\n'
    )


def _resize(filename: str, size: int | None) -> Callable[[bytes], bytes]:
    """A PEP 691 page edit: declare ``size`` for ``filename`` (None: declare no size)."""

    def change(body: bytes) -> bytes:
        page = json.loads(body)
        for f in page["files"]:
            if f["filename"] == filename:
                if size is None:
                    f.pop("size", None)
                else:
                    f["size"] = size
        return json.dumps(page).encode()

    return change


def _mutated_json(change: Callable[[bytes], bytes]) -> Rule:
    """Relay with the JSON page edited (Content-Length recomputed)."""

    async def rule(ex: Exchange) -> bool:
        r = await ex.relay()
        body = change(r.body) if "json" in (r.header("Content-Type") or "") else r.body
        await ex.reply(r.status, r.without("content-length"), body)
        return True

    return rule


# ----------------------------------------------------------------------------- upstream payloads


async def test_oversized_and_inflating_upstream_bodies_are_cut_off_in_bounded_memory(
    faults: GroupLedger, spawn: Spawner, pypi: FakePyPI, dists: Dists, tmp_path: Path
) -> None:
    """An upstream declaring 2 GiB, one streaming without end, a 300 MiB packument (declared and
    chunked), and 1 GiB gzip bombs (a page, a packument, an asset) are each refused or aborted
    after at most the limit, nothing is committed, and the proxy's peak memory barely moves."""
    sent: Counter[str] = Counter()
    bomb = await asyncio.to_thread(gzip_bomb, GiB)
    tarball = tmp_path / "plain-1.0.0.tgz"
    await asyncio.to_thread(tarball.write_bytes, npm_tarball("plain", "1.0.0"))
    async with (
        FakeNpmRegistry() as npm_fake,
        HostileUpstream(pypi.origin) as hp,
    ):
        await npm_fake.add_version_async("plain", tarball, version="1.0.0")
        async with HostileUpstream(npm_fake.origin) as hn:
            body = _upstream("pypi", "pypi", hp.url("/simple/")) + _upstream("npm", "npm", hn.url("/"))
            proxy = await spawn(
                body + _repos(["pypi", "npm"]),
                max_metadata_size="4MiB",
                max_asset_size="4MiB",
                soft_deadline="10s",
            )
            base = f"{proxy.url}/default/pypi/public"
            npm_base = f"{proxy.url}/default/npm/public"
            async with aiohttp.ClientSession(auto_decompress=False) as http:
                # Warm up with honest traffic, then take the baseline peak.
                good = await get(http, f"{base}/files/beta/{dists.beta.name}")
                assert good.served and good.body == await asyncio.to_thread(dists.beta.read_bytes)
                assert (await get(http, f"{npm_base}/plain")).served
                baseline = await asyncio.to_thread(vm_kib, proxy.pid, "VmHWM")

                alpha, gamma, big = dists.alpha.name, dists.gamma_nometa.name, dists.big.name
                two_gib = 2 * GiB
                hp.rules["/simple/alpha/"] = _mutated_json(_resize(alpha, two_gib))
                hp.rules[f"/files/{alpha}"] = endless(declare_length=two_gib, cap=512 * MiB, sent=sent)
                # No size in the page and no Content-Length: only the limit can stop these.
                hp.rules["/simple/bigpkg/"] = _mutated_json(_resize(big, None))
                hp.rules[f"/files/{big}"] = endless(cap=512 * MiB, sent=sent)
                hp.rules["/simple/gamma/"] = _mutated_json(_resize(gamma, None))
                hp.rules[f"/files/{gamma}"] = endless(
                    headers=[("Content-Type", "application/zip"), ("Content-Encoding", "gzip")],
                    chunk=bomb,
                    cap=len(bomb),
                    sent=sent,
                )
                hp.rules["/simple/bombed/"] = answer(
                    200, bomb, [("Content-Type", JSON_SIMPLE), ("Content-Encoding", "gzip")]
                )
                npm_json = [("Content-Type", "application/json")]
                hn.rules["/huge-declared"] = endless(
                    headers=npm_json, declare_length=300 * MiB, chunk=b" " * (64 * KiB), sent=sent
                )
                hn.rules["/huge-chunked"] = endless(
                    headers=npm_json, chunk=b" " * (64 * KiB), cap=300 * MiB, sent=sent
                )
                hn.rules["/bombed"] = answer(200, bomb, [*npm_json, ("Content-Encoding", "gzip")])
                attacks = {
                    "declares 2 GiB": f"{base}/files/alpha/{alpha}",
                    "endless asset": f"{base}/files/bigpkg/{big}",
                    "gzip bomb asset": f"{base}/files/gamma/{gamma}",
                    "gzip bomb page": f"{base}/simple/bombed/",
                    "300 MiB packument": f"{npm_base}/huge-declared",
                    "endless packument": f"{npm_base}/huge-chunked",
                    "gzip bomb packument": f"{npm_base}/bombed",
                }
                faults.inject("oversized or inflating upstream body", len(attacks))
                outcomes: dict[str, Outcome] = {}
                for what, url in attacks.items():
                    started = time.monotonic()
                    outcomes[what] = await get(http, url, headers={"Accept": JSON_SIMPLE})
                    assert time.monotonic() - started < 20, f"{what}: took too long to refuse"
                served = [w for w, o in outcomes.items() if o.served]
                faults.zero("corrupt_served", len(served), f"2xx with the hostile body: {served}")
                for what in (
                    "gzip bomb page",
                    "300 MiB packument",
                    "endless packument",
                    "gzip bomb packument",
                ):
                    assert outcomes[what].status in {502, 503, 504}, (what, outcomes[what].status)
                    assert json_error(outcomes[what])["error"].startswith("upstream")
                # A document the proxy refused was never cached as "not found" either.
                assert all(o.status != 404 for o in outcomes.values()), outcomes
                over = {path: n for path, n in sent.items() if n > SENT_BOUND}
                assert not over, f"read past the limit: {over}"
                peak = await asyncio.to_thread(vm_kib, proxy.pid, "VmHWM")
                assert (peak - baseline) * KiB < MEMORY_BOUND, (
                    f"peak memory rose {(peak - baseline) // 1024} MiB"
                )
                # Still serving, and the honest file is intact.
                again = await get(http, f"{base}/files/beta/{dists.beta.name}")
                assert again.served and again.body == good.body
    rows = await asyncio.to_thread(
        index_rows,
        proxy.data_dir,
        "SELECT filename FROM assets WHERE filename IN (?,?,?)",
        (alpha, gamma, big),
    )
    check, bad = await asyncio.to_thread(integrity, proxy.data_dir)
    assert check == "ok"
    faults.zero("partial_commits", len(rows) + bad, f"rows for refused files: {rows}, bad rows: {bad}")
    for _ in range(50):
        if not await asyncio.to_thread(temp_files, proxy.data_dir):
            break
        await asyncio.sleep(0.1)
    assert await asyncio.to_thread(temp_files, proxy.data_dir) == []


# ----------------------------------------------------------------------------- header floods


async def raw_request(url: str, head: bytes, *, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send ``head`` on a fresh connection and read the status the server answers (0: it closed
    without one). The server may hang up mid-send: that is an answer too, not an error."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        async with asyncio.timeout(timeout):
            with contextlib.suppress(ConnectionError):
                writer.write(head)
                await writer.drain()
            try:
                answer_head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return 0, b""
            rest = await reader.read(64 * KiB)
            return int(answer_head.split(b" ", 2)[1]), answer_head + rest
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_header_floods_and_huge_queries_are_refused_not_crashing(
    faults: GroupLedger, proxy_factory: ProxyFactory, pypi: FakePyPI, dists: Dists
) -> None:
    """An upstream whose headers never end (many lines, or one endless line) is a quick 502 after
    a bounded read; a client's huge header, thousands of headers, a 64 KiB query string or a
    megabyte request line get a 4xx; through it all the proxy keeps serving correct bytes."""
    sent: Counter[str] = Counter()
    async with HostileUpstream(pypi.origin) as hostile:
        proxy = await proxy_factory(hostile.url("/simple/"), upstream_retries=0, soft_deadline="10s")
        hostile.rules["/simple/alpha/"] = header_flood(cap=256 * MiB, sent=sent)
        hostile.rules["/simple/gamma/"] = header_flood(line=b"", cap=256 * MiB, sent=sent)
        faults.inject("upstream header flood", 2)
        async with aiohttp.ClientSession(auto_decompress=False) as http:
            for project in ("alpha", "gamma"):
                started = time.monotonic()
                outcome = await get(http, proxy.simple() + f"{project}/", headers={"Accept": JSON_SIMPLE})
                assert time.monotonic() - started < 15
                assert outcome.status == 502, (project, outcome.status, outcome.body[:200])
                assert json_error(outcome)["error"] == "upstream_unavailable"
            # What left the sender is what loopback buffers took before the proxy hung up.
            assert max(sent.values()) < 16 * MiB, f"read an endless head for long: {dict(sent)}"

            origin = proxy.url
            page = "/default/pypi/public/simple/beta/"
            params = "&".join(f"p{i}=v" for i in range(4000))
            floods = {
                "one 64 KiB header": f"GET {page} HTTP/1.1\r\nHost: x\r\nX-Big: {'a' * 64 * KiB}\r\n\r\n",
                "10,000 headers": f"GET {page} HTTP/1.1\r\nHost: x\r\n"
                + "".join(f"X-H{i}: v\r\n" for i in range(10_000))
                + "\r\n",
                "64 KiB query": f"GET {page}?{'q=' + 'a' * 64 * KiB} HTTP/1.1\r\nHost: x\r\n\r\n",
                "4,000 query parameters": f"GET {page}?{params} HTTP/1.1\r\nHost: x\r\n\r\n",
                "1 MiB request line": f"GET /{'a' * MiB} HTTP/1.1\r\nHost: x\r\n\r\n",
                "1 MiB header name": f"GET {page} HTTP/1.1\r\nHost: x\r\n{'X' * MiB}: v\r\n\r\n",
            }
            faults.inject("client header or query flood", len(floods))
            statuses = {}
            for what, head in floods.items():
                status, answer_bytes = await raw_request(origin, head.encode())
                statuses[what] = status
                assert b"Traceback" not in answer_bytes
            assert all(400 <= s < 500 for s in statuses.values()), statuses
            good = await get(http, proxy.files("beta", dists.beta.name))
            assert good.served and good.body == await asyncio.to_thread(dists.beta.read_bytes)
            served_flooded = sum(1 for s in statuses.values() if 200 <= s < 300)
            faults.zero("corrupt_served", served_flooded, f"a flooded request was served: {statuses}")
    cached = " UNION ALL ".join(
        f"SELECT doc_key FROM {table} WHERE doc_key LIKE '%alpha%' OR doc_key LIKE '%gamma%'"
        for table in ("documents", "negative_cache")
    )
    rows = await asyncio.to_thread(index_rows, proxy.data_dir, cached)
    faults.zero("wrong_404", len(rows), f"a flooded answer was cached (as a page or a not-found): {rows}")


# ----------------------------------------------------------------------------- slowloris

SLOW_CLIENTS = 1000
CLIENT_TIMEOUT = 2.0


async def test_a_thousand_slowloris_clients_neither_starve_others_nor_stay(
    faults: GroupLedger, spawn: Spawner, pypi: FakePyPI, dists: Dists
) -> None:
    """1,000 connections — nine in ten send a request head a line at a time, never finishing it,
    one in ten sends a publish's head and the start of its body, then falls silent: normal
    requests are answered meanwhile within a bounded latency; the proxy closes every slow head
    within ``client_timeout`` and answers every stalled body with a 408 within twice that (plus
    scheduling slack), keeping no descriptor and no staging file."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4 * SLOW_CLIENTS:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8 * SLOW_CLIENTS), hard))
    proxy = await spawn(_upstream("pypi", "pypi", pypi.url) + _repos(["pypi"]), client_timeout="2s")
    host, port = proxy.url.removeprefix("http://").split(":")
    page = "/default/pypi/public/simple/beta/"
    wheel = f"{proxy.url}/default/pypi/public/files/beta/{dists.beta.name}"
    expected = await asyncio.to_thread(dists.beta.read_bytes)
    async with aiohttp.ClientSession(auto_decompress=False) as http:
        assert (await get(http, wheel)).body == expected
    fds_before = await asyncio.to_thread(open_fds, proxy.pid)

    closed_after: list[float] = []
    answered: Counter[bytes] = Counter()  # the status lines that stalled bodies got
    stop = asyncio.Event()
    boundary = "slowloris"
    stalled_bodies = (  # (head, the start of a body that never ends), one per publishing format
        (
            "POST /default/pypi/public/ HTTP/1.1\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: 100000\r\n",
            f'--{boundary}\r\nContent-Disposition: form-data; name=":action"\r\n\r\nfile_upload\r\n',
        ),
        (
            "PUT /default/npm/public/slow-pkg HTTP/1.1\r\n"
            "Content-Type: application/json\r\nContent-Length: 100000\r\n",
            '{"name": "slow-pkg", "versions": {',
        ),
        (
            "PUT /default/maven/public/org/slow/lib/1.0/lib-1.0.jar HTTP/1.1\r\nContent-Length: 100000\r\n",
            "PK\x03\x04",
        ),
    )

    async def connect(n: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, float]:
        """Open connection ``n`` and send its first bytes at once (an idle one may be dropped
        before it says anything, which would test something else)."""
        reader, writer = await asyncio.open_connection(host, int(port))
        if n % 10 == 9:
            head, start = stalled_bodies[n % 3]
            writer.write(f"{head}Host: {host}\r\n\r\n{start}".encode())
        else:
            writer.write(f"GET {page} HTTP/1.1\r\nHost: {host}\r\n".encode())
        return reader, writer, time.monotonic()

    async def slow_client(
        n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, opened: float
    ) -> None:
        body = n % 10 == 9

        async def trickle() -> None:
            with contextlib.suppress(ConnectionError):
                for i in range(1000):
                    await asyncio.sleep(0.5)
                    writer.write(f"X-Slow-{i}: a\r\n".encode())
                    await writer.drain()

        dripping = asyncio.create_task(asyncio.sleep(0) if body else trickle())
        try:
            reading = asyncio.ensure_future(reader.read(12))
            waiting = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({reading, waiting}, return_when=asyncio.FIRST_COMPLETED)
            if reading in done and not reading.cancelled():
                with contextlib.suppress(ConnectionError):
                    first = reading.result()  # b"" (EOF) or an error status: the proxy ended it
                    if body:
                        answered[first] += 1
                closed_after.append(time.monotonic() - opened)
            for task in (reading, waiting):
                task.cancel()
        finally:
            dripping.cancel()
            writer.close()

    connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
    for start in range(0, SLOW_CLIENTS, 100):
        connections.extend(await asyncio.gather(*(connect(n) for n in range(start, start + 100))))
    faults.inject("slowloris connection", SLOW_CLIENTS)
    slow = [asyncio.create_task(slow_client(n, *c)) for n, c in enumerate(connections)]
    try:
        latencies: list[float] = []
        async with aiohttp.ClientSession(auto_decompress=False) as http:
            for i in range(20):
                started = time.monotonic()
                target = wheel if i % 2 else f"{proxy.url}{page}"
                outcome = await get(http, target, headers={"Accept": JSON_SIMPLE})
                latencies.append(time.monotonic() - started)
                assert outcome.served, outcome.status
                if target == wheel:
                    assert outcome.body == expected
                await asyncio.sleep(0.05)
        assert max(latencies) < 2.0, f"normal requests starved: {max(latencies):.2f}s"
        bound = 2 * CLIENT_TIMEOUT + 8
        deadline = time.monotonic() + bound
        while len(closed_after) < SLOW_CLIENTS and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        stayed = SLOW_CLIENTS - len(closed_after)
        assert stayed == 0, f"{stayed} slowloris connections still open after {bound}s"
        assert max(closed_after) < bound
        assert answered == {b"HTTP/1.1 408": SLOW_CLIENTS // 10}, answered
    finally:
        stop.set()
        await asyncio.gather(*slow, return_exceptions=True)
    fds_after = await asyncio.to_thread(open_fds, proxy.pid)
    assert fds_after < fds_before + 20, f"descriptors held: {fds_before} -> {fds_after}"
    assert await asyncio.to_thread(temp_files, proxy.data_dir) == []


# ----------------------------------------------------------------------------- full disk


async def _run(*cmd: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace")


@pytest.fixture
async def small_disk(tmp_path: Path) -> AsyncIterator[Path]:
    """A 24 MiB tmpfs to use as a data directory (root only; skipped where mounting is refused)."""
    mount = tmp_path / "small-disk"
    await asyncio.to_thread(mount.mkdir)
    code, out = await _run("mount", "-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs", str(mount))
    if code != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root / CAP_SYS_ADMIN): {out.strip()}")
    try:
        yield mount
    finally:
        code, out = await _run("umount", str(mount))
        if code != 0:  # something still holds a file open: detach it now, freed when released
            await _run("umount", "-l", str(mount))


def fill_disk(path: Path) -> int:
    """Write ``path`` until the file system refuses (ENOSPC), down to 4 KiB pieces; the bytes."""
    written = 0
    with path.open("wb", buffering=0) as f:
        for size in (MiB, 64 * KiB, 4 * KiB):
            piece = b"\xa5" * size
            while True:
                try:
                    written += f.write(piece)
                except OSError as exc:
                    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    break
    return written


async def publish(http: aiohttp.ClientSession, url: str, wheel: Path) -> Outcome:
    data = await asyncio.to_thread(wheel.read_bytes)
    name, version = wheel.name.split("-")[:2]
    async with asyncio.timeout(30):
        async with http.post(url, data=upload_form(wheel, data, name=name, version=version)) as resp:
            return Outcome(resp.status, True, await resp.read())


async def test_a_full_disk_gives_clear_errors_commits_nothing_and_recovers(
    faults: GroupLedger,
    small_disk: Path,
    proxy_factory: ProxyFactory,
    pypi: FakePyPI,
    dists: Dists,
    tmp_path: Path,
) -> None:
    """With the data directory's file system full, a cache fill and a publish fail with a JSON
    5xx (no traceback, no 2xx), nothing partial becomes reachable, the index stays sound, cached
    and published files are still served intact; once space returns the same requests succeed."""
    before = await asyncio.to_thread(build_wheel, tmp_path / "w", "hosted-before", "1.0")
    during = await asyncio.to_thread(build_wheel, tmp_path / "w", "hosted-during", "1.0")
    proxy = await proxy_factory(pypi.url, data_dir=small_disk)
    try:
        async with aiohttp.ClientSession(auto_decompress=False) as http:
            beta = await asyncio.to_thread(dists.beta.read_bytes)
            hit = await get(http, proxy.files("beta", dists.beta.name))
            assert hit.served and hit.body == beta
            assert (await publish(http, proxy.upload_url(), before)).status == 201
            hosted_url = proxy.files("hosted-before", before.name)
            # alpha's page is cached, so its file's cache fill gets as far as writing the blob.
            assert (await get(http, proxy.simple() + "alpha/", headers={"Accept": JSON_SIMPLE})).served
            hosted = await asyncio.to_thread(before.read_bytes)

            filler = small_disk / "filler"
            assert await asyncio.to_thread(fill_disk, filler) > 0
            faults.inject("file system full (ENOSPC)")
            fill = await get(http, proxy.files("alpha", dists.alpha.name))
            pub = await publish(http, proxy.upload_url(), during)
            page = await get(http, proxy.simple() + "gamma/", headers={"Accept": JSON_SIMPLE})
            # The fill's head went out when the upstream answered (files stream as they arrive):
            # on a full disk it is a 507, or a 200 broken off before its end; never a whole 2xx.
            assert not fill.served, "a cache fill was served whole on a full disk"
            for what, outcome in {"cache fill": fill, "publish": pub, "cold page": page}.items():
                if outcome.complete and not outcome.served:
                    assert outcome.status == 507, (what, outcome.status, outcome.body[:300])
                    assert json_error(outcome)["error"] == "insufficient_storage"
            assert pub.status == 507, "a publish on a full disk must say why it failed"
            # A cold page either fits (the index may still have room) or fails: never a 404.
            faults.zero("wrong_404", int(page.status == 404), "a full disk reported as not found")
            # What was there is still served intact.
            corrupt = 0
            for url, expected in ((proxy.files("beta", dists.beta.name), beta), (hosted_url, hosted)):
                again = await get(http, url)
                corrupt += int(again.served and again.body != expected)
                assert again.served, (url, again.status, again.body[:300])
            faults.zero("corrupt_served", corrupt, "a cached or published file changed on a full disk")

            committed = await asyncio.to_thread(
                index_rows,
                proxy.data_dir,
                "SELECT filename FROM assets WHERE filename IN (?, ?)",
                (dists.alpha.name, during.name),
            )
            check, bad = await asyncio.to_thread(integrity, proxy.data_dir)
            misnamed = await asyncio.to_thread(misnamed_blobs, proxy.data_dir)
            assert check == "ok", check
            faults.zero(
                "partial_commits",
                len(committed) + bad + misnamed,
                f"rows {committed}, rows without a whole blob {bad}, misnamed blobs {misnamed}",
            )
            assert await asyncio.to_thread(temp_files, proxy.data_dir) == []

            # Space returns: the same requests succeed, with the right bytes.
            await asyncio.to_thread(filler.unlink)
            fill = await get(http, proxy.files("alpha", dists.alpha.name))
            assert fill.served, (fill.status, fill.body[:300])
            assert fill.body == await asyncio.to_thread(dists.alpha.read_bytes)
            pub = await publish(http, proxy.upload_url(), during)
            assert pub.status == 201, (pub.status, pub.body[:300])
            back = await get(http, proxy.files("hosted-during", during.name))
            acked_missing = int(not (back.served and back.body == await asyncio.to_thread(during.read_bytes)))
            faults.zero("writes_lost", acked_missing, "a publish acknowledged after recovery is not served")
            page = await get(http, proxy.simple() + "gamma/", headers={"Accept": JSON_SIMPLE})
            assert page.served, page.status
            check, bad = await asyncio.to_thread(integrity, proxy.data_dir)
            assert check == "ok" and bad == 0
    finally:
        await proxy.stop()


# ----------------------------------------------------------------------------- concurrency

CLIENTS = 64
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def npm_tarball(name: str, version: str) -> bytes:
    """A minimal npm package tarball (``package/package.json``), built in memory."""
    manifest = json.dumps({"name": name, "version": version, "main": "index.js"}).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for member, data in (
            ("package/package.json", manifest),
            ("package/index.js", b"module.exports=1;\n"),
        ):
            info = tarfile.TarInfo(member)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def other_writer(data_dir: Path, stop: threading.Event) -> int:
    """Another connection committing small write transactions until ``stop`` (what a second
    worker or a CLI command does to the index a serving proxy uses); the number of commits."""
    commits = 0
    db = sqlite3.connect(data_dir / "index.sqlite3", timeout=5.0, isolation_level=None)
    try:
        while not stop.is_set():
            db.execute("BEGIN IMMEDIATE")
            db.execute("UPDATE assets SET last_accessed = last_accessed")
            time.sleep(0.003)  # hold the write lock a moment, as a real transaction would
            db.execute("COMMIT")
            commits += 1
            time.sleep(0.01)
    finally:
        db.close()
    return commits


@dataclass
class Seen:
    """Every answer the mixed clients got: (what, status, body excerpt)."""

    answers: list[tuple[str, int, bytes]]

    def add(self, what: str, status: int, body: bytes) -> None:
        self.answers.append((what, status, body[:500]))

    def locked(self) -> list[tuple[str, int, bytes]]:
        return [a for a in self.answers if b"is locked" in a[2].lower() or a[1] >= 500]


async def test_sixty_four_concurrent_mixed_clients_never_see_database_is_locked(
    faults: GroupLedger, proxy_factory: ProxyFactory, pypi: FakePyPI, dists: Dists, tmp_path: Path
) -> None:
    """64 clients at once — hits, misses, pages, publishes of all four formats, read-backs and
    admin listings — while CLI commands write to the same index: no answer says 'database is
    locked' or is a 5xx, every acknowledged publish reads back, and the index stays sound."""
    proxy = await proxy_factory(pypi.url)
    cli_config = tmp_path / "cli.toml"
    await asyncio.to_thread(write_config_file, cli_config, proxy.data_dir, pypi.url)
    root = proxy.url + "/default"
    admin = proxy.url + "/-/api/v1/domains/default/repositories"
    wheels = await asyncio.gather(
        *(asyncio.to_thread(build_wheel, tmp_path / "w", f"mixed-{i}", "1.0") for i in range(2, CLIENTS, 8))
    )
    nupkgs = await asyncio.gather(
        *(
            asyncio.to_thread(build_nupkg, tmp_path / "n", f"Mixed.Pkg{i}", "1.0.0")
            for i in range(5, CLIENTS, 8)
        )
    )
    seen = Seen([])
    acked: list[tuple[str, bytes]] = []  # (read-back URL, bytes) of every acknowledged publish
    async with aiohttp.ClientSession(auto_decompress=False) as http:
        beta = await asyncio.to_thread(dists.beta.read_bytes)
        assert (await get(http, proxy.files("beta", dists.beta.name))).body == beta  # a hit from now on

        async def call(what: str, method: str, url: str, **kw: Any) -> tuple[int, bytes]:
            async with asyncio.timeout(60):
                async with http.request(method, url, **kw) as resp:
                    try:
                        body = await resp.read()
                    except aiohttp.ClientPayloadError:
                        body = b"<transfer broken off>"
                    seen.add(what, resp.status, body)
                    return resp.status, body

        clis_done = asyncio.Event()

        async def client(i: int) -> None:
            """Its mix once, then reads (hits, pages, listings, read-backs) until the CLI writers
            are done, so the two kinds of writers really overlap (bounded by a deadline)."""
            await one_round(i, i % 8, 0)
            deadline = time.monotonic() + 20
            rounds = 0
            while not clis_done.is_set() and time.monotonic() < deadline:
                rounds += 1
                # npm and Maven publishers publish a new version each round; the rest read.
                await one_round(i, i % 8 if i % 8 in (3, 4) else (0, 1, 6, 7)[i % 4], rounds)
                for url, data in acked[i % 8 :: 8][:2]:
                    status, body = await call("read-back", "GET", url)
                    assert status == 200 and body == data

        async def one_round(i: int, kind: int, rounds: int) -> None:
            if kind == 0:  # hits
                for _ in range(3):
                    status, body = await call("hit", "GET", proxy.files("beta", dists.beta.name))
                    assert status == 200 and body == beta
            elif kind == 1:  # misses, shared with other clients (single-flight)
                for project, path in (("alpha", dists.alpha), ("gamma", dists.gamma_nometa)):
                    status, body = await call("miss", "GET", proxy.files(project, path.name))
                    assert status == 200 and body == await asyncio.to_thread(path.read_bytes)
            elif kind == 2:  # PyPI publish and read back
                wheel = wheels[i // 8]
                data = await asyncio.to_thread(wheel.read_bytes)
                name = f"mixed-{i}"
                form = upload_form(wheel, data, name=name, version="1.0")
                status, _ = await call("pypi publish", "POST", proxy.upload_url(), data=form)
                if status == 201:
                    acked.append((proxy.files(name, wheel.name), data))
            elif kind == 3:  # npm publish
                name, version = f"mixed-npm-{i}", f"1.0.{rounds}"
                data = await asyncio.to_thread(npm_tarball, name, version)
                doc = npm_publish_doc(name, version, data)
                status, _ = await call("npm publish", "PUT", f"{root}/npm/public/{name}", json=doc)
                if status == 201:
                    acked.append((f"{root}/npm/public/{name}/-/{name}-{version}.tgz", data))
            elif kind == 4:  # Maven deploy
                version = f"1.{rounds}"
                base = f"{root}/maven/public/org/mixed/lib{i}/{version}/lib{i}-{version}"
                jar = build_jar({f"org/mixed/Lib{i}.class": bytes([i, rounds % 256]) * 64})
                pom = (
                    "<project><modelVersion>4.0.0</modelVersion><groupId>org.mixed</groupId>"
                    f"<artifactId>lib{i}</artifactId><version>{version}</version></project>"
                ).encode()
                for suffix, data in ((".pom", pom), (".jar", jar)):
                    status, _ = await call("maven deploy", "PUT", base + suffix, data=data)
                    if status == 201:
                        acked.append((base + suffix, data))
            elif kind == 5:  # NuGet push
                nupkg = nupkgs[i // 8]
                data = await asyncio.to_thread(nupkg.read_bytes)
                form = aiohttp.FormData()
                form.add_field(
                    "package", data, filename="package.nupkg", content_type="application/octet-stream"
                )
                status, _ = await call("nuget push", "PUT", f"{root}/nuget/public/api/v2/package", data=form)
                if status == 201:
                    low = f"mixed.pkg{i}"
                    acked.append(
                        (f"{root}/nuget/public/v3-flatcontainer/{low}/1.0.0/{low}.1.0.0.nupkg", data)
                    )
            elif kind == 6:  # admin listings
                for url in (admin, f"{admin}/public/packages", f"{admin}/public/packages/pypi/beta"):
                    status, _ = await call("admin", "GET", url)
                    assert status == 200, url
            else:  # pages: cached and cold, both JSON and HTML
                for project in ("beta", "alpha", "gamma", "bigpkg"):
                    status, _ = await call(
                        "page", "GET", proxy.simple() + f"{project}/", headers={"Accept": JSON_SIMPLE}
                    )
                    assert status == 200

        async def cli(n: int) -> tuple[int, str]:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "proxy",
                "repo",
                "create",
                "--config",
                str(cli_config),
                "--domain",
                "default",
                "--name",
                f"cli-{n}",
                "--upstream",
                "public",
                cwd=PROJECT_ROOT,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            out, _ = await proc.communicate()
            return proc.returncode or 0, out.decode(errors="replace")

        faults.inject("concurrent mixed client", CLIENTS)
        faults.inject("concurrent CLI writer", 3)
        faults.inject("concurrent writer process", 1)

        async def clis() -> list[tuple[int, str]]:
            try:
                return await asyncio.gather(*(cli(n) for n in range(3)))
            finally:
                clis_done.set()

        stop_writer = threading.Event()
        writer = asyncio.ensure_future(asyncio.to_thread(other_writer, proxy.data_dir, stop_writer))
        cli_task = asyncio.ensure_future(clis())
        try:
            results = await asyncio.gather(*(client(i) for i in range(CLIENTS)), return_exceptions=True)
            cli_runs = await cli_task
        finally:
            stop_writer.set()
        commits = await writer
        assert commits > 0
        errors = [r for r in results if isinstance(r, BaseException)]
        bad = seen.locked()
        assert not bad, f"{len(bad)} answers said 'locked' or were 5xx: {bad[:5]}"
        assert not errors, errors[:5]
        assert all(code == 0 and "is locked" not in out for code, out in cli_runs), cli_runs
        publishes = [a for a in seen.answers if "publish" in a[0] or "deploy" in a[0] or "push" in a[0]]
        assert all(a[1] == 201 for a in publishes), [a for a in publishes if a[1] != 201][:5]
        lost = 0
        for url, data in acked:
            back = await get(http, url)
            lost += int(not (back.served and back.body == data))
        faults.zero("writes_lost", lost, f"of {len(acked)} acknowledged publishes")
    check, bad_rows = await asyncio.to_thread(integrity, proxy.data_dir)
    assert check == "ok", check
    faults.zero("partial_commits", bad_rows, "asset rows without their whole blob")
