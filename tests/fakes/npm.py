"""A fake npm registry speaking the real registry protocol, and real tarballs made by ``npm pack``.

:class:`FakeNpmRegistry` serves full packuments (``application/json``), abbreviated ones
(``application/vnd.npm.install-v1+json``, when the client asks for them as npm does), and
tarballs, for plain (``/name``) and scoped names (``/@scope%2fname`` and ``/@scope/name``), with
ETags, 304s and the registry's ``{"error": "Not found"}`` 404. Like the fake PyPI it misbehaves on
demand (:class:`tests.fakes.pypi.Fault`: refuse, status, 429, stall, truncate, wrong_bytes,
slow; keyed by the raw request path or ``"*"``) and counts :attr:`FakeNpmRegistry.hits` per raw
request path. Everything runs in-process on 127.0.0.1 with an ephemeral port; all state lives on
the instance.

:func:`build_tarball` runs the real ``npm pack`` (blocking: call it from sync fixtures or through
:func:`asyncio.to_thread`), so the bytes are exactly what a publisher would upload.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import json
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from tests.fakes.server import BODY_FAULTS, FakeServer, Fault, FaultKind, Reply
from tests.npm_clients import npm_env

__all__ = ["ABBREVIATED", "FakeNpmRegistry", "Fault", "FaultKind", "NpmVersion", "build_tarball", "pack_name"]

ABBREVIATED = "application/vnd.npm.install-v1+json"
FULL = "application/json"

_NAME = r"[a-z0-9~][a-z0-9._~-]*"
# Raw (still percent-encoded) paths; scoped names come as "@scope%2fname" or "@scope/name".
_PACKUMENT_RE = re.compile(rf"/((?:@{_NAME}(?:%2[fF]|/))?{_NAME})")
_TARBALL_RE = re.compile(rf"/((?:@{_NAME}/)?{_NAME})/-/([^/]+\.tgz)")


def pack_name(name: str, version: str) -> str:
    """The file ``npm pack`` writes: ``left-1.0.0.tgz``, ``acme-util-1.0.0.tgz`` for ``@acme/util``."""
    return f"{name.removeprefix('@').replace('/', '-')}-{version}.tgz"


def build_tarball(dest: Path, name: str, version: str, *, dependencies: dict[str, str] | None = None) -> Path:
    """Make a real package tarball with ``npm pack`` in ``dest``; returns its path.

    The package has a ``package.json`` and an ``index.js`` exporting its name and version. npm
    runs with a throw-away cache and config, so nothing of this machine's npm setup is used.
    """
    dest.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {
        "name": name,
        "version": version,
        "description": f"{name} for the proxy tests",
        "main": "index.js",
        "license": "MIT",
    }
    if dependencies:
        manifest["dependencies"] = dependencies
    with tempfile.TemporaryDirectory(prefix="npm-pack-") as tmp:
        root = Path(tmp)
        src = root / "package"
        src.mkdir()
        (src / "package.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        (src / "index.js").write_text(
            f"module.exports = {{ name: {json.dumps(name)}, version: {json.dumps(version)} }};\n",
            encoding="utf-8",
        )
        done = subprocess.run(
            ["npm", "pack", "--pack-destination", str(dest.resolve())],
            cwd=src,
            env=npm_env(root / "cache"),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    path = dest / pack_name(name, version)
    if done.returncode != 0 or not path.is_file():
        raise RuntimeError(
            f"npm pack {name}@{version} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
        )
    return path


@dataclass
class NpmVersion:
    """One published version: its tarball on disk and the hashes the registry declares."""

    name: str
    version: str
    path: Path
    shasum: str  # SHA-1, hex
    integrity: str  # "sha512-" + base64
    size: int
    time: str
    dependencies: dict[str, str] = field(default_factory=dict)
    deprecated: str | None = None

    @property
    def filename(self) -> str:
        """The tarball's name in its URL: the unscoped name, ``util-1.0.0.tgz`` for ``@acme/util``."""
        return f"{self.name.rsplit('/', 1)[-1]}-{self.version}.tgz"

    @property
    def sha512_hex(self) -> str:
        return base64.b64decode(self.integrity.removeprefix("sha512-")).hex()


def _inspect(path: Path) -> tuple[str, str, int]:
    """(sha1 hex, sha512 SRI, size) of a file; blocking I/O."""
    data = path.read_bytes()
    sri = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
    return hashlib.sha1(data).hexdigest(), sri, len(data)  # npm's shasum is SHA-1


