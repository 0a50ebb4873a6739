"""PyPI: the simple repository API for pip and uv, through the shared pipeline.

Routes below ``/{domain}/pypi/{repo}``::

    GET  /simple/                      projects this repository has stored (not the upstream's
                                       whole list, which is hundreds of thousands of names)
    GET  /simple/{project}/            PEP 503 HTML / PEP 691 JSON by content negotiation;
                                       non-normalized names redirect to the normalized URL
    GET  /files/{project}/{filename}   a distribution file, through the cache
    GET  /files/{project}/{filename}.metadata   its PEP 658 core metadata
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, BinaryIO
from urllib.parse import quote

from aiohttp import hdrs, web

from proxy.errors import BadRequest, NotAcceptable
from proxy.formats import pypi_simple as simple
from proxy.formats.base import FormatAdapter, RouteSpec
from proxy.formats.pypi_upload import read_upload
from proxy.model import AssetRecord, ListedFile, Listing
from proxy.pipeline.documents import DocumentRequest
from proxy.server.pages import PageSource
from proxy.server.routing import base_url, repo_ref

_FILENAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+!-]{0,250}\Z")  # \Z: "$" accepts a trailing newline
MAX_METADATA_BYTES = 16 * 2**20


class PyPIAdapter(FormatAdapter):
    """See the module docstring."""

    name = "pypi"

    def routes(self) -> Sequence[RouteSpec]:
        return (
            RouteSpec("GET", "/simple/", self.project_list),
            RouteSpec("GET", "/simple/{project}/", self.project_page),
            RouteSpec("GET", "/simple/{project}", self.add_slash),
            RouteSpec("GET", "/files/{project}/{filename}", self.file),
            RouteSpec("POST", "/", self.upload),
            RouteSpec("POST", "", self.upload),
        )

    def normalize(self, package: str) -> str:
        normalized = simple.normalize(package)
        if normalized is None:
            raise BadRequest(f"{package!r} is not a valid Python project name (PEP 508)")
        return normalized

    def document_request(self, index_url: str, package: str) -> DocumentRequest:
        return DocumentRequest(
            key=f"pypi:{package}",
            url=f"{index_url}{quote(package)}/",
            headers={"Accept": simple.UPSTREAM_ACCEPT},
            serial_header="X-PyPI-Last-Serial",
        )

    def parse_listing(self, body: bytes, content_type: str, url: str, source: str) -> Listing:
        if "json" in content_type:
            return simple.parse_json(body, url, source)
        return simple.parse_html(body, url, source)

    def content_type(self, filename: str) -> str:
        if filename.endswith(".metadata"):
            return "text/plain; charset=utf-8"
        return "application/octet-stream"

    def is_companion(self, filename: str) -> bool:
        return filename.endswith(".metadata")

    def hosted_file(
        self, record: AssetRecord, attributes: Mapping[str, Any], *, hidden: bool, upload_time: str
    ) -> ListedFile:
        entry = super().hosted_file(record, attributes, hidden=hidden, upload_time=upload_time)
        extra: dict[str, Any] = {**entry.extra, "yanked": False}
        if attributes.get("requires_python"):
            extra["requires_python"] = attributes["requires_python"]
        return replace(entry, extra=extra)

    def derive(self, entry: ListedFile, blob: Callable[[], BinaryIO]) -> list[tuple[str, bytes, str]]:
        """PEP 658 metadata from a cached wheel whose upstream declared none."""
        if not entry.filename.endswith(".whl") or entry.extra.get("core_metadata") is not None:
            return []
        prefix = "-".join(entry.filename[:-4].split("-")[:2]).lower()
        with blob() as raw, zipfile.ZipFile(raw) as wheel:
            candidates = [
                info
                for info in wheel.infolist()
                if info.filename.count("/") == 1 and info.filename.endswith(".dist-info/METADATA")
            ]
            preferred = [c for c in candidates if c.filename.lower().startswith(prefix)]
            chosen = (preferred or candidates)[:1]
            if not chosen or chosen[0].file_size > MAX_METADATA_BYTES:
                return []
            data = wheel.read(chosen[0])
        return [(f"{entry.filename}.metadata", data, self.content_type(".metadata"))]

    # --- handlers -----------------------------------------------------------------------------

    async def add_slash(self, request: web.Request) -> web.StreamResponse:
        # From the raw path: the decoded one would turn ``%252e`` into ``%2e`` (a second decoding
        # by whoever follows) and a ``%0a`` into a line break in the Location header.
        raise web.HTTPMovedPermanently(location=_with_query(f"{request.raw_path.split('?', 1)[0]}/", request))

    async def project_list(self, request: web.Request) -> web.StreamResponse:
        ref = repo_ref(request)
        self.pipeline.resolver.repository(ref)
        kind = self._negotiate(request)
        names = await self.pipeline.resolver.package_names(ref, self.name)
        body = simple.render_project_list(names, kind == simple.JSON_V1)
        response = web.Response(body=body, headers={hdrs.CONTENT_TYPE: _media(kind), hdrs.VARY: "Accept"})
        return response

    async def project_page(self, request: web.Request) -> web.StreamResponse:
        ref = repo_ref(request)
        raw = request.match_info["project"]
        package = self.normalize(raw)
        if package != raw:
            target = request.path.replace(f"/simple/{quote(raw)}/", f"/simple/{package}/", 1)
            raise web.HTTPMovedPermanently(location=_with_query(target, request))
        kind = self._negotiate(request)
        base = base_url(request, self.pipeline.config.server)
        variant = (ref.repository, kind, base)
        return await self.pipeline.pages.respond(
            request,
            (ref.domain, self.name, package),
            variant,
            lambda: self._page_source(request, package, kind, base),
        )

    async def _page_source(self, request: web.Request, package: str, kind: str, base: str) -> PageSource:
        ref = repo_ref(request)
        resolved = await self.pipeline.resolver.listing(ref, self, package)
        stored = await self.pipeline.resolver.cached_files(ref, self.name, package)
        prefix = f"{base}/{quote(ref.domain)}/pypi/{quote(ref.repository)}/files/{package}/"
        urls = {f.filename: prefix + quote(f.filename) for f in resolved.listing.files}
        derived = {name: rec.digest.hex for name, rec in stored.items() if name.endswith(".metadata")}
        sizes = {name: rec.size for name, rec in stored.items()}

        def draw() -> bytes:
            if kind == simple.JSON_V1:
                return simple.render_json(package, resolved.listing, urls, sizes, derived)
            return simple.render_html(package, resolved.listing, urls, derived)

        # The page shows the sizes of cached files and the metadata derived from them.
        depends_on = (tuple(sorted(sizes.items())), tuple(sorted(derived.items())))
        return PageSource(resolved, draw, _media(kind), depends_on)

    async def file(self, request: web.Request) -> web.StreamResponse:
        ref = repo_ref(request)
        package = self.normalize(request.match_info["project"])
        filename = request.match_info["filename"]
        if not _FILENAME_RE.match(filename):
            raise BadRequest(f"{filename!r} is not a valid distribution filename")
        handle = await self.pipeline.resolver.asset(ref, self, package, filename)
        return await self.pipeline.sender.asset(request, handle)

    async def upload(self, request: web.Request) -> web.StreamResponse:
        """twine's legacy upload: 201 on success, 409 if the file exists (``--skip-existing``)."""
        ref = repo_ref(request)
        self.pipeline.resolver.repository(ref)
        publisher = self.pipeline.publisher
        upload = await read_upload(request, publisher, ref)
        record = await publisher.publish(ref, self, upload)
        return web.json_response(
            {
                "package": record.package,
                "version": record.version,
                "filename": record.filename,
                "sha256": record.digest.hex,
                "size": record.size,
            },
            status=201,
        )

    def _negotiate(self, request: web.Request) -> str:
        # A literal '+' in a query string decodes to a space; media types never contain spaces.
        format_param = request.query.get("format", "").replace(" ", "+") or None
        kind = simple.negotiate(request.headers.get(hdrs.ACCEPT), format_param)
        if kind is None:
            raise NotAcceptable(
                "none of the accepted media types is served here; use "
                f"{simple.JSON_V1}, {simple.HTML_V1} or text/html"
            )
        return kind


def _media(kind: str) -> str:
    return "text/html; charset=utf-8" if kind == simple.TEXT_HTML else kind


def _with_query(path: str, request: web.Request) -> str:
    return f"{path}?{request.query_string}" if request.query_string else path
