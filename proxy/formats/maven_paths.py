"""Maven repository paths: what a request below ``/{domain}/maven/{repo}/`` refers to.

The maven2 layout is ``group/as/path/artifact/version/artifact-version[-classifier].ext`` plus
``maven-metadata.xml`` at the artifact level (its versions), at a SNAPSHOT version's level (its
timestamped files) and at a group's level (plugin prefixes; it looks like an artifact's, and is
told apart by its content). Any file may be followed by a checksum suffix. In the index, a
package is ``groupId:artifactId`` and a file is ``version/filename``, which keeps file names
unique within a package and the version derivable from the name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from proxy.errors import BadRequest

CHECKSUM_ALGORITHMS = ("sha1", "md5", "sha256", "sha512")
METADATA = "maven-metadata.xml"
# \Z, not $: "$" also matches before a trailing newline.
_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._\-+~]{0,199}\Z")
_PACKAGE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._\-]*:[A-Za-z0-9_][A-Za-z0-9._\-]*\Z")

Kind = Literal["directory", "file", "artifact-metadata", "version-metadata"]


@dataclass(frozen=True, slots=True)
class MavenPath:
    """A parsed request path."""

    kind: Kind
    segments: tuple[str, ...]
    group: str = ""
    artifact: str = ""
    version: str = ""
    filename: str = ""  # the file's name without any checksum suffix
    checksum: str | None = None  # "sha1", "md5", "sha256" or "sha512"

    @property
    def package(self) -> str:
        return f"{self.group}:{self.artifact}"

    @property
    def asset_name(self) -> str:
        """The file's name in the index: ``version/filename``."""
        return f"{self.version}/{self.filename}"

    @property
    def directory(self) -> str:
        """The artifact's directory, relative to the repository root."""
        return f"{self.group.replace('.', '/')}/{self.artifact}"


def parse_path(path: str) -> MavenPath:
    """Parse the part of a request path below the repository; 400 naming what is wrong."""
    if path == "" or path.endswith("/"):
        segments = tuple(s for s in path.split("/") if s)
        for segment in segments:
            _check_segment(segment)
        return MavenPath("directory", segments)
    segments = tuple(path.split("/"))
    for segment in segments:
        _check_segment(segment)
    name, checksum = split_checksum(segments[-1])
    dirs = segments[:-1]
    if name == METADATA:
        if len(dirs) >= 3 and dirs[-1].endswith("-SNAPSHOT"):
            return MavenPath(
                "version-metadata", segments, ".".join(dirs[:-2]), dirs[-2], dirs[-1], name, checksum
            )
        if len(dirs) >= 2:
            return MavenPath("artifact-metadata", segments, ".".join(dirs[:-1]), dirs[-1], "", name, checksum)
        raise BadRequest(f"{path!r} is not a maven-metadata.xml of a group or an artifact")
    if len(dirs) < 3:
        raise BadRequest(f"{path!r} is not a Maven artifact path (group/artifact/version/file)")
    group, artifact, version = ".".join(dirs[:-2]), dirs[-2], dirs[-1]
    if not name.startswith(f"{artifact}-"):
        raise BadRequest(f"{name!r} is not a file of {group}:{artifact} (it must start with {artifact}-)")
    return MavenPath("file", segments, group, artifact, version, name, checksum)


def split_checksum(name: str) -> tuple[str, str | None]:
    """``a-1.0.jar.sha1`` → (``a-1.0.jar``, ``sha1``)."""
    for algorithm in CHECKSUM_ALGORITHMS:
        if name.endswith(f".{algorithm}"):
            return name[: -len(algorithm) - 1], algorithm
    return name, None


def valid_package(package: str) -> bool:
    return bool(_PACKAGE.match(package))


def _check_segment(segment: str) -> None:
    if not _SEGMENT.match(segment):
        raise BadRequest(f"path segment {segment!r} is not valid in a Maven repository path")
