"""``serve --workers N``: N processes on one port, one data directory, one index.

One Python process tops out at one core; the proxy's hot path (routing, auth, cached pages,
sendfile setup) is CPU-bound. The supervisor (this module's :func:`supervise`, the process the
operator starts) does the once-only startup work — migrate the index, seed the configured
repositories, remove temp files and page files left by a crash, clear stale lock files — and
then starts N copies of ``python -m proxy serve <same arguments> --worker I/N``. Each worker
binds the same address with ``SO_REUSEPORT`` (the kernel spreads connections among them) and
serves everything; they share the data directory and the SQLite index (WAL, short
``BEGIN IMMEDIATE`` transactions, a busy timeout). What keeps them consistent:

* cold keys take a cross-process lock (storage/locks.py): one upstream download per file
  whatever the number of workers, the other workers send the committed blob;
* every commit others must see bumps a shared counter (storage/generation.py) and each worker
  catches up before serving a request (server/changes.py): a publish, delete, quarantine, rule
  change or token revocation acknowledged by one worker holds in all of them for the next request;
* the audit chain's previous hash is read inside the same write transaction as the append.

Only worker 0 runs gc, and only it gets the supervisor's SIGHUP (its reload bumps the counter,
the others catch up). Everything else is per worker: access-time and last-used flushes, page
files (``pages/worker-I/``), upstream sessions and credential renewal (a renewal is one token
request per worker), webhook delivery (an event is delivered by the worker that recorded it),
``/-/metrics`` (per worker: scrape each, or sum).

The supervisor forwards SIGTERM/SIGINT to every worker and waits for them (no orphans); a worker
that dies unexpectedly is restarted after a short, growing delay, and a worker that keeps dying
(``MAX_RESTARTS`` within ``RESTART_WINDOW`` seconds) stops the whole service with status 1.
Workers ask the kernel for SIGTERM when the supervisor dies, so even a SIGKILLed supervisor
leaves no workers behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from proxy.config import Config, ConfigError

log = logging.getLogger("proxy.workers")

SUPERVISOR_ENV = "ARTIFACT_PROXY_SUPERVISOR_PID"
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
POLL_SECONDS = 0.1
KILL_GRACE = 10.0  # beyond shutdown_timeout, before a worker that ignores SIGTERM is killed
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, slots=True)
class WorkerRole:
    """Which of the supervisor's workers this process is."""

    index: int
    count: int

    @classmethod
    def parse(cls, value: str) -> WorkerRole:
        """``I/N`` as given to ``--worker``."""
        index, _, count = value.partition("/")
        role = cls(int(index), int(count))
        if not 0 <= role.index < role.count:
            raise ValueError(f"worker {value!r}: expected I/N with 0 <= I < N")
        return role


def default_count() -> int:
    """The CPUs this process may run on (a container's cpuset, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def become_worker() -> None:
    """In a worker, first thing: die with the supervisor (Linux), and not outlive it at all."""
    supervisor = os.environ.get(SUPERVISOR_ENV)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if supervisor is not None and os.getppid() != int(supervisor):
        raise SystemExit("the supervisor exited before this worker started")


@dataclass(slots=True)
class _Slot:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    restarts: list[float] = field(default_factory=list)
    start_at: float = 0.0  # when to (re)start, while proc is None


def supervise(config: Config, argv: Sequence[str], count: int) -> int:
    """Prepare the data directory once, run ``count`` workers, and supervise them."""
    host, port = config.server.host, config.server.port
    try:
        reservation, port = _check_port(host, port)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", host, port, exc)
        return 1
    try:
        try:
            asyncio.run(_prepare(config))
        except ConfigError as exc:
            print(f"artifact-proxy: configuration error: {exc}", file=sys.stderr)
            return 2
        except ConnectionError as exc:  # the cluster's index database never answered
            print(f"artifact-proxy: {exc}", file=sys.stderr)
            return 1
        extra = ["--listen", f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
        return _Supervisor(list(argv) + extra, count, config.server.shutdown_timeout).run()
    finally:
        if reservation is not None:
            reservation.close()


def _check_port(host: str, port: int) -> tuple[socket.socket | None, int]:
    """Fail early if something already listens there (``SO_REUSEPORT`` would silently share it
    with any process of the same user); for port 0, pick one and keep it reserved."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        port = probe.getsockname()[1]
    reservation = socket.socket(family, socket.SOCK_STREAM)
    reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        reservation.bind((host, port))  # bound, never listening: it takes no connections
    except OSError:
        reservation.close()
        raise
    return reservation, port


async def _prepare(config: Config) -> None:
    """The once-only startup work (see the module docstring)."""
    from proxy.app import _prepare_dirs, build_services
    from proxy.storage.locks import KeyLocks

    services = build_services(config, upstreams=False)
    removed = await asyncio.to_thread(_prepare_dirs, services.staging, services.blobs, services.page_files)
    if removed:
        log.info("removed %d leftover temp files from an earlier run", removed)
    await asyncio.to_thread(KeyLocks(config.server.data_dir / "locks").prepare)
    await services.index.open()
    try:
        await services.pipeline.registry.seed(config)
    finally:
        await services.index.close()


class _Supervisor:
    def __init__(self, argv: list[str], count: int, shutdown_timeout: float) -> None:
        self._argv = argv
        self._count = count
        self._shutdown_timeout = shutdown_timeout
        self._slots = [_Slot(i) for i in range(count)]
        self._signals: list[int] = []

    def run(self) -> int:
        handled = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]
        previous = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        try:
            log.info("starting %d workers", self._count)
            for slot in self._slots:
                self._start(slot)
            return self._loop()
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)

    def _loop(self) -> int:
        while True:
            while self._signals:
                signum = self._signals.pop(0)
                if signum == signal.SIGHUP:
                    first = self._slots[0].proc
                    if first is not None and first.poll() is None:
                        log.info("SIGHUP: asking worker 0 to reload the configuration")
                        first.send_signal(signal.SIGHUP)
                    continue
                log.info("%s: stopping %d workers", signal.Signals(signum).name, self._count)
                return 0
            now = time.monotonic()
            for slot in self._slots:
                if slot.proc is not None and (code := slot.proc.poll()) is not None:
                    slot.proc = None
                    slot.restarts = [t for t in slot.restarts if now - t < RESTART_WINDOW] + [now]
                    if len(slot.restarts) > MAX_RESTARTS:
                        log.error(
                            "worker %d keeps exiting (status %d, %d times in %.0fs); stopping",
                            slot.index,
                            code,
                            len(slot.restarts),
                            RESTART_WINDOW,
                        )
                        return 1
                    delay = min(0.25 * 2 ** (len(slot.restarts) - 1), 10.0)
                    log.warning("worker %d exited with %d; restarting in %.2fs", slot.index, code, delay)
                    slot.start_at = now + delay
                if slot.proc is None and now >= slot.start_at:
                    self._start(slot)
            time.sleep(POLL_SECONDS)

    def _start(self, slot: _Slot) -> None:
        env = dict(os.environ)
        env[SUPERVISOR_ENV] = str(os.getpid())
        command = [sys.executable, "-m", "proxy", *self._argv, "--worker", f"{slot.index}/{self._count}"]
        slot.proc = subprocess.Popen(command, env=env)
        log.info("worker %d started (pid %d)", slot.index, slot.proc.pid)

    def _stop_all(self) -> None:
        running = [s.proc for s in self._slots if s.proc is not None and s.proc.poll() is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self._shutdown_timeout + KILL_GRACE
        for proc in running:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker pid %d ignored SIGTERM; killing it", proc.pid)
                proc.kill()
                proc.wait()
