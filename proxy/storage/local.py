"""The local-disk blob store (layout in storage/blobs.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

from proxy.model import Digest
from proxy.storage.blobs import BlobInfo
from proxy.storage.staging import StagedBlob

READ_CHUNK = 1024 * 1024


class LocalBlobStore:
    """Blobs as files named by digest; commit is fsync + rename + directory fsync."""

    def __init__(self, root: Path) -> None:
        self.root = root / "sha256"

    def prepare(self) -> None:
        """Create the root directory (startup, off the event loop)."""
        self.root.mkdir(parents=True, exist_ok=True)

    def local_path(self, digest: Digest) -> Path:
        return self.root / digest.hex[:2] / digest.hex

    async def stat(self, digest: Digest) -> BlobInfo | None:
        try:
            st = await asyncio.to_thread(os.stat, self.local_path(digest))
        except FileNotFoundError:
            return None
        return BlobInfo(digest, st.st_size)

    async def put(self, staged: StagedBlob) -> BlobInfo:
        return await asyncio.to_thread(self._put, staged)

    def _put(self, staged: StagedBlob) -> BlobInfo:
        target = self.local_path(staged.digest)
        directory = target.parent
        if not directory.is_dir():
            directory.mkdir(parents=True, exist_ok=True)
            _fsync_dir(self.root)
        if target.exists():
            # Same digest means same bytes: keep the stored copy, drop the staged one.
            staged.path.unlink(missing_ok=True)
            return BlobInfo(staged.digest, target.stat().st_size)
        os.replace(staged.path, target)
        _fsync_dir(directory)
        return BlobInfo(staged.digest, staged.size)

    async def open(self, digest: Digest, offset: int = 0) -> AsyncIterator[bytes]:
        fd = await asyncio.to_thread(os.open, self.local_path(digest), os.O_RDONLY)
        try:
            while True:
                chunk = await asyncio.to_thread(os.pread, fd, READ_CHUNK, offset)
                if not chunk:
                    return
                offset += len(chunk)
                yield chunk
        finally:
            await asyncio.to_thread(os.close, fd)

    async def read_bytes(self, digest: Digest) -> bytes:
        """A whole (small) blob in memory, for documents derived from it."""
        return await asyncio.to_thread(self.local_path(digest).read_bytes)

    async def delete(self, digest: Digest) -> bool:
        path = self.local_path(digest)
        try:
            await asyncio.to_thread(path.unlink)
        except FileNotFoundError:
            return False
        return True


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable: the directory entry itself must reach the disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
