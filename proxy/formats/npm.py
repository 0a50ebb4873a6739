"""npm: the registry API for npm, pnpm and yarn, through the shared pipeline.

Routes below ``/{domain}/npm/{repo}`` (scoped names arrive as ``@scope%2fname`` or
``@scope/name``; both reach the same handlers)::

    GET  /-/ping
    GET  /-/package/{name}/dist-tags
    GET  /{name}                       packument: full, or abbreviated when the client asks
                                       for application/vnd.npm.install-v1+json
    GET  /{name}/{version-or-tag}      one manifest
    GET  /{name}/-/{file}.tgz          a tarball through the cache, checked against the
                                       packument's integrity (SRI) and shasum before it is kept
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any
from urllib.parse import quote

import orjson
from aiohttp import hdrs, web

from proxy.errors import BadRequest, NotFound, Offline, UpstreamUnavailable
from proxy.formats import npm_docs as docs
from proxy.formats import npm_publish
from proxy.formats.base import FormatAdapter, RouteSpec
from proxy.model import AssetRecord, CacheStatus, ListedFile, Listing, RepoRef
from proxy.pipeline.documents import DocumentRequest
from proxy.pipeline.packages import check_tag
from proxy.pipeline.resolve import ResolvedListing
from proxy.security.audit import ACTOR
from proxy.server.pages import PageSource
from proxy.server.routing import base_url, repo_ref

SCOPE = "{scope:@[^/%]+}"
NAME = "{name:[^@/-][^/]*}"
# aiohttp matches routes on the raw path: "@scope%2fname" is one segment, decoded on the way out.
SCOPED = "{scoped:@[^/%]+%2[fF][^/]+}"
PASSTHROUGH_LIMIT = 32 * 2**20


class NpmAdapter(FormatAdapter):
    """See the module docstring."""

    name = "npm"

    def routes(self) -> Sequence[RouteSpec]:
        return (
            RouteSpec("GET", "/-/ping", self.ping),
            RouteSpec("GET", "/-/whoami", self.whoami),
            RouteSpec("POST", "/-/npm/v1/security/advisories/bulk", self.passthrough, "read"),
            RouteSpec("POST", "/-/npm/v1/security/audits/quick", self.passthrough, "read"),
            RouteSpec("GET", "/-/v1/search", self.passthrough),
            RouteSpec("GET", f"/-/package/{SCOPED}/dist-tags", self.dist_tags),
            RouteSpec("GET", f"/-/package/{SCOPE}/{{name}}/dist-tags", self.dist_tags),
            RouteSpec("GET", f"/-/package/{NAME}/dist-tags", self.dist_tags),
            RouteSpec("PUT", f"/-/package/{SCOPED}/dist-tags/{{tag}}", self.put_dist_tag),
            RouteSpec("PUT", f"/-/package/{SCOPE}/{{name}}/dist-tags/{{tag}}", self.put_dist_tag),
            RouteSpec("PUT", f"/-/package/{NAME}/dist-tags/{{tag}}", self.put_dist_tag),
            RouteSpec("DELETE", f"/-/package/{SCOPED}/dist-tags/{{tag}}", self.delete_dist_tag, "publish"),
            RouteSpec(
                "DELETE", f"/-/package/{SCOPE}/{{name}}/dist-tags/{{tag}}", self.delete_dist_tag, "publish"
            ),
            RouteSpec("DELETE", f"/-/package/{NAME}/dist-tags/{{tag}}", self.delete_dist_tag, "publish"),
            RouteSpec("PUT", f"/{SCOPED}/-rev/{{rev}}", self.unpublish_versions, "delete"),
            RouteSpec("PUT", f"/{SCOPE}/{{name}}/-rev/{{rev}}", self.unpublish_versions, "delete"),
            RouteSpec("PUT", f"/{NAME}/-rev/{{rev}}", self.unpublish_versions, "delete"),
            RouteSpec("DELETE", f"/{SCOPED}/-/{{filename}}/-rev/{{rev}}", self.delete_tarball),
            RouteSpec("DELETE", f"/{SCOPE}/{{name}}/-/{{filename}}/-rev/{{rev}}", self.delete_tarball),
            RouteSpec("DELETE", f"/{NAME}/-/{{filename}}/-rev/{{rev}}", self.delete_tarball),
            RouteSpec("DELETE", f"/{SCOPED}/-rev/{{rev}}", self.unpublish_all),
            RouteSpec("DELETE", f"/{SCOPE}/{{name}}/-rev/{{rev}}", self.unpublish_all),
            RouteSpec("DELETE", f"/{NAME}/-rev/{{rev}}", self.unpublish_all),
            RouteSpec("PUT", f"/{SCOPED}", self.write),
            RouteSpec("PUT", f"/{SCOPE}/{{name}}", self.write),
            RouteSpec("PUT", f"/{NAME}", self.write),
            RouteSpec("GET", f"/{SCOPED}/-/{{filename}}", self.tarball),
            RouteSpec("GET", f"/{SCOPED}/{{version}}", self.version),
            RouteSpec("GET", f"/{SCOPED}", self.packument),
            RouteSpec("GET", f"/{SCOPE}/{{name}}/-/{{filename}}", self.tarball),
            RouteSpec("GET", f"/{NAME}/-/{{filename}}", self.tarball),
            RouteSpec("GET", f"/{SCOPE}/{{name}}/{{version}}", self.version),
            RouteSpec("GET", f"/{SCOPE}/{{name}}", self.packument),
            RouteSpec("GET", f"/{NAME}/{{version}}", self.version),
            RouteSpec("GET", f"/{NAME}", self.packument),
        )

    def normalize(self, package: str) -> str:
        if not docs.valid_name(package):
            raise BadRequest(f"{package!r} is not a valid npm package name")
        return package

    def document_request(self, index_url: str, package: str) -> DocumentRequest:
        return DocumentRequest(
            key=f"npm:{package}",
            url=f"{index_url}{quote(package, safe='@')}",
            headers={"Accept": docs.FULL},
        )

    def parse_listing(self, body: bytes, content_type: str, url: str, source: str) -> Listing:
        return docs.parse_packument(body, source)

    def hosted_file(
        self, record: AssetRecord, attributes: Mapping[str, Any], *, hidden: bool, upload_time: str
    ) -> ListedFile:
        manifest = dict(attributes.get("manifest") or {})
        return ListedFile(
            filename=record.filename,
            url="",
            source="",
            hashes={"sha512": attributes.get("sha512", ""), "sha1": attributes.get("sha1", "")},
            version=record.version,
            size=record.size,
            hidden=hidden,
            extra={"manifest": manifest, "upload_time": upload_time},
        )

    def describe_cached(self, entry: ListedFile, hashes: Mapping[str, str], size: int) -> ListedFile:
        """The manifest's ``dist.integrity`` and ``dist.shasum`` are what npm checks: they state
        the cached tarball's digests."""
        manifest = dict(entry.extra.get("manifest") or {})
        dist = dict(manifest.get("dist") or {})
        sri = [docs.hex_to_sri(a, h) for a, h in hashes.items() if a != "sha1"]
        if sri or "integrity" in dist:
            dist["integrity"] = " ".join(sri) or docs.hex_to_sri("sha1", hashes["sha1"])
        if "sha1" in hashes:
            dist["shasum"] = hashes["sha1"]
        manifest["dist"] = dist
        return replace(entry, hashes=dict(hashes), size=size, extra={**entry.extra, "manifest": manifest})

    def hosted_extra(self, tags: Mapping[str, str], times: Mapping[str, str | None]) -> dict[str, Any]:
        return {"dist-tags": dict(tags), "time": {v: t for v, t in times.items() if t}}

    # --- handlers -----------------------------------------------------------------------------

    async def ping(self, request: web.Request) -> web.StreamResponse:
        self.pipeline.resolver.repository(repo_ref(request))
        return web.json_response({})

    async def packument(self, request: web.Request) -> web.StreamResponse:
        ref = repo_ref(request)
        package = self._package(request)
        abbreviated = docs.ABBREVIATED in request.headers.get(hdrs.ACCEPT, "")
        kind = docs.ABBREVIATED if abbreviated else docs.FULL
        base = base_url(request, self.pipeline.config.server)

        async def source() -> PageSource:
            resolved = await self.installable(ref, package)
            draw = functools.partial(
                docs.render,
                package,
                resolved.listing,
                self._tarball_url(base, ref, package),
                abbreviated=abbreviated,
            )
            return PageSource(resolved, draw, kind)

        variant = (ref.repository, kind, base)
        return await self.pipeline.pages.respond(request, (ref.domain, self.name, package), variant, source)

    async def installable(self, ref: RepoRef, package: str) -> ResolvedListing:
        """The merged listing; with the upstream unreachable (or offline), only what is cached.

        A stale packument that offered uncached versions would send npm to a tarball it cannot
        get; with nothing cached at all, the answer is the upstream's failure (502/503), never an
        empty document.
        """
        resolved = await self.pipeline.resolver.listing(ref, self, package)
        offline = self.pipeline.config.server.offline
        if resolved.status is not CacheStatus.STALE and not offline:
            return resolved
        cached = await self.pipeline.resolver.cached_files(ref, self.name, package)
        files = tuple(f for f in resolved.listing.files if f.filename in cached)
        if not files and any(not f.hidden for f in resolved.listing.files):
            reason = "; ".join(resolved.warnings) or "the upstream is unreachable"
            detail = {"package": package, "upstream": ", ".join(resolved.stale_upstreams) or None}
            if offline:
                raise Offline(f"offline mode: no version of {package} is cached", detail=detail)
            raise UpstreamUnavailable(f"no version of {package} is cached and {reason}", detail=detail)
        return replace(resolved, listing=replace(resolved.listing, files=files))

    async def version(self, request: web.Request) -> web.StreamResponse:
        ref = repo_ref(request)
        package = self._package(request)
        spec = request.match_info["version"]
        base = base_url(request, self.pipeline.config.server)
        resolved = await self.pipeline.resolver.listing(ref, self, package)
        body = docs.version_document(resolved.listing, spec, self._tarball_url(base, ref, package))
        if body is None:
            raise NotFound(f"version {spec!r} of {package!r} not found", detail={"package": package})
        response = web.Response(body=body, headers={hdrs.CONTENT_TYPE: docs.FULL})
        response.headers["X-Cache"] = resolved.status.value
        return response

    async def dist_tags(self, request: web.Request) -> web.StreamResponse:
        ref = repo_ref(request)
        package = self._package(request)
        resolved = await self.pipeline.resolver.listing(ref, self, package)
        listed = {f.version for f in resolved.listing.files if not f.hidden}
        tags = {t: v for t, v in (resolved.listing.extra.get("dist-tags") or {}).items() if v in listed}
        response = web.json_response(tags)
        response.headers["X-Cache"] = resolved.status.value
        return response

    async def tarball(self, request: web.Request) -> web.StreamResponse:
        ref = repo_ref(request)
        package = self._package(request)
        filename = request.match_info["filename"]
        if not filename.endswith(".tgz") or "/" in filename:
            raise BadRequest(f"{filename!r} is not a tarball name")
        handle = await self.pipeline.resolver.asset(ref, self, package, filename)
        return await self.pipeline.sender.asset(request, handle)

    async def passthrough(self, request: web.Request) -> web.StreamResponse:
        """npm audit and npm search: asked of the first npm connection, never cached."""
        ref = repo_ref(request)
        client = self.pipeline.resolver.first_connection(ref, self.name)
        suffix = request.path.removeprefix(f"/{ref.domain}/npm/{ref.repository}")
        url = f"{client.config.url.rstrip('/')}{suffix}"
        if request.query_string:
            url += f"?{request.query_string}"
        body = await request.read() if request.can_read_body else b""
        status, ctype, data = await client.forward(
            request.method,
            url,
            content_type=request.content_type if body else None,
            body=body,
            limit=PASSTHROUGH_LIMIT,
        )
        return web.Response(status=status, body=data, headers={hdrs.CONTENT_TYPE: ctype, "X-Cache": "MISS"})

    async def whoami(self, request: web.Request) -> web.StreamResponse:
        self.pipeline.resolver.repository(repo_ref(request))
        actor = ACTOR.get()  # set by the access middleware: the token's principal
        return web.json_response({"username": actor.principal if actor else "anonymous"})

    async def write(self, request: web.Request) -> web.StreamResponse:
        """``npm publish`` (with _attachments) or ``npm deprecate`` (without)."""
        ref = repo_ref(request)
        package = self._package(request)
        publisher = self.pipeline.publisher
        await publisher.check_allowed(ref, self.name, package)
        doc = await npm_publish.read_document(request, publisher.max_upload_size)
        if doc.get("_attachments"):
            tags = doc.get("dist-tags")
            for tag in tags if isinstance(tags, dict) else {}:
                check_tag(tag)  # before anything is staged or committed: a bad tag refuses it all
            upload = await npm_publish.read_publish(doc, package, publisher)
            record = await publisher.publish(ref, self, upload)
            for tag in upload.attributes.get("tags") or ["latest"]:
                await self.pipeline.packages.put_tag(ref, self.name, package, tag, upload.version)
            return web.json_response({"ok": True, "id": package, "rev": record.digest.hex[:16]}, status=201)
        published = await self.pipeline.packages.published_versions(ref, self.name, package)
        if not published:
            raise BadRequest(f"a publish of {package} must carry its tarball in _attachments")
        for version, message in npm_publish.deprecations(doc).items():
            row = published.get(version)
            if row is None:
                continue  # an upstream version: not ours to change
            if (row.attributes.get("manifest") or {}).get("deprecated") != message:
                manifest = dict(row.attributes.get("manifest") or {})
                # A merge patch: null removes the key (a patch without it would keep the old one).
                manifest["deprecated"] = message or None
                await self.pipeline.packages.update_attributes(
                    ref, self.name, package, version, {"manifest": manifest}
                )
        return web.json_response({"ok": True, "id": package})

    async def unpublish_versions(self, request: web.Request) -> web.StreamResponse:
        """``npm unpublish pkg@v``, step one: the packument without that version."""
        ref = repo_ref(request)
        package = self._package(request)
        doc = await npm_publish.read_document(request, 0)
        published = await self.pipeline.packages.published_versions(ref, self.name, package)
        live = {v for v, row in published.items() if row.status != "Disposed"}
        for version in npm_publish.missing_versions(doc, live):
            await self.pipeline.packages.delete(ref, self.name, package, version)
        return web.json_response({"ok": True, "id": package})

    async def delete_tarball(self, request: web.Request) -> web.StreamResponse:
        """``npm unpublish pkg@v``, step two: the tarball (already gone with its version)."""
        repo_ref(request)
        self._package(request)
        return web.json_response({"ok": True})

    async def unpublish_all(self, request: web.Request) -> web.StreamResponse:
        """``npm unpublish pkg --force``: every version published in this repository."""
        ref = repo_ref(request)
        package = self._package(request)
        published = await self.pipeline.packages.published_versions(ref, self.name, package)
        if not published:
            raise npm_publish.repo_and_package_error(ref, package)
        for version, row in published.items():
            if row.status != "Disposed":
                await self.pipeline.packages.delete(ref, self.name, package, version)
        return web.json_response({"ok": True, "id": package})

    async def put_dist_tag(self, request: web.Request) -> web.StreamResponse:
        ref = repo_ref(request)
        package = self._package(request)
        try:
            version = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            raise BadRequest("the body must be a JSON string: the version") from exc
        if not isinstance(version, str):
            raise BadRequest("the body must be a JSON string: the version")
        await self.pipeline.packages.put_tag(ref, self.name, package, request.match_info["tag"], version)
        return web.json_response({"ok": True}, status=201)

    async def delete_dist_tag(self, request: web.Request) -> web.StreamResponse:
        ref = repo_ref(request)
        package = self._package(request)
        await self.pipeline.packages.delete_tag(ref, self.name, package, request.match_info["tag"])
        return web.json_response({"ok": True})

    def _package(self, request: web.Request) -> str:
        if "scoped" in request.match_info:
            return self.normalize(request.match_info["scoped"])
        scope = request.match_info.get("scope")
        name = request.match_info["name"]
        return self.normalize(f"{scope}/{name}" if scope else name)

    @staticmethod
    def _tarball_url(base: str, ref: Any, package: str) -> Any:
        prefix = f"{base}/{quote(ref.domain)}/npm/{quote(ref.repository)}/{package}/-/"

        def url(filename: str) -> str:
            return prefix + quote(filename)

        return url