def _now_iso() -> str:
    """Current UTC time as the registry writes it: ``2024-01-01T00:00:00.000Z``."""
    now = datetime.now(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def _version_key(version: str) -> tuple[tuple[int, ...], int, str]:
    core, _, pre = version.partition("-")
    nums = tuple(int(p) if p.isdigit() else 0 for p in core.split("+")[0].split("."))
    return nums, 0 if pre else 1, pre


def _etag_matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    return any(
        c.strip() in {"*", etag} or c.strip().removeprefix("W/") == etag for c in if_none_match.split(",")
    )


class FakeNpmRegistry(FakeServer):
    """An in-process fake npm registry with fault injection.

    Use as ``async with FakeNpmRegistry() as registry:``, publish with :meth:`add_version` (or
    :meth:`add_version_async` on the event loop), point the proxy at :attr:`url`, inspect
    :attr:`hits`, and set :attr:`faults` by raw path (``registry.tarball_path(...)`` gives it).
    """

    def __init__(self, *, host: str = "127.0.0.1") -> None:
        super().__init__(host)
        self.hits: collections.Counter[str] = collections.Counter()
        self.faults: dict[str, Fault] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []  # (raw path, headers) in order
        self._packages: dict[str, dict[str, NpmVersion]] = {}
        self._created: dict[str, str] = {}
        self._modified: dict[str, str] = {}

    @property
    def url(self) -> str:
        """The registry root, with a trailing slash, to configure as the proxy's upstream."""
        return f"{self.origin}/"

    # --------------------------------------------------------------------- state

    def add_version(
        self,
        name: str,
        tarball_path: Path,
        *,
        version: str,
        dependencies: dict[str, str] | None = None,
        deprecated: str | None = None,
        time: str | None = None,
    ) -> NpmVersion:
        """Publish ``tarball_path`` as ``name@version``. Hashes the file: blocking I/O (see
        :meth:`add_version_async`). Re-adding a version replaces it."""
        path = Path(tarball_path)
        return self._register(name, path, _inspect(path), version, dependencies, deprecated, time)

    async def add_version_async(
        self,
        name: str,
        tarball_path: Path,
        *,
        version: str,
        dependencies: dict[str, str] | None = None,
        deprecated: str | None = None,
        time: str | None = None,
    ) -> NpmVersion:
        """:meth:`add_version` with the hashing done off the event loop thread."""
        path = Path(tarball_path)
        info = await asyncio.to_thread(_inspect, path)
        return self._register(name, path, info, version, dependencies, deprecated, time)

    def _register(
        self,
        name: str,
        path: Path,
        info: tuple[str, str, int],
        version: str,
        dependencies: dict[str, str] | None,
        deprecated: str | None,
        time: str | None,
    ) -> NpmVersion:
        shasum, integrity, size = info
        entry = NpmVersion(
            name=name,
            version=version,
            path=path,
            shasum=shasum,
            integrity=integrity,
            size=size,
            time=time or _now_iso(),
            dependencies=dict(dependencies or {}),
            deprecated=deprecated,
        )
        self._packages.setdefault(name, {})[version] = entry
        self._created.setdefault(name, entry.time)
        self._modified[name] = max(self._modified.get(name, entry.time), entry.time)
        return entry

    def remove_package(self, name: str) -> None:
        """Forget a package; its packument and tarballs then 404."""
        self._packages.pop(name, None)
        self._created.pop(name, None)
        self._modified.pop(name, None)

    def versions(self, name: str) -> dict[str, NpmVersion]:
        return dict(self._packages.get(name, {}))

    def tarball_url(self, name: str, version: str) -> str:
        """Where the registry serves the tarball: ``{origin}/@scope/name/-/name-1.0.0.tgz``."""
        return f"{self.origin}{self.tarball_path(name, version)}"

    def tarball_path(self, name: str, version: str) -> str:
        """The raw request path of a tarball (the key of its hits and faults)."""
        return f"/{name}/-/{self._packages[name][version].filename}"

    @staticmethod
    def packument_path(name: str) -> str:
        """The raw path the proxy asks for: ``/left``, ``/@acme%2Futil``."""
        return "/" + name.replace("/", "%2F")

    # ----------------------------------------------------------------- rendering

    def latest(self, name: str) -> str:
        versions = list(self._packages[name])
        releases = [v for v in versions if "-" not in v] or versions
        return max(releases, key=_version_key)

    def manifest(self, entry: NpmVersion, *, abbreviated: bool) -> dict[str, Any]:
        dist = {
            "tarball": self.tarball_url(entry.name, entry.version),
            "shasum": entry.shasum,
            "integrity": entry.integrity,
        }
        doc: dict[str, Any] = {"name": entry.name, "version": entry.version}
        if not abbreviated:
            doc |= {
                "_id": f"{entry.name}@{entry.version}",
                "description": f"{entry.name} for the proxy tests",
                "main": "index.js",
                "license": "MIT",
                "_npmVersion": "11.0.0",
            }
        doc["dependencies"] = dict(entry.dependencies)
        if entry.deprecated is not None:
            doc["deprecated"] = entry.deprecated
        doc["dist"] = dist
        return doc

    def packument(self, name: str, *, abbreviated: bool) -> dict[str, Any]:
        entries = sorted(self._packages[name].values(), key=lambda e: _version_key(e.version))
        versions = {e.version: self.manifest(e, abbreviated=abbreviated) for e in entries}
        tags = {"latest": self.latest(name)}
        if abbreviated:
            return {"name": name, "modified": self._modified[name], "dist-tags": tags, "versions": versions}
        times = {"created": self._created[name], "modified": self._modified[name]}
        times |= {e.version: e.time for e in entries}
        return {
            "_id": name,
            "name": name,
            "description": f"{name} for the proxy tests",
            "readme": f"# {name}\n\nA package of the proxy tests.\n",
            "license": "MIT",
            "dist-tags": tags,
            "versions": versions,
            "time": times,
        }

    # ------------------------------------------------------------------- routing

    def _route(self, request: web.Request, raw: str) -> Reply:
        if request.method not in ("GET", "HEAD"):
            return Reply(405, {"Allow": "GET, HEAD"}, b'{"error":"Method not allowed"}')
        if m := _TARBALL_RE.fullmatch(raw):
            name, filename = unquote(m.group(1)), m.group(2)
            for entry in self._packages.get(name, {}).values():
                if entry.filename == filename:
                    etag = f'"{entry.shasum}"'
                    if _etag_matches(request.headers.get("If-None-Match"), etag):
                        return Reply(304, {"ETag": etag})
                    return Reply(200, {"Content-Type": "application/octet-stream", "ETag": etag}, entry)
            return _not_found()
        if m := _PACKUMENT_RE.fullmatch(raw):
            name = unquote(m.group(1))
            if name not in self._packages or not self._packages[name]:
                return _not_found()
            abbreviated = ABBREVIATED in request.headers.get("Accept", "")
            body = json.dumps(self.packument(name, abbreviated=abbreviated), separators=(",", ":")).encode()
            etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
            headers = {"ETag": etag, "Vary": "Accept", "Cache-Control": "public, max-age=300"}
            if _etag_matches(request.headers.get("If-None-Match"), etag):
                return Reply(304, headers)
            headers["Content-Type"] = f"{ABBREVIATED if abbreviated else FULL}; charset=utf-8"
            return Reply(200, headers, body)
        return _not_found()

    async def _entry(self, request: web.Request) -> web.StreamResponse:
        raw = request.rel_url.raw_path
        self.hits[raw] += 1
        self.requests.append((raw, dict(request.headers)))
        fault = self._take_fault(raw)
        if fault is not None:
            if fault.kind == "refuse":
                if request.transport is not None:
                    request.transport.abort()
                return web.Response(status=500)
            if fault.kind == "status":
                return web.json_response(
                    {"error": f"fake upstream error {fault.status}"}, status=fault.status
                )
            if fault.kind == "429":
                return web.json_response(
                    {"error": "too many requests"},
                    status=429,
                    headers={"Retry-After": str(fault.retry_after)},
                )
            if fault.kind == "stall" and await self._sleep(fault.delay) and request.transport is not None:
                request.transport.abort()
                return web.Response(status=500)
        reply = self._route(request, raw)
        body_fault = fault if fault is not None and fault.kind in BODY_FAULTS else None
        return await self._send(request, reply, body_fault, read_chunk=64 * 1024)


def _not_found() -> Reply:
    return Reply(404, {"Content-Type": "application/json"}, b'{"error":"Not found"}')
