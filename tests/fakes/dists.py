"""Hand-written builders of real, installable Python distributions.

The proxy tests need wheels and sdists that genuine installers (pip, uv)
accept, in many names, versions and sizes, and they need them in
milliseconds.  Running a build backend would be slow and would need the
network, so the archives are assembled directly with :mod:`zipfile` and
:mod:`tarfile`, following the wheel (PEP 427 / binary distribution format)
and sdist specifications closely enough for installers to trust them.

Everything here is synchronous and does blocking file I/O: call it from
sync fixtures or through :func:`asyncio.to_thread`, never directly on the
event loop thread.
"""

from __future__ import annotations

import base64
import csv
import gzip
import hashlib
import io
import os
import re
import tarfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "build_sdist",
    "build_wheel",
    "dist_name",
    "sha256_file",
    "wheel_metadata",
]

# Fixed timestamps make archives byte-identical across runs (apart from a
# random payload), so hashes in tests are stable and cache hits are real.
_ZIP_DATE = (2024, 1, 1, 0, 0, 0)
_TAR_MTIME = 1704067200  # 2024-01-01T00:00:00Z; after 1980 so zip-based builds work
_CHUNK = 1024 * 1024


def dist_name(name: str) -> str:
    """Return the escaped form of ``name`` used in distribution file names.

    Wheel and sdist file names (and the import package built here) must
    not contain ``-`` or ``.``; the binary distribution format spec says to
    collapse runs of ``-_.`` to ``_`` and lowercase.
    """
    return re.sub(r"[-_.]+", "_", name).lower()


