"""A throw-away PostgreSQL server for the tests of the shared index (issue #12).

Debian's server binaries (package ``postgresql``; ``/usr/lib/postgresql/<version>/bin``) are run
straight from the test: ``initdb`` into a fresh directory under /tmp, then ``postgres`` on a free
loopback port with durability switched off (a test database never outlives the run, and fsync
would make every commit wait on the disk the other test processes share). One server per pytest
process (per xdist worker), started by a session fixture; each test gets a database of its own.

PostgreSQL refuses to run as root, and the tests run as root in CI and here, so as root the
server runs as the ``postgres`` system user: the process is started with that user's ids
(``subprocess.Popen(user=…)``, which is what ``runuser -u postgres --`` does, minus the extra
process in between: the PID we hold is the postmaster's own, so that SIGINT reaches it rather
than a wrapper that would turn it into a SIGTERM, PostgreSQL's *slow* shutdown). Its directory is
a fresh ``mkdtemp`` directory under /tmp, chmod 0755 and chowned to that user, because pytest's
own temporary directories (/tmp/pytest-of-root, 0700) are closed to other users.

``ARTIFACT_PROXY_TEST_POSTGRES=postgresql://user:password@host:port/db`` uses an existing server
instead: nothing is started, and the fixtures only create (and drop) databases on it.

Where neither is available the tests that need PostgreSQL skip, naming what is missing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.s3_server import free_port

if TYPE_CHECKING:
    from asyncpg import Connection

ENV_DSN = "ARTIFACT_PROXY_TEST_POSTGRES"
SUPERUSER = "postgres"  # initdb -U: the same name whether or not we run as root
RUN_AS = "postgres"  # the system user the server runs as when the tests run as root
START_TIMEOUT = 30.0
DIR_PREFIX = "proxy-pg-"
_BINARIES = ("initdb", "postgres", "pg_isready")

T = TypeVar("T")


def find_bindir() -> Path | None:
    """The directory of PostgreSQL's server binaries: Debian's newest version, else ``pg_config``'s.

    Debian keeps ``initdb`` and ``postgres`` off PATH (they are per version), so PATH alone is
    not enough; ``pg_config --bindir`` covers other layouts (a source build, Homebrew).
    """

    def usable(bindir: Path) -> bool:
        return all(os.access(bindir / name, os.X_OK) for name in _BINARIES)

    def version(bindir: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", bindir.parent.name)) or (0,)

    for bindir in sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True):
        if usable(bindir):
            return bindir
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10)
            if out.returncode == 0 and out.stdout.strip() and usable(Path(out.stdout.strip())):
                return Path(out.stdout.strip())
    initdb = shutil.which("initdb")
    if initdb is not None and usable(Path(initdb).parent):
        return Path(initdb).parent
    return None


def missing_reason() -> str | None:
    """Why a server cannot be started here (a message for ``pytest.skip``), or None."""
    if find_bindir() is None:
        return (
            "PostgreSQL's server binaries (initdb, postgres, pg_isready) were not found in "
            "/usr/lib/postgresql/*/bin nor by pg_config: install the Debian package `postgresql` "
            f"(scripts/test does), or point {ENV_DSN} at a server"
        )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(RUN_AS)
        except KeyError:
            return (
                f"running as root, and PostgreSQL refuses to run as root, but there is no "
                f"`{RUN_AS}` system user to run it as (the Debian package `postgresql` creates it)"
            )
    return None


def dsn_for(base: str, database: str) -> str:
    """``base`` (any database on the server) with its database replaced by ``database``."""
    parts = urlsplit(base)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from synchronous code (a sync fixture), on a loop in a
    thread of its own: ``asyncio.run`` on the calling thread would unset the current event loop
    that pytest-asyncio may have set there."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="postgres-admin") as pool:
        return pool.submit(asyncio.run, coro).result()


async def _connect(dsn: str) -> Connection[Any]:
    import asyncpg  # the runtime dependency; imported here so that a missing one skips, not errors

    return await asyncpg.connect(dsn, timeout=10)


async def create_database(admin_dsn: str, name: str) -> str:
    """Create database ``name`` (UTF-8, C collation) on the server of ``admin_dsn``; its DSN."""
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise ValueError(f"not a plain database name: {name!r}")
    conn = await _connect(admin_dsn)
    try:
        await conn.execute(
            f"CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'"
        )
    finally:
        await conn.close()
    return dsn_for(admin_dsn, name)


async def drop_database(admin_dsn: str, name: str) -> None:
    """Drop database ``name``, ending whatever sessions a test (or a killed proxy) left on it."""
    conn = await _connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _is_postmaster(pid: int, data_dir: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return False
    return bool(cmdline) and cmdline[0].endswith(b"postgres") and os.fsencode(data_dir) in cmdline


def sweep_leftovers(tmp: Path) -> None:
    """Stop the servers, and remove the directories, of test runs that died without cleaning up
    (a SIGKILLed pytest never runs its finalizers): a leaked server would hold memory and a port
    for as long as the machine runs. A directory is left alone while its owner process lives."""
    for root in tmp.glob(DIR_PREFIX + "*"):
        with contextlib.suppress(OSError, ValueError):
            owner = int((root / "owner").read_text())
            if _alive(owner):
                continue
            data = root / "data"
            with contextlib.suppress(OSError, ValueError, IndexError):
                pid = int((data / "postmaster.pid").read_text().splitlines()[0])
                if _is_postmaster(pid, data):
                    os.kill(pid, signal.SIGINT)  # a fast shutdown frees its shared memory
                    deadline = time.monotonic() + 10
                    while _alive(pid) and time.monotonic() < deadline:
                        time.sleep(0.05)
                    if _alive(pid):
                        os.kill(pid, signal.SIGKILL)
            shutil.rmtree(root, ignore_errors=True)


@dataclass
class PostgresServer:
    """A PostgreSQL cluster of its own on 127.0.0.1 (synchronous: start it from a sync fixture)."""

    bindir: Path
    port: int = 0
    root: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    startup_seconds: float = 0.0
    _names: Iterator[int] = field(default_factory=itertools.count)

    @property
    def data_dir(self) -> Path:
        assert self.root is not None
        return self.root / "data"

    @property
    def log(self) -> Path:
        assert self.root is not None
        return self.root / "postgres.log"

    @property
    def dsn(self) -> str:
        """The superuser's DSN for the ``postgres`` database (trust authentication: no password)."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/postgres"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def _as_server_user(self) -> dict[str, Any]:
        """Popen arguments that run the child as the ``postgres`` user when we are root."""
        if os.geteuid() != 0:
            return {}
        user = pwd.getpwnam(RUN_AS)
        return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}

    def _env(self) -> dict[str, str]:
        # The C locale (no locale needs generating) and none of our PG* settings.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        if os.geteuid() == 0:
            env.update(HOME=str(self.root), USER=RUN_AS, LOGNAME=RUN_AS)
        return env

    def start(self) -> None:
        """initdb and start the server; returns once it accepts connections (or raises)."""
        began = time.monotonic()
        tmp = Path("/tmp") if Path("/tmp").is_dir() else Path(tempfile.gettempdir())
        sweep_leftovers(tmp)
        self.root = Path(tempfile.mkdtemp(prefix=DIR_PREFIX, dir=tmp))
        (self.root / "owner").write_text(str(os.getpid()))
        self.root.chmod(0o755)
        if os.geteuid() == 0:
            user = pwd.getpwnam(RUN_AS)
            os.chown(self.root, user.pw_uid, user.pw_gid)
        try:
            init = subprocess.run(
                [
                    str(self.bindir / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    SUPERUSER,
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",  # nothing here must survive a power cut
                ],
                cwd=self.root,  # our own cwd may be closed to the server's user
                env=self._env(),
                capture_output=True,
                timeout=120,
                check=False,
                **self._as_server_user(),
            )
            if init.returncode != 0:
                raise RuntimeError(
                    f"initdb failed ({init.returncode}): {init.stderr.decode(errors='replace')}"
                )
            # A free port can be taken by another test process between our probe and the bind:
            # PostgreSQL then exits at once, and another port is tried.
            for attempt in range(3):
                self.port = free_port()
                if self._start_postgres(last=attempt == 2):
                    break
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began

    def _start_postgres(self, *, last: bool) -> bool:
        assert self.root is not None
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    str(self.bindir / "postgres"),
                    "-D",
                    str(self.data_dir),
                    "-k",
                    str(self.root),  # the Unix socket (and its lock) here, not in /var/run
                    "-p",
                    str(self.port),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=200",  # a cluster test: nodes x pool size, plus the tests'
                    "-c",
                    "shared_buffers=32MB",  # several servers at once on a small machine
                    "-c",
                    "log_min_messages=warning",
                ],
                cwd=self.root,
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # a ^C to pytest is not also a ^C to the server
                **self._as_server_user(),
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log.read_text(errors="replace")[-2000:]
                if not last and ("could not bind" in tail or "Address already in use" in tail):
                    return False
                raise RuntimeError(f"postgres exited at start with {self.process.returncode}:\n{tail}")
            ready = subprocess.run(
                [
                    str(self.bindir / "pg_isready"),
                    "-q",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-U",
                    SUPERUSER,
                    "-d",
                    "postgres",
                    "-t",
                    "2",
                ],
                env=self._env(),
                check=False,
                timeout=10,
            )
            if ready.returncode == 0:
                return True
            time.sleep(0.05)
        tail = self.log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"postgres did not accept connections in {START_TIMEOUT:.0f} s:\n{tail}")

    def stop(self) -> None:
        """Fast shutdown (SIGINT: roll back, disconnect, exit) by PID, SIGKILL if it lingers;
        then the directory goes."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                # Its backends notice the postmaster's death and exit on their own.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)

    def next_database_name(self) -> str:
        """A name unique on the server even when several test processes share it."""
        return f"proxy_test_{os.getpid()}_{next(self._names)}"


@dataclass
class ExternalPostgres:
    """A server we did not start (``ARTIFACT_PROXY_TEST_POSTGRES``): databases only."""

    dsn: str
    _names: Iterator[int] = field(default_factory=itertools.count)

    def next_database_name(self) -> str:
        return f"proxy_test_{os.getpid()}_{next(self._names)}"

    def stop(self) -> None:
        """Nothing was started."""


Postgres = PostgresServer | ExternalPostgres


def _asyncpg_missing() -> str | None:
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        return "asyncpg is not installed (a runtime dependency: pip install -e .)"
    return None


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Postgres]:
    """One PostgreSQL server for this pytest process (each xdist worker has its own), or the one
    ``ARTIFACT_PROXY_TEST_POSTGRES`` names. Skips, saying what is missing, where there is none."""
    why = _asyncpg_missing()
    if why is not None:
        pytest.skip(why)
    external = os.environ.get(ENV_DSN)
    if external:
        yield ExternalPostgres(external)
        return
    why = missing_reason()
    if why is not None:
        pytest.skip(why)
    bindir = find_bindir()
    assert bindir is not None
    server = PostgresServer(bindir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_dsn(postgres_server: Postgres) -> Iterator[str]:
    """A fresh, empty database for this test (``proxy_test_<pid>_<n>``), dropped afterwards;
    its DSN connects as a superuser (the proxy's migrations create tables, the tests inspect)."""
    name = postgres_server.next_database_name()
    dsn = run_sync(create_database(postgres_server.dsn, name))
    try:
        yield dsn
    finally:
        run_sync(drop_database(postgres_server.dsn, name))


@contextlib.asynccontextmanager
async def connect(dsn: str) -> AsyncIterator[Connection[Any]]:
    """An asyncpg connection for a test to look at the database with (closed on exit)."""
    conn = await _connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()
