"""The comparison's upstream: a test-suite fake that also tells how often each path was fetched.

``compare.py`` has to count upstream downloads (how many GETs 100 concurrent misses for one file
cost each server), and the fake's ``hits`` counter lives in the fake's own process. So this runs
the fake (FakePyPI or FakeNpmRegistry, as ``upstream.py`` does) plus a tiny second aiohttp app on
another port whose ``GET /hits`` returns the counter as JSON. The second app keeps the counting
request out of the fake's own ``hits``.

    python bench/compare_upstream.py pypi|npm MANIFEST.json

It prints one JSON line ``{"url": ..., "stats": ...}`` once serving, then runs until SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

from aiohttp import web
from upstream import _publish

REPO = Path(__file__).resolve().parent.parent


async def serve(fmt: str, manifest: Path) -> None:
    """Publish every manifest entry, start the stats app, announce both URLs, wait for a signal."""
    from tests.fakes.npm import FakeNpmRegistry
    from tests.fakes.pypi import FakePyPI

    entries = json.loads(manifest.read_text())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    fake: Any = FakePyPI() if fmt == "pypi" else FakeNpmRegistry()
    async with fake:
        for entry in entries:
            await _publish(fake, fmt, entry)
        # The fake keeps every request's headers for tests; a benchmark would only grow it.
        fake.requests = _Discard()

        async def hits(request: web.Request) -> web.Response:
            return web.json_response(dict(fake.hits))

        app = web.Application()
        app.router.add_get("/hits", hits)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        print(json.dumps({"url": fake.url, "stats": f"http://127.0.0.1:{port}/hits"}), flush=True)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()


class _Discard(list[Any]):
    """A list that forgets what is appended (the fake's request log, unneeded here)."""

    def append(self, item: Any) -> None:
        return None


def main() -> int:
    if len(sys.argv) != 3 or sys.argv[1] not in {"pypi", "npm"}:
        print(__doc__, file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))  # for tests.fakes; this script runs from bench/
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(sys.argv[1], Path(sys.argv[2])))
    else:
        uvloop.run(serve(sys.argv[1], Path(sys.argv[2])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
