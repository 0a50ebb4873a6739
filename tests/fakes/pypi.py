"""A fake upstream package index speaking the real simple-repository protocol.

The proxy under test must be exercised against an upstream that behaves
like the real one (PEP 503 HTML, PEP 691 JSON, PEP 658/714 metadata,
PEP 700 fields, ETags, ``X-PyPI-Last-Serial``) and that can also
misbehave on demand: refuse connections, fail, rate-limit, stall,
truncate, corrupt or trickle bodies.  Everything runs in-process on
127.0.0.1 with an ephemeral port, and all state lives on the
:class:`FakePyPI` instance so tests can run side by side.

Distribution files are kept on disk and streamed in chunks read through
:func:`asyncio.to_thread`: huge files are never held in memory, and the
event loop thread never does blocking file I/O (the suite runs under
``blockbuster``).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import html
import json
import re
import zipfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.fakes.dists import sha256_file, wheel_metadata
from tests.fakes.server import BODY_FAULTS, FakeServer, Fault, FaultKind, Reply

__all__ = ["FakeFile", "FakePyPI", "Fault", "FaultKind", "normalize"]


JSON_CT = "application/vnd.pypi.simple.v1+json"
HTML_V1_CT = "application/vnd.pypi.simple.v1+html"
TEXT_HTML_CT = "text/html; charset=utf-8"


def normalize(name: str) -> str:
    """Normalize a project name per PEP 503, as index URLs require."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass
class FakeFile:
    """One distribution file served by the fake index, backed by a file on disk.

    A path rather than bytes so that 200 MB files cost no memory;
    ``size`` and ``sha256`` are computed once when the file is added.
    """

    filename: str
    path: Path
    sha256: str
    size: int
    upload_time: str
    requires_python: str | None = None
    yanked: bool | str = False
    core_metadata: bytes | None = None

    @property
    def core_metadata_sha256(self) -> str | None:
        """SHA-256 of the PEP 658 metadata file, as the index declares it."""
        if self.core_metadata is None:
            return None
        return hashlib.sha256(self.core_metadata).hexdigest()

    @property
    def version(self) -> str | None:
        """Version parsed from the file name, for the PEP 700 ``versions`` list."""
        if self.filename.endswith(".whl"):
            parts = self.filename[:-4].split("-")
            return parts[1] if len(parts) >= 5 else None
        for suffix in (".tar.gz", ".zip", ".tar.bz2", ".tgz"):
            if self.filename.endswith(suffix):
                stem = self.filename[: -len(suffix)]
                return stem.rsplit("-", 1)[1] if "-" in stem else None
        return None


@dataclass
class _Project:
    """A project: its display name and files in upload order."""

    name: str
    files: dict[str, FakeFile] = field(default_factory=dict)


def _version_key(version: str) -> tuple[tuple[int, int, str], ...]:
    """Sort key good enough for test versions, without depending on packaging."""
    key: list[tuple[int, int, str]] = []
    for part in re.split(r"[.+-]", version):
        key.append((0, int(part), "") if part.isdigit() else (1, 0, part))
    return tuple(key)


def _now_iso() -> str:
    """Current UTC time in the PEP 700 ``upload-time`` format."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _inspect(path: Path, with_metadata: bool) -> tuple[str, int, bytes | None]:
    """Hash, size and (for wheels) core metadata of a file; blocking I/O."""
    metadata: bytes | None = None
    if with_metadata and path.name.endswith(".whl"):
        try:
            metadata = wheel_metadata(path)
        except (ValueError, zipfile.BadZipFile):
            metadata = None
    return sha256_file(path), path.stat().st_size, metadata


def _parse_accept(accept: str) -> list[tuple[str, float]]:
    """Split an Accept header into (media type, q) pairs, in header order."""
    result: list[tuple[str, float]] = []
    for item in accept.split(","):
        media, *params = (p.strip() for p in item.split(";"))
        if not media:
            continue
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        result.append((media.lower(), q))
    return result


_MEDIA_TYPES: dict[str, tuple[str, str]] = {
    "application/vnd.pypi.simple.v1+json": ("json", JSON_CT),
    "application/vnd.pypi.simple.latest+json": ("json", JSON_CT),
    "application/vnd.pypi.simple.v1+html": ("html", HTML_V1_CT),
    "application/vnd.pypi.simple.latest+html": ("html", HTML_V1_CT),
    "text/html": ("html", TEXT_HTML_CT),
    "*/*": ("html", TEXT_HTML_CT),
}


def _etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Weak comparison of If-None-Match against our strong ETag."""
    if not if_none_match:
        return False
    for candidate in if_none_match.split(","):
        candidate = candidate.strip()
        if candidate == "*" or candidate.removeprefix("W/") == etag:
            return True
    return False


