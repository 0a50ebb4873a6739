"""The npm benchmark's upstream: the test suite's FakeNpmRegistry in a process of its own.

Run by ``npm_bench.py`` as a subprocess so the upstream never shares a core's event loop with the
proxy or Verdaccio. It publishes the versions listed in a manifest, prints one JSON line
``{"url": ...}`` on stdout when it is serving, and runs until SIGTERM/SIGINT.

    python bench/npm_upstream.py MANIFEST.json
    # [{"name": ..., "version": ..., "path": ..., "dependencies": {...}}, ...]
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


async def serve(manifest: Path) -> None:
    """Publish every version, announce the registry URL, then wait for a stop signal."""
    from tests.fakes.npm import FakeNpmRegistry

    entries = json.loads(manifest.read_text())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with FakeNpmRegistry() as fake:
        for entry in entries:
            await fake.add_version_async(
                entry["name"],
                Path(entry["path"]),
                version=entry["version"],
                dependencies=entry.get("dependencies"),
            )
        print(json.dumps({"url": fake.url}), flush=True)
        await stop.wait()


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))  # for tests.fakes; this script runs from bench/
    asyncio.run(serve(Path(sys.argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
