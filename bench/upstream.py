"""The benchmarks' upstream: a test-suite fake (FakePyPI or FakeNpmRegistry) in a process of its own.

Run by ``run.py`` and ``npm_bench.py`` as a subprocess so the upstream never shares the servers'
event loop or core. It publishes the files listed in a manifest, prints one JSON line
``{"url": ...}`` on stdout when it is serving, and runs until SIGTERM/SIGINT.

    python bench/upstream.py pypi MANIFEST.json   # [{"project": ..., "path": ...}, ...]
    python bench/upstream.py npm MANIFEST.json    # [{"name": ..., "version": ..., "path": ...,
                                                  #   "dependencies": {...}}, ...]
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


async def _publish(fake: Any, fmt: str, entry: dict[str, Any]) -> None:
    if fmt == "pypi":
        await fake.add_file_async(entry["project"], Path(entry["path"]))
    else:
        await fake.add_version_async(
            entry["name"],
            Path(entry["path"]),
            version=entry["version"],
            dependencies=entry.get("dependencies"),
        )


async def serve(fmt: str, manifest: Path) -> None:
    """Publish every entry, announce the upstream's URL, then wait for a stop signal."""
    from tests.fakes.npm import FakeNpmRegistry
    from tests.fakes.pypi import FakePyPI

    entries = json.loads(manifest.read_text())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with FakePyPI() if fmt == "pypi" else FakeNpmRegistry() as fake:
        for entry in entries:
            await _publish(fake, fmt, entry)
        print(json.dumps({"url": fake.url}), flush=True)
        await stop.wait()


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
