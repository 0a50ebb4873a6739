"""Declared dependencies: the neutral value and the interface each format's reader implements.

A reader knows, for one format, which stored file of a version declares its dependencies (a
wheel's METADATA, an npm tarball's package.json, a .pom, a .nuspec), how to read them from
that file's bytes with the format's own rules (never running anything), and the format's
version-range semantics, so the pipeline (pipeline/dependencies.py) can answer "what does X
depend on" and "who depends on evil@6.6.6" without naming a format. The readers are listed in
``proxy.formats.deps.READERS``: a new format adds one module and one line there.
"""

from __future__ import annotations

import tarfile
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, BinaryIO, ClassVar

# A metadata file bigger than this is refused rather than read into memory (invariant 7).
MAX_MANIFEST = 8 * 2**20


class RangeError(ValueError):
    """A version range (or version) that is not valid in the format's syntax."""


@dataclass(frozen=True, slots=True)
class Declared:
    """One declared dependency, as written in the version's own metadata."""

    package: str  # canonical name in the format
    range: str  # as declared; '' when any version will do
    kind: str  # npm: the manifest field; Maven: the scope or "parent"; PyPI, NuGet: "runtime"
    extras: str = ""  # PyPI: the extras asked of the dependency, comma-separated
    condition: str = ""  # PyPI: the environment marker; NuGet: the target framework; Maven: "optional"

    def as_json(self) -> dict[str, Any]:
        return {
            "package": self.package,
            "range": self.range,
            "kind": self.kind,
            "extras": self.extras,
            "condition": self.condition,
        }


class DependencyReader(ABC):
    """One format's dependency rules; see the module docstring."""

    format: ClassVar[str]

    @abstractmethod
    def source_rank(self, filename: str) -> int | None:
        """How good a stored file is as the version's dependency source (lowest wins); None
        when it declares none (checksums, signatures, jars...)."""

    @abstractmethod
    def read(self, filename: str, blob: Callable[[], BinaryIO]) -> list[Declared]:
        """The dependencies the file declares. Blocking (runs in a worker thread); ``blob()``
        opens the plaintext. ValueError when the file cannot be read as the format says."""

    @abstractmethod
    def normalize(self, name: str) -> str:
        """The canonical package name; RangeError when it is not a valid name."""

    @abstractmethod
    def version_key(self, version: str) -> Any:
        """A sort key in the format's version order; RangeError when it is not a version."""

    @abstractmethod
    def admits(self, spec: str, version: str) -> bool:
        """Whether the declared range ``spec`` admits ``version``; RangeError when malformed."""

    def check_range(self, spec: str) -> None:
        """RangeError when ``spec`` is not a range of the format (for queries: a 400)."""
        self.admits(spec, self.probe_version)

    probe_version: ClassVar[str] = "1.0.0"

    def same_version(self, a: str, b: str) -> bool:
        """Whether two spellings name one version (PyPI: 1.0 == 1.0.0)."""
        try:
            return bool(self.version_key(a) == self.version_key(b))
        except RangeError:
            return a == b

    def query_admits(self, spec: str, version: str) -> bool:
        """A query's range: a plain version means exactly that version in every format (NuGet
        would read a bare ``6.6.6`` as "6.6.6 or later"); anything else is a range."""
        try:
            self.version_key(spec)
        except RangeError:
            return self.admits(spec, version)
        return self.same_version(spec, version)

    def is_version(self, text: str) -> bool:
        try:
            self.version_key(text)
        except RangeError:
            return False
        return True


def read_limited(stream: IO[bytes], limit: int = MAX_MANIFEST) -> bytes:
    """At most ``limit`` bytes, or ValueError: a manifest is small, an enormous one is hostile."""
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"the manifest is bigger than {limit} bytes")
    return data


def zip_member(blob: Callable[[], BinaryIO], pick: Callable[[str], bool]) -> bytes:
    """The one member of a zip that ``pick`` chooses (first in name order), size-checked."""
    with blob() as raw, zipfile.ZipFile(raw) as archive:
        names = sorted(info.filename for info in archive.infolist() if pick(info.filename))
        if not names:
            raise ValueError("the archive holds no manifest")
        info = archive.getinfo(names[0])
        if info.file_size > MAX_MANIFEST:
            raise ValueError(f"{names[0]} is bigger than {MAX_MANIFEST} bytes")
        with archive.open(info) as member:
            return read_limited(member)


def tar_top_member(blob: Callable[[], BinaryIO], filename: str) -> bytes:
    """``<top folder>/filename`` of a tarball (npm's ``package/package.json``, an sdist's
    ``PKG-INFO``), size-checked; only the first members are looked at, where packers put it."""
    with blob() as raw, tarfile.open(fileobj=raw, mode="r:*") as archive:
        for count, member in enumerate(archive):
            if count > 1000:
                break
            if member.isfile() and member.name.count("/") == 1 and member.name.endswith("/" + filename):
                if member.size > MAX_MANIFEST:
                    raise ValueError(f"{filename} is bigger than {MAX_MANIFEST} bytes")
                stream = archive.extractfile(member)
                if stream is not None:
                    return read_limited(stream)
    raise ValueError(f"the archive holds no {filename}")
