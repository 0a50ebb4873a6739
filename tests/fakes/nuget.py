"""A fake nuget.org v3 feed speaking the real protocol, and real ``.nupkg`` files built in Python.

:class:`FakeNuGetFeed` serves what NuGet clients read from nuget.org, laid out the same way:

* the service index ``/v3/index.json``, every resource pointing back at the fake;
* the flat container (``PackageBaseAddress/3.0.0``): ``/v3-flatcontainer/{id}/index.json``,
  ``/{id}/{ver}/{id}.{ver}.nupkg`` and ``/{id}/{ver}/{id}.nuspec``, lower-case only, as the
  blob store behind nuget.org is case-sensitive;
* three registration hives, as nuget.org has: ``registration5-semver1`` (plain JSON, no SemVer 2.0.0
  versions), ``registration5-gz-semver1`` and ``registration5-gz-semver2`` (always
  ``Content-Encoding: gzip``, whatever the client accepts). A registration index inlines its pages
  while a package has at most ``inline_threshold`` versions (nuget.org: 128) and links them
  otherwise, so clients must fetch ``/page/{lower}/{upper}.json``; leaves are served too;
* catalog leaves (``/v3/catalog0/data/...``) carrying ``packageHash`` (SHA-512, base64),
  ``packageHashAlgorithm`` and ``packageSize``, which nuget.org gives only there (pass
  ``hash_in_registration=True`` to also put them in the registration's ``catalogEntry``, as some
  other servers do);
* search (``/query``) and autocomplete (``/autocomplete``);
* the gallery's push API (``PackagePublish/2.0.0``): ``PUT /api/v2/package`` (multipart),
  ``DELETE /api/v2/package/{id}/{ver}`` (unlists, as nuget.org does, unless
  ``delete_unlists=False``) and ``POST`` to the same path (relists).

Like the other fakes it misbehaves on demand (:class:`tests.fakes.server.Fault`, keyed by raw
request path or ``"*"``), counts :attr:`FakeNuGetFeed.hits` per raw path, keeps every request in
:attr:`FakeNuGetFeed.requests` and every push in :attr:`FakeNuGetFeed.pushes`, and answers
``If-None-Match`` with 304. Everything runs in-process on 127.0.0.1; all state lives on the
instance.

:func:`build_nupkg` writes a real package (OPC parts and all) that NuGet.exe installs and pushes;
it is blocking: call it from sync fixtures or through :func:`asyncio.to_thread`.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import gzip
import hashlib
import io
import json
import re
import uuid
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote
from xml.etree import ElementTree
from xml.sax.saxutils import escape, quoteattr

from aiohttp import BodyPartReader, web

from tests.fakes.server import BODY_FAULTS, FakeServer, Fault, FaultKind, Reply

__all__ = [
    "FLAT_CONTAINER",
    "HIVES",
    "SEMVER2_HIVE",
    "DependencyGroup",
    "FakeNuGetFeed",
    "Fault",
    "FaultKind",
    "NuGetPackage",
    "NuspecInfo",
    "PartInfo",
    "PushRecord",
    "SeenRequest",
    "build_nupkg",
    "is_prerelease",
    "is_semver2",
    "lower_id",
    "normalize_range",
    "normalize_version",
    "nupkg_filename",
    "read_nuspec",
    "version_key",
]

FLAT_CONTAINER: Final = "v3-flatcontainer"
SEMVER2_HIVE: Final = "registration5-gz-semver2"


@dataclass(frozen=True)
class _Hive:
    """One registration hive: whether it is gzipped and whether it lists SemVer 2.0.0 versions."""

    gzip: bool
    semver2: bool


HIVES: Final[dict[str, _Hive]] = {
    "registration5-semver1": _Hive(gzip=False, semver2=False),
    "registration5-gz-semver1": _Hive(gzip=True, semver2=False),
    SEMVER2_HIVE: _Hive(gzip=True, semver2=True),
}

# The time nuget.org writes as ``published`` for an unlisted version.
UNLISTED_PUBLISHED: Final = "1900-01-01T00:00:00+00:00"

# --------------------------------------------------------------------------- versions and ids

_VERSION_RE = re.compile(
    r"\s*(\d+)(?:\.(\d+))?(?:\.(\d+))?(?:\.(\d+))?(?:-([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?"
    r"(?:\+([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?\s*"
)


def _parse(version: str) -> tuple[tuple[int, int, int, int], str, str]:
    m = _VERSION_RE.fullmatch(version)
    if m is None:
        raise ValueError(f"not a NuGet version: {version!r}")
    nums = tuple(int(g) if g else 0 for g in m.group(1, 2, 3, 4))
    return (nums[0], nums[1], nums[2], nums[3]), m.group(5) or "", m.group(6) or ""


def normalize_version(version: str) -> str:
    """NuGet's normalised form, the one used in URLs and documents (before lower-casing).

    Leading zeros go (``01.2`` -> ``1.2.0``), a missing minor or patch becomes 0, a fourth part
    is kept only when it is not 0 (``1.2.3.0`` -> ``1.2.3``), build metadata is dropped
    (``1.0.0+abc`` -> ``1.0.0``); the pre-release label keeps its case.
    """
    (major, minor, patch, revision), pre, _ = _parse(version)
    core = f"{major}.{minor}.{patch}" + (f".{revision}" if revision else "")
    return core + (f"-{pre}" if pre else "")


def lower_id(package_id: str) -> str:
    """A package id as the flat container and registration URLs spell it: lower case."""
    return package_id.lower()


def nupkg_filename(package_id: str, version: str) -> str:
    """The flat container's file name: ``newtonsoft.json.13.0.1.nupkg``."""
    return f"{lower_id(package_id)}.{normalize_version(version).lower()}.nupkg"