class FakePyPI(FakeServer):
    """An in-process fake package index with fault injection.

    Use as ``async with FakePyPI() as pypi:`` (or ``start()``/``close()``),
    add files with :meth:`add_file`, point the proxy at :attr:`url`, and
    inspect :attr:`hits`.  With ``html_only=True`` it ignores Accept and
    always answers ``text/html``, like a static or legacy mirror.
    """

    def __init__(self, *, html_only: bool = False, host: str = "127.0.0.1") -> None:
        self.html_only = html_only
        super().__init__(host)
        self.hits: collections.Counter[str] = collections.Counter()
        self.requests: list[tuple[str, dict[str, str]]] = []  # (path, headers): what reached us
        self.serial: dict[str, int] = {}
        self.faults: dict[str, Fault] = {}
        self._projects: dict[str, _Project] = {}
        self._files: dict[str, FakeFile] = {}
        self._serial_counter = 1000

    @property
    def url(self) -> str:
        """The simple index URL to configure as the proxy's upstream."""
        return f"{self.origin}/simple/"

    def file_url(self, filename: str) -> str:
        """Absolute URL (no fragment) at which ``filename`` is served."""
        return f"{self.origin}/files/{filename}"

    # --------------------------------------------------------------------- state

    def add_file(
        self,
        project: str,
        path: Path,
        *,
        requires_python: str | None = None,
        yanked: bool | str = False,
        with_metadata: bool = True,
        upload_time: str | None = None,
    ) -> FakeFile:
        """Publish a distribution file under ``project`` and bump its serial.

        Reads the file to hash it, so this does blocking I/O: from inside
        the event loop use :meth:`add_file_async`.  ``with_metadata`` makes
        a wheel advertise and serve PEP 658 metadata; re-adding the same
        file name replaces the earlier entry.
        """
        path = Path(path)
        return self._register(
            project,
            path,
            _inspect(path, with_metadata),
            requires_python=requires_python,
            yanked=yanked,
            upload_time=upload_time,
        )

    async def add_file_async(
        self,
        project: str,
        path: Path,
        *,
        requires_python: str | None = None,
        yanked: bool | str = False,
        with_metadata: bool = True,
        upload_time: str | None = None,
    ) -> FakeFile:
        """:meth:`add_file` with the hashing done off the event loop thread."""
        path = Path(path)
        info = await asyncio.to_thread(_inspect, path, with_metadata)
        return self._register(
            project,
            path,
            info,
            requires_python=requires_python,
            yanked=yanked,
            upload_time=upload_time,
        )

    def _register(
        self,
        project: str,
        path: Path,
        info: tuple[str, int, bytes | None],
        *,
        requires_python: str | None,
        yanked: bool | str,
        upload_time: str | None,
    ) -> FakeFile:
        """Record an inspected file; pure in-memory work, safe on the loop."""
        sha256, size, metadata = info
        norm = normalize(project)
        entry = FakeFile(
            filename=path.name,
            path=path,
            sha256=sha256,
            size=size,
            upload_time=upload_time or _now_iso(),
            requires_python=requires_python,
            yanked=yanked,
            core_metadata=metadata,
        )
        proj = self._projects.setdefault(norm, _Project(name=project))
        proj.files[entry.filename] = entry
        self._files[entry.filename] = entry
        self._serial_counter += 1
        self.serial[norm] = self._serial_counter
        return entry

    def remove_project(self, project: str) -> None:
        """Forget a project and its files; its pages and files then 404."""
        proj = self._projects.pop(normalize(project), None)
        self.serial.pop(normalize(project), None)
        if proj is not None:
            for filename in proj.files:
                self._files.pop(filename, None)

    def files(self, project: str) -> list[FakeFile]:
        """The files currently published for ``project``, in upload order."""
        proj = self._projects.get(normalize(project))
        return list(proj.files.values()) if proj else []

    # ----------------------------------------------------------------- rendering

    def _file_json(self, f: FakeFile) -> dict[str, Any]:
        """PEP 691 (+658/700/714) JSON entry for one file."""
        meta: dict[str, str] | bool = {"sha256": f.core_metadata_sha256} if f.core_metadata_sha256 else False
        return {
            "filename": f.filename,
            "url": self.file_url(f.filename),
            "hashes": {"sha256": f.sha256},
            "requires-python": f.requires_python,
            "yanked": f.yanked,
            "size": f.size,
            "upload-time": f.upload_time,
            "core-metadata": meta,
            "dist-info-metadata": meta,
        }

    def _file_html(self, f: FakeFile) -> str:
        """PEP 503 anchor for one file, with all data-* attributes."""
        attrs = [f'href="{html.escape(self.file_url(f.filename))}#sha256={f.sha256}"']
        if f.requires_python is not None:
            attrs.append(f'data-requires-python="{html.escape(f.requires_python)}"')
        if f.yanked is not False:
            reason = "" if f.yanked is True else str(f.yanked)
            attrs.append(f'data-yanked="{html.escape(reason)}"')
        if f.core_metadata_sha256:
            attrs.append(f'data-core-metadata="sha256={f.core_metadata_sha256}"')
            attrs.append(f'data-dist-info-metadata="sha256={f.core_metadata_sha256}"')
        return f"    <a {' '.join(attrs)}>{html.escape(f.filename)}</a><br />\n"

    def _render_project(self, norm: str, fmt: str) -> bytes:
        """Body of ``/simple/{norm}/`` in the chosen format."""
        proj = self._projects[norm]
        files = list(proj.files.values())
        if fmt == "json":
            versions = sorted({v for f in files if (v := f.version)}, key=_version_key)
            doc = {
                "meta": {"api-version": "1.1", "_last-serial": self.serial.get(norm, 0)},
                "name": norm,
                "files": [self._file_json(f) for f in files],
                "versions": versions,
            }
            return json.dumps(doc, separators=(",", ":")).encode()
        title = html.escape(norm)
        return (
            "<!DOCTYPE html>\n<html>\n  <head>\n"
            '    <meta name="pypi:repository-version" content="1.1">\n'
            f"    <title>Links for {title}</title>\n  </head>\n  <body>\n"
            f"    <h1>Links for {title}</h1>\n"
            + "".join(self._file_html(f) for f in files)
            + "  </body>\n</html>\n"
        ).encode()

    def _render_index(self, fmt: str) -> bytes:
        """Body of ``/simple/`` (the project list) in the chosen format."""
        if fmt == "json":
            doc = {
                "meta": {"api-version": "1.1", "_last-serial": self._serial_counter},
                "projects": [
                    {"name": p.name, "_last-serial": self.serial.get(n, 0)} for n, p in self._projects.items()
                ],
            }
            return json.dumps(doc, separators=(",", ":")).encode()
        links = "".join(
            f'    <a href="/simple/{n}/">{html.escape(p.name)}</a>\n' for n, p in self._projects.items()
        )
        return (
            "<!DOCTYPE html>\n<html>\n  <head>\n"
            '    <meta name="pypi:repository-version" content="1.1">\n'
            "    <title>Simple index</title>\n  </head>\n  <body>\n" + links + "  </body>\n</html>\n"
        ).encode()

    def _negotiate(self, accept: str | None) -> tuple[str, str]:
        """Pick ("json"|"html", Content-Type) from Accept, preferring higher q.

        Ties go to the type listed first; unknown or missing Accept gets
        ``text/html``, as the real index does.
        """
        if self.html_only:
            return "html", TEXT_HTML_CT
        best: tuple[str, str] | None = None
        best_q = 0.0
        for media, q in _parse_accept(accept or ""):
            choice = _MEDIA_TYPES.get(media)
            if choice is not None and q > best_q:
                best, best_q = choice, q
        return best or ("html", TEXT_HTML_CT)

    def _page(self, request: web.Request, norm: str | None) -> Reply:
        """Build an index page reply with ETag, serial and 304 handling."""
        fmt, content_type = self._negotiate(request.headers.get("Accept"))
        body = self._render_project(norm, fmt) if norm else self._render_index(fmt)
        serial = self.serial.get(norm, 0) if norm else self._serial_counter
        etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
        headers = {
            "ETag": etag,
            "X-PyPI-Last-Serial": str(serial),
            "Vary": "Accept",
            "Cache-Control": "max-age=600, public",
        }
        if _etag_matches(request.headers.get("If-None-Match"), etag):
            return Reply(304, headers)
        headers["Content-Type"] = content_type
        return Reply(200, headers, body)

    # ------------------------------------------------------------------- routing

    def _route(self, request: web.Request) -> Reply:
        """Map a request to a reply; pure in-memory work."""
        if request.method not in ("GET", "HEAD"):
            return Reply(405, {"Allow": "GET, HEAD"}, b"method not allowed\n")
        path = request.path
        if path == "/simple/":
            return self._page(request, None)
        if path == "/simple":
            return Reply(301, {"Location": "/simple/"})
        if m := re.fullmatch(r"/simple/([^/]+)(/?)", path):
            name, slash = m.groups()
            norm = normalize(name)
            if name != norm or not slash:
                return Reply(301, {"Location": f"/simple/{norm}/"})
            if norm not in self._projects:
                return Reply(404, {}, b"not found\n")
            return self._page(request, norm)
        if m := re.fullmatch(r"/files/([^/]+)", path):
            filename = m.group(1)
            if (f := self._files.get(filename)) is not None:
                return Reply(200, {"Content-Type": "application/octet-stream"}, f)
            base = filename.removesuffix(".metadata")
            f = self._files.get(base) if base != filename else None
            if f is not None and f.core_metadata is not None:
                return Reply(200, {"Content-Type": "application/octet-stream"}, f.core_metadata)
        return Reply(404, {}, b"not found\n")

    async def _entry(self, request: web.Request) -> web.StreamResponse:
        """Single aiohttp handler: count, apply faults, route, send."""
        self.hits[request.path] += 1
        self.requests.append((request.path, dict(request.headers)))
        fault = self._take_fault(request.path)
        if fault is not None:
            if fault.kind == "refuse":
                if request.transport is not None:
                    request.transport.abort()
                # Writing this to the dead transport fails quietly in aiohttp.
                return web.Response(status=500)
            if fault.kind == "status":
                return web.Response(status=fault.status, text=f"fake upstream error {fault.status}\n")
            if fault.kind == "429":
                return web.Response(
                    status=429,
                    headers={"Retry-After": str(fault.retry_after)},
                    text="too many requests\n",
                )
            if fault.kind == "stall" and await self._sleep(fault.delay) and request.transport is not None:
                # Shutting down mid-stall: hang up rather than answer late.
                request.transport.abort()
                return web.Response(status=500)
        reply = self._route(request)
        body_fault = fault if fault is not None and fault.kind in BODY_FAULTS else None
        return await self._send(request, reply, body_fault, read_chunk=1024 * 1024)
