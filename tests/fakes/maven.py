"""A fake Maven Central (the ``maven2`` layout) serving this machine's ``~/.m2/repository`` in place.

Maven tests need real artifacts (plugins, their dependency trees, JUnit) that a real ``mvn``
resolves, and the machine cannot reach Maven Central. The local repository already holds them
(426 MB), but as a *local* repository: no checksum files and no ``maven-metadata.xml``. So
:class:`FakeMavenRepo` serves those files straight from the source directory (never copied,
streamed in chunks read off the event loop), and makes up what a remote repository has and a
local one lacks:

* ``X.sha1``, ``X.md5``, ``X.sha256`` and ``X.sha512`` for every file ``X``, computed from its
  bytes once (in a thread: the suite runs under blockbuster) and cached;
* ``group/path/artifact/maven-metadata.xml`` (and its checksums), generated from the version
  directories present, ordered the way Maven's ``ComparableVersion`` orders them;
* ETag (the SHA-1 of what is sent), Last-Modified (the file's mtime) and 304 answers.

It misbehaves on demand, as the other fakes do: the base's :class:`~tests.fakes.server.Fault`
(keyed by the repository-relative path, e.g. ``"junit/junit/4.13.2/junit-4.13.2.jar"``, or
``"*"``), :meth:`FakeMavenRepo.corrupt` (wrong bytes under the right checksum: a proxy must
refuse them), :meth:`FakeMavenRepo.remove_checksums`, and ``stop_listening``/``resume_listening``.
Files can be added or replaced (:meth:`FakeMavenRepo.add_file`, :meth:`FakeMavenRepo.add_version`)
without touching the source directory: overrides live on the instance.

The repository is served under ``/maven2/`` (as Central's ``https://repo1.maven.org/maven2/``),
so a proxy that drops the upstream's base path fails. :attr:`FakeMavenRepo.hits` counts requests
per repository-relative path, :attr:`FakeMavenRepo.misses` those answered 404, and
:attr:`FakeMavenRepo.requests` keeps method, path and headers in order, which is how tests see
whether a client asked with HEAD, for ``.sha1`` or ``.md5``.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import functools
import hashlib
import io
import os
import stat
import time
import zipfile
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple, TypeAlias
from xml.sax.saxutils import escape

from aiohttp import web

from tests.fakes.server import BODY_FAULTS, FakeServer, Fault, FaultKind, Reply
from tests.maven_clients import M2_REPOSITORY, Dependency, pom_xml

__all__ = [
    "CHECKSUMS",
    "DEFAULT_ROOT",
    "FakeMavenRepo",
    "Fault",
    "FaultKind",
    "SeenRequest",
    "artifact_path",
    "build_jar",
    "compare_versions",
    "metadata_path",
    "sort_versions",
]

DEFAULT_ROOT = M2_REPOSITORY
CHECKSUMS: tuple[str, ...] = ("sha1", "md5", "sha256", "sha512")
METADATA = "maven-metadata.xml"
_READ_CHUNK = 256 * 1024
# What a *local* repository keeps beside the artifacts: bookkeeping a remote one never serves.
_LOCAL_ONLY_SUFFIXES = (".lastUpdated", ".part", ".lock")
_LOCAL_ONLY_NAMES = frozenset({"_remote.repositories", "resolver-status.properties"})
_CONTENT_TYPES = {
    "jar": "application/java-archive",
    "war": "application/java-archive",
    "ear": "application/java-archive",
    "pom": "text/xml",
    "xml": "text/xml",
    "module": "application/json",
    "json": "application/json",
    "asc": "text/plain",
    "txt": "text/plain",
}


# ------------------------------------------------------------------ coordinates


def artifact_path(
    group: str, artifact: str, version: str, ext: str = "jar", *, classifier: str | None = None
) -> str:
    """The repository-relative path of a file: ``org/x/lib/1.0/lib-1.0-sources.jar``."""
    suffix = f"-{classifier}" if classifier else ""
    return f"{group.replace('.', '/')}/{artifact}/{version}/{artifact}-{version}{suffix}.{ext}"


def metadata_path(group: str, artifact: str) -> str:
    """The repository-relative path of an artifact's ``maven-metadata.xml``."""
    return f"{group.replace('.', '/')}/{artifact}/{METADATA}"


