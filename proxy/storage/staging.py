"""Staging: where bytes wait until they are complete, durable and verified.

Every write into the cache (an upstream download, later an upload) streams into a temp file in
``data/tmp/`` while being hashed. ``finish()`` flushes, fsyncs, and checks the length and every
declared hash; only a :class:`StagedBlob` that passed may be handed to a blob store. Leaving the
writer's ``async with`` without ``finish()`` aborts it and removes the file, so abort is the default
on any error. Readers (single-flight waiters) may tail the file while it grows: ``progress`` says how
many bytes are written so far and wakes them on every advance. With encryption at rest the temp
file is sealed as it is written (storage/crypto.py): no plaintext ever reaches the disk, and
readers follow it chunk by chunk.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from proxy.model import CHECKABLE_HASHES, Digest
from proxy.storage.crypto import SealedReader, Sealer, open_plain

FLUSH_BYTES = 512 * 1024
FLUSH_SECONDS = 0.02
TEMP_SUFFIX = ".part"


class StagingError(Exception):
    """The staged bytes are not what was promised; nothing of them may be kept."""


class BlobCorrupt(StagingError):
    """A declared hash does not match the bytes."""


class BlobTruncated(StagingError):
    """The bytes are shorter (or longer) than declared."""


class BlobTooLarge(StagingError):
    """The bytes exceed the size limit of this write."""


@dataclass(frozen=True, slots=True)
class StagedBlob:
    """A complete, fsynced, verified temp file, ready to be renamed into the blob store."""

    path: Path
    digest: Digest
    size: int
    hashes: Mapping[str, str]


class Progress:
    """How far a staged file has been written; readers wait on it instead of polling."""

    def __init__(self) -> None:
        self.written = 0
        self.closed = False
        self._changed = asyncio.Event()

    def advance(self, written: int) -> None:
        self.written = written
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    async def wait_beyond(self, offset: int) -> None:
        """Return once more than ``offset`` bytes are written, or the writer is done."""
        while self.written <= offset and not self.closed:
            event = self._changed
            await event.wait()

    def _wake(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()


class StagedWriter:
    """One temp file being filled; see the module docstring for its life cycle."""

    def __init__(
        self,
        path: Path,
        expect: Mapping[str, str],
        expect_size: int | None,
        max_size: int,
        compute: tuple[str, ...] = (),
        sealer: Sealer | None = None,
    ) -> None:
        self.path = path
        self.progress = Progress()
        self._chunks = sealer.new_writer() if sealer is not None else None
        self._expect = {k: v.lower() for k, v in expect.items() if k in CHECKABLE_HASHES}
        self._expect_size = expect_size
        self._max_size = max_size
        self._hashers: dict[str, Any] = {"sha256": hashlib.sha256()}
        for name in (*self._expect, *compute):
            if name in CHECKABLE_HASHES:
                self._hashers.setdefault(name, hashlib.new(name))
        self._fd: int | None = None
        self._buffer = bytearray()
        self._size = 0
        self._last_flush = time.monotonic()
        self._done = False

    async def open(self) -> None:
        self._fd = await asyncio.to_thread(
            os.open,
            self.path,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
            0o600,
        )

    async def __aenter__(self) -> StagedWriter:
        if self._fd is None:
            await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._done:
            await self.abort()

    @property
    def size(self) -> int:
        return self._size + len(self._buffer)

    async def write(self, chunk: bytes) -> None:
        """Buffer a chunk; hand big batches (or any data after a pause) to a thread to write."""
        if self.size + len(chunk) > self._max_size:
            raise BlobTooLarge(f"larger than the limit of {self._max_size} bytes")
        self._buffer += chunk
        now = time.monotonic()
        if len(self._buffer) >= FLUSH_BYTES or now - self._last_flush >= FLUSH_SECONDS:
            await self.flush()

    async def flush(self) -> None:
        if not self._buffer:
            return
        data = bytes(self._buffer)
        self._buffer.clear()
        await asyncio.to_thread(self._write_and_hash, data)
        self._size += len(data)
        self._last_flush = time.monotonic()
        # Readers may read what is on disk: sealed, only the chunks already complete.
        self.progress.advance(self._size if self._chunks is None else self._chunks.sealed_plain)

    def _write_and_hash(self, data: bytes) -> None:
        for hasher in self._hashers.values():
            hasher.update(data)  # hashlib releases the GIL for large buffers
        self._write_raw(data if self._chunks is None else self._chunks.feed(data))

    def _write_raw(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def open_reader(self) -> FileReader:
        """A reader of what is written so far, in plaintext (blocking: call from a thread)."""
        fd = os.open(self.path, os.O_RDONLY)
        if self._chunks is None:
            return FileReader(fd, None)
        return FileReader(fd, SealedReader(fd, self._chunks.header, self._chunks.aead))

    async def finish(self) -> StagedBlob:
        """Flush, fsync and verify; on any mismatch the file is removed and an error raised."""
        try:
            await self.flush()
            if self._chunks is not None:
                await asyncio.to_thread(self._write_raw, self._chunks.finish(self._size))
                self.progress.advance(self._size)
            await asyncio.to_thread(self._sync_and_close)
            if self._expect_size is not None and self._size != self._expect_size:
                raise BlobTruncated(f"got {self._size} bytes, expected {self._expect_size}")
            actual = {name: h.hexdigest() for name, h in self._hashers.items()}
            for name, wanted in self._expect.items():
                if actual[name] != wanted:
                    raise BlobCorrupt(f"{name} mismatch: declared {wanted}, got {actual[name]}")
        except BaseException:
            await self.abort()
            raise
        self._done = True
        self.progress.close()
        return StagedBlob(self.path, Digest(actual["sha256"]), self._size, actual)

    def _sync_and_close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    async def abort(self) -> None:
        """Forget everything written: close and remove the temp file. Safe to call twice."""
        self._done = True
        self._buffer.clear()
        fd, self._fd = self._fd, None
        await asyncio.to_thread(_close_and_unlink, fd, self.path)
        self.progress.close()


def _close_and_unlink(fd: int | None, path: Path) -> None:
    if fd is not None:
        os.close(fd)
    path.unlink(missing_ok=True)


class FileReader:
    """Plaintext reads of a file, sealed or not (blocking: call from a thread)."""

    def __init__(self, fd: int, sealed: SealedReader | None) -> None:
        self.fd = fd
        self._sealed = sealed

    @property
    def plain(self) -> bool:
        """Whether the file holds plaintext (another process may then tail it by name)."""
        return self._sealed is None

    def read(self, offset: int, length: int, total: int) -> bytes:
        """Up to ``length`` bytes at ``offset``; ``total`` is the plaintext available so far."""
        if self._sealed is None:
            return os.pread(self.fd, length, offset)
        return self._sealed.read(offset, length, total)

    def close(self) -> None:
        os.close(self.fd)


class StagingArea:
    """The ``tmp/`` directory: same file system as the blobs, so commit is a rename."""

    def __init__(self, root: Path, sealer: Sealer | None = None) -> None:
        self.root = root
        self.sealer = sealer

    def prepare(self) -> int:
        """Create the directory and remove leftovers of a crash; returns how many were removed.

        Leftovers in subdirectories go too: those are the workers' own staging directories
        (``tmp/worker-N``) when this is the whole ``tmp/`` of a single process or a supervisor.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        removed = 0
        for leftover in self.root.iterdir():
            if leftover.is_dir() and not leftover.is_symlink():
                removed += sum(1 for p in leftover.iterdir() if p.is_file() and _unlinked(p))
            elif _unlinked(leftover):
                removed += 1
        return removed

    def create(
        self,
        expect: Mapping[str, str] | None = None,
        *,
        expect_size: int | None = None,
        max_size: int,
        compute: tuple[str, ...] = (),
    ) -> StagedWriter:
        """A writer for one new temp file; enter it with ``async with`` to open the file.

        ``compute`` names digests to report besides SHA-256 and the expected ones.
        """
        path = self.root / f"{uuid.uuid4().hex}{TEMP_SUFFIX}"
        return StagedWriter(path, expect or {}, expect_size, max_size, compute, self.sealer)

    def open_plain(self, staged: StagedBlob) -> BinaryIO:
        """A staged file's plaintext, for checking an upload's contents (blocking)."""
        return open_plain(staged.path, self.sealer)


def _unlinked(path: Path) -> bool:
    """Remove a leftover file (or link); False when it was already gone."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True
