"""NuGet v3: a feed for nuget.exe and dotnet, through the shared pipeline.

Routes below ``/{domain}/nuget/{repo}``::

    GET    /v3/index.json                            the service index (every URL the proxy's)
    GET    /v3-flatcontainer/{id}/index.json         versions (lower-case, normalised)
    GET    /v3-flatcontainer/{id}/{v}/{id}.{v}.nupkg a package through the cache
    GET    /v3-flatcontainer/{id}/{v}/{id}.nuspec    its manifest (taken from the package)
    GET    /v3/registration/{id}/index.json          registration, every page inlined
    GET    /v3/registration/{id}/{v}.json            a registration leaf
    GET    /v3/query, /v3/autocomplete               search: this repository's packages, merged
                                                     with the upstream's when it answers
    PUT    /api/v2/package                           nuget push (201; 409 for an existing version)
    DELETE /api/v2/package/{id}/{v}                  unlist (NuGet's convention for delete)
    POST   /api/v2/package/{id}/{v}                  relist

An upstream is found through its service index (a cached document with freshness); its
registration is the package listing, and registration pages it links rather than inlines are
followed and cached. A ``.nupkg`` is checked against the upstream's SHA-512 where its
registration gives one. Version lists merge along the chain like every other format's.
"""

from __future__ import annotations

import base64
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, BinaryIO
from urllib.parse import urlencode

import orjson
from aiohttp import web

from proxy.errors import BadRequest, NotFound, ProxyError
from proxy.formats import nuget_docs as docs
from proxy.formats import nuget_push
from proxy.formats import nuget_versions as nv
from proxy.formats.base import FormatAdapter, RouteSpec
from proxy.model import AssetRecord, CacheStatus, ListedFile, Listing, RepoRef
from proxy.pipeline.documents import DocumentRequest
from proxy.server.pages import PageSource
from proxy.server.routing import base_url, repo_ref

JSON = "application/json"
SEARCH_LIMIT = 4 * 2**20
MAX_TAKE = 1000


