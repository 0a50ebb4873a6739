"""Crash consistency (DESIGN.md invariant 6): SIGKILL anywhere, restart, nothing wrong is left.

The proxy runs as a real process (tests/faults/crashkit.py) and is killed in the middle of a cache
fill, a publish, a metadata rewrite and a gc: by the test once a client has moved a chosen number
of bytes, and by ``strace -e inject=…:signal=KILL`` on entry to a chosen system call (the staging
fsync, the commit rename, the blob directory's fsync, a write or the sync of the index's WAL, a
blob unlink). After every kill the proxy starts again on the same data directory and must have
repaired it by itself: ``PRAGMA integrity_check`` is ok, every asset row names a blob file whose
bytes hash to its name and have its size, no blob file is misnamed, no temp or page file is left,
every publish acknowledged with a 2xx is still served with its bytes, and what the killed request
wanted is served whole.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from tests.clients import twine_upload
from tests.fakes.dists import build_wheel, sha256_file
from tests.fakes.pypi import FakePyPI
from tests.fakes.server import Fault
from tests.faults.crashkit import (
    BOUNDARY,
    Inject,
    Kill,
    ProxyProcess,
    fetch,
    listed_files,
    multipart_upload,
    npm_tarball,
    require_strace,
    run_traced,
    scan,
    sha,
)
from tests.faults.report import GroupLedger
from tests.npm_clients import npm_publish_doc

GROUP = "3 crash consistency"

JSON = {"Accept": "application/vnd.pypi.simple.v1+json", "Accept-Encoding": "identity"}
RENAME = "?rename,?renameat,?renameat2"
UNLINK = "?unlink,?unlinkat"
SYNC = "fdatasync,fsync"  # SQLite syncs its WAL with fdatasync where it has it, else fsync
WAL = "index.sqlite3-wal>"  # how strace -y names a call on the WAL's descriptor


@dataclass
class Lab:
    """A fake PyPI, one proxy process over one data directory, and what it has promised."""

    root: Path
    pypi: FakePyPI
    proxy: ProxyProcess
    http: aiohttp.ClientSession
    acked: dict[str, str] = field(default_factory=dict)  # URL → sha256 of a publish answered 2xx
    cached: dict[str, str] = field(default_factory=dict)  # URL → sha256 of an upstream file asked for

    async def wheel(self, project: str, version: str, payload: int = 0, *, upstream: bool = True) -> Path:
        """A real wheel; served by the fake upstream unless it is one to publish."""
        dest = self.root / "dists"
        path = await asyncio.to_thread(build_wheel, dest, project, version, payload_size=payload)
        if upstream:
            await self.pypi.add_file_async(project, path)
        return path

    async def after_kill(self, faults: GroupLedger, what: str) -> None:
        """Restart on the same data directory and check every crash promise."""
        await self.proxy.start()
        found = await asyncio.to_thread(scan, self.proxy.data_dir)
        broken = found.bad_rows + found.bad_blobs + found.leftovers
        if found.integrity != "ok":
            broken.append(f"integrity_check: {found.integrity}")
        faults.zero("partial_commits", len(broken), f"after {what}: {broken}")
        lost = []
        for url, digest in self.acked.items():
            status, body = await fetch(self.http, url)
            if status != 200 or sha(body) != digest:
                lost.append(f"{url} -> {status}")
        faults.zero("writes_lost", len(lost), f"after {what}: {lost}")
        corrupt = []
        for url, digest in self.cached.items():
            status, body = await fetch(self.http, url)
            assert status == 200, f"after {what}: {url} answered {status}"
            if sha(body) != digest:
                corrupt.append(url)
        faults.zero("corrupt_served", len(corrupt), f"after {what}: {corrupt}")

    async def publish(self, url: str, body: bytes, content_type: str, method: str = "POST") -> int:
        headers = {"Content-Type": content_type}
        async with self.http.request(method, url, data=io.BytesIO(body), headers=headers) as resp:
            await resp.read()
            return resp.status


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    async with FakePyPI() as pypi, aiohttp.ClientSession(auto_decompress=False) as http:
        proxy = ProxyProcess(tmp_path, pypi.url)
        try:
            yield Lab(tmp_path, pypi, proxy, http)
        finally:
            await proxy.stop()


async def _sigkill_happened(lab: Lab, what: str) -> None:
    """The injected kill must have hit: a boundary never reached would prove nothing."""
    assert await lab.proxy.died_of_sigkill(timeout=10), f"{what}: the proxy was not killed"


def _landed(kill: Kill, fragment: str, what: str) -> None:
    """...and on the call the test meant (strace's log names the file of the killed call)."""
    assert kill.landed_on(fragment), f"{what}: killed in {kill.calls!r}, expected a call on {fragment!r}"


# --- kills at byte offsets --------------------------------------------------------------------


async def test_sigkill_at_byte_offsets_of_a_cache_fill(lab: Lab, faults: GroupLedger) -> None:
    """Killed while a client is being streamed a cold file: at its headers, one chunk, half,
    all but the last byte (held back until the commit, so that kill comes after it)."""
    size = 2 * 2**20
    offsets = {"headers only": 0, "one chunk": 128 * 1024, "half": size // 2, "all but the last byte": -1}
    wheels = [await lab.wheel("fillpkg", f"1.{i}", payload=size) for i in range(len(offsets))]
    for whl in wheels:  # slow, so that the kill lands inside the transfer
        lab.pypi.faults[f"/files/{whl.name}"] = Fault("slow", chunk=128 * 1024, delay=0.02, times=1)
    await lab.proxy.start()
    for (label, offset), whl in zip(offsets.items(), wheels, strict=True):
        url = lab.proxy.files_url("fillpkg", whl.name)
        expected = await asyncio.to_thread(sha256_file, whl)
        length = (await asyncio.to_thread(whl.stat)).st_size
        whole_but_wrong = 0
        try:
            async with lab.http.get(url) as resp:
                assert resp.status == 200
                head = await asyncio.wait_for(resp.content.readexactly(offset % length), 30)
                await lab.proxy.kill()
                faults.inject("sigkill: cache fill at a client byte offset")
                body = head + await resp.read()
            # The transfer ended without an error, so it must be the whole file.
            whole_but_wrong += sha(body) != expected
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
            pass  # cut off visibly: what a killed transfer should look like
        faults.zero("corrupt_served", whole_but_wrong, f"kill at {label}")
        lab.cached[url] = expected
        await lab.after_kill(faults, f"cache fill killed at {label}")
    assert lab.pypi.hits[f"/files/{wheels[0].name}"] == 2, lab.pypi.hits  # never committed, fetched again


async def test_sigkill_at_byte_offsets_of_a_publish_upload(lab: Lab, faults: GroupLedger) -> None:
    """Killed while a twine-style upload arrives: nothing of a partial upload may appear, a
    retry must then succeed, and what was acknowledged before must survive every kill."""
    await lab.proxy.start()
    upload_url = f"{lab.proxy.url}/default/pypi/team/"
    ctype = f"multipart/form-data; boundary={BOUNDARY}"
    first = await lab.wheel("pubpkg", "0.9", upstream=False)  # published (and acknowledged) before any kill
    data = await asyncio.to_thread(first.read_bytes)
    assert await lab.publish(upload_url, multipart_upload(first, data, "pubpkg", "0.9"), ctype) == 201
    lab.acked[lab.proxy.files_url("pubpkg", first.name, repo="team")] = sha(data)

    cuts: list[tuple[str, Callable[[int], int]]] = [
        ("headers only", lambda n: 0),
        ("half the file", lambda n: n // 2),
        ("all but one byte", lambda n: n - 1),
        ("everything, then at once", lambda n: n),
    ]
    for i, (label, cut) in enumerate(cuts):
        whl = await lab.wheel("pubpkg", f"1.{i}", payload=2**20, upstream=False)
        data = await asyncio.to_thread(whl.read_bytes)
        body = multipart_upload(whl, data, "pubpkg", f"1.{i}")
        offset = cut(len(body))
        status = await _upload_cut_at(lab, upload_url, body, ctype, offset)
        faults.inject("sigkill: publish at an upload byte offset")
        file_url = lab.proxy.files_url("pubpkg", whl.name, repo="team")
        if status is not None and 200 <= status < 300:
            lab.acked[file_url] = sha(data)
        await lab.after_kill(faults, f"publish killed at {label}")
        served, got = await fetch(lab.http, file_url)
        # An upload the proxy did not get whole never appears; one it got may, with its bytes.
        partial = served == 200 and (sha(got) != sha(data) or offset < len(body) - len(BOUNDARY) - 8)
        faults.zero("partial_commits", int(partial), f"upload cut at {label} is served ({served})")
        again = await lab.publish(upload_url, body, ctype)
        # Retrying an unacknowledged upload works, unless it had been committed whole (then 409).
        assert again == 201 or (again == 409 and served == 200), f"retry after {label}: {again}"
        lab.acked[file_url] = sha(data)
    await lab.proxy.kill()  # a last kill right after acknowledged writes: all must be durable
    faults.inject("sigkill: right after acknowledged publishes")
    await lab.after_kill(faults, "kill after acknowledged publishes")
    assert len(lab.acked) == 1 + len(cuts)


async def _upload_cut_at(lab: Lab, url: str, body: bytes, ctype: str, offset: int) -> int | None:
    """Send ``body`` up to ``offset``, SIGKILL the proxy, send the rest; the status, if any came."""
    sent, resume = asyncio.Event(), asyncio.Event()

    async def chunks() -> AsyncIterator[bytes]:
        if offset:
            yield body[:offset]
        sent.set()
        await resume.wait()
        if offset < len(body):
            yield body[offset:]

    async def send() -> int:
        headers = {"Content-Type": ctype, "Content-Length": str(len(body))}
        async with lab.http.post(url, data=chunks(), headers=headers) as resp:
            await resp.read()
            return resp.status

    task = asyncio.create_task(send())
    await asyncio.wait_for(sent.wait(), 30)
    if offset < len(body):
        await asyncio.sleep(0.2)  # let the proxy take in what was sent
    await lab.proxy.kill()
    resume.set()
    try:
        return await asyncio.wait_for(task, 30)
    except (aiohttp.ClientError, ConnectionError):
        return None


# --- kills at system-call boundaries (strace) -------------------------------------------------


async def test_twine_upload_killed_at_its_commit_rename_then_retried(lab: Lab, faults: GroupLedger) -> None:
    """The real client: killed at the rename that would make its upload visible, then retried."""
    await require_strace()
    await lab.proxy.start()
    whl = await lab.wheel("twinepkg", "1.0", payload=2**20, upstream=False)
    repo_url = f"{lab.proxy.url}/default/pypi/team/"
    file_url = lab.proxy.files_url("twinepkg", whl.name, repo="team")
    blob = lab.proxy.blob_path(await asyncio.to_thread(sha256_file, whl))
    async with lab.proxy.traced(Inject(RENAME)) as kill:
        run = await twine_upload(repo_url, whl)
        await _sigkill_happened(lab, "twine upload, rename into the blob store")
    _landed(kill, str(blob), "twine upload")
    faults.inject("sigkill: twine upload at the commit rename")
    assert not run.ok, run.output  # no acknowledgement was given
    await lab.after_kill(faults, "twine upload killed at its rename")
    status, _ = await fetch(lab.http, file_url)
    faults.zero(
        "partial_commits", int(status != 404), f"an upload killed before its commit is served ({status})"
    )
    run = await twine_upload(repo_url, whl)
    assert run.ok, run.output
    lab.acked[file_url] = await asyncio.to_thread(sha256_file, whl)
    await lab.proxy.kill()
    faults.inject("sigkill: right after twine's acknowledged upload")
    await lab.after_kill(faults, "kill after twine's upload")


async def test_syscall_boundary_kills_during_cache_fills(lab: Lab, faults: GroupLedger) -> None:
    """Each step of write, verify, commit (DESIGN.md invariant 2) as the instant of the crash."""
    await require_strace()
    # (label, where strace kills, a fragment of the killed call) given the blob's path
    boundaries: list[tuple[str, Callable[[Path], Inject], Callable[[Path], str]]] = [
        ("staging fsync", lambda b: Inject("fsync"), lambda b: ".part>"),
        ("commit rename", lambda b: Inject(RENAME), str),
        (
            "blob directory fsync after the rename",
            lambda b: Inject("fsync", path=b.parent),
            lambda b: f"{b.parent}>",
        ),
        ("WAL sync of the asset row's commit", lambda b: Inject(SYNC, 1, lab.proxy.wal), lambda b: WAL),
    ]
    wheels = [await lab.wheel("sysfill", f"1.{i}", payload=64 * 1024) for i in range(len(boundaries))]
    await lab.proxy.start()
    status, _ = await fetch(lab.http, f"{lab.proxy.url}/default/pypi/public/simple/sysfill/")
    assert status == 200  # the page is cached now: the fills below write only their own rows
    for (label, inject_at, fragment), whl in zip(boundaries, wheels, strict=True):
        digest = await asyncio.to_thread(sha256_file, whl)
        blob = lab.proxy.blob_path(digest)
        url = lab.proxy.files_url("sysfill", whl.name)
        whole_but_wrong = 0
        async with lab.proxy.traced(inject_at(blob)) as kill:
            try:
                status, body = await fetch(lab.http, url)
                whole_but_wrong += status == 200 and sha(body) != digest
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
                pass
            await _sigkill_happened(lab, f"cache fill at {label}")
        _landed(kill, fragment(blob), f"cache fill at {label}")
        faults.inject("sigkill: cache fill at a system call")
        faults.zero("corrupt_served", whole_but_wrong, f"fill killed at {label}")
        lab.cached[url] = digest
        await lab.after_kill(faults, f"cache fill killed at {label}")


async def test_syscall_boundary_kills_during_npm_publishes(lab: Lab, faults: GroupLedger) -> None:
    """An npm publish killed before its 201 can be sent: absent or whole, never half; a republish
    works, and every acknowledged one is still there after a last kill."""
    await require_strace()
    boundaries = [
        ("staging fsync of the tarball", Inject("fsync"), ".part>"),
        ("commit rename of the tarball", Inject(RENAME), "/blobs/sha256/"),
        ("WAL page of the publish transaction", Inject("pwrite64", 2, lab.proxy.wal), WAL),
        ("WAL sync of the publish commit", Inject(SYNC, 1, lab.proxy.wal), WAL),
    ]
    await lab.proxy.start()
    registry = f"{lab.proxy.url}/default/npm/team/"
    for i, (label, inject, fragment) in enumerate(boundaries):
        version = f"1.0.{i}"
        data = await asyncio.to_thread(npm_tarball, "crash-pkg", version, 256 * 1024)
        doc = json.dumps(npm_publish_doc("crash-pkg", version, data)).encode()
        tarball_url = f"{registry}crash-pkg/-/crash-pkg-{version}.tgz"
        async with lab.proxy.traced(inject) as kill:
            try:
                status: int | None = await lab.publish(registry + "crash-pkg", doc, "application/json", "PUT")
            except (aiohttp.ClientError, ConnectionError):
                status = None
            await _sigkill_happened(lab, f"npm publish at {label}")
        _landed(kill, fragment, f"npm publish at {label}")
        faults.inject("sigkill: npm publish at a system call")
        assert status is None, f"{label}: answered {status} although killed before its commit ended"
        await lab.after_kill(faults, f"npm publish killed at {label}")
        served, got = await fetch(lab.http, tarball_url)
        faults.zero(
            "partial_commits", int(served == 200 and sha(got) != sha(data)), f"{label}: wrong tarball"
        )
        again = await lab.publish(registry + "crash-pkg", doc, "application/json", "PUT")
        assert again == 201 or (again in {403, 409} and served == 200), f"republish after {label}: {again}"
        lab.acked[tarball_url] = sha(data)
    await lab.proxy.kill()
    faults.inject("sigkill: right after acknowledged npm publishes")
    await lab.after_kill(faults, "kill after npm publishes")


async def test_syscall_boundary_kills_during_a_metadata_rewrite(lab: Lab, faults: GroupLedger) -> None:
    """A changed upstream page rewrites its document row (and a big one its file in pages/):
    killed inside that write, the index keeps the old page or the new one, whole."""
    await require_strace()
    lab.proxy.metadata_ttl = "0s"  # every page request revalidates, and a change rewrites the row
    for i in range(12):
        await lab.wheel("metapkg", f"1.{i}")
    await lab.proxy.start()
    page_url = f"{lab.proxy.url}/default/pypi/public/simple/metapkg/"
    status, _ = await fetch(lab.http, page_url)
    assert status == 200
    boundaries = [
        ("a WAL page in the middle of the document row's transaction", Inject("pwrite64", 4, lab.proxy.wal)),
        ("WAL sync of the document's commit", Inject(SYNC, 1, lab.proxy.wal)),
    ]
    for i, (label, inject) in enumerate(boundaries):
        before = {f.filename: f.sha256 for f in lab.pypi.files("metapkg")}
        newest = await lab.wheel("metapkg", f"2.{i}")  # the upstream page changes
        after = {f.filename: f.sha256 for f in lab.pypi.files("metapkg")}
        async with lab.proxy.traced(inject) as kill:
            try:
                status, body = await fetch_json(lab, page_url)
                # Answered before the row was written: then it must be the new page, whole.
                faults.zero("corrupt_served", int(status != 200 or listed_files(body) != after), label)
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
                pass
            await _sigkill_happened(lab, f"metadata rewrite at {label}")
        _landed(kill, WAL, f"metadata rewrite at {label}")
        faults.inject("sigkill: metadata rewrite at a system call")
        await lab.after_kill(faults, f"metadata rewrite killed at {label}")
        stored = await asyncio.to_thread(_stored_listing, lab.proxy.data_dir, "pypi:metapkg")
        # The stored document is the old one or the new one, never a mixture or a torn body.
        faults.zero("partial_commits", int(stored not in (before, after)), f"{label}: stored page {stored}")
        status, body = await fetch_json(lab, page_url)
        assert status == 200
        wrong = {name for name, digest in listed_files(body).items() if after.get(name) != digest}
        faults.zero(
            "corrupt_served", len(wrong) + (set(listed_files(body)) != set(after)), f"{label}: {wrong}"
        )
        lab.cached[lab.proxy.files_url("metapkg", newest.name)] = after[newest.name]
    # A page big enough to be rendered into DATA_DIR/pages/ (temp name, then rename): killed at
    # that rename, the next start empties pages/ and renders it again, whole.
    for path in await asyncio.to_thread(_many_sdists, lab.root / "many", "bigpage", 2000):
        await lab.pypi.add_file_async("bigpage", path, with_metadata=False)
    listing = {f.filename: f.sha256 for f in lab.pypi.files("bigpage")}
    big_url = f"{lab.proxy.url}/default/pypi/public/simple/bigpage/"
    async with lab.proxy.traced(Inject(RENAME)) as kill:
        with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)):
            await fetch_json(lab, big_url)
        await _sigkill_happened(lab, "rendering a big page")
    _landed(kill, "/pages/", "rendering a big page")
    faults.inject("sigkill: rendering a big page into pages/")
    await lab.after_kill(faults, "big page rendering killed at its rename")
    status, body = await fetch_json(lab, big_url)
    assert status == 200 and len(body) >= 512 * 1024  # (so it was a page kept in a file)
    faults.zero("corrupt_served", int(listed_files(body) != listing), "the big page after the crash")


def _many_sdists(root: Path, project: str, count: int) -> list[Path]:
    """``count`` tiny distinct files named like sdists (blocking)."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = root / f"{project}-1.0.{i}.tar.gz"
        path.write_bytes(f"{project} {i}".encode())
        paths.append(path)
    return paths


async def fetch_json(lab: Lab, url: str) -> tuple[int, bytes]:
    async with lab.http.get(url, headers=JSON) as resp:
        return resp.status, await resp.read()


def _stored_listing(data_dir: Path, key: str) -> dict[str, str] | None:
    """filename → sha256 of the document row the index holds for ``key`` (JSON or HTML)."""
    import sqlite3

    with sqlite3.connect(data_dir / "index.sqlite3") as db:
        row = db.execute("SELECT body FROM documents WHERE doc_key=?", (key,)).fetchone()
    if row is None:
        return None
    body = bytes(row[0])
    try:
        return listed_files(body)
    except (ValueError, KeyError, TypeError):
        links = re.findall(rb'href="[^"#]*/([^/"#]+)#sha256=([0-9a-f]{64})"', body)
        return {name.decode(): digest.decode() for name, digest in links}


async def test_syscall_boundary_kills_during_gc(lab: Lab, faults: GroupLedger) -> None:
    """``artifact-proxy gc`` killed inside its eviction transaction and at a blob unlink: no row
    may be left naming a deleted blob, and hosted files are never touched."""
    await require_strace()
    cached = [await lab.wheel("gcpkg", f"1.{i}", payload=256 * 1024) for i in range(3)]
    hosted = await lab.wheel("gchosted", "1.0", upstream=False)
    await lab.proxy.start()
    for whl in cached:
        url = lab.proxy.files_url("gcpkg", whl.name)
        lab.cached[url] = await asyncio.to_thread(sha256_file, whl)
        status, _ = await fetch(lab.http, url)
        assert status == 200
    data = await asyncio.to_thread(hosted.read_bytes)
    ctype = f"multipart/form-data; boundary={BOUNDARY}"
    body = multipart_upload(hosted, data, "gchosted", "1.0")
    assert await lab.publish(f"{lab.proxy.url}/default/pypi/team/", body, ctype) == 201
    lab.acked[lab.proxy.files_url("gchosted", hosted.name, repo="team")] = sha(data)
    victim = lab.proxy.blob_path(await asyncio.to_thread(sha256_file, cached[1]))
    boundaries = [
        ("WAL frame of the eviction", Inject("pwrite64", 2, lab.proxy.wal), WAL),
        ("WAL sync of the eviction's commit", Inject(SYNC, 1, lab.proxy.wal), WAL),
        ("unlink of an evicted blob", Inject(UNLINK, path=victim), str(victim)),
    ]
    gc = [sys.executable, "-m", "proxy", "gc", "--max-size", "0", "--config", str(lab.proxy.config)]
    for i, (label, inject, fragment) in enumerate(boundaries):
        await lab.proxy.stop()
        code, kill = await run_traced(inject, lab.root / f"gc-{i}.log", *gc)
        assert code in {-9, 137}, f"gc at {label} ({inject}) was not killed: exit {code}"
        _landed(kill, fragment, f"gc at {label}")
        faults.inject("sigkill: gc at a system call")
        await lab.after_kill(faults, f"gc killed at {label}")  # re-fetches what was evicted
    await lab.proxy.stop()
    proc = await asyncio.create_subprocess_exec(*gc, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    assert proc.returncode == 0 and b"3 cached asset(s) evicted" in out, out  # gc had work to do


async def test_sigkill_of_every_worker_in_the_middle_of_shared_fills(lab: Lab, faults: GroupLedger) -> None:
    """``serve --workers 2``: clients on both workers wait on one download each (a cross-process
    lock); the whole process group dies at once, as in a power cut or an OOM kill of the unit."""
    lab.proxy.workers = 2
    size = 2 * 2**20
    wheels = [await lab.wheel("sharedpkg", f"1.{i}", payload=size) for i in range(2)]
    for whl in wheels:
        lab.pypi.faults[f"/files/{whl.name}"] = Fault("slow", chunk=128 * 1024, delay=0.03, times=1)
    expected = {whl.name: await asyncio.to_thread(sha256_file, whl) for whl in wheels}
    await lab.proxy.start()
    halfway = asyncio.Event()

    async def client(whl: Path) -> tuple[str, bytes | None]:
        connector = aiohttp.TCPConnector(force_close=True)  # its own connection: any worker
        async with aiohttp.ClientSession(connector=connector) as http:
            try:
                async with http.get(lab.proxy.files_url("sharedpkg", whl.name)) as resp:
                    assert resp.status == 200
                    body = await resp.content.readexactly(size // 2)
                    halfway.set()
                    return whl.name, body + await resp.read()
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, asyncio.IncompleteReadError):
                return whl.name, None  # cut off visibly

    clients = [asyncio.create_task(client(whl)) for whl in wheels for _ in range(3)]
    await asyncio.wait_for(halfway.wait(), 30)
    # A publish acknowledged by whichever worker took it, then the crash at once.
    hosted = await lab.wheel("sharedhosted", "1.0", upstream=False)
    data = await asyncio.to_thread(hosted.read_bytes)
    ctype = f"multipart/form-data; boundary={BOUNDARY}"
    body = multipart_upload(hosted, data, "sharedhosted", "1.0")
    assert await lab.publish(f"{lab.proxy.url}/default/pypi/team/", body, ctype) == 201
    lab.acked[lab.proxy.files_url("sharedhosted", hosted.name, repo="team")] = sha(data)
    await lab.proxy.kill()
    faults.inject("sigkill: every worker, mid shared fill")
    results = await asyncio.wait_for(asyncio.gather(*clients), 30)
    assert any(body is None for _, body in results), "the kill came too late to cut any transfer"
    whole_but_wrong = [name for name, body in results if body is not None and sha(body) != expected[name]]
    faults.zero("corrupt_served", len(whole_but_wrong), f"complete-looking wrong bodies: {whole_but_wrong}")
    lab.cached.update({lab.proxy.files_url("sharedpkg", name): digest for name, digest in expected.items()})
    await lab.after_kill(faults, "every worker killed mid fill")
    # One download per cold key across the workers, and after the crash no stale lock holds one up.
    assert all(lab.pypi.hits[f"/files/{whl.name}"] <= 2 for whl in wheels), lab.pypi.hits


async def test_sigkill_of_workers_alone_is_repaired_live(lab: Lab, faults: GroupLedger) -> None:
    """Workers SIGKILLed (an OOM kill picks a process, not the unit) mid fill while the supervisor
    lives: it restarts them, and the data directory is consistent without an operator restart."""
    lab.proxy.workers = 2
    whl = await lab.wheel("workerpkg", "1.0", payload=2 * 2**20)
    lab.pypi.faults[f"/files/{whl.name}"] = Fault("slow", chunk=128 * 1024, delay=0.03, times=1)
    expected = await asyncio.to_thread(sha256_file, whl)
    await lab.proxy.start()
    workers = await asyncio.to_thread(children, lab.proxy.pid)
    assert len(workers) == 2
    url = lab.proxy.files_url("workerpkg", whl.name)
    body: bytes | None = None
    try:
        async with lab.http.get(url) as resp:
            head = await resp.content.readexactly(2**20)
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
            faults.inject("sigkill: the worker processes, mid fill", len(workers))
            body = head + await resp.read()
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
        pass
    faults.zero("corrupt_served", int(body is not None and sha(body) != expected), "killed worker's response")
    for _ in range(200):  # the supervisor starts new workers
        if set(await asyncio.to_thread(children, lab.proxy.pid)).isdisjoint(workers):
            break
        await asyncio.sleep(0.05)
    await lab.proxy.wait_ready()
    found = await asyncio.to_thread(scan, lab.proxy.data_dir)
    # A restarted worker clears its own staging directory (tmp/worker-N): no leftover stays.
    broken = found.bad_rows + found.bad_blobs + ([] if found.integrity == "ok" else [found.integrity])
    broken += [p for p in found.leftovers if p.startswith("tmp/")]
    faults.zero("partial_commits", len(broken), f"after the workers' deaths: {broken}")
    # A dead worker's lock (flock) is released by the kernel: the key is fetched again at once.
    status, got = await asyncio.wait_for(fetch(lab.http, url), 30)
    assert status == 200
    faults.zero("corrupt_served", int(sha(got) != expected), "the fill after the workers' deaths")
    assert lab.pypi.hits[f"/files/{whl.name}"] == 2


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux; blocking)."""
    with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
        return [int(p) for p in f.read().split()]