def _local_only(name: str) -> bool:
    """Whether a file name is local-repository bookkeeping (never served)."""
    return (
        name in _LOCAL_ONLY_NAMES or name.endswith(_LOCAL_ONLY_SUFFIXES) or name.startswith("maven-metadata-")
    )


def _content_type(name: str) -> str:
    """A sensible Content-Type by extension (Central's own are not much more precise)."""
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if ext in CHECKSUMS:
        return "text/plain"
    return _CONTENT_TYPES.get(ext, "application/octet-stream")


# ------------------------------------------------------------- version ordering
#
# A port of Maven's org.apache.maven.artifact.versioning.ComparableVersion (3.8.x), so the fake's
# ``latest``/``release`` are what Maven itself would pick; independent of the proxy's own code,
# so it can serve as an oracle. Items are ("int", n), ("str", qualifier) or ("list", [items]).

_QUALIFIERS = ("alpha", "beta", "milestone", "rc", "snapshot", "", "sp")
_ALIASES = {"ga": "", "final": "", "release": "", "cr": "rc"}
_RELEASE_INDEX = str(_QUALIFIERS.index(""))

_Item: TypeAlias = tuple[str, object]


def _qualifier_key(value: str) -> str:
    """ComparableVersion's comparable qualifier: known ones by rank, unknown ones after all."""
    if value in _QUALIFIERS:
        return str(_QUALIFIERS.index(value))
    return f"{len(_QUALIFIERS)}-{value}"


def _string_item(value: str, followed_by_digit: bool) -> _Item:
    if followed_by_digit and len(value) == 1:
        value = {"a": "alpha", "b": "beta", "m": "milestone"}.get(value, value)
    return ("str", _ALIASES.get(value, value))


def _parse_item(is_digit: bool, text: str) -> _Item:
    return ("int", int(text)) if is_digit else _string_item(text, False)


def _is_null(item: _Item) -> bool:
    kind, value = item
    if kind == "int":
        return value == 0
    if kind == "str":
        return _qualifier_key(str(value)) == _RELEASE_INDEX
    assert isinstance(value, list)
    return not value


def _normalize(items: list[_Item]) -> None:
    """Drop trailing null items (0, "", empty lists) as ComparableVersion does."""
    for i in range(len(items) - 1, -1, -1):
        if _is_null(items[i]):
            del items[i]
        elif items[i][0] != "list":
            break


def _parse_version(version: str) -> list[_Item]:
    text = version.lower()
    root: list[_Item] = []
    current = root
    stack = [root]
    is_digit = False
    start = 0

    def push_list() -> None:
        nonlocal current
        new: list[_Item] = []
        current.append(("list", new))
        current = new
        stack.append(new)

    for i, c in enumerate(text):
        if c in ".-":
            current.append(("int", 0) if i == start else _parse_item(is_digit, text[start:i]))
            start = i + 1
            if c == "-":
                push_list()
        elif c.isdigit():
            if not is_digit and i > start:
                current.append(_string_item(text[start:i], True))
                start = i
                push_list()
            is_digit = True
        else:
            if is_digit and i > start:
                current.append(_parse_item(True, text[start:i]))
                start = i
                push_list()
            is_digit = False
    if len(text) > start:
        current.append(_parse_item(is_digit, text[start:]))
    while stack:
        _normalize(stack.pop())
    return root


def _compare(left: _Item | None, right: _Item | None) -> int:
    """``left.compareTo(right)`` of ComparableVersion's items (None: past the end of a list)."""
    if left is None:
        return 0 if right is None else -_compare(right, None)
    kind, value = left
    if kind == "int":
        assert isinstance(value, int)
        if right is None:
            return 0 if value == 0 else 1
        if right[0] == "int":
            other = right[1]
            assert isinstance(other, int)
            return (value > other) - (value < other)
        return 1  # a number is newer than a qualifier or a sublist
    if kind == "str":
        mine = _qualifier_key(str(value))
        if right is None:
            return (mine > _RELEASE_INDEX) - (mine < _RELEASE_INDEX)
        if right[0] == "str":
            theirs = _qualifier_key(str(right[1]))
            return (mine > theirs) - (mine < theirs)
        return -1  # a qualifier is older than a number or a sublist
    assert isinstance(value, list)
    if right is None:
        return _compare(value[0], None) if value else 0
    if right[0] == "int":
        return -1
    if right[0] == "str":
        return 1
    others = right[1]
    assert isinstance(others, list)
    for i in range(max(len(value), len(others))):
        result = _compare(value[i] if i < len(value) else None, others[i] if i < len(others) else None)
        if result:
            return result
    return 0


