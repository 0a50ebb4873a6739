"""The benchmark's upstream: the test suite's FakePyPI in a process of its own.

Run by ``run.py`` as a subprocess so the upstream never shares the proxy's event loop or core.
It publishes the wheels listed in a manifest, prints one JSON line ``{"url": ...}`` on stdout
when it is serving, and runs until SIGTERM/SIGINT.

    python bench/upstream.py MANIFEST.json     # [{"project": ..., "path": ...}, ...]
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


async def serve(manifest: Path) -> None:
    """Publish every file, announce the index URL, then wait for a stop signal."""
    from tests.fakes.pypi import FakePyPI

    entries = json.loads(manifest.read_text())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with FakePyPI() as fake:
        for entry in entries:
            await fake.add_file_async(entry["project"], Path(entry["path"]))
        print(json.dumps({"url": fake.url}), flush=True)
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
