"""npm's write API: publish, deprecate, dist-tags, unpublish.

``npm publish`` PUTs the packument with the tarball base64-encoded in ``_attachments``. The
tarball is decoded in slices straight into staging, checked against the ``dist.shasum`` and
``dist.integrity`` the client declared and against its declared length, and the
``package/package.json`` inside it must name the same package and version as the URL and the
document. ``npm deprecate`` (npm 11) PUTs the packument without attachments: only the
``deprecated`` fields of versions published here change. ``npm unpublish`` PUTs the packument
without the version (``/-rev/{rev}``), then DELETEs the tarball; a DELETE of the package removes
every version published here.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import json
import tarfile
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, BinaryIO

import orjson
from aiohttp import web

from proxy.errors import BadRequest, NotFound, PayloadTooLarge
from proxy.formats.npm_docs import sri_to_hashes
from proxy.model import RepoRef
from proxy.pipeline.publish import Publisher, Upload
from proxy.storage.staging import StagedBlob

DECODE_SLICE = 4 * 1024 * 1024  # base64 characters per slice (a multiple of 4)
MAX_MANIFEST = 8 * 2**20


async def read_document(request: web.Request, limit: int) -> dict[str, Any]:
    """The JSON body of a write, bounded: base64 makes a tarball a third larger."""
    budget = limit * 4 // 3 + MAX_MANIFEST
    if (request.content_length or 0) > budget:
        raise PayloadTooLarge(f"the document is larger than the limit of {budget} bytes")
    body = bytearray()
    async for chunk in request.content.iter_chunked(256 * 1024):
        body += chunk
        if len(body) > budget:
            raise PayloadTooLarge(
                f"the upload is larger than the limit of {limit} bytes (server.max_upload_size)"
            )
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise BadRequest("the body must be a JSON object (a packument)")
    return doc


async def read_publish(doc: dict[str, Any], package: str, publisher: Publisher) -> Upload:
    """Validate a publish document and stage its one tarball."""
    if doc.get("name") != package:
        raise BadRequest(f"the document names {doc.get('name')!r}, the URL {package!r}")
    versions = doc.get("versions")
    if not isinstance(versions, dict) or len(versions) != 1:
        raise BadRequest("a publish carries exactly one version")
    [(version, manifest)] = versions.items()
    if (
        not isinstance(manifest, dict)
        or manifest.get("name") != package
        or manifest.get("version") != version
    ):
        raise BadRequest(f"the manifest of {version!r} does not name {package}@{version}")
    attachments = doc.get("_attachments")
    if not isinstance(attachments, dict) or len(attachments) != 1:
        raise BadRequest("a publish carries exactly one tarball in _attachments")
    [(filename, attachment)] = attachments.items()
    expected_file = f"{package.rsplit('/', 1)[-1]}-{version}.tgz"
    if filename != expected_file and filename != f"{package}-{version}.tgz":
        raise BadRequest(f"the tarball must be called {expected_file}, not {filename!r}")
    if not isinstance(attachment, dict) or not isinstance(attachment.get("data"), str):
        raise BadRequest("the attachment has no base64 'data'")
    dist = manifest.get("dist") or {}
    hashes = sri_to_hashes(dist.get("integrity"), dist.get("shasum"))
    if not hashes:
        raise BadRequest("the manifest declares neither dist.integrity nor dist.shasum")
    length = attachment.get("length")
    staged = await _stage(attachment["data"], hashes, length if isinstance(length, int) else None, publisher)
    try:
        await asyncio.to_thread(
            _check_tarball, lambda: publisher.staging.open_plain(staged), package, version
        )
    except BaseException:
        await asyncio.to_thread(staged.path.unlink, True)
        raise
    clean = {k: v for k, v in manifest.items() if not k.startswith("_") or k == "_hasShrinkwrap"}
    clean["dist"] = {k: v for k, v in dist.items() if k != "tarball"}
    tags = doc.get("dist-tags") or {}
    return Upload(
        package=package,
        version=version,
        filename=expected_file,
        staged=staged,
        content_type="application/octet-stream",
        attributes={
            "manifest": clean,
            "sha512": staged.hashes.get("sha512", ""),
            "sha1": staged.hashes.get("sha1", ""),
            "tags": [t for t, v in tags.items() if v == version and isinstance(t, str)],
        },
    )


async def _stage(
    data: str, hashes: Mapping[str, str], length: int | None, publisher: Publisher
) -> StagedBlob:
    async def decoded() -> AsyncIterator[bytes]:
        for start in range(0, len(data), DECODE_SLICE):
            try:
                yield base64.b64decode(data[start : start + DECODE_SLICE], validate=True)
            except ValueError as exc:
                raise BadRequest("the attachment data is not valid base64") from exc

    # sha512 and sha1 are what readers later get as dist.integrity and dist.shasum.
    return await publisher.stage(
        decoded(),
        "the tarball",
        expect=hashes,
        expect_size=length,
        compute=("sha512", "sha1"),
        declared="integrity",
    )


def _check_tarball(opener: Callable[[], BinaryIO], package: str, version: str) -> None:
    """The package.json inside must name the same package and version."""
    try:
        with (
            opener() as raw,
            gzip.open(raw) as gz,
            tarfile.open(fileobj=io.BufferedReader(gz), mode="r|") as tar,
        ):
            for member in tar:
                if member.name.lstrip("./") == "package/package.json" and member.isfile():
                    if member.size > MAX_MANIFEST:
                        break
                    handle = tar.extractfile(member)
                    inner = json.loads(handle.read()) if handle else {}
                    if inner.get("name") != package or inner.get("version") != version:
                        raise BadRequest(
                            f"the tarball's package.json says {inner.get('name')}@{inner.get('version')}, "
                            f"the publish says {package}@{version}"
                        )
                    return
    except (OSError, EOFError, tarfile.TarError, ValueError) as exc:
        raise BadRequest(f"the tarball is not a readable .tgz: {exc}") from exc
    raise BadRequest("the tarball has no package/package.json")


def deprecations(doc: Mapping[str, Any]) -> dict[str, str | None]:
    """version -> deprecation message ('' or None: not deprecated) from a packument write."""
    out: dict[str, str | None] = {}
    for version, manifest in (doc.get("versions") or {}).items():
        if isinstance(manifest, dict):
            message = manifest.get("deprecated")
            out[str(version)] = message if isinstance(message, str) and message else None
    return out


def missing_versions(doc: Mapping[str, Any], published: set[str]) -> set[str]:
    """Versions published here that an unpublish document no longer lists."""
    listed = set((doc.get("versions") or {}).keys())
    return published - listed


def repo_and_package_error(ref: RepoRef, package: str) -> NotFound:
    return NotFound(
        f"{package!r} has no versions published in {ref.domain}/{ref.repository}",
        detail={"package": package},
    )
