"""The blob store seam: bytes addressed by their SHA-256, nothing else.

On-disk layout of the local backend (``data/`` is the configured data directory)::

    data/index.sqlite3          the index (WAL mode), see storage/index.py
    data/blobs/sha256/ab/abcd…  one file per blob, named by its full hex digest, under a
                                directory named by the digest's first two hex characters
    data/tmp/*.part             staging files; same file system, so a commit is one rename;
                                removed at startup (they are what a crash leaves behind)

The backend is chosen by ``[storage] backend`` from the table in storage/backends.py: ``local``
(above) or ``s3`` (storage/s3.py: the bucket holds ``{prefix}sha256/{hex}``, and ``data/blobs/``
is this node's bounded cache of it, same layout). ``memory`` (storage/memory.py) is for the
contract tests only.

Nothing but blob files lives under ``blobs/``: aiohttp's FileResponse would happily serve a
``.gz`` sibling, and names from clients or upstreams never become paths (blobs are addressed by
hash only).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from proxy.model import Digest
from proxy.storage.staging import StagedBlob

# Where a blob is: a file on this node's disk, only in the object store (served by a redirect),
# or nowhere. The local backend always answers "local" (its existence check is the hit's own).
Location = Literal["local", "remote", "missing"]


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """What the store knows of one blob."""

    digest: Digest
    size: int


class BlobStore(Protocol):
    """Content-addressed storage. Knows digests, never formats or package names."""

    async def stat(self, digest: Digest) -> BlobInfo | None:
        """The blob's size, or None when it is not stored."""
        ...

    async def put(self, staged: StagedBlob) -> BlobInfo:
        """Make a verified staged file visible; idempotent (same digest is stored once)."""
        ...

    def open(self, digest: Digest, offset: int = 0) -> AsyncIterator[bytes]:
        """Stream the blob's bytes from ``offset``."""
        ...

    def local_path(self, digest: Digest) -> Path | None:
        """A path for sendfile when the blob is on local disk (no existence check)."""
        ...

    async def delete(self, digest: Digest) -> bool:
        """Remove a blob; True if it existed."""
        ...

    async def locate(self, digest: Digest, *, fetch: bool = True) -> Location:
        """Where the blob is, bringing it to local disk first when the backend can and ``fetch``
        (or its configuration) asks for it."""
        ...

    def presigned_url(self, digest: Digest) -> str | None:
        """A short-lived URL a client may fetch the blob from instead of this node, or None."""
        ...

    async def inventory(self) -> dict[str, tuple[Path | None, int, float]]:
        """Every stored blob: hex digest → (local file or None, bytes, modification time)."""
        ...

    def inventory_pages(self) -> AsyncIterator[list[tuple[str, int, float]]]:
        """The same, a page at a time, (hex digest, bytes, modification time): gc's walk, whose
        memory must not grow with the store."""
        ...

    async def stored_size(self, digest: Digest) -> int:
        """Bytes the blob takes where it is stored, 0 when it is not stored."""
        ...

    async def close(self) -> None:
        """Release connections (shutdown)."""
        ...
