"""Process plumbing for the benchmark: start, wait for, measure and stop local servers.

Every process the benchmark starts goes through :class:`Processes`, so one ``finally`` can stop
all of them by PID (never by name), including after Ctrl-C. Servers run in their own session so
a terminal's Ctrl-C reaches only the benchmark, which then stops them in an orderly way.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO


class BenchError(RuntimeError):
    """A setup step failed; the message says which and where to look."""


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (racy in theory, fine for a single local benchmark)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _which(binary: str) -> str | None:
    """``which``, also looking in sbin: nginx lives there and sbin is not always on PATH."""
    return shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/usr/bin:/sbin")


def ensure_debian_tool(binary: str, packages: Sequence[str]) -> str:
    """Path of ``binary``, installing the first installable Debian package if it is missing.

    The references (nginx, wrk) are not Python packages, so they come from apt; ``apt-get
    update`` runs only when the first install attempt fails, which keeps reruns offline.
    """
    found = _which(binary)
    if found:
        return found
    if shutil.which("apt-get") is None:
        raise BenchError(f"{binary} is not installed and apt-get is not available")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    for attempt in ("install", "update+install"):
        if attempt == "update+install":
            subprocess.run([*sudo, "apt-get", "update", "-qq"], env=env, check=False, timeout=600)
        for package in packages:
            print(f"  installing {package} (apt-get) for {binary} ...", flush=True)
            result = subprocess.run(
                [*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", package],
                env=env,
                check=False,
                timeout=900,
                stdout=subprocess.DEVNULL,
            )
            found = _which(binary)
            if result.returncode == 0 and found:
                return found
    raise BenchError(f"could not install {binary} from {', '.join(packages)}")


@dataclass
class Processes:
    """Every child process the benchmark starts, so all of them can be stopped by PID."""

    children: list[subprocess.Popen[bytes]] = field(default_factory=list)
    extra_pids: dict[int, str] = field(default_factory=dict)

    def start(
        self,
        argv: Sequence[str],
        *,
        log: Path | None = None,
        stdout: int | IO[bytes] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        session: bool = True,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv``; stderr (and stdout unless given) goes to ``log``."""
        log_fh = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=stdout if stdout is not None else log_fh,
                stderr=log_fh,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=session,
            )
        finally:
            if log is not None and not isinstance(log_fh, int):
                log_fh.close()
        self.children.append(proc)
        return proc

    def adopt(self, pid: int, what: str) -> None:
        """Remember a grandchild (an nginx worker) so it is stopped even if its parent is not."""
        self.extra_pids[pid] = what

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Signal one child by PID, wait, and SIGKILL it if it does not exit in time."""
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)

    def stop_all(self) -> None:
        """Stop every child (newest first), then any adopted PID that outlived its parent."""
        for proc in reversed(self.children):
            try:
                self.stop(proc)
            except Exception as exc:
                print(f"warning: could not stop pid {proc.pid}: {exc}")
        for pid, what in self.extra_pids.items():
            if pid_alive(pid):
                print(f"warning: {what} (pid {pid}) outlived its parent; killing it")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (nginx workers of a master), from /proc."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(FileNotFoundError):
            children.extend(int(p) for p in (task / "children").read_text().split())
    return children


def http_get(
    url: str, headers: Mapping[str, str] | None = None, timeout: float = 30.0, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    """One blocking request: status, lower-cased headers, body. For checks, not for measuring."""
    request = urllib.request.Request(url, headers=dict(headers or {}), method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def wait_http(
    url: str, proc: subprocess.Popen[bytes], what: str, log: Path | None, timeout: float = 60.0
) -> None:
    """Poll ``url`` until it answers 200; fail early if the server process died."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with status {proc.returncode}; see {log}")
        try:
            status, _, _ = http_get(url, timeout=2.0)
            if status == 200:
                return
            last = f"HTTP {status}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise BenchError(f"{what} not ready at {url} after {timeout:.0f}s ({last}); see {log}")


def _status_kib(pid: int, key: str) -> int:
    """One ``Vm*`` field of /proc/PID/status in KiB (0 when the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except FileNotFoundError:
        return 0
    return 0


def rss_kib(pid: int) -> int:
    """Current resident set size of one process in KiB."""
    return _status_kib(pid, "VmRSS")


def process_tree(pid: int) -> list[int]:
    """``pid`` and its direct children: the proxy alone, or an nginx master with its workers."""
    return [pid, *child_pids(pid)]


def reset_peak_rss(pids: Sequence[int]) -> bool:
    """Reset VmHWM (write 5 to clear_refs) so the peak covers only the next measurement."""
    ok = True
    for pid in pids:
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError:
            ok = False
    return ok


class RssSampler:
    """Samples the summed VmRSS of a process tree every ``interval`` in a background thread.

    Sampling complements VmHWM: it works without permission to reset the peak, and it shows
    the peak happened during the measurement rather than during warm-up.
    """

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.max_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rss-{pid}", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = sum(_status_kib(p, "VmRSS") for p in process_tree(self.pid))
            self.max_kib = max(self.max_kib, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def peak_hwm_kib(self) -> int:
        """Summed VmHWM over the tree (meaningful after :func:`reset_peak_rss`)."""
        return sum(_status_kib(p, "VmHWM") for p in process_tree(self.pid))


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM behaves like Ctrl-C, so the cleanup that stops every process still runs."""
    raise KeyboardInterrupt


def run_guarded(
    body: Callable[[], None],
    cleanup: Callable[[], None],
    expected: tuple[type[Exception], ...] = (BenchError,),
) -> int:
    """Run a benchmark's ``body``, then ``cleanup`` (stopping what it started) whatever happens:
    Ctrl-C or SIGTERM, an ``expected`` failure (its message printed), a bug (its traceback).
    Signals are ignored during the cleanup, so a second Ctrl-C cannot leave servers running.
    Returns the exit status."""
    signal.signal(signal.SIGTERM, _interrupt)
    status = 0
    try:
        body()
    except KeyboardInterrupt:
        print("\ninterrupted; stopping every process", flush=True)
        status = 130
    except expected as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        status = 1
    except Exception:
        traceback.print_exc()
        status = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        cleanup()
    return status