def is_semver2(version: str) -> bool:
    """Whether only SemVer 2.0.0-aware clients may see it: dotted pre-release or build metadata."""
    _, pre, meta = _parse(version)
    return "." in pre or bool(meta)


def is_prerelease(version: str) -> bool:
    """Whether the version has a pre-release label."""
    return bool(_parse(version)[1])


def version_key(version: str) -> tuple[Any, ...]:
    """NuGet's ordering: numeric parts, a release after its pre-releases, then the labels part
    by part (numbers before words, numbers numerically, words case-insensitively)."""
    nums, pre, _ = _parse(version)
    if not pre:
        return (nums, 1, ())
    labels = tuple((0, int(p), "") if p.isdigit() else (1, 0, p.lower()) for p in pre.split("."))
    return (nums, 0, labels)


def normalize_range(spec: str) -> str:
    """A dependency's version range as nuget.org's registration writes it.

    ``1.0`` (a bare minimum) -> ``[1.0.0, )``; ``[1.0,2.0)`` -> ``[1.0.0, 2.0.0)``; an empty
    range means any version: ``(, )``.
    """
    spec = spec.strip()
    if not spec:
        return "(, )"
    if spec[0] not in "[(":
        return f"[{normalize_version(spec)}, )"
    low, _, high = spec[1:-1].partition(",")
    if not _:
        return f"[{normalize_version(low)}]"
    low_n = normalize_version(low) if low.strip() else ""
    high_n = normalize_version(high) if high.strip() else ""
    return f"{spec[0]}{low_n}, {high_n}{spec[-1]}"


# --------------------------------------------------------------------------- packages


@dataclass(frozen=True)
class DependencyGroup:
    """The dependencies of one target framework (``""``: a group without one)."""

    target_framework: str
    dependencies: tuple[tuple[str, str], ...]  # (id, version range as written in the nuspec)


@dataclass(frozen=True)
class NuspecInfo:
    """What the fake needs from a package's manifest."""

    id: str
    version: str  # as written in the nuspec (verbatim)
    description: str
    authors: str
    dependency_groups: tuple[DependencyGroup, ...]
    nuspec: bytes


_TFM_FOLDER = {".NETStandard2.0": "netstandard2.0"}


def _nuspec_xml(
    package_id: str,
    version: str,
    description: str,
    authors: str,
    dependencies: Sequence[tuple[str, str]],
    target_framework: str,
) -> str:
    deps = "".join(
        f'<dependency id={quoteattr(dep)} version={quoteattr(rng)} exclude="Build,Analyzers" />'
        for dep, rng in dependencies
    )
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<package xmlns="http://schemas.microsoft.com/packaging/2013/05/nuspec.xsd">\n'
        "  <metadata>\n"
        f"    <id>{escape(package_id)}</id>\n"
        f"    <version>{escape(version)}</version>\n"
        f"    <authors>{escape(authors)}</authors>\n"
        f"    <description>{escape(description)}</description>\n"
        f"    <dependencies><group targetFramework={quoteattr(target_framework)}>{deps}</group>"
        "</dependencies>\n"
        "  </metadata>\n"
        "</package>\n"
    )


def build_nupkg(
    dest: Path,
    package_id: str,
    version: str,
    dependencies: Sequence[tuple[str, str]] = (),
    *,
    description: str | None = None,
    authors: str = "proxy-tests",
    payload_size: int = 0,
) -> Path:
    """Write a real ``{id}.{normalized version}.nupkg`` into ``dest`` and return its path.

    ``dependencies`` are ``(id, range)`` pairs for ``.NETStandard2.0`` (``("B", "1.0.0")`` means
    B 1.0.0 or later). The zip holds what ``nuget pack`` writes: the nuspec, ``[Content_Types].xml``,
    ``_rels/.rels``, the core-properties part and ``lib/netstandard2.0/_._``; ``payload_size``
    adds ``lib/netstandard2.0/payload.bin`` of that many pseudo-random bytes (stored, not
    deflated) for big-download tests. Timestamps and contents are fixed, so the same arguments
    always give the same bytes (and SHA-512). Blocking I/O.
    """
    dest.mkdir(parents=True, exist_ok=True)
    norm = normalize_version(version)
    desc = description if description is not None else f"{package_id} for the proxy tests"
    tfm = ".NETStandard2.0"
    folder = _TFM_FOLDER[tfm]
    nuspec = _nuspec_xml(package_id, version, desc, authors, dependencies, tfm)
    psmdcp = hashlib.md5(f"{package_id}/{norm}".encode(), usedforsecurity=False).hexdigest()
    content_types = (
        '<?xml version="1.0" encoding="utf-8"?>'
        '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
        '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml" />'
        '<Default Extension="nuspec" ContentType="application/octet" />'
        '<Default Extension="_" ContentType="application/octet" />'
        '<Default Extension="bin" ContentType="application/octet" />'
        '<Default Extension="psmdcp" '
        'ContentType="application/vnd.openxmlformats-package.core-properties+xml" />'
        "</Types>"
    )
    rels = (
        '<?xml version="1.0" encoding="utf-8"?>'
        '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
        f'<Relationship Type="http://schemas.microsoft.com/packaging/2010/07/manifest" '
        f'Target="/{escape(package_id)}.nuspec" Id="R1" />'
        '<Relationship Type="http://schemas.openxmlformats.org/package/2006/relationships/metadata/'
        f'core-properties" Target="/package/services/metadata/core-properties/{psmdcp}.psmdcp" Id="R2" />'
        "</Relationships>"
    )
    core = (
        '<?xml version="1.0" encoding="utf-8"?>'
        '<coreProperties xmlns:dc="http://purl.org/dc/elements/1.1/" '
        'xmlns:dcterms="http://purl.org/dc/terms/" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
        'xmlns="http://schemas.openxmlformats.org/package/2006/metadata/core-properties">'
        f"<dc:creator>{escape(authors)}</dc:creator>"
        f"<dc:description>{escape(desc)}</dc:description>"
        f"<dc:identifier>{escape(package_id)}</dc:identifier>"
        f"<version>{escape(version)}</version>"
        "<keywords></keywords>"
        "<lastModifiedBy>artifact-proxy tests</lastModifiedBy>"
        "</coreProperties>"
    )
    path = dest / f"{package_id}.{norm}.nupkg"
    stamp = (2000, 1, 1, 0, 0, 0)  # NuGet rejects zip entries dated before 1980

    def entry(name: str, data: bytes, method: int = zipfile.ZIP_DEFLATED) -> None:
        info = zipfile.ZipInfo(name, stamp)
        info.compress_type = method
        info.external_attr = 0o644 << 16
        zf.writestr(info, data)

    with zipfile.ZipFile(path, "w") as zf:
        entry("_rels/.rels", rels.encode())
        entry(f"{package_id}.nuspec", nuspec.encode())
        entry(f"lib/{folder}/_._", b"")
        if payload_size:
            entry(f"lib/{folder}/payload.bin", _payload(payload_size, norm), zipfile.ZIP_STORED)
        entry(f"package/services/metadata/core-properties/{psmdcp}.psmdcp", core.encode())
        entry("[Content_Types].xml", content_types.encode())
    return path