def compare_versions(a: str, b: str) -> int:
    """Maven's order of two version strings: negative, zero or positive, like ``compareTo``.

    ``1.9 < 1.10``, ``1-alpha < 1-beta < 1-rc < 1-SNAPSHOT < 1 = 1.0 = 1-ga < 1-sp``.
    """
    return _compare(("list", _parse_version(a)), ("list", _parse_version(b)))


def sort_versions(versions: Iterable[str]) -> list[str]:
    """Versions oldest first, in Maven's order (the order of ``<versions>`` in metadata)."""
    return sorted(versions, key=functools.cmp_to_key(compare_versions))


# ------------------------------------------------------------------- serving


class SeenRequest(NamedTuple):
    """One request as the fake saw it: method, repository-relative path (raw path if outside
    ``/maven2/``) and headers."""

    method: str
    path: str
    headers: dict[str, str]


@dataclass(frozen=True)
class _DiskFile:
    """A body the base streams from disk in chunks (the :class:`FileBody` protocol)."""

    path: Path
    size: int


@dataclass(frozen=True)
class _Source:
    """What one path serves: its body, when it last changed, and the digests of its true bytes."""

    body: bytes | _DiskFile
    mtime: float
    digests: Mapping[str, str]


def _digests(data: bytes) -> dict[str, str]:
    return {name: hashlib.new(name, data).hexdigest() for name in CHECKSUMS}


@dataclass
class _Override:
    """A file added by a test: bytes (digests computed on first request) or a file served in place."""

    data: bytes | Path
    added: float
    digests: dict[str, str] | None = None


@dataclass(frozen=True)
class _Inspected:
    size: int
    mtime_ns: int
    digests: Mapping[str, str]


def _inspect(path: Path, cached: _Inspected | None) -> _Inspected | None:
    """Stat ``path`` and hash it unless ``cached`` still matches; None if not a regular file.

    Blocking: run through :func:`asyncio.to_thread`.
    """
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    if cached is not None and (cached.size, cached.mtime_ns) == (st.st_size, st.st_mtime_ns):
        return cached
    hashes = {name: hashlib.new(name) for name in CHECKSUMS}
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            for h in hashes.values():
                h.update(chunk)
    return _Inspected(st.st_size, st.st_mtime_ns, {n: h.hexdigest() for n, h in hashes.items()})


def _scan_versions(artifact_dir: Path, artifact_rel: str, hidden: Collection[str]) -> dict[str, float]:
    """Version directories under ``artifact_dir`` holding a servable file, with their newest mtime.

    Blocking: run through :func:`asyncio.to_thread`.
    """
    versions: dict[str, float] = {}
    try:
        children = list(os.scandir(artifact_dir))
    except (FileNotFoundError, NotADirectoryError):
        return versions
    for child in children:
        if not child.is_dir():
            continue
        newest = None
        with os.scandir(child.path) as files:
            for f in files:
                rel = f"{artifact_rel}/{child.name}/{f.name}"
                if f.is_file() and not _local_only(f.name) and rel not in hidden:
                    mtime = f.stat().st_mtime
                    newest = mtime if newest is None else max(newest, mtime)
        if newest is not None:
            versions[child.name] = newest
    return versions


def _etag_matches(if_none_match: str, etag: str) -> bool:
    return any(
        c.strip() in {"*", etag} or c.strip().removeprefix("W/") == etag for c in if_none_match.split(",")
    )


def _http_date(ts: float) -> str:
    return email.utils.formatdate(ts, usegmt=True)