def sha256_file(path: Path | str) -> str:
    """Return the hex SHA-256 of a file, reading it in chunks.

    Chunked so that 200 MB test wheels do not need to fit in memory twice.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _record_hash(digest: bytes) -> str:
    """Encode a digest the way RECORD wants it: urlsafe base64 without padding."""
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _zip_info(arcname: str, compress_type: int) -> zipfile.ZipInfo:
    """Build a ZipInfo with fixed time and permissions for reproducibility."""
    info = zipfile.ZipInfo(arcname, date_time=_ZIP_DATE)
    info.compress_type = compress_type
    info.external_attr = (0o100644 & 0xFFFF) << 16
    return info


def _metadata_text(
    name: str,
    version: str,
    summary: str,
    requires: Sequence[str],
    requires_python: str | None,
) -> str:
    """Render core metadata (Metadata-Version 2.1) as installers parse it."""
    lines = [
        "Metadata-Version: 2.1",
        f"Name: {name}",
        f"Version: {version}",
        f"Summary: {summary}",
    ]
    if requires_python is not None:
        lines.append(f"Requires-Python: {requires_python}")
    lines.extend(f"Requires-Dist: {req}" for req in requires)
    return "\n".join(lines) + "\n\n"


def build_wheel(
    dest: Path,
    name: str,
    version: str,
    *,
    requires: Sequence[str] = (),
    requires_python: str | None = None,
    payload_size: int = 0,
    summary: str = "test package",
) -> Path:
    """Write ``{norm}-{version}-py3-none-any.whl`` into ``dest`` and return its path.

    The wheel holds an importable package ``{norm}`` exposing
    ``__version__``, and, when ``payload_size`` > 0, a ``payload.bin`` of
    random bytes stored uncompressed so the wheel is about that big (random
    so that nothing along the way can compress it).  RECORD carries correct
    hashes, so installers that verify it accept the wheel.
    """
    norm = dist_name(name)
    dist_info = f"{norm}-{version}.dist-info"
    path = Path(dest) / f"{norm}-{version}-py3-none-any.whl"
    path.parent.mkdir(parents=True, exist_ok=True)

    small_files: list[tuple[str, bytes]] = [
        (f"{norm}/__init__.py", f'__version__ = "{version}"\n'.encode()),
    ]
    meta_files: list[tuple[str, bytes]] = [
        (
            f"{dist_info}/METADATA",
            _metadata_text(name, version, summary, requires, requires_python).encode(),
        ),
        (
            f"{dist_info}/WHEEL",
            (b"Wheel-Version: 1.0\nGenerator: tests.fakes.dists\nRoot-Is-Purelib: true\nTag: py3-none-any\n"),
        ),
    ]
    records: list[tuple[str, str, str]] = []

    with zipfile.ZipFile(path, "w") as zf:
        for arcname, data in small_files:
            zf.writestr(_zip_info(arcname, zipfile.ZIP_DEFLATED), data)
            records.append((arcname, _record_hash(hashlib.sha256(data).digest()), str(len(data))))
        if payload_size > 0:
            arcname = f"{norm}/payload.bin"
            info = _zip_info(arcname, zipfile.ZIP_STORED)
            info.file_size = payload_size  # lets zipfile decide on zip64 up front
            digest = hashlib.sha256()
            remaining = payload_size
            with zf.open(info, "w") as out:
                while remaining:
                    block = os.urandom(min(_CHUNK, remaining))
                    digest.update(block)
                    out.write(block)
                    remaining -= len(block)
            records.append((arcname, _record_hash(digest.digest()), str(payload_size)))
        for arcname, data in meta_files:
            zf.writestr(_zip_info(arcname, zipfile.ZIP_DEFLATED), data)
            records.append((arcname, _record_hash(hashlib.sha256(data).digest()), str(len(data))))
        record_name = f"{dist_info}/RECORD"
        records.append((record_name, "", ""))
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(records)
        zf.writestr(_zip_info(record_name, zipfile.ZIP_DEFLATED), buf.getvalue().encode())
    return path


def wheel_metadata(path: Path) -> bytes:
    """Return the raw ``*.dist-info/METADATA`` bytes of a wheel.

    This is exactly what PEP 658 says an index serves at
    ``{file_url}.metadata``, so tests can compare against it byte for byte.
    """
    with zipfile.ZipFile(path) as zf:
        for arcname in zf.namelist():
            top, _, rest = arcname.partition("/")
            if top.endswith(".dist-info") and rest == "METADATA":
                return zf.read(arcname)
    raise ValueError(f"{path} has no .dist-info/METADATA")


def _tar_add(tf: tarfile.TarFile, arcname: str, data: bytes | None) -> None:
    """Add a file (or a directory when ``data`` is None) with fixed ownership and time."""
    info = tarfile.TarInfo(arcname)
    info.mtime = _TAR_MTIME
    info.uname = info.gname = ""
    if data is None:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tf.addfile(info)
    else:
        info.mode = 0o644
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))


def build_sdist(dest: Path, name: str, version: str, *, summary: str = "test package") -> Path:
    """Write ``{norm}-{version}.tar.gz`` into ``dest`` and return its path.

    The archive has the layout of a real setuptools sdist (PKG-INFO,
    pyproject.toml, the package), so an installer could build it given
    setuptools; the proxy tests mostly just need it to be served and hashed.
    """
    norm = dist_name(name)
    base = f"{norm}-{version}"
    path = Path(dest) / f"{base}.tar.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    pkg_info = _metadata_text(name, version, summary, (), None).encode()
    pyproject = (
        "[build-system]\n"
        'requires = ["setuptools>=61"]\n'
        'build-backend = "setuptools.build_meta"\n'
        "\n"
        "[project]\n"
        f'name = "{name}"\n'
        f'version = "{version}"\n'
        f'description = "{summary}"\n'
        "\n"
        "[tool.setuptools]\n"
        f'packages = ["{norm}"]\n'
    ).encode()
    module = f'__version__ = "{version}"\n'.encode()

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        _tar_add(tf, base, None)
        _tar_add(tf, f"{base}/PKG-INFO", pkg_info)
        _tar_add(tf, f"{base}/pyproject.toml", pyproject)
        _tar_add(tf, f"{base}/{norm}", None)
        _tar_add(tf, f"{base}/{norm}/__init__.py", module)
    # gzip with mtime=0 and no embedded file name keeps the output reproducible.
    with open(path, "wb") as out, gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0) as gz:
        gz.write(raw.getvalue())
    return path