def _payload(size: int, seed: str) -> bytes:
    """Deterministic incompressible bytes (SHA-512 in counter mode)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha512(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def read_nuspec(data: bytes) -> NuspecInfo:
    """Id, version, description, authors and dependency groups of a ``.nupkg`` held in memory.

    Any nuspec namespace is accepted (there are several); dependencies outside a ``<group>`` form
    a group with target framework ``""``, as NuGet reads legacy manifests.
    """
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = [n for n in zf.namelist() if "/" not in n and n.lower().endswith(".nuspec")]
        if len(names) != 1:
            raise ValueError(f"expected one .nuspec at the root of the package, found {names}")
        raw = zf.read(names[0])
    root = ElementTree.fromstring(raw)
    metadata = next((el for el in root if _local(el.tag) == "metadata"), None)
    if metadata is None:
        raise ValueError("nuspec without <metadata>")
    fields = {_local(el.tag): (el.text or "").strip() for el in metadata}
    groups: list[DependencyGroup] = []
    for deps in (el for el in metadata if _local(el.tag) == "dependencies"):
        loose: list[tuple[str, str]] = []
        for child in deps:
            if _local(child.tag) == "group":
                pairs = tuple(
                    (d.get("id", ""), d.get("version", "")) for d in child if _local(d.tag) == "dependency"
                )
                groups.append(DependencyGroup(child.get("targetFramework", ""), pairs))
            elif _local(child.tag) == "dependency":
                loose.append((child.get("id", ""), child.get("version", "")))
        if loose:
            groups.append(DependencyGroup("", tuple(loose)))
    if not fields.get("id") or not fields.get("version"):
        raise ValueError("nuspec without id or version")
    return NuspecInfo(
        id=fields["id"],
        version=fields["version"],
        description=fields.get("description", ""),
        authors=fields.get("authors", ""),
        dependency_groups=tuple(groups),
        nuspec=raw,
    )


@dataclass(frozen=True)
class _DiskBlob:
    """A package served from a file (the :class:`tests.fakes.server.FileBody` protocol)."""

    path: Path
    size: int


@dataclass
class NuGetPackage:
    """One version of a package as the feed holds it."""

    id: str  # as published, original case
    version: str  # normalised, original case
    verbatim_version: str  # as written in the nuspec
    description: str
    authors: str
    dependency_groups: tuple[DependencyGroup, ...]
    nuspec: bytes
    body: bytes | _DiskBlob
    size: int
    sha512: str  # base64, as packageHash
    published: str
    listed: bool = True
    commit_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    commit_time: str = ""

    @property
    def lower_id(self) -> str:
        return lower_id(self.id)

    @property
    def lower_version(self) -> str:
        return self.version.lower()

    @property
    def filename(self) -> str:
        """The flat container's name for it: ``{id}.{version}.nupkg``, lower case."""
        return f"{self.lower_id}.{self.lower_version}.nupkg"


@dataclass(frozen=True)
class SeenRequest:
    """One request the feed received, for tests that assert on what a client sent."""

    method: str
    path: str  # raw path, without the query
    query: str
    headers: dict[str, str]


PartInfo = tuple[str | None, str | None, str | None, int]  # (name, filename, content type, size)


@dataclass(frozen=True)
class PushRecord:
    """What a ``PUT /api/v2/package`` carried: headers, multipart parts and the outcome."""

    headers: dict[str, str]
    parts: tuple[PartInfo, ...]
    status: int
    package: tuple[str, str] | None  # (id, normalised version) when accepted


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _digest(data: bytes) -> str:
    return base64.b64encode(hashlib.sha512(data).digest()).decode()


def _inspect_file(path: Path) -> tuple[bytes, NuspecInfo]:
    """Read a package file and its manifest; blocking I/O."""
    data = path.read_bytes()
    return data, read_nuspec(data)


def _etag_matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    return any(c.strip() == "*" or c.strip().removeprefix("W/") == etag for c in if_none_match.split(","))


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


_REGISTRATION_CONTEXT: Final = {
    "@vocab": "http://schema.nuget.org/schema#",
    "catalog": "http://schema.nuget.org/catalog#",
    "xsd": "http://www.w3.org/2001/XMLSchema#",
    "items": {"@id": "catalog:item", "@container": "@set"},
    "commitTimeStamp": {"@id": "catalog:commitTimeStamp", "@type": "xsd:dateTime"},
    "commitId": {"@id": "catalog:commitId"},
    "count": {"@id": "catalog:count"},
    "parent": {"@id": "catalog:parent", "@type": "@id"},
    "tags": {"@id": "tag", "@container": "@set"},
    "dependencyGroups": {"@id": "dependencyGroup", "@container": "@set"},
    "dependencies": {"@id": "dependency", "@container": "@set"},
}

