"""Maven: the maven2 repository layout for mvn (and Gradle), through the shared pipeline.

Routes below ``/{domain}/maven/{repo}``::

    GET|HEAD /{path}/                     a directory listing of what the repository holds
    GET|HEAD /{g}/{a}/maven-metadata.xml  the versions, merged along the chain (+ checksums)
    GET|HEAD /{g}/{a}/{v}-SNAPSHOT/maven-metadata.xml   a SNAPSHOT's current files
    GET|HEAD /{g}/{a}/{v}/{file}          an artifact through the cache (+ .sha1 .md5 .sha256
                                          .sha512, computed from the stored bytes)
    PUT      /{path}                      mvn deploy: artifacts, checksums, metadata

An artifact from an upstream is checked against the upstream's ``.sha1`` before it is kept;
release artifacts are immutable, SNAPSHOT versions are told by their timestamped file names. The
proxy writes every maven-metadata.xml itself from what it holds and what upstreams say; what a
client deploys as maven-metadata.xml is checked and then reconciled with the stored files, never
served as sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import html
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

from aiohttp import hdrs, web

from proxy.errors import BadRequest, Conflict, NotFound, PayloadTooLarge, UpstreamCorrupt
from proxy.formats import maven_metadata as meta
from proxy.formats.base import FormatAdapter, RouteSpec
from proxy.formats.maven_paths import CHECKSUM_ALGORITHMS, METADATA, MavenPath, parse_path, valid_package
from proxy.model import AssetRecord, CacheStatus, ListedFile, Listing, RepoRef
from proxy.pipeline.documents import DocumentRequest
from proxy.pipeline.publish import Upload
from proxy.server.pages import PageSource
from proxy.server.routing import repo_ref

XML = "text/xml"
TEXT = "text/plain; charset=utf-8"
MAX_SMALL_UPLOAD = 4 * 2**20  # checksums and metadata
CHUNK = 256 * 1024
_TIMESTAMPED_REST = re.compile(r"^\d{8}\.\d{6}-\d+(?:-[^.]+)?\..+$")
_TYPES = {
    ".jar": "application/java-archive",
    ".war": "application/java-archive",
    ".pom": XML,
    ".xml": XML,
    ".module": "application/json",
    ".asc": TEXT,
    ".sha1": TEXT,
    ".md5": TEXT,
    ".sha256": TEXT,
    ".sha512": TEXT,
}


class MavenAdapter(FormatAdapter):
    """See the module docstring."""

    name = "maven"
    files_at_paths = True

    def routes(self) -> Sequence[RouteSpec]:
        return (
            RouteSpec("GET", "", self.root_redirect),
            RouteSpec("GET", "/{path:.*}", self.get),
            RouteSpec("PUT", "/{path:.+}", self.put),
        )

    def normalize(self, package: str) -> str:
        if not valid_package(package):
            raise BadRequest(f"{package!r} is not a Maven groupId:artifactId")
        return package

    def normalize_prefix(self, prefix: str) -> str:
        """Maven rules go by groupId prefix: ``com.acme*`` covers com.acme:lib and com.acme.tools:x."""
        if not valid_package(prefix + "x:x") and not valid_package(prefix + "x"):
            raise BadRequest(f"{prefix!r} is not the start of a Maven groupId:artifactId")
        return prefix

    def document_request(self, index_url: str, package: str) -> DocumentRequest:
        group, artifact = package.split(":", 1)
        path = f"{group.replace('.', '/')}/{artifact}/{METADATA}"
        return DocumentRequest(key=f"maven:{path}", url=f"{index_url}{path}", headers={})

    def parse_listing(self, body: bytes, content_type: str, url: str, source: str) -> Listing:
        parsed = meta.parse(body)
        files = [
            ListedFile(f"{v}/", "", source, {}, v, extra={"last_updated": parsed.last_updated})
            for v in parsed.versions
        ]
        if parsed.plugins:  # a group's metadata: kept as one hidden entry per source
            plugins = [asdict(p) for p in parsed.plugins]
            files.append(
                ListedFile(f"plugins@{source}", "", source, {}, None, hidden=True, extra={"plugins": plugins})
            )
        return Listing(package=f"{parsed.group_id}:{parsed.artifact_id}", files=tuple(files))

    def locate(self, index_url: str, package: str, filename: str) -> tuple[str, DocumentRequest | None]:
        group, artifact = package.split(":", 1)
        path = f"{group.replace('.', '/')}/{artifact}/{filename}"
        url = f"{index_url}{quote(path)}"
        return url, DocumentRequest(key=f"maven:{path}.sha1", url=f"{url}.sha1", headers={})

    def checksum_hashes(self, body: bytes) -> dict[str, str]:
        # "hex", or "hex  filename" as some tools write it.
        token = body.decode("ascii", "replace").strip().split()[0] if body.strip() else ""
        if len(token) != 40 or any(c not in "0123456789abcdefABCDEF" for c in token):
            raise ValueError(f"not a SHA-1: {body[:60]!r}")
        return {"sha1": token.lower()}

    def version_of(self, filename: str) -> str | None:
        return filename.split("/", 1)[0] if "/" in filename else None

    def content_type(self, filename: str) -> str:
        return _TYPES.get(Path(filename).suffix, "application/octet-stream")

    def hosted_file(
        self, record: AssetRecord, attributes: Mapping[str, Any], *, hidden: bool, upload_time: str
    ) -> ListedFile:
        entry = super().hosted_file(record, attributes, hidden=hidden, upload_time=upload_time)
        return replace(entry, extra={"last_updated": meta.timestamp(record.fetched_at)})

    def is_companion(self, filename: str) -> bool:
        return meta.is_checksum(filename)

    def derive(self, entry: ListedFile, blob: Callable[[], BinaryIO]) -> list[tuple[str, bytes, str]]:
        """The four checksum files of an artifact, from its verified bytes (blocking)."""
        with blob() as f:
            digests = _digests(f)
        return [(f"{entry.filename}.{algo}", digest.encode(), TEXT) for algo, digest in digests.items()]

    # --- reads ---------------------------------------------------------------------------------

    async def root_redirect(self, request: web.Request) -> web.StreamResponse:
        repo_ref(request)
        raise web.HTTPMovedPermanently(location=f"{request.raw_path.split('?', 1)[0]}/")  # never decoded

    async def get(self, request: web.Request) -> web.StreamResponse:
        ref = repo_ref(request)
        self.pipeline.resolver.repository(ref)
        path = parse_path(request.match_info["path"])
        if path.kind == "directory":
            return await self._directory(request, ref, path)
        package = self.normalize(path.package)
        if path.kind == "artifact-metadata":
            return await self._artifact_metadata(request, ref, package, path)
        if path.kind == "version-metadata":
            return await self._version_metadata(request, ref, package, path)
        if path.checksum is not None:
            return await self._checksum(request, ref, package, path)
        handle = await self.pipeline.resolver.asset(ref, self, package, path.asset_name)
        return await self.pipeline.sender.asset(request, handle)

    async def _artifact_metadata(
        self, request: web.Request, ref: RepoRef, package: str, path: MavenPath
    ) -> web.StreamResponse:
        async def source() -> PageSource:
            resolved = await self.pipeline.resolver.listing(ref, self, package)
            files = resolved.listing.files
            versions = {f.version for f in files if f.version and not f.hidden}
            last_updated = meta.newest(str(f.extra.get("last_updated", "")) for f in files)
            plugins = meta.plugins_merged(meta.as_plugins(f.extra.get("plugins") or []) for f in files)

            def draw() -> bytes:
                return meta.render_artifact(path.group, path.artifact, versions, last_updated, plugins)

            return PageSource(resolved, draw, XML)

        key, variant = (ref.domain, self.name, package), (ref.repository, "metadata")
        if path.checksum is None:
            return await self.pipeline.pages.respond(request, key, variant, source)
        page, status = await self.pipeline.pages.page(key, variant, source)
        body = page.body
        if page.files:
            body = await asyncio.to_thread(Path(next(p for e, p, _ in page.files if not e)).read_bytes)
        return _text_response(hashlib.new(path.checksum, body).hexdigest(), status)

    async def _version_metadata(
        self, request: web.Request, ref: RepoRef, package: str, path: MavenPath
    ) -> web.StreamResponse:
        """A SNAPSHOT's metadata: from the deployed files if the chain holds them, else from the
        first upstream that has it (parsed, checked, and rendered again)."""
        resolver = self.pipeline.resolver
        hosted = [
            f.filename.split("/", 1)[1]
            for f in (await resolver.hosted_files(ref, self, package))
            if f.version == path.version
        ]
        parsed = meta.snapshot_from_files(path.artifact, path.version, hosted) if hosted else None
        status = CacheStatus.HIT
        if parsed is None:
            key = f"{path.directory}/{path.version}/{METADATA}"
            found = await resolver.upstream_document(
                ref,
                self.name,
                package,
                lambda url: DocumentRequest(
                    key=f"maven:{key}", url=f"{url}{quote(key)}", headers={}, check=lambda b, _: meta.parse(b)
                ),
            )
            if found is not None:
                body, status = found
                try:
                    parsed = meta.parse(body)
                except meta.MetadataError as exc:  # the upstream's trouble: never a 404
                    raise UpstreamCorrupt(
                        f"the upstream's metadata of {package} {path.version} is malformed: {exc}",
                        detail={"package": package, "version": path.version},
                    ) from exc
        if parsed is None:
            raise NotFound(
                f"{package} {path.version} was not found in {ref.domain}/{ref.repository} or its upstreams",
                detail={"package": package, "version": path.version},
            )
        body = meta.render_snapshot(path.group, path.artifact, path.version, parsed)
        if path.checksum is not None:
            return _text_response(hashlib.new(path.checksum, body).hexdigest(), status.value)
        response = web.Response(body=body, headers={hdrs.CONTENT_TYPE: XML, "X-Cache": status.value})
        response.headers[hdrs.CACHE_CONTROL] = "max-age=0, must-revalidate"
        return response

    async def _checksum(
        self, request: web.Request, ref: RepoRef, package: str, path: MavenPath
    ) -> web.StreamResponse:
        """A checksum file: stored beside the artifact, else the artifact is fetched first."""
        assert path.checksum is not None
        resolver = self.pipeline.resolver
        name = f"{path.asset_name}.{path.checksum}"
        record, status = await resolver.companion(ref, self, package, path.asset_name, name)
        if record is not None:
            return self.pipeline.sender.blob(request, record.digest, TEXT, status)
        artifact = await resolver.stored_asset(ref, self.name, package, path.asset_name)
        if artifact is None:
            raise NotFound(f"{path.filename} is not stored", detail={"package": package})
        blobs = self.pipeline.blobs
        await blobs.locate(artifact.digest)  # on this node's disk (storage/s3.py)

        def digests() -> dict[str, str]:
            with blobs.open_plain(artifact.digest) as f:
                return _digests(f)

        digest = (await asyncio.to_thread(digests))[path.checksum]
        return _text_response(digest, status.value)

    async def _directory(self, request: web.Request, ref: RepoRef, path: MavenPath) -> web.StreamResponse:
        """What the repository (and its repository chain) holds below ``path``, as HTML."""
        resolver = self.pipeline.resolver
        prefix = path.segments
        children: set[str] = set()
        for package in await resolver.package_names(ref, self.name):
            group, artifact = package.split(":", 1)
            parts = (*group.split("."), artifact)
            if parts[: len(prefix)] == prefix and len(parts) > len(prefix):
                children.add(parts[len(prefix)] + "/")
            elif len(prefix) >= len(parts) and prefix[: len(parts)] == parts:
                rest = prefix[len(parts) :]
                for name in await resolver.cached_files(ref, self.name, package):
                    file_parts = tuple(name.split("/"))
                    if file_parts[: len(rest)] == rest and len(file_parts) > len(rest):
                        tail = file_parts[len(rest)]
                        children.add(tail + "/" if len(file_parts) > len(rest) + 1 else tail)
                if not rest:
                    children.add(METADATA)
        if prefix and not children:
            raise NotFound(
                f"/{'/'.join(prefix)}/ holds nothing in {ref.domain}/{ref.repository}",
                detail={"path": "/".join(prefix)},
            )
        title = html.escape(f"{ref.domain}/{ref.repository}: /{'/'.join(prefix)}")
        rows = [] if not prefix else ['<a href="../">../</a>']
        rows += [f'<a href="{quote(c)}">{html.escape(c)}</a>' for c in sorted(children, key=_dirs_first)]
        body = (
            f"<!DOCTYPE html>\n<html><head><title>{title}</title></head>\n<body><h1>{title}</h1>\n"
            "<hr><pre>\n" + "\n".join(rows) + "\n</pre><hr></body></html>\n"
        )
        return web.Response(text=body, content_type="text/html")

    # --- deploys -------------------------------------------------------------------------------

    async def put(self, request: web.Request) -> web.StreamResponse:
        ref = repo_ref(request)
        self.pipeline.resolver.repository(ref)
        path = parse_path(request.match_info["path"])
        if path.kind == "directory":
            raise BadRequest("a deploy names a file, not a directory")
        package = self.normalize(path.package)
        publisher = self.pipeline.publisher
        await publisher.check_allowed(ref, self.name, package)
        if path.kind in ("artifact-metadata", "version-metadata"):
            return await self._put_metadata(request, package, path)
        if path.checksum is not None:
            return await self._put_checksum(request, ref, package, path)
        return await self._put_artifact(request, ref, package, path)

    async def _put_artifact(
        self, request: web.Request, ref: RepoRef, package: str, path: MavenPath
    ) -> web.StreamResponse:
        publisher = self.pipeline.publisher
        if not meta.valid_version(path.version):
            raise BadRequest(f"{path.version!r} is not a valid Maven version")
        snapshot = path.version.endswith(meta.SNAPSHOT)
        if snapshot and not _timestamped(path):
            raise BadRequest(
                f"{path.filename}: SNAPSHOT files are deployed with timestamped names "
                f"({path.artifact}-{path.version.removesuffix(meta.SNAPSHOT)}-yyyyMMdd.HHmmss-N...)"
            )
        chunks = request.content.iter_chunked(CHUNK)
        staged = await publisher.stage(chunks, path.filename, compute=CHECKSUM_ALGORITHMS)
        companions = [
            (f"{path.asset_name}.{a}", staged.hashes[a].encode(), TEXT) for a in CHECKSUM_ALGORITHMS
        ]
        upload = Upload(
            package=package,
            version=path.version,
            filename=path.asset_name,
            staged=staged,
            content_type=self.content_type(path.filename),
            companions=companions,
        )
        try:
            await publisher.publish(ref, self, upload)
        except Conflict:
            existing = await self.pipeline.resolver.stored_asset(ref, self.name, package, path.asset_name)
            if existing is not None and existing.digest.hex == staged.hashes["sha256"]:
                return web.json_response({"ok": True, "unchanged": path.asset_name}, status=200)
            if (
                existing is not None
                and existing.hosted
                and self.pipeline.resolver.repository(ref).allow_redeploy
            ):
                await publisher.publish(ref, self, upload, replace=True)
                return web.json_response({"ok": True, "replaced": path.asset_name}, status=201)
            raise Conflict(
                f"{package} {path.version}: {path.filename} is already deployed in "
                f"{ref.domain}/{ref.repository} with other bytes; release versions are immutable",
                detail={"package": package, "version": path.version, "filename": path.filename},
            ) from None
        return web.json_response({"ok": True, "stored": path.asset_name}, status=201)

    async def _put_checksum(
        self, request: web.Request, ref: RepoRef, package: str, path: MavenPath
    ) -> web.StreamResponse:
        """A deployed checksum must match the stored bytes; the file stays as the proxy computed it."""
        assert path.checksum is not None
        body = await _small_body(request)
        stated = body.decode("ascii", "replace").strip().split()[0].lower() if body.strip() else ""
        record = await self.pipeline.resolver.stored_asset(
            ref, self.name, package, f"{path.asset_name}.{path.checksum}"
        )
        if record is None:
            raise NotFound(
                f"{path.filename} is not deployed, so its {path.checksum} cannot be checked; "
                "deploy the file first",
                detail={"package": package, "filename": path.filename},
            )
        actual = (await self.pipeline.blobs.read_bytes(record.digest)).decode()
        if stated != actual:
            raise BadRequest(
                f"the {path.checksum} sent for {path.filename} ({stated[:128]!r}) does not match "
                f"the deployed bytes ({actual})",
                detail={"package": package, "filename": path.filename},
            )
        return web.json_response({"ok": True}, status=201)

    async def _put_metadata(self, request: web.Request, package: str, path: MavenPath) -> web.StreamResponse:
        """Checked, then reconciled: the proxy serves metadata computed from what it stores."""
        body = await _small_body(request)
        if path.checksum is not None:
            return web.json_response({"ok": True, "note": "metadata checksums are computed"}, status=201)
        try:
            parsed = meta.parse(body)
        except meta.MetadataError as exc:
            raise BadRequest(str(exc)) from exc
        if (parsed.group_id and parsed.group_id != path.group) or (
            parsed.artifact_id and parsed.artifact_id != path.artifact
        ):
            raise BadRequest(
                f"the metadata names {parsed.group_id}:{parsed.artifact_id}, the path {package}",
                detail={"package": package},
            )
        return web.json_response({"ok": True, "note": "metadata is maintained by the proxy"}, status=201)


def _timestamped(path: MavenPath) -> bool:
    """Whether a SNAPSHOT file has Maven 3's unique name: a-1.0-20240101.120000-3[-cls].ext."""
    rest = path.filename.removeprefix(f"{path.artifact}-{path.version.removesuffix(meta.SNAPSHOT)}-")
    return rest != path.filename and _TIMESTAMPED_REST.match(rest) is not None


def _digests(f: BinaryIO) -> dict[str, str]:
    hashers = {algo: hashlib.new(algo) for algo in CHECKSUM_ALGORITHMS}
    while chunk := f.read(1024 * 1024):
        for h in hashers.values():
            h.update(chunk)
    return {algo: h.hexdigest() for algo, h in hashers.items()}


def _text_response(text: str, status: str) -> web.Response:
    response = web.Response(text=text, content_type="text/plain")
    response.headers["X-Cache"] = status
    return response


def _dirs_first(name: str) -> tuple[bool, str]:
    return (not name.endswith("/"), name)


async def _small_body(request: web.Request) -> bytes:
    if (request.content_length or 0) > MAX_SMALL_UPLOAD:
        raise PayloadTooLarge(f"larger than {MAX_SMALL_UPLOAD} bytes")
    body = bytearray()
    async for chunk in request.content.iter_chunked(CHUNK):
        body += chunk
        if len(body) > MAX_SMALL_UPLOAD:
            raise PayloadTooLarge(f"larger than {MAX_SMALL_UPLOAD} bytes")
    return bytes(body)
