"""The local-disk blob store (layout in storage/blobs.py)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from proxy.model import Digest
from proxy.storage.blobs import BlobInfo, Location
from proxy.storage.crypto import SealedFileError, Sealer, open_plain
from proxy.storage.staging import StagedBlob

READ_CHUNK = 1024 * 1024


class LocalBlobStore:
    """Blobs as files named by digest; commit is fsync + rename + directory fsync."""

    def __init__(self, root: Path, sealer: Sealer | None = None) -> None:
        self.root = root / "sha256"
        self.sealer = sealer  # encryption at rest (storage/crypto.py), None when off

    def prepare(self) -> None:
        """Create the root directory (startup, off the event loop)."""
        self.root.mkdir(parents=True, exist_ok=True)

    def local_path(self, digest: Digest) -> Path:
        return self.root / digest.hex[:2] / digest.hex

    async def stat(self, digest: Digest) -> BlobInfo | None:
        """The blob's plaintext size, or None when it is not stored."""
        try:
            size = await asyncio.to_thread(self._plain_size, self.local_path(digest))
        except FileNotFoundError:
            return None
        return BlobInfo(digest, size)

    def _plain_size(self, path: Path) -> int:
        if self.sealer is None:
            return path.stat().st_size
        with open_plain(path, self.sealer) as f:
            return f.seek(0, os.SEEK_END)

    def open_plain_path(self, path: Path) -> BinaryIO:
        """A blob file's plaintext by path (verify walks files, not digests)."""
        return open_plain(path, self.sealer)

    def plain_sha256(self, path: Path) -> tuple[str, int] | None:
        """(sha256, size) of a blob file's plaintext; None when it does not open as one (a sealed
        file that fails to open or to authenticate is damaged). A missing file raises
        FileNotFoundError: gone is not damaged. Blocking: call from a thread."""
        h = hashlib.sha256()
        size = 0
        try:
            with self.open_plain_path(path) as f:
                while chunk := f.read(READ_CHUNK):
                    h.update(chunk)
                    size += len(chunk)
        except FileNotFoundError:
            raise
        except (OSError, ValueError, SealedFileError):
            return None
        return h.hexdigest(), size

    def open_plain(self, digest: Digest) -> BinaryIO:
        """A blob's plaintext as a seekable file, sealed or not (blocking: call from a thread)."""
        return open_plain(self.local_path(digest), self.sealer)

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
            return BlobInfo(staged.digest, staged.size)
        os.replace(staged.path, target)
        _fsync_dir(directory)
        return BlobInfo(staged.digest, staged.size)

    async def open(self, digest: Digest, offset: int = 0) -> AsyncIterator[bytes]:
        """The plaintext from ``offset`` on, in chunks."""
        f = await asyncio.to_thread(self.open_plain, digest)
        try:
            await asyncio.to_thread(f.seek, offset)
            while chunk := await asyncio.to_thread(f.read, READ_CHUNK):
                yield chunk
        finally:
            await asyncio.to_thread(f.close)

    async def read_bytes(self, digest: Digest) -> bytes:
        """A whole (small) blob in memory, for documents derived from it."""

        def read() -> bytes:
            with self.open_plain(digest) as f:
                return f.read()

        return await asyncio.to_thread(read)

    async def delete(self, digest: Digest) -> bool:
        path = self.local_path(digest)
        try:
            await asyncio.to_thread(path.unlink)
        except FileNotFoundError:
            return False
        return True

    async def locate(self, digest: Digest, *, fetch: bool = True) -> Location:
        """Always "local": whether the file exists is what a hit's integrity check finds out
        (storage/intact.py), so the single-node hit path pays nothing for the seam."""
        return "local"

    async def servable(self, digest: Digest) -> BlobInfo | None:
        """:meth:`stat` for a blob about to be sent: with an object store, only once it is where
        it is sent from (this node's disk, or the bucket when clients are redirected), so a
        blob another node stored is brought here first rather than answered as a 404."""
        if await self.locate(digest, fetch=False) == "missing":
            return None
        return await self.stat(digest)

    def presigned_url(self, digest: Digest) -> str | None:
        return None

    async def inventory(self) -> dict[str, tuple[Path | None, int, float]]:
        return await asyncio.to_thread(self._walk)

    def _walk(self) -> dict[str, tuple[Path | None, int, float]]:
        found: dict[str, tuple[Path | None, int, float]] = {}
        for path in self.root.glob("*/*"):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if path.is_file():
                found[path.name] = (path, st.st_size, st.st_mtime)
        return found

    async def inventory_pages(self) -> AsyncIterator[list[tuple[str, int, float]]]:
        """(digest, bytes stored, mtime) of every blob, one fan-out directory at a time, so a
        walk of a big store keeps little in memory (gc)."""
        for directory in await asyncio.to_thread(_fan_out_dirs, self.root):
            yield await asyncio.to_thread(_dir_blobs, directory)

    async def stored_size(self, digest: Digest) -> int:
        """Bytes the blob takes where it is stored, 0 when it is not stored."""
        try:
            return (await asyncio.to_thread(self.local_path(digest).stat)).st_size
        except (FileNotFoundError, NotADirectoryError):
            return 0

    async def close(self) -> None:
        return None


def _fan_out_dirs(root: Path) -> list[Path]:
    """The fan-out directories of a blob store (blocking)."""
    return sorted(p for p in root.glob("*") if p.is_dir())


def _dir_blobs(directory: Path) -> list[tuple[str, int, float]]:
    """(digest, bytes on disk, mtime) of the blob files of one fan-out directory (blocking)."""
    found = []
    with contextlib.suppress(FileNotFoundError), os.scandir(directory) as entries:
        for entry in entries:
            try:
                if entry.is_file():
                    st = entry.stat()
                    found.append((entry.name, st.st_size, st.st_mtime))
            except FileNotFoundError:
                continue
    return found


def rekey(blobs: LocalBlobStore, tmp: Path) -> tuple[int, int]:
    """Seal every blob with the current key (plaintext ones too); (rewritten, already current).

    Blocking. Each blob is decrypted into memory a chunk at a time, sealed into a temp file,
    fsynced and renamed over the old one, so a reader never sees a half-written blob and no
    plaintext reaches the disk. Safe while the proxy runs (open readers keep the old file).
    """
    sealer = blobs.sealer
    if sealer is None:
        raise ValueError("no encryption key is configured (server.encryption_key_env or _file)")
    current = sealer.keys.current()[0]
    rewritten = kept = 0
    tmp.mkdir(parents=True, exist_ok=True)
    for path in sorted(p for p in blobs.root.glob("*/*") if p.is_file()):
        with path.open("rb") as raw:
            header = raw.read(32)
        if header[:4] == b"APXE" and header[8:24].decode(errors="replace").strip() == current:
            kept += 1
            continue
        target = tmp / f"rekey-{path.name}.part"
        chunks = sealer.new_writer()
        total = 0
        with open_plain(path, sealer) as src, target.open("wb") as out:
            while block := src.read(1024 * 1024):
                total += len(block)
                out.write(chunks.feed(block))
            out.write(chunks.finish(total))
            out.flush()
            os.fsync(out.fileno())
        os.replace(target, path)
        _fsync_dir(path.parent)
        rewritten += 1
    return rewritten, kept


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable: the directory entry itself must reach the disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
