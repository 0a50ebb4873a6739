"""A blob is checked against its name before a cache hit sends it (invariant 1).

A blob is named by the SHA-256 of its bytes, yet the disk can change under it: a bit flip, an
operator's mistake, a file cut short or removed. Before a hit is sent the blob's file is stat'ed;
a file whose identity (inode, size, modification and change times) was hashed and found right
since it last changed is sent at once, any other is hashed first, in a worker thread, once however
many requests wait for it. A missing or corrupt blob is never served: a corrupt file is moved to
``DATA_DIR/quarantine/`` (as ``verify --repair`` does) and the caller fetches the file again.
Damage that keeps a file's inode, size and times (silent bit rot) is what ``verify`` is for.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

from cachetools import LRUCache

from proxy.model import Digest
from proxy.storage.local import LocalBlobStore

CHUNK = 1024 * 1024
# Blobs vouched for, most recently served first: ~250 bytes each, so a bounded few MB; a blob that
# falls out is hashed again on its next hit.
MEMO_LIMIT = 32_768

Signature = tuple[int, int, int, int]


class BlobCheck:
    """See the module docstring. One per resolver."""

    def __init__(self, blobs: LocalBlobStore, quarantine: Path) -> None:
        self._blobs = blobs
        self._quarantine = quarantine
        self._vouched: LRUCache[str, Signature] = LRUCache(MEMO_LIMIT)
        self._vouched_lock = threading.Lock()  # checks of different blobs run in parallel threads
        self._running: dict[str, asyncio.Future[str | None]] = {}

    async def damage(self, digest: Digest) -> str | None:
        """None when the blob holds the bytes its name says; else what is wrong with it.

        A blob kept in an object store (storage/s3.py) is brought to this node's disk first, and
        checked there; one served by a redirect to the store is not on this node to check (its
        copy in the store was hashed on the way in).
        """
        running = self._running.get(digest.hex)
        if running is not None:
            return await asyncio.shield(running)
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._running[digest.hex] = future
        try:
            where = await self._blobs.locate(digest, fetch=False)
            if where == "local":
                outcome = await asyncio.to_thread(self._check, digest)
            else:
                outcome = None if where == "remote" else "missing"
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: the waiters (if any) get it
            raise
        else:
            future.set_result(outcome)
            return outcome
        finally:
            self._running.pop(digest.hex, None)

    def _check(self, digest: Digest) -> str | None:
        path = self._blobs.local_path(digest)
        try:
            st = path.stat()
        except FileNotFoundError:
            self._forget(digest)
            return "missing"
        signature = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        with self._vouched_lock:
            vouched = self._vouched.get(digest.hex) == signature
        if vouched:
            return None
        try:
            actual = self._hash(path)
        except FileNotFoundError:
            return "missing"
        if actual == digest.hex:
            with self._vouched_lock:
                self._vouched[digest.hex] = signature
            return None
        self._forget(digest)
        self._quarantine.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(path, self._quarantine / digest.hex)
        except FileNotFoundError:
            return "missing"
        return "corrupt"

    def _forget(self, digest: Digest) -> None:
        with self._vouched_lock:
            self._vouched.pop(digest.hex, None)

    def _hash(self, path: Path) -> str | None:
        found = self._blobs.plain_sha256(path)
        return None if found is None else found[0]
