"""moto's standalone S3 server on a loopback port, for the S3 blob backend's tests.

Started as a subprocess from a synchronous fixture (outside the event loop, so blockbuster
does not object); stopped by its PID. Where moto is not installed the tests that need it are
skipped with a message saying how to install it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

# moto accepts any key; these are fakes, and only ever sent to the loopback server.
FAKE_ENV = {"AWS_ACCESS_KEY_ID": "AKIAMOTOTESTKEY00001", "AWS_SECRET_ACCESS_KEY": "moto-secret-not-real-0001"}


@dataclass(frozen=True, slots=True)
class MotoServer:
    endpoint: str
    process: subprocess.Popen[bytes]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def moto_command() -> list[str] | None:
    """How to start moto's server, or None when it is not installed."""
    exe = Path(sys.executable).with_name("moto_server")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("moto_server")
    return [found] if found else None


@contextmanager
def moto_server(log: Path) -> Iterator[MotoServer]:
    """A running moto server; skips the calling test where moto cannot be found."""
    command = moto_command()
    if command is None:
        pytest.skip("moto's server is not installed: pip install 'moto[server]' (in the 'test' extra)")
    port = free_port()
    env = {**os.environ, "S3_UPLOAD_PART_MIN_SIZE": str(5 * 2**20)}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*command, "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=out, env=env
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto server did not start: {log.read_text(errors='replace')[-2000:]}")
                time.sleep(0.1)
        yield MotoServer(f"http://127.0.0.1:{port}", process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