_BLOB_NOT_FOUND: Final = (
    b'\xef\xbb\xbf<?xml version="1.0" encoding="utf-8"?><Error><Code>BlobNotFound</Code>'
    b"<Message>The specified blob does not exist.</Message></Error>"
)

_ID = r"[^/]+"


class FakeNuGetFeed(FakeServer):
    """An in-process fake nuget.org v3 feed with push, fault injection and request recording.

    Use as ``async with FakeNuGetFeed() as feed:``, publish with :meth:`add_package` (or
    :meth:`add_package_async` on the event loop; the id, version and dependencies come from the
    package's own nuspec), point clients at :attr:`url` (the service index), inspect
    :attr:`hits`, :attr:`requests`, :attr:`pushes`, and set :attr:`faults` by raw path.

    ``inline_threshold`` is the most versions a registration index inlines (nuget.org: 128);
    beyond it the index only links its pages of ``page_size`` versions (nuget.org: 64), so set it
    low to make a test exercise linked pages. ``api_key`` None accepts any non-empty key for push,
    delete and relist; otherwise only that key.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        inline_threshold: int = 128,
        page_size: int = 64,
        api_key: str | None = None,
        delete_unlists: bool = True,
        hash_in_registration: bool = False,
    ) -> None:
        super().__init__(host)
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        self.inline_threshold = inline_threshold
        self.page_size = page_size
        self.api_key = api_key
        self.delete_unlists = delete_unlists
        self.hash_in_registration = hash_in_registration
        self.hits: collections.Counter[str] = collections.Counter()
        self.faults: dict[str, Fault] = {}
        self.requests: list[SeenRequest] = []
        self.pushes: list[PushRecord] = []
        self._packages: dict[str, dict[str, NuGetPackage]] = {}  # lower id -> lower version -> pkg

    # ------------------------------------------------------------------ addresses

    @property
    def url(self) -> str:
        """The service index, the one URL a NuGet client is configured with."""
        return f"{self.origin}/v3/index.json"

    @property
    def flat_container(self) -> str:
        """``PackageBaseAddress/3.0.0``, with its trailing slash."""
        return f"{self.origin}/{FLAT_CONTAINER}/"

    def registration_base(self, hive: str = SEMVER2_HIVE) -> str:
        """A hive's ``RegistrationsBaseUrl``, with its trailing slash."""
        return f"{self.origin}/v3/{hive}/"

    @property
    def publish_url(self) -> str:
        """``PackagePublish/2.0.0``: where ``nuget push`` PUTs and ``nuget delete`` DELETEs."""
        return f"{self.origin}/api/v2/package"

    def nupkg_path(self, package_id: str, version: str) -> str:
        """The raw request path of a package download (the key of its hits and faults)."""
        lid, lver = lower_id(package_id), normalize_version(version).lower()
        return f"/{FLAT_CONTAINER}/{lid}/{lver}/{lid}.{lver}.nupkg"

    def nuspec_path(self, package_id: str, version: str) -> str:
        lid, lver = lower_id(package_id), normalize_version(version).lower()
        return f"/{FLAT_CONTAINER}/{lid}/{lver}/{lid}.nuspec"

    def versions_path(self, package_id: str) -> str:
        return f"/{FLAT_CONTAINER}/{lower_id(package_id)}/index.json"

    def registration_path(self, package_id: str, hive: str = SEMVER2_HIVE) -> str:
        return f"/v3/{hive}/{lower_id(package_id)}/index.json"

    # ---------------------------------------------------------------------- state

    def add_package(self, path: Path, *, listed: bool = True, published: str | None = None) -> NuGetPackage:
        """Publish the ``.nupkg`` at ``path`` (served from that file). Reads and hashes it:
        blocking I/O (see :meth:`add_package_async`). Re-adding a version replaces it."""
        data, info = _inspect_file(path)
        return self._register(info, data, _DiskBlob(path, len(data)), listed, published)

    async def add_package_async(
        self, path: Path, *, listed: bool = True, published: str | None = None
    ) -> NuGetPackage:
        """:meth:`add_package` with the reading done off the event loop thread."""
        data, info = await asyncio.to_thread(_inspect_file, path)
        return self._register(info, data, _DiskBlob(path, len(data)), listed, published)

    def add_package_bytes(
        self, data: bytes, *, listed: bool = True, published: str | None = None
    ) -> NuGetPackage:
        """Publish a package held in memory (what a push does)."""
        return self._register(read_nuspec(data), data, data, listed, published)

    def _register(
        self,
        info: NuspecInfo,
        data: bytes,
        body: bytes | _DiskBlob,
        listed: bool,
        published: str | None,
    ) -> NuGetPackage:
        now = _now_iso()
        pkg = NuGetPackage(
            id=info.id,
            version=normalize_version(info.version),
            verbatim_version=info.version,
            description=info.description,
            authors=info.authors,
            dependency_groups=info.dependency_groups,
            nuspec=info.nuspec,
            body=body,
            size=len(data),
            sha512=_digest(data),
            published=published or now,
            listed=listed,
            commit_time=now,
        )
        self._packages.setdefault(pkg.lower_id, {})[pkg.lower_version] = pkg
        return pkg

    def get(self, package_id: str, version: str) -> NuGetPackage | None:
        """The package version, if the feed has it (listed or not)."""
        return self._packages.get(lower_id(package_id), {}).get(normalize_version(version).lower())

    def packages(self, package_id: str) -> list[NuGetPackage]:
        """All versions of a package, in NuGet version order."""
        found = self._packages.get(lower_id(package_id), {}).values()
        return sorted(found, key=lambda p: version_key(p.version))

    def set_listed(self, package_id: str, version: str, listed: bool) -> None:
        pkg = self.get(package_id, version)
        if pkg is None:
            raise KeyError(f"{package_id} {version}")
        pkg.listed = listed
        pkg.commit_id, pkg.commit_time = str(uuid.uuid4()), _now_iso()

    def remove_package(self, package_id: str, version: str | None = None) -> None:
        """Forget one version, or the whole package; its documents then 404."""
        lid = lower_id(package_id)
        if version is None:
            self._packages.pop(lid, None)
            return
        versions = self._packages.get(lid, {})
        versions.pop(normalize_version(version).lower(), None)
        if not versions:
            self._packages.pop(lid, None)

    # ------------------------------------------------------------------ documents

    def service_index(self) -> dict[str, Any]:
        """The service index, with the resource types and versions nuget.org lists."""
        o = self.origin
        resources: list[dict[str, Any]] = []

        def add(at_id: str, *types: str, **extra: str) -> None:
            for t in types:
                resources.append({"@id": at_id, "@type": t, **extra})

        search, complete = f"{o}/query", f"{o}/autocomplete"
        add(search, "SearchQueryService", "SearchQueryService/3.0.0-beta", "SearchQueryService/3.0.0-rc")
        add(search, "SearchQueryService/3.5.0")
        add(complete, "SearchAutocompleteService", "SearchAutocompleteService/3.0.0-beta")
        add(complete, "SearchAutocompleteService/3.0.0-rc", "SearchAutocompleteService/3.5.0")
        semver1 = self.registration_base("registration5-semver1")
        add(
            semver1,
            "RegistrationsBaseUrl",
            "RegistrationsBaseUrl/3.0.0-beta",
            "RegistrationsBaseUrl/3.0.0-rc",
        )
        add(self.registration_base("registration5-gz-semver1"), "RegistrationsBaseUrl/3.4.0")
        semver2 = self.registration_base(SEMVER2_HIVE)
        add(semver2, "RegistrationsBaseUrl/3.6.0")
        add(semver2, "RegistrationsBaseUrl/Versioned", clientVersion="4.3.0-alpha")
        add(self.flat_container, "PackageBaseAddress/3.0.0")
        add(self.publish_url, "PackagePublish/2.0.0")
        return {
            "version": "3.0.0",
            "resources": resources,
            "@context": {
                "@vocab": "http://schema.nuget.org/services#",
                "comment": "http://www.w3.org/2000/01/rdf-schema#comment",
            },
        }

    def _hive_packages(self, lid: str, hive: _Hive) -> list[NuGetPackage]:
        pkgs = sorted(self._packages.get(lid, {}).values(), key=lambda p: version_key(p.version))
        return [p for p in pkgs if hive.semver2 or not is_semver2(p.verbatim_version)]

    def catalog_leaf_url(self, pkg: NuGetPackage) -> str:
        stamp = datetime.fromisoformat(pkg.commit_time).strftime("%Y.%m.%d.%H.%M.%S")
        return f"{self.origin}/v3/catalog0/data/{stamp}/{pkg.lower_id}.{pkg.lower_version}.json"

    def _dependency_groups(self, pkg: NuGetPackage, base: str, at: str) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = []
        for i, group in enumerate(pkg.dependency_groups):
            gid = f"{at}#dependencygroup/{group.target_framework.lower() or i}"
            doc: dict[str, Any] = {"@id": gid, "@type": "PackageDependencyGroup"}
            if group.dependencies:
                doc["dependencies"] = [
                    {
                        "@id": f"{gid}/{lower_id(dep)}",
                        "@type": "PackageDependency",
                        "id": dep,
                        "range": normalize_range(rng),
                        "registration": f"{base}{lower_id(dep)}/index.json",
                    }
                    for dep, rng in group.dependencies
                ]
            if group.target_framework:
                doc["targetFramework"] = group.target_framework
            groups.append(doc)
        return groups

    def _catalog_entry(self, pkg: NuGetPackage, base: str) -> dict[str, Any]:
        at = self.catalog_leaf_url(pkg)
        entry: dict[str, Any] = {
            "@id": at,
            "@type": "PackageDetails",
            "authors": pkg.authors,
            "dependencyGroups": self._dependency_groups(pkg, base, at),
            "description": pkg.description,
            "iconUrl": "",
            "id": pkg.id,
            "language": "",
            "licenseExpression": "",
            "licenseUrl": "",
            "listed": pkg.listed,
            "minClientVersion": "",
            "packageContent": self._content_url(pkg),
            "projectUrl": "",
            "published": pkg.published if pkg.listed else UNLISTED_PUBLISHED,
            "requireLicenseAcceptance": False,
            "summary": "",
            "tags": [""],
            "title": "",
            "version": pkg.version,
        }
        if self.hash_in_registration:
            entry |= {"packageHash": pkg.sha512, "packageHashAlgorithm": "SHA512", "packageSize": pkg.size}
        return entry

    def _content_url(self, pkg: NuGetPackage) -> str:
        return f"{self.flat_container}{pkg.lower_id}/{pkg.lower_version}/{pkg.filename}"

    def _leaf_item(self, pkg: NuGetPackage, base: str) -> dict[str, Any]:
        return {
            "@id": f"{base}{pkg.lower_id}/{pkg.lower_version}.json",
            "@type": "Package",
            "commitId": pkg.commit_id,
            "commitTimeStamp": pkg.commit_time,
            "catalogEntry": self._catalog_entry(pkg, base),
            "packageContent": self._content_url(pkg),
            "registration": f"{base}{pkg.lower_id}/index.json",
        }

    def _pages(self, pkgs: list[NuGetPackage]) -> list[list[NuGetPackage]]:
        return [pkgs[i : i + self.page_size] for i in range(0, len(pkgs), self.page_size)]

    def _page_doc(self, page: list[NuGetPackage], base: str, lid: str, *, inline: bool) -> dict[str, Any]:
        lower, upper = page[0].lower_version, page[-1].lower_version
        index = f"{base}{lid}/index.json"
        latest = max(page, key=lambda p: p.commit_time)
        doc: dict[str, Any] = {
            "@id": f"{index}#page/{lower}/{upper}" if inline else f"{base}{lid}/page/{lower}/{upper}.json",
            "@type": "catalog:CatalogPage",
            "commitId": latest.commit_id,
            "commitTimeStamp": latest.commit_time,
            "count": len(page),
        }
        if inline:
            doc["items"] = [self._leaf_item(p, base) for p in page]
        doc |= {"parent": index, "lower": lower, "upper": upper}
        return doc

    def registration_index(self, package_id: str, hive: str = SEMVER2_HIVE) -> dict[str, Any] | None:
        """The registration index of a package in a hive, or None when it has no version there."""
        lid = lower_id(package_id)
        pkgs = self._hive_packages(lid, HIVES[hive])
        if not pkgs:
            return None
        base = self.registration_base(hive)
        inline = len(pkgs) <= self.inline_threshold
        latest = max(pkgs, key=lambda p: p.commit_time)
        return {
            "@id": f"{base}{lid}/index.json",
            "@type": ["catalog:CatalogRoot", "PackageRegistration", "catalog:Permalink"],
            "commitId": latest.commit_id,
            "commitTimeStamp": latest.commit_time,
            "count": len(self._pages(pkgs)),
            "items": [self._page_doc(page, base, lid, inline=inline) for page in self._pages(pkgs)],
            "@context": _REGISTRATION_CONTEXT,
        }

    def _registration_page(self, lid: str, hive: str, lower: str, upper: str) -> dict[str, Any] | None:
        base = self.registration_base(hive)
        for page in self._pages(self._hive_packages(lid, HIVES[hive])):
            if page[0].lower_version == lower and page[-1].lower_version == upper:
                return self._page_doc(page, base, lid, inline=True) | {
                    "@id": f"{base}{lid}/page/{lower}/{upper}.json",
                    "@context": _REGISTRATION_CONTEXT,
                }
        return None

    def _registration_leaf(self, pkg: NuGetPackage, hive: str) -> dict[str, Any]:
        base = self.registration_base(hive)
        return {
            "@id": f"{base}{pkg.lower_id}/{pkg.lower_version}.json",
            "@type": ["Package", "http://schema.nuget.org/catalog#Permalink"],
            "catalogEntry": self.catalog_leaf_url(pkg),
            "listed": pkg.listed,
            "packageContent": self._content_url(pkg),
            "published": pkg.published if pkg.listed else UNLISTED_PUBLISHED,
            "registration": f"{base}{pkg.lower_id}/index.json",
            "@context": {
                "@vocab": "http://schema.nuget.org/schema#",
                "xsd": "http://www.w3.org/2001/XMLSchema#",
                "catalogEntry": {"@type": "@id"},
                "registration": {"@type": "@id"},
                "packageContent": {"@type": "@id"},
                "published": {"@type": "xsd:dateTime"},
            },
        }

    def catalog_leaf(self, pkg: NuGetPackage) -> dict[str, Any]:
        """The catalog leaf: the one nuget.org document with the package's SHA-512 and size."""
        at = self.catalog_leaf_url(pkg)
        return {
            "@id": at,
            "@type": ["PackageDetails", "catalog:Permalink"],
            "authors": pkg.authors,
            "catalog:commitId": pkg.commit_id,
            "catalog:commitTimeStamp": pkg.commit_time,
            "created": pkg.published,
            "dependencyGroups": self._dependency_groups(pkg, self.registration_base(), at),
            "description": pkg.description,
            "id": pkg.id,
            "isPrerelease": is_prerelease(pkg.version),
            "lastEdited": pkg.commit_time,
            "listed": pkg.listed,
            "packageHash": pkg.sha512,
            "packageHashAlgorithm": "SHA512",
            "packageSize": pkg.size,
            "published": pkg.published if pkg.listed else UNLISTED_PUBLISHED,
            "verbatimVersion": pkg.verbatim_version,
            "version": pkg.version,
            "@context": {
                "@vocab": "http://schema.nuget.org/schema#",
                "catalog": "http://schema.nuget.org/catalog#",
            },
        }

    def _visible(self, pkgs: Iterable[NuGetPackage], prerelease: bool, semver2: bool) -> list[NuGetPackage]:
        return [
            p
            for p in pkgs
            if p.listed
            and (prerelease or not is_prerelease(p.version))
            and (semver2 or not is_semver2(p.verbatim_version))
        ]

    def _matches(self, q: str) -> list[str]:
        """Lower ids matching a search query: ``id:X``/``packageid:X`` exactly, else substrings."""
        q = q.strip().lower()
        for prefix in ("packageid:", "id:"):
            if q.startswith(prefix):
                exact = q.removeprefix(prefix).strip()
                return [exact] if exact in self._packages else []
        terms = q.split()
        return sorted(lid for lid in self._packages if all(t in lid for t in terms))

    def search(
        self, q: str, *, skip: int = 0, take: int = 20, prerelease: bool = False, semver2: bool = False
    ) -> dict[str, Any]:
        """The ``/query`` answer (latest visible version per package, with all visible versions)."""
        base = self.registration_base(SEMVER2_HIVE if semver2 else "registration5-semver1")
        data: list[dict[str, Any]] = []
        for lid in self._matches(q):
            visible = self._visible(self.packages(lid), prerelease, semver2)
            if not visible:
                continue
            latest = visible[-1]
            data.append(
                {
                    "@id": f"{base}{lid}/index.json",
                    "@type": "Package",
                    "registration": f"{base}{lid}/index.json",
                    "id": latest.id,
                    "version": latest.version,
                    "description": latest.description,
                    "summary": "",
                    "title": latest.id,
                    "iconUrl": "",
                    "licenseUrl": "",
                    "projectUrl": "",
                    "tags": [],
                    "authors": [latest.authors],
                    "owners": [],
                    "totalDownloads": 0,
                    "verified": False,
                    "packageTypes": [{"name": "Dependency"}],
                    "versions": [
                        {"version": p.version, "downloads": 0, "@id": f"{base}{lid}/{p.lower_version}.json"}
                        for p in visible
                    ],
                    "vulnerabilities": [],
                }
            )
        return {
            "@context": {"@vocab": "http://schema.nuget.org/schema#", "@base": base},
            "totalHits": len(data),
            "data": data[skip : skip + take],
        }

    def autocomplete(
        self,
        q: str,
        *,
        package_id: str | None = None,
        skip: int = 0,
        take: int = 20,
        prerelease: bool = False,
        semver2: bool = False,
    ) -> dict[str, Any]:
        """``/autocomplete``: matching ids, or with ``id=`` the visible versions of that package."""
        context = {"@vocab": "http://schema.nuget.org/schema#"}
        if package_id is not None:
            versions = [p.version for p in self._visible(self.packages(package_id), prerelease, semver2)]
            return {"@context": context, "totalHits": len(versions), "data": versions}
        ids = [
            visible[-1].id
            for lid in self._matches(q)
            if (visible := self._visible(self.packages(lid), prerelease, semver2))
        ]
        return {"@context": context, "totalHits": len(ids), "data": ids[skip : skip + take]}

    # -------------------------------------------------------------------- routing

    def _json(self, request: web.Request, doc: Any, *, gzipped: bool = False) -> Reply:
        body = _dumps(doc)
        headers = {"Content-Type": "application/json", "Cache-Control": "public, max-age=60"}
        if gzipped:
            body = gzip.compress(body, mtime=0)
            headers["Content-Encoding"] = "gzip"
        etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
        headers["ETag"] = etag
        if _etag_matches(request.headers.get("If-None-Match"), etag):
            return Reply(304, {"ETag": etag, "Cache-Control": headers["Cache-Control"]})
        return Reply(200, headers, body)

    def _blob(self, request: web.Request, body: bytes | _DiskBlob, etag: str, content_type: str) -> Reply:
        if _etag_matches(request.headers.get("If-None-Match"), etag):
            return Reply(304, {"ETag": etag})
        return Reply(200, {"Content-Type": content_type, "ETag": etag}, body)

    def _route_read(self, request: web.Request, raw: str) -> Reply:
        path = unquote(raw)
        if path == "/v3/index.json":
            return self._json(request, self.service_index())
        if path in ("/query", "/autocomplete"):
            return self._search(request, path)
        if m := re.fullmatch(rf"/{FLAT_CONTAINER}/({_ID})/index\.json", path):
            lid = m.group(1)
            if lid != lid.lower() or lid not in self._packages:
                return _blob_not_found()
            listing = [p.lower_version for p in self.packages(lid)]
            return self._json(request, {"versions": listing})
        if m := re.fullmatch(rf"/{FLAT_CONTAINER}/({_ID})/({_ID})/({_ID})", path):
            lid, lver, name = m.groups()
            pkg = self._packages.get(lid, {}).get(lver)
            if pkg is None or lid != pkg.lower_id:
                return _blob_not_found()
            if name == pkg.filename:
                etag = f'"0x{base64.b64decode(pkg.sha512).hex()[:16].upper()}"'
                return self._blob(request, pkg.body, etag, "application/octet-stream")
            if name == f"{lid}.nuspec":
                etag = f'"0x{hashlib.sha256(pkg.nuspec).hexdigest()[:16].upper()}"'
                return self._blob(request, pkg.nuspec, etag, "text/xml")
            return _blob_not_found()
        if path.startswith("/v3/catalog0/data/"):
            wanted = self.origin + path
            for versions in self._packages.values():
                for pkg in versions.values():
                    if self.catalog_leaf_url(pkg) == wanted:
                        return self._json(request, self.catalog_leaf(pkg))
            return _blob_not_found()
        if m := re.fullmatch(rf"/v3/({_ID})/({_ID})/(.+)", path):
            return self._route_registration(request, *m.groups())
        return Reply(404, {"Content-Type": "text/plain"}, b"not found\n")

    def _route_registration(self, request: web.Request, hive_name: str, lid: str, rest: str) -> Reply:
        hive = HIVES.get(hive_name)
        if hive is None or lid != lid.lower():
            return _blob_not_found()
        doc: dict[str, Any] | None = None
        if rest == "index.json":
            doc = self.registration_index(lid, hive_name)
        elif m := re.fullmatch(rf"page/({_ID})/({_ID})\.json", rest):
            doc = self._registration_page(lid, hive_name, *m.groups())
        elif rest.endswith(".json") and "/" not in rest:
            lver = rest.removesuffix(".json")
            pkg = self._packages.get(lid, {}).get(lver)
            if pkg is not None and pkg in self._hive_packages(lid, hive):
                doc = self._registration_leaf(pkg, hive_name)
        if doc is None:
            return _blob_not_found()
        return self._json(request, doc, gzipped=hive.gzip)

    def _search(self, request: web.Request, path: str) -> Reply:
        query = request.query

        def integer(name: str, default: int) -> int:
            try:
                return max(0, int(query.get(name, default)))
            except ValueError:
                return default

        prerelease = query.get("prerelease", "false").lower() == "true"
        semver2 = query.get("semVerLevel", "").startswith("2")
        skip, take = integer("skip", 0), integer("take", 20)
        if path == "/query":
            doc = self.search(
                query.get("q", ""), skip=skip, take=take, prerelease=prerelease, semver2=semver2
            )
        else:
            doc = self.autocomplete(
                query.get("q", ""),
                package_id=query.get("id"),
                skip=skip,
                take=take,
                prerelease=prerelease,
                semver2=semver2,
            )
        return self._json(request, doc)

    def _authorize(self, request: web.Request) -> Reply | None:
        key = request.headers.get("X-NuGet-ApiKey", "")
        if not key:
            return Reply(401, {"Content-Type": "text/plain"}, b"An API key is required.\n")
        if self.api_key is not None and key != self.api_key:
            return Reply(
                403,
                {"Content-Type": "text/plain"},
                b"The specified API key is invalid, has expired, or does not have permission "
                b"to access the specified package.\n",
            )
        return None

    async def _push(self, request: web.Request) -> Reply:
        """``PUT /api/v2/package``: the body is read in full even when the key is refused, so
        the push is recorded with what it carried."""
        parts, package = await _read_parts(request)
        reply, accepted = await self._accept(request, package)
        self.pushes.append(PushRecord(dict(request.headers), parts, reply.status, accepted))
        return reply

    async def _accept(
        self, request: web.Request, package: bytes | None
    ) -> tuple[Reply, tuple[str, str] | None]:
        """The answer to a push, and (id, version) when the package was published."""
        denied = self._authorize(request)
        if denied is not None:
            return denied, None
        if package is None:
            return Reply(400, {"Content-Type": "text/plain"}, b"No package in the request.\n"), None
        try:
            info = await asyncio.to_thread(read_nuspec, package)
        except (ValueError, zipfile.BadZipFile, ElementTree.ParseError) as exc:
            return Reply(400, {"Content-Type": "text/plain"}, f"Invalid package: {exc}\n".encode()), None
        if self.get(info.id, info.version) is not None:
            msg = f"A package with ID '{info.id}' and version '{normalize_version(info.version)}' "
            msg += "already exists and cannot be modified.\n"
            return Reply(409, {"Content-Type": "text/plain"}, msg.encode()), None
        pkg = self._register(info, package, package, True, None)
        return Reply(201, {"Content-Type": "text/plain"}, b""), (pkg.id, pkg.version)

    def _delete_or_relist(self, request: web.Request, package_id: str, version: str) -> Reply:
        denied = self._authorize(request)
        if denied is not None:
            return denied
        try:
            pkg = self.get(package_id, version)
        except ValueError:
            pkg = None
        if pkg is None:
            return Reply(404, {"Content-Type": "text/plain"}, b"Package not found.\n")
        if request.method == "POST":
            self.set_listed(pkg.id, pkg.version, True)
            return Reply(200, {}, b"")
        if self.delete_unlists:
            self.set_listed(pkg.id, pkg.version, False)
        else:
            self.remove_package(pkg.id, pkg.version)
        return Reply(204, {}, b"")

    async def _route(self, request: web.Request, raw: str) -> Reply:
        if re.fullmatch(r"/api/v2/package/?", raw):
            if request.method != "PUT":
                return Reply(405, {"Allow": "PUT"}, b"")
            return await self._push(request)
        if m := re.fullmatch(rf"/api/v2/package/({_ID})/({_ID})/?", raw):
            if request.method not in ("DELETE", "POST"):
                return Reply(405, {"Allow": "DELETE, POST"}, b"")
            return self._delete_or_relist(request, unquote(m.group(1)), unquote(m.group(2)))
        if request.method not in ("GET", "HEAD"):
            return Reply(405, {"Allow": "GET, HEAD"}, b"")
        return self._route_read(request, raw)

    async def _entry(self, request: web.Request) -> web.StreamResponse:
        raw = request.rel_url.raw_path
        self.hits[raw] += 1
        self.requests.append(
            SeenRequest(request.method, raw, request.rel_url.raw_query_string, dict(request.headers))
        )
        fault = self._take_fault(raw)
        if fault is not None:
            if fault.kind == "refuse":
                if request.transport is not None:
                    request.transport.abort()
                return web.Response(status=500)
            if fault.kind == "status":
                return web.Response(status=fault.status, text=f"fake upstream error {fault.status}\n")
            if fault.kind == "429":
                return web.Response(
                    status=429, headers={"Retry-After": str(fault.retry_after)}, text="too many requests\n"
                )
            if fault.kind == "stall" and await self._sleep(fault.delay) and request.transport is not None:
                request.transport.abort()
                return web.Response(status=500)
        reply = await self._route(request, raw)
        body_fault = fault if fault is not None and fault.kind in BODY_FAULTS else None
        return await self._send(request, reply, body_fault, read_chunk=256 * 1024)


async def _read_parts(request: web.Request) -> tuple[tuple[PartInfo, ...], bytes | None]:
    """Every part of a push body as (name, filename, content type, size), and the first file's
    bytes (NuGet.exe sends one part, ``package``); a non-multipart body counts as one part."""
    if not request.content_type.startswith("multipart/"):
        body = await request.read()
        return ((None, None, request.content_type, len(body)),), None
    parts: list[PartInfo] = []
    package: bytes | None = None
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):  # a nested multipart: never NuGet's
            parts.append((None, None, "multipart/mixed", 0))
            continue
        data = await part.read()
        parts.append((part.name, part.filename, part.headers.get("Content-Type"), len(data)))
        if package is None and part.filename is not None:
            package = bytes(data)
    return tuple(parts), package


def _blob_not_found() -> Reply:
    """nuget.org's static documents live in blob storage, which answers a miss like this."""
    return Reply(404, {"Content-Type": "application/xml"}, _BLOB_NOT_FOUND)
