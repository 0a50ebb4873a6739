"""``serve --workers N``: several processes on one port behave as one proxy.

Each test runs the real supervisor (``python -m proxy serve --workers N``) as a subprocess on one
port against a fake upstream, and opens a new connection per request so the kernel spreads them
over the workers (``X-Proxy-Worker`` says which one answered; the tests check several did).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.clients import upload_form
from tests.conftest import blob_files, index_rows
from tests.fakes.dists import build_wheel
from tests.fakes.pypi import FakePyPI, Fault
from tests.faults.hostile import Exchange, HostileUpstream
from tests.s3_server import free_port

ADMIN = "workers-admin-secret-" + "w" * 40
REQUESTS = 80


@dataclass
class Supervised:
    url: str
    proc: asyncio.subprocess.Process
    data_dir: Path
    log: Path

    async def log_tail(self) -> str:
        text = await asyncio.to_thread(self.log.read_text, errors="replace")
        return text[-3000:]

    async def workers(self) -> set[int]:
        """The worker pids the supervisor has now."""
        return await asyncio.to_thread(_children, self.proc.pid)


Start = Callable[..., Awaitable[Supervised]]


def _children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return {int(p) for p in path.read_text().split()}
    except FileNotFoundError:
        return set()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _index_open_in_a_child(pid: int) -> bool:
    for child in _children(pid):
        with contextlib.suppress(FileNotFoundError):
            for fd in Path(f"/proc/{child}/fd").iterdir():
                with contextlib.suppress(FileNotFoundError):
                    if fd.readlink().name == "index.sqlite3":
                        return True
    return False


def _write_config(path: Path, data_dir: Path, upstream: str, port: int, auth: bool, admin: Path) -> None:
    admin.write_text(ADMIN + "\n", encoding="utf-8")
    path.write_text(
        f"""[server]
listen = "127.0.0.1:{port}"
data_dir = "{data_dir}"
auth = {"true" if auth else "false"}
admin_token_file = "{admin}"
shutdown_timeout = "5s"

[upstreams.fake]
format = "pypi"
url = "{upstream}"

[[domains]]
name = "default"

[[domains.repositories]]
name = "public"
upstreams = ["fake"]
""",
        encoding="utf-8",
    )


@pytest.fixture
async def start(tmp_path: Path, pypi: FakePyPI) -> AsyncIterator[Start]:
    """Start ``serve --workers N``; every process started is gone when the test ends."""
    started: list[Supervised] = []

    async def run(workers: int, *, auth: bool = False, upstream: str | None = None) -> Supervised:
        port = free_port()
        data_dir = tmp_path / "data"
        config = tmp_path / "proxy.toml"
        write = functools.partial(
            _write_config, config, data_dir, upstream or pypi.url, port, auth, tmp_path / "admin-token"
        )
        await asyncio.to_thread(write)
        log = tmp_path / f"proxy-{len(started)}.log"
        with await asyncio.to_thread(log.open, "wb") as sink:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "proxy",
                "serve",
                "--config",
                str(config),
                "--workers",
                str(workers),
                "--log-level",
                "INFO",
                stdout=asyncio.subprocess.DEVNULL,
                stderr=sink,
            )
        running = Supervised(f"http://127.0.0.1:{port}", proc, data_dir, log)
        started.append(running)
        await _until_every_worker_answers(running, workers)
        return running

    yield run
    for running in started:
        pids = await running.workers()
        if running.proc.returncode is None:
            running.proc.kill()
            await running.proc.wait()
        for pid in pids:  # a supervisor killed outright: its workers get SIGTERM from the kernel
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, str]:
    """One request on a connection of its own: (status, body, the worker that answered)."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector, auto_decompress=False) as http,
        http.get(url, headers=headers) as resp,
    ):
        return resp.status, await resp.read(), resp.headers.get("X-Proxy-Worker", "")


