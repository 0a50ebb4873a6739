"""Per-key locks across processes: one holder per cold key among every worker.

The in-process flight group (upstream/flight.py) makes concurrent misses of one worker share a
download; with several worker processes (``serve --workers N``) a key also takes this lock, an
``flock`` on ``DATA_DIR/locks/<sha256 of the key>.lock``, so exactly one process downloads and
the others wait, then find the committed blob in the index. ``flock`` is released by the kernel
when the holder dies, so a crashed worker never wedges a key.

The lock is taken with ``LOCK_NB`` and polled with a growing sleep: a blocking ``flock`` would
stall the event loop, and parking one thread per waiter would exhaust the thread pool. Each
process has at most one waiter per key (its flight), so polling is cheap.

The holder unlinks the file before it lets go, so the directory does not fill up with one file
per artifact ever fetched. That opens the classic race (a waiter locks the unlinked inode while a
newcomer creates and locks a fresh file), closed the classic way: after locking, the holder
checks that the path still names the inode it locked, and starts over otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from pathlib import Path
from typing import Protocol

FIRST_WAIT = 0.005
MAX_WAIT = 0.1


class Held:
    """A lock being held: the holder may leave a note in the lock file for the waiters (the
    temp file a download is being written to, so they can tail it)."""

    def __init__(self, fd: int, waited: bool) -> None:
        self._fd = fd
        self.waited = waited

    async def announce(self, note: bytes) -> None:
        await asyncio.to_thread(_write_note, self._fd, note)


class HeldKey(Protocol):
    """A held key: ``waited`` when another process on this machine held it first."""

    waited: bool

    async def announce(self, note: bytes) -> None: ...


class KeyLockGroup(Protocol):
    """Per-key locks across processes: :class:`KeyLocks` on one machine, or the cluster's
    (storage/cluster.py) when nodes share a PostgreSQL index."""

    def hold(
        self,
        key: Hashable,
        patience: float | None = None,
        on_wait: Callable[[], Awaitable[None]] | None = None,
    ) -> contextlib.AbstractAsyncContextManager[HeldKey]: ...

    async def note(self, key: Hashable) -> bytes: ...


class KeyLocks:
    """See the module docstring. One per process, over ``root`` (``DATA_DIR/locks``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.contended = 0  # how many acquisitions had to wait for another holder

    def prepare(self) -> None:
        """Start empty: at supervisor startup no process holds a lock (blocking)."""
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: Hashable) -> Path:
        return self.root / f"{hashlib.sha256(repr(key).encode()).hexdigest()}.lock"

    async def note(self, key: Hashable) -> bytes:
        """What the current holder of ``key`` announced (empty when nothing, or no holder)."""
        return await asyncio.to_thread(_read_note, self.path(key))

    @contextlib.asynccontextmanager
    async def hold(
        self,
        key: Hashable,
        patience: float | None = None,
        on_wait: Callable[[], Awaitable[None]] | None = None,
    ) -> AsyncIterator[Held]:
        """Hold the lock of ``key``; ``on_wait`` runs between attempts while another holds it.

        Raises ``TimeoutError`` after ``patience`` seconds of waiting.
        """
        path = self.path(key)
        waited = False
        wait = FIRST_WAIT
        async with asyncio.timeout(patience):
            while True:
                fd = await _attempt(path)
                if fd is not None:
                    break
                waited = True
                if on_wait is not None:
                    await on_wait()
                await asyncio.sleep(wait)
                wait = min(wait * 2, MAX_WAIT)
        if waited:
            self.contended += 1
        try:
            yield Held(fd, waited)
        finally:
            # Shielded: a cancelled holder still lets go (the release finishes in its thread).
            await asyncio.shield(asyncio.to_thread(_unlock, path, fd))


async def _attempt(path: Path) -> int | None:
    """One try in a worker thread; a try cancelled midway still lets go of what it took."""
    attempt = asyncio.ensure_future(asyncio.to_thread(_try_lock, path))
    try:
        return await asyncio.shield(attempt)
    except asyncio.CancelledError:

        def release(done: asyncio.Future[int | None]) -> None:
            if not done.cancelled() and done.exception() is None and (fd := done.result()) is not None:
                _unlock(path, fd)

        attempt.add_done_callback(release)
        raise


def _try_lock(path: Path) -> int | None:
    """An fd holding the lock on ``path``, or None when another holder has it."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:  # the directory went away (startup cleanup): recreate it
            path.parent.mkdir(parents=True, exist_ok=True)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            raise
        try:
            same = path.stat().st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # we locked a file its holder had already unlinked: try the new one


def _write_note(fd: int, note: bytes) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, note, 0)


def _read_note(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def _unlock(path: Path, fd: int) -> None:
    try:
        path.unlink(missing_ok=True)
    finally:
        os.close(fd)
