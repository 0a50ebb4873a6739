"""Shared value types. No I/O here: these are the words every layer uses to talk to the others."""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

_HEX64 = re.compile(r"^[0-9a-f]{64}\Z")  # \Z: "$" would let a trailing newline into a file name

# Hash algorithms a document may declare that we are able to check while streaming.
CHECKABLE_HASHES = frozenset({"md5", "sha1", "sha224", "sha256", "sha384", "sha512"})


class CacheStatus(enum.StrEnum):
    """What the ``X-Cache`` header says about a response."""

    HIT = "HIT"  # served from the cache, fresh
    MISS = "MISS"  # fetched from an upstream for this request
    STALE = "STALE"  # served from the cache although expired, because the upstream failed or lagged
    REVALIDATED = "REVALIDATED"  # expired, the upstream confirmed it unchanged

    @staticmethod
    def combine(statuses: list[CacheStatus]) -> CacheStatus:
        """The status of a merged document: the least comfortable of its sources."""
        for status in (CacheStatus.STALE, CacheStatus.MISS, CacheStatus.REVALIDATED):
            if status in statuses:
                return status
        return CacheStatus.HIT


@dataclass(frozen=True, slots=True)
class Digest:
    """A SHA-256 content address: the only name a blob ever has on disk."""

    hex: str

    def __post_init__(self) -> None:
        if not _HEX64.match(self.hex):
            raise ValueError(f"not a sha256 hex digest: {self.hex!r}")

    @classmethod
    def of(cls, data: bytes) -> Digest:
        """The digest of some bytes held in memory (small documents only)."""
        return cls(hashlib.sha256(data).hexdigest())

    def __str__(self) -> str:
        return f"sha256:{self.hex}"


@dataclass(frozen=True, slots=True)
class RepoRef:
    """Which repository a request is about: the domain and the repository's name."""

    domain: str
    repository: str


@dataclass(frozen=True, slots=True)
class ListedFile:
    """One downloadable file in a package listing, whatever the format.

    ``url`` is where the upstream serves it (absolute); ``source`` names the external connection
    that listed it, so the asset fetch goes to the right place. ``hidden`` files (such as PEP 658
    metadata files) can be fetched by name but are not rendered as entries of their own.
    ``extra`` carries the adapter's own per-file fields, opaque to the pipeline.
    """

    filename: str
    url: str
    source: str
    hashes: Mapping[str, str] = field(default_factory=dict)
    version: str | None = None
    size: int | None = None
    hidden: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)
    # Asked for by path rather than listed (Maven): the upstream's 404 then means "no such
    # file", where for a listed file it means the upstream contradicts its own listing.
    located: bool = False

    @property
    def sha256(self) -> str | None:
        """The declared SHA-256, if the upstream declared one."""
        return self.hashes.get("sha256")


@dataclass(frozen=True, slots=True)
class Listing:
    """A format-neutral view of one package's metadata document (or a merge of several)."""

    package: str
    files: tuple[ListedFile, ...] = ()
    versions: tuple[str, ...] = ()
    serial: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def file(self, filename: str) -> ListedFile | None:
        """The entry called ``filename``, hidden ones included."""
        for entry in self.files:
            if entry.filename == filename:
                return entry
        return None

    @staticmethod
    def merge(package: str, listings: list[Listing]) -> Listing:
        """Merge listings in resolution order: for the same filename the nearest source wins."""
        seen: dict[str, ListedFile] = {}
        versions: dict[str, None] = {}
        for listing in listings:
            for entry in listing.files:
                seen.setdefault(entry.filename, entry)
            versions.update(dict.fromkeys(listing.versions))
        serials = [lst.serial for lst in listings if lst.serial is not None]
        extra: dict[str, Any] = {}
        for listing in listings:  # nearest wins; tables (such as npm's dist-tags) merge per key
            for key, value in listing.extra.items():
                if key not in extra:
                    extra[key] = dict(value) if isinstance(value, Mapping) else value
                elif isinstance(value, Mapping) and isinstance(extra[key], dict):
                    for sub, item in value.items():
                        extra[key].setdefault(sub, item)
        return Listing(
            package=package,
            files=tuple(seen.values()),
            versions=tuple(versions),
            serial=max(serials) if serials else None,
            extra=extra,
        )


@dataclass(frozen=True, slots=True)
class AssetRecord:
    """An index row: one file of one package in one repository, mapped to a blob."""

    repo: RepoRef
    format: str
    package: str
    filename: str
    digest: Digest
    size: int
    content_type: str
    version: str | None = None
    origin_url: str | None = None
    upstream: str | None = None
    hosted: bool = False
    fetched_at: float = 0.0
