"""The legacy upload API that twine speaks: a multipart form with ``:action=file_upload``.

The file part streams into staging, checked against ``sha256_digest`` / ``md5_digest`` when the
client sent them (twine sends the form fields before the file) and against the upload size limit
while it streams. Then the name and version must agree three ways: the form, the filename, and
the metadata inside the archive (a wheel's ``METADATA``, an sdist's ``PKG-INFO``). Anything else
is a 400 that says why, and nothing is kept.
"""

from __future__ import annotations

import asyncio
import re
import tarfile
import zipfile
from collections.abc import Callable
from email.parser import BytesHeaderParser
from typing import Any, BinaryIO

from aiohttp import BodyPartReader, web

from proxy.errors import BadRequest, PayloadTooLarge
from proxy.formats.pypi_simple import normalize
from proxy.model import RepoRef
from proxy.pipeline.publish import Publisher, Upload, part_chunks
from proxy.storage.staging import StagedBlob

MAX_FIELD = 4 * 2**20  # a long description is the biggest text field
MAX_METADATA = 16 * 2**20
CHUNK = 256 * 1024
_WHEEL_RE = re.compile(
    r"^(?P<name>[A-Za-z0-9_.]+)-(?P<version>[A-Za-z0-9_.!+]+)(-\d[\w.]*)?-[\w.]+-[\w.]+-[\w.]+\.whl$"
)
_SDIST_RE = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+?)-(?P<version>[A-Za-z0-9_.!+]+)\.(tar\.gz|zip)$")
_RECORDED = (
    "summary",
    "requires_python",
    "metadata_version",
    "author",
    "author_email",
    "license",
    "home_page",
    "keywords",
    "description_content_type",
)


def _same_version(a: str, b: str) -> bool:
    """Versions compare equal regardless of case and of the '-'/'_' escaping in filenames."""
    return a.lower().replace("_", "-") == b.lower().replace("_", "-")


async def read_upload(request: web.Request, publisher: Publisher, ref: RepoRef) -> Upload:
    """Parse a twine upload into a validated :class:`Upload` (see the module docstring)."""
    if not request.content_type.startswith("multipart/form-data"):
        raise BadRequest("an upload must be multipart/form-data (use twine)")
    reader = await request.multipart()
    fields: dict[str, list[str]] = {}
    staged: StagedBlob | None = None
    filename = ""
    try:
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise BadRequest("nested multipart bodies are not accepted")
            if part.name == "content":
                if staged is not None:
                    raise BadRequest("an upload carries exactly one file")
                filename = _check_filename(part.filename or "")
                package = _form_identity(fields)[0]
                await publisher.check_allowed(ref, "pypi", package)
                staged = await _stage(part, fields, publisher)
            elif part.name:
                fields.setdefault(part.name, []).append(await _text(part))
        if staged is None:
            raise BadRequest("the upload has no 'content' file part")
        action = _one(fields, ":action")
        if action != "file_upload":
            raise BadRequest(f"unsupported :action {action!r} (only file_upload)")
        package, version = _form_identity(fields)
        _check_filename_identity(filename, package, version)
        companions = await asyncio.to_thread(
            _inspect_archive, lambda: publisher.staging.open_plain(staged), filename, package, version
        )
    except BaseException:
        if staged is not None:
            await asyncio.to_thread(staged.path.unlink, True)
        raise
    attributes: dict[str, Any] = {k: _one(fields, k) for k in _RECORDED if _one(fields, k)}
    for key in ("requires_dist", "classifiers", "provides_extra"):
        if fields.get(key):
            attributes[key] = fields[key]
    return Upload(
        package=package,
        version=version,
        filename=filename,
        staged=staged,
        content_type="application/octet-stream",
        attributes=attributes,
        companions=companions,
    )


def _one(fields: dict[str, list[str]], key: str) -> str:
    values = fields.get(key)
    return values[0].strip() if values else ""


def _form_identity(fields: dict[str, list[str]]) -> tuple[str, str]:
    raw_name, version = _one(fields, "name"), _one(fields, "version")
    if not raw_name or not version:
        raise BadRequest("the upload form must give 'name' and 'version' before the file")
    package = normalize(raw_name)
    if package is None:
        raise BadRequest(f"{raw_name!r} is not a valid project name")
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._+!-]{0,100}$", version):
        raise BadRequest(f"{version!r} is not a valid version")
    return package, version


