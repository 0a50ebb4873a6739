"""Self-tests for the test doubles in ``tests.fakes``.

Every proxy test trusts these fakes, so a bug here would make proxy
tests pass or fail for the wrong reason.  These checks pin down that the
built distributions really install and that the fake index speaks the
protocol and injects each fault as documented.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.fakes.dists import build_sdist, build_wheel, sha256_file, wheel_metadata
from tests.fakes.pypi import JSON_CT, FakePyPI, Fault

UPLOAD_TIME = "2024-01-02T03:04:05.000000Z"
PIP_ACCEPT = (
    "application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html; q=0.1, text/html; q=0.01"
)


@dataclass(frozen=True)
class Built:
    """A built file plus facts read from disk up front.

    Async tests must not stat or read files on the loop (blockbuster), so
    the sync fixture gathers everything they want to compare against.
    """

    path: Path
    size: int
    sha256: str
    metadata_sha256: str | None

    @property
    def name(self) -> str:
        """The file name, as the index lists it."""
        return self.path.name


def _built(path: Path) -> Built:
    """Collect size, hash and PEP 658 metadata hash of a built file."""
    meta = wheel_metadata(path) if path.suffix == ".whl" else None
    return Built(
        path=path,
        size=path.stat().st_size,
        sha256=sha256_file(path),
        metadata_sha256=hashlib.sha256(meta).hexdigest() if meta is not None else None,
    )


@pytest.fixture
def dists(tmp_path: Path) -> dict[str, Built]:
    """A small wheel, a wheel big enough for body faults, and an sdist (built off-loop)."""
    out = tmp_path / "dists"
    return {
        "wheel": _built(build_wheel(out, "alpha", "1.0", requires_python=">=3.8", requires=["beta>=1"])),
        "big": _built(build_wheel(out, "alpha", "2.0", payload_size=256 * 1024)),
        "sdist": _built(build_sdist(out, "alpha", "1.0")),
    }


@pytest.fixture
async def pypi(dists: dict[str, Built]) -> AsyncIterator[FakePyPI]:
    """A started fake index publishing the ``dists`` files under ``alpha``."""
    async with FakePyPI() as fake:
        await fake.add_file_async("alpha", dists["wheel"].path, requires_python=">=3.8")
        await fake.add_file_async("alpha", dists["big"].path, yanked="broken <build>")
        await fake.add_file_async("alpha", dists["sdist"].path, upload_time="2024-01-02T03:04:05.000000Z")
        yield fake


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session that is always closed (unclosed sessions warn, warnings fail)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        yield s


# ------------------------------------------------------------------- dists


def test_wheel_installs_with_pip_and_imports(tmp_path: Path) -> None:
    """The hand-built wheel must be acceptable to a real installer."""
    wheel = build_wheel(tmp_path, "My.Pkg-Name", "1.2.3", requires=["beta>=1"], payload_size=4096)
    assert wheel.name == "my_pkg_name-1.2.3-py3-none-any.whl"
    target = tmp_path / "target"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet",
         "--disable-pip-version-check", "--target", str(target), str(wheel)],
        check=True,
    )  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", "import my_pkg_name; print(my_pkg_name.__version__)"],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(target)},
    ).stdout
    assert out.strip() == "1.2.3"
    assert (target / "my_pkg_name" / "payload.bin").stat().st_size == 4096
    assert (target / "my_pkg_name-1.2.3.dist-info" / "METADATA").is_file()


def test_wheel_installs_with_uv(tmp_path: Path) -> None:
    """uv verifies RECORD strictly; if it is on hand, it must accept the wheel too."""
    uv = shutil.which("uv") or shutil.which("uv", path=str(Path(sys.executable).parent))
    if uv is None:
        pytest.skip("uv not installed")
    wheel = build_wheel(tmp_path, "gamma", "0.1", payload_size=1000)
    target = tmp_path / "target"
    subprocess.run(
        [uv, "pip", "install", "--offline", "--no-cache", "--no-deps", "--quiet",
         "--python", sys.executable, "--target", str(target), str(wheel)],
        check=True,
        env={**os.environ, "UV_NO_CONFIG": "1"},
    )  # fmt: skip
    assert (target / "gamma" / "__init__.py").read_text() == '__version__ = "0.1"\n'


def test_wheel_is_deterministic_and_record_is_correct(tmp_path: Path) -> None:
    """Stable bytes keep hashes in tests stable; RECORD must match contents."""
    a = build_wheel(tmp_path / "a", "delta", "3.0", requires=["x"])
    b = build_wheel(tmp_path / "b", "delta", "3.0", requires=["x"])
    assert a.read_bytes() == b.read_bytes()
    meta = wheel_metadata(a).decode()
    assert "Name: delta\nVersion: 3.0\n" in meta
    assert "Requires-Dist: x\n" in meta
    with zipfile.ZipFile(a) as zf:
        record = zf.read("delta-3.0.dist-info/RECORD").decode().splitlines()
        assert record[-1] == "delta-3.0.dist-info/RECORD,,"
        for line in record[:-1]:
            name, digest, size = line.split(",")
            data = zf.read(name)
            assert int(size) == len(data)
            assert digest.startswith("sha256=") and "=" not in digest[7:]


def test_sdist_layout(tmp_path: Path) -> None:
    """The sdist has the files a setuptools sdist has."""
    sdist = build_sdist(tmp_path, "Alpha.Beta", "1.0")
    assert sdist.name == "alpha_beta-1.0.tar.gz"
    with tarfile.open(sdist) as tf:
        names = set(tf.getnames())
        pkg_info = tf.extractfile("alpha_beta-1.0/PKG-INFO")
        assert pkg_info is not None
        assert b"Name: Alpha.Beta\n" in pkg_info.read()
    assert {"alpha_beta-1.0/pyproject.toml", "alpha_beta-1.0/alpha_beta/__init__.py"} <= names
    assert len(sha256_file(sdist)) == 64


# ------------------------------------------------------------------ protocol


async def test_json_page_and_files(
    pypi: FakePyPI, session: aiohttp.ClientSession, dists: dict[str, Built]
) -> None:
    """PEP 691 JSON lists files whose hashes match what is then served."""
    async with session.get(pypi.url + "alpha/", headers={"Accept": PIP_ACCEPT}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == JSON_CT
        assert resp.headers["X-PyPI-Last-Serial"] == str(pypi.serial["alpha"])
        doc = json.loads(await resp.read())
    assert doc["meta"]["api-version"] == "1.1"
    assert doc["name"] == "alpha"
    assert doc["versions"] == ["1.0", "2.0"]
    by_name = {f["filename"]: f for f in doc["files"]}
    wheel = by_name[dists["wheel"].name]
    assert wheel["url"] == f"{pypi.origin}/files/{dists['wheel'].name}"
    assert wheel["requires-python"] == ">=3.8"
    assert wheel["yanked"] is False
    assert wheel["size"] == dists["wheel"].size
    meta_hash = dists["wheel"].metadata_sha256
    assert wheel["core-metadata"] == wheel["dist-info-metadata"] == {"sha256": meta_hash}
    assert by_name[dists["big"].name]["yanked"] == "broken <build>"
    sdist = by_name[dists["sdist"].name]
    assert sdist["core-metadata"] is False
    assert sdist["upload-time"] == UPLOAD_TIME

    for name in (dists["wheel"].name, dists["big"].name):
        async with session.get(by_name[name]["url"]) as resp:
            body = await resp.read()
        assert resp.headers["Content-Length"] == str(len(body))
        assert hashlib.sha256(body).hexdigest() == by_name[name]["hashes"]["sha256"]
    async with session.get(wheel["url"] + ".metadata") as resp:
        assert hashlib.sha256(await resp.read()).hexdigest() == meta_hash
    async with session.get(sdist["url"] + ".metadata") as resp:
        assert resp.status == 404
    assert pypi.hits[f"/files/{dists['wheel'].name}.metadata"] == 1


async def test_html_page(pypi: FakePyPI, session: aiohttp.ClientSession) -> None:
    """PEP 503 HTML carries hash fragments and escaped data-* attributes."""
    wheel = pypi.files("alpha")[0]
    for accept, ctype in [
        ("text/html", "text/html"),
        ("application/vnd.pypi.simple.v1+html", "application/vnd.pypi.simple.v1+html"),
        ("application/vnd.pypi.simple.v1+json;q=0.2, text/html", "text/html"),
    ]:
        async with session.get(pypi.url + "alpha/", headers={"Accept": accept}) as resp:
            assert resp.headers["Content-Type"].startswith(ctype), accept
            page = await resp.text()
        assert f'href="{pypi.origin}/files/{wheel.filename}#sha256={wheel.sha256}"' in page
        assert 'data-requires-python="&gt;=3.8"' in page
        assert f'data-core-metadata="sha256={wheel.core_metadata_sha256}"' in page
        assert f'data-dist-info-metadata="sha256={wheel.core_metadata_sha256}"' in page
        assert 'data-yanked="broken &lt;build&gt;"' in page
    async with session.get(pypi.url, headers={"Accept": PIP_ACCEPT}) as resp:
        assert json.loads(await resp.read())["projects"][0]["name"] == "alpha"


async def test_html_only(session: aiohttp.ClientSession, dists: dict[str, Built]) -> None:
    """An html_only index ignores a JSON preference."""
    async with FakePyPI(html_only=True) as fake:
        await fake.add_file_async("alpha", dists["sdist"].path)
        async with session.get(fake.url + "alpha/", headers={"Accept": PIP_ACCEPT}) as resp:
            assert resp.headers["Content-Type"].startswith("text/html")


async def test_redirect_404_and_etag(pypi: FakePyPI, session: aiohttp.ClientSession) -> None:
    """Names are normalized by redirect; ETags give 304 until content changes."""
    url = f"{pypi.origin}/simple/ALPHA/"
    async with session.get(url, allow_redirects=False) as resp:
        assert resp.status == 301
        assert resp.headers["Location"] == "/simple/alpha/"
    async with session.get(pypi.url + "nope/") as resp:
        assert resp.status == 404

    headers = {"Accept": JSON_CT}
    async with session.get(pypi.url + "alpha/", headers=headers) as resp:
        etag = resp.headers["ETag"]
    async with session.get(pypi.url + "alpha/", headers={**headers, "If-None-Match": etag}) as resp:
        assert resp.status == 304
        assert resp.headers["ETag"] == etag
        assert resp.headers["X-PyPI-Last-Serial"] == str(pypi.serial["alpha"])
    async with session.get(pypi.url + "alpha/", headers={"If-None-Match": etag}) as resp:
        assert resp.status == 200  # the HTML representation has its own ETag
    pypi.remove_project("alpha")
    async with session.get(pypi.url + "alpha/", headers=headers) as resp:
        assert resp.status == 404


# -------------------------------------------------------------------- faults


async def test_fault_refuse(pypi: FakePyPI, session: aiohttp.ClientSession) -> None:
    """A refused request gets no response at all.

    aiohttp silently retries an idempotent request once after a
    disconnect, so one refusal is invisible to it; hence ``times=2``.
    """
    path = "/simple/alpha/"
    pypi.faults[path] = Fault("refuse", times=2)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await (await session.get(pypi.origin + path)).read()
    assert pypi.hits[path] == 2
    async with session.get(pypi.origin + path) as resp:
        assert resp.status == 200
    assert pypi.hits[path] == 3


async def test_stop_and_resume_listening(pypi: FakePyPI, session: aiohttp.ClientSession) -> None:
    """A stopped upstream refuses connections; it comes back on the same URL."""
    async with session.get(pypi.url) as resp:
        assert resp.status == 200
    await pypi.stop_listening()
    with pytest.raises(aiohttp.ClientConnectorError):
        await session.get(pypi.url)
    await pypi.resume_listening()
    async with session.get(pypi.url) as resp:
        assert resp.status == 200


async def test_fault_status_and_429(pypi: FakePyPI, session: aiohttp.ClientSession) -> None:
    """Error statuses are served for ``times`` requests, then normal answers."""
    pypi.faults["*"] = Fault("status", status=500, times=1)
    async with session.get(pypi.url + "alpha/") as resp:
        assert resp.status == 500
    pypi.faults["/simple/alpha/"] = Fault("429", retry_after=7)
    async with session.get(pypi.url + "alpha/") as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "7"
    async with session.get(pypi.url) as resp:
        assert resp.status == 200  # "*" fault used up
    assert pypi.faults["*"].used == 1


async def test_fault_stall(pypi: FakePyPI, session: aiohttp.ClientSession) -> None:
    """A stall delays the answer; a client timeout fires first if shorter."""
    pypi.faults["/simple/alpha/"] = Fault("stall", delay=0.2, times=2)
    start = time.monotonic()
    async with session.get(pypi.url + "alpha/") as resp:
        assert resp.status == 200
    assert time.monotonic() - start >= 0.2
    with pytest.raises(asyncio.TimeoutError):
        await session.get(pypi.url + "alpha/", timeout=aiohttp.ClientTimeout(total=0.05))


async def test_fault_truncate(
    pypi: FakePyPI, session: aiohttp.ClientSession, dists: dict[str, Built]
) -> None:
    """Truncation advertises the full length but ends the body halfway."""
    path = f"/files/{dists['big'].name}"
    pypi.faults[path] = Fault("truncate", times=1)
    async with session.get(pypi.origin + path) as resp:
        assert resp.headers["Content-Length"] == str(dists["big"].size)
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_fault_wrong_bytes(
    pypi: FakePyPI, session: aiohttp.ClientSession, dists: dict[str, Built]
) -> None:
    """Corruption keeps the length but breaks the declared hash."""
    path = f"/files/{dists['big'].name}"
    pypi.faults[path] = Fault("wrong_bytes")
    async with session.get(pypi.origin + path) as resp:
        body = await resp.read()
    assert len(body) == dists["big"].size
    assert hashlib.sha256(body).hexdigest() != dists["big"].sha256


async def test_fault_slow(pypi: FakePyPI, session: aiohttp.ClientSession, dists: dict[str, Built]) -> None:
    """Slow bodies arrive chunk by chunk, the first long before the last."""
    path = f"/files/{dists['wheel'].name}"
    size = dists["wheel"].size
    chunk = size // 4 + 1  # four chunks, three pauses
    pypi.faults[path] = Fault("slow", chunk=chunk, delay=0.1)
    start = time.monotonic()
    async with session.get(pypi.origin + path) as resp:
        first = await resp.content.readany()
        first_at = time.monotonic() - start
        rest = await resp.read()
    total = time.monotonic() - start
    assert first_at < 0.1
    assert total >= 0.3
    assert len(first) <= chunk
    assert hashlib.sha256(first + rest).hexdigest() == dists["wheel"].sha256


async def test_close_is_quick_with_stalled_request(dists: dict[str, Built]) -> None:
    """Teardown must not wait out a long stall in a request still in flight."""
    fake = FakePyPI()
    await fake.start()
    fake.faults["*"] = Fault("stall", delay=30)
    async with aiohttp.ClientSession() as s:

        async def fetch() -> int:
            async with s.get(fake.url) as resp:
                return resp.status

        task = asyncio.create_task(fetch())
        await asyncio.sleep(0.05)
        start = time.monotonic()
        await fake.close()
        assert time.monotonic() - start < 0.5
        with pytest.raises(aiohttp.ClientError):
            await task
