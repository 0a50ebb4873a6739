"""Single-flight: one upstream download per cold key, however many clients ask at once.

The first ``join`` starts a task owned by the group (not by any request, so a client that hangs
up does not cancel the cache fill). The task streams the upstream body into a staging file; every
joiner tails that file as it grows, so the first byte reaches every client before the download
ends. The last bytes are held back until the blob is verified, committed and indexed: a reader
whose flight fails is aborted mid-body, never handed a complete-looking wrong file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from typing import Any

from proxy.storage.blobs import BlobInfo
from proxy.storage.staging import FileReader, Progress, StagedWriter

log = logging.getLogger("proxy.flight")

READ_CHUNK = 1024 * 1024

Fetch = Callable[["Flight"], Awaitable[BlobInfo]]
OnCommit = Callable[[BlobInfo], Awaitable[None]]


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

    async def attach(self, writer: StagedWriter, content_type: str, size: int | None) -> None:
        """Called by the fetch once the upstream answered: readers may start tailing."""
        self._reader = await asyncio.to_thread(writer.open_reader)
        self._fd = self._reader.fd
        self._progress = writer.progress
        self.content_type = content_type
        self.expected_size = size
        self._started.set()

    async def started(self) -> None:
        """Wait until headers are known; raises the flight's error if it failed before that."""
        if not self._started.is_set():
            waiter: asyncio.Future[Any] = asyncio.ensure_future(self._started.wait())
            pending: set[asyncio.Future[Any]] = {waiter, self.outcome}
            try:
                await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
        if self._progress is None:
            await asyncio.shield(self.outcome)  # raises the failure
            raise RuntimeError("flight finished without attaching a file")

    async def result(self) -> BlobInfo:
        return await asyncio.shield(self.outcome)

    async def stream(self) -> AsyncIterator[bytes]:
        """The bytes as they arrive; the final chunk only once the blob is committed."""
        await self.started()
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

    def __init__(self) -> None:
        self._flights: dict[Hashable, Flight] = {}
        self.started_count = 0
        self.joined_count = 0  # requests that joined a download already running

    def __len__(self) -> int:
        return len(self._flights)

    def join(self, key: Hashable, fetch: Fetch, on_commit: OnCommit | None = None) -> Flight:
        """The flight for ``key``, started now if none is running. The caller must ``release``.

        ``on_commit`` runs inside the flight task after the blob is committed and before any
        reader gets its last chunk (used to write each asking repository's index row).
        """
        flight = self._flights.get(key)
        if flight is None:
            flight = Flight(key)
            self._flights[key] = flight
            self.started_count += 1
            flight.task = asyncio.create_task(self._run(flight, fetch), name=f"flight {key!r}")
        else:
            self.joined_count += 1
        flight.acquire()
        if on_commit is not None:
            flight.callbacks.append(on_commit)
        return flight

    async def _run(self, flight: Flight, fetch: Fetch) -> None:
        try:
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

    async def aclose(self) -> None:
        """Cancel running downloads; their staging files are removed by the writers' abort."""
        tasks = [f.task for f in self._flights.values() if f.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task

    def snapshot(self) -> dict[str, Any]:
        return {"in_flight": len(self._flights), "started": self.started_count}