async def _timed_get(url: str) -> tuple[int, bytes, str, float, float]:
    """Like :func:`_get`, plus when the first body byte and the whole body arrived."""
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector, auto_decompress=False) as http,
        http.get(url) as resp,
    ):
        first = await resp.content.readany()
        first_at = loop.time()
        body = first + await resp.read()
        return resp.status, body, resp.headers.get("X-Proxy-Worker", ""), first_at, loop.time()


async def _until_every_worker_answers(running: Supervised, workers: int, timeout: float = 30.0) -> None:
    seen: set[str] = set()
    async with asyncio.timeout(timeout):
        while len(seen) < workers:
            if running.proc.returncode is not None:
                raise AssertionError(
                    f"the supervisor exited early with {running.proc.returncode}: {await running.log_tail()}"
                )
            try:
                status, _, worker = await _get(running.url + "/-/readyz")
                if status == 200:
                    seen.add(worker)
            except aiohttp.ClientError:
                await asyncio.sleep(0.05)


async def test_one_upstream_get_for_a_cold_file_across_workers(
    start: Start, pypi: FakePyPI, tmp_path: Path
) -> None:
    """80 clients on 3 workers ask for one cold file during a slow download: one upstream GET,
    every body the right bytes, more than one worker answered, and every client had its first
    bytes before any had the whole file (workers that wait for another's download tail its file)."""
    wheel = await asyncio.to_thread(build_wheel, tmp_path, "slowpkg", "1.0", payload_size=256 * 1024)
    await pypi.add_file_async("slowpkg", wheel)
    expected = hashlib.sha256(await asyncio.to_thread(wheel.read_bytes)).hexdigest()
    path = f"/files/{wheel.name}"
    pypi.faults[path] = Fault("slow", chunk=32 * 1024, delay=0.15)  # about 1.2 s
    running = await start(3)

    url = f"{running.url}/default/pypi/public/files/slowpkg/{wheel.name}"
    timed = await asyncio.gather(*(_timed_get(url) for _ in range(REQUESTS)))
    results = [(status, body, worker) for status, body, worker, _, _ in timed]

    assert pypi.hits[path] == 1
    assert pypi.hits["/simple/slowpkg/"] == 1  # the page it is listed on: one refresh, too
    assert [s for s, _, _ in results] == [200] * REQUESTS
    wrong = [w for _, body, w in results if hashlib.sha256(body).hexdigest() != expected]
    assert wrong == []
    assert len({w for _, _, w in results}) >= 2, "the kernel gave every connection to one worker"
    first_complete = min(done for *_, done in timed)
    late = sorted({w for _, _, w, first, _ in timed if first >= first_complete})
    assert late == [], f"clients of workers {late} got no byte before the download was over"
    again = await asyncio.gather(*(_get(url) for _ in range(20)))  # and later hits: no GET either
    assert {s for s, _, _ in again} == {200} and pypi.hits[path] == 1


