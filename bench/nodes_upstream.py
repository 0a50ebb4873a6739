"""bench/upstream.py's FakePyPI, plus an answer to "how often was I asked for this path?".

bench/nodes.py needs to know how many times a cold miss sent through three nodes reached the
upstream (the cross-node single-flight promises one GET), and that a file fetched back from the
bucket did not come from the upstream. The fake counts every path it serves (``FakePyPI.hits``);
the upstream runs in a process of its own (so it never shares the nodes' event loop), so this
script answers ``GET /-bench/hits`` with those counts as JSON. Everything else is
bench/upstream.py's: the same manifest, the same one JSON line ``{"url": ...}`` on stdout once
serving, the same stop on SIGTERM/SIGINT.

    python bench/nodes_upstream.py MANIFEST.json   # [{"project": ..., "path": ...}, ...]
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HITS_PATH = "/-bench/hits"


async def serve(manifest: Path) -> None:
    """Publish every entry, announce the URL, serve (counting) until a stop signal."""
    from aiohttp import web

    from tests.fakes.pypi import FakePyPI

    class CountingPyPI(FakePyPI):
        async def _entry(self, request: web.Request) -> web.StreamResponse:
            if request.path == HITS_PATH:
                return web.json_response(dict(self.hits))
            response = await super()._entry(request)
            self.requests.clear()  # kept per request by the fake: unbounded under a benchmark
            return response

    entries = json.loads(manifest.read_text())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with CountingPyPI() as fake:
        for entry in entries:
            await fake.add_file_async(entry["project"], Path(entry["path"]))
        print(json.dumps({"url": fake.url, "hits": fake.origin + HITS_PATH}), flush=True)
        await stop.wait()


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))  # for tests.fakes; this script runs from bench/
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(Path(sys.argv[1])))
    else:
        uvloop.run(serve(Path(sys.argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
