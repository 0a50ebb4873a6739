"""Single-flight: one upstream download per cold key, however many clients ask at once.

The first ``join`` starts a task owned by the group (not by any request, so a client that hangs
up does not cancel the cache fill). The task streams the upstream body into a staging file; every
joiner tails that file as it grows, so the first byte reaches every client before the download
ends. The last bytes are held back until the blob is verified, committed and indexed: a reader
whose flight fails is aborted mid-body, never handed a complete-looking wrong file.

With several worker processes the group is built with cross-process ``locks``
(storage/locks.py): the task takes the key's lock before anything else and holds it until the
index rows are written, and once it has the lock asks ``recheck`` whether another process
committed the file meanwhile: one upstream GET per cold key whatever the number of workers.
The holder writes the name of its staging file into the lock file, and a waiting process tails
that file as it grows (polling its size) so its clients get bytes before the download ends too;
when the lock comes free it asks ``recheck`` and releases the last bytes only if the holder
committed the blob of exactly that size (else its readers are aborted mid-body, as for a failed
download). An encrypted staging file is not announced: readers elsewhere then get the committed
blob (``attached`` stays false) once the holder is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from pathlib import Path
from typing import Any

from proxy.errors import UpstreamTimeout, UpstreamUnavailable
from proxy.storage.blobs import BlobInfo
from proxy.storage.locks import HeldKey, KeyLockGroup
from proxy.storage.staging import FileReader, Progress, StagedWriter

log = logging.getLogger("proxy.flight")

READ_CHUNK = 1024 * 1024
# What another worker may announce: its staging directory and a temp file's name in it, nothing
# that could point elsewhere.
WORKER_DIR = re.compile(r"worker-[0-9]{1,4}")
TEMP_NAME = re.compile(r"[0-9a-f]{32}\.part")

Fetch = Callable[["Flight"], Awaitable[BlobInfo]]
OnCommit = Callable[[BlobInfo], Awaitable[None]]
# After the cross-process lock is taken: the blob another process committed meanwhile, or None.
Recheck = Callable[["Flight"], Awaitable[BlobInfo | None]]


class Flight:
    """One download in progress; see the module docstring."""

    def __init__(self, key: Hashable) -> None:
        self.key = key
        self.content_type = "application/octet-stream"
        self.expected_size: int | None = None
        self.outcome: asyncio.Future[BlobInfo] = asyncio.get_running_loop().create_future()
        self._started = asyncio.Event()
        self._progress: Progress | None = None
        self._fd: int | None = None
        self._reader: FileReader | None = None
        self._users = 0
        self._done = False
        self.callbacks: list[OnCommit] = []
        # Companion blobs the fetch derived (e.g. PEP 658 metadata): (filename, blob, type).
        self.derived: list[tuple[str, BlobInfo, str]] = []
        self.task: asyncio.Task[None] | None = None
        self._held: HeldKey | None = None  # the cross-process lock, to announce the staging file
        self._foreign = False  # tailing another process' staging file

    async def attach(self, writer: StagedWriter, content_type: str, size: int | None) -> None:
        """Called by the fetch once the upstream answered: readers may start tailing."""
        self._reader = await asyncio.to_thread(writer.open_reader)
        self._fd = self._reader.fd
        self._progress = writer.progress
        self.content_type = content_type
        self.expected_size = size
        self._started.set()
        if self._held is not None and self._reader.plain:
            # Relative to tmp/: each worker stages in its own tmp/worker-N.
            note = {
                "file": f"{writer.path.parent.name}/{writer.path.name}",
                "size": size,
                "type": content_type,
            }
            await self._held.announce(json.dumps(note).encode())

    def follow(self, reader: FileReader, content_type: str, size: int | None) -> None:
        """Tail another process' staging file (see the module docstring)."""
        self._reader = reader
        self._fd = reader.fd
        self._progress = Progress()
        self._foreign = True
        self.content_type = content_type
        self.expected_size = size
        self._started.set()

    @property
    def attached(self) -> bool:
        """Whether there is a file to tail (false when another process committed the blob)."""
        return self._progress is not None

    async def started(self) -> None:
        """Wait until headers are known (or the blob is committed without a file to tail);
        raises the flight's error if it failed before that."""
        if not self._started.is_set():
            waiter: asyncio.Future[Any] = asyncio.ensure_future(self._started.wait())
            pending: set[asyncio.Future[Any]] = {waiter, self.outcome}
            try:
                await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
        if self._progress is None:
            await asyncio.shield(self.outcome)  # raises the failure; else committed elsewhere

    async def result(self) -> BlobInfo:
        return await asyncio.shield(self.outcome)

    async def stream(self) -> AsyncIterator[bytes]:
        """The bytes as they arrive; the final chunk only once the blob is committed."""
        await self.started()
        if self._progress is None:
            raise RuntimeError("no file to tail: send the committed blob instead")
        progress = self._progress
        assert progress is not None and self._fd is not None
        offset = 0
        while True:
            if offset < progress.written:
                size = min(READ_CHUNK, progress.written - offset)
                assert self._reader is not None
                chunk = await asyncio.to_thread(self._reader.read, offset, size, progress.written)
                if not chunk:
                    raise OSError("staging file shrank while being read")
                offset += len(chunk)
                is_last = progress.closed and offset >= progress.written
                if self.expected_size is not None and offset >= self.expected_size:
                    is_last = True
                if is_last:
                    info = await asyncio.shield(self.outcome)
                    if offset != info.size:
                        raise OSError("read past the committed size")
                    yield chunk
                    return
                yield chunk
                continue
            if progress.closed:
                info = await asyncio.shield(self.outcome)
                if offset >= info.size:
                    return
                continue
            await progress.wait_beyond(offset)

    @property
    def plain_fd(self) -> int | None:
        """The staging file's descriptor when it holds plaintext: a reader may ``sendfile`` from
        it (valid while the reader holds ``acquire``)."""
        reader = self._reader
        return self._fd if reader is not None and reader.plain else None

    async def spans(self) -> AsyncIterator[tuple[int, int]]:
        """``stream`` as ``(offset, length)`` ranges of the staging file instead of bytes, for
        ``sendfile``: no copy of the file passes through Python, so a hundred readers of one
        download hold no buffers. The same rule: the final range only once the blob is
        committed. Needs ``expected_size`` (the response has a Content-Length)."""
        await self.started()
        progress, limit = self._progress, self.expected_size
        if progress is None or limit is None:
            raise RuntimeError("no file of known size to tail: use stream() or the committed blob")
        offset = 0
        while offset < limit:
            end = min(progress.written, limit)
            if offset < end:
                if end >= limit or (progress.closed and end >= progress.written):
                    info = await asyncio.shield(self.outcome)
                    if end != info.size:
                        raise OSError("read past the committed size")
                    yield offset, end - offset
                    return
                yield offset, end - offset
                offset = end
                continue
            if progress.closed:
                info = await asyncio.shield(self.outcome)  # raises the failure
                if offset >= info.size:
                    return
                raise OSError("the staging file ended before its declared size")
            await progress.wait_beyond(offset)
        await asyncio.shield(self.outcome)

    def acquire(self) -> None:
        self._users += 1

    def release(self) -> None:
        self._users -= 1
        self._maybe_close()

    def _finish(self) -> None:
        self._done = True
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self._done and self._users <= 0 and self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


