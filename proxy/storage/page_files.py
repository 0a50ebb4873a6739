"""Rendered pages too big for memory, kept as files and sent by ``sendfile``.

An npm packument can render to tens of megabytes (three times: plain, gzip, brotli); twenty
parallel installs must not hold twenty copies in memory, nor re-render one per request. The
renderings are derived data, so the directory is emptied at startup and a crash loses nothing.
A page that leaves the hot cache is not deleted at once: a response may be about to open its
file, so it is retired and unlinked after a grace period.
"""

from __future__ import annotations

import collections
import os
import secrets
import shutil
import threading
import time
from collections.abc import Mapping
from pathlib import Path

GRACE_SECONDS = 120.0

PageFile = tuple[str, str, int]  # content encoding ("" for none), path, size


class PageFiles:
    """The ``pages/`` directory under the data directory."""

    def __init__(self, root: Path, grace: float = GRACE_SECONDS) -> None:
        self.root = root
        self._grace = grace
        self._retired: collections.deque[tuple[float, tuple[PageFile, ...]]] = collections.deque()
        self._sweeping = threading.Lock()  # sweeps run in worker threads, possibly two at once

    def prepare(self) -> None:
        """Start empty (blocking: call from a worker thread)."""
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)

    def write(self, bodies: Mapping[str, bytes]) -> tuple[PageFile, ...]:
        """Write one page's renderings (blocking: call from a worker thread).

        Each file is written under a temporary name and renamed, so a reader never sees a
        partial page. No fsync: after a crash the directory is emptied anyway.
        """
        self.sweep()
        token = secrets.token_hex(12)
        written: list[PageFile] = []
        for encoding, body in bodies.items():
            path = self.root / f"{token}.{encoding or 'identity'}"
            tmp = path.with_name(path.name + ".part")
            with open(tmp, "wb") as out:
                out.write(body)
            os.replace(tmp, path)
            written.append((encoding, str(path), len(body)))
        return tuple(written)

    def retire(self, files: tuple[PageFile, ...]) -> None:
        """Mark a dropped page's files for deletion once no response can still be opening them."""
        if files:
            self._retired.append((time.monotonic(), files))

    def sweep(self, now: float | None = None) -> int:
        """Delete retired files past their grace period (blocking: call from a worker thread)."""
        now = time.monotonic() if now is None else now
        removed = 0
        with self._sweeping:
            while self._retired and now - self._retired[0][0] >= self._grace:
                _, files = self._retired.popleft()
                for _, path, _ in files:
                    try:
                        Path(path).unlink()
                        removed += 1
                    except FileNotFoundError:
                        pass
        return removed
