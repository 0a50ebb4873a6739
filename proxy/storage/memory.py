"""A dict-backed blob store, for tests of the BlobStore contract only (not a config choice:
the serving path sends hits by sendfile from a local file, which a dict cannot give)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

from proxy.model import Digest
from proxy.storage.blobs import BlobInfo, Location
from proxy.storage.staging import StagedBlob


class MemoryBlobStore:
    """Blobs in a dict; ``put`` consumes the staged file like the disk backends do."""

    def __init__(self) -> None:
        self._blobs: dict[str, tuple[bytes, float]] = {}

    async def stat(self, digest: Digest) -> BlobInfo | None:
        found = self._blobs.get(digest.hex)
        return None if found is None else BlobInfo(digest, len(found[0]))

    async def put(self, staged: StagedBlob) -> BlobInfo:
        if staged.digest.hex not in self._blobs:
            data = await asyncio.to_thread(staged.path.read_bytes)
            self._blobs[staged.digest.hex] = (data, time.time())
        await asyncio.to_thread(staged.path.unlink, missing_ok=True)
        return BlobInfo(staged.digest, staged.size)

    async def open(self, digest: Digest, offset: int = 0) -> AsyncIterator[bytes]:
        found = self._blobs.get(digest.hex)
        if found is None:
            raise FileNotFoundError(digest.hex)
        if offset < len(found[0]):
            yield found[0][offset:]

    def local_path(self, digest: Digest) -> Path | None:
        return None

    async def delete(self, digest: Digest) -> bool:
        return self._blobs.pop(digest.hex, None) is not None

    async def locate(self, digest: Digest, *, fetch: bool = True) -> Location:
        return "remote" if digest.hex in self._blobs else "missing"

    def presigned_url(self, digest: Digest) -> str | None:
        return None

    async def inventory_pages(self) -> AsyncIterator[list[tuple[str, int, float]]]:
        yield [(name, len(data), at) for name, (data, at) in self._blobs.items()]

    async def stored_size(self, digest: Digest) -> int:
        found = self._blobs.get(digest.hex)
        return len(found[0]) if found is not None else 0

    async def inventory(self) -> dict[str, tuple[Path | None, int, float]]:
        return {d: (None, len(data), at) for d, (data, at) in self._blobs.items()}

    async def close(self) -> None:
        return None