class NuGetAdapter(FormatAdapter):
    """See the module docstring."""

    name = "nuget"
    discovers_service = True

    def routes(self) -> Sequence[RouteSpec]:
        return (
            RouteSpec("GET", "/v3/index.json", self.service_index),
            RouteSpec("GET", "/v3-flatcontainer/{id}/index.json", self.versions),
            RouteSpec("GET", "/v3-flatcontainer/{id}/{version}/{filename}", self.content),
            RouteSpec("GET", "/v3/registration/{id}/index.json", self.registration),
            RouteSpec("GET", "/v3/registration/{id}/{leaf:[^/]+\\.json}", self.leaf),
            RouteSpec("GET", "/v3/query", self.search),
            RouteSpec("GET", "/v3/autocomplete", self.autocomplete),
            RouteSpec("PUT", "/api/v2/package", self.push),
            RouteSpec("PUT", "/api/v2/package/", self.push),
            RouteSpec("DELETE", "/api/v2/package/{id}/{version}", self.unlist),
            RouteSpec("POST", "/api/v2/package/{id}/{version}", self.relist),
        )

    def normalize(self, package: str) -> str:
        return nv.normalize_id(package)

    def normalize_prefix(self, prefix: str) -> str:
        if not nv.valid_id(prefix + "x"):
            raise BadRequest(f"{prefix!r} is not the start of a NuGet package id")
        return prefix.lower()

    def service_base(self, body: bytes) -> str:
        return docs.registration_base(docs.service_resources(body))

    def document_request(self, index_url: str, package: str) -> DocumentRequest:
        return DocumentRequest(key=f"nuget:{package}", url=f"{index_url}{package}/index.json", headers={})

    def parse_listing(self, body: bytes, content_type: str, url: str, source: str) -> Listing:
        return docs.parse_registration(body, source)

    def linked_documents(self, listing: Listing) -> list[DocumentRequest]:
        return [
            DocumentRequest(key=f"nuget-page:{url}", url=url, headers={})
            for url in listing.extra.get("pages") or []
        ]

    def with_linked(self, listing: Listing, bodies: list[bytes], source: str) -> Listing:
        files = list(listing.files)
        for body in bodies:
            files += docs.parse_page(body, source)
        package = listing.package or (nv.normalize_id(str(files[0].extra["catalog"]["id"])) if files else "")
        return Listing(package=package, files=tuple(files))

    def content_type(self, filename: str) -> str:
        return "text/xml" if filename.endswith(".nuspec") else "application/octet-stream"

    def is_companion(self, filename: str) -> bool:
        return filename.endswith(".nuspec")

    def hosted_file(
        self, record: AssetRecord, attributes: Mapping[str, Any], *, hidden: bool, upload_time: str
    ) -> ListedFile:
        entry = super().hosted_file(record, attributes, hidden=hidden, upload_time=upload_time)
        extra = {
            "catalog": dict(attributes.get("catalog") or {}),
            "listed": not hidden,
            "published": upload_time,
        }
        return replace(entry, extra=extra)

    def describe_cached(self, entry: ListedFile, hashes: Mapping[str, str], size: int) -> ListedFile:
        """The registration's ``packageHash`` (passed through) states the cached package's SHA-512."""
        catalog = dict(entry.extra.get("catalog") or {})
        if "sha512" in hashes and "packageHash" in catalog:
            catalog["packageHash"] = base64.b64encode(bytes.fromhex(hashes["sha512"])).decode()
            catalog["packageHashAlgorithm"] = "SHA512"
            catalog["packageSize"] = size
        return replace(entry, hashes=dict(hashes), size=size, extra={**entry.extra, "catalog": catalog})

    def derive(self, entry: ListedFile, blob: Callable[[], BinaryIO]) -> list[tuple[str, bytes, str]]:
        """The .nuspec inside a cached .nupkg, served from the flat container (blocking)."""
        if not entry.filename.endswith(".nupkg"):
            return []
        with blob() as raw, zipfile.ZipFile(raw) as archive:
            names = [n for n in archive.namelist() if n.lower().endswith(".nuspec") and "/" not in n]
            if len(names) != 1:
                return []
            nuspec = archive.read(names[0])
        return [(entry.filename.removesuffix(".nupkg") + ".nuspec", nuspec, "text/xml")]

    # --- reads ---------------------------------------------------------------------------------

    def _urls(self, request: web.Request, ref: RepoRef) -> docs.Urls:
        base = base_url(request, self.pipeline.config.server)
        return docs.Urls(f"{base}/{ref.domain}/nuget/{ref.repository}")

    async def service_index(self, request: web.Request) -> web.StreamResponse:
        ref = repo_ref(request)
        self.pipeline.resolver.repository(ref)
        return web.Response(body=docs.render_service_index(self._urls(request, ref)), content_type=JSON)

    async def versions(self, request: web.Request) -> web.StreamResponse:
        ref = repo_ref(request)
        package = self.normalize(request.match_info["id"])

        async def source() -> PageSource:
            resolved = await self.pipeline.resolver.listing(ref, self, package)
            files = _packages(resolved.listing.files)
            return PageSource(resolved, lambda: docs.render_versions(files), JSON)

        key, variant = (ref.domain, self.name, package), (ref.repository, "versions")
        return await self.pipeline.pages.respond(request, key, variant, source)

    async def registration(self, request: web.Request) -> web.StreamResponse:
        ref = repo_ref(request)
        package = self.normalize(request.match_info["id"])
        urls = self._urls(request, ref)

        async def source() -> PageSource:
            resolved = await self.pipeline.resolver.listing(ref, self, package)
            files = _packages(resolved.listing.files)
            return PageSource(resolved, lambda: docs.render_registration(urls, package, files), JSON)

        key, variant = (ref.domain, self.name, package), (ref.repository, "registration", urls.feed)
        return await self.pipeline.pages.respond(request, key, variant, source)

    async def leaf(self, request: web.Request) -> web.StreamResponse:
        ref = repo_ref(request)
        package = self.normalize(request.match_info["id"])
        version = nv.normalize_or_400(request.match_info["leaf"].removesuffix(".json"))
        resolved = await self.pipeline.resolver.listing(ref, self, package)
        entry = _find(resolved.listing.files, version)
        if entry is None:
            raise NotFound(f"{package} {version} not found", detail={"package": package, "version": version})
        response = web.Response(body=docs.render_leaf(self._urls(request, ref), entry), content_type=JSON)
        response.headers["X-Cache"] = resolved.status.value
        return response

    async def content(self, request: web.Request) -> web.StreamResponse:
        ref = repo_ref(request)
        package = self.normalize(request.match_info["id"])
        version = nv.normalize_or_400(request.match_info["version"])
        filename = request.match_info["filename"]
        lower = version.lower()
        if filename == f"{package}.{lower}.nupkg":
            handle = await self.pipeline.resolver.asset(ref, self, package, filename)
            return await self.pipeline.sender.asset(request, handle)
        if filename != f"{package}.nuspec":
            raise BadRequest(
                f"{filename!r}: the flat container serves {package}.{lower}.nupkg and {package}.nuspec"
            )
        return await self._nuspec(request, ref, package, lower)

    async def _nuspec(
        self, request: web.Request, ref: RepoRef, package: str, version: str
    ) -> web.StreamResponse:
        """The manifest, extracted when the package was cached; the package is fetched first if need be."""
        name, nupkg = f"{package}.{version}.nuspec", f"{package}.{version}.nupkg"
        record, status = await self.pipeline.resolver.companion(ref, self, package, nupkg, name)
        if record is None:
            raise NotFound(f"{nupkg} has no readable .nuspec", detail={"package": package})
        return self.pipeline.sender.blob(request, record.digest, "text/xml", status)

    # --- search ----------------------------------------------------------------------------------

    async def search(self, request: web.Request) -> web.StreamResponse:
        ref = repo_ref(request)
        self.pipeline.resolver.repository(ref)
        query = request.query.get("q", "")
        skip, take = _int(request, "skip", 0), min(_int(request, "take", 20), MAX_TAKE)
        prerelease = request.query.get("prerelease", "false").lower() == "true"
        urls = self._urls(request, ref)
        hits: dict[str, dict[str, Any]] = {}
        for package in await self._local_matches(ref, query):
            try:
                resolved = await self.pipeline.resolver.listing(ref, self, package)
            except ProxyError:
                continue
            hit = docs.search_item(urls, _packages(resolved.listing.files), prerelease)
            if hit is not None:
                hits[package] = hit
        upstream_total, status = 0, CacheStatus.HIT
        upstream = await self._upstream_search(ref, "SearchQueryService", request, skip + take)
        if upstream is not None:
            status = CacheStatus.MISS
            upstream_total = int(upstream.get("totalHits") or 0)
            for raw in upstream.get("data") or []:
                hit = docs.rewrite_search_hit(urls, raw) if isinstance(raw, dict) else None
                if hit is not None:
                    hits.setdefault(str(hit["id"]).lower(), hit)
        ordered = list(hits.values())
        body = docs.search_response(ordered[skip : skip + take], max(len(ordered), upstream_total))
        response = web.Response(body=body, content_type=JSON)
        response.headers["X-Cache"] = status.value if upstream is not None else "LOCAL"
        return response

    async def autocomplete(self, request: web.Request) -> web.StreamResponse:
        ref = repo_ref(request)
        self.pipeline.resolver.repository(ref)
        skip, take = _int(request, "skip", 0), min(_int(request, "take", 20), MAX_TAKE)
        ids: dict[str, str] = {}
        for package in await self._local_matches(ref, request.query.get("q", "")):
            ids[package] = package
        upstream = await self._upstream_search(ref, "SearchAutocompleteService", request, skip + take)
        for raw in (upstream or {}).get("data") or []:
            if isinstance(raw, str) and nv.valid_id(raw):
                ids[raw.lower()] = raw  # the upstream knows the id's original case
        found = list(ids.values())
        body = orjson.dumps({"totalHits": len(found), "data": found[skip : skip + take]})
        return web.Response(body=body, content_type=JSON)

    async def _local_matches(self, ref: RepoRef, query: str) -> list[str]:
        match = docs.matches(query)
        return [p for p in await self.pipeline.resolver.package_names(ref, self.name) if match(p)]

    async def _upstream_search(
        self, ref: RepoRef, resource: str, request: web.Request, take: int
    ) -> dict[str, Any] | None:
        """The first NuGet connection's answer, or None when offline, absent or failing."""
        try:
            client = self.pipeline.resolver.first_connection(ref, self.name)
            resources = docs.service_resources(await self.pipeline.resolver.service_index(client))
        except (ProxyError, ValueError):
            return None
        url = resources.get(resource)
        if url is None:
            return None
        params = {
            k: v for k, v in request.query.items() if k in {"q", "prerelease", "semVerLevel", "packageType"}
        }
        params.update({"skip": "0", "take": str(min(take, MAX_TAKE))})
        try:
            status, _, body = await client.forward(
                "GET", f"{url}?{urlencode(params)}", content_type=None, body=b"", limit=SEARCH_LIMIT
            )
            doc = orjson.loads(body) if status == 200 else None
        except (ProxyError, orjson.JSONDecodeError):
            return None
        return doc if isinstance(doc, dict) else None

    # --- push, unlist, relist --------------------------------------------------------------------

    async def push(self, request: web.Request) -> web.StreamResponse:
        ref = repo_ref(request)
        publisher = self.pipeline.publisher
        self.pipeline.resolver.repository(ref)
        upload = await nuget_push.read_push(request, publisher)
        # Origin controls, and 409 for an existing version (same id and version, same file name).
        await publisher.publish(ref, self, upload)
        return web.json_response({"ok": True, "id": upload.package, "version": upload.version}, status=201)

    async def unlist(self, request: web.Request) -> web.StreamResponse:
        await self._set_listed(request, listed=False)
        return web.Response(status=204)

    async def relist(self, request: web.Request) -> web.StreamResponse:
        await self._set_listed(request, listed=True)
        return web.Response(status=200)

    async def _set_listed(self, request: web.Request, *, listed: bool) -> None:
        ref = repo_ref(request)
        package = self.normalize(request.match_info["id"])
        version = nv.normalize_or_400(request.match_info["version"])
        published = await self.pipeline.packages.published_versions(ref, self.name, package)
        stored = next((v for v in published if v.lower() == version.lower()), None)
        if stored is None:
            raise NotFound(
                f"{package} {version} is not published in {ref.domain}/{ref.repository}",
                detail={"package": package, "version": version},
            )
        status = "Published" if listed else "Unlisted"
        await self.pipeline.packages.set_status(ref, self.name, package, stored, status)


def _packages(files: Sequence[ListedFile]) -> list[ListedFile]:
    """The package entries of a listing (companion .nuspec files left out)."""
    return [f for f in files if f.filename.endswith(".nupkg") and f.version]


def _find(files: Sequence[ListedFile], version: str) -> ListedFile | None:
    for entry in _packages(files):
        if (entry.version or "").lower() == version.lower():
            return entry
    return None


def _int(request: web.Request, key: str, default: int) -> int:
    raw = request.query.get(key)
    if raw is None or raw == "":
        return default
    if not raw.isdigit():
        raise BadRequest(f"{key} must be a non-negative integer")
    return int(raw)
