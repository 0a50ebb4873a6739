"""Leases: work that must run in one process at a time among all that share the index.

Every process serving one index — the workers of ``serve --workers N`` on one machine's SQLite
file, every node of a cluster on PostgreSQL, and the CLI run beside them — sees the same
``leases(name, holder, until)`` table (migration 0008). A lease is taken by writing our holder
id into the row of its name, which succeeds only when the row is absent, lapsed (``until`` in
the past) or already ours; it is kept by renewing ``until`` and given back by deleting the row.
A holder that dies without releasing frees the lease when ``until`` passes, without anyone's
help, so the time to live bounds how long a crash blocks the work (renew well inside it).

Names in use: ``gc`` (gc and verify --repair, storage/lifecycle.py) and ``credential:<upstream>``
(an expiring upstream token's renewal, upstream/credentials.py).

Times are wall-clock seconds (``time.time()``) compared across machines: nodes are expected to
keep their clocks in step (NTP), and the times to live are long against any skew worth having.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from proxy.storage.index import Index

log = logging.getLogger("proxy.leases")

# One statement, the same text on SQLite and PostgreSQL: insert, or take over a lapsed lease, or
# extend our own. The WHERE of DO UPDATE leaves a live lease of another holder alone, and the
# row count says which happened (1: ours now, 0: someone else's).
_ACQUIRE = (
    "INSERT INTO leases (name, holder, until) VALUES (?, ?, ?) "
    "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, until = excluded.until "
    "WHERE leases.until < ? OR leases.holder = excluded.holder"
)


def node_id() -> str:
    """A holder id naming this process: ``host:pid:random@pid-namespace`` (the random part tells a
    restarted process with a recycled pid, or a container's pid 1, from its predecessor; the
    namespace says where that pid means something: see :func:`dead_here`)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}@{PID_NAMESPACE}"


def _read_pid_namespace() -> str:
    try:
        return str(Path("/proc/self/ns/pid").readlink()).removeprefix("pid:[").removesuffix("]")
    except OSError:
        return "?"


# Read once, at import (a system call that blocking-call checks would refuse on the event loop);
# a process never changes its pid namespace.
PID_NAMESPACE = _read_pid_namespace()


def dead_here(holder: str) -> bool:
    """Whether ``holder`` is a process of this machine and pid namespace that no longer exists:
    its lease can be taken at once instead of after its time to live (a gc killed by the OOM
    killer or a SIGKILL should not block the next gc on the same machine for a minute). Any
    doubt (another host, another namespace, a pid that exists) answers False."""
    host, _, rest = holder.partition(":")
    pid_text, _, tail = rest.partition(":")
    namespace = tail.rpartition("@")[2]
    if host != socket.gethostname() or namespace != PID_NAMESPACE or namespace == "?":
        return False
    if not pid_text.isdigit() or int(pid_text) == os.getpid():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # exists, owned by someone else
    return False


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    name: str
    holder: str
    until: float


class LeaseBusy(Exception):
    """Another holder has the lease (``info`` says who, and until when at the latest)."""

    def __init__(self, info: LeaseInfo) -> None:
        super().__init__(f"lease {info.name} is held by {info.holder}")
        self.info = info


class Leases:
    """See the module docstring."""

    def __init__(self, index: Index) -> None:
        self.index = index

    async def acquire(self, name: str, holder: str, ttl: float) -> bool:
        """Take the lease for ``ttl`` seconds (or extend it, if ours); False if another holds it."""
        now = time.time()
        async with self.index.transaction(shared=False):
            cur = await self.index.db.execute(_ACQUIRE, (name, holder, now + ttl, now))
            if int(cur.rowcount) == 1:
                return True
            async with self.index.db.execute("SELECT holder FROM leases WHERE name = ?", (name,)) as rows:
                row = await rows.fetchone()
            if row is None or not dead_here(str(row[0])):
                return False
            log.info("lease %s: its holder %s is gone from this machine; taking it over", name, row[0])
            cur = await self.index.db.execute(
                "UPDATE leases SET holder = ?, until = ? WHERE name = ? AND holder = ?",
                (holder, now + ttl, name, str(row[0])),
            )
            return int(cur.rowcount) == 1

    async def renew(self, name: str, holder: str, ttl: float) -> bool:
        """Extend our lease; False when it is no longer ours (it lapsed and another took it)."""
        async with self.index.transaction(shared=False):
            cur = await self.index.db.execute(
                "UPDATE leases SET until = ? WHERE name = ? AND holder = ?", (time.time() + ttl, name, holder)
            )
            return int(cur.rowcount) == 1

    async def release(self, name: str, holder: str) -> None:
        """Give the lease back (nothing happens when it is not ours any more)."""
        async with self.index.transaction(shared=False):
            await self.index.db.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder))

    async def holder(self, name: str) -> LeaseInfo | None:
        """Who holds the lease now (None: nobody, or a holder whose lease lapsed)."""
        async with self.index.db.execute("SELECT holder, until FROM leases WHERE name = ?", (name,)) as cur:
            row = await cur.fetchone()
        if row is None or float(row[1]) < time.time():
            return None
        return LeaseInfo(name, str(row[0]), float(row[1]))

    @contextlib.asynccontextmanager
    async def hold(
        self, name: str, holder: str, ttl: float, *, wait: float = 0.0, poll: float = 1.0
    ) -> AsyncIterator[LeaseInfo]:
        """Hold the lease for the body, renewed every third of ``ttl``, released at the end.

        Raises :class:`LeaseBusy` when another holds it (after waiting up to ``wait`` seconds
        for it). Should a renewal find the lease gone (this process stalled longer than the time
        to live), that is logged; the body carries on, as the work it guards only needs the lease
        to keep others from starting alongside, not to be correct.
        """
        deadline = time.monotonic() + wait
        while not await self.acquire(name, holder, ttl):
            info = await self.holder(name)
            if info is None:
                continue  # released or lapsed since: take it now
            if time.monotonic() >= deadline:
                raise LeaseBusy(info)
            await asyncio.sleep(min(poll, max(deadline - time.monotonic(), 0.0)))
        keeper = asyncio.create_task(self._keep(name, holder, ttl), name=f"lease {name}")
        try:
            yield LeaseInfo(name, holder, time.time() + ttl)
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            try:
                await asyncio.shield(self.release(name, holder))
            except Exception as exc:  # noqa: BLE001 - it lapses by itself
                log.warning("could not release lease %s (it lapses within %.0fs): %s", name, ttl, exc)

    async def _keep(self, name: str, holder: str, ttl: float) -> None:
        while True:
            await asyncio.sleep(ttl / 3)
            try:
                if not await self.renew(name, holder, ttl):
                    log.error("lease %s was lost (this process stalled past its %.0fs)", name, ttl)
                    return
            except Exception as exc:  # noqa: BLE001 - tried again at the next third
                log.warning("could not renew lease %s: %s", name, exc)
