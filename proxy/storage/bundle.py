"""Air-gapped transfer: a repository's assets, documents and rows in one tar, checked on arrival.

``export`` writes ``manifest.json`` (every asset row with its digest and size, every metadata
document of the repository's upstream connections with the SHA-256 of its body, the
repository's published version rows), then ``blobs/<sha256>`` and ``documents/<sha256>`` — all
content-addressed, plaintext whatever the store's encryption. With a key it adds
``manifest.hmac``: HMAC-SHA256 of the manifest, so the receiving side can prove the bundle came
from a holder of the key (and, through the digests, that nothing in it changed).

``import`` checks the signature when a key is given (refusing an unsigned or wrongly signed
bundle then), stages every blob and document against the digest the manifest names, and writes
rows only once everything passed: a tampered bundle is rejected with the digest that failed, and
nothing of it is recorded.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import json
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from proxy.model import AssetRecord, Digest, RepoRef
from proxy.storage.index import DocumentRow, Index
from proxy.storage.local import LocalBlobStore
from proxy.storage.staging import StagingArea, StagingError

FORMAT_VERSION = 1


class BundleError(Exception):
    """The bundle is not what its manifest says (or not signed as required)."""


async def collect(
    index: Index, repo: RepoRef, connections: list[str], since: float | None
) -> tuple[dict[str, Any], list[bytes]]:
    """The manifest of a repository, and the document bodies it names (in manifest order)."""
    sql = (
        "SELECT format, package, filename, version, digest, size, content_type, origin_url, upstream, "
        "hosted, fetched_at FROM assets WHERE domain=? AND repository=?"
    )
    args: tuple[Any, ...] = (repo.domain, repo.repository)
    if since is not None:
        sql += " AND fetched_at >= ?"
        args += (since,)
    async with index.db.execute(sql + " ORDER BY format, package, filename", args) as cur:
        rows = await cur.fetchall()
    names = ("format", "package", "filename", "version", "digest", "size", "content_type", "origin_url")
    assets = [
        {**dict(zip(names, r[:8], strict=True)), "upstream": r[8], "hosted": bool(r[9]), "fetched_at": r[10]}
        for r in rows
    ]
    documents, bodies = [], []
    for upstream in connections:
        async with index.db.execute(
            "SELECT upstream, doc_key, url, body, content_type, etag, last_modified, serial, fetched_at "
            "FROM documents WHERE upstream=? ORDER BY doc_key",
            (upstream,),
        ) as cur:
            for d in await cur.fetchall():
                body = bytes(d[3])
                documents.append(
                    {
                        "upstream": d[0],
                        "key": d[1],
                        "url": d[2],
                        "sha256": hashlib.sha256(body).hexdigest(),
                        "content_type": d[4],
                        "etag": d[5],
                        "last_modified": d[6],
                        "serial": d[7],
                        "fetched_at": d[8],
                    }
                )
                bodies.append(body)
    async with index.db.execute(
        "SELECT format, package, version, status, attributes FROM versions WHERE domain=? AND repository=? "
        "ORDER BY format, package, version",  # the same manifest from either index backend
        (repo.domain, repo.repository),
    ) as cur:
        versions = [
            {"format": v[0], "package": v[1], "version": v[2], "status": v[3], "attributes": json.loads(v[4])}
            for v in await cur.fetchall()
        ]
    manifest = {
        "format_version": FORMAT_VERSION,
        "domain": repo.domain,
        "repository": repo.repository,
        "created": time.time(),
        "assets": assets,
        "documents": documents,
        "versions": versions,
    }
    return manifest, bodies


def write_bundle(
    path: Path,
    manifest: dict[str, Any],
    bodies: list[bytes],
    blobs: LocalBlobStore,
    key: bytes | None,
    progress: Callable[[int, int], None],
) -> None:
    """The tar (blocking). Blobs are read through the store, so encrypted ones go out in plaintext."""
    raw = json.dumps(manifest, sort_keys=True, indent=1).encode()
    digests = sorted({a["digest"] for a in manifest["assets"]})
    with tarfile.open(path, "w") as tar:
        _add(tar, "manifest.json", raw)
        if key is not None:
            _add(tar, "manifest.hmac", hmac.new(key, raw, hashlib.sha256).hexdigest().encode())
        for n, digest in enumerate(digests, 1):
            with blobs.open_plain(Digest(digest)) as f:
                size = f.seek(0, io.SEEK_END)
                f.seek(0)
                info = tarfile.TarInfo(f"blobs/{digest}")
                info.size = size
                tar.addfile(info, f)
            progress(n, len(digests))
        for doc, body in zip(manifest["documents"], bodies, strict=True):
            _add(tar, f"documents/{doc['sha256']}", body)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(data))


def read_manifest(path: Path, key: bytes | None) -> dict[str, Any]:
    """The manifest, its signature checked when ``key`` is given (blocking)."""
    with tarfile.open(path, "r") as tar:
        raw = _member(tar, "manifest.json")
        if raw is None:
            raise BundleError("not a bundle: no manifest.json")
        if key is not None:
            signature = _member(tar, "manifest.hmac")
            if signature is None:
                raise BundleError("the bundle is not signed, and a key was given to check it")
            expected = hmac.new(key, raw, hashlib.sha256).hexdigest().encode()
            if not hmac.compare_digest(signature.strip(), expected):
                raise BundleError("the bundle's signature does not match the key")
    manifest: dict[str, Any] = json.loads(raw)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"unsupported bundle version {manifest.get('format_version')!r}")
    return manifest


def _member(tar: tarfile.TarFile, name: str) -> bytes | None:
    try:
        handle = tar.extractfile(name)
    except KeyError:
        return None
    return handle.read() if handle is not None else None


async def import_bundle(
    path: Path,
    manifest: dict[str, Any],
    index: Index,
    blobs: LocalBlobStore,
    staging: StagingArea,
    progress: Callable[[int, int], None],
) -> dict[str, int]:
    """Verify and store everything, then write the rows (see the module docstring)."""
    wanted = {a["digest"]: int(a["size"]) for a in manifest["assets"]}
    documents = {d["sha256"] for d in manifest["documents"]}
    bodies: dict[str, bytes] = {}
    seen = 0
    tar = await asyncio.to_thread(tarfile.open, path, "r")
    try:
        members = await asyncio.to_thread(tar.getmembers)
        for member in members:
            name = member.name
            if name.startswith("blobs/"):
                digest = name.removeprefix("blobs/")
                if digest not in wanted:
                    raise BundleError(f"blob {digest} is not in the manifest")
                handle = await asyncio.to_thread(tar.extractfile, member)
                if handle is None:
                    raise BundleError(f"blob {digest} is not a file")
                writer = staging.create(
                    {"sha256": digest}, expect_size=wanted[digest], max_size=wanted[digest]
                )
                try:
                    async with writer:
                        while chunk := await asyncio.to_thread(handle.read, 1024 * 1024):
                            await writer.write(chunk)
                        staged = await writer.finish()
                except StagingError as exc:
                    raise BundleError(f"blob {digest} does not match its digest: {exc}") from exc
                await blobs.put(staged)
                seen += 1
                progress(seen, len(wanted))
            elif name.startswith("documents/"):
                digest = name.removeprefix("documents/")
                handle = await asyncio.to_thread(tar.extractfile, member)
                body = await asyncio.to_thread(handle.read) if handle is not None else b""
                if hashlib.sha256(body).hexdigest() != digest or digest not in documents:
                    raise BundleError(f"document {digest} does not match its digest")
                bodies[digest] = body
    finally:
        await asyncio.to_thread(tar.close)
    missing = set(wanted) - {d for d in wanted if await blobs.stat(Digest(d)) is not None}
    if missing:
        raise BundleError(f"blob {sorted(missing)[0]} is named in the manifest but not in the bundle")
    repo = RepoRef(manifest["domain"], manifest["repository"])
    records = [
        AssetRecord(
            repo=repo,
            format=a["format"],
            package=a["package"],
            filename=a["filename"],
            digest=Digest(a["digest"]),
            size=int(a["size"]),
            content_type=a["content_type"],
            version=a["version"],
            origin_url=a["origin_url"],
            upstream=a["upstream"],
            hosted=bool(a["hosted"]),
            fetched_at=float(a["fetched_at"]),
        )
        for a in manifest["assets"]
    ]
    await index.add_assets(records)
    for d in manifest["documents"]:
        await index.put_document(
            DocumentRow(
                upstream=d["upstream"],
                key=d["key"],
                url=d["url"],
                body=bodies[d["sha256"]],
                content_type=d["content_type"],
                etag=d["etag"],
                last_modified=d["last_modified"],
                serial=d["serial"],
                fetched_at=float(d["fetched_at"]),
                expires_at=0.0,  # stale from the start: revalidated wherever an upstream answers
            )
        )
    async with index.transaction():
        for v in manifest["versions"]:
            await index.db.execute(
                "INSERT INTO versions (domain, repository, format, package, version, status, attributes, "
                "created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                (
                    repo.domain,
                    repo.repository,
                    v["format"],
                    v["package"],
                    v["version"],
                    v["status"],
                    json.dumps(v["attributes"]),
                    time.time(),
                    time.time(),
                ),
            )
    return {"assets": len(records), "blobs": len(wanted), "documents": len(manifest["documents"])}