def _check_filename(filename: str) -> str:
    if not filename or "/" in filename or "\\" in filename or "\x00" in filename or filename.startswith("."):
        raise BadRequest(f"invalid filename {filename!r}")
    if not (_WHEEL_RE.match(filename) or _SDIST_RE.match(filename)):
        raise BadRequest(f"{filename!r} is neither a wheel (.whl) nor an sdist (.tar.gz, .zip) filename")
    return filename


def _check_filename_identity(filename: str, package: str, version: str) -> None:
    m = _WHEEL_RE.match(filename) or _SDIST_RE.match(filename)
    assert m is not None
    if normalize(m.group("name")) != package or not _same_version(m.group("version"), version):
        raise BadRequest(
            f"{filename} does not match the form's name and version ({package} {version})",
            detail={"filename": filename, "name": package, "version": version},
        )


async def _text(part: BodyPartReader) -> str:
    data = bytearray()
    while chunk := await part.read_chunk(CHUNK):
        data += chunk
        if len(data) > MAX_FIELD:
            raise PayloadTooLarge(f"form field {part.name!r} is larger than {MAX_FIELD} bytes")
    return data.decode("utf-8", errors="replace")


async def _stage(part: BodyPartReader, fields: dict[str, list[str]], publisher: Publisher) -> StagedBlob:
    expect = {}
    if sha256 := _one(fields, "sha256_digest"):
        expect["sha256"] = sha256.lower()
    if md5 := _one(fields, "md5_digest"):
        expect["md5"] = md5.lower()
    return await publisher.stage(part_chunks(part, CHUNK), "the uploaded file", expect=expect)


def _inspect_archive(
    opener: Callable[[], BinaryIO], filename: str, package: str, version: str
) -> list[tuple[str, bytes, str]]:
    """Check the archive's own metadata; return the wheel's METADATA as a PEP 658 companion.

    ``opener`` gives the staged file's plaintext (it may be sealed on disk).
    """
    try:
        with opener() as path:
            metadata = _archive_metadata(path, filename)
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as exc:
        raise BadRequest(f"{filename} is not a readable archive: {exc}") from exc
    headers = BytesHeaderParser().parsebytes(metadata)
    inner_name, inner_version = headers.get("Name", ""), headers.get("Version", "")
    if normalize(inner_name) != package or not _same_version(inner_version, version):
        raise BadRequest(
            f"the metadata inside {filename} says {inner_name} {inner_version}, "
            f"the upload says {package} {version}"
        )
    if filename.endswith(".whl"):
        return [(f"{filename}.metadata", metadata, "text/plain; charset=utf-8")]
    return []


def _archive_metadata(path: BinaryIO, filename: str) -> bytes:
    if filename.endswith(".whl"):
        with zipfile.ZipFile(path) as wheel:
            infos = [
                i
                for i in wheel.infolist()
                if i.filename.count("/") == 1 and i.filename.endswith(".dist-info/METADATA")
            ]
            if len(infos) != 1 or infos[0].file_size > MAX_METADATA:
                raise BadRequest(f"{filename} has no single .dist-info/METADATA")
            metadata = wheel.read(infos[0])
    elif filename.endswith(".zip"):
        with zipfile.ZipFile(path) as archive:
            infos = [
                i
                for i in archive.infolist()
                if i.filename.count("/") == 1 and i.filename.endswith("/PKG-INFO")
            ]
            if not infos or infos[0].file_size > MAX_METADATA:
                raise BadRequest(f"{filename} has no top-level PKG-INFO")
            metadata = archive.read(infos[0])
    else:
        metadata = _sdist_pkg_info(path, filename)
    return metadata


def _sdist_pkg_info(path: BinaryIO, filename: str) -> bytes:
    with tarfile.open(fileobj=path, mode="r:gz") as tar:
        for member in tar:
            if member.isfile() and member.name.count("/") == 1 and member.name.endswith("/PKG-INFO"):
                if member.size > MAX_METADATA:
                    break
                handle = tar.extractfile(member)
                if handle is not None:
                    return handle.read()
    raise BadRequest(f"{filename} has no top-level PKG-INFO")