async def test_a_failed_download_is_never_completed_by_any_worker(
    start: Start, pypi: FakePyPI, tmp_path: Path
) -> None:
    """The upstream sends the right length with the last byte wrong, slowly: the one download
    fails its hash check, and every client on every worker is refused or cut off mid-body; none
    gets a complete-looking file, and nothing is stored."""
    wheel = await asyncio.to_thread(build_wheel, tmp_path, "badpkg", "1.0", payload_size=256 * 1024)
    await pypi.add_file_async("badpkg", wheel)
    expected = await asyncio.to_thread(wheel.read_bytes)
    path = f"/files/{wheel.name}"

    async def flipped_slowly(ex: Exchange) -> bool:
        r = await ex.relay()
        body = r.body[:-1] + bytes([r.body[-1] ^ 1])
        await ex.send_head(r.status, [*r.without("content-length"), ("Content-Length", str(len(body)))])
        for i in range(0, len(body), 32 * 1024):
            await ex.send(body[i : i + 32 * 1024])
            await asyncio.sleep(0.15)
        return True

    async with HostileUpstream(pypi.origin) as hostile:
        hostile.rules[path] = flipped_slowly
        running = await start(3, upstream=hostile.url("/simple/"))
        url = f"{running.url}/default/pypi/public/files/badpkg/{wheel.name}"

        async def attempt() -> str:
            try:
                status, body, worker = await _get(url)
            except aiohttp.ClientPayloadError:
                return "cut off"
            if status == 200:
                return "CORRUPT" if body != expected else "whole?!"
            return f"refused {status} by {worker}"

        outcomes = await asyncio.gather(*(attempt() for _ in range(60)))
        assert hostile.hits[path] == 1

    assert [o for o in outcomes if o in ("CORRUPT", "whole?!")] == []
    assert "cut off" in outcomes  # clients were streaming when the check failed
    rows = await asyncio.to_thread(
        index_rows, running.data_dir, "SELECT * FROM assets WHERE filename=?", (wheel.name,)
    )
    assert rows == []
    assert await asyncio.to_thread(blob_files, running.data_dir) == []


