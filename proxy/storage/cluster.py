"""Per-key locks across the nodes of a cluster: one download of a cold key for the whole cluster.

On one machine a cold key takes an ``flock`` (storage/locks.py) and the other workers tail the
holder's growing temp file. Nodes on other machines cannot see that file, so in a cluster the
holder of the local lock also takes a PostgreSQL advisory lock on the key: the other nodes wait
for it, then find the committed row in the shared index and serve the blob from the bucket.

Advisory locks belong to a database session, and PostgreSQL releases them when the session
ends, so a node that dies mid-download (killed, its machine gone) frees its keys at once and
wedges nothing. A node that waited and then finds no committed file downloads it itself rather
than failing its clients: the holder died or gave up, and unlike a worker on the same machine
there is no shared failure it could have seen (:attr:`ClusterHeld.waited` stays about this
machine only, so a local waiter still fails fast with its local holder, as before).

All of a process's keys are held on one dedicated connection (session locks are per session),
taken with ``pg_try_advisory_lock`` and polled with a growing sleep, as the flock is: a
blocking ``pg_advisory_lock`` would pin a connection per waiter.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from typing import Any

import asyncpg

from proxy.storage.locks import Held, KeyLocks
from proxy.storage.postgres import CONNECT_TIMEOUT

log = logging.getLogger("proxy.cluster")

FIRST_WAIT = 0.005
MAX_WAIT = 0.05


def lock_key(key: Hashable) -> int:
    """A signed 64-bit advisory lock key for ``key`` (what PostgreSQL's bigint form takes)."""
    digest = hashlib.sha256(b"flight:" + repr(key).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class ClusterHeld:
    """A key held on this machine (if it has workers) and in the cluster. ``waited`` is about
    this machine's workers only: a wait for another node is counted in ``contended``."""

    def __init__(self, local: Held | None) -> None:
        self._local = local
        self.waited = local.waited if local is not None else False

    async def announce(self, note: bytes) -> None:
        if self._local is not None:
            await self._local.announce(note)


class ClusterLocks:
    """The same interface as :class:`KeyLocks` (``hold``, ``note``), over the cluster."""

    def __init__(self, dsn: str, local: KeyLocks | None = None) -> None:
        self._dsn = dsn
        self._local = local
        self._conn: asyncpg.Connection | None = None
        self._conn_lock = asyncio.Lock()  # one statement at a time on the session connection
        self.contended = 0  # acquisitions that waited for another node

    async def note(self, key: Hashable) -> bytes:
        return await self._local.note(key) if self._local is not None else b""

    @contextlib.asynccontextmanager
    async def hold(
        self,
        key: Hashable,
        patience: float | None = None,
        on_wait: Callable[[], Awaitable[None]] | None = None,
    ) -> AsyncIterator[ClusterHeld]:
        """Hold ``key`` on this machine, then in the cluster. Raises ``TimeoutError`` after
        ``patience`` seconds of waiting for either."""
        async with contextlib.AsyncExitStack() as stack:
            local: Held | None = None
            async with asyncio.timeout(patience):
                if self._local is not None:
                    local = await stack.enter_async_context(self._local.hold(key, None, on_wait))
                number = lock_key(key)
                waited = False
                wait = FIRST_WAIT
                while not await self._try(number):
                    waited = True
                    await asyncio.sleep(wait)
                    wait = min(wait * 2, MAX_WAIT)
            if waited:
                self.contended += 1
            try:
                yield ClusterHeld(local)
            finally:
                await asyncio.shield(self._unlock(number))

    async def _try(self, number: int) -> bool:
        async with self._conn_lock:
            conn = await self._session()
            try:
                return bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", number))
            except (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError):
                self._drop()
                raise

    async def _unlock(self, number: int) -> None:
        async with self._conn_lock:
            conn = self._conn
            if conn is None or conn.is_closed():
                return  # the session ended: PostgreSQL released its locks with it
            try:
                await conn.fetchval("SELECT pg_advisory_unlock($1)", number)
            except (OSError, asyncpg.InterfaceError, asyncpg.PostgresError) as exc:
                log.warning(
                    "releasing a cluster lock: %s (the session's locks go with it)", type(exc).__name__
                )
                self._drop()

    async def _session(self) -> Any:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self._dsn, timeout=CONNECT_TIMEOUT)
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    async def aclose(self) -> None:
        async with self._conn_lock:
            if self._conn is not None and not self._conn.is_closed():
                with contextlib.suppress(Exception):
                    await self._conn.close(timeout=2.0)
            self._conn = None