def _not_found() -> Reply:
    return Reply(404, {"Content-Type": "text/plain; charset=utf-8"}, b"Not Found\n")


def build_jar(entries: Mapping[str, bytes]) -> bytes:
    """A jar (zip with a manifest) holding ``entries``, built in memory: no file I/O."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\r\nCreated-By: FakeMavenRepo\r\n\r\n")
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


class FakeMavenRepo(FakeServer):
    """An in-process fake Maven Central serving ``root`` (by default ``~/.m2/repository``).

    Use as ``async with FakeMavenRepo() as central:``, point a mirror or the proxy at
    :attr:`url`, inspect :attr:`hits`/:attr:`requests`, set :attr:`faults` by relative path.
    ``allow`` restricts what is served to those ``"groupId:artifactId"`` pairs (None: all of
    ``root``); overrides added with :meth:`add_file` are always served.
    """

    def __init__(
        self,
        root: Path | None = None,
        allow: Iterable[str] | None = None,
        *,
        host: str = "127.0.0.1",
        prefix: str = "/maven2/",
    ) -> None:
        super().__init__(host)
        # Looked up now, not at import: a test may point HOME elsewhere.
        self.root = Path(root) if root is not None else Path.home() / ".m2" / "repository"
        self.allow: frozenset[str] | None = frozenset(allow) if allow is not None else None
        self.prefix = "/" + prefix.strip("/") + "/" if prefix.strip("/") else "/"
        self.hits: collections.Counter[str] = collections.Counter()
        self.requests: list[SeenRequest] = []
        self.misses: collections.Counter[str] = collections.Counter()  # paths answered 404
        self.faults: dict[str, Fault] = {}
        self._overrides: dict[str, _Override] = {}
        self._removed: set[str] = set()
        self._corrupted: set[str] = set()
        self._no_checksums: dict[str, set[str]] = {}
        self._cache: dict[Path, _Inspected] = {}

    @property
    def url(self) -> str:
        """The repository root with a trailing slash: ``http://127.0.0.1:PORT/maven2/``."""
        return f"{self.origin}{self.prefix}"

    def file_url(self, path: str) -> str:
        """The absolute URL of a repository-relative path."""
        return self.url + path.lstrip("/")

    # --------------------------------------------------------------------- hooks

    def add_file(self, path: str, data: bytes | Path) -> None:
        """Serve ``data`` (bytes, or a file served in place) at ``path``, hiding what ``root`` has.

        Does no I/O (a Path is only read when requested), so it is safe on the event loop. The
        file's checksums and the artifact's metadata follow; a new version directory appears in
        ``maven-metadata.xml``.
        """
        path = path.lstrip("/")
        self._overrides[path] = _Override(data, time.time())
        self._removed.discard(path)

    def remove_file(self, path: str) -> None:
        """Make ``path`` (and its checksums) 404, and drop it from the metadata's view."""
        path = path.lstrip("/")
        self._overrides.pop(path, None)
        self._removed.add(path)

    def corrupt(self, path: str, *, on: bool = True) -> None:
        """Send different bytes (same length, one byte flipped) for ``path``, while its checksum
        files and ETag still state the real digests: a proxy that verifies must refuse it.

        An empty file cannot be corrupted this way.
        """
        path = path.lstrip("/")
        if on:
            self._corrupted.add(path)
        else:
            self._corrupted.discard(path)

    def remove_checksums(self, path: str, algorithms: Iterable[str] = CHECKSUMS) -> None:
        """Make the checksum files of ``path`` 404 (all, or only the given ``algorithms``)."""
        algos = set(algorithms)
        if unknown := algos - set(CHECKSUMS):
            raise ValueError(f"unknown checksum algorithms: {sorted(unknown)}")
        self._no_checksums.setdefault(path.lstrip("/"), set()).update(algos)

    def restore_checksums(self, path: str) -> None:
        """Undo :meth:`remove_checksums` for ``path``."""
        self._no_checksums.pop(path.lstrip("/"), None)

    def add_version(
        self,
        group: str,
        artifact: str,
        version: str,
        *,
        packaging: str = "jar",
        dependencies: Sequence[Dependency] = (),
        jar: bytes | None = None,
    ) -> dict[str, str]:
        """Publish ``group:artifact:version``: a pom and (for jar packaging) a jar, in memory.

        The jar defaults to one holding a manifest and ``<artifact>.properties`` naming the
        coordinates, enough for a dependency to resolve and sit on a classpath. Returns
        ``{"pom": path, "jar": path}`` of what was added (repository-relative).
        """
        pom = artifact_path(group, artifact, version, "pom")
        added = {"pom": pom}
        self.add_file(pom, pom_xml(group, artifact, version, packaging=packaging, dependencies=dependencies))
        if packaging == "jar":
            if jar is None:
                props = f"groupId={group}\nartifactId={artifact}\nversion={version}\n".encode()
                jar = build_jar({f"{artifact}.properties": props})
            added["jar"] = artifact_path(group, artifact, version, "jar")
            self.add_file(added["jar"], jar)
        return added

    def versions(self, group: str, artifact: str) -> list[str]:
        """Versions the metadata of ``group:artifact`` lists, oldest first.

        Blocking (scans ``root``): call from sync code or through :func:`asyncio.to_thread`.
        """
        rel = f"{group.replace('.', '/')}/{artifact}"
        return sort_versions(self._versions(rel, _scan_versions(self.root / rel, rel, set(self._removed))))

    # ------------------------------------------------------------------ lookups

    def _allowed(self, parts: Sequence[str], *, is_metadata: bool) -> bool:
        """Whether the allow-list covers a path of ``group.../artifact[/version]/file``."""
        if self.allow is None:
            return True
        tail = 2 if is_metadata else 3
        if len(parts) < tail + 1:
            return False
        coord = f"{'.'.join(parts[:-tail])}:{parts[-tail]}"
        return coord in self.allow

    async def _file(self, rel: str) -> _Source | None:
        """A real file: an override, or one under ``root``; digests cached per file."""
        if rel in self._removed:
            return None
        override = self._overrides.get(rel)
        if override is not None:
            if isinstance(override.data, bytes):
                if override.digests is None:
                    override.digests = _digests(override.data)
                return _Source(override.data, override.added, override.digests)
            disk = override.data
        else:
            parts = rel.split("/")
            if parts[-1] == METADATA or _local_only(parts[-1]):
                return None
            if not self._allowed(parts, is_metadata=False):
                return None
            disk = self.root.joinpath(*parts)
        info = await asyncio.to_thread(_inspect, disk, self._cache.get(disk))
        if info is None:
            self._cache.pop(disk, None)
            return None
        self._cache[disk] = info
        return _Source(_DiskFile(disk, info.size), info.mtime_ns / 1e9, info.digests)

    def _versions(self, artifact_rel: str, on_disk: Mapping[str, float]) -> dict[str, float]:
        """Disk versions plus those of overrides (an override's time counts as its mtime)."""
        versions = dict(on_disk)
        for path, override in list(self._overrides.items()):
            added = override.added
            head, _, name = path.rpartition("/")
            base, _, version = head.rpartition("/")
            if base == artifact_rel and name and version and not name.startswith("maven-metadata"):
                versions[version] = max(versions.get(version, added), added)
        return versions

    async def _metadata(self, rel: str) -> _Source | None:
        """The artifact-level ``maven-metadata.xml`` generated from the versions present."""
        override = await self._file(rel) if rel in self._overrides else None
        if override is not None or rel in self._removed:
            return override
        parts = rel.split("/")
        if len(parts) < 3 or not self._allowed(parts, is_metadata=True):
            return None
        artifact_rel = "/".join(parts[:-1])
        hidden = {p for p in self._removed if p.startswith(artifact_rel + "/")}
        on_disk = await asyncio.to_thread(
            _scan_versions, self.root.joinpath(*parts[:-1]), artifact_rel, hidden
        )
        versions = self._versions(artifact_rel, on_disk)
        if not versions:
            return None  # a group directory (plugin-prefix metadata) or nothing at all
        body = self.render_metadata(".".join(parts[:-2]), parts[-2], versions)
        return _Source(body, max(versions.values()), _digests(body))

    @staticmethod
    def render_metadata(group: str, artifact: str, versions: Mapping[str, float]) -> bytes:
        """``maven-metadata.xml`` for these versions (name → mtime), as Central writes it."""
        ordered = sort_versions(versions)
        releases = [v for v in ordered if not v.endswith("-SNAPSHOT")]
        updated = datetime.fromtimestamp(max(versions.values()), UTC).strftime("%Y%m%d%H%M%S")
        lines = [
            '<?xml version="1.0" encoding="UTF-8"?>',
            "<metadata>",
            f"  <groupId>{escape(group)}</groupId>",
            f"  <artifactId>{escape(artifact)}</artifactId>",
            "  <versioning>",
            f"    <latest>{escape(ordered[-1])}</latest>",
        ]
        if releases:
            lines.append(f"    <release>{escape(releases[-1])}</release>")
        lines.append("    <versions>")
        lines += [f"      <version>{escape(v)}</version>" for v in ordered]
        lines += [
            "    </versions>",
            f"    <lastUpdated>{updated}</lastUpdated>",
            "  </versioning>",
            "</metadata>",
        ]
        return ("\n".join(lines) + "\n").encode()

    async def _resolve(self, rel: str) -> _Source | None:
        """What ``rel`` serves: an override, a checksum of another path, metadata, or a file."""
        if rel in self._overrides:
            return await self._file(rel)
        base, _, ext = rel.rpartition(".")
        if ext in CHECKSUMS and base:
            if ext in self._no_checksums.get(base, ()) or base.rpartition(".")[2] in CHECKSUMS:
                return None
            target = await (self._metadata(base) if base.endswith("/" + METADATA) else self._file(base))
            if target is None:
                return None
            text = target.digests[ext].encode()
            return _Source(text, target.mtime, _digests(text))
        if rel.endswith("/" + METADATA):
            return await self._metadata(rel)
        return await self._file(rel)

    # ------------------------------------------------------------------- routing

    async def _route(self, request: web.Request, rel: str) -> Reply:
        if request.method not in ("GET", "HEAD"):
            return Reply(405, {"Allow": "GET, HEAD", "Content-Type": "text/plain"}, b"Method Not Allowed\n")
        parts = rel.split("/")
        if not rel or any(p in ("", ".", "..") for p in parts):
            return _not_found()  # directories, empty segments, traversal
        source = await self._resolve(rel)
        if source is None:
            return _not_found()
        etag = f'"{source.digests["sha1"]}"'
        headers = {"ETag": etag, "Last-Modified": _http_date(source.mtime)}
        inm = request.headers.get("If-None-Match")
        ims = request.if_modified_since
        if (inm is not None and _etag_matches(inm, etag)) or (
            inm is None and ims is not None and int(source.mtime) <= ims.timestamp()
        ):
            return Reply(304, headers)
        headers["Content-Type"] = _content_type(parts[-1])
        return Reply(200, headers, source.body)

    async def _entry(self, request: web.Request) -> web.StreamResponse:
        raw = request.rel_url.path
        rel = raw[len(self.prefix) :] if raw.startswith(self.prefix) else None
        key = rel if rel is not None else raw
        self.hits[key] += 1
        self.requests.append(SeenRequest(request.method, key, dict(request.headers)))
        fault = self._take_fault(key)
        if fault is not None:
            if fault.kind == "refuse":
                if request.transport is not None:
                    request.transport.abort()
                return web.Response(status=500)
            if fault.kind == "status":
                return web.Response(status=fault.status, text=f"fake upstream error {fault.status}\n")
            if fault.kind == "429":
                return web.Response(
                    status=429, text="too many requests\n", headers={"Retry-After": str(fault.retry_after)}
                )
            if fault.kind == "stall" and await self._sleep(fault.delay) and request.transport is not None:
                request.transport.abort()
                return web.Response(status=500)
        reply = await self._route(request, rel) if rel is not None else _not_found()
        if reply.status == 404:
            self.misses[key] += 1
        body_fault = fault if fault is not None and fault.kind in BODY_FAULTS else None
        if body_fault is None and rel in self._corrupted:
            body_fault = Fault("wrong_bytes")
        return await self._send(request, reply, body_fault, read_chunk=_READ_CHUNK)