async def test_a_publish_is_listed_by_every_worker_at_once(
    start: Start, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """Every worker has the page cached; after a publish's 201, every read lists the new version."""
    running = await start(2)
    page = f"{running.url}/default/pypi/public/simple/fresh/"

    async def publish(version: str) -> None:
        wheel = await asyncio.to_thread(build_wheel, tmp_path / version, "fresh", version)
        data = await asyncio.to_thread(wheel.read_bytes)
        form = upload_form(wheel, data, name="fresh", version=version)
        async with http.post(f"{running.url}/default/pypi/public/", data=form) as resp:
            assert resp.status in (200, 201), await resp.text()

    await asyncio.to_thread((tmp_path / "1.0").mkdir)
    await asyncio.to_thread((tmp_path / "2.0").mkdir)
    await publish("1.0")
    warm = await asyncio.gather(*(_get(page) for _ in range(30)))
    assert {s for s, _, _ in warm} == {200}
    assert len({w for _, _, w in warm}) == 2  # both workers hold a rendered page now
    assert all(b"fresh-1.0" in body for _, body, _ in warm)

    await publish("2.0")
    after = await asyncio.gather(*(_get(page) for _ in range(40)))
    missing = [w for s, body, w in after if s != 200 or b"fresh-2.0" not in body]
    assert missing == [], f"workers {sorted(set(missing))} still served the page without 2.0"
    assert len({w for _, _, w in after}) == 2


async def test_a_revoked_token_is_refused_by_every_worker_at_once(
    start: Start, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Revoked through one worker's API, or by the CLI beside the running proxy: every worker
    refuses the token from the next request on, though each had it cached as verified."""
    running = await start(2, auth=True)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    body = {"domain": "default", "principal": "ci", "permissions": ["read"], "duration": "1h"}
    page = f"{running.url}/default/pypi/public/simple/beta/"
    issued = []
    for _ in range(2):
        async with http.post(f"{running.url}/-/api/v1/tokens", json=body, headers=admin) as resp:
            assert resp.status == 201, await resp.text()
            issued.append(await resp.json())
    bearers = [{"Authorization": f"Bearer {token['token']}"} for token in issued]
    for bearer in bearers:
        before = await asyncio.gather(*(_get(page, bearer) for _ in range(30)))
        assert {s for s, _, _ in before} == {200}
        assert len({w for _, _, w in before}) == 2  # both workers have verified (and cached) it

    async with http.delete(f"{running.url}/-/api/v1/tokens/{issued[0]['id']}", headers=admin) as resp:
        assert resp.status == 204
    cli = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "proxy", "token", "revoke", "--config", str(tmp_path / "proxy.toml")),
        *("--id", issued[1]["id"]),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await cli.communicate()
    assert cli.returncode == 0, err.decode()
    for how, bearer in zip(("API", "CLI"), bearers, strict=True):
        after = await asyncio.gather(*(_get(page, bearer) for _ in range(40)))
        accepted = [w for s, _, w in after if s != 401]
        assert accepted == [], f"workers {sorted(set(accepted))} still accepted a token revoked by {how}"
        assert len({w for _, _, w in after}) == 2


async def test_supervisor_reloads_restarts_a_killed_worker_and_stops_them_all(
    start: Start, tmp_path: Path
) -> None:
    running = await start(2)
    # SIGHUP: worker 0 reads the config again, the other catches up from the index.
    config = tmp_path / "proxy.toml"
    text = await asyncio.to_thread(config.read_text)
    added = '\n[[domains.repositories]]\nname = "added"\nupstreams = ["public"]\n'
    await asyncio.to_thread(config.write_text, text + added)
    running.proc.send_signal(signal.SIGHUP)
    repo = f"{running.url}/-/api/v1/domains/default/repositories/added"
    async with asyncio.timeout(20):
        while (await _get(repo))[0] != 200:
            await asyncio.sleep(0.05)
    answers = await asyncio.gather(*(_get(repo) for _ in range(20)))
    assert {s for s, _, _ in answers} == {200} and len({w for _, _, w in answers}) == 2

    workers = await running.workers()
    assert len(workers) == 2
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)

    async with asyncio.timeout(20):  # a new worker replaces it, and both answer again
        while True:
            now = await running.workers()
            if len(now) == 2 and victim not in now:
                break
            await asyncio.sleep(0.05)
    await _until_every_worker_answers(running, 2, timeout=20)
    statuses = await asyncio.gather(*(_get(running.url + "/-/healthz") for _ in range(20)))
    assert {s for s, _, _ in statuses} == {200}

    # Ctrl-C reaches every process of the group: workers leave it to the supervisor, which
    # turns it into one SIGTERM each (a second signal would cut their graceful shutdown short).
    final = await running.workers()
    for pid in final:
        os.kill(pid, signal.SIGINT)
    await asyncio.sleep(0.3)
    assert await running.workers() == final
    await _until_every_worker_answers(running, 2, timeout=10)
    running.proc.send_signal(signal.SIGINT)
    async with asyncio.timeout(20):
        assert await running.proc.wait() == 0
    alive = [pid for pid in final if await asyncio.to_thread(_alive, pid)]
    assert alive == [], f"workers {alive} outlived the supervisor"
    with pytest.raises(aiohttp.ClientError):
        await _get(running.url + "/-/healthz")


async def test_sigterm_while_workers_start_stops_them_all_promptly(tmp_path: Path, pypi: FakePyPI) -> None:
    """A SIGTERM that lands while workers are still starting (a deploy rolled back at once):
    the supervisor exits 0 well before it would resort to SIGKILL, and no worker is left."""
    port = free_port()
    config = tmp_path / "proxy.toml"
    write = functools.partial(
        _write_config, config, tmp_path / "data", pypi.url, port, False, tmp_path / "admin-token"
    )
    await asyncio.to_thread(write)
    log = tmp_path / "proxy.log"
    with await asyncio.to_thread(log.open, "wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "proxy", "serve", "--config", str(config), "--workers", "3"),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=sink,
        )
    try:
        async with asyncio.timeout(20):  # until a worker is between opening the index and ready
            while not await asyncio.to_thread(_index_open_in_a_child, proc.pid):
                await asyncio.sleep(0.002)
        workers = await asyncio.to_thread(_children, proc.pid)
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):  # the supervisor would SIGKILL stragglers only after 15 s
            assert await proc.wait() == 0, await asyncio.to_thread(log.read_text)
        alive = [pid for pid in workers if await asyncio.to_thread(_alive, pid)]
        assert alive == [], f"workers {alive} outlived the supervisor"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
