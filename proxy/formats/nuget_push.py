"""``nuget push``: a multipart PUT carrying one ``.nupkg``, checked before anything is kept.

The file streams into staging under the upload size limit. Then it must be a real package: a
zip archive with exactly one ``.nuspec`` at its root, whose id and version are valid (the
version is normalised as the protocol does). The nuspec is parsed with defusedxml. Symbol
packages (``.snupkg``, package type ``SymbolsPackage``) are refused with a message saying so:
this feed serves packages, not symbols.
"""

from __future__ import annotations

import asyncio
import functools
import zipfile
from collections.abc import Callable
from typing import Any, BinaryIO
from xml.etree.ElementTree import Element

from aiohttp import BodyPartReader, web

from proxy import xmlsafe as xml
from proxy.errors import BadRequest
from proxy.formats import nuget_docs as docs
from proxy.formats import nuget_versions as nv
from proxy.pipeline.publish import Publisher, Upload, part_chunks
from proxy.storage.staging import StagedBlob

CHUNK = 256 * 1024
MAX_NUSPEC = 4 * 2**20


async def read_push(request: web.Request, publisher: Publisher) -> Upload:
    """The validated upload of a push (see the module docstring)."""
    if not request.content_type.startswith("multipart/"):
        raise BadRequest("a push is multipart/form-data with the .nupkg as its one file part")
    reader = await request.multipart()
    staged: StagedBlob | None = None
    filename = ""
    try:
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise BadRequest("nested multipart bodies are not accepted")
            if part.filename is None and part.name != "package":
                await part.release()
                continue
            if staged is not None:
                raise BadRequest("a push carries exactly one package")
            filename = part.filename or "package.nupkg"
            staged = await _stage(part, publisher)
        if staged is None:
            raise BadRequest("the push has no package file part")
        opener = functools.partial(publisher.staging.open_plain, staged)
        package_id, version, catalog, nuspec = await asyncio.to_thread(inspect_package, opener, filename)
    except BaseException:
        if staged is not None:
            await asyncio.to_thread(staged.path.unlink, missing_ok=True)
        raise
    return Upload(
        package=package_id.lower(),
        version=version,
        filename=docs.nupkg_name(package_id, version),
        staged=staged,
        content_type="application/octet-stream",
        attributes={"catalog": catalog},
        companions=[(docs.nuspec_name(package_id, version), nuspec, "text/xml")],
    )


async def _stage(part: BodyPartReader, publisher: Publisher) -> StagedBlob:
    return await publisher.stage(part_chunks(part, CHUNK), "the package", compute=("sha512",))


def inspect_package(opener: Callable[[], BinaryIO], filename: str) -> tuple[str, str, dict[str, Any], bytes]:
    """(id, normalised version, catalog fields, nuspec bytes) of a .nupkg (blocking)."""
    if filename.lower().endswith(".snupkg"):
        raise BadRequest(_SYMBOLS)
    try:
        with opener() as raw, zipfile.ZipFile(raw) as archive:
            nuspecs = [n for n in archive.namelist() if n.lower().endswith(".nuspec") and "/" not in n]
            if len(nuspecs) != 1:
                raise BadRequest(f"a .nupkg has exactly one .nuspec at its root; this one has {len(nuspecs)}")
            info = archive.getinfo(nuspecs[0])
            if info.file_size > MAX_NUSPEC:
                raise BadRequest(f"the .nuspec is larger than {MAX_NUSPEC} bytes")
            nuspec = archive.read(info)
    except zipfile.BadZipFile as exc:
        raise BadRequest(f"not a .nupkg (not a zip archive): {exc}") from exc
    try:
        root = xml.parse(nuspec)
    except xml.XmlError as exc:
        raise BadRequest(f"the .nuspec is not well-formed XML: {exc}") from exc
    metadata = xml.child(root, "metadata")
    if metadata is None:
        raise BadRequest("the .nuspec has no <metadata>")
    package_id, raw_version = xml.text(metadata, "id"), xml.text(metadata, "version")
    if not nv.valid_id(package_id):
        raise BadRequest(f"the .nuspec's id {package_id!r} is not a valid package id")
    version = nv.normalize_or_400(raw_version)
    types = xml.child(metadata, "packageTypes")
    if types is not None and any((t.get("name") or "").lower() == "symbolspackage" for t in types):
        raise BadRequest(_SYMBOLS)
    catalog: dict[str, Any] = {"id": package_id, "version": version}
    for field in (
        "authors",
        "description",
        "title",
        "summary",
        "projectUrl",
        "licenseUrl",
        "releaseNotes",
        "copyright",
        "language",
    ):
        value = xml.text(metadata, field)
        if value:
            catalog[field] = value
    tags = xml.text(metadata, "tags")
    if tags:
        catalog["tags"] = tags.split()
    license_node = xml.child(metadata, "license")
    if license_node is not None and license_node.get("type") == "expression" and license_node.text:
        catalog["licenseExpression"] = license_node.text.strip()
    catalog["requireLicenseAcceptance"] = xml.text(metadata, "requireLicenseAcceptance").lower() == "true"
    catalog["dependencyGroups"] = _dependency_groups(xml.child(metadata, "dependencies"))
    return package_id, version, catalog, nuspec


_SYMBOLS = (
    "symbol packages (.snupkg) are not accepted: this feed stores packages only; "
    "push the .nupkg, and publish symbols to a symbol server"
)


def _dependency_groups(node: Element | None) -> list[dict[str, Any]]:
    if node is None:
        return []
    groups: list[dict[str, Any]] = []
    loose = [_dependency(d) for d in node if xml.local(d.tag) == "dependency"]
    if loose:
        groups.append({"dependencies": loose})
    for group in node:
        if xml.local(group.tag) != "group":
            continue
        out: dict[str, Any] = {
            "dependencies": [_dependency(d) for d in group if xml.local(d.tag) == "dependency"]
        }
        if group.get("targetFramework"):
            out["targetFramework"] = group.get("targetFramework")
        groups.append(out)
    return groups


def _dependency(node: Element) -> dict[str, str]:
    dep_id = node.get("id") or ""
    if not nv.valid_id(dep_id):
        raise BadRequest(f"the .nuspec names an invalid dependency id {dep_id!r}")
    return {"id": dep_id, "range": _range(node.get("version") or "")}


def _range(spec: str) -> str:
    """A nuspec version range in the registration's form: ``1.0`` → ``[1.0.0, )``."""
    spec = spec.strip()
    if not spec:
        return "(, )"
    if spec[0] not in "[(":
        return f"[{nv.normalize_or_400(spec)}, )"
    low, comma, high = spec[1:-1].partition(",")
    if not comma:
        return f"[{nv.normalize_or_400(low)}]"
    low_n = nv.normalize_or_400(low.strip()) if low.strip() else ""
    high_n = nv.normalize_or_400(high.strip()) if high.strip() else ""
    return f"{spec[0]}{low_n}, {high_n}{spec[-1]}"
