"""Measurement (e): fetch N simple pages and their wheels, 8 projects at a time, and time it.

This is what an installer does for a project with N dependencies, and it runs in a process of
its own so the client's Python work is not charged to the proxy's event loop (it still shares
the machine's two cores with the server, which the report says).

    python bench/fetch_all.py JOB.json   # prints one JSON result on stdout

JOB: ``{"items": [{"page": URL, "file": URL | null, "size": int | null}], "runs": int,
"concurrency": int, "accept": str}``. A null ``file`` is discovered from the PEP 691 page (the
cold run, which fills the cache); each run uses a fresh session with ``limit=concurrency``
keep-alive connections, and is timed from its first request to its last byte.
"""

from __future__ import annotations

import asyncio
import collections
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urldefrag, urljoin

import aiohttp

CHUNK = 256 * 1024


@dataclass
class RunStats:
    """What one run saw: bytes, cache statuses, problems, and the file URLs it used."""

    bytes: int = 0
    cache: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: list[str] = field(default_factory=list)
    files: list[str | None] = field(default_factory=list)


async def _get(session: aiohttp.ClientSession, url: str, stats: RunStats, keep: bool) -> tuple[bytes, int]:
    """GET ``url``, reading the whole body; keeps it only if ``keep`` (pages), counts it always.

    Returns the kept body and this response's byte count (``stats.bytes`` is shared by all
    concurrent tasks, so it cannot tell one response's size).
    """
    parts: list[bytes] = []
    received = 0
    async with session.get(url) as resp:
        stats.cache[resp.headers.get("X-Cache", "-")] += 1
        if resp.status != 200:
            stats.errors.append(f"{url}: HTTP {resp.status}")
        async for chunk in resp.content.iter_chunked(CHUNK):
            received += len(chunk)
            if keep:
                parts.append(chunk)
        if resp.content_length is not None and received != resp.content_length:
            stats.errors.append(f"{url}: got {received} of {resp.content_length} bytes")
    stats.bytes += received
    return b"".join(parts), received


def _first_file(page: bytes, page_url: str) -> str:
    """Absolute URL (no fragment) of the first file a PEP 691 page lists."""
    files = json.loads(page)["files"]
    return urldefrag(urljoin(page_url, files[0]["url"])).url


async def _project(
    session: aiohttp.ClientSession, item: dict[str, Any], index: int, stats: RunStats, gate: asyncio.Semaphore
) -> None:
    """Page, then its wheel: the order an installer needs them in."""
    async with gate:
        try:
            page, _ = await _get(session, item["page"], stats, keep=item.get("file") is None)
            file_url = item.get("file") or _first_file(page, item["page"])
            stats.files[index] = file_url
            _, received = await _get(session, file_url, stats, keep=False)
            size = item.get("size")
            if size is not None and received != size:
                stats.errors.append(f"{file_url}: {received} bytes, expected {size}")
        except (aiohttp.ClientError, ValueError, KeyError, IndexError) as exc:
            stats.errors.append(f"{item['page']}: {type(exc).__name__}: {exc}")


async def one_run(job: dict[str, Any]) -> dict[str, Any]:
    """One timed fetch of every item, in a fresh session."""
    items = job["items"]
    stats = RunStats(files=[None] * len(items))
    gate = asyncio.Semaphore(job["concurrency"])
    connector = aiohttp.TCPConnector(limit=job["concurrency"])
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        headers={"Accept": job["accept"]},
        auto_decompress=False,
        read_bufsize=2**20,
    ) as session:
        start = time.perf_counter()
        await asyncio.gather(*(_project(session, item, i, stats, gate) for i, item in enumerate(items)))
        wall = time.perf_counter() - start
    return {
        "wall": wall,
        "bytes": stats.bytes,
        "cache": dict(stats.cache),
        "errors": stats.errors,
        "files": stats.files,
    }


async def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """All runs of a job, one after the other."""
    return {"runs": [await one_run(job) for _ in range(job["runs"])]}


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    job = json.loads(Path(sys.argv[1]).read_text())
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(run_job(job))
    else:
        result = uvloop.run(run_job(job))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
