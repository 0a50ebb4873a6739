"""A change counter shared by every process that opens the data directory.

Worker processes (``serve --workers N``) each keep in-memory views of the index: rendered pages,
asset rows, repository and grant snapshots, verified tokens. A publish, delete, quarantine, rule
change or token revocation committed by one process must be seen by every other one at once, so
every such commit increments this counter *after* its COMMIT, and each process compares it with
the value it last saw before serving a request. The counter is 8 bytes at the start of
``DATA_DIR/generation``, mapped into memory: the check on every request is a memory read, not a
system call nor a query (``PRAGMA data_version`` would cost a round trip to the SQLite thread
and changes on every audit or access-time write too). Increments happen under ``flock`` so two
writers never lose one; a torn read can only look like a change, which costs one reload.

Each process also remembers which increments were its own (``seen`` moves along when the
increment directly follows what it had seen): the writer already invalidated exactly what it
changed, so its own commits do not make it drop everything.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from pathlib import Path
from typing import Protocol


class ChangeCounter(Protocol):
    """What server/changes.py reads: this file's counter on one machine, or the cluster's
    (storage/postgres.py ``ClusterGeneration``) when nodes share a PostgreSQL index."""

    seen: int

    @property
    def is_open(self) -> bool: ...

    def read(self) -> int: ...

    def changed(self) -> bool: ...


_SIZE = 8
_FORMAT = "<Q"


class Generation:
    """See the module docstring. ``open`` and ``bump`` block (call them from a thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._map: mmap.mmap | None = None
        self.seen = 0  # the last value this process has caught up with

    def open(self) -> None:
        """Map the counter, creating it (as zero) if it does not exist yet."""
        if self._map is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.fstat(fd).st_size < _SIZE:
                    os.ftruncate(fd, _SIZE)  # zero-filled
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
            self._map = mmap.mmap(fd, _SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.seen = self.read()

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def is_open(self) -> bool:
        return self._map is not None

    def read(self) -> int:
        """The current value (a memory read; 0 when not open)."""
        if self._map is None:
            return 0
        value: int = struct.unpack_from(_FORMAT, self._map, 0)[0]
        return value

    def changed(self) -> bool:
        """Whether another process committed a change this process has not caught up with."""
        return self._map is not None and self.read() != self.seen

    def bump(self) -> int:
        """Increment after a commit; returns the new value (blocking: a short ``flock``)."""
        if self._map is None or self._fd is None:
            return 0
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            old = self.read()
            new = (old + 1) & 0xFFFF_FFFF_FFFF_FFFF
            struct.pack_into(_FORMAT, self._map, 0, new)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        if old == self.seen:  # nobody else changed anything in between: nothing to catch up on
            self.seen = new
        return new