class FlightGroup:
    """The flights in progress, by key. Built once per app; closed at shutdown."""

    def __init__(
        self,
        locks: KeyLockGroup | None = None,
        lock_timeout: float | None = None,
        staging_root: Path | None = None,
    ) -> None:
        self._flights: dict[Hashable, Flight] = {}
        self._locks = locks
        self._lock_timeout = lock_timeout
        self._staging_root = staging_root  # where another process' announced file must be
        self.started_count = 0
        self.joined_count = 0  # requests that joined a download already running
        self.committed_elsewhere = 0  # flights another process had committed by the time of the lock

    def __len__(self) -> int:
        return len(self._flights)

    def join(
        self,
        key: Hashable,
        fetch: Fetch,
        on_commit: OnCommit | None = None,
        recheck: Recheck | None = None,
    ) -> Flight:
        """The flight for ``key``, started now if none is running. The caller must ``release``.

        ``on_commit`` runs inside the flight task after the blob is committed and before any
        reader gets its last chunk (used to write each asking repository's index row).
        ``recheck`` is asked first when the group has cross-process locks (module docstring).
        """
        flight = self._flights.get(key)
        if flight is None:
            flight = Flight(key)
            self._flights[key] = flight
            self.started_count += 1
            flight.task = asyncio.create_task(self._run(flight, fetch, recheck), name=f"flight {key!r}")
        else:
            self.joined_count += 1
        flight.acquire()
        if on_commit is not None:
            flight.callbacks.append(on_commit)
        return flight

    async def _run(self, flight: Flight, fetch: Fetch, recheck: Recheck | None) -> None:
        # The cross-process lock is let go only after the removal below: the index rows are
        # written by then, so the next holder's recheck finds them.
        async with contextlib.AsyncExitStack() as held:
            try:
                info = None
                if self._locks is not None:
                    locks = self._locks

                    async def follow() -> None:
                        await self._follow(locks, flight)

                    try:
                        hold = locks.hold(flight.key, self._lock_timeout, on_wait=follow)
                        flight._held = await held.enter_async_context(hold)
                    except TimeoutError as exc:
                        raise UpstreamTimeout(
                            "another worker's download of this file did not finish in time"
                        ) from exc
                    if flight._foreign:
                        await self._follow(locks, flight)  # the final size
                        assert flight._progress is not None
                        flight._progress.close()
                    if recheck is not None:
                        info = await recheck(flight)
                        if info is not None:
                            self.committed_elsewhere += 1
                    # The worker on this machine this one waited for failed (else recheck finds
                    # its blob): fail alike, as joiners of a failed download do, rather than
                    # fetch once per worker. Another *node* that held the key and left nothing
                    # died or gave up where this one cannot see why: this one downloads instead.
                    if info is None and (flight._foreign or flight._held.waited):
                        raise UpstreamUnavailable("the worker downloading this file failed; try again")
                if info is None:
                    info = await fetch(flight)
                while flight.callbacks:
                    await flight.callbacks.pop(0)(info)
            except BaseException as exc:
                if not flight.outcome.done():
                    flight.outcome.set_exception(exc)
                    flight.outcome.exception()  # mark retrieved: a failure with no reader is not a bug
                if isinstance(exc, asyncio.CancelledError):
                    raise
            else:
                flight.outcome.set_result(info)
            finally:
                # No await between the last callback and this removal: a join either sees this
                # flight with its callback still to run, or a finished one it will not join.
                self._flights.pop(flight.key, None)
                flight._finish()

    async def _follow(self, locks: KeyLockGroup, flight: Flight) -> None:
        """While another process holds the key: tail the file it announced, as it grows."""
        if flight._foreign:
            assert flight._progress is not None and flight._fd is not None
            size = (await asyncio.to_thread(os.fstat, flight._fd)).st_size
            if size > flight._progress.written:
                flight._progress.advance(size)
            return
        if flight.attached or self._staging_root is None:
            return
        try:
            note = json.loads(await locks.note(flight.key))
            name, size, ctype = str(note["file"]), note["size"], str(note["type"])
        except (ValueError, KeyError, TypeError):
            return  # nothing announced yet (or caught mid-write): look again next time
        folder, _, file = name.partition("/")
        if not WORKER_DIR.fullmatch(folder) or not TEMP_NAME.fullmatch(file):
            return
        if size is not None and not isinstance(size, int):
            return
        try:
            fd = await asyncio.to_thread(
                os.open, self._staging_root / folder / file, os.O_RDONLY | os.O_CLOEXEC
            )
        except OSError:
            return  # already committed or given up: the lock tells which, soon
        flight.follow(FileReader(fd, None), ctype, size)

    async def aclose(self) -> None:
        """Cancel running downloads; their staging files are removed by the writers' abort."""
        tasks = [f.task for f in self._flights.values() if f.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task

    async def close_locks(self) -> None:
        """Let go of the cluster lock session, if any (after :meth:`aclose`)."""
        closer = getattr(self._locks, "aclose", None)
        if closer is not None:
            await closer()

    def snapshot(self) -> dict[str, Any]:
        return {"in_flight": len(self._flights), "started": self.started_count}
